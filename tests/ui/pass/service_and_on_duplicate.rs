use idem::{HandlerError, Json, State, Tx, idempotent};

#[derive(serde::Deserialize)]
struct Charge {
    id: String,
    cents: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Receipt {
    id: String,
}

#[derive(Clone)]
struct Bus;

#[idempotent(service = "payments", version = "1.2.0", subject = "payments.charge", key = charge.id, lease = "10s", concurrency = 8)]
async fn charge_card(Json(charge): Json<Charge>) -> Result<Receipt, HandlerError> {
    let _ = charge.cents;
    Ok(Receipt { id: charge.id })
}

#[idempotent(service = "ledger", subject = "ledger.post", key = charge.id, dedup = transactional)]
async fn post(Json(charge): Json<Charge>, tx: Tx) -> Result<Receipt, HandlerError> {
    let _ = tx;
    Ok(Receipt { id: charge.id })
}

async fn announce(receipt: Receipt, Json(charge): Json<Charge>, State(bus): State<Bus>) -> Result<(), HandlerError> {
    let _ = (receipt.id, charge.cents, bus);
    Ok(())
}

#[idempotent(stream = "PAYMENTS", key = charge.id, store_result, on_duplicate = announce)]
async fn issue_receipt(Json(charge): Json<Charge>, State(bus): State<Bus>) -> Result<Receipt, HandlerError> {
    let _ = bus;
    Ok(Receipt { id: charge.id })
}

fn main() {
    let _ = (charge_card, post, issue_receipt);
}
