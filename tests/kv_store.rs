//! The JetStream KV dedup store against real servers: races between many
//! claimers, server crashes between claim and complete, an unreachable
//! server, incompatible buckets, and an R3 bucket losing its leader.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::future::join_all;
use idem::claim::{ClaimOutcome, ClaimState, Owner, Transition};
use idem::clock::ManualClock;
use idem::fingerprint::Fingerprint;
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::{DedupStore, KvStore, KvStoreConfig, StoreError};
use idem::testing::conformance::{self, KvFixture};
use idem::testing::{Cluster, NatsServer, Proxy};
use tokio::time::{Instant, sleep};

const LEASE: Duration = Duration::from_secs(30);
/// How long a client may take to reconnect, or a cluster to elect a leader.
const RECOVERY: Duration = Duration::from_secs(20);

fn key(name: &str) -> RecordKey {
    RecordKey::new(
        &HandlerName::new("cards").expect("valid"),
        &IdempotencyKey::new(name).expect("non-empty"),
    )
}

fn payload() -> Option<Fingerprint> {
    Some(Fingerprint::of(b"{\"payment\":1}"))
}

fn bucket() -> String {
    format!("claims_{}", uuid::Uuid::new_v4().simple())
}

async fn start() -> (NatsServer, jetstream::Context) {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    (server, js)
}

/// Retries `op` until it succeeds (bounded): the store is back once a call
/// gets through after a reconnect or a leader election.
async fn until_ok<T>(what: &str, mut op: impl AsyncFnMut() -> Result<T, StoreError>) -> T {
    let deadline = Instant::now() + RECOVERY;
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("{what} not yet: {e}");
                sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what} still failing after {RECOVERY:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_claims_have_one_winner_then_all_are_duplicates() {
    let (_server, js) = start().await;
    let config = KvStoreConfig::default().bucket(bucket());
    // Two workers that opened the bucket independently, 32 owners each.
    let first = KvStore::open(&js, config.clone()).await.expect("open");
    let second = KvStore::open(&js, config).await.expect("open again");
    let stores: Vec<KvStore> = (0..64)
        .map(|i| if i % 2 == 0 { &first } else { &second }.as_owner(Owner::random()))
        .collect();
    let key = key("payment-1");

    let claims = stores.iter().map(|s| {
        let (s, key) = (s.clone(), key.clone());
        tokio::spawn(async move { s.claim(&key, payload(), LEASE).await })
    });
    let mut winners = Vec::new();
    let mut in_flight = 0;
    for outcome in join_all(claims).await {
        match outcome.expect("task").expect("claim") {
            ClaimOutcome::Claimed(claim) => winners.push(claim),
            ClaimOutcome::InFlight { .. } => in_flight += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (winners.len(), in_flight),
        (1, 63),
        "exactly one claim wins"
    );

    let winner = &winners[0];
    let store = stores
        .iter()
        .find(|s| s.owner() == winner.owner())
        .expect("winner's store");
    assert_eq!(
        store
            .complete(winner, Some("card-1".into()))
            .await
            .expect("complete"),
        Transition::Applied
    );
    let again = join_all(stores.iter().map(|s| s.claim(&key, payload(), LEASE))).await;
    for outcome in again {
        assert_eq!(
            outcome.expect("claim"),
            ClaimOutcome::Duplicate {
                result: Some("card-1".into())
            }
        );
    }
}

#[tokio::test]
async fn a_claim_survives_a_server_kill_and_its_lease_then_passes_on() {
    let (mut server, js) = start().await;
    let clock = ManualClock::starting_now();
    let a = KvStore::open(&js, KvStoreConfig::default().bucket(bucket()))
        .await
        .expect("open")
        .using_clock(clock.clone());
    let b = a.as_owner(Owner::random());
    let key = key("payment-2");
    let ClaimOutcome::Claimed(claim) = a.claim(&key, payload(), LEASE).await.expect("claim") else {
        panic!("fresh key");
    };

    server.kill().expect("SIGKILL between claim and complete");
    server.restart().await.expect("restart");

    let snapshot = until_ok("inspect after restart", async || a.inspect(&key).await).await;
    let snapshot = snapshot.expect("the claim is still on disk");
    assert_eq!(
        (snapshot.record.owner, snapshot.revision),
        (a.owner(), claim.revision())
    );
    assert!(matches!(snapshot.record.state, ClaimState::Pending { .. }));

    // The worker died with the server; once its lease is over, B takes over.
    assert!(matches!(
        b.claim(&key, payload(), LEASE).await.expect("claim"),
        ClaimOutcome::InFlight { .. }
    ));
    clock.advance(LEASE);
    match b.claim(&key, payload(), LEASE).await.expect("claim") {
        ClaimOutcome::Reclaimed { from, .. } => assert_eq!(from, a.owner()),
        other => panic!("expected Reclaimed, got {other:?}"),
    }
}

#[tokio::test]
async fn calls_fail_within_the_timeout_while_the_server_is_down_and_recover_after() {
    let (mut server, js) = start().await;
    let timeout = Duration::from_millis(800);
    let store = KvStore::open(
        &js,
        KvStoreConfig::default()
            .bucket(bucket())
            .op_timeout(timeout),
    )
    .await
    .expect("open");

    server.kill().expect("SIGKILL");
    for (what, call) in [
        (
            "claim",
            Box::pin(async {
                store
                    .claim(&key("down-1"), payload(), LEASE)
                    .await
                    .map(drop)
            })
                as std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>,
        ),
        (
            "inspect",
            Box::pin(async { store.inspect(&key("down-2")).await.map(drop) }),
        ),
    ] {
        let started = Instant::now();
        let err = call.await.expect_err("the store is down");
        assert!(
            matches!(err, StoreError::Unavailable { .. }),
            "{what}: {err}"
        );
        // Claim makes at most a create and a read; each is bounded.
        assert!(
            started.elapsed() < timeout * 2 + Duration::from_secs(1),
            "{what} took {:?}",
            started.elapsed()
        );
    }

    server.restart().await.expect("restart");
    // A fresh key: a write issued while down may still land after the
    // reconnect (the client buffers it), and would hold its own key.
    let outcome = until_ok("claim after restart", async || {
        store.claim(&key("after"), payload(), LEASE).await
    })
    .await;
    assert!(matches!(outcome, ClaimOutcome::Claimed(_)), "{outcome:?}");
}

#[tokio::test]
async fn an_existing_bucket_with_other_settings_is_refused_by_name() {
    let (_server, js) = start().await;
    let name = bucket();
    let hour = Duration::from_secs(3600);
    KvStore::open(&js, KvStoreConfig::default().bucket(&name).retention(hour))
        .await
        .expect("create");

    let err = KvStore::open(
        &js,
        KvStoreConfig::default().bucket(&name).retention(2 * hour),
    )
    .await
    .expect_err("another retention");
    let message = err.to_string();
    assert!(
        matches!(
            err,
            StoreError::IncompatibleBucket {
                setting: "max_age (retention)",
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("3600s") && message.contains("7200s") && message.contains(&name),
        "{message}"
    );

    // A KV bucket with history kept is not a claim store either.
    let history = bucket();
    js.create_stream(stream::Config {
        name: format!("KV_{history}"),
        subjects: vec![format!("$KV.{history}.>")],
        max_messages_per_subject: 5,
        ..Default::default()
    })
    .await
    .expect("foreign bucket");
    let err = KvStore::open(
        &js,
        KvStoreConfig::default()
            .bucket(&history)
            .retention(Duration::ZERO.max(hour)),
    )
    .await
    .expect_err("history 5");
    assert!(
        matches!(
            err,
            StoreError::IncompatibleBucket {
                setting: "history",
                ..
            }
        ),
        "{err}"
    );

    let err = KvStore::open(&js, KvStoreConfig::default().bucket("no.dots"))
        .await
        .expect_err("bad name");
    assert!(matches!(err, StoreError::InvalidBucketName { .. }), "{err}");
    let err = KvStore::open(
        &js,
        KvStoreConfig::default()
            .bucket(bucket())
            .retention(Duration::from_millis(10)),
    )
    .await
    .expect_err("too short");
    assert!(matches!(err, StoreError::RetentionTooShort { .. }), "{err}");
}

/// Whether this server's compare-and-set on replicated streams can be
/// trusted: nats-server#4320 (two concurrent CAS writes both accepted) was
/// fixed in 2.9.21. Where it cannot, opening an R3 bucket must be refused.
fn replicated_cas_is_sound(cluster: &Cluster) -> bool {
    let v = cluster.nodes()[0].version();
    (v.major, v.minor, v.patch) >= (2, 9, 21)
}

/// On a server with nats-server#4320, asserts that the R3 bucket was refused
/// and returns `None`; elsewhere returns the opened store.
fn unless_refused<T: std::fmt::Debug>(
    cluster: &Cluster,
    opened: Result<T, StoreError>,
) -> Option<T> {
    if replicated_cas_is_sound(cluster) {
        return Some(opened.expect("R3 bucket"));
    }
    let err = opened.expect_err("an R3 bucket on a server with nats-server#4320 must be refused");
    assert!(matches!(err, StoreError::UnsupportedServer { .. }), "{err}");
    eprintln!(
        "nats-server {}: R3 claims are refused as they must be: {err}",
        cluster.nodes()[0].version()
    );
    None
}

#[tokio::test]
async fn conformance_on_an_r3_bucket_in_a_cluster() {
    let cluster = Cluster::start().await.expect("3-node cluster");
    let js = jetstream::new(cluster.connect().await.expect("connect"));
    if let Some(fixture) = unless_refused(&cluster, KvFixture::open(&js, 3).await) {
        conformance::run_all(&fixture).await;
    }
}

#[tokio::test]
async fn a_claim_made_before_the_leader_dies_is_seen_after() {
    let mut cluster = Cluster::start().await.expect("3-node cluster");
    let js = jetstream::new(cluster.connect().await.expect("connect"));
    let name = bucket();
    let opened = KvStore::open(&js, KvStoreConfig::default().bucket(&name).replicas(3)).await;
    let Some(a) = unless_refused(&cluster, opened) else {
        return;
    };
    let b = a.as_owner(Owner::random());
    let key = key("payment-3");
    let ClaimOutcome::Claimed(claim) = a.claim(&key, payload(), LEASE).await.expect("claim") else {
        panic!("fresh key");
    };

    let mut kv_stream = js
        .get_stream(format!("KV_{name}"))
        .await
        .expect("bucket stream");
    let leader = kv_stream
        .info()
        .await
        .expect("info")
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("an R3 stream has a leader");
    let index = cluster.index_of(&leader).expect("one of ours");
    cluster
        .node_mut(index)
        .expect("node")
        .kill()
        .expect("kill the bucket's leader");

    // The claim is still there and still fences: B waits, A completes.
    let seen = until_ok("inspect after failover", async || b.inspect(&key).await).await;
    let seen = seen.expect("the claim survived the leader");
    assert_eq!(
        (seen.record.owner, seen.revision),
        (a.owner(), claim.revision())
    );
    let outcome = until_ok("claim after failover", async || {
        b.claim(&key, payload(), LEASE).await
    })
    .await;
    assert!(
        matches!(outcome, ClaimOutcome::InFlight { .. }),
        "{outcome:?}"
    );
    let done = until_ok("complete after failover", async || {
        a.complete(&claim, None).await
    })
    .await;
    assert_eq!(done, Transition::Applied);
    let after = until_ok("claim after complete", async || {
        b.claim(&key, payload(), LEASE).await
    })
    .await;
    assert_eq!(after, ClaimOutcome::Duplicate { result: None });
}

/// Found by the fault suite: a worker whose client was still connecting
/// (`retry_on_initial_connect`) read an empty server version and refused
/// to start.
#[tokio::test]
async fn a_client_still_connecting_opens_the_store_once_connected() {
    let server = NatsServer::start().await.expect("nats-server");
    let proxy = Proxy::start(server.client_addr()).await.expect("proxy");
    proxy.refuse();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(proxy.url())
        .await
        .expect("connect returns at once");
    assert!(client.server_info().version.is_empty(), "not connected yet");
    let opening = tokio::spawn(async move {
        KvStore::open(&jetstream::new(client), KvStoreConfig::default()).await
    });
    sleep(Duration::from_millis(300)).await;
    proxy.open();
    let store = opening.await.expect("task").expect("opens once connected");
    let outcome = store
        .claim(&key("late"), payload(), Duration::from_secs(5))
        .await
        .expect("claim");
    assert!(matches!(outcome, ClaimOutcome::Claimed(_)), "{outcome:?}");
}

/// Which node holds each shard of `config`'s bucket (its stream's leader).
async fn shard_hosts(js: &jetstream::Context, config: &KvStoreConfig) -> Vec<String> {
    let mut hosts = Vec::new();
    for index in 0..config.shard_count() {
        let mut shard = js
            .get_stream(format!("KV_{}", config.shard_bucket(index)))
            .await
            .expect("a shard's stream");
        let info = shard.info().await.expect("shard info");
        let leader = info.cluster.clone().and_then(|c| c.leader);
        hosts.push(leader.expect("a clustered stream has a leader"));
    }
    hosts
}

#[tokio::test]
async fn conformance_on_a_sharded_bucket_in_a_cluster() {
    let cluster = Cluster::start().await.expect("3-node cluster");
    let js = jetstream::new(cluster.connect().await.expect("connect"));
    let fixture = KvFixture::open_sharded(&js, 1, 3)
        .await
        .expect("a bucket of 3 single-replica shards");
    conformance::run_all(&fixture).await;
}

#[tokio::test]
async fn a_lost_node_costs_only_its_shards_keys_and_never_a_wrong_answer() {
    let mut cluster = Cluster::start().await.expect("3-node cluster");
    let js = jetstream::new(cluster.connect().await.expect("connect"));
    let config = KvStoreConfig::default()
        .bucket(bucket())
        .shards(6)
        .shard_tags(["node:n0", "node:n1", "node:n2"])
        .op_timeout(Duration::from_secs(1));
    let a = KvStore::open(&js, config.clone())
        .await
        .expect("a bucket of 6 shards");
    let keys: Vec<RecordKey> = (0..60).map(|i| key(&format!("order-{i}"))).collect();
    for key in &keys {
        let ClaimOutcome::Claimed(claim) = a.claim(key, payload(), LEASE).await.expect("claim")
        else {
            panic!("fresh key {key:?}");
        };
        assert_eq!(
            a.complete(&claim, None).await.expect("complete"),
            Transition::Applied
        );
    }
    let hosts = shard_hosts(&js, &config).await;
    assert_eq!(
        hosts,
        ["n0", "n1", "n2", "n0", "n1", "n2"],
        "each shard on the node its tag names"
    );
    let lost = hosts[1].clone();
    let index = cluster.index_of(&lost).expect("one of ours");
    cluster
        .node_mut(index)
        .expect("node")
        .kill()
        .expect("kill a node holding shards");

    // Every key answers either as the duplicate it is, or not at all (its
    // shard is on the lost node: fail closed) — never as a fresh claim.
    let b = a.as_owner(Owner::random());
    let (mut answered, mut unavailable) = (0, 0);
    for key in &keys {
        match b.claim(key, payload(), LEASE).await {
            Ok(ClaimOutcome::Duplicate { .. }) => answered += 1,
            Err(StoreError::Unavailable { .. }) => unavailable += 1,
            Ok(other) => panic!("{key:?} after a node's loss: {other:?}"),
            Err(other) => panic!("{key:?}: {other}"),
        }
    }
    assert!(answered > 0, "the other nodes' shards kept answering");
    assert!(unavailable > 0, "the lost node's shards failed closed");

    cluster
        .node_mut(index)
        .expect("node")
        .restart()
        .await
        .expect("the node comes back");
    for key in &keys {
        let outcome = until_ok("claim after the node is back", async || {
            b.claim(key, payload(), LEASE).await
        })
        .await;
        assert_eq!(outcome, ClaimOutcome::Duplicate { result: None }, "{key:?}");
    }
}
