//! `dedup = transactional`: money moves between accounts in PostgreSQL, and
//! each transfer is applied exactly once — the claim row commits in the same
//! transaction as the balances, so no crash can separate them. Each applied
//! transfer emits `TransferCompleted` through the transactional outbox.
//!
//! Injected: transfers resent with new message ids, every 5th ack lost, and
//! a worker stopped abruptly mid-stream (its open transactions roll back).
//!
//! ```text
//! cargo run --example ledger_transfer
//! ```
//!
//! Needs PostgreSQL at `DATABASE_URL` (default
//! postgres://postgres@127.0.0.1:5432/test; it creates and drops the schema
//! `idem_example_ledger`) and NATS at `NATS_URL` or 127.0.0.1:4222 (a
//! throw-away nats-server is started if none listens).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage, stream};
use idem::consumer::Outcome;
use idem::outbox::PgOutbox;
use idem::publisher::Outgoing;
use idem::store::PgStore;
use idem::testing::DEFAULT_DATABASE_URL;
use idem::{HandlerError, Json, Retry, Runtime, State, Tx, idempotent};
use serde::{Deserialize, Serialize};

const SCHEMA: &str = "idem_example_ledger";
const ACCOUNTS: i64 = 10;
const TRANSFERS: usize = 300;
const RESENT: usize = 30;

#[derive(Debug, Serialize, Deserialize)]
struct Transfer {
    id: String,
    from: i64,
    to: i64,
    amount: i64,
}

#[derive(Serialize)]
struct TransferCompleted<'a> {
    id: &'a str,
    amount: i64,
}

#[derive(Clone)]
struct Ledger {
    outbox: PgOutbox,
}

/// Applies a transfer and announces it, in one transaction.
#[idempotent(
    stream = "IDEM_EXAMPLE_LEDGER",
    start = all, // a new consumer handles what the stream already holds
    subject = "example.ledger.transfers",
    key = transfer.id,
    dedup = transactional,
    lease = "3s",
    retry = Retry::exponential("50ms", "1s").attempts(5).jitter(),
)]
async fn apply_transfer(
    Json(transfer): Json<Transfer>,
    tx: Tx,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    // Lock accounts in id order: two opposite transfers would otherwise
    // deadlock (PostgreSQL aborts one, and it is retried).
    let mut legs = [
        (transfer.from, -transfer.amount),
        (transfer.to, transfer.amount),
    ];
    legs.sort();
    for (account, delta) in legs {
        sqlx::query(&format!(
            "UPDATE {SCHEMA}.accounts SET balance = balance + $1 WHERE id = $2"
        ))
        .bind(delta)
        .bind(account)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(&format!(
        "INSERT INTO {SCHEMA}.applied (transfer) VALUES ($1)"
    ))
    .bind(&transfer.id)
    .execute(&mut *conn)
    .await?;
    let event = Outgoing::json(
        "example.transfers.completed",
        &TransferCompleted {
            id: &transfer.id,
            amount: transfer.amount,
        },
    )?
    .with_id(format!("completed-{}", transfer.id));
    ledger.outbox.enqueue(&mut conn, event).await?;
    Ok(())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Dev helper: $NATS_URL, or a throw-away nats-server for this run.
    let (client, _nats) = idem::testing::LocalNats::connect().await?;
    let database =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&database)
        .await
        .map_err(|e| format!("PostgreSQL at {database}: {e} (set DATABASE_URL)"))?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .execute(&pool)
        .await?;
    PgStore::migrate(&pool, SCHEMA).await?;
    for statement in [
        format!("CREATE TABLE {SCHEMA}.accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL)"),
        format!("CREATE TABLE {SCHEMA}.applied (transfer TEXT NOT NULL)"),
        format!(
            "INSERT INTO {SCHEMA}.accounts SELECT g, 10000 FROM generate_series(1, {ACCOUNTS}) g"
        ),
    ] {
        sqlx::query(&statement).execute(&pool).await?;
    }

    let js = jetstream::new(client.clone());
    for (name, subjects) in [
        ("IDEM_EXAMPLE_LEDGER", "example.ledger.>"),
        ("IDEM_EXAMPLE_TRANSFERS", "example.transfers.>"),
    ] {
        let _ = js.delete_stream(name).await;
        js.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            ..Default::default()
        })
        .await?;
    }

    let before = total(&pool).await?;
    let transfers: Vec<Transfer> = (0..TRANSFERS)
        .map(|i| Transfer {
            id: format!("tr-{i}"),
            from: (i as i64 % ACCOUNTS) + 1,
            to: ((i as i64 * 7 + 3) % ACCOUNTS) + 1,
            amount: 10 + (i as i64 % 90),
        })
        .collect();
    for transfer in transfers.iter().chain(&transfers[..RESENT]) {
        let body = serde_json::to_vec(transfer)?;
        let message = PublishMessage::build()
            .payload(body.into())
            .message_id(uuid::Uuid::now_v7().to_string());
        js.send_publish("example.ledger.transfers", message)
            .await?
            .await?;
    }

    // Handlers enqueue TransferCompleted events in their transaction; each
    // runtime relays them as the transactions commit.
    let outbox = PgOutbox::open(pool.clone(), SCHEMA).await?;

    // Worker 1 loses every 5th ack and is stopped abruptly after a while.
    let (stop_first, first_stopped) = tokio::sync::oneshot::channel::<()>();
    let first = Runtime::builder(client.clone())
        .state(Ledger {
            outbox: outbox.clone(),
        })
        .postgres(pool.clone(), SCHEMA)
        .relay(outbox.clone())
        .handler(apply_transfer)
        .drop_every_nth_ack(5)
        .shutdown_grace(Duration::ZERO)
        .shutdown_on(async {
            let _ = first_stopped.await;
        })
        .build()
        .await?;
    let first_stats = first.stats();
    let first = tokio::spawn(first.run());
    while first_stats
        .handler("apply_transfer")
        .get(Outcome::Processed)
        < 100
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_first.send(());
    first.await??;

    // Worker 2 takes over; redeliveries of worker 1's unacked messages are duplicates.
    let (stop_second, second_stopped) = tokio::sync::oneshot::channel::<()>();
    let second = Runtime::builder(client.clone())
        .state(Ledger {
            outbox: outbox.clone(),
        })
        .postgres(pool.clone(), SCHEMA)
        .relay(outbox.clone())
        .handler(apply_transfer)
        .shutdown_on(async {
            let _ = second_stopped.await;
        })
        .build()
        .await?;
    let second_stats = second.stats();
    let second = tokio::spawn(second.run());
    let mut consumer: PullConsumer = js
        .get_stream("IDEM_EXAMPLE_LEDGER")
        .await?
        .get_consumer("apply_transfer")
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let info = consumer.info().await?.clone();
        if info.num_pending == 0 && info.num_ack_pending == 0 && outbox.pending().await? == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the ledger did not settle within 90 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_second.send(());
    second.await??;

    let after = total(&pool).await?;
    let applied: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {SCHEMA}.applied"))
        .fetch_one(&pool)
        .await?;
    let distinct: i64 = sqlx::query_scalar(&format!(
        "SELECT count(DISTINCT transfer) FROM {SCHEMA}.applied"
    ))
    .fetch_one(&pool)
    .await?;
    let events = js
        .get_stream("IDEM_EXAMPLE_TRANSFERS")
        .await?
        .cached_info()
        .state
        .messages;
    let (a, b) = (
        first_stats.handler("apply_transfer"),
        second_stats.handler("apply_transfer"),
    );
    let count = |o| a.get(o) + b.get(o);

    println!();
    println!(
        "transfers published              {TRANSFERS:>5}  (+{RESENT} resent with new message ids)"
    );
    println!("acks lost on purpose             every 5th, by worker 1");
    println!(
        "worker 1 stopped abruptly after   {:>4} transfers (its open transactions rolled back)",
        a.get(Outcome::Processed)
    );
    println!(
        "applied by worker 1 / worker 2    {:>4} / {}",
        a.get(Outcome::Processed),
        b.get(Outcome::Processed)
    );
    println!(
        "duplicates answered, not run      {:>4}",
        count(Outcome::Duplicate)
    );
    println!(
        "retried after a database error    {:>4}",
        count(Outcome::Retried)
    );
    println!(
        "dead letters                      {:>4}",
        count(Outcome::DeadLettered)
    );
    println!("transfers applied (rows)          {applied:>4}  distinct: {distinct}");
    println!("TransferCompleted events          {events:>4}");
    println!("sum of balances before / after   {before} / {after}");

    sqlx::query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .execute(&pool)
        .await?;
    for name in ["IDEM_EXAMPLE_LEDGER", "IDEM_EXAMPLE_TRANSFERS"] {
        let _ = js.delete_stream(name).await;
    }
    if before == after
        && applied == TRANSFERS as i64
        && distinct == applied
        && events == TRANSFERS as u64
    {
        println!("\neach transfer applied exactly once, money conserved: ok");
        Ok(())
    } else {
        Err("the ledger invariant does not hold".into())
    }
}

async fn total(pool: &sqlx::PgPool) -> Result<i64, BoxError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT sum(balance)::bigint FROM {SCHEMA}.accounts"
    ))
    .fetch_one(pool)
    .await?)
}
