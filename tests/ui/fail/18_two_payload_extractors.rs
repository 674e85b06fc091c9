use idem::{HandlerError, Json, idempotent};

#[idempotent(stream = "ORDERS", key = id)]
async fn handler(Json(id): Json<u64>, raw: bytes::Bytes) -> Result<(), HandlerError> {
    let _ = (id, raw);
    Ok(())
}

fn main() {}
