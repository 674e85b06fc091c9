use idem::{HandlerError, Json, idempotent};

#[idempotent(key = ordr.id, retension = "7d", lease = "5x", concurrency = 0, dedup = maybe)]
async fn handler(Json(order): Json<u64>, raw: bytes::Bytes) -> Result<(), HandlerError> {
    let _ = (order, raw);
    Ok(())
}

fn main() {}
