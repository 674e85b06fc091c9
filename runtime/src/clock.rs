//! Wall-clock time for leases and record timestamps, replaceable in tests.
//!
//! A lease is an absolute deadline written into the claim record by its owner
//! and compared against the reader's clock, so workers' clocks must agree to
//! within a small fraction of the lease (NTP does this). Tests swap in a
//! [`ManualClock`] to expire leases without waiting.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the unit of every timestamp in a claim
/// record.
///
/// ```
/// use idem::clock::UnixMillis;
/// use std::time::Duration;
///
/// let t = UnixMillis(1_000);
/// assert_eq!(t + Duration::from_millis(500), UnixMillis(1_500));
/// assert_eq!(UnixMillis(1_500).saturating_since(t), Duration::from_millis(500));
/// assert_eq!(t.saturating_since(UnixMillis(1_500)), Duration::ZERO);
/// ```
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// How long after `earlier` this is; zero if it is not after it.
    pub fn saturating_since(self, earlier: UnixMillis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for UnixMillis {
    type Output = UnixMillis;

    fn add(self, d: Duration) -> UnixMillis {
        let millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        UnixMillis(self.0.saturating_add(millis))
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// A source of the current time.
///
/// ```
/// use idem::clock::{Clock, SystemClock};
///
/// assert!(SystemClock.now().0 > 1_600_000_000_000);
/// ```
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// Now.
    fn now(&self) -> UnixMillis;
}

/// The operating system's wall clock: the default everywhere.
#[derive(Copy, Clone, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to; clones share the same time.
///
/// ```
/// use idem::clock::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::starting_now();
/// let before = clock.now();
/// clock.advance(Duration::from_secs(30));
/// assert_eq!(clock.now().saturating_since(before), Duration::from_secs(30));
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock stopped at the current wall-clock time.
    pub fn starting_now() -> Self {
        Self(Arc::new(AtomicU64::new(SystemClock.now().0)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        UnixMillis(self.0.load(Ordering::SeqCst))
    }
}
