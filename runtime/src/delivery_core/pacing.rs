//! How long a message waits before it comes back, and what a failed attempt
//! leads to: the handler's retry policy for its own failures, fixed
//! schedules (by JetStream's delivery count) for everything that is not
//! the handler's doing — a store out of reach, a key held elsewhere —
//! so that those never use up its attempts.

use std::time::Duration;

use crate::HandlerError;
use crate::handler::{DeadLetterReason, HandlerPanicked};
use crate::retry::{Retry, RetryDecision, Schedule};

/// The shortest NAK delay: a redelivery storm helps nobody.
pub const MIN_NAK_DELAY: Duration = Duration::from_millis(20);

/// Backoff while the dedup store is unreachable, by delivery count.
pub fn store_backoff(delivered: u32) -> Duration {
    Schedule::store_unreachable()
        .at(delivered)
        .max(MIN_NAK_DELAY)
}

/// How long a delivery whose key is held elsewhere waits: doubling from
/// 50 ms with each delivery, never past the holder's lease. Most holders
/// finish in milliseconds, so the duplicate is answered soon; a slow holder
/// costs a handful of cheap claim attempts, not a storm.
pub fn in_flight_delay(delivered: u32, remaining_lease: Duration) -> Duration {
    Schedule::key_held()
        .at(delivered)
        .min(remaining_lease)
        .max(MIN_NAK_DELAY)
}

/// The pause before recording a completion again after the store's
/// `failed`-th failure to: 50 ms doubling to 1 s (nobody can take the
/// claim meanwhile).
pub fn completion_pause(failed: u32) -> Duration {
    Schedule::completion().at(failed)
}

/// What a failed attempt leads to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// NAK with this delay.
    Retry(Duration),
    /// Dead-letter with this reason.
    DeadLetter(DeadLetterReason),
}

/// What failed attempt `attempt` leads to: a retry per the handler's
/// policy (never sooner than the error's `retry_after` hint), or a dead
/// letter (permanent errors; the last attempt, as `panic` if it panicked).
///
/// ```
/// use std::time::Duration;
/// use idem::delivery_core::{after_failure, Failure};
/// use idem::handler::DeadLetterReason;
/// use idem::{HandlerError, Retry};
///
/// let policy = Retry::fixed("1s").attempts(2);
/// let error = HandlerError::retryable("timeout");
/// assert_eq!(after_failure(&policy, &error, 1), Failure::Retry(Duration::from_secs(1)));
/// assert_eq!(
///     after_failure(&policy, &error, 2),
///     Failure::DeadLetter(DeadLetterReason::RetriesExhausted)
/// );
/// ```
pub fn after_failure(policy: &Retry, error: &HandlerError, attempt: u32) -> Failure {
    if error.is_permanent() {
        return Failure::DeadLetter(DeadLetterReason::HandlerError);
    }
    match policy.after_failure(attempt).at_least(error.retry_hint()) {
        RetryDecision::RetryAfter(delay) => Failure::Retry(delay),
        RetryDecision::GiveUp if error.error().is::<HandlerPanicked>() => {
            Failure::DeadLetter(DeadLetterReason::Panic)
        }
        RetryDecision::GiveUp => Failure::DeadLetter(DeadLetterReason::RetriesExhausted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_delays_double_from_50ms_and_stop_at_the_lease() {
        let lease = Duration::from_secs(30);
        let delays: Vec<u128> = (1..=6)
            .map(|a| in_flight_delay(a, lease).as_millis())
            .collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600]);
        assert_eq!(in_flight_delay(40, lease), lease);
        assert_eq!(
            in_flight_delay(3, Duration::from_millis(120)),
            Duration::from_millis(120)
        );
        assert_eq!(in_flight_delay(1, Duration::ZERO), MIN_NAK_DELAY);
    }
}
