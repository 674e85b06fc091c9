//! Why a message never completes: the reasons a dead letter carries.

/// Why a message was dead-lettered: the `Idem-Reason` header.
///
/// ```
/// use idem::handler::DeadLetterReason;
///
/// assert_eq!(DeadLetterReason::KeyConflict.as_str(), "key_conflict");
/// assert_eq!(DeadLetterReason::parse("panic"), Some(DeadLetterReason::Panic));
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The handler failed with a permanent error.
    HandlerError,
    /// The handler failed retryably on every attempt its policy allows.
    RetriesExhausted,
    /// The handler panicked on every attempt its policy allows.
    Panic,
    /// The payload did not decode into the handler's arguments.
    Decode,
    /// No idempotency key could be extracted.
    MissingKey,
    /// The key was first claimed with another payload.
    KeyConflict,
    /// A `State<T>` the handler takes was not registered.
    MissingState,
}

impl DeadLetterReason {
    /// Every reason.
    pub const ALL: [DeadLetterReason; 7] = [
        DeadLetterReason::HandlerError,
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::Panic,
        DeadLetterReason::Decode,
        DeadLetterReason::MissingKey,
        DeadLetterReason::KeyConflict,
        DeadLetterReason::MissingState,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::HandlerError => "handler_error",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::Panic => "panic",
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::MissingKey => "missing_key",
            DeadLetterReason::KeyConflict => "key_conflict",
            DeadLetterReason::MissingState => "missing_state",
        }
    }

    /// The reason a header value names, if any.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == value)
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
