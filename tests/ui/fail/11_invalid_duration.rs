use idem::{HandlerError, Json, idempotent};

#[idempotent(stream = "ORDERS", key = id, retention = "5x")]
async fn handler(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
