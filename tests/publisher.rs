//! The producer side against real servers: lost PubAcks, a server killed
//! mid-burst, the duplicate-window check, and bad input — counted in what
//! the stream holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use idem::publisher::{Outgoing, PublishError, Publisher, PublisherConfig};
use idem::testing::NatsServer;
use tokio::time::{Instant, sleep};

async fn stream_on(server: &NatsServer, duplicate_window: Duration) -> jetstream::Context {
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["events.>".into()],
        duplicate_window,
        ..Default::default()
    })
    .await
    .expect("stream");
    js
}

async fn stored(js: &jetstream::Context) -> stream::State {
    js.get_stream("EVENTS")
        .await
        .expect("stream")
        .cached_info()
        .state
        .clone()
}

fn quick() -> PublisherConfig {
    PublisherConfig {
        attempt_timeout: Duration::from_millis(500),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(500),
        deadline: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn a_lost_puback_is_resent_with_the_same_id_and_stored_once() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = stream_on(&server, Duration::from_secs(120)).await;
    let publisher = Publisher::with_config(server.connect().await.expect("connect"), quick());
    // Learn the subject's stream first, so that the frozen server only swallows the publish.
    publisher
        .publish("events.paid", "warm-up")
        .await
        .expect("warm-up");

    server.pause().await.expect("SIGSTOP");
    let sending = tokio::spawn({
        let publisher = publisher.clone();
        async move {
            publisher
                .send(Outgoing::new("events.paid", "once").with_id("pay-1"))
                .await
        }
    });
    // Long enough for at least two attempts to time out unanswered.
    sleep(Duration::from_millis(1_500)).await;
    server.resume().await.expect("SIGCONT");

    let confirmed = sending
        .await
        .expect("task")
        .expect("confirmed after resume");
    assert!(
        confirmed.attempts >= 2,
        "the PubAck was lost, so it was resent: {confirmed:?}"
    );
    assert_eq!(confirmed.message_id, "pay-1");
    assert_eq!(
        stored(&js).await.messages,
        2,
        "the warm-up and one copy of pay-1"
    );
}

#[tokio::test]
async fn a_server_killed_mid_burst_loses_and_doubles_nothing() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let js = stream_on(&server, Duration::from_secs(120)).await;
    let publisher = Publisher::with_config(server.connect().await.expect("connect"), quick());
    let total = 10_000;
    let confirmed = Arc::new(AtomicUsize::new(0));
    let messages = (0..total)
        .map(|i| Outgoing::new("events.burst", format!("{i}")).with_id(format!("burst-{i}")));
    let burst = tokio::spawn({
        let confirmed = confirmed.clone();
        let results = publisher.publish_all(futures::stream::iter(messages), 256);
        async move {
            results
                .map(|r| {
                    confirmed.fetch_add(1, Ordering::Relaxed);
                    r
                })
                .collect::<Vec<_>>()
                .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while confirmed.load(Ordering::Relaxed) < 2_000 {
        assert!(Instant::now() < deadline, "the burst never got going");
        sleep(Duration::from_millis(5)).await;
    }
    server.kill().expect("SIGKILL mid-burst");
    server.restart().await.expect("restart");

    let results = burst.await.expect("task");
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "every message confirmed: {failures:?}");
    let state = stored(&js).await;
    assert_eq!(
        state.messages, total as u64,
        "each message stored exactly once"
    );
    assert_eq!(
        (state.first_sequence, state.last_sequence),
        (1, total as u64),
        "no gaps, no extra copies"
    );
}

#[tokio::test]
async fn a_duplicate_window_shorter_than_the_retry_horizon_is_refused() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = stream_on(&server, Duration::from_secs(30)).await;
    let publisher = Publisher::with_config(server.connect().await.expect("connect"), quick());
    let err = publisher
        .publish("events.x", "x")
        .await
        .expect_err("window too short");
    let message = err.to_string();
    assert!(
        matches!(err, PublishError::DuplicateWindowTooShort { .. }),
        "{message}"
    );
    assert!(
        message.contains("30s") && message.contains("60s") && message.contains("EVENTS"),
        "{message}"
    );
    assert_eq!(stored(&js).await.messages, 0, "nothing was sent");
}

/// Whether an error is the one a case expects.
type IsExpected = fn(&PublishError) -> bool;

#[tokio::test]
async fn bad_input_fails_at_once() {
    let server = NatsServer::start().await.expect("nats-server");
    let _js = stream_on(&server, Duration::from_secs(120)).await;
    let publisher = Publisher::with_config(server.connect().await.expect("connect"), quick());
    let too_big = vec![b'x'; 2 * 1024 * 1024];
    let cases: Vec<(Outgoing, IsExpected)> = vec![
        (Outgoing::new("", "x"), |e| {
            matches!(e, PublishError::InvalidSubject { .. })
        }),
        (Outgoing::new("events.*", "x"), |e| {
            matches!(e, PublishError::InvalidSubject { .. })
        }),
        (Outgoing::new("events. x", "x"), |e| {
            matches!(e, PublishError::InvalidSubject { .. })
        }),
        (Outgoing::new("events.big", too_big), |e| {
            matches!(e, PublishError::PayloadTooLarge { .. })
        }),
        (Outgoing::new("nowhere.x", "x"), |e| {
            matches!(e, PublishError::NoStream { .. })
        }),
    ];
    for (message, expected) in cases {
        let subject = message.subject().to_owned();
        let started = Instant::now();
        let err = publisher.send(message).await.expect_err("bad input");
        assert!(expected(&err), "{subject:?}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{subject:?} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_is_resent_to_until_the_deadline_then_named() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let _js = stream_on(&server, Duration::from_secs(120)).await;
    let config = PublisherConfig {
        deadline: Duration::from_millis(1_500),
        ..quick()
    };
    let publisher = Publisher::with_config(server.connect().await.expect("connect"), config);
    publisher
        .publish("events.warmup", "w")
        .await
        .expect("warm-up");
    server.kill().expect("SIGKILL");
    let started = Instant::now();
    let err = publisher
        .send(Outgoing::new("events.lost", "x").with_id("lost-1"))
        .await
        .expect_err("down");
    let waited = started.elapsed();
    match &err {
        PublishError::DeadlineExceeded {
            message_id,
            attempts,
            ..
        } => {
            assert_eq!(message_id, "lost-1");
            assert!(*attempts >= 2, "{err}");
        }
        other => panic!("expected DeadlineExceeded, got {other}"),
    }
    assert!(
        waited < Duration::from_millis(2_500),
        "gave up after {waited:?}, deadline 1.5 s"
    );
    assert!(err.to_string().contains("same Nats-Msg-Id"), "{err}");
    assert!(
        err.to_string().contains("outcome unknown"),
        "a message not confirmed may still be stored: {err}"
    );
}

/// How many messages of `subject` the stream holds.
async fn stored_on(js: &jetstream::Context, subject: &str) -> usize {
    let mut stream = js.get_stream("EVENTS").await.expect("stream");
    let info = stream.info().await.expect("info").clone();
    let mut count = 0;
    for sequence in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await
            && message.subject.as_str() == subject
        {
            count += 1;
        }
    }
    count
}

/// A publish that timed out while the client was disconnected must not be
/// stored later behind the caller's back: the caller, told the outcome is
/// unknown, resends the id; a copy the client had queued would land when
/// the connection returns — after the duplicate window, a second copy.
#[tokio::test]
async fn a_publish_timed_out_in_a_disconnect_is_not_stored_again_after_the_duplicate_window() {
    let server = NatsServer::start().await.expect("nats-server");
    let window = Duration::from_secs(1);
    let admin = stream_on(&server, window).await;
    let proxy = idem::testing::Proxy::start(server.client_addr())
        .await
        .expect("proxy");
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(proxy.url())
        .await
        .expect("connect through the proxy");
    let config = PublisherConfig {
        attempt_timeout: Duration::from_millis(150),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
        deadline: Duration::from_millis(600),
    };
    let publisher = Publisher::with_config(client.clone(), config);
    // Learn the subject's stream first: the attempts below then publish
    // rather than look the stream up.
    publisher
        .send(Outgoing::new("events.late", "w").with_id("warm-up"))
        .await
        .expect("warm-up");

    proxy.refuse();
    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.connection_state() == async_nats::connection::State::Connected {
        assert!(
            Instant::now() < deadline,
            "the client never noticed the cut"
        );
        sleep(Duration::from_millis(10)).await;
    }
    let err = publisher
        .send(Outgoing::new("events.late", "x").with_id("late-1"))
        .await
        .expect_err("disconnected");
    assert!(
        matches!(err, PublishError::DeadlineExceeded { .. }),
        "{err}"
    );
    // As the error says: resend with the same id (here through a working
    // connection); the broker stores it once.
    admin
        .send_publish(
            "events.late",
            jetstream::message::PublishMessage::build()
                .payload("x".into())
                .message_id("late-1"),
        )
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    // The duplicate window passes; then the publisher's connection returns.
    sleep(window * 5).await;
    proxy.open();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.connection_state() != async_nats::connection::State::Connected {
        assert!(Instant::now() < deadline, "the client never reconnected");
        sleep(Duration::from_millis(10)).await;
    }
    client.flush().await.expect("flush");
    // A round trip through JetStream after whatever the client sent.
    publisher
        .publish("events.after", "a")
        .await
        .expect("after reconnect");
    assert_eq!(
        stored_on(&admin, "events.late").await,
        2,
        "the warm-up and late-1 once: the timed-out publish was stored a second time after the window"
    );
}
