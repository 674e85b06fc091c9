//! A handler's panic, as the failure it is counted as: caught where the
//! handler runs, retried like a retryable error, and dead-lettered with
//! reason `panic` when the attempts run out.

/// A handler's panic, as the failure it is counted as.
#[derive(Debug, thiserror::Error)]
#[error("the handler panicked: {0}")]
pub(crate) struct HandlerPanicked(pub(crate) String);

impl HandlerPanicked {
    pub(crate) fn from_payload(payload: &(dyn std::any::Any + Send)) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        Self(text)
    }
}
