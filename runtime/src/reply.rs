//! What an idempotent request/reply endpoint answers when it does not answer
//! with the handler's result: the kinds of refusal, their codes and the
//! headers that carry them — the vocabulary the serving side
//! ([`Runtime`](crate::Runtime) with a `service` handler) and the asking
//! side ([`Requester`](crate::publisher::Requester)) share.
//!
//! An error reply is a NATS micro service error (`Nats-Service-Error`,
//! `Nats-Service-Error-Code`) plus `Idem-Error`, which names the kind.

use std::fmt;

/// The header naming an error reply's [`ReplyErrorKind`].
pub const KIND_HEADER: &str = "Idem-Error";

/// Why an idempotent endpoint answered with an error.
///
/// ```
/// use idem::reply::ReplyErrorKind;
///
/// let kind = ReplyErrorKind::parse("key_conflict");
/// assert_eq!(kind, Some(ReplyErrorKind::KeyConflict));
/// assert_eq!(ReplyErrorKind::KeyConflict.code(), 409);
/// assert!(!ReplyErrorKind::KeyConflict.is_retryable());
/// assert!(ReplyErrorKind::InFlight.is_retryable());
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplyErrorKind {
    /// The request could not be decoded, or carries no key: asking again
    /// with the same request cannot help.
    BadRequest,
    /// The key was first used with another request (another fingerprint):
    /// a client bug, or two operations sharing a key.
    KeyConflict,
    /// The key's request failed for good earlier (it was dead-lettered).
    Dead,
    /// The handler returned a permanent error.
    Rejected,
    /// The handler failed (or panicked) with a retryable error; the key was
    /// released, so asking again runs it again.
    Failed,
    /// The key's first request is still running elsewhere and did not end
    /// within the endpoint's wait: ask again later for its answer.
    InFlight,
    /// The dedup store could not be reached: the handler did not run.
    StoreUnavailable,
    /// The handler ran, but whether its completion was recorded is unknown
    /// (the store failed, or its lease was lost): asking again answers from
    /// the record, or runs again after the lease if none was written.
    OutcomeUnknown,
    /// The endpoint is shutting down; the key was left for the next owner.
    ShuttingDown,
}

impl ReplyErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ReplyErrorKind; 9] = [
        ReplyErrorKind::BadRequest,
        ReplyErrorKind::KeyConflict,
        ReplyErrorKind::Dead,
        ReplyErrorKind::Rejected,
        ReplyErrorKind::Failed,
        ReplyErrorKind::InFlight,
        ReplyErrorKind::StoreUnavailable,
        ReplyErrorKind::OutcomeUnknown,
        ReplyErrorKind::ShuttingDown,
    ];

    /// The name carried in the `Idem-Error` header.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyErrorKind::BadRequest => "bad_request",
            ReplyErrorKind::KeyConflict => "key_conflict",
            ReplyErrorKind::Dead => "dead",
            ReplyErrorKind::Rejected => "rejected",
            ReplyErrorKind::Failed => "failed",
            ReplyErrorKind::InFlight => "in_flight",
            ReplyErrorKind::StoreUnavailable => "store_unavailable",
            ReplyErrorKind::OutcomeUnknown => "outcome_unknown",
            ReplyErrorKind::ShuttingDown => "shutting_down",
        }
    }

    /// The kind a header value names.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The `Nats-Service-Error-Code` (HTTP-like, as NATS micro services
    /// use them).
    pub fn code(self) -> usize {
        match self {
            ReplyErrorKind::BadRequest => 400,
            ReplyErrorKind::KeyConflict => 409,
            ReplyErrorKind::Dead => 410,
            ReplyErrorKind::Rejected => 422,
            ReplyErrorKind::Failed => 500,
            ReplyErrorKind::InFlight
            | ReplyErrorKind::StoreUnavailable
            | ReplyErrorKind::OutcomeUnknown
            | ReplyErrorKind::ShuttingDown => 503,
        }
    }

    /// Whether asking again with the same request may get an answer.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ReplyErrorKind::Failed
                | ReplyErrorKind::InFlight
                | ReplyErrorKind::StoreUnavailable
                | ReplyErrorKind::OutcomeUnknown
                | ReplyErrorKind::ShuttingDown
        )
    }
}

impl fmt::Display for ReplyErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_back_from_its_name() {
        for kind in ReplyErrorKind::ALL {
            assert_eq!(ReplyErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ReplyErrorKind::parse("nonsense"), None);
    }
}
