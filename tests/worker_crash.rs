//! Worker processes SIGKILLed at the worst moments. With `kv`, a worker
//! killed inside a handler holds its claim for one lease, then another worker
//! takes the message over. With `transactional`, a kill before the commit
//! leaves neither effect nor claim, and a kill after the commit but before
//! the ack leaves a redelivery that is answered as a duplicate. The effect
//! log (fsynced by the workers) shows every execution; the database shows
//! what was committed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::claim::ClaimState;
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::{DedupStore, KvStore, KvStoreConfig};
use idem::testing::NatsServer;
use tokio::time::{Instant, sleep};

/// A worker process, killed when the test ends however it ends.
struct Worker(Child);

impl Worker {
    fn spawn(url: &str, log: &std::path::Path, sleep_ms: u64) -> Self {
        Self::spawn_with(url, log, sleep_ms, &[])
    }

    fn spawn_with(url: &str, log: &std::path::Path, sleep_ms: u64, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
            .args([url, &log.display().to_string(), &sleep_ms.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the worker binary");
        Worker(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal the worker");
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.0.wait().expect("reap the worker");
        assert!(status.success(), "the worker exited with {status}");
    }

    fn kill(&mut self) {
        self.0.kill().expect("SIGKILL the worker");
        self.0.wait().expect("reap the worker");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_lines(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn until_logged(log: &std::path::Path, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log_lines(log).iter().any(|l| l == line) {
        assert!(
            Instant::now() < deadline,
            "`{line}` never logged; log: {:?}",
            log_lines(log)
        );
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_worker_killed_mid_handler_hands_over_after_its_lease() {
    let (server, js) = crash_stream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("effects.log");

    let mut first = Worker::spawn(&server.client_url(), &log, 60_000);
    js.publish("crash.orders", "\"order-1\"".into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    until_logged(&log, &format!("start order-1 {}", first.pid())).await;
    let killed_at = Instant::now();
    first.kill();

    let second = Worker::spawn(&server.client_url(), &log, 0);
    until_logged(&log, &format!("end order-1 {}", second.pid())).await;
    let took_over_after = killed_at.elapsed();

    let lines = log_lines(&log);
    assert_eq!(
        lines,
        vec![
            format!("start order-1 {}", first.pid()),
            format!("start order-1 {}", second.pid()),
            format!("end order-1 {}", second.pid())
        ],
        "the killed worker never finished; the second ran once"
    );
    assert!(
        took_over_after >= Duration::from_millis(1_500),
        "taken over after {took_over_after:?}, before the 2 s lease ran out"
    );

    let claims = KvStore::open(&js, KvStoreConfig::default())
        .await
        .expect("claims");
    let key = RecordKey::new(
        &HandlerName::new("crash_handler").expect("name"),
        &IdempotencyKey::new("order-1").expect("key"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let record = claims
            .inspect(&key)
            .await
            .expect("inspect")
            .expect("record");
        if record.record.state == ClaimState::Done {
            assert_eq!(
                record.record.attempt, 2,
                "claimed by the first worker, reclaimed by the second"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never completed: {record:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// A worker frozen (SIGSTOP) inside its handler, *before* its effect, past
/// its lease: another worker takes over and applies the effect. When the
/// frozen one wakes, it must find out that its lease ran out before its
/// handler goes on — and never apply the effect a second time.
#[tokio::test]
async fn a_worker_frozen_before_its_effect_never_applies_it_after_the_takeover() {
    use nix::sys::signal::Signal;
    let (server, js) = crash_stream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("effects.log");

    // 1.5 s of work inside a 2 s lease: the effect ("end") comes after it.
    let mut frozen = Worker::spawn(&server.client_url(), &log, 1_500);
    js.publish("crash.orders", "\"order-1\"".into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    until_logged(&log, &format!("start order-1 {}", frozen.pid())).await;
    frozen.signal(Signal::SIGSTOP);

    let second = Worker::spawn(&server.client_url(), &log, 0);
    until_logged(&log, &format!("end order-1 {}", second.pid())).await;
    // The frozen worker wakes with its handler's work long done, then stops.
    frozen.signal(Signal::SIGCONT);
    frozen.terminate();

    let ends: Vec<String> = log_lines(&log)
        .into_iter()
        .filter(|l| l.starts_with("end order-1"))
        .collect();
    assert_eq!(
        ends,
        vec![format!("end order-1 {}", second.pid())],
        "the effect ran once, by the worker that took over"
    );
}

/// A server with the stream the crash workers consume.
async fn crash_stream() -> (NatsServer, jetstream::Context) {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "CRASH".into(),
        subjects: vec!["crash.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    (server, js)
}

/// The crash stream, and the transactional worker's schema.
async fn transactional_setup() -> (NatsServer, jetstream::Context, idem::testing::TestDatabase) {
    let (server, js) = crash_stream().await;
    let db = idem::testing::TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    sqlx::query(&format!(
        "CREATE TABLE \"{}\".applied (transfer TEXT NOT NULL)",
        db.schema()
    ))
    .execute(db.pool())
    .await
    .expect("effect table");
    (server, js, db)
}

async fn committed(db: &idem::testing::TestDatabase, transfer: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".applied WHERE transfer = $1",
        db.schema()
    ))
    .bind(transfer)
    .fetch_one(db.pool())
    .await
    .expect("count")
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| idem::testing::DEFAULT_DATABASE_URL.to_owned())
}

#[tokio::test]
async fn a_transactional_worker_killed_before_commit_leaves_nothing_and_the_retry_applies_once() {
    let (server, js, db) = transactional_setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("effects.log");
    let url = database_url();
    let pg = ["pg", url.as_str(), db.schema()];

    let mut first = Worker::spawn_with(&server.client_url(), &log, 60_000, &pg);
    js.publish("crash.transfers", "\"tr-1\"".into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    until_logged(&log, &format!("start tr-1 {}", first.pid())).await;
    first.kill(); // the effect is written but not committed
    assert_eq!(
        committed(&db, "tr-1").await,
        0,
        "the connection died with the process: rolled back"
    );

    let second = Worker::spawn_with(&server.client_url(), &log, 0, &pg);
    until_logged(&log, &format!("end tr-1 {}", second.pid())).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed(&db, "tr-1").await == 0 {
        assert!(Instant::now() < deadline, "never committed");
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(committed(&db, "tr-1").await, 1, "applied exactly once");
}

#[tokio::test]
async fn a_transactional_worker_killed_after_commit_before_ack_causes_no_second_effect() {
    let (server, js, db) = transactional_setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("effects.log");
    let url = database_url();

    let mut first = Worker::spawn_with(
        &server.client_url(),
        &log,
        0,
        &["pg", url.as_str(), db.schema(), "lose-acks"],
    );
    js.publish("crash.transfers", "\"tr-2\"".into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed(&db, "tr-2").await == 0 {
        assert!(Instant::now() < deadline, "never committed");
        sleep(Duration::from_millis(20)).await;
    }
    first.kill(); // committed, never acknowledged

    // The broker redelivers after ack_wait (the 2 s lease) to the next worker.
    let second = Worker::spawn_with(
        &server.client_url(),
        &log,
        0,
        &["pg", url.as_str(), db.schema()],
    );
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("CRASH")
        .await
        .expect("stream")
        .get_consumer("tx_crash_handler")
        .await
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = consumer.info().await.expect("info").clone();
        // Delivered twice (the second time a redelivery), and acknowledged.
        if info.num_ack_pending == 0
            && info.num_pending == 0
            && info.delivered.consumer_sequence >= 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the redelivery was never answered: {info:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(committed(&db, "tr-2").await, 1, "no second effect");
    let starts = log_lines(&log)
        .iter()
        .filter(|l| l.starts_with("start tr-2"))
        .count();
    assert_eq!(
        starts, 1,
        "the redelivery was answered without running the handler"
    );
    drop(second);
}

/// A transactional worker frozen (SIGSTOP) inside its handler keeps its
/// connection and its uncommitted claim row. The server ends that idle
/// transaction after a lease, so another worker takes the key over —
/// safely: nothing of the frozen one's transaction committed, nor can it.
#[tokio::test]
async fn a_frozen_transactional_worker_blocks_its_key_for_one_lease_not_for_as_long_as_it_is_frozen()
 {
    use nix::sys::signal::Signal;
    let (server, js, db) = transactional_setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("effects.log");
    let url = database_url();
    let pg = ["pg", url.as_str(), db.schema()];

    let mut frozen = Worker::spawn_with(&server.client_url(), &log, 1_000, &pg);
    js.publish("crash.transfers", "\"tr-9\"".into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    until_logged(&log, &format!("start tr-9 {}", frozen.pid())).await;
    frozen.signal(Signal::SIGSTOP);

    // The frozen worker stays frozen until the other has applied the key.
    let second = Worker::spawn_with(&server.client_url(), &log, 0, &pg);
    until_logged(&log, &format!("end tr-9 {}", second.pid())).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed(&db, "tr-9").await == 0 {
        assert!(Instant::now() < deadline, "never committed");
        sleep(Duration::from_millis(20)).await;
    }
    frozen.signal(Signal::SIGCONT);
    frozen.terminate();
    assert_eq!(committed(&db, "tr-9").await, 1, "applied exactly once");
}
