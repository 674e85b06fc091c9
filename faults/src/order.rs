//! The messages of the suite and the handlers that consume them.

use serde::{Deserialize, Serialize};

/// The stream every handler of the suite consumes.
pub const STREAM: &str = "FAULTS";

/// The lease of the `kv` handler (the worker's attribute says the same).
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// One message: a business key, a value that makes a reused key's payload
/// differ, how long the effect takes, and how the handler behaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The idempotency key.
    pub key: String,
    /// Part of the payload (and so of its fingerprint).
    pub value: u64,
    /// How long the handler works before its effect, in milliseconds.
    pub work_ms: u64,
    /// What the handler does with it, scripted by the workload.
    #[serde(default)]
    pub behaviour: Behaviour,
}

/// How a handler treats a message: the paths where handlers misbehave.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Behaviour {
    /// Its effect, at once.
    #[default]
    Succeed,
    /// A retryable error on its first n runs, then its effect.
    FailTimes(u32),
    /// A permanent error: dead-lettered `handler_error` — until the
    /// operator fixes it and replays the letter, which is then applied once.
    FailPermanently,
    /// A panic on every run: dead-lettered `panic` after the attempts.
    Panic,
    /// (transactional) On its first run, ignores a failed SQL statement and
    /// returns `Ok`: nothing may commit; the retry applies it.
    SwallowFailedStatement,
}

/// The retention of the `kv_short` handler's claims (`retention = "3s"`):
/// records expire during the run — completed keys, dead keys, and
/// the claim of a worker frozen past it.
pub const SHORT_RETENTION: std::time::Duration = std::time::Duration::from_secs(3);

/// That bucket's name: the runtime keeps a retention other than the
/// default in a bucket of its own, named for it.
pub const SHORT_BUCKET: &str = "idem_claims_3s";

/// How many runs a handler of the suite gets (the worker's retry policy).
pub const ATTEMPTS: u32 = 6;

impl Behaviour {
    /// The dead-letter reason this behaviour calls for, if any.
    pub fn dead_letter_reason(self) -> Option<&'static str> {
        match self {
            Behaviour::FailPermanently => Some("handler_error"),
            Behaviour::Panic => Some("panic"),
            _ => None,
        }
    }

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Succeed => "succeeds",
            Behaviour::FailTimes(_) => "fails, then succeeds",
            Behaviour::FailPermanently => "fails permanently",
            Behaviour::Panic => "panics",
            Behaviour::SwallowFailedStatement => "swallows a failed statement",
        }
    }
}

/// The handlers under test: one per dedup level, and a second `kv` handler
/// whose function has the same name as the first (in another module),
/// told apart by `name = "kv_twin"`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// `dedup = kv`.
    Kv,
    /// `dedup = kv`, the function `twin::kv_effect`: the same keys as `kv`
    /// must be applied by each handler once.
    Twin,
    /// `dedup = kv` in a claim bucket that keeps records for only
    /// [`SHORT_RETENTION`]: deduplicated within it, run again after.
    Short,
    /// `dedup = transactional`.
    Transactional,
    /// `dedup = off`.
    Off,
}

impl Level {
    /// All levels, in report order.
    pub const ALL: [Level; 5] = [
        Level::Kv,
        Level::Twin,
        Level::Short,
        Level::Transactional,
        Level::Off,
    ];

    /// Whether its effects are deduplicated by claims in a KV bucket.
    pub fn claims_in_kv(self) -> bool {
        matches!(self, Level::Kv | Level::Twin | Level::Short)
    }

    /// Whether its records may expire during a run.
    pub fn expires(self) -> bool {
        self == Level::Short
    }

    /// The subject its handler consumes.
    pub fn subject(self) -> &'static str {
        match self {
            Level::Kv => "faults.kv",
            Level::Twin => "faults.twin",
            Level::Short => "faults.short",
            Level::Transactional => "faults.tx",
            Level::Off => "faults.off",
        }
    }

    /// The handler's name (the worker's function name).
    pub fn handler(self) -> &'static str {
        match self {
            Level::Kv => "kv_effect",
            Level::Twin => "kv_twin",
            Level::Short => "kv_short",
            Level::Transactional => "tx_effect",
            Level::Off => "off_effect",
        }
    }

    /// The level of a handler name.
    pub fn of_handler(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.handler() == name)
    }

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Level::Kv => "kv",
            Level::Twin => "kv (twin name)",
            Level::Short => "kv (3 s retention)",
            Level::Transactional => "transactional",
            Level::Off => "off",
        }
    }
}
