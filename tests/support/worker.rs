//! A worker *process* for crash tests: runs one `#[idempotent]` handler
//! whose every execution is appended (and fsynced) to an effect log, so a
//! test can SIGKILL it mid-handler and count what really happened.
//!
//! ```text
//! idem-test-worker <nats-url> <effect-log> <handler-sleep-ms>
//! idem-test-worker <nats-url> <effect-log> <handler-sleep-ms> pg <database-url> <schema> [lose-acks]
//! ```
//!
//! The first form runs a `kv` handler on `crash.orders`; the second a
//! `transactional` one on `crash.transfers`, whose effect is a row in
//! `<schema>.applied` written in the handler's transaction (`lose-acks`:
//! commit but never acknowledge, as a crash between the two would). Runs
//! until SIGTERM or SIGKILL.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use idem::{HandlerError, Json, Runtime, State, idempotent};

/// Where effects are written, and how long each takes.
#[derive(Clone)]
struct Effects {
    log: Arc<PathBuf>,
    sleep: Duration,
}

impl Effects {
    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&*self.log)?;
        writeln!(file, "{line} {}", std::process::id())?;
        file.sync_all()
    }
}

#[idempotent(stream = "CRASH", start = all, subject = "crash.orders", key = order, lease = "2s")]
async fn crash_handler(
    Json(order): Json<String>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.append(&format!("start {order}"))?;
    tokio::time::sleep(effects.sleep).await;
    effects.append(&format!("end {order}"))?;
    Ok(())
}

/// The effect is a row in the handler's transaction; the log records every
/// execution, committed or not.
#[idempotent(stream = "CRASH", start = all, subject = "crash.transfers", key = order, dedup = transactional, lease = "2s")]
async fn tx_crash_handler(
    Json(order): Json<String>,
    tx: idem::Tx,
    State(effects): State<Effects>,
    State(schema): State<Schema>,
) -> Result<(), HandlerError> {
    effects.append(&format!("start {order}"))?;
    sqlx::query(&format!(
        "INSERT INTO \"{}\".applied (transfer) VALUES ($1)",
        schema.0
    ))
    .bind(&order)
    .execute(&mut *tx.conn().await?)
    .await?;
    tokio::time::sleep(effects.sleep).await;
    effects.append(&format!("end {order}"))?;
    Ok(())
}

/// The schema of the transactional mode.
#[derive(Clone)]
struct Schema(String);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: idem-test-worker <nats-url> <effect-log> <handler-sleep-ms> [pg <database-url> <schema> [lose-acks]]";
    let url = args.next().ok_or(usage)?;
    let log = PathBuf::from(args.next().ok_or(usage)?);
    let sleep_ms: u64 = args.next().ok_or(usage)?.parse()?;
    let client = async_nats::connect(url).await?;
    let effects = Effects {
        log: Arc::new(log),
        sleep: Duration::from_millis(sleep_ms),
    };
    let builder = Runtime::builder(client).state(effects);
    match args.next().as_deref() {
        None => builder.handler(crash_handler).run().await?,
        Some("pg") => {
            let database = args.next().ok_or(usage)?;
            let schema = args.next().ok_or(usage)?;
            let pool = sqlx::PgPool::connect(&database).await?;
            let builder = builder
                .postgres(pool, &schema)
                .state(Schema(schema))
                .handler(tx_crash_handler);
            let builder = match args.next().as_deref() {
                Some("lose-acks") => builder.drop_every_nth_ack(1),
                _ => builder,
            };
            builder.run().await?;
        }
        Some(_) => return Err(usage.into()),
    }
    Ok(())
}
