//! The claim state machine over any revisioned key-value map.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{DedupStore, StoreError};
use crate::claim::operator::{Written, reopened};
use crate::claim::{
    Claim, ClaimOutcome, ClaimRecord, ClaimState, Decision, Owner, Snapshot, Transition, decide,
};
use crate::clock::{Clock, SystemClock, UnixMillis};
use crate::fingerprint::Fingerprint;
use crate::key::RecordKey;

/// How many create/read/CAS rounds a claim makes before it reports the key
/// as contended ([`ClaimOutcome::InFlight`]).
const CLAIM_ROUNDS: usize = 4;
/// The delay suggested when a claim lost every round to other claimers.
const CONTENDED_RETRY: Duration = Duration::from_millis(100);
/// How many pending records of other owners a handle keeps watching. An
/// observation evicted early only restarts that record's wait (never
/// shortens it).
const OBSERVATIONS: usize = 16_384;

/// When this handle first saw each pending record at its current revision,
/// on its own monotonic clock: a lease runs out on the reader's time.
#[derive(Clone)]
struct Observations(Arc<quick_cache::sync::Cache<RecordKey, (u64, Duration)>>);

impl Observations {
    fn new() -> Self {
        Self(Arc::new(quick_cache::sync::Cache::new(OBSERVATIONS)))
    }

    /// How long `revision` of `key` has been seen unchanged (zero at first
    /// sight, which starts the watch).
    fn seen_for(&self, key: &RecordKey, revision: u64, now: Duration) -> Duration {
        match self.0.get(key) {
            Some((seen, since)) if seen == revision => now.saturating_sub(since),
            _ => {
                self.0.insert(key.clone(), (revision, now));
                Duration::ZERO
            }
        }
    }

    fn forget(&self, key: &RecordKey) {
        self.0.remove(key);
    }
}

/// Claims this handle created whose answer it never got (an error: the
/// create may or may not have been written). Its redelivery finding that
/// very record — this owner, this payload, untouched since — takes it at
/// once as the same attempt: nobody holds it, for the delivery that made it
/// was never run.
#[derive(Clone)]
struct Unanswered(Arc<quick_cache::sync::Cache<RecordKey, ClaimRecord>>);

impl Unanswered {
    fn new() -> Self {
        Self(Arc::new(quick_cache::sync::Cache::new(OBSERVATIONS)))
    }

    /// Whether `found` is the record this handle's unanswered create of
    /// `key` wrote — and if so, forgets it: only one delivery takes it.
    fn take(&self, key: &RecordKey, found: &ClaimRecord) -> bool {
        self.0.remove_if(key, |sent| sent == found).is_some()
    }
}

impl std::fmt::Debug for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Unanswered({})", self.0.len())
    }
}

impl std::fmt::Debug for Observations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Observations({})", self.0.len())
    }
}

/// The answer of a compare-and-set update.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Written at this revision.
    Written(u64),
    /// The key is not at the expected revision (or is gone).
    Conflict,
}

/// The answer of a create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Create {
    /// Written at this revision.
    Created(u64),
    /// The key holds a value: here it is with its revision, read in the same
    /// call so that a claimer needs no second round trip to decide. `None`
    /// when it vanished before it could be read (the caller tries again).
    Exists(Option<(Bytes, u64)>),
}

/// A key-value map with per-key revisions and compare-and-set: all a
/// [`CasStore`] needs from its storage.
///
/// A record older than [`retention`](Self::retention) since its last write
/// is gone (reads return `None`, creates succeed).
pub trait RevisionedMap: Clone + Send + Sync + 'static {
    /// Writes `value` if `key` is absent; otherwise returns what it holds.
    fn create(
        &self,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<Create, StoreError>> + Send;
    /// Reads the value and its revision.
    fn read(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<(Bytes, u64)>, StoreError>> + Send;
    /// Writes `value` if `key` is at `revision`.
    fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> impl Future<Output = Result<Write, StoreError>> + Send;
    /// Removes `key` if it is at `revision` (an operator's forget: a record
    /// that moved since it was read is left alone).
    fn delete_at(
        &self,
        key: &str,
        revision: u64,
    ) -> impl Future<Output = Result<Write, StoreError>> + Send;
    /// How long a record lives after its last write.
    fn retention(&self) -> Duration;
}

/// A [`DedupStore`] over a [`RevisionedMap`]: claims are creates, every
/// later transition is a compare-and-set on the revision the claim holds.
///
/// A pending record of another owner is taken over only after this handle
/// has seen it at one revision for a full lease of its own monotonic time
/// (see [`decide`]): workers' wall clocks never have to agree.
///
/// Cloning is cheap and keeps the owner (and what it has seen);
/// [`as_owner`](Self::as_owner) makes a handle that writes as another worker
/// (tests use it to play several workers against one storage).
#[derive(Clone, Debug)]
pub struct CasStore<M> {
    map: M,
    owner: Owner,
    clock: Arc<dyn Clock>,
    observed: Observations,
    unanswered: Unanswered,
}

impl<M: RevisionedMap> CasStore<M> {
    /// A store over `map` writing as a fresh [`Owner`], on the system clock.
    pub fn over(map: M) -> Self {
        Self {
            map,
            owner: Owner::random(),
            clock: Arc::new(SystemClock),
            observed: Observations::new(),
            unanswered: Unanswered::new(),
        }
    }

    /// The same storage, written as `owner` (another worker: it has seen
    /// nothing yet).
    pub fn as_owner(&self, owner: Owner) -> Self {
        Self {
            owner,
            observed: Observations::new(),
            unanswered: Unanswered::new(),
            ..self.clone()
        }
    }

    /// The same storage and owner, with timestamps and lease observations on
    /// `clock`.
    pub fn using_clock(self, clock: impl Clock) -> Self {
        Self {
            clock: Arc::new(clock),
            observed: Observations::new(),
            ..self
        }
    }

    /// The storage underneath.
    pub fn map(&self) -> &M {
        &self.map
    }

    async fn snapshot(&self, key: &RecordKey) -> Result<Option<Snapshot>, StoreError> {
        let stored = self.map.read(key.as_str()).await?;
        Self::decoded(key, stored)
    }

    fn decoded(
        key: &RecordKey,
        stored: Option<(Bytes, u64)>,
    ) -> Result<Option<Snapshot>, StoreError> {
        let Some((bytes, revision)) = stored else {
            return Ok(None);
        };
        let record = ClaimRecord::decode(&bytes).map_err(|source| StoreError::Corrupt {
            key: key.clone(),
            source,
        })?;
        Ok(Some(Snapshot { record, revision }))
    }

    fn pending(
        &self,
        now: UnixMillis,
        lease: Duration,
        base: Option<&ClaimRecord>,
        fp: Option<Fingerprint>,
    ) -> ClaimRecord {
        ClaimRecord {
            state: ClaimState::Pending {
                lease_until: now + lease,
            },
            owner: self.owner,
            attempt: base.map_or(1, |r| r.attempt.saturating_add(1)),
            fingerprint: fp,
            result: None,
            created_at: base.map_or(now, |r| r.created_at),
            updated_at: now,
        }
    }

    fn granted(key: &RecordKey, record: &ClaimRecord, revision: u64, lease: Duration) -> Claim {
        Claim::granted(key, record, revision, lease)
    }

    /// Writes `next` over the claim's revision. When the CAS fails, the
    /// record is read: if it still carries this claim's owner and attempt,
    /// the revision moved by a write of this very claim whose answer was
    /// lost (a timeout), so the transition is retried or found done; any
    /// other record means the lease was lost.
    async fn transition(
        &self,
        claim: &Claim,
        next: &ClaimRecord,
    ) -> Result<(Transition, Option<Snapshot>), StoreError> {
        let mut revision = claim.revision;
        for _ in 0..CLAIM_ROUNDS {
            if let Write::Written(revision) = self
                .map
                .update(claim.key.as_str(), next.encode(), revision)
                .await?
            {
                let snapshot = Snapshot {
                    record: next.clone(),
                    revision,
                };
                return Ok((Transition::Applied, Some(snapshot)));
            }
            let current = match self.snapshot(&claim.key).await? {
                Some(s) if s.record.owner == claim.owner && s.record.attempt == claim.attempt => s,
                other => {
                    let current_owner = other.map(|s| s.record.owner);
                    return Ok((Transition::LeaseLost { current_owner }, None));
                }
            };
            // Its own earlier write of the same end state: done. (Not for a
            // renewal: that earlier write may be a lease/3 old, and readers
            // have watched its revision since then — extending the lease
            // from it would let the owner's deadline run past what a reader
            // observes. A renewal writes afresh on the revision found.)
            let renewal = matches!(next.state, ClaimState::Pending { .. });
            if !renewal && same_state(&current.record.state, &next.state) {
                return Ok((Transition::Applied, Some(current)));
            }
            if !matches!(current.record.state, ClaimState::Pending { .. }) {
                return Ok((
                    Transition::LeaseLost {
                        current_owner: Some(current.record.owner),
                    },
                    None,
                ));
            }
            revision = current.revision;
        }
        Ok((
            Transition::LeaseLost {
                current_owner: None,
            },
            None,
        ))
    }

    async fn finish(
        &self,
        claim: &Claim,
        state: ClaimState,
        result: Option<Bytes>,
    ) -> Result<Transition, StoreError> {
        let next = claim.record(state, result, self.clock.now());
        Ok(self.transition(claim, &next).await?.0)
    }
}

/// Whether two states are the same kind (a renewal's deadline may differ).
fn same_state(a: &ClaimState, b: &ClaimState) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

impl<M: RevisionedMap> DedupStore for CasStore<M> {
    fn owner(&self) -> Owner {
        self.owner
    }

    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let retention = self.map.retention();
        if lease >= retention {
            return Err(StoreError::LeaseTooLong { lease, retention });
        }
        for _ in 0..CLAIM_ROUNDS {
            let now = self.clock.now();
            let fresh = self.pending(now, lease, None, fingerprint);
            let created = match self.map.create(key.as_str(), fresh.encode()).await {
                Ok(created) => created,
                Err(e) => {
                    self.unanswered.0.insert(key.clone(), fresh);
                    return Err(e);
                }
            };
            let found = match created {
                Create::Created(revision) => {
                    return Ok(ClaimOutcome::Claimed(Self::granted(
                        key, &fresh, revision, lease,
                    )));
                }
                Create::Exists(stored) => Self::decoded(key, stored)?,
            };
            // The key exists; decide on what it holds. (If it vanished in
            // between — expired or forgotten — the next round creates it.)
            let Some(found) = found else {
                continue;
            };
            if found.record.fingerprint == fingerprint && self.unanswered.take(key, &found.record) {
                // This handle's own claim, its create's answer lost: the
                // same attempt, taken afresh at its revision.
                let next = ClaimRecord {
                    attempt: found.record.attempt,
                    ..self.pending(now, lease, Some(&found.record), fingerprint)
                };
                if let Write::Written(revision) = self
                    .map
                    .update(key.as_str(), next.encode(), found.revision)
                    .await?
                {
                    self.observed.forget(key);
                    return Ok(ClaimOutcome::Claimed(Self::granted(
                        key, &next, revision, lease,
                    )));
                }
                continue;
            }
            let observed = match found.record.state {
                ClaimState::Pending { .. } => {
                    self.observed
                        .seen_for(key, found.revision, self.clock.monotonic())
                }
                _ => Duration::ZERO,
            };
            let from = match decide(&found.record, observed, fingerprint.as_ref()) {
                Decision::Duplicate => {
                    return Ok(ClaimOutcome::Duplicate {
                        result: found.record.result,
                    });
                }
                Decision::Conflict { stored } => return Ok(ClaimOutcome::KeyConflict { stored }),
                Decision::InFlight { owner, retry_after } => {
                    return Ok(ClaimOutcome::InFlight {
                        owner: Some(owner),
                        retry_after,
                    });
                }
                Decision::Dead => return Ok(ClaimOutcome::Dead),
                Decision::Claim => None,
                Decision::Reclaim { from } => Some(from),
            };
            let next = self.pending(now, lease, Some(&found.record), fingerprint);
            // Lost the CAS: somebody else moved the record; look again.
            if let Write::Written(revision) = self
                .map
                .update(key.as_str(), next.encode(), found.revision)
                .await?
            {
                self.observed.forget(key);
                let claim = Self::granted(key, &next, revision, lease);
                return Ok(match from {
                    None => ClaimOutcome::Claimed(claim),
                    Some(from) => ClaimOutcome::Reclaimed { claim, from },
                });
            }
        }
        Ok(ClaimOutcome::InFlight {
            owner: None,
            retry_after: CONTENDED_RETRY,
        })
    }

    async fn complete(
        &self,
        claim: &Claim,
        result: Option<Bytes>,
    ) -> Result<Transition, StoreError> {
        self.finish(claim, ClaimState::Done, result).await
    }

    async fn release(&self, claim: &Claim) -> Result<Transition, StoreError> {
        self.finish(claim, ClaimState::Released, None).await
    }

    async fn mark_dead(&self, claim: &Claim) -> Result<Transition, StoreError> {
        self.finish(claim, ClaimState::Dead, None).await
    }

    async fn renew(&self, claim: &mut Claim) -> Result<Transition, StoreError> {
        let now = self.clock.now();
        let state = ClaimState::Pending {
            lease_until: now + claim.lease,
        };
        let next = claim.record(state, None, now);
        let (transition, written) = self.transition(claim, &next).await?;
        if let Some(written) = written {
            *claim = Self::granted(&claim.key, &written.record, written.revision, claim.lease);
        }
        Ok(transition)
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<Snapshot>, StoreError> {
        self.snapshot(key).await
    }

    async fn forget(&self, key: &RecordKey, revision: u64) -> Result<Written, StoreError> {
        Ok(match self.map.delete_at(key.as_str(), revision).await? {
            Write::Written(_) => Written::Applied,
            Write::Conflict => Written::Moved,
        })
    }

    async fn reopen(
        &self,
        key: &RecordKey,
        found: Option<&Snapshot>,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Written, StoreError> {
        let record = found.map(|s| &s.record);
        if record.is_some_and(|r| !matches!(r.state, ClaimState::Dead | ClaimState::Released)) {
            return Ok(Written::Moved);
        }
        let next = reopened(record, fingerprint, self.owner, self.clock.now());
        let written = match found {
            Some(found) => {
                self.map
                    .update(key.as_str(), next.encode(), found.revision)
                    .await?
            }
            None => match self.map.create(key.as_str(), next.encode()).await? {
                Create::Created(revision) => Write::Written(revision),
                Create::Exists(_) => Write::Conflict,
            },
        };
        Ok(match written {
            Write::Written(_) => Written::Applied,
            Write::Conflict => Written::Moved,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::{Create, RevisionedMap, StoreError, Write};

    use crate::claim::{ClaimOutcome, Owner};
    use crate::clock::ManualClock;
    use crate::key::{HandlerName, IdempotencyKey, RecordKey};
    use crate::store::{DedupStore, MemoryStore};

    const LEASE: Duration = Duration::from_secs(30);
    const SKEW: Duration = Duration::from_secs(600);

    fn key() -> RecordKey {
        RecordKey::new(
            &HandlerName::new("skew").expect("name"),
            &IdempotencyKey::new("order-1").expect("key"),
        )
    }

    /// Two workers on one storage, the second's wall clock `ahead` of the
    /// first's.
    fn workers(ahead: Duration) -> (MemoryStore, MemoryStore, ManualClock) {
        let first = ManualClock::starting_now();
        let second = ManualClock::starting_now();
        second.advance(ahead);
        let a = MemoryStore::with_clock(Duration::from_secs(3600), first);
        let b = a.as_owner(Owner::random()).using_clock(second.clone());
        (a, b, second)
    }

    /// A map whose next update (or, with `lose_create`, create) is applied
    /// but answered with an error (a lost answer).
    #[derive(Clone)]
    struct LosesAnAnswer {
        map: crate::store::MemoryMap,
        lose: Arc<std::sync::atomic::AtomicBool>,
        lose_create: Arc<std::sync::atomic::AtomicBool>,
    }

    impl LosesAnAnswer {
        fn over(memory: &MemoryStore) -> Self {
            Self {
                map: memory.map().clone(),
                lose: Arc::default(),
                lose_create: Arc::default(),
            }
        }
    }

    impl RevisionedMap for LosesAnAnswer {
        async fn create(&self, key: &str, value: Bytes) -> Result<Create, StoreError> {
            let created = self.map.create(key, value).await?;
            if self
                .lose_create
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(StoreError::unavailable(
                    crate::store::StoreOp::Create,
                    "the answer was lost",
                ));
            }
            Ok(created)
        }
        async fn read(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
            self.map.read(key).await
        }
        async fn update(
            &self,
            key: &str,
            value: Bytes,
            revision: u64,
        ) -> Result<Write, StoreError> {
            let written = self.map.update(key, value, revision).await?;
            if self.lose.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::unavailable(
                    crate::store::StoreOp::Update,
                    "the answer was lost",
                ));
            }
            Ok(written)
        }
        async fn delete_at(&self, key: &str, revision: u64) -> Result<Write, StoreError> {
            self.map.delete_at(key, revision).await
        }
        fn retention(&self) -> Duration {
            self.map.retention()
        }
    }

    #[tokio::test]
    async fn a_renewal_after_a_lost_answer_writes_afresh_so_readers_watch_from_now() {
        let memory = MemoryStore::new(Duration::from_secs(3600));
        let map = LosesAnAnswer::over(&memory);
        let lose = map.lose.clone();
        let store = super::CasStore::over(map);
        let ClaimOutcome::Claimed(mut claim) =
            store.claim(&key(), None, LEASE).await.expect("claim")
        else {
            panic!("a fresh key is free");
        };
        // A renewal is applied, its answer lost.
        lose.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.renew(&mut claim).await.is_err());
        let earlier = store
            .inspect(&key())
            .await
            .expect("read")
            .expect("record")
            .revision;
        // The next renewal finds that write: it must not extend the lease
        // from it, but write again, so that readers watch from now.
        assert_eq!(
            store.renew(&mut claim).await.expect("renew"),
            crate::claim::Transition::Applied
        );
        let now = store
            .inspect(&key())
            .await
            .expect("read")
            .expect("record")
            .revision;
        assert!(
            now > earlier,
            "the renewal did not write: {now} after {earlier}"
        );
        assert_eq!(claim.revision(), now);
    }

    /// A claim's create is written, its answer lost: the delivery was not
    /// run. Its redelivery to this worker finds this worker's own claim —
    /// which nobody holds — and takes it at once, as the same attempt: no
    /// lease waited for, no takeover of itself counted.
    #[tokio::test]
    async fn a_claim_whose_create_answer_was_lost_is_taken_at_once_as_the_same_attempt() {
        let memory = MemoryStore::new(Duration::from_secs(3600));
        let map = LosesAnAnswer::over(&memory);
        map.lose_create
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let store = super::CasStore::over(map);
        let payload = Some(crate::fingerprint::Fingerprint::of(b"x"));
        assert!(store.claim(&key(), payload, LEASE).await.is_err());
        match store.claim(&key(), payload, LEASE).await.expect("claim") {
            ClaimOutcome::Claimed(claim) => assert_eq!(claim.attempt(), 1),
            other => panic!("its own unanswered claim was not taken at once: {other:?}"),
        }
        // Another worker still sees a live claim.
        let other = store.as_owner(Owner::random());
        assert!(matches!(
            other.claim(&key(), payload, LEASE).await.expect("claim"),
            ClaimOutcome::InFlight { .. }
        ));
    }

    #[tokio::test]
    async fn a_claimer_whose_clock_runs_ahead_does_not_take_over_a_live_claim() {
        let (a, b, _) = workers(SKEW);
        let claimed = a.claim(&key(), None, LEASE).await.expect("claim");
        assert!(matches!(claimed, ClaimOutcome::Claimed(_)), "{claimed:?}");
        for _ in 0..3 {
            let outcome = b.claim(&key(), None, LEASE).await.expect("claim");
            assert!(
                matches!(outcome, ClaimOutcome::InFlight { .. }),
                "a clock ten minutes ahead took over a live claim: {outcome:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_claimer_whose_clock_runs_behind_takes_over_a_dead_claim_after_one_lease_of_its_own_time()
     {
        // The owner's clock is ten minutes ahead of the claimer's: its
        // deadline lies ten minutes in the claimer's future.
        let first = ManualClock::starting_now();
        first.advance(SKEW);
        let second = ManualClock::starting_now();
        let a = MemoryStore::with_clock(Duration::from_secs(3600), first);
        let b = a.as_owner(Owner::random()).using_clock(second.clone());
        assert!(matches!(
            a.claim(&key(), None, LEASE).await.expect("claim"),
            ClaimOutcome::Claimed(_)
        ));
        // The owner dies. The claimer sees the record, waits one lease of
        // its own time, and takes over — not ten minutes later.
        let first_look = b.claim(&key(), None, LEASE).await.expect("claim");
        assert!(
            matches!(first_look, ClaimOutcome::InFlight { .. }),
            "{first_look:?}"
        );
        second.advance(LEASE);
        let outcome = b.claim(&key(), None, LEASE).await.expect("claim");
        assert!(
            matches!(outcome, ClaimOutcome::Reclaimed { .. }),
            "{outcome:?}"
        );
    }
}
