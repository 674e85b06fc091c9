//! The `idem` binary against a real server: dead letters listed, replayed
//! after the handler was fixed — applied once each — and a second replay
//! applying nothing; keys shown and forgotten; status per handler.

use std::collections::HashMap;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::consumer::Outcome;
use idem::testing::NatsServer;
use idem::{HandlerError, Json, Retry, Runtime, State, idempotent};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};

#[derive(Serialize, Deserialize)]
struct Order {
    id: String,
    /// Tells two payloads under one key apart.
    #[serde(default)]
    note: String,
}

fn order(id: &str, note: &str) -> Vec<u8> {
    serde_json::to_vec(&Order {
        id: id.into(),
        note: note.into(),
    })
    .expect("json")
}

/// Whether the handler is still broken, and what it did per key.
#[derive(Clone, Default)]
struct World {
    broken: Arc<AtomicBool>,
    effects: Arc<Mutex<HashMap<String, u32>>>,
}

impl World {
    fn effects(&self) -> HashMap<String, u32> {
        self.effects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[idempotent(stream = "ORDERS", subject = "orders.created", key = order.id, retry = Retry::none())]
async fn ship_order(
    Json(order): Json<Order>,
    State(world): State<World>,
) -> Result<(), HandlerError> {
    if world.broken.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent(
            "the warehouse API rejects the address format",
        ));
    }
    *world
        .effects
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(order.id)
        .or_default() += 1;
    Ok(())
}

/// A claim record's key.
fn record_key(handler: &str, key: &str) -> idem::key::RecordKey {
    idem::key::RecordKey::new(
        &idem::key::HandlerName::new(handler).expect("name"),
        &idem::key::IdempotencyKey::new(key).expect("key"),
    )
}

/// Runs `idem ARGS` against the test database's inbox.
fn idem_pg(db: &idem::testing::TestDatabase, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .args(["--postgres", db.url(), "--schema", db.schema()])
        .output()
        .expect("run the idem binary")
}

/// Runs `idem ARGS --server URL`.
fn idem(server: &NatsServer, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .args(["--server", &server.client_url()])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the idem binary")
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "idem failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn dead_letters_replayed_after_a_fix_apply_once_and_a_second_replay_applies_nothing() {
    const N: usize = 5;
    let shop = Shop::open().await;
    let (server, world, stats) = (&shop.server, &shop.world, &shop.stats);
    for i in 0..N {
        shop.publish(order(&format!("o-{i}"), ""), &[]).await;
    }
    shop.until_counted(Outcome::DeadLettered, N as u64).await;

    // Listed, with the reason and the error.
    let listed = json(&idem(
        server,
        &["dead", "list", "--json", "--handler", "ship_order"],
    ));
    let letters = listed.as_array().expect("a list");
    assert_eq!(letters.len(), N, "{listed}");
    for letter in letters {
        assert_eq!(letter["reason"], "handler_error");
        assert_eq!(letter["subject"], "orders.created");
        assert!(
            letter["error"]
                .as_str()
                .unwrap_or("")
                .contains("address format"),
            "{letter}"
        );
    }
    // The key is dead, and the CLI says so.
    let shown = json(&idem(
        server,
        &["keys", "show", "ship_order", "o-0", "--json"],
    ));
    assert_eq!(shown["state"], "dead", "{shown}");
    // A filter that matches nothing lists nothing.
    let none = json(&idem(
        server,
        &["dead", "list", "--json", "--reason", "decode"],
    ));
    assert_eq!(none.as_array().map(Vec::len), Some(0));

    // The handler is fixed; the dead letters are replayed.
    world.broken.store(false, Ordering::SeqCst);
    let replayed = json(&idem(server, &["dead", "replay", "--yes", "--json"]));
    let report = replayed.as_array().expect("a report");
    assert_eq!(report.len(), N, "{replayed}");
    assert!(
        report.iter().all(|r| r["outcome"] == "republished"),
        "{replayed}"
    );
    until("every replay applied", || world.effects().len() == N).await;
    until("every replay counted", || {
        stats.handler("ship_order").get(Outcome::Processed) == N as u64
    })
    .await;

    // A second replay finds nothing to do.
    let again = json(&idem(server, &["dead", "replay", "--yes", "--json"]));
    assert_eq!(again.as_array().map(Vec::len), Some(0), "{again}");
    let left = json(&idem(server, &["dead", "list", "--json"]));
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left}");
    // Each key applied once, and is done.
    assert!(
        world.effects().values().all(|&runs| runs == 1),
        "{:?}",
        world.effects()
    );
    let shown = json(&idem(
        server,
        &["keys", "show", "ship_order", "o-0", "--json"],
    ));
    assert_eq!(shown["state"], "done", "{shown}");

    // Status: the handler's consumer is drained.
    let status = json(&idem(server, &["status", "--json"]));
    let handlers = status["handlers"].as_array().expect("handlers");
    let ship = handlers
        .iter()
        .find(|h| h["handler"] == "ship_order")
        .unwrap_or_else(|| panic!("ship_order in {status}"));
    assert_eq!(ship["stream"], "ORDERS");
    assert_eq!(ship["pending"], 0);
}

#[tokio::test]
async fn keys_forget_asks_first_and_exit_codes_tell_scripts_what_happened() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    let store = idem::store::KvStore::open(&js, idem::store::KvStoreConfig::default())
        .await
        .expect("bucket");
    let key = record_key("ship_order", "o-7");
    let claimed = idem::store::DedupStore::claim(&store, &key, None, Duration::from_secs(30))
        .await
        .expect("claim");
    let idem::claim::ClaimOutcome::Claimed(claim) = claimed else {
        panic!("a fresh key is free: {claimed:?}");
    };
    idem::store::DedupStore::complete(&store, &claim, Some("shipped".into()))
        .await
        .expect("complete");

    let shown = json(&idem(
        &server,
        &["keys", "show", "ship_order", "o-7", "--json"],
    ));
    assert_eq!(shown["state"], "done");
    assert_eq!(shown["result"], "shipped");
    assert_eq!(shown["attempts"], 1);
    // Without --yes, and no "y" on standard input: nothing changes, exit 4.
    let refused = idem(&server, &["keys", "forget", "ship_order", "o-7"]);
    assert_eq!(
        refused.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        json(&idem(
            &server,
            &["keys", "show", "ship_order", "o-7", "--json"]
        ))["state"],
        "done"
    );
    // With --yes it is gone: show exits 3 (not found).
    let forgot = idem(&server, &["keys", "forget", "ship_order", "o-7", "--yes"]);
    assert!(
        forgot.status.success(),
        "{}",
        String::from_utf8_lossy(&forgot.stderr)
    );
    let gone = idem(&server, &["keys", "show", "ship_order", "o-7"]);
    assert_eq!(
        gone.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    // A reason that does not exist is bad usage (2), and names the reasons.
    let bad = idem(&server, &["dead", "list", "--reason", "oops"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("retries_exhausted"));
}

#[tokio::test]
async fn provision_creates_the_shared_pieces_once_and_checks_them_after() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    let made = json(&idem(
        &server,
        &["provision", "--retention", "2d", "--json"],
    ));
    assert_eq!(made["bucket"], "idem_claims");
    js.get_stream(idem::consumer::DEAD_LETTER_STREAM)
        .await
        .expect("the dead-letter stream");
    let bucket = idem::store::KvStore::open_existing(&js, "idem_claims")
        .await
        .expect("read")
        .expect("the bucket");
    assert_eq!(bucket.map().shard_count(), 1);
    // Again: checked, not changed.
    json(&idem(
        &server,
        &["provision", "--retention", "2d", "--json"],
    ));
    // Another retention than the bucket has is refused, naming the setting.
    let refused = idem(&server, &["provision", "--retention", "3d"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("max_age"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// A server with a system account (`sys`/`sys`) beside the application's,
/// whose user the harness and the tool connect as; `jetstream` is added to
/// the server's JetStream block.
fn with_system_account(jetstream: &str) -> String {
    format!(
        r#"
        accounts {{
            SYS {{ users: [ {{ user: sys, password: sys }} ] }}
            APP {{ jetstream: enabled, users: [ {{ user: app, password: app }} ] }}
        }}
        system_account: SYS
        no_auth_user: app
        jetstream {{ {jetstream} }}
        "#
    )
}

/// A server as [`with_system_account`] makes it, provisioned, with the
/// handlers' stream `ORDERS` stored as `storage`.
async fn provisioned_with_orders(jetstream: &str, storage: stream::StorageType) -> NatsServer {
    let server = NatsServer::start_configured(&with_system_account(jetstream))
        .await
        .expect("nats-server");
    json(&idem(
        &server,
        &["provision", "--retention", "2d", "--json"],
    ));
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        storage,
        ..Default::default()
    })
    .await
    .expect("the handlers' stream");
    server
}

/// `idem provision --check` on `server` (its `ORDERS` stream too, its
/// servers read as `sys`): the exit code and the (subject, setting) pairs
/// it found.
fn provision_check(server: &NatsServer) -> (Option<i32>, Vec<(String, String)>, serde_json::Value) {
    let system = format!("nats://sys:sys@127.0.0.1:{}", server.port());
    let checked = idem(
        server,
        &[
            "provision",
            "--check",
            "--stream",
            "ORDERS",
            "--system-url",
            &system,
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}",
            String::from_utf8_lossy(&checked.stderr)
        )
    });
    let findings = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            (
                f["subject"].as_str().unwrap_or_default().to_owned(),
                f["setting"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    (checked.status.code(), findings, report)
}

#[tokio::test]
async fn provision_check_names_single_replicas_memory_storage_and_a_server_that_syncs_every_two_minutes()
 {
    let server = provisioned_with_orders("", stream::StorageType::Memory).await;
    let (code, findings, report) = provision_check(&server);
    assert_eq!(code, Some(6), "{report}");
    for expected in [
        ("stream KV_idem_claims", "replicas: 1"),
        ("stream ORDERS", "storage: memory"),
        ("stream ORDERS", "replicas: 1"),
    ] {
        assert!(
            findings
                .iter()
                .any(|(subject, setting)| (subject.as_str(), setting.as_str()) == expected),
            "{expected:?} not in {findings:?}"
        );
    }
    // 2.10 and newer report their interval (2 minutes by default); 2.9
    // reports none, and is taken at its default.
    let expected = if sync_is_configurable() {
        "sync_interval: 2m"
    } else {
        "sync_interval: default"
    };
    assert!(
        findings
            .iter()
            .any(|(subject, setting)| subject.starts_with("server ") && setting == expected),
        "the server's sync interval ({expected}) not found: {findings:?}"
    );
    let dead = format!("stream {}", idem::consumer::DEAD_LETTER_STREAM);
    assert!(
        findings.iter().any(|(subject, _)| *subject == dead),
        "{findings:?}"
    );
}

/// Whether the servers under test take `jetstream { sync_interval }` (2.10
/// and newer; 2.9 refuses the field).
fn sync_is_configurable() -> bool {
    idem::testing::NatsBinary::locate()
        .expect("a nats-server binary")
        .is_at_least(2, 10)
}

#[tokio::test]
async fn provision_check_finds_nothing_about_a_server_that_syncs_every_write() {
    if !sync_is_configurable() {
        // Such a server cannot be told to: the check must still name its
        // sync setting (as the other provision_check test asserts).
        let server = provisioned_with_orders("", stream::StorageType::File).await;
        let (_, findings, _) = provision_check(&server);
        assert!(
            findings
                .iter()
                .any(|(subject, setting)| subject.starts_with("server ")
                    && setting == "sync_interval: default"),
            "{findings:?}"
        );
        eprintln!("this nats-server cannot sync every write; its default was named instead");
        return;
    }
    let server = provisioned_with_orders("sync_interval: always", stream::StorageType::File).await;
    let (_, findings, report) = provision_check(&server);
    assert!(
        report["checked"]
            .as_array()
            .expect("checked")
            .iter()
            .any(|c| c.as_str().is_some_and(|c| c.starts_with("server "))),
        "the server was not read: {report}"
    );
    assert!(
        !findings
            .iter()
            .any(|(subject, _)| subject.starts_with("server ")),
        "{findings:?}"
    );
    // A single node cannot replicate: its streams are still named.
    assert!(
        findings.iter().all(|(_, setting)| setting == "replicas: 1"),
        "{findings:?}"
    );
}

#[tokio::test]
async fn a_transactional_key_is_shown_from_the_inbox_and_purged_when_old() {
    use idem::store::{DedupStore, PgStore};
    let db = idem::testing::TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    let inbox = PgStore::open(db.pool().clone(), db.schema(), Duration::from_secs(3600))
        .await
        .expect("inbox");
    let key = record_key("apply_transfer", "tr-1");
    let idem::claim::ClaimOutcome::Claimed(claim) = inbox
        .claim(&key, None, Duration::from_secs(30))
        .await
        .expect("claim")
    else {
        panic!("a fresh key is free");
    };
    inbox
        .complete(&claim, Some("applied".into()))
        .await
        .expect("complete");
    let pg = |args: &[&str]| idem_pg(&db, args);
    let shown = json(&pg(&[
        "keys",
        "show",
        "apply_transfer",
        "tr-1",
        "--transactional",
        "--json",
    ]));
    assert_eq!(shown["state"], "done", "{shown}");
    assert_eq!(shown["result"], "applied");
    // Completed keys older than the retention go; this one is older than 1 ms
    // once 1 ms has passed on the database's clock.
    sleep(Duration::from_millis(5)).await;
    let purged = json(&pg(&[
        "inbox",
        "purge",
        "--older-than",
        "1ms",
        "--yes",
        "--json",
    ]));
    assert_eq!(purged["rows"], 1, "{purged}");
    let gone = pg(&["keys", "show", "apply_transfer", "tr-1", "--transactional"]);
    assert_eq!(
        gone.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
}

/// A server, the ORDERS stream and a running `ship_order` runtime (broken
/// until the world says otherwise).
struct Shop {
    server: NatsServer,
    js: jetstream::Context,
    world: World,
    stats: idem::consumer::Stats,
    running: tokio::task::JoinHandle<Result<(), idem::consumer::RuntimeError>>,
}

impl Shop {
    async fn open() -> Self {
        let server = NatsServer::start().await.expect("nats-server");
        let client = server.connect().await.expect("connect");
        let js = jetstream::new(client.clone());
        js.create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
        let world = World::default();
        world.broken.store(true, Ordering::SeqCst);
        let runtime = Runtime::builder(client)
            .state(world.clone())
            .handler(ship_order)
            .shutdown_on(std::future::pending())
            .build()
            .await
            .expect("runtime");
        let stats = runtime.stats();
        let running = tokio::spawn(runtime.run());
        Self {
            server,
            js,
            world,
            stats,
            running,
        }
    }

    async fn publish(&self, payload: Vec<u8>, headers: &[(&str, &str)]) {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        self.js
            .publish_with_headers("orders.created", map, payload.into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }

    fn count(&self, outcome: Outcome) -> u64 {
        self.stats.handler("ship_order").get(outcome)
    }

    async fn until_counted(&self, outcome: Outcome, n: u64) {
        until(&format!("{outcome:?} counted {n} times"), || {
            self.count(outcome) == n
        })
        .await;
    }

    fn idem(&self, args: &[&str]) -> Output {
        idem(&self.server, args)
    }

    fn letters(&self) -> Vec<serde_json::Value> {
        json(&self.idem(&["dead", "list", "--json"]))
            .as_array()
            .cloned()
            .expect("a list")
    }

    fn effects_of(&self, id: &str) -> u32 {
        self.world.effects().get(id).copied().unwrap_or(0)
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.running.abort();
    }
}

#[tokio::test]
async fn a_letter_whose_key_another_payload_completed_after_a_forget_is_kept_not_deleted() {
    let shop = Shop::open().await;
    // X is dead-lettered; an operator forgets its key; Y reuses the key
    // and completes.
    shop.publish(order("o-1", "x"), &[]).await;
    shop.until_counted(Outcome::DeadLettered, 1).await;
    let forgot = shop.idem(&["keys", "forget", "ship_order", "o-1", "--yes"]);
    assert!(forgot.status.success(), "{forgot:?}");
    shop.world.broken.store(false, Ordering::SeqCst);
    shop.publish(order("o-1", "y"), &[]).await;
    shop.until_counted(Outcome::Processed, 1).await;
    assert_eq!(shop.effects_of("o-1"), 1);

    // Replaying X must not take Y's completion for X's.
    let replayed = json(&shop.idem(&["dead", "replay", "--yes", "--json"]));
    assert_eq!(replayed[0]["outcome"], "conflict", "{replayed}");
    assert_eq!(shop.letters().len(), 1, "X's letter is kept");
    assert_eq!(shop.effects_of("o-1"), 1, "and X was not applied");
}

#[tokio::test]
async fn a_producers_idem_headers_never_steer_a_replay() {
    let shop = Shop::open().await;
    // A victim's payload is dead-lettered: its key is dead.
    shop.publish(order("v-1", "victim"), &[]).await;
    shop.until_counted(Outcome::DeadLettered, 1).await;
    // A producer sends undecodable bytes naming the victim's record.
    let victim = record_key("ship_order", "v-1");
    shop.publish(
        b"not an order".to_vec(),
        &[
            ("Idem-Key", victim.as_str()),
            ("Idem-Store", "kv:idem_claims"),
            ("Idem-Fingerprint", "00000000000000000000000000000000"),
        ],
    )
    .await;
    shop.until_counted(Outcome::DeadLettered, 2).await;
    let letters = shop.letters();
    let forged = letters
        .iter()
        .find(|l| l["reason"] == "decode")
        .unwrap_or_else(|| panic!("a decode letter in {letters:?}"));
    assert!(forged["record_key"].is_null(), "{forged}");
    assert!(forged["store"].is_null(), "{forged}");
    // Replaying the forged letter leaves the victim's record alone.
    let replayed = json(&shop.idem(&["dead", "replay", "--reason", "decode", "--yes", "--json"]));
    assert_eq!(replayed[0]["outcome"], "republished", "{replayed}");
    let shown = json(&shop.idem(&["keys", "show", "ship_order", "v-1", "--json"]));
    assert_eq!(shown["state"], "dead", "{shown}");
}

#[tokio::test]
async fn forgetting_a_pending_key_is_refused_unless_forced() {
    let shop = Shop::open().await;
    let store = idem::store::KvStore::open(&shop.js, idem::store::KvStoreConfig::default())
        .await
        .expect("bucket");
    let key = record_key("ship_order", "p-1");
    let claimed = idem::store::DedupStore::claim(&store, &key, None, Duration::from_secs(30))
        .await
        .expect("claim");
    assert!(matches!(claimed, idem::claim::ClaimOutcome::Claimed(_)));
    let refused = shop.idem(&["keys", "forget", "ship_order", "p-1", "--yes"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("--force") && stderr.contains("twice"),
        "{stderr}"
    );
    let shown = json(&shop.idem(&["keys", "show", "ship_order", "p-1", "--json"]));
    assert_eq!(shown["state"], "pending");
    let forced = shop.idem(&["keys", "forget", "ship_order", "p-1", "--yes", "--force"]);
    assert!(forced.status.success(), "{forced:?}");
    let gone = shop.idem(&["keys", "show", "ship_order", "p-1"]);
    assert_eq!(gone.status.code(), Some(3));
}

#[tokio::test]
async fn two_replays_at_once_apply_each_letter_once_and_both_succeed() {
    const N: usize = 30;
    let shop = Shop::open().await;
    for i in 0..N {
        shop.publish(order(&format!("c-{i}"), ""), &[]).await;
    }
    shop.until_counted(Outcome::DeadLettered, N as u64).await;
    shop.world.broken.store(false, Ordering::SeqCst);
    let replay = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["dead", "replay", "--yes", "--json"])
            .args(["--server", &shop.server.client_url()])
            .env_remove("DATABASE_URL")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run the idem binary")
    };
    let (a, b) = (replay(), replay());
    let (a, b) = (
        a.wait_with_output().expect("replay a"),
        b.wait_with_output().expect("replay b"),
    );
    for (name, output) in [("a", &a), ("b", &b)] {
        assert!(
            output.status.success(),
            "replay {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    shop.until_counted(Outcome::Processed, N as u64).await;
    until("every letter applied", || shop.world.effects().len() == N).await;
    assert!(
        shop.world.effects().values().all(|&runs| runs == 1),
        "{:?}",
        shop.world.effects()
    );
    assert_eq!(shop.letters().len(), 0);
}

#[tokio::test]
async fn a_letter_of_a_recreated_dead_letter_stream_is_replayed_not_dropped_as_a_duplicate() {
    let shop = Shop::open().await;
    shop.publish(order("r-1", ""), &[]).await;
    shop.until_counted(Outcome::DeadLettered, 1).await;
    shop.world.broken.store(false, Ordering::SeqCst);
    let first = json(&shop.idem(&["dead", "replay", "--yes", "--json"]));
    assert_eq!(first[0]["outcome"], "republished", "{first}");
    shop.until_counted(Outcome::Processed, 1).await;
    // The dead-letter stream is recreated: its next letter is number 1
    // again, within ORDERS' duplicate window.
    let config = shop
        .js
        .get_stream(idem::consumer::DEAD_LETTER_STREAM)
        .await
        .expect("dead-letter stream")
        .cached_info()
        .config
        .clone();
    shop.js
        .delete_stream(idem::consumer::DEAD_LETTER_STREAM)
        .await
        .expect("delete");
    shop.js.create_stream(config).await.expect("recreate");
    shop.world.broken.store(true, Ordering::SeqCst);
    shop.publish(order("r-2", ""), &[]).await;
    shop.until_counted(Outcome::DeadLettered, 2).await;
    assert_eq!(shop.letters()[0]["sequence"], 1);
    shop.world.broken.store(false, Ordering::SeqCst);
    let second = json(&shop.idem(&["dead", "replay", "--yes", "--json"]));
    assert_eq!(second[0]["outcome"], "republished", "{second}");
    shop.until_counted(Outcome::Processed, 2).await;
    assert_eq!(shop.effects_of("r-2"), 1, "the second letter was applied");
}

#[tokio::test]
async fn an_inbox_row_older_than_seven_days_is_seen_and_kept_for_its_handlers_retention() {
    use idem::store::{DedupStore, PgStore};
    const DAY: Duration = Duration::from_secs(86_400);
    let db = idem::testing::TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    // A transactional handler that keeps its keys for 30 days.
    let inbox = PgStore::open(db.pool().clone(), db.schema(), 30 * DAY)
        .await
        .expect("inbox");
    PgStore::register_retention(db.pool(), db.schema(), "apply_transfer", 30 * DAY)
        .await
        .expect("register");
    let key = record_key("apply_transfer", "tr-old");
    let idem::claim::ClaimOutcome::Claimed(claim) = inbox
        .claim(&key, None, Duration::from_secs(30))
        .await
        .expect("claim")
    else {
        panic!("a fresh key is free");
    };
    inbox.mark_dead(&claim).await.expect("mark dead");
    // Eight days pass.
    sqlx::query(&format!(
        "UPDATE \"{}\".idem_inbox SET updated_at = updated_at - $1",
        db.schema()
    ))
    .bind(i64::try_from((8 * DAY).as_millis()).expect("ms"))
    .execute(db.pool())
    .await
    .expect("age the row");
    let pg = |args: &[&str]| idem_pg(&db, args);
    let show = [
        "keys",
        "show",
        "apply_transfer",
        "tr-old",
        "--transactional",
        "--json",
    ];
    // The CLI sees the row as the handler does.
    assert_eq!(json(&pg(&show))["state"], "dead");
    // A purge by each handler's retention keeps it; a shorter age is refused.
    let purged = json(&pg(&["inbox", "purge", "--yes", "--json"]));
    assert_eq!(purged["rows"], 0, "{purged}");
    let refused = pg(&["inbox", "purge", "--older-than", "7d", "--yes"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("apply_transfer") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(json(&pg(&show))["state"], "dead", "still there");
}

/// Found by the model checker (checker/): a replay that read the letter's
/// own payload `pending` — its worker between storing this letter and
/// marking the key dead — republished and deleted the letter; the dead mark
/// then answered the copy unrun.
#[tokio::test]
async fn a_letter_whose_payload_a_worker_still_holds_is_kept_for_a_later_replay() {
    use idem::store::DedupStore;
    let shop = Shop::open().await;
    let x = order("h-1", "x");
    shop.publish(x.clone(), &[]).await;
    shop.until_counted(Outcome::DeadLettered, 1).await;
    // A worker holds X's key again (as one does between a dead letter's
    // PubAck and its dead mark).
    let store = idem::store::KvStore::open(&shop.js, idem::store::KvStoreConfig::default())
        .await
        .expect("bucket");
    let key = record_key("ship_order", "h-1");
    let dead = store.inspect(&key).await.expect("read").expect("dead");
    let fingerprint = Some(idem::fingerprint::Fingerprint::of(&x));
    store
        .reopen(&key, Some(&dead), fingerprint)
        .await
        .expect("reopen");
    let held = store
        .claim(&key, fingerprint, Duration::from_secs(30))
        .await
        .expect("claim");
    assert!(
        matches!(held, idem::claim::ClaimOutcome::Claimed(_)),
        "{held:?}"
    );

    let replayed = json(&shop.idem(&["dead", "replay", "--yes", "--json"]));
    assert_eq!(replayed[0]["outcome"], "in_flight", "{replayed}");
    assert_eq!(shop.letters().len(), 1, "the letter is kept");
}

/// Found by review: a transactional worker's claim is invisible to other
/// sessions until it commits, so a replay read no record while the worker
/// — its letter stored, the PubAck not yet back — still held the row; it
/// republished and deleted the letter, the worker then committed the dead
/// mark, and the copy was acknowledged unrun. The replay's write must wait
/// for the worker's commit and decide again on what it committed.
#[tokio::test]
async fn a_replay_waits_for_a_transactional_workers_uncommitted_claim() {
    use idem::store::DedupStore;
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: idem::consumer::DEAD_LETTER_STREAM.into(),
        subjects: vec![idem::consumer::DEAD_LETTER_SUBJECTS.into()],
        ..Default::default()
    })
    .await
    .expect("the dead-letter stream");
    js.create_stream(stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    let db = idem::testing::TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    let inbox =
        idem::store::PgStore::open(db.pool().clone(), db.schema(), Duration::from_secs(3600))
            .await
            .expect("inbox");
    let key = record_key("book_order", "b-1");
    let payload = order("b-1", "");
    let fingerprint = idem::fingerprint::Fingerprint::of(&payload);
    // The worker: its claim row, not yet committed …
    let mut worker = db.pool().begin().await.expect("begin");
    sqlx::query(&format!(
        "INSERT INTO \"{}\".idem_inbox (handler, key, state, owner, attempt, fingerprint, created_at, updated_at) \
         VALUES ('book_order', 'k.b-1', 'done', gen_random_uuid(), 1, $1, 0, 0)",
        db.schema()
    ))
    .bind(fingerprint.as_bytes().to_vec())
    .execute(&mut *worker)
    .await
    .expect("the worker's claim");
    // … and its dead letter, stored.
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        (idem::consumer::headers::HANDLER, "book_order".to_owned()),
        (idem::consumer::headers::REASON, "handler_error".to_owned()),
        (idem::consumer::headers::SUBJECT, "orders.booked".to_owned()),
        (idem::consumer::headers::KEY, key.as_str().to_owned()),
        (
            idem::consumer::headers::STORE,
            format!("postgres:{}", db.schema()),
        ),
        (
            idem::consumer::headers::FINGERPRINT,
            fingerprint.to_string(),
        ),
    ] {
        headers.insert(name, value.as_str());
    }
    js.publish_with_headers("idem.dead.book_order", headers, payload.into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    let replay = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["dead", "replay", "--yes", "--json"])
        .args(["--server", &server.client_url()])
        .args(["--postgres", db.url(), "--schema", db.schema()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the idem binary");
    // The worker marks the key dead and commits while the replay runs.
    sleep(Duration::from_secs(1)).await;
    sqlx::query(&format!(
        "UPDATE \"{}\".idem_inbox SET state = 'dead', revision = nextval('\"{}\".idem_inbox_revision') \
         WHERE handler = 'book_order' AND key = 'k.b-1'",
        db.schema(),
        db.schema()
    ))
    .execute(&mut *worker)
    .await
    .expect("the dead mark");
    worker.commit().await.expect("commit");
    let replayed = replay.wait_with_output().expect("replay");
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&replayed.stdout).expect("json");
    assert_eq!(report[0]["outcome"], "republished", "{report}");
    // The copy must find the key runnable for its payload, not dead.
    let record = inbox.inspect(&key).await.expect("read").expect("a record");
    assert_eq!(
        record.record.state,
        idem::claim::ClaimState::Released,
        "the replay republished onto a dead key: its copy would be acknowledged unrun"
    );
}
