use idem::{HandlerError, Json, idempotent};

#[idempotent(stream = "ORDERS", key = id)]
fn handler(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
