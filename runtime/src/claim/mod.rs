//! The claim state machine of docs/design.md: the record kept per
//! (handler, key), the pure decision about an existing record, and the typed
//! outcomes a [`DedupStore`](crate::store::DedupStore) returns.
//!
//! ```text
//!            claim (create)            complete (CAS)
//!   absent ─────────────────▶ pending ───────────────▶ done ──▶ (retention) absent
//!                 ▲   │  ▲        │ release (CAS)         
//!      claim (CAS)│   │  │reclaim └──────────▶ released ──┐
//!                 └───┼──┴─(lease expired, CAS)           │
//!                     │ mark_dead (CAS)                   │ claim (CAS)
//!                     ▼                                   ▼
//!                    dead                              pending
//! ```
//!
//! Every transition after the first is a compare-and-set on the record's
//! revision, so a worker that lost its lease can never overwrite the record
//! of the worker that took over.

mod decide;
pub mod operator;
mod record;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use decide::{Decision, decide};
pub use record::{ClaimRecord, ClaimState, FORMAT_VERSION, RecordError};

use crate::clock::UnixMillis;
use crate::fingerprint::Fingerprint;
use crate::key::RecordKey;

/// A worker process's identity in claim records; one per process (or per
/// store handle), never reused.
///
/// ```
/// use idem::claim::Owner;
///
/// assert_ne!(Owner::random(), Owner::random());
/// ```
#[derive(Copy, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner(uuid::Uuid);

impl Owner {
    /// A fresh identity.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// The owner with this UUID (as read back from a store).
    pub const fn from_uuid(id: uuid::Uuid) -> Self {
        Self(id)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner({})", self.0)
    }
}

/// A record and the revision it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The record.
    pub record: ClaimRecord,
    /// Its revision: the CAS token for the next write.
    pub revision: u64,
}

/// Proof that this worker holds a key: what every later transition presents.
///
/// Carries the revision it was granted at (the fencing token) and the parts
/// of the record the next state keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub(crate) key: RecordKey,
    pub(crate) owner: Owner,
    pub(crate) revision: u64,
    pub(crate) lease: Duration,
    /// When the lease ends, on the owner's clock; none for a row in the
    /// claimer's transaction, which the transaction holds, not a lease.
    pub(crate) lease_until: Option<UnixMillis>,
    pub(crate) attempt: u32,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) created_at: UnixMillis,
}

impl Claim {
    /// The claim a store grants when it wrote `record` under `key` at
    /// `revision`, with `lease` (also for executors that simulate a store:
    /// a model checker, a test).
    pub fn granted(key: &RecordKey, record: &ClaimRecord, revision: u64, lease: Duration) -> Claim {
        let lease_until = match record.state {
            ClaimState::Pending { lease_until } => lease_until,
            ClaimState::Released | ClaimState::Done | ClaimState::Dead => record.updated_at + lease,
        };
        Claim {
            key: key.clone(),
            owner: record.owner,
            revision,
            lease,
            lease_until: Some(lease_until),
            attempt: record.attempt,
            fingerprint: record.fingerprint,
            created_at: record.created_at,
        }
    }

    /// The record key.
    pub fn key(&self) -> &RecordKey {
        &self.key
    }

    /// The owner holding it.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The record revision the claim was last confirmed at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The lease length renewals extend by.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The end of the current lease, on the owner's clock — `None` for a
    /// transactional claim, whose row its transaction holds instead.
    pub fn lease_until(&self) -> Option<UnixMillis> {
        self.lease_until
    }

    /// How many times the key has been claimed, this claim included.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The claim as it was before this attempt was counted: what a
    /// handler that never started gives back.
    pub(crate) fn given_back(&self) -> Claim {
        Claim {
            attempt: self.attempt.saturating_sub(1),
            ..self.clone()
        }
    }

    /// The record this claim writes when it moves to `state`.
    pub(crate) fn record(
        &self,
        state: ClaimState,
        result: Option<Bytes>,
        now: UnixMillis,
    ) -> ClaimRecord {
        ClaimRecord {
            state,
            owner: self.owner,
            attempt: self.attempt,
            fingerprint: self.fingerprint,
            result,
            created_at: self.created_at,
            updated_at: now,
        }
    }
}

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key was free (absent or released): run the handler.
    Claimed(Claim),
    /// Another owner's lease had expired and this worker took the key over:
    /// run the handler; the old owner may have produced its effect already
    /// (count `reclaimed`).
    Reclaimed {
        /// The claim now held.
        claim: Claim,
        /// The owner whose lease expired.
        from: Owner,
    },
    /// Completed before with the same payload: acknowledge, do not run.
    Duplicate {
        /// The stored result, if the handler stores one.
        result: Option<Bytes>,
    },
    /// Completed before with a different payload: never run; dead-letter with
    /// reason `key_conflict`.
    KeyConflict {
        /// The fingerprint the key was completed with.
        stored: Option<Fingerprint>,
    },
    /// Another worker holds a valid lease (or won a race just now): do not
    /// run; NAK with `retry_after` as the delay.
    InFlight {
        /// The lease holder, when known.
        owner: Option<Owner>,
        /// About the rest of its lease.
        retry_after: Duration,
    },
    /// Dead-lettered before with the same payload: acknowledge. (Another
    /// payload under a dead key is a [`KeyConflict`](Self::KeyConflict).)
    Dead,
}

/// A claim's answer that runs the handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The key was free.
    Claimed(Claim),
    /// Taken over from `from`, whose lease had run out (count `reclaimed`).
    Reclaimed {
        /// The claim now held.
        claim: Claim,
        /// The owner whose lease expired.
        from: Owner,
    },
}

/// A claim's answer that does not run the handler: [`ClaimOutcome`] less
/// its grants, so that no refusal can carry a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Completed before with the same payload.
    Duplicate {
        /// The stored result, if the handler stores one.
        result: Option<Bytes>,
    },
    /// Dead-lettered before with the same payload.
    Dead,
    /// First claimed with another payload.
    KeyConflict {
        /// The fingerprint the key was claimed with.
        stored: Option<Fingerprint>,
    },
    /// Another worker holds a valid lease.
    InFlight {
        /// The lease holder, when known.
        owner: Option<Owner>,
        /// About the rest of its lease.
        retry_after: Duration,
    },
}

impl ClaimOutcome {
    /// The answer as a grant to run, or the refusal.
    pub fn split(self) -> Result<Grant, Refusal> {
        match self {
            ClaimOutcome::Claimed(claim) => Ok(Grant::Claimed(claim)),
            ClaimOutcome::Reclaimed { claim, from } => Ok(Grant::Reclaimed { claim, from }),
            ClaimOutcome::Duplicate { result } => Err(Refusal::Duplicate { result }),
            ClaimOutcome::Dead => Err(Refusal::Dead),
            ClaimOutcome::KeyConflict { stored } => Err(Refusal::KeyConflict { stored }),
            ClaimOutcome::InFlight { owner, retry_after } => {
                Err(Refusal::InFlight { owner, retry_after })
            }
        }
    }
}

/// How a held claim ends when its message does not complete.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ending {
    /// Released after a failed attempt: free for its payload's next
    /// delivery, the attempt counted.
    Released,
    /// Kept for its payload while its dead letter cannot be stored (it may
    /// have been, its PubAck lost): only that payload may take it again.
    Kept,
    /// Dead-lettered.
    Dead,
}

impl Ending {
    /// What writing it does, as logs say it.
    pub fn what(self) -> &'static str {
        match self {
            Ending::Released => "release the claim",
            Ending::Kept => "keep the claim for its payload",
            Ending::Dead => "mark the key dead",
        }
    }
}

/// The answer to a transition (`complete`, `release`, `mark_dead`,
/// `renew`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Written: the record is in the new state.
    Applied,
    /// The record moved on without this worker (its lease expired and
    /// another owner took over, or the record expired): nothing was written.
    /// Count `lease_lost` and log it; the effect may run twice.
    LeaseLost {
        /// Who holds the record now, if anyone.
        current_owner: Option<Owner>,
    },
}
