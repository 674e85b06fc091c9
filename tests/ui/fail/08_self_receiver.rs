use idem::{HandlerError, Json, idempotent};

struct Service;

impl Service {
    #[idempotent(stream = "ORDERS", key = id)]
    async fn handler(&self, Json(id): Json<u64>) -> Result<(), HandlerError> {
        let _ = id;
        Ok(())
    }
}

fn main() {}
