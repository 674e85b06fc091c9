//! A PostgreSQL schema of a test's own (feature `postgres`): created and
//! migrated on `DATABASE_URL`, dropped when the value is dropped, so that
//! tests run in parallel without seeing each other.

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::HarnessError;

/// Where tests find PostgreSQL when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh schema with idem's tables, dropped on drop.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    schema: String,
    pool: PgPool,
}

impl TestDatabase {
    /// Connects to `DATABASE_URL` (or [`DEFAULT_DATABASE_URL`]), creates a
    /// schema named `idem_test_<uuid>` and applies idem's migrations in it.
    pub async fn create() -> Result<Self, HarnessError> {
        let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await
            .map_err(|source| HarnessError::Database {
                url: url.clone(),
                source: Box::new(source),
            })?;
        let schema = format!("idem_test_{}", uuid::Uuid::new_v4().simple());
        crate::store::PgStore::migrate(&pool, &schema).await?;
        Ok(Self { url, schema, pool })
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The database's URL (`DATABASE_URL`, or the default), for processes a
    /// test starts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool on the database (not bound to the schema: qualify names).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be single-threaded:
        // a short-lived thread with its own runtime drops the schema.
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        });
        let _ = dropped.join();
    }
}
