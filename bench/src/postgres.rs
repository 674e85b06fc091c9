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
