//! How far ahead a handler's fetch loop pulls: far enough that pulls are
//! amortised over many fast messages, never so far that a fetched message
//! waits long for a permit.
//!
//! A fetched message is already delivered: its `ack_wait` runs while it
//! queues for one of the handler's permits. So the loop pulls ahead only
//! as many messages per permit as recent handler runs say can start within
//! [`QUEUE_BUDGET`] — up to [`MAX_AHEAD`] for handlers that take a fraction
//! of a millisecond, one per permit for slow handlers and before any run
//! has been timed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a fetched message may expect to wait for its permit.
const QUEUE_BUDGET: Duration = Duration::from_millis(100);
/// The most messages pulled ahead per permit.
const MAX_AHEAD: u64 = 16;

/// A moving average of how long the handler's messages take.
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// Microseconds; 0 until the first run is timed.
    typical_micros: AtomicU64,
}

impl Pace {
    /// Folds one message's handling time into the average (weight 1/8).
    /// Concurrent updates may overwrite each other: it is an estimate.
    pub(super) fn record(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let typical = self.typical_micros.load(Ordering::Relaxed);
        let next = if typical == 0 {
            sample
        } else {
            typical - typical / 8 + sample / 8
        };
        self.typical_micros.store(next.max(1), Ordering::Relaxed);
    }

    /// How many messages the next pull asks for, for `concurrency` permits
    /// and at most `max_batch`.
    pub(super) fn pull_size(&self, concurrency: usize, max_batch: usize) -> usize {
        let budget = u64::try_from(QUEUE_BUDGET.as_micros()).unwrap_or(u64::MAX);
        // Untimed (0): one per permit.
        let ahead = budget
            .checked_div(self.typical_micros.load(Ordering::Relaxed))
            .map_or(1, |ahead| ahead.clamp(1, MAX_AHEAD));
        let ahead = usize::try_from(ahead).unwrap_or(1);
        concurrency.saturating_mul(ahead).clamp(1, max_batch.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_permit_until_a_run_is_timed() {
        assert_eq!(Pace::default().pull_size(4, 256), 4);
    }

    #[test]
    fn fast_handlers_are_pulled_ahead_slow_ones_are_not() {
        let fast = Pace::default();
        fast.record(Duration::from_micros(300));
        assert_eq!(fast.pull_size(1, 256), 16);
        assert_eq!(fast.pull_size(64, 256), 256, "never past the batch limit");

        let medium = Pace::default();
        medium.record(Duration::from_millis(25));
        assert_eq!(medium.pull_size(2, 256), 8, "100 ms / 25 ms = 4 per permit");

        let slow = Pace::default();
        slow.record(Duration::from_secs(2));
        assert_eq!(slow.pull_size(8, 256), 8);
    }

    #[test]
    fn the_average_follows_a_slowdown() {
        let pace = Pace::default();
        pace.record(Duration::from_micros(200));
        for _ in 0..40 {
            pace.record(Duration::from_secs(1));
        }
        assert_eq!(pace.pull_size(1, 256), 1);
    }
}
