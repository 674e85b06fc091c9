use idem::{HandlerError, Json, idempotent};

async fn announce(card: u64, Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = (card, id);
    Ok(())
}

#[idempotent(stream = "PAYMENTS", key = id, on_duplicate = announce)]
async fn without_store_result(Json(id): Json<u64>) -> Result<u64, HandlerError> {
    Ok(id)
}

#[idempotent(stream = "PAYMENTS", key = id, store_result, on_duplicate = |x| x)]
async fn not_a_function(Json(id): Json<u64>) -> Result<u64, HandlerError> {
    Ok(id)
}

fn main() {}
