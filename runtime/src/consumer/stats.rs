//! Counters per handler and outcome, readable as a [`Stats`] snapshot while
//! the runtime runs, and exported through the `metrics` facade with the
//! `metrics` feature (`idem_messages_total{handler, outcome}`), with the
//! latencies of each step as histograms ([`Latency`]).

use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

pub use crate::delivery_core::Outcome;

impl Outcome {
    /// Every outcome, in counter order.
    pub const ALL: [Outcome; 15] = [
        Outcome::Processed,
        Outcome::Duplicate,
        Outcome::InFlightElsewhere,
        Outcome::Retried,
        Outcome::DeadLettered,
        Outcome::KeyConflict,
        Outcome::LeaseLost,
        Outcome::Reclaimed,
        Outcome::StoreUnavailable,
        Outcome::DecodeFailed,
        Outcome::Rejected,
        Outcome::Interrupted,
        Outcome::DeadLetterFailed,
        Outcome::Panicked,
        Outcome::LockConflict,
    ];

    /// The counter's name.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::InFlightElsewhere => "in_flight_elsewhere",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::KeyConflict => "key_conflict",
            Outcome::LeaseLost => "lease_lost",
            Outcome::Reclaimed => "reclaimed",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::DecodeFailed => "decode_failed",
            Outcome::Rejected => "rejected",
            Outcome::Interrupted => "interrupted",
            Outcome::DeadLetterFailed => "dead_letter_failed",
            Outcome::Panicked => "panicked",
            Outcome::LockConflict => "lock_conflict",
        }
    }
}

/// A step whose duration the runtime measures; with the `metrics` feature,
/// a histogram in seconds labelled by `handler`.
///
/// ```
/// use idem::consumer::Latency;
///
/// assert_eq!(Latency::Handler.metric(), "idem_handler_duration_seconds");
/// assert_eq!(Latency::ALL.len(), 4);
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Latency {
    /// The handler's run, from its call to its return (or failure).
    Handler,
    /// Claiming the key: the dedup store's answer to the claim.
    Claim,
    /// Recording completion (with the stored result), retries included.
    Completion,
    /// From the broker storing the message to its acknowledgement
    /// (processed messages only).
    EndToEnd,
}

impl Latency {
    /// Every step.
    pub const ALL: [Latency; 4] = [
        Latency::Handler,
        Latency::Claim,
        Latency::Completion,
        Latency::EndToEnd,
    ];

    /// The histogram's name.
    pub fn metric(self) -> &'static str {
        match self {
            Latency::Handler => "idem_handler_duration_seconds",
            Latency::Claim => "idem_claim_duration_seconds",
            Latency::Completion => "idem_completion_duration_seconds",
            Latency::EndToEnd => "idem_end_to_end_seconds",
        }
    }

    #[cfg(feature = "metrics")]
    fn description(self) -> &'static str {
        match self {
            Latency::Handler => "how long idem handlers ran",
            Latency::Claim => "how long claiming an idempotency key took",
            Latency::Completion => "how long recording completion took",
            Latency::EndToEnd => "from the broker storing a message to its acknowledgement",
        }
    }
}

/// One handler's counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    handler: String,
    counts: [AtomicU64; Outcome::ALL.len()],
}

impl Counters {
    pub(crate) fn count(&self, outcome: Outcome) {
        self.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("idem_messages_total", "handler" => self.handler.clone(), "outcome" => outcome.name())
            .increment(1);
    }

    /// Records how long `latency`'s step took.
    pub(crate) fn observe(&self, latency: Latency, took: Duration) {
        #[cfg(feature = "metrics")]
        metrics::histogram!(latency.metric(), "handler" => self.handler.clone())
            .record(took.as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = (latency, took);
    }

    fn snapshot(&self) -> Counts {
        Counts(
            Outcome::ALL
                .iter()
                .map(|o| (*o, self.counts[*o as usize].load(Ordering::Relaxed)))
                .collect(),
        )
    }
}

/// A handler's counts at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts(BTreeMap<Outcome, u64>);

impl Counts {
    /// The count of one outcome.
    pub fn get(&self, outcome: Outcome) -> u64 {
        self.0.get(&outcome).copied().unwrap_or(0)
    }

    /// Every outcome with its count.
    pub fn iter(&self) -> impl Iterator<Item = (Outcome, u64)> + '_ {
        self.0.iter().map(|(o, n)| (*o, *n))
    }
}

/// Live counters of a runtime, per handler; clone it before `run()` and read
/// it any time.
///
/// ```
/// use idem::consumer::{Outcome, Stats};
///
/// let stats = Stats::default();
/// assert_eq!(stats.handler("issue_card").get(Outcome::Processed), 0);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Stats(Arc<Mutex<BTreeMap<String, Arc<Counters>>>>);

impl Stats {
    pub(crate) fn counters(&self, handler: &str) -> Arc<Counters> {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.entry(handler.to_owned())
            .or_insert_with(|| {
                #[cfg(feature = "metrics")]
                for latency in Latency::ALL {
                    metrics::describe_histogram!(
                        latency.metric(),
                        metrics::Unit::Seconds,
                        latency.description()
                    );
                }
                Arc::new(Counters {
                    handler: handler.to_owned(),
                    ..Counters::default()
                })
            })
            .clone()
    }

    /// One handler's counts now (all zero for an unknown handler).
    pub fn handler(&self, handler: &str) -> Counts {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(handler).map(|c| c.snapshot()).unwrap_or_default()
    }

    /// The counts of every handler now.
    pub fn all(&self) -> BTreeMap<String, Counts> {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.iter()
            .map(|(name, c)| (name.clone(), c.snapshot()))
            .collect()
    }
}
