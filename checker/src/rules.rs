//! The decisions the model executes, injectable: [`Rules::real`] is the
//! runtime's own `idem::claim::decide` and the operator's
//! `idem::claim::operator::{forget, replay}`; the [`Mutant`]s wrap them to
//! reintroduce bugs that were fixed, so the tests can show the checker finds
//! them.

use std::fmt;
use std::time::Duration;

use idem::claim::operator::{self, Forget, LetterClaim, Replay};
use idem::claim::{ClaimRecord, ClaimState, Decision, Snapshot};
use idem::fingerprint::Fingerprint;

/// The claim decision: `idem::claim::decide`'s signature.
pub type DecideFn = fn(&ClaimRecord, Duration, Option<&Fingerprint>) -> Decision;
/// The operator's forget decision: `idem::claim::operator::forget`'s signature.
pub type ForgetFn = fn(Option<&Snapshot>, bool) -> Forget;
/// The operator's replay decision: `idem::claim::operator::replay`'s signature.
pub type ReplayFn = fn(LetterClaim, Option<&Snapshot>) -> Replay;

/// The decision functions a model run uses, and whether workers answer
/// duplicates of keys they completed from their own memory.
#[derive(Clone, Copy)]
pub struct Rules {
    /// What a claimer does about the record it found.
    pub decide: DecideFn,
    /// What `idem keys forget` does about a record.
    pub forget: ForgetFn,
    /// What `idem dead replay` does about a letter and its record.
    pub replay: ReplayFn,
    /// Whether a worker acknowledges a redelivery of a payload it completed
    /// itself without asking the store (the runtime's old `recent` memory).
    pub memory: bool,
    /// Whether a worker whose dead mark found the claim taken over still
    /// terminates the original (the runtime's old dead-letter path).
    pub term_after_lost_dead_mark: bool,
}

impl Rules {
    /// The runtime's rules: its own decision functions, no memory.
    pub fn real() -> Self {
        Self {
            decide: idem::claim::decide,
            forget: operator::forget,
            replay: operator::replay,
            memory: false,
            term_after_lost_dead_mark: false,
        }
    }

    /// The rules with `mutant`'s bug put back.
    pub fn mutated(mutant: Mutant) -> Self {
        let real = Self::real();
        match mutant {
            Mutant::ReleasedAnyPayload => Self {
                decide: released_any_payload,
                ..real
            },
            Mutant::ReplayIgnoresFingerprint => Self {
                replay: replay_ignores_fingerprint,
                ..real
            },
            Mutant::Memory => Self {
                memory: true,
                ..real
            },
            Mutant::ForgetPending => Self {
                forget: forget_pending,
                ..real
            },
            Mutant::ReplayInFlight => Self {
                replay: replay_in_flight,
                ..real
            },
            Mutant::TermAfterLostDeadMark => Self {
                term_after_lost_dead_mark: true,
                ..real
            },
        }
    }
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("memory", &self.memory)
            .field("term_after_lost_dead_mark", &self.term_after_lost_dead_mark)
            .finish_non_exhaustive()
    }
}

/// A bug that was in idem once, to be put back into the [`Rules`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mutant {
    /// A released key is claimed by any payload (not only the one that
    /// released it): a reused key's other payload takes it during the first
    /// payload's retry backoff.
    ReleasedAnyPayload,
    /// A replay counts any `done` record as the letter's own and deletes the
    /// letter, whatever payload completed the key.
    ReplayIgnoresFingerprint,
    /// Workers answer duplicates of keys they completed from memory, so a
    /// key the operator forgot is not run again.
    Memory,
    /// `forget` deletes a pending key (its owner may be running the handler)
    /// as if forced.
    ForgetPending,
    /// A replay republishes a letter whose payload a worker still holds
    /// (found by this checker in the first version of `operator::replay`):
    /// the owner marks the key dead after the copy was published, the copy
    /// is acknowledged unrun, and the letter is gone.
    ReplayInFlight,
    /// A worker whose dead mark found the claim taken over still terminates
    /// the original, which another worker now handles.
    TermAfterLostDeadMark,
}

impl Mutant {
    /// Every mutant.
    pub const ALL: [Mutant; 6] = [
        Mutant::ReleasedAnyPayload,
        Mutant::ReplayIgnoresFingerprint,
        Mutant::Memory,
        Mutant::ForgetPending,
        Mutant::ReplayInFlight,
        Mutant::TermAfterLostDeadMark,
    ];
}

impl fmt::Display for Mutant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mutant::ReleasedAnyPayload => "released-any-payload",
            Mutant::ReplayIgnoresFingerprint => "replay-ignores-fingerprint",
            Mutant::Memory => "memory",
            Mutant::ForgetPending => "forget-pending",
            Mutant::ReplayInFlight => "replay-in-flight",
            Mutant::TermAfterLostDeadMark => "term-after-lost-dead-mark",
        })
    }
}

/// The old bug of `decide`: a released record is claimed whatever the
/// fingerprint.
fn released_any_payload(
    record: &ClaimRecord,
    observed: Duration,
    fingerprint: Option<&Fingerprint>,
) -> Decision {
    match record.state {
        ClaimState::Released => Decision::Claim,
        _ => idem::claim::decide(record, observed, fingerprint),
    }
}

/// A `replay` that takes any `done` record for the letter's own.
fn replay_ignores_fingerprint(letter: LetterClaim, record: Option<&Snapshot>) -> Replay {
    match (letter, record) {
        (LetterClaim::Held(_), Some(snapshot)) if snapshot.record.state == ClaimState::Done => {
            Replay::AlreadyDone
        }
        _ => operator::replay(letter, record),
    }
}

/// A `replay` that republishes a letter whose payload is still held.
fn replay_in_flight(letter: LetterClaim, record: Option<&Snapshot>) -> Replay {
    match operator::replay(letter, record) {
        Replay::InFlight => Replay::Republish,
        other => other,
    }
}

/// A `forget` that deletes what it should refuse.
fn forget_pending(record: Option<&Snapshot>, force: bool) -> Forget {
    match operator::forget(record, force) {
        Forget::Refused { .. } => operator::forget(record, true),
        other => other,
    }
}
