//! The claim decision as a pure function: given the record a claimer found,
//! what to do. Stores execute decisions; they do not make them.

use std::time::Duration;

use super::{ClaimRecord, ClaimState, Owner};
use crate::fingerprint::Fingerprint;

/// What a claimer does about an existing record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The claim was released after a retryable failure of this payload:
    /// take it with a CAS update and run.
    Claim,
    /// The owner's lease ran out — the record stood unchanged for a full
    /// lease of the reader's own time: take it over with a CAS update and
    /// run (counted as `reclaimed`: the old owner may have had an effect).
    Reclaim {
        /// The owner whose lease expired.
        from: Owner,
    },
    /// Done with the same payload: acknowledge without running.
    Duplicate,
    /// Done, dead, released, or claimed (live or expired) — with another
    /// payload under the same key: never run; dead-letter with reason
    /// `key_conflict`.
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

/// Decides what a claimer with payload `fingerprint` does about `record`,
/// which it has seen at the same revision for `observed` of its own
/// monotonic time (zero at first sight).
///
/// A pending record's lease has run out once `observed` reaches the lease
/// the owner took (`lease_until - updated_at`, both written by the owner, so
/// no two machines' wall clocks are ever compared). A renewal writes a new
/// revision, and the reader's observation starts again.
///
/// Fingerprints are compared only when both sides have one (a handler with
/// `fingerprint = none` accepts any payload under a completed key).
///
/// ```
/// use idem::claim::{decide, ClaimRecord, ClaimState, Decision, Owner};
/// use idem::clock::UnixMillis;
/// use idem::fingerprint::Fingerprint;
/// use std::time::Duration;
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
/// assert_eq!(decide(&done, Duration::ZERO, Some(&payload)), Decision::Duplicate);
/// assert!(matches!(
///     decide(&done, Duration::ZERO, Some(&Fingerprint::of(b"charge 200"))),
///     Decision::Conflict { .. }
/// ));
/// ```
pub fn decide(
    record: &ClaimRecord,
    observed: Duration,
    fingerprint: Option<&Fingerprint>,
) -> Decision {
    match record.state {
        // The payload that claimed the key claims it again after its retry
        // backoff; another payload reusing the key meanwhile does not take
        // it (docs/design.md: the first payload to claim a key owns it).
        ClaimState::Released if conflicts(record.fingerprint.as_ref(), fingerprint) => {
            Decision::Conflict {
                stored: record.fingerprint,
            }
        }
        ClaimState::Released => Decision::Claim,
        // An expired claim for another payload: its owner may have had its
        // effect, so that payload owns the key; taking it over would apply
        // a second, different payload (found by the fault suite's soak).
        ClaimState::Pending { lease_until } if lease_of(record, lease_until) <= observed => {
            if conflicts(record.fingerprint.as_ref(), fingerprint) {
                Decision::Conflict {
                    stored: record.fingerprint,
                }
            } else {
                Decision::Reclaim { from: record.owner }
            }
        }
        // A live claim of another payload: that payload owns the key.
        ClaimState::Pending { .. } if conflicts(record.fingerprint.as_ref(), fingerprint) => {
            Decision::Conflict {
                stored: record.fingerprint,
            }
        }
        ClaimState::Pending { lease_until } => Decision::InFlight {
            owner: record.owner,
            retry_after: lease_of(record, lease_until).saturating_sub(observed),
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

/// The lease the owner took: its deadline less the time it wrote it, both
/// on the owner's clock.
fn lease_of(record: &ClaimRecord, lease_until: crate::clock::UnixMillis) -> Duration {
    lease_until.saturating_since(record.updated_at)
}

/// Both payloads are known and differ.
fn conflicts(stored: Option<&Fingerprint>, mine: Option<&Fingerprint>) -> bool {
    matches!((stored, mine), (Some(stored), Some(mine)) if stored != mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::clock::UnixMillis;

    /// When the owner wrote the record, on its own clock.
    const WRITTEN: UnixMillis = UnixMillis(10_000);
    const LEASE: Duration = Duration::from_millis(1_500);

    fn record(state: ClaimState, fingerprint: Option<Fingerprint>) -> ClaimRecord {
        ClaimRecord {
            state,
            owner: Owner::random(),
            attempt: 1,
            fingerprint,
            result: None,
            created_at: UnixMillis(0),
            updated_at: WRITTEN,
        }
    }

    /// Every state × lease × fingerprint combination, with its one right
    /// answer.
    #[test]
    fn exhaustive_table() {
        let a = Some(Fingerprint::of(b"a"));
        let b = Some(Fingerprint::of(b"b"));
        let pending = ClaimState::Pending {
            lease_until: WRITTEN + LEASE,
        };
        let fingerprints = [(a, a), (a, b), (a, None), (None, a), (None, None)];
        for (stored, mine) in fingerprints {
            let conflict = stored.is_some() && mine.is_some() && stored != mine;
            // Released: the payload that claimed it claims it again; another
            // payload reusing the key is a conflict (the first to claim a
            // key owns it, also during its retry backoff).
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::Claim
            };
            assert_eq!(
                decide(
                    &record(ClaimState::Released, stored),
                    Duration::ZERO,
                    mine.as_ref()
                ),
                expected
            );
            // Pending, seen for less than its lease: in flight for the rest
            // of it; another payload is a conflict at once.
            let held = record(pending, stored);
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::InFlight {
                    owner: held.owner,
                    retry_after: Duration::from_millis(1_000),
                }
            };
            assert_eq!(
                decide(&held, Duration::from_millis(500), mine.as_ref()),
                expected
            );
            // Pending, seen unchanged for a whole lease: reclaim, unless the
            // payload differs (the old owner may have applied its own).
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::Reclaim { from: held.owner }
            };
            assert_eq!(decide(&held, LEASE, mine.as_ref()), expected);
            // Done: duplicate, or conflict when both fingerprints exist and differ.
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::Duplicate
            };
            assert_eq!(
                decide(
                    &record(ClaimState::Done, stored),
                    Duration::ZERO,
                    mine.as_ref()
                ),
                expected
            );
            // Dead: acknowledge the same payload; another is a conflict.
            let expected = if conflict {
                Decision::Conflict { stored }
            } else {
                Decision::Dead
            };
            assert_eq!(
                decide(
                    &record(ClaimState::Dead, stored),
                    Duration::ZERO,
                    mine.as_ref()
                ),
                expected
            );
        }
    }

    #[test]
    fn a_lease_one_millisecond_from_its_end_is_still_held() {
        let held = record(
            ClaimState::Pending {
                lease_until: WRITTEN + LEASE,
            },
            None,
        );
        let observed = LEASE - Duration::from_millis(1);
        assert!(
            matches!(decide(&held, observed, None), Decision::InFlight { retry_after, .. } if retry_after == Duration::from_millis(1))
        );
    }

    #[test]
    fn the_owners_wall_clock_does_not_matter_only_the_readers_observation() {
        // Written by an owner whose clock is a year ahead: its deadline is
        // far in any reader's future, yet the lease is what it took.
        let far = UnixMillis(WRITTEN.0 + 365 * 24 * 3_600_000);
        let mut held = record(
            ClaimState::Pending {
                lease_until: far + LEASE,
            },
            None,
        );
        held.updated_at = far;
        assert!(matches!(
            decide(&held, Duration::ZERO, None),
            Decision::InFlight { .. }
        ));
        assert!(matches!(
            decide(&held, LEASE, None),
            Decision::Reclaim { .. }
        ));
    }
}
