//! The worker process of the suite (`idem-faults worker …`, started by the
//! driver): runs one handler per dedup level and writes every execution of
//! its effect to the ledger. Logs are JSON lines on stderr (the driver keeps
//! them: they carry the runtime's `reclaimed` and `lease_lost` events with
//! their keys). Stops gracefully on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use crate::ledger::{Ledger, now_us};
use crate::order::{Level, Order};
use clap::Parser;
use idem::store::KvStoreConfig;
use idem::{HandlerError, Json, Runtime, State, Tx, idempotent};
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

/// Works, then writes its effect on its own.
#[idempotent(stream = "FAULTS", start = all, subject = "faults.kv", key = order.key, lease = "2s")]
async fn kv_effect(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    let started = effects.work(&order).await?;
    effects.write_alone(Level::Kv, &order, started).await?;
    Ok(())
}

/// Works, then writes its effect in the handler's transaction.
#[idempotent(stream = "FAULTS", start = all, subject = "faults.tx", key = order.key, dedup = transactional, lease = "2s")]
async fn tx_effect(
    Json(order): Json<Order>,
    tx: Tx,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    let started = effects.work(&order).await?;
    effects
        .ledger
        .insert(Level::Transactional, &order, &effects.worker, started)
        .execute(&mut *tx.conn().await?)
        .await?;
    Ok(())
}

/// No deduplication: at least once.
#[idempotent(stream = "FAULTS", start = all, subject = "faults.off", key = order.key, dedup = off)]
async fn off_effect(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    let started = now_us();
    tokio::time::sleep(Duration::from_millis(order.work_ms)).await;
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
        .shutdown_grace(Duration::from_secs(5))
        .handler(kv_effect)
        .handler(tx_effect)
        .handler(off_effect)
        .run()
        .await?;
    Ok(())
}
