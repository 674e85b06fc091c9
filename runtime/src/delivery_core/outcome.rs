//! What became of one delivery: the outcomes the delivery core counts,
//! one counter each (their names and the snapshot are `consumer::stats`'s).

/// What became of one delivery.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its completion is recorded; acknowledged.
    Processed,
    /// Completed before: acknowledged without running.
    Duplicate,
    /// Another worker holds the key: NAKed with a delay.
    InFlightElsewhere,
    /// A retryable failure: claim released, NAKed with backoff.
    Retried,
    /// Dead-lettered (permanent error, retries exhausted, decode failure,
    /// missing key, key conflict); the original terminated.
    DeadLettered,
    /// Completed with a payload other than the first under the same key
    /// (also counted as dead-lettered).
    KeyConflict,
    /// The completion found another owner: the effect may have run twice.
    LeaseLost,
    /// Took over a claim whose lease had expired (the old owner may have had
    /// its effect).
    Reclaimed,
    /// The dedup store could not be reached: not run, NAKed (fail closed).
    StoreUnavailable,
    /// The payload did not decode (also counted as dead-lettered).
    DecodeFailed,
    /// No key, and `on_missing_key = reject`: acknowledged and dropped. For
    /// a request/reply handler: a request answered with an error asking
    /// again cannot cure (it does not decode, has no key, or the handler
    /// refused it with a permanent error).
    Rejected,
    /// Shutdown interrupted the handler: claim released, NAKed.
    Interrupted,
    /// The dead letter could not be stored: the original was NAKed, not
    /// terminated.
    DeadLetterFailed,
    /// The handler panicked: a failed attempt, retried under the handler's
    /// policy, then dead-lettered with reason `panic`.
    Panicked,
    /// `dedup = transactional` with group commit: the handler met a lock
    /// conflict (a deadlock, serialization failure or lock timeout) that
    /// grouping can cause — in a group's transaction, or alone beside one.
    /// Nothing of the run committed; it runs again, not counted against
    /// its retries (alone, then with no group beside it, where a lock
    /// conflict is its own). Many of them: a smaller `batch` may serve
    /// better.
    LockConflict,
}
