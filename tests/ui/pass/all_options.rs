use idem::{HandlerError, Json, Retry, State, idempotent};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    total: i64,
}

#[derive(Clone)]
struct Db;

#[derive(serde::Serialize, serde::Deserialize)]
struct Receipt(u64);

#[idempotent(
    name = "receipts",
    stream = "ORDERS",
    start = 42,
    consumer = "orders-receipts",
    subject = "orders.*.created",
    key = order.id,
    dedup = kv,
    retention = "30d",
    lease = "2m",
    retry = Retry::exponential("100ms", "1m").attempts(10).jitter(),
    dead_letter = "orders.dead",
    concurrency = 64,
    on_missing_key = dead_letter,
    fingerprint = (order.id, order.total),
    store_result,
)]
async fn write_receipt(Json(order): Json<Order>, State(db): State<Db>) -> Result<Receipt, HandlerError> {
    let _ = db;
    Ok(Receipt(order.id))
}

#[idempotent(stream = "ORDERS", key = order.id, fingerprint = payload, on_missing_key = reject, store_result = false, start = all)]
async fn defaults_spelled_out(Json(order): Json<Order>) -> Result<(), HandlerError> {
    let _ = order.total;
    Ok(())
}

#[idempotent(stream = "ORDERS", key = order.id, retry = Retry::none())]
async fn no_retries(Json(order): Json<Order>) -> Result<(), HandlerError> {
    let _ = order;
    Ok(())
}

fn main() {
    let _ = (write_receipt, defaults_spelled_out, no_retries);
}
