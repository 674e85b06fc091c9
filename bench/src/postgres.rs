//! The PostgreSQL side of the transactional scenario: a schema of the
//! bench's own with idem's tables and a one-row effect table.

use std::time::Duration;

use idem::testing::TestDatabase;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::BoxError;

/// Connections the handlers share: enough for every concurrency measured
/// on a 2-core machine, where PostgreSQL itself is the limit.
const POOL_SIZE: u32 = 16;

/// A schema dropped when this is dropped.
pub struct Postgres {
    _database: TestDatabase,
    pub pool: PgPool,
    pub schema: String,
}

impl Postgres {
    pub async fn create() -> Result<Self, BoxError> {
        let database = TestDatabase::create().await.map_err(|e| {
            format!("{e}; the transactional scenario needs PostgreSQL (set DATABASE_URL)")
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect(database.url())
            .await?;
        let schema = database.schema().to_owned();
        for table in [
            "bench_effects (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)",
            // The hand-written inbox of the naive transactional baseline.
            "naive_processed (id TEXT PRIMARY KEY)",
        ] {
            sqlx::query(&format!("CREATE TABLE {schema}.{table}"))
                .execute(&pool)
                .await?;
        }
        Ok(Self {
            _database: database,
            pool,
            schema,
        })
    }

    /// Fills the inbox with `rows` completed rows of another handler, with
    /// 16-byte fingerprints as real ones have; the first `expired` of them
    /// last written eight days ago (past the default retention), the rest
    /// now. Returns how long it took.
    pub async fn fill_inbox(&self, rows: usize, expired: usize) -> Result<Duration, BoxError> {
        let started = std::time::Instant::now();
        let schema = &self.schema;
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis(),
        )?;
        let old = now - 8 * 24 * 3600 * 1000;
        let rows = i64::try_from(rows)?;
        let expired = i64::try_from(expired)?;
        // In slices, so that no one statement holds a huge transaction.
        let slice = 1_000_000;
        let mut from = 0;
        while from < rows {
            let to = (from + slice).min(rows);
            sqlx::query(&format!(
                "INSERT INTO {schema}.idem_inbox (handler, key, state, owner, attempt, fingerprint, created_at, updated_at) \
                 SELECT 'filler', 'order-' || g, 'done', gen_random_uuid(), 1, \
                        substr(sha256(g::text::bytea), 1, 16), t, t \
                 FROM generate_series($1::bigint, $2::bigint - 1) AS g, \
                      LATERAL (SELECT CASE WHEN g < $3 THEN $4::bigint ELSE $5::bigint END AS t) AS at"
            ))
            .bind(from)
            .bind(to)
            .bind(expired)
            .bind(old)
            .bind(now)
            .execute(&self.pool)
            .await?;
            from = to;
        }
        sqlx::query(&format!("VACUUM ANALYZE {schema}.idem_inbox"))
            .execute(&self.pool)
            .await?;
        Ok(started.elapsed())
    }

    /// The inbox table's size on disk, with its indexes, MiB.
    pub async fn inbox_mib(&self) -> Result<f64, BoxError> {
        let bytes: i64 = sqlx::query_scalar(&format!(
            "SELECT pg_total_relation_size('{}.idem_inbox')",
            self.schema
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(bytes as f64 / 1048576.0)
    }

    /// Empties the inbox and the effects between runs.
    pub async fn reset(&self) -> Result<(), BoxError> {
        let schema = &self.schema;
        sqlx::query(&format!(
            "TRUNCATE {schema}.bench_effects, {schema}.idem_inbox, {schema}.naive_processed"
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
