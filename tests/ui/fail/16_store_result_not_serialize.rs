use idem::{HandlerError, Json, idempotent};

struct CardId(u64);

#[idempotent(stream = "CARDS", key = id, store_result)]
async fn handler(Json(id): Json<u64>) -> Result<CardId, HandlerError> {
    Ok(CardId(id))
}

fn main() {}
