use idem::{HandlerError, Json, Tx, idempotent};

#[derive(serde::Deserialize)]
struct Transfer {
    id: String,
    amount: i64,
}

#[idempotent(stream = "LEDGER", key = transfer.id, dedup = transactional, store_result, batch = 64, linger = "5ms")]
async fn apply(Json(transfer): Json<Transfer>, tx: Tx) -> Result<i64, HandlerError> {
    sqlx::query("UPDATE accounts SET balance = balance - $1")
        .bind(transfer.amount)
        .execute(&mut *tx.conn().await?)
        .await?;
    Ok(transfer.amount)
}

fn main() {
    let _ = apply;
}
