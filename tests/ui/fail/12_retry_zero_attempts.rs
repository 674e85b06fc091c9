use idem::{HandlerError, Json, Retry, idempotent};

#[idempotent(stream = "ORDERS", key = id, retry = Retry::exponential("200ms", "30s").attempts(0))]
async fn handler(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
