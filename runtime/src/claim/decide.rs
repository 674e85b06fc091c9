//! The claim decision as a pure function: given the record a claimer found,
//! what to do. Stores execute decisions; they do not make them.

use std::time::Duration;

use super::{ClaimRecord, ClaimState, Owner};
use crate::clock::UnixMillis;
use crate::fingerprint::Fingerprint;

/// What a claimer does about an existing record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The claim was released after a retryable failure: take it with a CAS
    /// update and run.
    Claim,
    /// The owner's lease ran out: take it over with a CAS update and run
    /// (counted as `reclaimed`: the old owner may have had an effect).
    Reclaim {
        /// The owner whose lease expired.
        from: Owner,
    },
    /// Done with the same payload: acknowledge without running.
    Duplicate,
    /// Done, dead, or claimed and expired — with another payload under the
    /// same key: never run; dead-letter with reason `key_conflict`.
    Conflict {
        /// The fingerprint the key was completed with.
        stored: Option<Fingerprint>,
    },
    /// Another worker holds a valid lease: do not run; retry after about
    /// the rest of the lease.
    InFlight {
        /// The lease holder.
        owner: Owner,
        /// The rest of its lease.
        retry_after: Duration,
    },
    /// Dead-lettered before, with the same payload: acknowledge.
    Dead,
}

/// Decides what a claimer with payload `fingerprint` does at time `now` about
/// `record`.
///
/// Fingerprints are compared only when both sides have one (a handler with
/// `fingerprint = none` accepts any payload under a completed key).
///
/// ```
/// use idem::claim::{decide, ClaimRecord, ClaimState, Decision, Owner};
/// use idem::clock::UnixMillis;
/// use idem::fingerprint::Fingerprint;
///
/// let payload = Fingerprint::of(b"charge 100");
/// let done = ClaimRecord {
///     state: ClaimState::Done,
///     owner: Owner::random(),
///     attempt: 1,
///     fingerprint: Some(payload),
///     result: None,
///     created_at: UnixMillis(0),
///     updated_at: UnixMillis(0),
/// };
/// assert_eq!(decide(&done, UnixMillis(5), Some(&payload)), Decision::Duplicate);
/// assert!(matches!(
///     decide(&done, UnixMillis(5), Some(&Fingerprint::of(b"charge 200"))),
///     Decision::Conflict { .. }
/// ));
/// ```
pub fn decide(
    record: &ClaimRecord,
    now: UnixMillis,
    fingerprint: Option<&Fingerprint>,
) -> Decision {
    match record.state {
        ClaimState::Released => Decision::Claim,
        // An expired claim for another payload: its owner may have had its
        // effect, so that payload owns the key; taking it over would apply
        // a second, different payload (found by the fault suite's soak).
        ClaimState::Pending { lease_until } if lease_until <= now => {
            if conflicts(record.fingerprint.as_ref(), fingerprint) {
                Decision::Conflict {
                    stored: record.fingerprint,
                }
            } else {
                Decision::Reclaim { from: record.owner }
            }
        }
        ClaimState::Pending { lease_until } => Decision::InFlight {
            owner: record.owner,
            retry_after: lease_until.saturating_since(now),
        },
        // The first payload to claim a key owns it, whether it completed or
        // was dead-lettered: a corrected payload under a dead key is not its
        // duplicate.
        ClaimState::Done | ClaimState::Dead
            if conflicts(record.fingerprint.as_ref(), fingerprint) =>
        {
            Decision::Conflict {
                stored: record.fingerprint,
            }
        }
        ClaimState::Done => Decision::Duplicate,
        ClaimState::Dead => Decision::Dead,
    }
}

/// Both payloads are known and differ.
fn conflicts(stored: Option<&Fingerprint>, mine: Option<&Fingerprint>) -> bool {
    matches!((stored, mine), (Some(stored), Some(mine)) if stored != mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = UnixMillis(10_000);

    fn record(state: ClaimState, fingerprint: Option<Fingerprint>) -> ClaimRecord {
        ClaimRecord {
            state,
            owner: Owner::random(),
            attempt: 1,
            fingerprint,
            result: None,
            created_at: UnixMillis(0),
            updated_at: UnixMillis(0),
        }
    }

    /// Every state × lease × fingerprint combination, with its one right
    /// answer.
    #[test]
    fn exhaustive_table() {
        let a = Some(Fingerprint::of(b"a"));
        let b = Some(Fingerprint::of(b"b"));
        let valid = ClaimState::Pending {
            lease_until: UnixMillis(NOW.0 + 1_500),
        };
        let expired = ClaimState::Pending { lease_until: NOW };
        let fingerprints = [(a, a), (a, b), (a, None), (None, a), (None, None)];
        for (stored, mine) in fingerprints {
            let conflict = stored.is_some() && mine.is_some() && stored != mine;
            // Released: claim, whatever the payload (the last claimer's payload had no effect).
            assert_eq!(
                decide(&record(ClaimState::Released, stored), NOW, mine.as_ref()),
                Decision::Claim
            );
            // Pending, lease valid: in flight for the rest of the lease.
            let held = record(valid, stored);
            assert_eq!(
                decide(&held, NOW, mine.as_ref()),
                Decision::InFlight {
                    owner: held.owner,
                    retry_after: Duration::from_millis(1_500)
                }
            );
            // Pending, lease ended (a deadline equal to now has ended):
            // reclaim, unless the payload differs (the old owner may have
            // applied its own).
            let lapsed = record(expired, stored);
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::Reclaim { from: lapsed.owner }
            };
            assert_eq!(decide(&lapsed, NOW, mine.as_ref()), expected);
            // Done: duplicate, or conflict when both fingerprints exist and differ.
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::Duplicate
            };
            assert_eq!(
                decide(&record(ClaimState::Done, stored), NOW, mine.as_ref()),
                expected
            );
            // Dead: acknowledge the same payload; another is a conflict.
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::Dead
            };
            assert_eq!(
                decide(&record(ClaimState::Dead, stored), NOW, mine.as_ref()),
                expected
            );
        }
    }

    #[test]
    fn a_lease_one_millisecond_from_its_end_is_still_held() {
        let held = record(
            ClaimState::Pending {
                lease_until: UnixMillis(NOW.0 + 1),
            },
            None,
        );
        assert!(
            matches!(decide(&held, NOW, None), Decision::InFlight { retry_after, .. } if retry_after == Duration::from_millis(1))
        );
    }
}
