//! A worker process SIGKILLed inside a handler: its claim outlives it by one
//! lease, then another worker takes the message over and completes it. The
//! effect log (fsynced by the workers) shows what really ran.

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
        let child = Command::new(env!("CARGO_BIN_EXE_idem-test-worker"))
            .args([url, &log.display().to_string(), &sleep_ms.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the worker binary");
        Worker(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
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
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "CRASH".into(),
        subjects: vec!["crash.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
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
