//! The dedup-store conformance suite: one set of cases, written against
//! [`DedupStore`], that every store must pass — in memory, on JetStream KV
//! (single server, 2.9, R3 cluster) and on PostgreSQL.
//!
//! A store joins by providing a [`Fixture`]; [`conformance_tests!`] then
//! expands to one `#[tokio::test]` per case, and [`run_all`] runs every case
//! in sequence against one fixture (for expensive fixtures like a cluster).
//!
//! ```no_run
//! mod memory {
//!     idem::conformance_tests!(async { idem::testing::conformance::MemoryFixture::new() });
//! }
//! ```
//!
//! [`conformance_tests!`]: crate::conformance_tests

use std::future::Future;
use std::time::Duration;

use futures::future::join_all;
use tokio::time::{Instant, sleep};

use crate::claim::operator::Written;
use crate::claim::{ClaimOutcome, ClaimState, Owner, Transition};
use crate::clock::ManualClock;
use crate::fingerprint::Fingerprint;
use crate::key::{HandlerName, IdempotencyKey, RecordKey};
use crate::store::{DedupStore, KvStore, KvStoreConfig, MemoryStore, StoreError};

use super::{HarnessError, NatsServer};

/// What a store provides to be tested: handles on one shared storage, a
/// manual clock for leases, and a way to let the retention run out.
pub trait Fixture: Send + Sync {
    /// The store under test.
    type Store: DedupStore;

    /// A handle on the fixture's storage that writes as `owner`.
    fn store(&self, owner: Owner) -> Self::Store;

    /// The clock every handle measures leases on.
    fn clock(&self) -> &ManualClock;

    /// The lease the cases claim with; shorter than the retention.
    fn lease(&self) -> Duration;

    /// Returns once everything written so far is older than the retention
    /// (the case then polls, bounded, until the record is gone).
    fn outlive_retention(&self) -> impl Future<Output = ()> + Send;
}

/// An in-memory fixture: retention 1 h, lease 30 s, both on a manual clock.
#[derive(Debug)]
pub struct MemoryFixture {
    store: MemoryStore,
    clock: ManualClock,
}

const MEMORY_RETENTION: Duration = Duration::from_secs(3600);

impl MemoryFixture {
    /// A fresh, empty store.
    pub fn new() -> Self {
        let clock = ManualClock::starting_now();
        Self {
            store: MemoryStore::with_clock(MEMORY_RETENTION, clock.clone()),
            clock,
        }
    }
}

impl Default for MemoryFixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture for MemoryFixture {
    type Store = MemoryStore;

    fn store(&self, owner: Owner) -> MemoryStore {
        self.store.as_owner(owner)
    }

    fn clock(&self) -> &ManualClock {
        &self.clock
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(30)
    }

    async fn outlive_retention(&self) {
        self.clock
            .advance(MEMORY_RETENTION + Duration::from_millis(1));
    }
}

/// A JetStream KV fixture: leases on a manual clock; the retention (3 s,
/// enforced by the server's `max_age`) on real time.
#[derive(Debug)]
pub struct KvFixture {
    store: KvStore,
    clock: ManualClock,
    _server: Option<NatsServer>,
}

/// Long enough that no case's own steps outlast it, short enough to wait for.
const KV_RETENTION: Duration = Duration::from_secs(3);

impl KvFixture {
    /// Starts a single server (the binary [`NatsBinary::locate`] finds) and
    /// opens a bucket on it.
    ///
    /// [`NatsBinary::locate`]: super::NatsBinary::locate
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_sharded(1).await
    }

    /// Starts a single server and opens a bucket spread over `shards`
    /// ([`KvStoreConfig::shards`]).
    pub async fn start_sharded(shards: usize) -> Result<Self, HarnessError> {
        let server = NatsServer::start().await?;
        let js = async_nats::jetstream::new(server.connect().await?);
        let mut fixture = Self::open_sharded(&js, 1, shards).await?;
        fixture._server = Some(server);
        Ok(fixture)
    }

    /// Opens a fresh bucket with `replicas` on the given server or cluster.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        Self::open_sharded(js, replicas, 1).await
    }

    /// Opens a fresh bucket of `shards` with `replicas` each on the given
    /// server or cluster.
    pub async fn open_sharded(
        js: &async_nats::jetstream::Context,
        replicas: usize,
        shards: usize,
    ) -> Result<Self, StoreError> {
        let clock = ManualClock::starting_now();
        let config = KvStoreConfig::default()
            .bucket(format!("conformance_{}", uuid::Uuid::new_v4().simple()))
            .retention(KV_RETENTION)
            .replicas(replicas)
            .shards(shards);
        let store = KvStore::open(js, config).await?.using_clock(clock.clone());
        Ok(Self {
            store,
            clock,
            _server: None,
        })
    }
}

impl Fixture for KvFixture {
    type Store = KvStore;

    fn store(&self, owner: Owner) -> KvStore {
        self.store.as_owner(owner)
    }

    fn clock(&self) -> &ManualClock {
        &self.clock
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(1)
    }

    async fn outlive_retention(&self) {
        sleep(KV_RETENTION).await;
    }
}

/// A PostgreSQL fixture (feature `postgres`): a fresh schema per fixture on
/// `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
/// dropped with the fixture; leases and retention (1 h) on a manual clock.
#[cfg(feature = "postgres")]
#[derive(Debug)]
pub struct PgFixture {
    store: crate::store::PgStore,
    clock: ManualClock,
    database: super::TestDatabase,
}

#[cfg(feature = "postgres")]
const PG_RETENTION: Duration = Duration::from_secs(3600);

#[cfg(feature = "postgres")]
impl PgFixture {
    /// A migrated schema of its own on the test database.
    pub async fn start() -> Result<Self, HarnessError> {
        let database = super::TestDatabase::create().await?;
        let clock = ManualClock::starting_now();
        let store =
            crate::store::PgStore::open(database.pool().clone(), database.schema(), PG_RETENTION)
                .await?
                .on_clock(clock.clone());
        Ok(Self {
            store,
            clock,
            database,
        })
    }
}

#[cfg(feature = "postgres")]
impl Fixture for PgFixture {
    type Store = crate::store::PgStore;

    fn store(&self, owner: Owner) -> Self::Store {
        let _ = &self.database;
        self.store.as_owner(owner)
    }

    fn clock(&self) -> &ManualClock {
        &self.clock
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(30)
    }

    async fn outlive_retention(&self) {
        self.clock.advance(PG_RETENTION + Duration::from_millis(1));
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh
/// fixture from the given `async` expression.
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:expr) => {
        $crate::conformance_tests!(@cases $fixture;
            fresh_claim_is_claimed,
            duplicate_after_done_returns_the_stored_result,
            same_key_with_another_payload_is_a_key_conflict,
            valid_lease_elsewhere_is_in_flight,
            expired_lease_is_reclaimed,
            expired_claim_for_another_payload_is_a_key_conflict,
            racing_takeovers_have_exactly_one_winner,
            fenced_out_owner_cannot_write,
            a_released_key_is_claimed_again_by_its_own_payload_only,
            dead_record_is_dead_for_its_payload_only,
            renewal_keeps_the_lease,
            a_renewed_claim_is_watched_afresh,
            transitions_survive_a_lost_answer,
            forget_makes_the_key_new,
            a_reopened_dead_key_is_its_own_payloads_again,
            done_records_expire_after_the_retention,
            lease_must_be_shorter_than_the_retention,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let fixture = $fixture.await;
                $crate::testing::conformance::$case(&fixture).await;
            }
        )*
    };
}

/// Runs every case in sequence on one fixture; cases use distinct keys.
pub async fn run_all<F: Fixture>(f: &F) {
    fresh_claim_is_claimed(f).await;
    duplicate_after_done_returns_the_stored_result(f).await;
    same_key_with_another_payload_is_a_key_conflict(f).await;
    valid_lease_elsewhere_is_in_flight(f).await;
    expired_lease_is_reclaimed(f).await;
    expired_claim_for_another_payload_is_a_key_conflict(f).await;
    racing_takeovers_have_exactly_one_winner(f).await;
    fenced_out_owner_cannot_write(f).await;
    a_released_key_is_claimed_again_by_its_own_payload_only(f).await;
    dead_record_is_dead_for_its_payload_only(f).await;
    renewal_keeps_the_lease(f).await;
    a_renewed_claim_is_watched_afresh(f).await;
    transitions_survive_a_lost_answer(f).await;
    forget_makes_the_key_new(f).await;
    a_reopened_dead_key_is_its_own_payloads_again(f).await;
    done_records_expire_after_the_retention(f).await;
    lease_must_be_shorter_than_the_retention(f).await;
}

fn key(case: &str) -> RecordKey {
    let handler = HandlerName::new(case).expect("case names are valid handler names");
    RecordKey::new(
        &handler,
        &IdempotencyKey::new("order 42/α").expect("non-empty"),
    )
}

fn payload_a() -> Option<Fingerprint> {
    Some(Fingerprint::of(b"{\"amount\":100}"))
}

fn payload_b() -> Option<Fingerprint> {
    Some(Fingerprint::of(b"{\"amount\":200}"))
}

async fn claimed<S: DedupStore>(
    store: &S,
    key: &RecordKey,
    lease: Duration,
) -> crate::claim::Claim {
    match store.claim(key, payload_a(), lease).await.expect("claim") {
        ClaimOutcome::Claimed(claim) => claim,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

async fn record_state<S: DedupStore>(store: &S, key: &RecordKey) -> (ClaimState, Owner, u64) {
    let snapshot = store
        .inspect(key)
        .await
        .expect("inspect")
        .expect("the record exists");
    (
        snapshot.record.state,
        snapshot.record.owner,
        snapshot.revision,
    )
}

/// A free key is claimed; the record is pending, owned by the claimer, at
/// the claim's revision.
pub async fn fresh_claim_is_claimed<F: Fixture>(f: &F) {
    let store = f.store(Owner::random());
    let key = key("fresh");
    let claim = claimed(&store, &key, f.lease()).await;
    assert_eq!(claim.owner(), store.owner());
    assert_eq!(claim.attempt(), 1);
    let (state, owner, revision) = record_state(&store, &key).await;
    assert!(
        matches!(state, ClaimState::Pending { lease_until } if Some(lease_until) == claim.lease_until())
    );
    assert_eq!((owner, revision), (store.owner(), claim.revision()));
}

/// After completion, the same payload is a duplicate carrying the stored
/// result — for every owner, any number of times.
pub async fn duplicate_after_done_returns_the_stored_result<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("duplicate");
    let claim = claimed(&a, &key, f.lease()).await;
    assert_eq!(
        a.complete(&claim, Some("card-7".into()))
            .await
            .expect("complete"),
        Transition::Applied
    );
    for store in [&a, &b, &b] {
        let outcome = store
            .claim(&key, payload_a(), f.lease())
            .await
            .expect("claim");
        assert_eq!(
            outcome,
            ClaimOutcome::Duplicate {
                result: Some("card-7".into())
            }
        );
    }
    // Without a stored result, a duplicate carries none.
    let bare = RecordKey::new(
        &HandlerName::new("duplicate").expect("valid"),
        &IdempotencyKey::new("bare").expect("non-empty"),
    );
    let claim = claimed(&a, &bare, f.lease()).await;
    a.complete(&claim, None).await.expect("complete");
    let outcome = b.claim(&bare, payload_a(), f.lease()).await.expect("claim");
    assert_eq!(outcome, ClaimOutcome::Duplicate { result: None });
}

/// The same key with another payload is a conflict and leaves the record as
/// it was; a claimer without a fingerprint sees a plain duplicate.
pub async fn same_key_with_another_payload_is_a_key_conflict<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("conflict");
    let claim = claimed(&a, &key, f.lease()).await;
    a.complete(&claim, None).await.expect("complete");
    let before = record_state(&a, &key).await;
    let outcome = b.claim(&key, payload_b(), f.lease()).await.expect("claim");
    assert_eq!(
        outcome,
        ClaimOutcome::KeyConflict {
            stored: payload_a()
        }
    );
    assert_eq!(
        record_state(&a, &key).await,
        before,
        "a conflict must not touch the record"
    );
    let outcome = b.claim(&key, None, f.lease()).await.expect("claim");
    assert_eq!(outcome, ClaimOutcome::Duplicate { result: None });
}

/// A valid lease keeps everybody else out — also the owner's own process —
/// and says how long to wait.
pub async fn valid_lease_elsewhere_is_in_flight<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("inflight");
    claimed(&a, &key, f.lease()).await;
    let expect_in_flight = |outcome: ClaimOutcome, max: Duration| match outcome {
        ClaimOutcome::InFlight {
            owner: Some(owner),
            retry_after,
        } => {
            assert_eq!(owner, a.owner());
            assert!(
                retry_after > Duration::ZERO && retry_after <= max,
                "retry_after {retry_after:?}"
            );
        }
        other => panic!("expected InFlight, got {other:?}"),
    };
    expect_in_flight(
        b.claim(&key, payload_a(), f.lease()).await.expect("claim"),
        f.lease(),
    );
    expect_in_flight(
        a.claim(&key, payload_a(), f.lease()).await.expect("claim"),
        f.lease(),
    );
    // Another payload under a held key is a conflict at once: the payload
    // holding it owns the key (docs/design.md's table).
    assert_eq!(
        b.claim(&key, payload_b(), f.lease()).await.expect("claim"),
        ClaimOutcome::KeyConflict {
            stored: payload_a()
        }
    );
    f.clock().advance(f.lease() / 2);
    expect_in_flight(
        b.claim(&key, payload_a(), f.lease()).await.expect("claim"),
        f.lease() / 2,
    );
}

/// Expects the claimer's first look at a held record: in flight. (A
/// reader's lease clock starts when it first sees the record.)
async fn first_look<S: DedupStore>(
    store: &S,
    key: &RecordKey,
    payload: Option<Fingerprint>,
    lease: Duration,
) {
    let outcome = store.claim(key, payload, lease).await.expect("claim");
    assert!(
        matches!(outcome, ClaimOutcome::InFlight { .. }),
        "a record seen for the first time is in flight, whatever its deadline says: {outcome:?}"
    );
}

/// Once another owner has seen the record unchanged for a full lease of
/// its own time, it takes the key over.
pub async fn expired_lease_is_reclaimed<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("reclaim");
    claimed(&a, &key, f.lease()).await;
    first_look(&b, &key, payload_a(), f.lease()).await;
    f.clock().advance(f.lease());
    match b.claim(&key, payload_a(), f.lease()).await.expect("claim") {
        ClaimOutcome::Reclaimed { claim, from } => {
            assert_eq!(from, a.owner());
            assert_eq!((claim.owner(), claim.attempt()), (b.owner(), 2));
        }
        other => panic!("expected Reclaimed, got {other:?}"),
    }
    let (state, owner, _) = record_state(&a, &key).await;
    assert!(matches!(state, ClaimState::Pending { .. }));
    assert_eq!(owner, b.owner());
}

/// An expired claim is not taken over for another payload: its owner may
/// have applied its own, so the other payload is a key conflict (found by
/// the fault suite's soak, where both payloads of a reused key were
/// applied) — as it is while the claim is live.
pub async fn expired_claim_for_another_payload_is_a_key_conflict<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("reclaim-other-payload");
    claimed(&a, &key, f.lease()).await;
    first_look(&b, &key, payload_a(), f.lease()).await;
    f.clock().advance(f.lease());
    match b.claim(&key, payload_b(), f.lease()).await.expect("claim") {
        ClaimOutcome::KeyConflict { stored } => assert_eq!(stored, payload_a()),
        other => panic!("expected KeyConflict, got {other:?}"),
    }
    let (_, owner, _) = record_state(&a, &key).await;
    assert_eq!(owner, a.owner(), "the record is left to its owner");
}

/// Sixteen owners race for one expired lease: exactly one wins.
pub async fn racing_takeovers_have_exactly_one_winner<F: Fixture>(f: &F) {
    let a = f.store(Owner::random());
    let key = key("race");
    claimed(&a, &key, f.lease()).await;
    let racers: Vec<F::Store> = (0..16).map(|_| f.store(Owner::random())).collect();
    for racer in &racers {
        first_look(racer, &key, payload_a(), f.lease()).await;
    }
    f.clock().advance(f.lease());
    let outcomes = join_all(racers.iter().map(|s| s.claim(&key, payload_a(), f.lease()))).await;
    let mut winners = Vec::new();
    for (racer, outcome) in racers.iter().zip(outcomes) {
        match outcome.expect("claim") {
            ClaimOutcome::Reclaimed { claim, .. } => winners.push(claim.owner()),
            ClaimOutcome::InFlight { .. } => {}
            other => panic!("{}: unexpected {other:?}", racer.owner()),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one takeover wins: {winners:?}");
    assert_eq!(record_state(&a, &key).await.1, winners[0]);
}

/// A worker whose lease was taken over can change nothing.
pub async fn fenced_out_owner_cannot_write<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("fenced");
    let mut stale = claimed(&a, &key, f.lease()).await;
    first_look(&b, &key, payload_a(), f.lease()).await;
    f.clock().advance(f.lease());
    assert!(matches!(
        b.claim(&key, payload_a(), f.lease()).await.expect("claim"),
        ClaimOutcome::Reclaimed { .. }
    ));
    let before = record_state(&a, &key).await;
    let lost = Transition::LeaseLost {
        current_owner: Some(b.owner()),
    };
    assert_eq!(
        a.complete(&stale, Some("late".into()))
            .await
            .expect("complete"),
        lost
    );
    assert_eq!(a.release(&stale).await.expect("release"), lost);
    assert_eq!(a.mark_dead(&stale).await.expect("mark_dead"), lost);
    assert_eq!(a.renew(&mut stale).await.expect("renew"), lost);
    assert_eq!(
        record_state(&a, &key).await,
        before,
        "the new owner's record is untouched"
    );
}

/// A released claim is free again at once for its own payload — any
/// worker may run it — but another payload reusing the key during the
/// first one's retry backoff is a key conflict: the first payload to claim
/// a key owns it.
pub async fn a_released_key_is_claimed_again_by_its_own_payload_only<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("release");
    let claim = claimed(&a, &key, f.lease()).await;
    assert_eq!(
        a.release(&claim).await.expect("release"),
        Transition::Applied
    );
    assert_eq!(record_state(&a, &key).await.0, ClaimState::Released);
    assert_eq!(
        b.claim(&key, payload_b(), f.lease()).await.expect("claim"),
        ClaimOutcome::KeyConflict {
            stored: payload_a()
        },
        "another payload took a released key"
    );
    let again = claimed(&b, &key, f.lease()).await;
    assert_eq!((again.owner(), again.attempt()), (b.owner(), 2));
}

/// A dead key answers `Dead` to its own payload (and to a claimer without a
/// fingerprint); another payload under it is a key conflict, as for a done
/// key: a corrected payload is never taken for a duplicate.
pub async fn dead_record_is_dead_for_its_payload_only<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("dead");
    let claim = claimed(&a, &key, f.lease()).await;
    assert_eq!(
        a.mark_dead(&claim).await.expect("mark_dead"),
        Transition::Applied
    );
    for payload in [payload_a(), None] {
        assert_eq!(
            b.claim(&key, payload, f.lease()).await.expect("claim"),
            ClaimOutcome::Dead
        );
    }
    assert_eq!(
        b.claim(&key, payload_b(), f.lease()).await.expect("claim"),
        ClaimOutcome::KeyConflict {
            stored: payload_a()
        }
    );
}

/// Renewing moves the deadline: the owner keeps the key past its first lease
/// and completes with the renewed claim.
pub async fn renewal_keeps_the_lease<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("renew");
    let mut claim = claimed(&a, &key, f.lease()).await;
    let first = (claim.revision(), claim.lease_until());
    f.clock().advance(f.lease() * 3 / 4);
    assert_eq!(
        a.renew(&mut claim).await.expect("renew"),
        Transition::Applied
    );
    assert!(
        claim.revision() != first.0 && claim.lease_until() > first.1,
        "{claim:?}"
    );
    f.clock().advance(f.lease() * 3 / 4);
    assert!(matches!(
        b.claim(&key, payload_a(), f.lease()).await.expect("claim"),
        ClaimOutcome::InFlight { .. }
    ));
    assert_eq!(
        a.complete(&claim, None).await.expect("complete"),
        Transition::Applied
    );
}

/// A renewal writes a new revision, so a reader's watch starts again: a
/// worker that keeps renewing is never taken over, however long it runs.
pub async fn a_renewed_claim_is_watched_afresh<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("watch");
    let mut claim = claimed(&a, &key, f.lease()).await;
    for _ in 0..3 {
        first_look(&b, &key, payload_a(), f.lease()).await;
        f.clock().advance(f.lease() * 3 / 4);
        assert_eq!(
            a.renew(&mut claim).await.expect("renew"),
            Transition::Applied
        );
        f.clock().advance(f.lease() / 2);
        // Seen for half a lease since the renewal: still held.
        let outcome = b.claim(&key, payload_a(), f.lease()).await.expect("claim");
        assert!(
            matches!(outcome, ClaimOutcome::InFlight { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(record_state(&a, &key).await.1, a.owner());
}

/// A write whose answer was lost (a timeout) is retried with the old
/// revision: it must be recognised as this claim's own, not as a lost lease.
pub async fn transitions_survive_a_lost_answer<F: Fixture>(f: &F) {
    let a = f.store(Owner::random());
    let key = key("lostanswer");
    let claim = claimed(&a, &key, f.lease()).await;
    // A renewal landed, but the worker never learned the new revision …
    let mut renewed = claim.clone();
    assert_eq!(
        a.renew(&mut renewed).await.expect("renew"),
        Transition::Applied
    );
    // … so it completes with the old one: still its own claim.
    assert_eq!(
        a.complete(&claim, Some("r".into()))
            .await
            .expect("complete"),
        Transition::Applied
    );
    // The completion's answer was lost too: retrying it finds it done.
    assert_eq!(
        a.complete(&claim, Some("r".into()))
            .await
            .expect("complete again"),
        Transition::Applied
    );
    assert_eq!(record_state(&a, &key).await.0, ClaimState::Done);
}

/// `forget` deletes the record at the revision it was read at; the key is
/// then claimed afresh (on KV this is a create over a delete marker). A
/// record that moved since it was read is left alone.
pub async fn forget_makes_the_key_new<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("forget");
    let claim = claimed(&a, &key, f.lease()).await;
    let read = revision_of(&a, &key).await;
    a.complete(&claim, None).await.expect("complete");
    assert_eq!(
        a.forget(&key, read).await.expect("forget"),
        Written::Moved,
        "a forget decided on the pending record deleted the done one"
    );
    assert_eq!(record_state(&a, &key).await.0, ClaimState::Done);
    let done = revision_of(&a, &key).await;
    assert_eq!(
        a.forget(&key, done).await.expect("forget"),
        Written::Applied
    );
    assert_eq!(a.inspect(&key).await.expect("inspect"), None);
    let again = claimed(&b, &key, f.lease()).await;
    assert_eq!(again.attempt(), 1);
    // And again, to exercise create-over-delete twice on one key.
    let pending = revision_of(&b, &key).await;
    assert_eq!(
        b.forget(&key, pending).await.expect("forget"),
        Written::Applied
    );
    claimed(&a, &key, f.lease()).await;
}

/// A replay reopens a dead record for its own payload: `released`, attempts
/// counted afresh, claimable by that payload only; a reopen decided on a
/// record that moved since changes nothing.
pub async fn a_reopened_dead_key_is_its_own_payloads_again<F: Fixture>(f: &F) {
    let (a, b) = (f.store(Owner::random()), f.store(Owner::random()));
    let key = key("reopen");
    let claim = claimed(&a, &key, f.lease()).await;
    let pending = a
        .inspect(&key)
        .await
        .expect("inspect")
        .expect("a pending record");
    assert_eq!(
        a.reopen(&key, Some(&pending), payload_a())
            .await
            .expect("reopen"),
        Written::Moved,
        "a held record is not reopened"
    );
    a.mark_dead(&claim).await.expect("mark_dead");
    let dead = a
        .inspect(&key)
        .await
        .expect("inspect")
        .expect("a dead record");
    assert_eq!(
        a.reopen(&key, Some(&dead), payload_a())
            .await
            .expect("reopen"),
        Written::Applied
    );
    assert_eq!(record_state(&a, &key).await.0, ClaimState::Released);
    assert_eq!(
        a.reopen(&key, Some(&dead), payload_a())
            .await
            .expect("reopen"),
        Written::Moved,
        "a second reopen of the same dead record"
    );
    assert_eq!(
        b.claim(&key, payload_b(), f.lease()).await.expect("claim"),
        ClaimOutcome::KeyConflict {
            stored: payload_a()
        }
    );
    let again = claimed(&b, &key, f.lease()).await;
    assert_eq!(again.attempt(), 1, "a fresh retry budget");

    // A key with no record (expired, purged, forgotten) is created released
    // for the letter's payload — unless a claimer got there first.
    let gone = self::key("reopen-absent");
    assert_eq!(
        a.reopen(&gone, None, payload_a()).await.expect("reopen"),
        Written::Applied
    );
    assert_eq!(record_state(&a, &gone).await.0, ClaimState::Released);
    assert_eq!(
        b.claim(&gone, payload_b(), f.lease()).await.expect("claim"),
        ClaimOutcome::KeyConflict {
            stored: payload_a()
        }
    );
    assert_eq!(
        a.reopen(&gone, None, payload_a()).await.expect("reopen"),
        Written::Moved,
        "created meanwhile"
    );
}

async fn revision_of<S: DedupStore>(store: &S, key: &RecordKey) -> u64 {
    store
        .inspect(key)
        .await
        .expect("inspect")
        .expect("a record")
        .revision
}

/// A done record older than the retention is gone and the key can be
/// claimed again.
pub async fn done_records_expire_after_the_retention<F: Fixture>(f: &F) {
    let a = f.store(Owner::random());
    let key = key("retention");
    let claim = claimed(&a, &key, f.lease()).await;
    a.complete(&claim, None).await.expect("complete");
    f.outlive_retention().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.inspect(&key).await.expect("inspect").is_some() {
        assert!(
            Instant::now() < deadline,
            "the done record outlived its retention by 15 s"
        );
        sleep(Duration::from_millis(50)).await;
    }
    claimed(&a, &key, f.lease()).await;
}

/// A lease that could outlive the record is refused before anything is
/// written.
pub async fn lease_must_be_shorter_than_the_retention<F: Fixture>(f: &F) {
    let a = f.store(Owner::random());
    let key = key("longlease");
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    let err = a
        .claim(&key, payload_a(), century)
        .await
        .expect_err("a century-long lease");
    assert!(matches!(err, StoreError::LeaseTooLong { .. }), "{err}");
    assert_eq!(a.inspect(&key).await.expect("inspect"), None);
}
