use idem::{HandlerError, Json, idempotent};

#[idempotent(stream = "ORDERS", key = id, start = latest)]
async fn latest(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

#[idempotent(stream = "ORDERS", key = id, start = 0)]
async fn zero(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
