//! The worker process of the suite (`idem-faults worker …`, started by the
//! driver): runs one handler per dedup level and writes every execution of
//! its effect to the ledger. Logs are JSON lines on stderr (the driver keeps
//! them: they carry the runtime's `reclaimed` and `lease_lost` events with
//! their keys). Stops gracefully on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use crate::ledger::{Ledger, now_us};
use crate::order::{ATTEMPTS, Behaviour, Level, Order};
use clap::Parser;
use idem::clock::SkewedClock;
use idem::store::KvStoreConfig;
use idem::{HandlerError, Json, Retry, Runtime, State, Tx, idempotent};
use sqlx::PgPool;

/// What the handlers share.
#[derive(Clone)]
struct Effects {
    ledger: Ledger,
    pool: PgPool,
    worker: Arc<str>,
}

impl Effects {
    /// The handler's work before its effect: `order.work_ms` of waiting,
    /// announced in the ledger when long enough for the driver to aim at.
    /// Returns when it started.
    async fn work(&self, order: &Order) -> Result<i64, sqlx::Error> {
        let started = now_us();
        if order.work_ms >= LONG_WORK_MS {
            let until = started + i64::try_from(order.work_ms * 1_000).unwrap_or(i64::MAX);
            self.ledger
                .note_started(&self.pool, &self.worker, order, until)
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(order.work_ms)).await;
        Ok(started)
    }

    /// Writes the effect on its own, outside any transaction: once written
    /// it stays, whatever idem does next.
    async fn write_alone(
        &self,
        level: Level,
        order: &Order,
        started: i64,
    ) -> Result<(), sqlx::Error> {
        self.ledger
            .insert(level, order, &self.worker, started)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Work this long is announced (see [`Ledger::note_started`]).
const LONG_WORK_MS: u64 = 20;

/// Where the workload's scripted panics are raised: a panic reported from
/// anywhere else escaped the runtime.
pub const SCRIPTED_PANIC_AT: &str = "faults/src/worker.rs";

impl Effects {
    /// Counts this run of the handler for `order` (in its own transaction,
    /// so failed runs count too) and acts out the order's behaviour before
    /// the effect: a retryable error on the first runs, a permanent error
    /// (until the operator fixes it), or a panic. Returns the run's number.
    async fn act_out(&self, level: Level, order: &Order) -> Result<u32, HandlerError> {
        let run = self.ledger.count_run(&self.pool, level, order).await?;
        match order.behaviour {
            Behaviour::FailTimes(n) if run <= n => Err(HandlerError::retryable(format!(
                "scripted failure {run} of {n}"
            ))),
            Behaviour::FailPermanently
                if !self.ledger.is_fixed(&self.pool, level, &order.key).await? =>
            {
                Err(HandlerError::permanent("scripted permanent failure"))
            }
            Behaviour::Panic => panic!("scripted panic in {} run {run}", order.key),
            _ => Ok(run),
        }
    }
}

/// The handlers' retry policy: quick, with room for a takeover or two
/// among the scripted failures.
fn retry() -> Retry {
    Retry::fixed("100ms").attempts(ATTEMPTS)
}

/// Works, then writes its effect on its own.
#[idempotent(stream = "FAULTS", start = all, subject = "faults.kv", key = order.key, lease = "2s", retry = retry())]
async fn kv_effect(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    let started = effects.work(&order).await?;
    effects.act_out(Level::Kv, &order).await?;
    effects.write_alone(Level::Kv, &order, started).await?;
    Ok(())
}

/// A second service's handler whose function is also `kv_effect`: the
/// same keys, its own claims (`name`).
mod twin {
    use super::*;

    #[idempotent(name = "kv_twin", stream = "FAULTS", start = all, subject = "faults.twin", key = order.key, lease = "2s", retry = retry())]
    pub(super) async fn kv_effect(
        Json(order): Json<Order>,
        State(effects): State<Effects>,
    ) -> Result<(), HandlerError> {
        let started = effects.work(&order).await?;
        effects.act_out(Level::Twin, &order).await?;
        effects.write_alone(Level::Twin, &order, started).await?;
        Ok(())
    }
}

/// `kv_effect` again, its claims kept only
/// [`SHORT_RETENTION`](crate::order::SHORT_RETENTION) (in a bucket of that
/// retention, [`SHORT_BUCKET`](crate::order::SHORT_BUCKET)).
mod short {
    use super::*;

    #[idempotent(name = "kv_short", stream = "FAULTS", start = all, subject = "faults.short", key = order.key, lease = "2s", retention = "3s", retry = retry())]
    pub(super) async fn kv_effect(
        Json(order): Json<Order>,
        State(effects): State<Effects>,
    ) -> Result<(), HandlerError> {
        let started = effects.work(&order).await?;
        effects.act_out(Level::Short, &order).await?;
        effects.write_alone(Level::Short, &order, started).await?;
        Ok(())
    }
}

/// Works, then writes its effect in the handler's transaction.
#[idempotent(stream = "FAULTS", start = all, subject = "faults.tx", key = order.key, dedup = transactional, lease = "2s", retry = retry())]
async fn tx_effect(
    Json(order): Json<Order>,
    tx: Tx,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    let started = effects.work(&order).await?;
    let run = effects.act_out(Level::Transactional, &order).await?;
    let mut conn = tx.conn().await?;
    effects
        .ledger
        .insert(Level::Transactional, &order, &effects.worker, started)
        .execute(&mut *conn)
        .await?;
    if order.behaviour == Behaviour::SwallowFailedStatement && run == 1 {
        // A bug in user code: the failed statement aborts the transaction
        // and its error is ignored. The effect above must not commit.
        let _ = sqlx::query("SELECT 1 / 0").execute(&mut *conn).await;
    }
    Ok(())
}

/// No deduplication: at least once.
#[idempotent(stream = "FAULTS", start = all, subject = "faults.off", key = order.key, dedup = off, retry = retry())]
async fn off_effect(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    let started = now_us();
    tokio::time::sleep(Duration::from_millis(order.work_ms)).await;
    effects.act_out(Level::Off, &order).await?;
    effects.write_alone(Level::Off, &order, started).await?;
    Ok(())
}

/// A fault-suite worker.
#[derive(Parser, Debug)]
pub struct WorkerArgs {
    /// The NATS URLs to connect to (the driver's proxies); discovered
    /// servers are ignored, so every byte passes a proxy.
    #[arg(long = "nats", required = true)]
    pub nats: Vec<String>,
    /// The PostgreSQL database.
    #[arg(long)]
    pub database_url: String,
    /// The schema holding the ledger and idem's tables.
    #[arg(long)]
    pub schema: String,
    /// This process's name in the ledger.
    #[arg(long)]
    pub worker: String,
    /// Replicas of the claim bucket.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// How far this worker's wall clock is off, in seconds (negative:
    /// behind): leases must not depend on workers' clocks agreeing.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub clock_skew_secs: i64,
}

/// Runs until SIGTERM.
pub async fn run(args: WorkerArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // `idem=info` keeps the per-message span (handler, key) that the
    // runtime's `reclaimed` and `lease_lost` warnings are read with.
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,idem=info")),
        )
        .init();
    let client = async_nats::ConnectOptions::new()
        .ignore_discovered_servers()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(args.nats.as_slice())
        .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&args.database_url)
        .await?;
    let effects = Effects {
        ledger: Ledger::new(&args.schema),
        pool: pool.clone(),
        worker: args.worker.into(),
    };
    Runtime::builder(client)
        .state(effects)
        .postgres(pool, &args.schema)
        .claims(KvStoreConfig::default().replicas(args.replicas))
        .wall_clock(SkewedClock::by_millis(
            args.clock_skew_secs.saturating_mul(1_000),
        ))
        // Short: a rolling restart cuts slow handlers off mid-effect.
        .shutdown_grace(Duration::from_millis(150))
        .handler(kv_effect)
        .handler(twin::kv_effect)
        .handler(short::kv_effect)
        .handler(tx_effect)
        .handler(off_effect)
        .run()
        .await?;
    Ok(())
}
