//! The messages of the suite and the handlers that consume them.

use serde::{Deserialize, Serialize};

/// The stream every handler of the suite consumes.
pub const STREAM: &str = "FAULTS";

/// The lease of the `kv` handler (the worker's attribute says the same).
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// One message: a business key, a value that makes a reused key's payload
/// differ, and how long the effect takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The idempotency key.
    pub key: String,
    /// Part of the payload (and so of its fingerprint).
    pub value: u64,
    /// How long the handler works before its effect, in milliseconds.
    pub work_ms: u64,
}

/// The three dedup levels under test.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// `dedup = kv`.
    Kv,
    /// `dedup = transactional`.
    Transactional,
    /// `dedup = off`.
    Off,
}

impl Level {
    /// All levels, in report order.
    pub const ALL: [Level; 3] = [Level::Kv, Level::Transactional, Level::Off];

    /// The subject its handler consumes.
    pub fn subject(self) -> &'static str {
        match self {
            Level::Kv => "faults.kv",
            Level::Transactional => "faults.tx",
            Level::Off => "faults.off",
        }
    }

    /// The handler's name (the worker's function name).
    pub fn handler(self) -> &'static str {
        match self {
            Level::Kv => "kv_effect",
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
            Level::Transactional => "transactional",
            Level::Off => "off",
        }
    }
}
