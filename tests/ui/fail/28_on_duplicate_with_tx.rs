use idem::{HandlerError, Json, Tx, idempotent};

// A duplicate's hook gets the handler's arguments but its `Tx`: the
// duplicate's effect committed with the first delivery, and it has no
// transaction of its own to hand over.
#[idempotent(
    stream = "LEDGER",
    key = id,
    dedup = transactional,
    store_result,
    on_duplicate = again
)]
async fn apply(Json(id): Json<u64>, tx: Tx) -> Result<u64, HandlerError> {
    let _ = tx;
    Ok(id)
}

async fn again(previous: u64, Json(id): Json<u64>, tx: Tx) -> Result<(), HandlerError> {
    let _ = (previous, id, tx);
    Ok(())
}

fn main() {}
