use idem::{HandlerError, Json, idempotent};

#[idempotent(service = "payments", subject = "pay.charge", key = id, store_result = false)]
async fn charge(Json(id): Json<u64>) -> Result<u64, HandlerError> {
    Ok(id)
}

fn main() {}
