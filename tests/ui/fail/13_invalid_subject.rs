use idem::{HandlerError, Json, idempotent};

#[idempotent(stream = "ORDERS", key = id, subject = "orders. created")]
async fn spaces(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

#[idempotent(stream = "ORDERS", key = id, subject = "orders..created")]
async fn empty_token(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

#[idempotent(stream = "ORDERS", key = id, subject = "orders.>.created")]
async fn tail_wildcard_inside(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
