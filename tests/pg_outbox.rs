//! The transactional outbox: what commits is published exactly once, what
//! rolls back never is, and relays may crash and run side by side.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::outbox::PgOutbox;
use idem::publisher::{Outgoing, Publisher, PublisherConfig};
use idem::testing::{NatsServer, TestDatabase};
use tokio::time::{Instant, sleep};

struct Setup {
    server: NatsServer,
    js: jetstream::Context,
    db: TestDatabase,
    outbox: PgOutbox,
}

impl Setup {
    async fn new() -> Self {
        let server = NatsServer::start().await.expect("nats-server");
        let js = jetstream::new(server.connect().await.expect("connect"));
        js.create_stream(stream::Config {
            name: "TRANSFERS".into(),
            subjects: vec!["transfers.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("stream");
        let db = TestDatabase::create()
            .await
            .expect("a PostgreSQL schema (DATABASE_URL)");
        let outbox = PgOutbox::open(db.pool().clone(), db.schema())
            .await
            .expect("outbox");
        Self {
            server,
            js,
            db,
            outbox,
        }
    }

    async fn publisher(&self) -> Publisher {
        let config = PublisherConfig {
            attempt_timeout: Duration::from_millis(500),
            ..PublisherConfig::default()
        };
        Publisher::with_config(self.server.connect().await.expect("connect"), config)
    }

    async fn enqueue(&self, ids: impl Iterator<Item = String>, commit: bool) {
        let mut tx = self.db.pool().begin().await.expect("begin");
        for id in ids {
            self.outbox
                .enqueue(
                    &mut tx,
                    Outgoing::new("transfers.completed", id.clone())
                        .with_id(id)
                        .header("Kind", "transfer"),
                )
                .await
                .expect("enqueue");
        }
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
    }

    async fn stored(&self) -> u64 {
        self.js
            .get_stream("TRANSFERS")
            .await
            .expect("stream")
            .cached_info()
            .state
            .messages
    }

    async fn until_stored(&self, at_least: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.stored().await < at_least {
            assert!(
                Instant::now() < deadline,
                "only {} of {at_least} published within {within:?}",
                self.stored().await
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn committed_messages_are_published_and_rolled_back_ones_never() {
    let setup = Setup::new().await;
    setup
        .enqueue((0..3).map(|i| format!("kept-{i}")), true)
        .await;
    setup
        .enqueue((0..2).map(|i| format!("gone-{i}")), false)
        .await;
    let relay = setup.outbox.start_relay(setup.publisher().await);
    setup.until_stored(3, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.outbox.pending().await.expect("pending") > 0 {
        assert!(Instant::now() < deadline, "rows not deleted");
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        setup.stored().await,
        3,
        "the rolled-back messages were never published"
    );
    let stream = setup.js.get_stream("TRANSFERS").await.expect("stream");
    let first = stream.get_raw_message(1).await.expect("first message");
    assert_eq!(
        first.headers.get("Kind").map(|v| v.to_string()).as_deref(),
        Some("transfer")
    );

    // An idle relay wakes on NOTIFY, well before its 5 s poll.
    let started = Instant::now();
    setup
        .enqueue(std::iter::once("late".to_owned()), true)
        .await;
    setup.until_stored(4, Duration::from_secs(3)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "woken by NOTIFY"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_killed_mid_batch_and_two_new_relays_publish_each_row_once() {
    let setup = Setup::new().await;
    let total = 3_000u64;
    for chunk in 0..6 {
        setup
            .enqueue((0..500).map(|i| format!("t-{chunk}-{i}")), true)
            .await;
    }
    let relay = setup.outbox.start_relay(setup.publisher().await);
    setup.until_stored(400, Duration::from_secs(20)).await;
    relay.abort().await; // killed mid-batch: its published rows are not deleted

    let relays = [
        setup.outbox.start_relay(setup.publisher().await),
        setup.outbox.start_relay(setup.publisher().await),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while setup.outbox.pending().await.expect("pending") > 0 {
        assert!(
            Instant::now() < deadline,
            "rows left: {}",
            setup.outbox.pending().await.expect("pending")
        );
        sleep(Duration::from_millis(50)).await;
    }
    for relay in relays {
        relay.stop().await;
    }
    assert_eq!(
        setup.stored().await,
        total,
        "every row published exactly once"
    );
}

#[idem::idempotent(stream = "TRANSFERS", subject = "transfers.requested", key = id, dedup = transactional)]
async fn complete_transfer(
    idem::Json(id): idem::Json<u64>,
    tx: idem::Tx,
    idem::State(outbox): idem::State<PgOutbox>,
) -> Result<(), idem::HandlerError> {
    let mut conn = tx.conn().await?;
    outbox
        .enqueue(
            &mut conn,
            Outgoing::new("transfers.completed", id.to_string()).with_id(format!("completed-{id}")),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_runtime_relays_what_its_handlers_enqueue_and_stops_the_relay_with_them() {
    let setup = Setup::new().await;
    let client = setup.server.connect().await.expect("connect");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = idem::Runtime::builder(client.clone())
        .postgres(setup.db.pool().clone(), setup.db.schema())
        .state(setup.outbox.clone())
        .relay(setup.outbox.clone())
        .handler(complete_transfer)
        .shutdown_on(async {
            let _ = stopped.await;
        })
        .build()
        .await
        .expect("runtime");
    let running = tokio::spawn(runtime.run());
    for id in 0..10u64 {
        setup
            .js
            .publish("transfers.requested", id.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }
    // 10 requests, and the 10 events their handlers enqueued.
    setup.until_stored(20, Duration::from_secs(30)).await;
    let _ = stop.send(());
    running
        .await
        .expect("runtime task")
        .expect("the runtime (and its relay) stop cleanly");
    assert_eq!(setup.outbox.pending().await.expect("pending"), 0);
    assert_eq!(setup.stored().await, 20, "each event published once");
}
