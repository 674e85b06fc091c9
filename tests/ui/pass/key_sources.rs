use idem::{Delivery, HandlerError, Json, idempotent};

#[derive(serde::Deserialize)]
struct Line {
    order: String,
    no: u32,
    sku: Option<String>,
}

#[idempotent(stream = "S", key = line.order)]
async fn field(Json(line): Json<Line>) -> Result<(), HandlerError> {
    let _ = line;
    Ok(())
}

#[idempotent(stream = "S", key = (line.order, line.no))]
async fn tuple(Json(line): Json<Line>) -> Result<(), HandlerError> {
    let _ = line;
    Ok(())
}

#[idempotent(stream = "S", key = line.sku)]
async fn optional(Json(line): Json<Line>) -> Result<(), HandlerError> {
    let _ = line;
    Ok(())
}

#[idempotent(stream = "S", key = header("Idempotency-Key"))]
async fn header(Json(line): Json<Line>) -> Result<(), HandlerError> {
    let _ = line;
    Ok(())
}

#[idempotent(stream = "S", key = msg_id)]
async fn message_id(delivery: Delivery) -> Result<(), HandlerError> {
    let _ = delivery;
    Ok(())
}

mod keys {
    pub fn by_subject(delivery: &idem::Delivery) -> String {
        delivery.subject().to_owned()
    }
}

#[idempotent(stream = "S", key = keys::by_subject)]
async fn function(mut raw: bytes::Bytes) -> Result<(), HandlerError> {
    let _ = raw.split_off(0);
    Ok(())
}

#[idempotent(stream = "S", key = payload.order.to_lowercase())]
async fn method(payload: Json<Line>) -> Result<(), HandlerError> {
    let _ = payload.0.no;
    Ok(())
}

fn main() {
    let _ = (field, tuple, optional, header, message_id, function, method);
}
