//! Time for leases and record timestamps, replaceable in tests.
//!
//! Two clocks, for two uses. Record timestamps (`created_at`, `updated_at`,
//! a lease's `lease_until`) are wall-clock time, for humans and retention.
//! Whether a lease has run out is never judged by comparing another
//! machine's wall clock with ours: a reader that finds a pending record
//! notes its revision on its own *monotonic* clock, and takes it over only
//! once that revision has stood unchanged for a full lease of its own time
//! (as client-go's leader election judges a lease by `observedTime`). So
//! workers' wall clocks may disagree by any amount, and may step.
//!
//! Tests swap in a [`ManualClock`] to expire leases without waiting.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// Now, on the wall clock.
    fn now(&self) -> UnixMillis;

    /// Time elapsed since an arbitrary origin on a clock that never jumps
    /// and is never set (for how long a reader has seen a record unchanged).
    fn monotonic(&self) -> Duration;
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

    fn monotonic(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
}

/// A clock that moves only when told to; clones share the same time. Its
/// wall and monotonic readings move together.
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

    fn monotonic(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
}

/// The system clock with its wall time off by a fixed amount, as on a
/// machine whose clock is wrong; its monotonic time is the system's.
/// Lease decisions must not care (the fault suite runs workers with
/// clocks minutes apart).
///
/// ```
/// use idem::clock::{Clock, SkewedClock, SystemClock};
///
/// let ahead = SkewedClock::by_millis(300_000);
/// assert!(ahead.now().0 >= SystemClock.now().0 + 299_000);
/// let behind = SkewedClock::by_millis(-300_000);
/// assert!(behind.now().0 + 299_000 <= SystemClock.now().0);
/// ```
#[derive(Copy, Clone, Debug, Default)]
pub struct SkewedClock {
    offset_ms: i64,
}

impl SkewedClock {
    /// A clock `offset_ms` ahead of the system's (behind if negative).
    pub fn by_millis(offset_ms: i64) -> Self {
        Self { offset_ms }
    }
}

impl Clock for SkewedClock {
    fn now(&self) -> UnixMillis {
        let now = SystemClock.now().0;
        UnixMillis(now.saturating_add_signed(self.offset_ms))
    }

    fn monotonic(&self) -> Duration {
        SystemClock.monotonic()
    }
}
