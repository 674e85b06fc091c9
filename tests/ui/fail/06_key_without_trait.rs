use idem::{HandlerError, Json, idempotent};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
}

#[idempotent(stream = "ORDERS", key = order)]
async fn handler(Json(order): Json<Order>) -> Result<(), HandlerError> {
    let _ = order.id;
    Ok(())
}

fn main() {}
