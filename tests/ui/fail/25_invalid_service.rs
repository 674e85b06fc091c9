use idem::{HandlerError, Json, Retry, idempotent};

#[idempotent(service = "payments", stream = "PAYMENTS", subject = "pay.charge", key = id)]
async fn both(Json(id): Json<u64>) -> Result<u64, HandlerError> {
    Ok(id)
}

#[idempotent(service = "pay.ments", key = id, version = "1.x")]
async fn no_subject(Json(id): Json<u64>) -> Result<u64, HandlerError> {
    Ok(id)
}

#[idempotent(
    service = "payments",
    subject = "pay.refund",
    key = id,
    retry = Retry::fixed("1s"),
    dead_letter = "pay.dead"
)]
async fn stream_options(Json(id): Json<u64>) -> Result<u64, HandlerError> {
    Ok(id)
}

#[idempotent(stream = "PAYMENTS", key = id, version = "1.0.0")]
async fn version_without_service(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
