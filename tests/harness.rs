//! Tests of the test harness itself (`idem::testing`), against real
//! `nats-server` processes: everything later suites rely on — restart keeps
//! JetStream data, kill disconnects clients, pause freezes, clusters fail
//! over, the proxy cuts and stalls, and nothing is left behind.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use idem::testing::{Cluster, Flow, HarnessError, NatsServer, Proxy};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

/// How long a client may take to notice a dead server or reconnect to a
/// restarted one (async-nats backs off between reconnect attempts).
const CLIENT_NOTICE: Duration = Duration::from_secs(20);

/// A file stream; a replicated one is returned once it has a leader (a
/// publish right after creating an R3 stream can find no leader yet and is
/// answered "no responders": seen as a StreamNotFound in CI).
async fn file_stream(js: &jetstream::Context, name: &str, replicas: usize) -> stream::Stream {
    let mut stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .expect("create stream");
    if replicas > 1 {
        let deadline = Instant::now() + CLIENT_NOTICE;
        loop {
            let info = stream.info().await.expect("stream info");
            if info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.as_ref())
                .is_some()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no leader for {name} within {CLIENT_NOTICE:?}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
    stream
}

async fn publish_confirmed(js: &jetstream::Context, subject: &str, payload: &'static str) -> u64 {
    js.publish(subject.to_owned(), payload.into())
        .await
        .expect("send publish")
        .await
        .expect("PubAck")
        .sequence
}

#[tokio::test]
async fn stream_message_survives_kill_and_restart() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    file_stream(&js, "DURABLE", 1).await;
    let seq = publish_confirmed(&js, "durable.one", "kept across a crash").await;
    let store = server.store_dir();

    server.kill().expect("SIGKILL");
    assert!(!server.is_running());
    server.restart().await.expect("restart");

    assert_eq!(
        server.store_dir(),
        store,
        "restart must reuse the store directory"
    );
    let js = jetstream::new(server.connect().await.expect("connect after restart"));
    let stream = js.get_stream("DURABLE").await.expect("stream recovered");
    let message = stream
        .get_raw_message(seq)
        .await
        .expect("message recovered");
    assert_eq!(message.payload.as_ref(), b"kept across a crash");
    assert_eq!(message.subject.as_str(), "durable.one");
}

#[tokio::test]
async fn client_sees_disconnect_on_kill_and_reconnects_after_restart() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let (client, mut events) = client_with_events(server.client_url()).await;
    let port = server.port();

    server.kill().expect("SIGKILL");
    wait_for_event(&mut events, async_nats::Event::Disconnected).await;
    assert!(
        timeout(
            Duration::from_millis(500),
            client.request("any.subject", "".into())
        )
        .await
        .map_or(true, |r| r.is_err()),
        "a dead server must not answer"
    );

    server.restart().await.expect("restart");
    assert_eq!(server.port(), port, "restart must reuse the port");
    wait_for_event(&mut events, async_nats::Event::Connected).await;

    // The reconnected client works end to end.
    let mut subscription = client.subscribe("echo").await.expect("subscribe");
    client
        .publish("echo", "after restart".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    let message = timeout(CLIENT_NOTICE, subscription.next())
        .await
        .expect("message within bound")
        .expect("subscription open");
    assert_eq!(message.payload.as_ref(), b"after restart");
}

async fn wait_for_event(
    events: &mut mpsc::UnboundedReceiver<async_nats::Event>,
    wanted: async_nats::Event,
) {
    let deadline = Instant::now() + CLIENT_NOTICE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, events.recv()).await {
            Ok(Some(event)) if event.to_string() == wanted.to_string() => return,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event channel closed before `{wanted}`"),
            Err(_) => panic!("no `{wanted}` event within {CLIENT_NOTICE:?}"),
        }
    }
}

#[tokio::test]
async fn paused_server_does_not_answer_until_resumed() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.connect().await.expect("connect");
    let js = jetstream::new(client.clone());
    file_stream(&js, "FROZEN", 1).await;

    server.pause().await.expect("SIGSTOP");
    let frozen = timeout(Duration::from_millis(500), js.get_stream("FROZEN")).await;
    assert!(
        frozen.is_err() || frozen.is_ok_and(|r| r.is_err()),
        "a paused server must not answer"
    );

    server.resume().await.expect("SIGCONT");
    let stream = timeout(CLIENT_NOTICE, js.get_stream("FROZEN"))
        .await
        .expect("answers within bound after resume")
        .expect("stream info");
    assert_eq!(stream.cached_info().config.name, "FROZEN");
}

#[tokio::test]
async fn stop_is_graceful_and_signals_on_a_stopped_server_are_errors() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let started = Instant::now();
    server.stop().await.expect("SIGTERM");
    assert!(!server.is_running());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "SIGTERM should end the server, not the kill fallback"
    );
    assert!(
        server.log_tail().contains("Server Exiting"),
        "log: {}",
        server.log_tail()
    );
    assert!(matches!(
        server.pause().await,
        Err(HarnessError::NotRunning { .. })
    ));
    assert!(matches!(
        server.kill(),
        Err(HarnessError::NotRunning { .. })
    ));
    assert!(
        server.connect().await.is_err(),
        "nothing listens after stop"
    );
}

#[tokio::test]
async fn drop_kills_the_process_and_removes_the_store_even_on_panic() {
    // Plain drop.
    let server = NatsServer::start().await.expect("nats-server");
    let (pid, dir) = (server.pid().expect("running"), server.dir().to_owned());
    drop(server);
    assert_gone(pid, &dir);

    // Drop while a panicking task unwinds, with the server paused.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let server = NatsServer::start().await.expect("nats-server");
        server.pause().await.expect("SIGSTOP");
        let _ = tx.send((server.pid().expect("running"), server.dir().to_owned()));
        panic!("a test failing while it owns a paused server");
    });
    assert!(task.await.expect_err("task panics").is_panic());
    let (pid, dir) = rx.await.expect("task reported its server");
    assert_gone(pid, &dir);
}

fn assert_gone(pid: u32, dir: &std::path::Path) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits"));
    assert_eq!(
        nix::sys::signal::kill(pid, None),
        Err(nix::errno::Errno::ESRCH),
        "process {pid} must be gone (killed and reaped)"
    );
    assert!(!dir.exists(), "{} must be removed", dir.display());
}

#[tokio::test]
async fn cluster_elects_a_leader_for_r3_and_keeps_writing_when_it_is_killed() {
    let mut cluster = Cluster::start().await.expect("3-node cluster");
    assert_eq!(cluster.nodes().len(), 3);
    let js = jetstream::new(cluster.connect().await.expect("connect"));
    let mut stream = file_stream(&js, "REPLICATED", 3).await;
    for _ in 0..10 {
        publish_confirmed(&js, "replicated.before", "x").await;
    }

    let info = stream.info().await.expect("info");
    let placement = info.cluster.clone().expect("an R3 stream has cluster info");
    let old_leader = placement.leader.expect("a leader is elected");
    assert_eq!(
        placement.replicas.len(),
        2,
        "two followers besides the leader"
    );
    let leader_index = cluster
        .index_of(&old_leader)
        .expect("the leader is one of our nodes");

    cluster
        .node_mut(leader_index)
        .expect("node")
        .kill()
        .expect("kill leader");

    // Writes resume once the two survivors elect a new leader; poll (bounded)
    // for the first confirmed write, then every further write must succeed.
    let deadline = Instant::now() + CLIENT_NOTICE;
    loop {
        let attempt = async {
            js.publish("replicated.after", "x".into())
                .await?
                .await
                .map_err(Into::into)
        };
        let result: Result<_, Box<dyn std::error::Error + Send + Sync>> = attempt.await;
        if result.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write accepted within {CLIENT_NOTICE:?} after the leader died"
        );
        sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..9 {
        publish_confirmed(&js, "replicated.after", "x").await;
    }
    let info = stream.info().await.expect("info after failover");
    assert_eq!(
        info.state.messages, 20,
        "every confirmed write is stored once"
    );
    let new_leader = info
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("new leader");
    assert_ne!(new_leader, old_leader);

    // The killed node comes back and catches up.
    cluster
        .node_mut(leader_index)
        .expect("node")
        .restart()
        .await
        .expect("rejoin");
    let deadline = Instant::now() + CLIENT_NOTICE;
    loop {
        let info = stream.info().await.expect("info after rejoin");
        let replicas = info.cluster.clone().map(|c| c.replicas).unwrap_or_default();
        if replicas.iter().any(|p| p.name == old_leader && p.current) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{old_leader} did not catch up: {replicas:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// A client connected to `url`, with its connection events.
async fn client_with_events(
    url: String,
) -> (
    async_nats::Client,
    mpsc::UnboundedReceiver<async_nats::Event>,
) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        })
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    (client, events)
}

#[tokio::test]
async fn proxy_stall_holds_requests_until_opened() {
    let server = NatsServer::start().await.expect("nats-server");
    let proxy = Proxy::start(server.client_addr()).await.expect("proxy");
    let (client, _events) = client_with_events(proxy.url()).await;
    let js = jetstream::new(client);
    file_stream(&js, "STALLED", 1).await;

    proxy.stall();
    assert_eq!(proxy.flow(), Flow::Stalled);
    let pending = tokio::spawn({
        let js = js.clone();
        async move { publish_confirmed(&js, "stalled.one", "held").await }
    });
    sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "a stalled link must not deliver the PubAck"
    );
    let direct = jetstream::new(server.connect().await.expect("direct client"));
    let stored = direct
        .get_stream("STALLED")
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(
        stored, 0,
        "a stalled link must not deliver the publish either"
    );

    proxy.open();
    let sequence = timeout(CLIENT_NOTICE, pending)
        .await
        .expect("PubAck after the link opens")
        .expect("publish task");
    assert_eq!(sequence, 1);
}

#[tokio::test]
async fn proxy_hold_replies_then_cut_loses_the_puback_but_not_the_message() {
    let server = NatsServer::start().await.expect("nats-server");
    let proxy = Proxy::start(server.client_addr()).await.expect("proxy");
    let (client, mut events) = client_with_events(proxy.url()).await;
    let js = jetstream::new(client);
    file_stream(&js, "HELD", 1).await;
    let direct = jetstream::new(server.connect().await.expect("direct client"));
    let mut stream = direct.get_stream("HELD").await.expect("stream");

    proxy.hold_replies();
    let ack = js
        .publish("held.one", "stored".into())
        .await
        .expect("send publish");
    let deadline = Instant::now() + CLIENT_NOTICE;
    while stream.info().await.expect("info").state.messages == 0 {
        assert!(
            Instant::now() < deadline,
            "the publish never reached the server"
        );
        sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    proxy.open();
    assert!(ack.await.is_err(), "the PubAck was held back, then cut");
    wait_for_event(&mut events, async_nats::Event::Disconnected).await;
    wait_for_event(&mut events, async_nats::Event::Connected).await;
    assert_eq!(publish_confirmed(&js, "held.two", "after").await, 2);
}

#[tokio::test]
async fn proxy_refuse_keeps_clients_out_until_opened() {
    let server = NatsServer::start().await.expect("nats-server");
    let proxy = Proxy::start(server.client_addr()).await.expect("proxy");
    let (client, mut events) = client_with_events(proxy.url()).await;

    proxy.refuse();
    proxy.cut();
    wait_for_event(&mut events, async_nats::Event::Disconnected).await;
    assert!(
        timeout(Duration::from_millis(500), client.request("any", "".into()))
            .await
            .map_or(true, |r| r.is_err()),
        "no server reachable through a refusing proxy"
    );
    proxy.open();
    wait_for_event(&mut events, async_nats::Event::Connected).await;
    client.flush().await.expect("flush after reconnect");
}
