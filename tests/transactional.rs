//! `dedup = transactional` against real PostgreSQL and NATS: the claim row
//! and the effect commit together, so effects are counted in committed rows
//! and balances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage, stream};
use idem::consumer::{Outcome, Stats};
use idem::handler::{HandlerConfig, StartAt};
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::testing::{NatsServer, Proxy, TestDatabase};
use idem::{HandlerError, Json, Retry, Runtime, State, Tx, idempotent};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep};

#[derive(Debug, Serialize, Deserialize)]
struct Transfer {
    id: String,
    from: String,
    to: String,
    amount: i64,
    #[serde(default)]
    fail_times: u32,
    #[serde(default)]
    sleep_ms: u64,
    /// Fails permanently (after its writes).
    #[serde(default)]
    poison: bool,
    /// Ignores a failed statement and returns `Ok` while the attempt is
    /// within this many.
    #[serde(default)]
    swallow_times: u32,
    /// A failed attempt asks to be retried no sooner than this.
    #[serde(default)]
    retry_after_ms: u64,
}

/// The test's schema, and how often each transfer was attempted.
#[derive(Clone)]
struct Ledger {
    schema: String,
    attempts: Arc<Mutex<HashMap<String, u32>>>,
    /// Stalled by a poison transfer's first run just before it fails: the
    /// worker's link to the broker stops while its dead letter is being
    /// stored.
    stall_on_poison: Option<Arc<Proxy>>,
    /// The receipts duplicates were handed (`receipt_again`).
    announced: Arc<Mutex<Vec<String>>>,
}

/// Moves money and logs the application, inside the runtime's transaction,
/// then takes `sleep_ms`; fails (after the writes and the sleep) if poison,
/// or while the attempt is within `fail_times`.
#[idempotent(
    stream = "LEDGER",
    subject = "ledger.transfers",
    key = transfer.id,
    dedup = transactional,
    lease = "5s",
    retry = Retry::fixed("100ms").attempts(5),
)]
async fn apply_transfer(
    Json(transfer): Json<Transfer>,
    tx: Tx,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    let s = &ledger.schema;
    let attempt = {
        let mut attempts = ledger
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = attempts.entry(transfer.id.clone()).or_default();
        *n += 1;
        *n
    };
    let mut conn = tx.conn().await?;
    for (account, delta) in [
        (&transfer.from, -transfer.amount),
        (&transfer.to, transfer.amount),
    ] {
        sqlx::query(&format!(
            "UPDATE \"{s}\".accounts SET balance = balance + $1 WHERE id = $2"
        ))
        .bind(delta)
        .bind(account)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(&format!(
        "INSERT INTO \"{s}\".applied (transfer) VALUES ($1)"
    ))
    .bind(&transfer.id)
    .execute(&mut *conn)
    .await?;
    if attempt <= transfer.swallow_times {
        // A bug in user code: the failed statement aborts the transaction,
        // and the error is ignored.
        let _ = sqlx::query("SELECT 1 / 0").execute(&mut *conn).await;
    }
    drop(conn);
    sleep(Duration::from_millis(transfer.sleep_ms)).await;
    if transfer.poison {
        // Its first run only: the message comes back while its dead letter
        // waits (the link stalls its progress acks too), and a second stall
        // would hold every later dead letter back for good.
        if let Some(proxy) = &ledger.stall_on_poison
            && attempt == 1
        {
            proxy.stall();
        }
        return Err(HandlerError::permanent(format!(
            "transfer {} is poison",
            transfer.id
        )));
    }
    if attempt <= transfer.fail_times {
        let error = HandlerError::retryable(format!("transient failure {attempt}"));
        return Err(match transfer.retry_after_ms {
            0 => error,
            ms => error.retry_after(Duration::from_millis(ms)),
        });
    }
    Ok(())
}

/// Records a transfer in the handler's transaction and stores its receipt;
/// a duplicate is handed the receipt again — without a transaction: its
/// effect committed with the first delivery.
#[idempotent(
    stream = "LEDGER",
    subject = "ledger.receipts",
    key = transfer.id,
    dedup = transactional,
    store_result,
    on_duplicate = receipt_again,
)]
async fn issue_receipt(
    Json(transfer): Json<Transfer>,
    tx: Tx,
    State(ledger): State<Ledger>,
) -> Result<String, HandlerError> {
    let mut conn = tx.conn().await?;
    sqlx::query(&format!(
        "INSERT INTO \"{}\".applied (transfer) VALUES ($1)",
        ledger.schema
    ))
    .bind(&transfer.id)
    .execute(&mut *conn)
    .await?;
    Ok(format!("receipt-{}", transfer.id))
}

async fn receipt_again(
    receipt: String,
    Json(transfer): Json<Transfer>,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    if receipt != format!("receipt-{}", transfer.id) {
        return Err(HandlerError::permanent(format!(
            "{} was handed {receipt}",
            transfer.id
        )));
    }
    ledger
        .announced
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(receipt);
    Ok(())
}

struct Setup {
    _server: NatsServer,
    url: String,
    js: jetstream::Context,
    db: TestDatabase,
    ledger: Ledger,
}

struct Worker {
    stats: Stats,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), idem::consumer::RuntimeError>>,
}

impl Worker {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("task").expect("runtime");
    }

    async fn wait_for(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: not within 30 s");
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn count(&self, outcome: Outcome) -> u64 {
        self.stats.handler("apply_transfer").get(outcome)
    }
}

impl Setup {
    async fn new() -> Self {
        let server = NatsServer::start().await.expect("nats-server");
        let js = jetstream::new(server.connect().await.expect("connect"));
        js.create_stream(stream::Config {
            name: "LEDGER".into(),
            subjects: vec!["ledger.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
        let db = TestDatabase::create()
            .await
            .expect("a PostgreSQL schema (DATABASE_URL)");
        let s = db.schema().to_owned();
        for statement in [
            format!("CREATE TABLE \"{s}\".accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL)"),
            format!("CREATE TABLE \"{s}\".applied (transfer TEXT NOT NULL)"),
            format!("INSERT INTO \"{s}\".accounts VALUES ('alice', 1000), ('bob', 1000)"),
        ] {
            sqlx::query(&statement)
                .execute(db.pool())
                .await
                .expect("ledger tables");
        }
        let ledger = Ledger {
            schema: s,
            attempts: Arc::default(),
            stall_on_poison: None,
            announced: Arc::default(),
        };
        Self {
            url: server.client_url(),
            _server: server,
            js,
            db,
            ledger,
        }
    }

    async fn worker(&self, pool: sqlx::PgPool) -> Worker {
        self.worker_with(pool, |b| b).await
    }

    async fn worker_with(
        &self,
        pool: sqlx::PgPool,
        configure: impl FnOnce(idem::consumer::RuntimeBuilder) -> idem::consumer::RuntimeBuilder,
    ) -> Worker {
        self.tuned_worker(pool, configure, |config| config).await
    }

    /// A worker whose handler takes its messages in groups of `batch`.
    async fn group_worker(&self, batch: usize) -> Worker {
        self.groups_worker(batch, 16).await
    }

    /// A worker whose handler takes its messages in groups of `batch`,
    /// `concurrency` at a time (so `concurrency / batch` groups at once).
    async fn groups_worker(&self, batch: usize, concurrency: usize) -> Worker {
        let pool = self.db.pool().clone();
        let tune = move |config: HandlerConfig| {
            config
                .batch(batch)
                .concurrency(concurrency)
                .start(StartAt::All)
        };
        self.tuned_worker(pool, |b| b, tune).await
    }

    async fn tuned_worker(
        &self,
        pool: sqlx::PgPool,
        configure: impl FnOnce(idem::consumer::RuntimeBuilder) -> idem::consumer::RuntimeBuilder,
        tune: impl Fn(HandlerConfig) -> HandlerConfig + Send + 'static,
    ) -> Worker {
        self.worker_through(&self.url, self.ledger.clone(), pool, configure, tune)
            .await
    }

    /// A worker connected to the broker at `url` (a proxy's, say), with
    /// its own `ledger` state.
    async fn worker_through(
        &self,
        url: &str,
        ledger: Ledger,
        pool: sqlx::PgPool,
        configure: impl FnOnce(idem::consumer::RuntimeBuilder) -> idem::consumer::RuntimeBuilder,
        tune: impl Fn(HandlerConfig) -> HandlerConfig + Send + 'static,
    ) -> Worker {
        let (stop, stopped) = oneshot::channel::<()>();
        let builder = Runtime::builder(async_nats::connect(url).await.expect("connect"));
        let runtime = configure(builder)
            .state(ledger)
            .postgres(pool, self.db.schema())
            .handler_with(apply_transfer, tune)
            .shutdown_grace(Duration::from_millis(200))
            .shutdown_on(async {
                let _ = stopped.await;
            })
            .build()
            .await
            .expect("runtime starts");
        Worker {
            stats: runtime.stats(),
            stop,
            task: tokio::spawn(runtime.run()),
        }
    }

    /// The dead-letter stream is gone: dead letters cannot be stored.
    async fn dead_letters_gone(&self) {
        self.js
            .delete_stream(idem::consumer::DEAD_LETTER_STREAM)
            .await
            .expect("delete the dead-letter stream");
    }

    /// The dead-letter stream is back.
    async fn dead_letters_back(&self) {
        self.js
            .create_stream(stream::Config {
                name: idem::consumer::DEAD_LETTER_STREAM.into(),
                subjects: vec!["idem.dead.>".into()],
                ..Default::default()
            })
            .await
            .expect("the dead-letter stream is back");
    }

    async fn publish(&self, transfer: &Transfer, message_id: &str) {
        let body = serde_json::to_vec(transfer).expect("json");
        self.js
            .send_publish(
                "ledger.transfers",
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(message_id),
            )
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }

    /// A worker (lease `lease`) reaching the broker through a proxy, and a
    /// poison transfer `id` it has run: the handler stalled the link just
    /// before failing, so the transfer's dead letter now waits for its
    /// PubAck with the handler's transaction open.
    async fn stalled_on_its_dead_letter(&self, id: &str, lease: Duration) -> (Arc<Proxy>, Worker) {
        let server: std::net::SocketAddr = self
            .url
            .trim_start_matches("nats://")
            .parse()
            .expect("the server's address");
        let proxy = Arc::new(Proxy::start(server).await.expect("proxy"));
        let stalling = Ledger {
            stall_on_poison: Some(proxy.clone()),
            ..self.ledger.clone()
        };
        let worker = self
            .worker_through(
                &proxy.url(),
                stalling,
                self.db.pool().clone(),
                |b| b,
                // One transaction per message: under group commit the poison
                // runs twice — in its group (which stalls the link), then
                // alone for its dead letter — and the test would end the
                // session of that second run while its handler still runs
                // instead of while its dead letter waits (the flake this
                // once was). A group's dead letter is always stored from
                // the alone run, so this is the path groups take too.
                move |config: HandlerConfig| config.lease(lease).batch(1),
            )
            .await;
        let poison = Transfer {
            poison: true,
            ..transfer(id, 10)
        };
        self.publish(&poison, "poison").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.flow() != idem::testing::Flow::Stalled {
            assert!(Instant::now() < deadline, "the poison transfer never ran");
            sleep(Duration::from_millis(10)).await;
        }
        (proxy, worker)
    }

    /// Lets the stalled dead letter of poison transfer `id` through, then
    /// checks that X was dead-lettered and that Y, another payload under
    /// the key, is a conflict — neither applied — and stops the worker.
    async fn dead_letter_released(&self, id: &str, proxy: &Proxy, worker: Worker) {
        proxy.open();
        // Once or twice: while its first dead letter waited, the stalled
        // link held back X's progress acks too, so X may have come back and
        // run again on the key kept for it (its own payload) — a second
        // letter for the same payload, as a failed dead letter's NAK would.
        worker
            .wait_for("X dead-lettered", |w| w.count(Outcome::DeadLettered) >= 1)
            .await;
        self.publish(&transfer(id, 999), "reused").await;
        worker
            .wait_for("Y answered", |w| w.count(Outcome::KeyConflict) == 1)
            .await;
        assert_eq!(self.applied(id).await, 0, "neither payload applied");
        assert_eq!(self.balances().await, (1000, 1000));
        worker.stop().await;
    }

    /// Whether a claim of transfer `id`'s key by another payload would
    /// have to wait or find it taken: it waits on a row another transaction
    /// holds (lock timeout), or finds one committed — never inserts its own.
    async fn another_payload_would_wait_for(&self, id: &str) -> bool {
        let mut probe = self.db.pool().begin().await.expect("begin");
        sqlx::query("SET LOCAL lock_timeout = 300")
            .execute(&mut *probe)
            .await
            .expect("lock_timeout");
        let claimed = sqlx::query(&format!(
            "INSERT INTO \"{}\".idem_inbox (handler, key, state, owner, attempt, created_at, updated_at) \
             VALUES ('apply_transfer', $1, 'done', gen_random_uuid(), 1, 0, 0) ON CONFLICT DO NOTHING",
            self.ledger.schema
        ))
        .bind(format!("k.{id}"))
        .execute(&mut *probe)
        .await;
        // Rolled back now, not when the pool next hands its connection out:
        // an insert left open (or aborted while waiting) would make the
        // worker's next claim of the key wait for it.
        probe.rollback().await.expect("roll the probe back");
        match claimed {
            Ok(done) => done.rows_affected() == 0,
            Err(sqlx::Error::Database(e)) => e.code().as_deref() == Some("55P03"),
            Err(e) => panic!("the probe failed: {e}"),
        }
    }

    async fn drained(&self) {
        let mut consumer: PullConsumer = self
            .js
            .get_stream("LEDGER")
            .await
            .expect("stream")
            .get_consumer("apply_transfer")
            .await
            .expect("consumer");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = consumer.info().await.expect("info").clone();
            if info.num_pending == 0
                && info.num_ack_pending == 0
                && info.delivered.stream_sequence > 0
            {
                return;
            }
            assert!(Instant::now() < deadline, "not drained: {info:?}");
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn balances(&self) -> (i64, i64) {
        let sql = format!(
            "SELECT balance FROM \"{}\".accounts WHERE id = $1",
            self.ledger.schema
        );
        let mut balances = [0i64; 2];
        for (balance, id) in balances.iter_mut().zip(["alice", "bob"]) {
            *balance = sqlx::query_scalar(&sql)
                .bind(id)
                .fetch_one(self.db.pool())
                .await
                .expect("balance");
        }
        (balances[0], balances[1])
    }

    /// How many transactions committed the inbox's rows.
    async fn inbox_transactions(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(DISTINCT xmin::text) FROM \"{}\".idem_inbox",
            self.ledger.schema
        ))
        .fetch_one(self.db.pool())
        .await
        .expect("count the inbox's transactions")
    }

    /// Publishes `transfers` (each under its own message id) before any
    /// worker runs, so that they are ready together.
    async fn publish_all(&self, transfers: &[Transfer]) {
        for (n, transfer) in transfers.iter().enumerate() {
            self.publish(transfer, &format!("{}-{n}", transfer.id))
                .await;
        }
    }

    async fn applied(&self, transfer: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\".applied WHERE transfer = $1",
            self.ledger.schema
        ))
        .bind(transfer)
        .fetch_one(self.db.pool())
        .await
        .expect("count")
    }
}

fn transfer(id: &str, amount: i64) -> Transfer {
    Transfer {
        id: id.into(),
        from: "alice".into(),
        to: "bob".into(),
        amount,
        fail_times: 0,
        sleep_ms: 0,
        poison: false,
        swallow_times: 0,
        retry_after_ms: 0,
    }
}

#[tokio::test]
async fn two_workers_racing_on_one_key_apply_it_once() {
    let setup = Setup::new().await;
    let (a, b) = (
        setup.worker(setup.db.pool().clone()).await,
        setup.worker(setup.db.pool().clone()).await,
    );
    // The same transfer twice (a producer resend with a new id); each copy
    // holds its transaction open long enough for the other to arrive.
    let slow = Transfer {
        sleep_ms: 500,
        ..transfer("t-race", 100)
    };
    setup.publish(&slow, "first").await;
    setup.publish(&slow, "second").await;
    setup.drained().await;
    assert_eq!(setup.applied("t-race").await, 1, "one committed effect");
    assert_eq!(setup.balances().await, (900, 1100));
    let processed = a.count(Outcome::Processed) + b.count(Outcome::Processed);
    let duplicates = a.count(Outcome::Duplicate) + b.count(Outcome::Duplicate);
    assert_eq!((processed, duplicates), (1, 1));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_retryable_failure_rolls_back_effect_and_claim_together() {
    let setup = Setup::new().await;
    let worker = setup.worker(setup.db.pool().clone()).await;
    // Each failing attempt has already moved the money when it fails.
    let flaky = Transfer {
        fail_times: 2,
        ..transfer("t-flaky", 250)
    };
    setup.publish(&flaky, "flaky").await;
    setup.drained().await;
    assert_eq!(worker.count(Outcome::Retried), 2);
    assert_eq!(worker.count(Outcome::Processed), 1);
    assert_eq!(
        setup.applied("t-flaky").await,
        1,
        "the two failed attempts left nothing behind"
    );
    assert_eq!(setup.balances().await, (750, 1250));

    // Redelivered later (resent): a duplicate; reused with another amount: a conflict.
    setup.publish(&flaky, "flaky-resend").await;
    setup
        .publish(&transfer("t-flaky", 999), "flaky-other")
        .await;
    setup.drained().await;
    assert_eq!(worker.count(Outcome::Duplicate), 1);
    assert_eq!(worker.count(Outcome::KeyConflict), 1);
    assert_eq!(
        setup.balances().await,
        (750, 1250),
        "neither copy moved money"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_reused_key_arriving_during_the_first_payloads_backoff_is_a_key_conflict() {
    let setup = Setup::new().await;
    let worker = setup.worker(setup.db.pool().clone()).await;
    // X fails once and asks for a long backoff: its row is `released`.
    let first = Transfer {
        fail_times: 1,
        retry_after_ms: 1_500,
        ..transfer("t-reuse", 100)
    };
    setup.publish(&first, "first").await;
    let state = format!(
        "SELECT state FROM \"{}\".idem_inbox WHERE key LIKE '%t-reuse'",
        setup.ledger.schema
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found: Option<String> = sqlx::query_scalar(&state)
            .fetch_optional(setup.db.pool())
            .await
            .expect("read the inbox");
        if found.as_deref() == Some("released") {
            break;
        }
        assert!(Instant::now() < deadline, "X's row not released: {found:?}");
        sleep(Duration::from_millis(10)).await;
    }
    // Y reuses the key with another amount during X's backoff.
    setup.publish(&transfer("t-reuse", 999), "reused").await;
    setup.drained().await;
    worker
        .wait_for("both answered", |w| {
            w.count(Outcome::Processed) + w.count(Outcome::DeadLettered) == 2
        })
        .await;
    assert_eq!(worker.count(Outcome::KeyConflict), 1);
    assert_eq!(setup.applied("t-reuse").await, 1);
    assert_eq!(setup.balances().await, (900, 1100), "X's amount, not Y's");
    worker.stop().await;
}

#[tokio::test]
async fn a_dead_letter_stalled_past_the_lease_keeps_its_transaction_and_the_key_its_payloads() {
    const LEASE: Duration = Duration::from_secs(2);
    let setup = Setup::new().await;
    // Worker A reaches the broker through a proxy; its poison transfer
    // stalls the link just before it fails, so its dead letter's PubAck
    // waits past the lease with the handler's transaction open.
    let (proxy, a) = setup.stalled_on_its_dead_letter("t-stall", LEASE).await;
    // Past the lease (the transaction's idle timeout), X's row must still
    // be held by its transaction: were the session ended, the row's lock —
    // and the uncommitted claim with it — would be gone, and another
    // payload under the key would claim and commit it.
    sleep(LEASE + LEASE / 2).await;
    // Another claim of the key must still wait on X's uncommitted row.
    assert!(
        setup.another_payload_would_wait_for("t-stall").await,
        "X's row is not held by its transaction any more"
    );
    setup.dead_letter_released("t-stall", &proxy, a).await;
}

#[tokio::test]
async fn a_dead_letters_transaction_ended_under_it_leaves_the_key_its_payloads() {
    const LEASE: Duration = Duration::from_secs(2);
    let setup = Setup::new().await;
    let (proxy, a) = setup.stalled_on_its_dead_letter("t-ended", LEASE).await;
    // The worker's transaction (with its uncommitted claim) is ended under
    // it while its dead letter waits: a lost connection, a restarted
    // database, an operator's pg_terminate_backend.
    let holder: i32 = sqlx::query_scalar(
        "SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = 'idem_inbox' AND l.mode = 'RowExclusiveLock' LIMIT 1",
    )
    .bind(&setup.ledger.schema)
    .fetch_one(setup.db.pool())
    .await
    .expect("the worker's session");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(holder)
        .execute(setup.db.pool())
        .await
        .expect("terminate it");
    sleep(LEASE).await;
    // Another payload's claim of the key must find it taken.
    assert!(
        setup.another_payload_would_wait_for("t-ended").await,
        "the key was free for another payload"
    );
    setup.dead_letter_released("t-ended", &proxy, a).await;
}

#[tokio::test]
async fn an_interrupted_handler_leaves_nothing_and_the_next_worker_applies_once() {
    let setup = Setup::new().await;
    let first = setup.worker(setup.db.pool().clone()).await;
    let slow = Transfer {
        sleep_ms: 5_000,
        ..transfer("t-cut", 300)
    };
    setup.publish(&slow, "cut").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup
        .ledger
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get("t-cut")
        .is_none()
    {
        assert!(Instant::now() < deadline, "the handler never started");
        sleep(Duration::from_millis(20)).await;
    }
    first.stop().await; // grace 200 ms: the transaction is rolled back
    assert_eq!(setup.applied("t-cut").await, 0);
    assert_eq!(
        setup.balances().await,
        (1000, 1000),
        "the uncommitted debit vanished"
    );

    let second = setup.worker(setup.db.pool().clone()).await;
    setup.drained().await;
    assert_eq!(setup.applied("t-cut").await, 1);
    assert_eq!(setup.balances().await, (700, 1300));
    second.stop().await;
}

#[tokio::test]
async fn without_the_database_the_handler_does_not_run_and_nothing_is_lost() {
    let setup = Setup::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(
            &std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| idem::testing::DEFAULT_DATABASE_URL.to_owned()),
        )
        .await
        .expect("pool");
    let cut_off = setup.worker(pool.clone()).await;
    pool.close().await; // the database is gone for this worker
    setup.publish(&transfer("t-wait", 50), "wait").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cut_off.count(Outcome::StoreUnavailable) == 0 {
        assert!(Instant::now() < deadline, "the message was never tried");
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cut_off.count(Outcome::Processed), 0);
    assert_eq!(
        setup.applied("t-wait").await,
        0,
        "fail closed: the handler did not run"
    );
    cut_off.stop().await;

    // The database is back (a worker with a working pool): applied once.
    let back = setup.worker(setup.db.pool().clone()).await;
    setup.drained().await;
    assert_eq!(setup.applied("t-wait").await, 1);
    assert_eq!(setup.balances().await, (950, 1050));
    back.stop().await;
}

#[tokio::test]
async fn a_crash_after_commit_before_the_ack_is_answered_as_a_duplicate() {
    let setup = Setup::new().await;
    // This worker commits and then never acknowledges: the state a crash
    // between commit and ack leaves behind.
    let crashing = setup
        .worker_with(setup.db.pool().clone(), |b| b.drop_every_nth_ack(1))
        .await;
    setup.publish(&transfer("t-commit", 400), "commit").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while crashing.count(Outcome::Processed) == 0 {
        assert!(Instant::now() < deadline, "never committed");
        sleep(Duration::from_millis(20)).await;
    }
    crashing.stop().await;
    assert_eq!(setup.applied("t-commit").await, 1);

    // The broker redelivers after ack_wait (the 5 s lease) to the next worker.
    let next = setup.worker(setup.db.pool().clone()).await;
    setup.drained().await;
    assert_eq!(
        next.count(Outcome::Duplicate),
        1,
        "the redelivery found the committed claim"
    );
    assert_eq!(next.count(Outcome::Processed), 0);
    assert_eq!(setup.applied("t-commit").await, 1, "no second effect");
    assert_eq!(setup.balances().await, (600, 1400));
    next.stop().await;
}

#[tokio::test]
async fn a_handler_that_swallows_a_failed_statement_is_retried_not_committed_as_success() {
    let setup = Setup::new().await;
    let worker = setup.worker(setup.db.pool().clone()).await;
    let sloppy = Transfer {
        swallow_times: 1,
        ..transfer("t-swallow", 40)
    };
    setup.publish(&sloppy, "swallow").await;
    setup.drained().await;
    worker
        .wait_for("processed", |w| w.count(Outcome::Processed) == 1)
        .await;
    assert_eq!(
        worker.count(Outcome::Retried),
        1,
        "the aborted transaction is a failure"
    );
    assert_eq!(setup.applied("t-swallow").await, 1);
    assert_eq!(setup.balances().await, (960, 1040));
    worker.stop().await;
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_stored_keeps_the_message_until_it_can() {
    let setup = Setup::new().await;
    let worker = setup.worker(setup.db.pool().clone()).await;
    // The dead-letter stream is gone for a while:
    setup.dead_letters_gone().await;
    let poison = Transfer {
        poison: true,
        ..transfer("t-poison", 10)
    };
    setup.publish(&poison, "poison").await;
    worker
        .wait_for("a dead letter failed", |w| {
            w.count(Outcome::DeadLetterFailed) >= 1
        })
        .await;
    setup.dead_letters_back().await;
    worker
        .wait_for("the message answered", |w| {
            w.count(Outcome::DeadLettered) + w.count(Outcome::Duplicate) >= 1
        })
        .await;
    assert_eq!(
        worker.count(Outcome::Duplicate),
        0,
        "a message whose dead letter was never stored must not be acked as a duplicate"
    );
    assert_eq!(worker.count(Outcome::DeadLettered), 1);
    let letter = setup
        .js
        .get_stream(idem::consumer::DEAD_LETTER_STREAM)
        .await
        .expect("stream")
        .get_last_raw_message_by_subject("idem.dead.apply_transfer")
        .await
        .expect("the dead letter is stored");
    assert_eq!(
        letter
            .headers
            .get(idem::consumer::headers::REASON)
            .map(|v| v.to_string())
            .as_deref(),
        Some("handler_error")
    );
    assert_eq!(setup.applied("t-poison").await, 0);
    worker.stop().await;
}

#[tokio::test]
async fn a_corrected_payload_under_a_dead_transactional_key_is_a_key_conflict() {
    let setup = Setup::new().await;
    let worker = setup.worker(setup.db.pool().clone()).await;
    let poison = Transfer {
        poison: true,
        ..transfer("t-fixed", 10)
    };
    setup.publish(&poison, "poison").await;
    worker
        .wait_for("dead-lettered", |w| w.count(Outcome::DeadLettered) == 1)
        .await;
    setup.publish(&transfer("t-fixed", 10), "corrected").await;
    setup.drained().await;
    worker
        .wait_for("the corrected payload answered", |w| {
            w.count(Outcome::Duplicate) + w.count(Outcome::KeyConflict) == 1
        })
        .await;
    assert_eq!(worker.count(Outcome::KeyConflict), 1);
    assert_eq!(setup.applied("t-fixed").await, 0);
    worker.stop().await;
}

#[tokio::test]
async fn naks_while_the_database_is_down_do_not_use_up_the_retry_budget() {
    let setup = Setup::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(
            &std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| idem::testing::DEFAULT_DATABASE_URL.to_owned()),
        )
        .await
        .expect("pool");
    let cut_off = setup.worker(pool.clone()).await;
    pool.close().await; // the database is gone for this worker
    // Fails once when it finally runs: within apply_transfer's 5 attempts.
    let flaky = Transfer {
        fail_times: 1,
        ..transfer("t-budget", 70)
    };
    setup.publish(&flaky, "budget").await;
    cut_off
        .wait_for("six deliveries refused for the outage", |w| {
            w.count(Outcome::StoreUnavailable) >= 6
        })
        .await;
    cut_off.stop().await;

    let back = setup.worker(setup.db.pool().clone()).await;
    setup.drained().await;
    back.wait_for("processed", |w| w.count(Outcome::Processed) == 1)
        .await;
    assert_eq!(back.count(Outcome::DeadLettered), 0);
    assert_eq!(back.count(Outcome::Retried), 1);
    assert_eq!(setup.applied("t-budget").await, 1);
    back.stop().await;
}

#[tokio::test]
async fn a_transactional_key_whose_dead_letter_is_not_stored_yet_stays_its_payloads() {
    let setup = Setup::new().await;
    let worker = setup.worker(setup.db.pool().clone()).await;
    setup.dead_letters_gone().await;
    let poison = Transfer {
        poison: true,
        ..transfer("t-kept", 10)
    };
    setup.publish(&poison, "poison").await;
    worker
        .wait_for("its dead letter failed", |w| {
            w.count(Outcome::DeadLetterFailed) >= 1
        })
        .await;
    // Reused with another amount while the first waits for its dead letter.
    setup.publish(&transfer("t-kept", 20), "other").await;
    worker
        .wait_for("the other payload answered", |w| {
            w.count(Outcome::KeyConflict) + w.count(Outcome::Processed) >= 1
        })
        .await;
    setup.dead_letters_back().await;
    setup.drained().await;
    worker
        .wait_for("both dead-lettered", |w| {
            w.count(Outcome::DeadLettered) == 2
        })
        .await;
    assert_eq!(worker.count(Outcome::Processed), 0);
    // Counted per delivery: also while its own dead letter could not be stored.
    assert!(worker.count(Outcome::KeyConflict) >= 1);
    assert_eq!(setup.applied("t-kept").await, 0, "neither payload applied");
    worker.stop().await;
}

/// Transfers `g-0` … `g-{n-1}` of 10 each.
fn transfers(n: usize) -> Vec<Transfer> {
    (0..n).map(|i| transfer(&format!("g-{i}"), 10)).collect()
}

#[tokio::test]
async fn ready_messages_share_one_transaction_per_group_and_apply_once_each() {
    let setup = Setup::new().await;
    setup.publish_all(&transfers(24)).await;
    let worker = setup.group_worker(8).await;
    setup.drained().await;
    worker
        .wait_for("all processed", |w| w.count(Outcome::Processed) == 24)
        .await;
    for i in 0..24 {
        assert_eq!(setup.applied(&format!("g-{i}")).await, 1, "g-{i}");
    }
    assert_eq!(setup.balances().await, (760, 1240));
    let transactions = setup.inbox_transactions().await;
    assert!(
        (3..24).contains(&transactions),
        "24 claims in groups of at most 8 commit in 3 to 23 transactions, not {transactions}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn with_batch_one_every_message_commits_alone() {
    let setup = Setup::new().await;
    setup.publish_all(&transfers(12)).await;
    let worker = setup.group_worker(1).await;
    setup.drained().await;
    worker
        .wait_for("all processed", |w| w.count(Outcome::Processed) == 12)
        .await;
    assert_eq!(setup.inbox_transactions().await, 12);
    worker.stop().await;
}

#[tokio::test]
async fn a_failing_message_in_a_group_costs_the_others_nothing_and_counts_its_own_attempts() {
    let setup = Setup::new().await;
    let mut batch = transfers(14);
    batch[3].fail_times = 2;
    batch[9].poison = true;
    setup.publish_all(&batch).await;
    let worker = setup.group_worker(16).await;
    setup.drained().await;
    worker
        .wait_for("13 processed, 1 dead-lettered", |w| {
            w.count(Outcome::Processed) == 13 && w.count(Outcome::DeadLettered) == 1
        })
        .await;
    for transfer in &batch {
        let expected = i64::from(!transfer.poison);
        assert_eq!(
            setup.applied(&transfer.id).await,
            expected,
            "{}",
            transfer.id
        );
    }
    assert_eq!(
        setup.balances().await,
        (870, 1130),
        "13 transfers of 10 moved"
    );
    // g-3 failed twice, each counted once against its retry budget; the
    // poison failed permanently at once. The group's bystanders ran again
    // alone, uncounted.
    assert_eq!(worker.count(Outcome::Retried), 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_failed_statement_one_handler_swallows_commits_nothing_of_its_group() {
    let setup = Setup::new().await;
    let mut batch = transfers(10);
    batch[5].swallow_times = 1;
    setup.publish_all(&batch).await;
    let worker = setup.group_worker(16).await;
    setup.drained().await;
    worker
        .wait_for("all processed", |w| w.count(Outcome::Processed) == 10)
        .await;
    for transfer in &batch {
        assert_eq!(setup.applied(&transfer.id).await, 1, "{}", transfer.id);
    }
    assert_eq!(setup.balances().await, (900, 1100));
    worker.stop().await;
}

#[tokio::test]
async fn copies_of_one_message_in_a_group_apply_once() {
    let setup = Setup::new().await;
    let mut batch = transfers(6);
    batch.extend((0..4).map(|_| transfer("g-2", 10)));
    setup.publish_all(&batch).await;
    let worker = setup.group_worker(16).await;
    setup.drained().await;
    worker
        .wait_for("all answered", |w| {
            w.count(Outcome::Processed) + w.count(Outcome::Duplicate) == 10
        })
        .await;
    assert_eq!(worker.count(Outcome::Processed), 6);
    assert_eq!(worker.count(Outcome::Duplicate), 4);
    assert_eq!(setup.applied("g-2").await, 1);
    assert_eq!(setup.balances().await, (940, 1060));
    worker.stop().await;
}

#[tokio::test]
async fn a_key_locked_elsewhere_costs_its_group_a_wait_not_the_others_their_turn() {
    let setup = Setup::new().await;
    let batch = transfers(8);
    // Another transaction holds g-5's inbox row (a released claim: free to
    // take once the lock goes) while the group claims.
    let inbox = format!("\"{}\".idem_inbox", setup.ledger.schema);
    let record = RecordKey::new(
        &HandlerName::new("apply_transfer").expect("a handler name"),
        &IdempotencyKey::new("g-5").expect("a key"),
    );
    let (handler, key) = record.as_str().split_once('.').expect("<handler>.<key>");
    sqlx::query(&format!(
        "INSERT INTO {inbox} (handler, key, state, owner, attempt, created_at, updated_at) \
         VALUES ($1, $2, 'released', gen_random_uuid(), 1, 0, 0)"
    ))
    .bind(handler)
    .bind(key)
    .execute(setup.db.pool())
    .await
    .expect("a released row for g-5");
    let mut holder = setup.db.pool().begin().await.expect("a transaction");
    sqlx::query(&format!(
        "SELECT 1 FROM {inbox} WHERE handler = $1 AND key = $2 FOR UPDATE"
    ))
    .bind(handler)
    .bind(key)
    .execute(&mut *holder)
    .await
    .expect("lock g-5's row");
    setup.publish_all(&batch).await;
    let worker = setup.group_worker(16).await;
    // The group's claim statement waits for the lock (up to the 5 s lease),
    // fails, and rolls back; its messages run alone, and all but g-5 apply.
    worker
        .wait_for("the seven others processed", |w| {
            w.count(Outcome::Processed) == 7
        })
        .await;
    assert_eq!(setup.applied("g-5").await, 0, "g-5 waits for its lock");
    holder.rollback().await.expect("release the lock");
    setup.drained().await;
    worker
        .wait_for("all processed", |w| w.count(Outcome::Processed) == 8)
        .await;
    for transfer in &batch {
        assert_eq!(setup.applied(&transfer.id).await, 1, "{}", transfer.id);
    }
    assert_eq!(setup.balances().await, (920, 1080));
    worker.stop().await;
}

#[tokio::test]
async fn a_reused_key_never_gets_two_owners_when_a_group_member_is_dead_lettered() {
    let setup = Setup::new().await;
    // The first payload under g-1 fails for good inside a group, slowly;
    // meanwhile another payload reuses g-1 (and would succeed) and waits
    // for its row. Exactly one of them may own the key — applied, or
    // dead-lettered for its own failure — and the other is a key conflict.
    // (Found by the soak: the group's rollback freed the key, the waiting
    // payload took it, and the first was still dead-lettered for its own
    // failure: two owners.)
    let mut batch = transfers(4);
    batch[1].poison = true;
    batch[1].sleep_ms = 1_500;
    setup.publish_all(&batch).await;
    // Two groups at once: the reused payload's group claims while the
    // first one's still runs, and waits for g-1's row.
    let worker = setup.groups_worker(8, 16).await;
    sleep(Duration::from_millis(500)).await;
    setup.publish(&transfer("g-1", 99), "g-1-reused").await;
    setup.drained().await;
    worker
        .wait_for("all five answered", |w| {
            w.count(Outcome::Processed) + w.count(Outcome::DeadLettered) == 5
        })
        .await;
    assert_eq!(
        worker.count(Outcome::KeyConflict),
        1,
        "one payload under g-1 is refused as a key conflict"
    );
    let applied = setup.applied("g-1").await;
    let balances = setup.balances().await;
    if applied == 1 {
        // The reused payload took the key: the poison is the conflict.
        assert_eq!(worker.count(Outcome::Processed), 4);
        assert_eq!(balances, (970 - 99, 1030 + 99));
    } else {
        // The poison kept it: dead-lettered for its failure.
        assert_eq!(applied, 0);
        assert_eq!(worker.count(Outcome::Processed), 3);
        assert_eq!(balances, (970, 1030));
    }
    worker.stop().await;
}

/// Transfers that each move 1 between two of ten accounts, the account
/// named lower first — the usual cure for deadlocks: every transfer locks
/// its rows in one order, so that alone (`batch = 1`) none ever waits in a
/// circle. A group's transaction holds the rows of all its members, in no
/// order, and meets other groups in circles: those deadlocks are the
/// grouping's, and must cost no transfer an attempt.
#[tokio::test]
async fn deadlocks_between_groups_use_up_no_retries_and_dead_letter_nothing() {
    const ACCOUNTS: usize = 10;
    const TRANSFERS: usize = 300;
    let setup = Setup::new().await;
    let s = &setup.ledger.schema;
    for a in 0..ACCOUNTS {
        sqlx::query(&format!("INSERT INTO \"{s}\".accounts VALUES ($1, 1000)"))
            .bind(format!("acct-{a}"))
            .execute(setup.db.pool())
            .await
            .expect("an account");
    }
    let mut seed = 7u64;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from(seed >> 33).expect("31 bits") % n
    };
    let batch: Vec<Transfer> = (0..TRANSFERS)
        .map(|i| {
            let a = next(ACCOUNTS);
            let b = (a + 1 + next(ACCOUNTS - 1)) % ACCOUNTS;
            Transfer {
                from: format!("acct-{}", a.min(b)),
                to: format!("acct-{}", a.max(b)),
                ..transfer(&format!("d-{i}"), 1)
            }
        })
        .collect();
    setup.publish_all(&batch).await;
    // PostgreSQL looks for a deadlock after this long: soon, so that the
    // test meets many.
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET deadlock_timeout = '20ms'")
                    .execute(conn)
                    .await
                    .map(drop)
            })
        })
        .connect(setup.db.url())
        .await
        .expect("a pool");
    let tune = |config: HandlerConfig| config.batch(8).concurrency(32).start(StartAt::All);
    let workers = [
        setup.tuned_worker(pool.clone(), |b| b, tune).await,
        setup.tuned_worker(pool.clone(), |b| b, tune).await,
    ];
    setup.drained().await;
    let total = |outcome| workers.iter().map(|w| w.count(outcome)).sum::<u64>();
    eventually("every transfer processed", || {
        total(Outcome::Processed) == TRANSFERS as u64
    })
    .await;
    let (applied, distinct): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT transfer) FROM \"{s}\".applied"
    ))
    .fetch_one(setup.db.pool())
    .await
    .expect("count the applied transfers");
    assert_eq!((applied, distinct), (TRANSFERS as i64, TRANSFERS as i64));
    let money: i64 = sqlx::query_scalar(&format!(
        "SELECT sum(balance)::bigint FROM \"{s}\".accounts"
    ))
    .fetch_one(setup.db.pool())
    .await
    .expect("the money");
    assert_eq!(money, 2_000 + 1_000 * ACCOUNTS as i64, "money conserved");
    assert!(
        total(Outcome::LockConflict) > 0,
        "the groups met in deadlocks (else this test shows nothing)"
    );
    assert_eq!(
        total(Outcome::Retried),
        0,
        "no deadlock counted as an attempt"
    );
    assert_eq!(total(Outcome::DeadLettered), 0);
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test]
async fn a_transactional_duplicate_is_handed_its_receipt_alone_and_in_a_group() {
    let setup = Setup::new().await;
    let announced = || {
        setup
            .ledger
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    };
    let publish = |id: String, message_id: String| {
        let js = setup.js.clone();
        async move {
            let body = serde_json::to_vec(&transfer(&id, 1)).expect("json");
            js.send_publish(
                "ledger.receipts",
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(message_id),
            )
            .await
            .expect("publish")
            .await
            .expect("PubAck");
        }
    };
    for batch in [1, 8] {
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = Runtime::builder(async_nats::connect(&setup.url).await.expect("connect"))
            .state(setup.ledger.clone())
            .postgres(setup.db.pool().clone(), setup.db.schema())
            .handler_with(issue_receipt, move |c| c.batch(batch).start(StartAt::All))
            .shutdown_on(async {
                let _ = stopped.await;
            })
            .build()
            .await
            .expect("runtime");
        let stats = runtime.stats();
        let task = tokio::spawn(runtime.run());
        let count = |outcome| stats.handler("issue_receipt").get(outcome);
        let before = announced();
        let (processed, duplicates) = (count(Outcome::Processed), count(Outcome::Duplicate));
        let ids: Vec<String> = (0..4).map(|i| format!("r{batch}-{i}")).collect();
        for id in &ids {
            publish(id.clone(), format!("{id}-first")).await;
        }
        eventually("applied", || count(Outcome::Processed) == processed + 4).await;
        // Resent under new message ids: duplicates, ready together (a group
        // when batch > 1).
        for id in &ids {
            publish(id.clone(), format!("{id}-again")).await;
        }
        eventually("the duplicates answered", || {
            count(Outcome::Duplicate) == duplicates + 4
        })
        .await;
        eventually("every duplicate's hook ran", || announced() == before + 4).await;
        assert_eq!(count(Outcome::DeadLettered), 0, "batch {batch}");
        for id in &ids {
            assert_eq!(setup.applied(id).await, 1, "{id}");
        }
        let _ = stop.send(());
        task.await.expect("task").expect("runtime");
    }
}

async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        sleep(Duration::from_millis(20)).await;
    }
}
