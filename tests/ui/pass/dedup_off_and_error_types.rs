use idem::{HandlerError, Json, idempotent};

#[idempotent(stream = "SMS", subject = "sms.send", dedup = off, dead_letter = "sms.dead")]
pub async fn send_sms(Json(text): Json<String>) -> Result<(), HandlerError> {
    let _ = text;
    Ok(())
}

type IoResult<T> = Result<T, std::io::Error>;

#[idempotent(stream = "FILES", key = name)]
async fn any_error_type(Json(name): Json<String>) -> IoResult<u64> {
    Ok(name.len() as u64)
}

#[idempotent(stream = "FILES", key = name)]
async fn boxed_errors(Json(name): Json<String>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _: u32 = name.parse()?;
    Ok(())
}

fn main() {
    let _ = (send_sms, any_error_type, boxed_errors);
}
