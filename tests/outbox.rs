//! The durable outbox against a real server: a producer process killed with
//! messages on disk delivers each exactly once after restart; backpressure
//! when full; one outbox per file; bad input refused before it is stored.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::outbox::{Outbox, OutboxConfig, OutboxError, WhenFull};
use idem::publisher::{Outgoing, Publisher, PublisherConfig};
use idem::testing::NatsServer;
use tokio::time::{Instant, timeout};

async fn stream_on(server: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "OUTBOX".into(),
        subjects: vec!["outbox.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("stream");
    js
}

async fn stored(js: &jetstream::Context) -> u64 {
    js.get_stream("OUTBOX")
        .await
        .expect("stream")
        .cached_info()
        .state
        .messages
}

async fn publisher(server: &NatsServer) -> Publisher {
    let config = PublisherConfig {
        attempt_timeout: Duration::from_millis(300),
        ..PublisherConfig::default()
    };
    Publisher::with_config(server.connect().await.expect("connect"), config)
}

/// A producer process, killed when the test ends however it ends.
struct Producer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Producer {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem-test-producer"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the producer binary");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Producer {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line the producer prints (blocking: the producer answers fast).
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the producer's output");
        line.trim().to_owned()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_producer_killed_with_messages_in_its_outbox_delivers_each_once_after_restart() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = stream_on(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("producer.outbox");
    let (url, path) = (server.client_url(), file.display().to_string());

    let mut first = Producer::spawn(&[&url, &path, "enqueue", "500"]);
    assert_eq!(first.line(), "ready");
    // Freeze the broker: the relay's publishes hang, the outbox keeps them.
    server.pause().await.expect("SIGSTOP");
    writeln!(first.stdin, "go").expect("start enqueueing");
    assert_eq!(first.line(), "enqueued");
    first.child.kill().expect("SIGKILL the producer");
    first.child.wait().expect("reap");
    server.resume().await.expect("SIGCONT");

    let mut second = Producer::spawn(&[&url, &path, "drain"]);
    // All 500 were still on disk when the first producer died.
    assert_eq!(second.line(), "drained 500");
    assert_eq!(second.child.wait().expect("exit").code(), Some(0));
    assert_eq!(
        stored(&js).await,
        500,
        "each of the 500 messages stored exactly once"
    );
}

#[tokio::test]
async fn enqueue_is_durable_and_flush_waits_for_every_puback() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = stream_on(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(
        dir.path().join("o"),
        publisher(&server).await,
        OutboxConfig::default(),
    )
    .await
    .expect("open");
    for chunk in 0..10 {
        let messages = (0..100)
            .map(|i| Outgoing::new("outbox.orders", "x").with_id(format!("c{chunk}-{i}")))
            .collect();
        outbox.enqueue_all(messages).await.expect("enqueue");
    }
    let id = outbox
        .enqueue(Outgoing::new("outbox.orders", "last"))
        .await
        .expect("enqueue one");
    assert!(!id.is_empty());
    timeout(Duration::from_secs(30), outbox.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    let stats = outbox.stats().await.expect("stats");
    assert_eq!(
        (stats.pending, stats.sent, stats.failed, stats.oldest_age),
        (0, 1001, 0, None)
    );
    assert_eq!(stored(&js).await, 1001);
}

#[tokio::test]
async fn a_full_outbox_waits_or_refuses_as_configured() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = stream_on(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |when_full| OutboxConfig {
        capacity: 10,
        when_full,
        ..OutboxConfig::default()
    };
    let refusing = Outbox::open(
        dir.path().join("refuse"),
        publisher(&server).await,
        config(WhenFull::Reject),
    )
    .await
    .expect("open");
    let waiting = Outbox::open(
        dir.path().join("wait"),
        publisher(&server).await,
        config(WhenFull::Wait),
    )
    .await
    .expect("open");
    let ten = || {
        (0..10)
            .map(|i| Outgoing::new("outbox.orders", "x").with_id(format!("{i}")))
            .collect::<Vec<_>>()
    };

    server.pause().await.expect("SIGSTOP: nothing drains");
    refusing.enqueue_all(ten()).await.expect("ten fit");
    let err = refusing
        .enqueue(Outgoing::new("outbox.orders", "x"))
        .await
        .expect_err("the 11th");
    assert!(matches!(err, OutboxError::Full { capacity: 10 }), "{err}");
    assert!(matches!(
        refusing
            .enqueue_all((0..11).map(|_| Outgoing::new("outbox.o", "x")).collect())
            .await,
        Err(OutboxError::Full { .. })
    ));

    waiting.enqueue_all(ten()).await.expect("ten fit");
    let eleventh = waiting.enqueue(Outgoing::new("outbox.orders", "x").with_id("eleventh"));
    tokio::pin!(eleventh);
    assert!(
        timeout(Duration::from_millis(500), &mut eleventh)
            .await
            .is_err(),
        "backpressure: it waits"
    );
    server.resume().await.expect("SIGCONT");
    timeout(Duration::from_secs(30), eleventh)
        .await
        .expect("room made")
        .expect("enqueued");
    timeout(Duration::from_secs(30), waiting.flush())
        .await
        .expect("flushed")
        .expect("flush");
    timeout(Duration::from_secs(30), refusing.flush())
        .await
        .expect("flushed")
        .expect("flush");
    // Both outboxes used ids 0..9: the broker kept one copy of each.
    assert_eq!(stored(&js).await, 11);
}

#[tokio::test]
async fn an_outbox_file_opens_once_and_bad_input_is_never_stored() {
    let server = NatsServer::start().await.expect("nats-server");
    let _js = stream_on(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("one");
    let outbox = Outbox::open(&file, publisher(&server).await, OutboxConfig::default())
        .await
        .expect("open");
    let err = Outbox::open(&file, publisher(&server).await, OutboxConfig::default())
        .await
        .expect_err("second open");
    assert!(matches!(err, OutboxError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("one file per producer"), "{err}");

    let started = Instant::now();
    let err = outbox
        .enqueue(Outgoing::new("outbox.*", "x"))
        .await
        .expect_err("wildcard");
    assert!(matches!(err, OutboxError::InvalidSubject { .. }), "{err}");
    let err = outbox
        .enqueue(Outgoing::new("outbox.big", vec![0u8; 2 << 20]))
        .await
        .expect_err("too big");
    assert!(matches!(err, OutboxError::PayloadTooLarge { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        outbox.stats().await.expect("stats").pending,
        0,
        "nothing was stored"
    );
}

/// Opens `file`, waiting (bounded) for a previous handle's relay to let go.
async fn reopen(file: &std::path::Path, server: &NatsServer) -> Outbox {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Outbox::open(file, publisher(server).await, OutboxConfig::default()).await {
            Ok(outbox) => return outbox,
            Err(OutboxError::InUse { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

#[tokio::test]
async fn messages_refused_for_good_are_kept_across_restarts_and_never_overwritten() {
    let server = NatsServer::start().await.expect("nats-server");
    let _js = stream_on(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("refusals");
    for (run, subject) in ["nowhere.first", "nowhere.second"].into_iter().enumerate() {
        let outbox = reopen(&file, &server).await;
        // No stream captures `nowhere.>`: the broker refuses it for good.
        outbox
            .enqueue(Outgoing::new(subject, "x"))
            .await
            .expect("stored");
        timeout(Duration::from_secs(30), outbox.flush())
            .await
            .expect("flushed in time")
            .expect("flush");
        assert_eq!(
            outbox.stats().await.expect("stats").failed,
            run as u64 + 1,
            "run {run}: every refused message is still kept for inspection"
        );
        drop(outbox);
    }
    let outbox = reopen(&file, &server).await;
    assert_eq!(outbox.stats().await.expect("stats").failed, 2);
}
