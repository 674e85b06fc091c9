//! Retry policies: how often a failing handler is retried, and how long to
//! wait before each retry.
//!
//! A policy is a small value; the defaults are safe (exponential backoff
//! from 200 ms to 30 s with full jitter, 5 attempts, then the dead letter).
//! The attempt number comes from JetStream's delivery count, so a policy
//! holds across worker restarts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::duration::{DurationSpec, IntoDuration, InvalidDuration};

/// What to do after attempt `n` failed with a retryable error.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// NAK with this delay; the broker redelivers.
    RetryAfter(Duration),
    /// The last attempt failed: dead-letter.
    GiveUp,
}

impl RetryDecision {
    /// The same decision, waiting at least `floor` before the retry — a
    /// failure's [`retry_after`](crate::HandlerError::retry_after) hint. A
    /// hint never turns giving up into a retry.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem::retry::RetryDecision;
    ///
    /// let policy = RetryDecision::RetryAfter(Duration::from_millis(200));
    /// let hint = Some(Duration::from_secs(30));
    /// assert_eq!(policy.at_least(hint), RetryDecision::RetryAfter(Duration::from_secs(30)));
    /// assert_eq!(policy.at_least(Some(Duration::from_millis(1))), policy);
    /// assert_eq!(RetryDecision::GiveUp.at_least(hint), RetryDecision::GiveUp);
    /// ```
    pub fn at_least(self, floor: Option<Duration>) -> Self {
        match (self, floor) {
            (RetryDecision::RetryAfter(delay), Some(floor)) => {
                RetryDecision::RetryAfter(delay.max(floor))
            }
            (decision, _) => decision,
        }
    }
}

/// Why a policy cannot be used.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// `attempts(0)`: not even the first delivery would run.
    #[error("a retry policy needs at least 1 attempt (the first delivery); got 0")]
    ZeroAttempts,
    /// A delay that is not a duration.
    #[error(transparent)]
    InvalidDuration(#[from] InvalidDuration),
    /// An exponential base above its cap.
    #[error("exponential backoff starts at {base:?}, above its cap of {cap:?}")]
    BaseAboveCap {
        /// The first delay.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
}

crate::error::debug_as_report!(RetryError);

#[derive(Clone)]
enum Backoff {
    Exponential {
        base: DurationSpec,
        cap: DurationSpec,
    },
    Fixed(DurationSpec),
    Custom(Arc<dyn Fn(u32) -> Duration + Send + Sync>),
}

/// A retry policy.
///
/// ```
/// use std::time::Duration;
/// use idem::retry::{Retry, RetryDecision};
///
/// let policy = Retry::exponential("200ms", "30s").attempts(8).jitter();
/// assert_eq!(policy.validate(), Ok(()));
/// assert_eq!(policy.max_attempts(), 8);
/// match policy.after_failure(1) {
///     RetryDecision::RetryAfter(delay) => assert!(delay <= Duration::from_millis(200)),
///     RetryDecision::GiveUp => unreachable!(),
/// }
/// assert_eq!(policy.after_failure(8), RetryDecision::GiveUp);
/// ```
#[derive(Clone)]
pub struct Retry {
    backoff: Backoff,
    attempts: u32,
    jitter: bool,
}

impl Default for Retry {
    /// Exponential from 200 ms to 30 s, full jitter, 5 attempts.
    fn default() -> Self {
        Retry::exponential(Duration::from_millis(200), Duration::from_secs(30))
            .attempts(5)
            .jitter()
    }
}

impl Retry {
    /// Waits `base`, `2·base`, `4·base`, … up to `cap` between attempts.
    pub fn exponential(base: impl IntoDuration, cap: impl IntoDuration) -> Self {
        Self::with(Backoff::Exponential {
            base: base.into_duration(),
            cap: cap.into_duration(),
        })
    }

    /// Waits the same `delay` between attempts.
    ///
    /// ```
    /// use idem::retry::{Retry, RetryDecision};
    /// use std::time::Duration;
    ///
    /// let policy = Retry::fixed("2s").attempts(3);
    /// assert_eq!(policy.after_failure(2), RetryDecision::RetryAfter(Duration::from_secs(2)));
    /// ```
    pub fn fixed(delay: impl IntoDuration) -> Self {
        Self::with(Backoff::Fixed(delay.into_duration()))
    }

    /// No retries: the first retryable failure dead-letters.
    ///
    /// ```
    /// use idem::retry::{Retry, RetryDecision};
    ///
    /// assert_eq!(Retry::none().after_failure(1), RetryDecision::GiveUp);
    /// ```
    pub fn none() -> Self {
        Self::with(Backoff::Fixed(DurationSpec::Valid(Duration::ZERO))).attempts(1)
    }

    /// The delay after failed attempt `n` (1-based) is `delay(n)`.
    ///
    /// ```
    /// use idem::retry::{Retry, RetryDecision};
    /// use std::time::Duration;
    ///
    /// let policy = Retry::custom(|n| Duration::from_secs(u64::from(n) * 10)).attempts(4);
    /// assert_eq!(policy.after_failure(3), RetryDecision::RetryAfter(Duration::from_secs(30)));
    /// ```
    pub fn custom(delay: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Self {
        Self::with(Backoff::Custom(Arc::new(delay)))
    }

    fn with(backoff: Backoff) -> Self {
        Self {
            backoff,
            attempts: 5,
            jitter: false,
        }
    }

    /// How many deliveries in all, the first included; after the last one
    /// fails the message is dead-lettered.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Full jitter: each delay is drawn uniformly from zero to the computed
    /// delay, so that workers that failed together do not retry together.
    pub fn jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The number of deliveries in all.
    pub fn max_attempts(&self) -> u32 {
        self.attempts
    }

    /// Checks the policy; the runtime refuses to start with an invalid one.
    pub fn validate(&self) -> Result<(), RetryError> {
        if self.attempts == 0 {
            return Err(RetryError::ZeroAttempts);
        }
        match &self.backoff {
            Backoff::Exponential { base, cap } => {
                let (base, cap) = (base.get()?, cap.get()?);
                if base > cap {
                    return Err(RetryError::BaseAboveCap { base, cap });
                }
            }
            Backoff::Fixed(delay) => {
                delay.get()?;
            }
            Backoff::Custom(_) => {}
        }
        Ok(())
    }

    /// What to do after attempt `attempt` (1-based, JetStream's delivery
    /// count) failed with a retryable error. An invalid policy gives up
    /// rather than guess (the runtime validates before it gets here).
    pub fn after_failure(&self, attempt: u32) -> RetryDecision {
        if attempt >= self.attempts || self.validate().is_err() {
            return RetryDecision::GiveUp;
        }
        let delay = self.nominal_delay(attempt.max(1));
        let delay = if self.jitter {
            full_jitter(delay)
        } else {
            delay
        };
        RetryDecision::RetryAfter(delay)
    }

    /// The delay before jitter.
    fn nominal_delay(&self, attempt: u32) -> Duration {
        match &self.backoff {
            Backoff::Exponential { base, cap } => {
                let (base, cap) = (
                    base.get().unwrap_or_default(),
                    cap.get().unwrap_or_default(),
                );
                let factor = 2u32.checked_pow(attempt - 1).unwrap_or(u32::MAX);
                base.checked_mul(factor).unwrap_or(cap).min(cap)
            }
            Backoff::Fixed(delay) => delay.get().unwrap_or_default(),
            Backoff::Custom(delay) => delay(attempt),
        }
    }
}

fn full_jitter(delay: Duration) -> Duration {
    let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// The pauses of one of idem's own retry loops — start-up, completion
/// records, pulls, an unreachable store, a key held elsewhere, resends: a
/// [`Retry`] without an attempt limit, counted by the loop that waits.
/// Every such loop is one of these, and their constants are here.
#[derive(Clone, Debug)]
pub(crate) struct Schedule {
    policy: Retry,
    attempt: u32,
}

impl Schedule {
    /// Exponential from `base` to `cap`, without end.
    pub(crate) fn exponential(base: Duration, cap: Duration) -> Self {
        Self::of(Retry::exponential(base, cap))
    }

    /// `policy`'s pauses, without its attempt limit.
    pub(crate) fn of(policy: Retry) -> Self {
        Self {
            policy: policy.attempts(u32::MAX),
            attempt: 0,
        }
    }

    /// Start-up while the servers do not answer: 100 ms doubling to 5 s.
    pub(crate) fn startup() -> Self {
        Self::exponential(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Recording a completion while the store is out of reach: 50 ms
    /// doubling to 1 s (nobody can take the claim meanwhile).
    pub(crate) fn completion() -> Self {
        Self::exponential(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Pulls that fail: 100 ms doubling to 2 s.
    pub(crate) fn pulls() -> Self {
        Self::exponential(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// A delivery NAKed because the dedup store is unreachable: 250 ms
    /// doubling to 10 s, with jitter, by delivery count.
    pub(crate) fn store_unreachable() -> Self {
        Self::of(Retry::exponential(Duration::from_millis(250), Duration::from_secs(10)).jitter())
    }

    /// A delivery NAKed because another worker holds its key: 50 ms
    /// doubling by delivery count (the caller caps it at the lease).
    pub(crate) fn key_held() -> Self {
        Self::exponential(Duration::from_millis(50), Duration::from_secs(3600))
    }

    /// A confirmed ack that got no confirmation: 100 ms, then 200 ms,
    /// three tries in all (a lost ack only costs a redelivery).
    pub(crate) fn confirmed_ack() -> Self {
        Self::exponential(Duration::from_millis(100), Duration::from_millis(400))
    }

    /// The pause after the next failure.
    pub(crate) fn next(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.at(self.attempt)
    }

    /// The pause after failure `attempt` (1-based), for loops whose count
    /// is kept elsewhere (a message's delivery count).
    pub(crate) fn at(&self, attempt: u32) -> Duration {
        match self.policy.after_failure(attempt.max(1)) {
            RetryDecision::RetryAfter(pause) => pause,
            RetryDecision::GiveUp => self.policy.nominal_delay(u32::MAX),
        }
    }

    /// Back to the first pause, after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl fmt::Debug for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Retry");
        match &self.backoff {
            Backoff::Exponential { base, cap } => s.field("exponential", &(base, cap)),
            Backoff::Fixed(delay) => s.field("fixed", delay),
            Backoff::Custom(_) => s.field("custom", &"fn(attempt) -> Duration"),
        };
        s.field("attempts", &self.attempts)
            .field("jitter", &self.jitter)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delay(policy: &Retry, attempt: u32) -> Duration {
        match policy.after_failure(attempt) {
            RetryDecision::RetryAfter(d) => d,
            RetryDecision::GiveUp => panic!("gave up after attempt {attempt}"),
        }
    }

    #[test]
    fn exponential_doubles_up_to_the_cap_then_gives_up() {
        let policy = Retry::exponential("100ms", "1s").attempts(7);
        let delays: Vec<u64> = (1..7)
            .map(|n| delay(&policy, n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.after_failure(7), RetryDecision::GiveUp);
        assert_eq!(policy.after_failure(70), RetryDecision::GiveUp);
        // Far past any sane attempt count the arithmetic saturates at the cap.
        let many = Retry::exponential("1s", "1h").attempts(u32::MAX);
        assert_eq!(delay(&many, 200), Duration::from_secs(3600));
    }

    #[test]
    fn a_schedule_counts_its_own_failures_and_never_ends() {
        let mut pulls = Schedule::pulls();
        let pauses: Vec<u128> = (0..7).map(|_| pulls.next().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 2000, 2000]);
        pulls.reset();
        assert_eq!(pulls.next(), Duration::from_millis(100));
        assert_eq!(Schedule::startup().at(u32::MAX), Duration::from_secs(5));
        assert_eq!(Schedule::key_held().at(3), Duration::from_millis(200));
    }

    #[test]
    fn full_jitter_stays_within_the_nominal_delay_and_varies() {
        let policy = Retry::exponential("1s", "1s").attempts(1000).jitter();
        let draws: Vec<Duration> = (1..200).map(|n| delay(&policy, n)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(1)));
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(
            distinct.len() > 150,
            "jitter should spread delays: {} distinct",
            distinct.len()
        );
    }

    #[test]
    fn invalid_policies_are_named_and_never_retry() {
        assert_eq!(
            Retry::fixed("1s").attempts(0).validate(),
            Err(RetryError::ZeroAttempts)
        );
        let bad = Retry::exponential("5x", "1s");
        assert!(
            matches!(bad.validate(), Err(RetryError::InvalidDuration(InvalidDuration { ref text })) if text == "5x")
        );
        assert_eq!(bad.after_failure(1), RetryDecision::GiveUp);
        assert!(matches!(
            Retry::exponential("10s", "1s").validate(),
            Err(RetryError::BaseAboveCap { .. })
        ));
        assert_eq!(Retry::default().validate(), Ok(()));
        assert_eq!(Retry::default().max_attempts(), 5);
    }
}
