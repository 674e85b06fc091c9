use idem::{Json, idempotent};

#[idempotent(stream = "ORDERS", key = id)]
async fn handler(Json(id): Json<u64>) -> u64 {
    id
}

fn main() {}
