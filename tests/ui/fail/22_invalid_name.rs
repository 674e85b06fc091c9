use idem::{HandlerError, Json, idempotent};

#[idempotent(name = "orders.apply", stream = "ORDERS", key = id)]
async fn handler(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
