use idem::{HandlerError, Json, Tx, idempotent};

#[idempotent(stream = "LEDGER", key = id, dedup = transactional, batch = 0, linger = "soon")]
async fn zero(Json(id): Json<u64>, tx: Tx) -> Result<(), HandlerError> {
    let _ = (id, tx);
    Ok(())
}

#[idempotent(stream = "LEDGER", key = id, batch = 8, linger = "1ms")]
async fn not_transactional(Json(id): Json<u64>) -> Result<(), HandlerError> {
    let _ = id;
    Ok(())
}

fn main() {}
