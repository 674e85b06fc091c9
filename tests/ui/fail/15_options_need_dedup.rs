use idem::{HandlerError, Json, idempotent};

#[idempotent(stream = "SMS", dedup = off, retention = "1d", lease = "1m", fingerprint = none, store_result)]
async fn handler(Json(text): Json<String>) -> Result<(), HandlerError> {
    let _ = text;
    Ok(())
}

fn main() {}
