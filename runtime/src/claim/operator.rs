//! What an operator's tool may do to a claim record, as pure decisions:
//! `idem keys forget` ([`forget`]) and `idem dead replay` ([`replay`]).
//!
//! The tools read a record, ask these functions, and carry the answer out
//! as a compare-and-set on the revision they read — so a record that moved
//! meanwhile (a handler claimed or completed the key, a copy failed again)
//! is read and decided again, never overwritten. The model checker
//! (`checker/`) calls the same functions.
//!
//! The rules (docs/guarantees.md, "What the operator's tools promise"):
//!
//! * A dead letter is deleted only once *its own payload* is recorded done
//!   (fingerprints equal), or after it was republished and the broker
//!   confirmed it. A record of another payload, or one whose payload cannot
//!   be told, keeps the letter.
//! * A replay never frees a key for another payload: a `dead` record of the
//!   letter's payload is *reopened* (`released`, attempts counted afresh),
//!   which only that payload can claim.
//! * A `pending` key is not forgotten unless forced: its owner may be
//!   running the handler, and a second worker would run it again.

use super::{ClaimRecord, ClaimState, Owner, Snapshot};
use crate::clock::UnixMillis;
use crate::fingerprint::Fingerprint;

/// The answer of an operator's compare-and-set write ([`forget`]'s delete,
/// [`replay`]'s reopen).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Written at the revision the decision was made on.
    Applied,
    /// The record moved on (or vanished) since it was read: nothing was
    /// written; read it again and decide again.
    Moved,
}

/// What `idem keys forget` does about a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forget {
    /// Delete the record if it is still at `revision`.
    Delete {
        /// The revision the decision was made on.
        revision: u64,
    },
    /// Nothing to forget.
    Absent,
    /// The key is held: its owner may be running the handler right now, and
    /// a second worker would run it again (an effect twice, uncounted).
    /// Forgotten only when forced.
    Refused {
        /// The worker holding it.
        owner: Owner,
        /// The end of its lease, on its own clock.
        lease_until: UnixMillis,
    },
}

/// Decides what forgetting a key does, given its record (`None`: absent).
///
/// ```
/// use idem::claim::operator::{forget, Forget};
/// use idem::claim::{ClaimRecord, ClaimState, Owner, Snapshot};
/// use idem::clock::UnixMillis;
///
/// let owner = Owner::random();
/// let mut record = ClaimRecord {
///     state: ClaimState::Pending { lease_until: UnixMillis(5_000) },
///     owner,
///     attempt: 1,
///     fingerprint: None,
///     result: None,
///     created_at: UnixMillis(0),
///     updated_at: UnixMillis(0),
/// };
/// let held = Snapshot { record: record.clone(), revision: 3 };
/// assert!(matches!(forget(Some(&held), false), Forget::Refused { .. }));
/// assert_eq!(forget(Some(&held), true), Forget::Delete { revision: 3 });
/// record.state = ClaimState::Done;
/// let done = Snapshot { record, revision: 4 };
/// assert_eq!(forget(Some(&done), false), Forget::Delete { revision: 4 });
/// assert_eq!(forget(None, false), Forget::Absent);
/// ```
pub fn forget(record: Option<&Snapshot>, force: bool) -> Forget {
    let Some(snapshot) = record else {
        return Forget::Absent;
    };
    match snapshot.record.state {
        ClaimState::Pending { lease_until } if !force => Forget::Refused {
            owner: snapshot.record.owner,
            lease_until,
        },
        ClaimState::Pending { .. } | ClaimState::Released | ClaimState::Done | ClaimState::Dead => {
            Forget::Delete {
                revision: snapshot.revision,
            }
        }
    }
}

/// What the letter being replayed says about itself: the record key and
/// fingerprint idem wrote into it (never a producer's: incoming `Idem-*`
/// headers are removed before a dead letter is stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LetterClaim {
    /// The message never held a claim (`decode`, `missing_key`,
    /// `key_conflict`, `dedup = off`): no record is the letter's.
    None,
    /// It held the claim of a record key, with this payload fingerprint
    /// (`None`: the handler keeps no fingerprints, or the letter predates
    /// the `Idem-Fingerprint` header).
    Held(Option<Fingerprint>),
}

/// What `idem dead replay` does about one letter, given its record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Republish the letter's payload; delete the letter once the broker
    /// confirmed the copy. (The letter holds no claim: no record is its.)
    Republish,
    /// A worker holds the letter's own payload (`pending`): it may be
    /// between storing this very letter and marking the key dead — a copy
    /// published now would find the key dead and be acknowledged unrun,
    /// with the letter gone (found by the model checker). Keep the letter;
    /// replay it once the key is dead, done or released.
    InFlight,
    /// Make the key the letter's payload's, `released` — only that payload
    /// can claim it, with its attempts counted afresh — by a
    /// compare-and-set on what was read (`revision`: the `dead` or
    /// `released` record; `None`: no record, so a create); then republish.
    ///
    /// The write, not the read, is what counts: a read may miss a worker's
    /// uncommitted claim (a transactional handler's row is invisible until
    /// its transaction commits), but the write waits for it and answers
    /// [`Written::Moved`] once that worker's commit moved the record — the
    /// replay then reads and decides again.
    Reopen {
        /// The revision the decision was made on (`None`: absent).
        revision: Option<u64>,
    },
    /// The letter's own payload is recorded done: delete the letter,
    /// publish nothing.
    AlreadyDone,
    /// The key belongs to another payload: keep the letter.
    Conflict {
        /// The fingerprint the record holds.
        stored: Option<Fingerprint>,
    },
    /// The record is done, and whether with the letter's payload cannot be
    /// told (the letter carries no fingerprint): keep the letter.
    Unknown,
}

impl Replay {
    /// The outcome's name in the CLI's report.
    pub fn as_str(&self) -> &'static str {
        match self {
            Replay::Republish | Replay::Reopen { .. } => "republished",
            Replay::AlreadyDone => "already_done",
            Replay::InFlight => "in_flight",
            Replay::Conflict { .. } => "conflict",
            Replay::Unknown => "unknown",
        }
    }

    /// Whether the letter may be deleted once this decision is carried out.
    pub fn deletes_letter(&self) -> bool {
        matches!(
            self,
            Replay::Republish | Replay::Reopen { .. } | Replay::AlreadyDone
        )
    }
}

/// Decides what replaying a dead letter does, given what the letter claims
/// and the record now under its key (`None`: absent — expired, purged or
/// forgotten).
///
/// ```
/// use idem::claim::operator::{replay, LetterClaim, Replay};
/// use idem::claim::{ClaimRecord, ClaimState, Owner, Snapshot};
/// use idem::clock::UnixMillis;
/// use idem::fingerprint::Fingerprint;
///
/// let x = Fingerprint::of(b"x");
/// let y = Fingerprint::of(b"y");
/// let record = |state, fingerprint| Snapshot {
///     record: ClaimRecord {
///         state,
///         owner: Owner::random(),
///         attempt: 1,
///         fingerprint: Some(fingerprint),
///         result: None,
///         created_at: UnixMillis(0),
///         updated_at: UnixMillis(0),
///     },
///     revision: 7,
/// };
/// let letter = LetterClaim::Held(Some(x));
/// assert_eq!(replay(letter, Some(&record(ClaimState::Dead, x))), Replay::Reopen { revision: Some(7) });
/// assert_eq!(replay(letter, Some(&record(ClaimState::Done, x))), Replay::AlreadyDone);
/// // The key was forgotten and another payload completed under it: the
/// // letter is kept, never deleted as if applied.
/// assert!(matches!(replay(letter, Some(&record(ClaimState::Done, y))), Replay::Conflict { .. }));
/// ```
pub fn replay(letter: LetterClaim, record: Option<&Snapshot>) -> Replay {
    let LetterClaim::Held(mine) = letter else {
        return Replay::Republish;
    };
    let Some(snapshot) = record else {
        return Replay::Reopen { revision: None };
    };
    let stored = snapshot.record.fingerprint;
    match (stored, mine) {
        (Some(stored), Some(mine)) if stored != mine => {
            return Replay::Conflict {
                stored: Some(stored),
            };
        }
        _ => {}
    }
    let told = mine.is_some() || stored.is_none();
    match snapshot.record.state {
        ClaimState::Dead | ClaimState::Released => Replay::Reopen {
            revision: Some(snapshot.revision),
        },
        ClaimState::Done if told => Replay::AlreadyDone,
        ClaimState::Done => Replay::Unknown,
        ClaimState::Pending { .. } => Replay::InFlight,
    }
}

/// The attempt count a reopened record starts from: a replay gives the
/// payload a fresh retry budget.
pub const REOPENED_ATTEMPTS: u32 = 0;

/// The record a replay writes ([`Replay::Reopen`]): the key released for
/// the payload `found` holds — or, with no record, for the letter's
/// `fingerprint` — with its attempts counted afresh. Stores and the model
/// checker write exactly this.
///
/// ```
/// use idem::claim::operator::{reopened, REOPENED_ATTEMPTS};
/// use idem::claim::{ClaimState, Owner};
/// use idem::clock::UnixMillis;
/// use idem::fingerprint::Fingerprint;
///
/// let x = Some(Fingerprint::of(b"x"));
/// let fresh = reopened(None, x, Owner::random(), UnixMillis(7));
/// assert_eq!((fresh.state, fresh.fingerprint, fresh.attempt), (ClaimState::Released, x, REOPENED_ATTEMPTS));
/// ```
pub fn reopened(
    found: Option<&ClaimRecord>,
    fingerprint: Option<Fingerprint>,
    owner: Owner,
    now: UnixMillis,
) -> ClaimRecord {
    match found {
        Some(record) => ClaimRecord {
            state: ClaimState::Released,
            attempt: REOPENED_ATTEMPTS,
            result: None,
            updated_at: now,
            ..record.clone()
        },
        None => ClaimRecord {
            state: ClaimState::Released,
            owner,
            attempt: REOPENED_ATTEMPTS,
            fingerprint,
            result: None,
            created_at: now,
            updated_at: now,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::ClaimRecord;

    fn snapshot(state: ClaimState, fingerprint: Option<Fingerprint>) -> Snapshot {
        Snapshot {
            record: ClaimRecord {
                state,
                owner: Owner::random(),
                attempt: 3,
                fingerprint,
                result: None,
                created_at: UnixMillis(0),
                updated_at: UnixMillis(0),
            },
            revision: 9,
        }
    }

    /// Every letter × record combination, with its one right answer.
    #[test]
    fn replay_table() {
        let x = Some(Fingerprint::of(b"x"));
        let y = Some(Fingerprint::of(b"y"));
        let pending = ClaimState::Pending {
            lease_until: UnixMillis(1),
        };
        let states = [
            ClaimState::Dead,
            ClaimState::Done,
            ClaimState::Released,
            pending,
        ];
        assert_eq!(replay(LetterClaim::None, None), Replay::Republish);
        assert_eq!(
            replay(LetterClaim::Held(x), None),
            Replay::Reopen { revision: None }
        );
        for state in states {
            // No claim of its own: the record is never the letter's.
            let record = snapshot(state, y);
            assert_eq!(replay(LetterClaim::None, Some(&record)), Replay::Republish);
            // Another payload's record: always kept.
            assert_eq!(
                replay(LetterClaim::Held(x), Some(&record)),
                Replay::Conflict { stored: y },
                "{state:?}"
            );
            // Its own payload's record.
            let own = snapshot(state, x);
            let expected = match state {
                ClaimState::Dead | ClaimState::Released => Replay::Reopen { revision: Some(9) },
                ClaimState::Done => Replay::AlreadyDone,
                ClaimState::Pending { .. } => Replay::InFlight,
            };
            assert_eq!(replay(LetterClaim::Held(x), Some(&own)), expected);
            // A letter without a fingerprint never counts a done record as
            // its own unless the record has none either.
            let expected = match state {
                ClaimState::Dead | ClaimState::Released => Replay::Reopen { revision: Some(9) },
                ClaimState::Done => Replay::Unknown,
                ClaimState::Pending { .. } => Replay::InFlight,
            };
            assert_eq!(replay(LetterClaim::Held(None), Some(&own)), expected);
            let blind = snapshot(state, None);
            let expected = match state {
                ClaimState::Dead | ClaimState::Released => Replay::Reopen { revision: Some(9) },
                ClaimState::Done => Replay::AlreadyDone,
                ClaimState::Pending { .. } => Replay::InFlight,
            };
            assert_eq!(replay(LetterClaim::Held(None), Some(&blind)), expected);
        }
    }

    #[test]
    fn only_a_pending_key_needs_force() {
        for state in [ClaimState::Dead, ClaimState::Done, ClaimState::Released] {
            assert_eq!(
                forget(Some(&snapshot(state, None)), false),
                Forget::Delete { revision: 9 }
            );
        }
        let held = snapshot(
            ClaimState::Pending {
                lease_until: UnixMillis(1),
            },
            None,
        );
        assert!(matches!(forget(Some(&held), false), Forget::Refused { .. }));
        assert_eq!(forget(Some(&held), true), Forget::Delete { revision: 9 });
    }
}
