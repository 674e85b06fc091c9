use idem::{HandlerError, Json, State, idempotent};

#[idempotent(stream = "ORDERS", key = id)]
async fn handler<T: Clone + Send + Sync + 'static>(Json(id): Json<u64>, State(shared): State<T>) -> Result<(), HandlerError> {
    let _ = (id, shared);
    Ok(())
}

fn main() {}
