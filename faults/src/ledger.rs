//! The effect log: every execution of every handler's effect is one row of
//! `<schema>.effects`, which has no unique constraint — it shows exactly
//! what deduplication let through. The `kv` and `off` handlers insert their
//! row on its own (the effect happens, whatever idem does next); the
//! `transactional` handler inserts it in the handler's transaction, so only
//! committed executions appear.
//!
//! A second table, `started`, notes when a worker enters a long handler, so
//! that the driver can aim a kill or a freeze at a handler in progress; a
//! third, `fixed`, holds the keys whose scripted permanent failure the
//! operator has "fixed" before replaying their dead letters.

use sqlx::postgres::{PgArguments, PgPool};
use sqlx::{Postgres, Row};

use crate::order::{Level, Order};

/// One execution of an effect.
#[derive(Clone, Debug)]
pub struct Execution {
    /// Whose effect.
    pub level: Level,
    /// The idempotency key.
    pub key: String,
    /// The payload's value.
    pub value: u64,
    /// The worker process (`w<slot>.<generation>`).
    pub worker: String,
    /// When the handler started, µs since the epoch (one machine, one clock).
    pub started_us: i64,
    /// When the effect was written.
    pub ended_us: i64,
}

impl Execution {
    /// Whether two executions ran at the same time.
    pub fn overlaps(&self, other: &Execution) -> bool {
        self.started_us < other.ended_us && other.started_us < self.ended_us
    }
}

/// The effect table of `schema`.
#[derive(Clone, Debug)]
pub struct Ledger {
    table: String,
    insert_sql: String,
    started: String,
    runs: String,
    fixed: String,
}

impl Ledger {
    /// The ledger in `schema` (created by [`create`](Self::create)).
    pub fn new(schema: &str) -> Self {
        let schema = format!("\"{}\"", schema.replace('"', "\"\""));
        let table = format!("{schema}.effects");
        let insert_sql = format!(
            "INSERT INTO {table} (handler, key, value, worker, started_us, ended_us) \
             VALUES ($1, $2, $3, $4, $5, $6)"
        );
        let started = format!("{schema}.started");
        let runs = format!("{schema}.runs");
        let fixed = format!("{schema}.fixed");
        Self {
            table,
            insert_sql,
            started,
            runs,
            fixed,
        }
    }

    /// Creates the table.
    pub async fn create(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "CREATE TABLE {} (handler text NOT NULL, key text NOT NULL, value bigint NOT NULL, \
             worker text NOT NULL, started_us bigint NOT NULL, ended_us bigint NOT NULL)",
            self.table
        ))
        .execute(pool)
        .await?;
        sqlx::query(&format!(
            "CREATE TABLE {} (worker text NOT NULL, key text NOT NULL, until_us bigint NOT NULL)",
            self.started
        ))
        .execute(pool)
        .await?;
        sqlx::query(&format!(
            "CREATE TABLE {} (handler text NOT NULL, key text NOT NULL, value bigint NOT NULL, \
             runs integer NOT NULL, PRIMARY KEY (handler, key, value))",
            self.runs
        ))
        .execute(pool)
        .await?;
        sqlx::query(&format!(
            "CREATE TABLE {} (handler text NOT NULL, key text NOT NULL, PRIMARY KEY (handler, key))",
            self.fixed
        ))
        .execute(pool)
        .await?;
        Ok(())
    }

    /// "Fixes" the handler's permanent failure for `key`: from now on its
    /// runs succeed (the operator's fix before a replay).
    pub async fn fix(&self, pool: &PgPool, level: Level, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {} (handler, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            self.fixed
        ))
        .bind(level.handler())
        .bind(key)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Whether the operator fixed the handler's permanent failure for `key`.
    pub async fn is_fixed(
        &self,
        pool: &PgPool,
        level: Level,
        key: &str,
    ) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE handler = $1 AND key = $2)",
            self.fixed
        ))
        .bind(level.handler())
        .bind(key)
        .fetch_one(pool)
        .await?;
        row.try_get(0)
    }

    /// Counts one run of a handler for `order` (on its own, outside any
    /// transaction: failed runs count) and returns its number, from 1.
    /// Not an effect: the scripted behaviours key on it.
    pub async fn count_run(
        &self,
        pool: &PgPool,
        level: Level,
        order: &Order,
    ) -> Result<u32, sqlx::Error> {
        let row = sqlx::query(&format!(
            "INSERT INTO {t} (handler, key, value, runs) VALUES ($1, $2, $3, 1) \
             ON CONFLICT (handler, key, value) DO UPDATE SET runs = {t}.runs + 1 RETURNING runs",
            t = self.runs
        ))
        .bind(level.handler())
        .bind(&order.key)
        .bind(i64::try_from(order.value).unwrap_or(i64::MAX))
        .fetch_one(pool)
        .await?;
        Ok(u32::try_from(row.try_get::<i32, _>(0)?).unwrap_or(0))
    }

    /// Notes that `worker` is inside a long handler until `until_us`, so
    /// the driver can aim a fault at a handler in progress. Not an effect.
    pub async fn note_started(
        &self,
        pool: &PgPool,
        worker: &str,
        order: &Order,
        until_us: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {} (worker, key, until_us) VALUES ($1, $2, $3)",
            self.started
        ))
        .bind(worker)
        .bind(&order.key)
        .bind(until_us)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Whether `worker` is inside a long handler that runs for at least
    /// `margin_us` more.
    pub async fn in_handler(
        &self,
        pool: &PgPool,
        worker: &str,
        margin_us: i64,
    ) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE worker = $1 AND until_us > $2)",
            self.started
        ))
        .bind(worker)
        .bind(now_us() + margin_us)
        .fetch_one(pool)
        .await?;
        row.try_get(0)
    }

    /// The insert of one execution, to run on a pool or in a transaction.
    pub fn insert<'q>(
        &'q self,
        level: Level,
        order: &'q Order,
        worker: &'q str,
        started_us: i64,
    ) -> sqlx::query::Query<'q, Postgres, PgArguments> {
        sqlx::query(&self.insert_sql)
            .bind(level.handler())
            .bind(&order.key)
            .bind(i64::try_from(order.value).unwrap_or(i64::MAX))
            .bind(worker)
            .bind(started_us)
            .bind(now_us())
    }

    /// Every execution, in start order.
    pub async fn read(&self, pool: &PgPool) -> Result<Vec<Execution>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT handler, key, value, worker, started_us, ended_us FROM {} ORDER BY started_us",
            self.table
        ))
        .fetch_all(pool)
        .await?;
        let mut executions = Vec::with_capacity(rows.len());
        for row in rows {
            let handler: String = row.try_get("handler")?;
            let Some(level) = Level::of_handler(&handler) else {
                return Err(sqlx::Error::Decode(
                    format!("unknown handler {handler:?} in the ledger").into(),
                ));
            };
            executions.push(Execution {
                level,
                key: row.try_get("key")?,
                value: u64::try_from(row.try_get::<i64, _>("value")?).unwrap_or(0),
                worker: row.try_get("worker")?,
                started_us: row.try_get("started_us")?,
                ended_us: row.try_get("ended_us")?,
            });
        }
        Ok(executions)
    }
}

/// Microseconds since the epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
