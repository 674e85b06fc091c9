//! The dedup store on PostgreSQL (feature `postgres`): the claim state
//! machine on a readable table, `idem_inbox`, so that operators can query
//! what was processed, and so that transactional handlers can write their
//! claim in the same transaction as their effect.
//!
//! Revisions come from one sequence, so a row deleted and created again can
//! never be mistaken for the row a stale claim read (no ABA).

pub(crate) mod inbox;
mod row_state;

pub(crate) use row_state::RowState;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Connection, Row};

use super::{CasStore, Create, RevisionedMap, StoreError, StoreOp, Write};
use crate::claim::{ClaimRecord, ClaimState, Owner};
use crate::clock::{Clock, SystemClock, UnixMillis};
use crate::fingerprint::Fingerprint;

/// The embedded migrations (`runtime/migrations`), applied into the
/// configured schema by [`PgStore::migrate`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL [`RevisionedMap`]: one row per claim, columns decoded
/// from and encoded to claim records.
#[derive(Clone, Debug)]
pub struct PgMap {
    pool: PgPool,
    table: Arc<str>,
    sequence: Arc<str>,
    retention: Duration,
    clock: Arc<dyn Clock>,
}

/// The dedup store on PostgreSQL.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use idem::store::PgStore;
///
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
/// PgStore::migrate(&pool, "idem").await?;
/// let store = PgStore::open(pool, "idem", Duration::from_secs(7 * 24 * 3600)).await?;
/// # Ok(()) }
/// ```
pub type PgStore = CasStore<PgMap>;

/// PostgreSQL's "insufficient privilege".
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Names a permission problem; anything else is "unavailable".
fn provisioning_error(
    schema: &str,
    action: &'static str,
    error: impl Into<crate::BoxError>,
) -> StoreError {
    let error = error.into();
    let denied = error
        .downcast_ref::<sqlx::Error>()
        .or_else(|| {
            error
                .downcast_ref::<sqlx::migrate::MigrateError>()
                .and_then(|m| match m {
                    sqlx::migrate::MigrateError::Execute(e)
                    | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => Some(e),
                    _ => None,
                })
        })
        .and_then(|e| e.as_database_error())
        .filter(|e| e.code().is_some_and(|c| c == INSUFFICIENT_PRIVILEGE))
        .map(|e| e.message().to_owned());
    match denied {
        Some(detail) => StoreError::PermissionDenied {
            schema: schema.to_owned(),
            action,
            detail,
        },
        None => StoreError::Unavailable {
            op: StoreOp::Provision,
            source: error,
        },
    }
}

fn schema_ident(schema: &str) -> Result<String, StoreError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(format!("\"{schema}\""))
    } else {
        Err(StoreError::InvalidSchemaName {
            name: schema.to_owned(),
        })
    }
}

/// The quoted identifier of a migrated schema: a valid name whose
/// `idem_inbox` table exists (else [`StoreError::SchemaMissing`]). What the
/// store, the transactional inbox and the outbox check before they open.
pub(crate) async fn migrated_schema(pool: &PgPool, schema: &str) -> Result<String, StoreError> {
    let ident = schema_ident(schema)?;
    if !has_table(pool, &ident, "idem_inbox").await? {
        return Err(StoreError::SchemaMissing {
            schema: schema.to_owned(),
        });
    }
    if !has_table(pool, &ident, "idem_handlers").await? {
        return Err(StoreError::SchemaOutdated {
            schema: schema.to_owned(),
            table: "idem_handlers",
        });
    }
    Ok(ident)
}

/// Whether the schema `ident` has `table`.
async fn has_table(pool: &PgPool, ident: &str, table: &str) -> Result<bool, StoreError> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{ident}.{table}"))
        .fetch_one(pool)
        .await
        .map_err(|e| StoreError::unavailable(StoreOp::Provision, e))?;
    Ok(found.is_some())
}

/// The sequence every inbox write takes its revision from.
pub(crate) fn revision_sequence(ident: &str) -> String {
    format!("{ident}.idem_inbox_revision")
}

/// A record key's (handler, key) columns.
pub(crate) fn key_columns(key: &str) -> (&str, &str) {
    key.split_once('.').unwrap_or((key, ""))
}

/// A `fingerprint` column read back.
pub(crate) fn fingerprint_column(stored: Option<Vec<u8>>) -> Option<Fingerprint> {
    stored
        .and_then(|f| <[u8; 16]>::try_from(f.as_slice()).ok())
        .map(Fingerprint::from_bytes)
}

impl PgStore {
    /// Creates `schema` if needed and applies idem's migrations in it.
    pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), StoreError> {
        let ident = schema_ident(schema)?;
        let unavailable = |e: sqlx::Error| StoreError::unavailable(StoreOp::Provision, e);
        let mut conn = pool.acquire().await.map_err(unavailable)?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {ident}"))
            .execute(&mut *conn)
            .await
            .map_err(|e| provisioning_error(schema, "create the schema", e))?;
        sqlx::query(&format!("SET search_path TO {ident}"))
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        let migrated = MIGRATOR.run(&mut *conn).await;
        // The connection returns to the pool: put its search path back.
        let reset = sqlx::query("RESET search_path").execute(&mut *conn).await;
        if reset.is_err() {
            let _ = conn.detach().close().await;
        }
        migrated.map_err(|e| provisioning_error(schema, "create idem's tables", e))
    }

    /// Deletes completed (`done`, `dead`) rows older than `retention`, of
    /// one handler or all, in batches of `batch` rows (short transactions,
    /// no long locks); returns how many rows went.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), idem::store::StoreError> {
    /// use std::time::Duration;
    /// let purged = idem::store::PgStore::purge(&pool, "idem", None, Duration::from_secs(7 * 86_400), 1_000).await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge(
        pool: &PgPool,
        schema: &str,
        handler: Option<&str>,
        retention: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let table = format!("{}.idem_inbox", schema_ident(schema)?);
        let cutoff = millis(SystemClock.now())
            .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let sql = format!(
            "DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE state IN ('done', 'dead') \
             AND updated_at < $1 AND ($2::text IS NULL OR handler = $2) LIMIT $3)"
        );
        let mut purged = 0;
        loop {
            let deleted = sqlx::query(&sql)
                .bind(cutoff)
                .bind(handler)
                .bind(batch.max(1))
                .execute(pool)
                .await
                .map_err(|e| StoreError::unavailable(StoreOp::Delete, e))?
                .rows_affected();
            purged += deleted;
            if deleted < u64::try_from(batch.max(1)).unwrap_or(u64::MAX) {
                return Ok(purged);
            }
        }
    }

    /// Registers how long `handler` keeps its keys (what a transactional
    /// worker does at start-up), so that the operator's tools never purge a
    /// key its handler still answers duplicates for. The last registration
    /// of a handler wins.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), idem::store::StoreError> {
    /// use std::time::Duration;
    /// use idem::store::PgStore;
    ///
    /// PgStore::register_retention(&pool, "idem", "apply_transfer", Duration::from_secs(30 * 86_400)).await?;
    /// let kept = PgStore::retentions(&pool, "idem").await?;
    /// assert_eq!(kept, [("apply_transfer".to_owned(), Duration::from_secs(30 * 86_400))]);
    /// # Ok(()) }
    /// ```
    pub async fn register_retention(
        pool: &PgPool,
        schema: &str,
        handler: &str,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let ident = migrated_schema(pool, schema).await?;
        sqlx::query(&format!(
            "INSERT INTO {ident}.idem_handlers (handler, retention_ms, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (handler) DO UPDATE SET retention_ms = EXCLUDED.retention_ms, updated_at = EXCLUDED.updated_at"
        ))
        .bind(handler)
        .bind(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
        .bind(millis(SystemClock.now()))
        .execute(pool)
        .await
        .map_err(|e| provisioning_error(schema, "register a handler", e))?;
        Ok(())
    }

    /// Every transactional handler's registered retention, by name.
    pub async fn retentions(
        pool: &PgPool,
        schema: &str,
    ) -> Result<Vec<(String, Duration)>, StoreError> {
        let ident = migrated_schema(pool, schema).await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT handler, retention_ms FROM {ident}.idem_handlers ORDER BY handler"
        ))
        .fetch_all(pool)
        .await
        .map_err(|e| StoreError::unavailable(StoreOp::Read, e))?;
        Ok(rows
            .into_iter()
            .map(|(handler, ms)| {
                let ms = u64::try_from(ms).unwrap_or(0);
                (handler, Duration::from_millis(ms))
            })
            .collect())
    }

    /// Opens the store on a migrated schema; fails with
    /// [`StoreError::SchemaMissing`] if the table is not there.
    pub async fn open(pool: PgPool, schema: &str, retention: Duration) -> Result<Self, StoreError> {
        let ident = migrated_schema(&pool, schema).await?;
        let map = PgMap {
            pool,
            sequence: revision_sequence(&ident).into(),
            table: format!("{ident}.idem_inbox").into(),
            retention,
            clock: Arc::new(SystemClock),
        };
        Ok(CasStore::over(map))
    }

    /// The same store with leases and retention on `clock` (tests).
    pub fn on_clock(self, clock: impl Clock + Clone) -> Self {
        let map = PgMap {
            clock: Arc::new(clock.clone()),
            ..self.map().clone()
        };
        let owner = crate::store::DedupStore::owner(&self);
        CasStore::over(map).using_clock(clock).as_owner(owner)
    }
}

/// The row's `state` and `lease_until` columns for `state`.
fn state_columns(state: &ClaimState) -> (&'static str, Option<i64>) {
    let lease_until = match state {
        ClaimState::Pending { lease_until } => i64::try_from(lease_until.0).ok(),
        ClaimState::Released | ClaimState::Done | ClaimState::Dead => None,
    };
    (RowState::from(state).as_str(), lease_until)
}

/// A query returning a revision.
type RevisionQuery<'q> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments>;

/// Binds `$1`..`$10`: the key's two columns, then the record's, in table
/// order (state, owner, lease_until, attempt, fingerprint, result,
/// created_at, updated_at).
fn bind_record<'q>(
    query: RevisionQuery<'q>,
    key: &'q str,
    record: &ClaimRecord,
) -> RevisionQuery<'q> {
    let (handler, rest) = key_columns(key);
    let (state, lease_until) = state_columns(&record.state);
    query
        .bind(handler)
        .bind(rest)
        .bind(state)
        .bind(*record.owner.as_uuid())
        .bind(lease_until)
        .bind(i32::try_from(record.attempt).unwrap_or(i32::MAX))
        .bind(record.fingerprint.map(|f| f.as_bytes().to_vec()))
        .bind(record.result.as_ref().map(|r| r.to_vec()))
        .bind(millis(record.created_at))
        .bind(millis(record.updated_at))
}

fn millis(t: UnixMillis) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

fn record_of(row: &PgRow) -> Result<(ClaimRecord, u64), sqlx::Error> {
    let state: String = row.try_get("state")?;
    let lease_until: Option<i64> = row.try_get("lease_until")?;
    let state = match RowState::decode(&state)? {
        RowState::Pending => ClaimState::Pending {
            lease_until: UnixMillis(u64::try_from(lease_until.unwrap_or(0)).unwrap_or(0)),
        },
        RowState::Released => ClaimState::Released,
        RowState::Done => ClaimState::Done,
        RowState::Dead => ClaimState::Dead,
    };
    let fingerprint = fingerprint_column(row.try_get("fingerprint")?);
    let result: Option<Vec<u8>> = row.try_get("result")?;
    let owner: uuid::Uuid = row.try_get("owner")?;
    let attempt: i32 = row.try_get("attempt")?;
    let created_at: i64 = row.try_get("created_at")?;
    let updated_at: i64 = row.try_get("updated_at")?;
    let revision: i64 = row.try_get("revision")?;
    let record = ClaimRecord {
        state,
        owner: Owner::from_uuid(owner),
        attempt: u32::try_from(attempt).unwrap_or(0),
        fingerprint,
        result: result.map(Bytes::from),
        created_at: UnixMillis(u64::try_from(created_at).unwrap_or(0)),
        updated_at: UnixMillis(u64::try_from(updated_at).unwrap_or(0)),
    };
    Ok((record, u64::try_from(revision).unwrap_or(0)))
}

impl PgMap {
    fn decode(value: &[u8]) -> Result<ClaimRecord, StoreError> {
        ClaimRecord::decode(value).map_err(|e| StoreError::unavailable(StoreOp::Update, e))
    }

    /// Rows last written before this are past their retention.
    fn expired_before(&self) -> i64 {
        let now = self.clock.now();
        millis(now).saturating_sub(i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX))
    }

    async fn select(&self, key: &str) -> Result<Option<(ClaimRecord, u64)>, StoreError> {
        let (handler, rest) = key_columns(key);
        let row = sqlx::query(&format!(
            "SELECT * FROM {} WHERE handler = $1 AND key = $2 AND updated_at > $3",
            self.table
        ))
        .bind(handler)
        .bind(rest)
        .bind(self.expired_before())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable(StoreOp::Read, e))?;
        row.map(|r| record_of(&r))
            .transpose()
            .map_err(|e| StoreError::unavailable(StoreOp::Read, e))
    }

    /// Writes `record` where `condition` holds; the new revision, if written.
    async fn write(
        &self,
        op: StoreOp,
        key: &str,
        record: &ClaimRecord,
        condition: &str,
        revision: Option<i64>,
    ) -> Result<Option<u64>, StoreError> {
        let sql = format!(
            "UPDATE {t} SET state = $3, owner = $4, lease_until = $5, attempt = $6, fingerprint = $7, result = $8, \
             created_at = $9, updated_at = $10, revision = nextval('{seq}') \
             WHERE handler = $1 AND key = $2 AND {condition} RETURNING revision",
            t = self.table,
            seq = self.sequence,
        );
        let written: Option<i64> = bind_record(sqlx::query_scalar(&sql), key, record)
            .bind(revision.unwrap_or(self.expired_before()))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::unavailable(op, e))?;
        Ok(written.and_then(|r| u64::try_from(r).ok()))
    }
}

impl RevisionedMap for PgMap {
    async fn create(&self, key: &str, value: Bytes) -> Result<Create, StoreError> {
        let record = Self::decode(&value)?;
        let sql = format!(
            "INSERT INTO {} (handler, key, state, owner, lease_until, attempt, fingerprint, result, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (handler, key) DO NOTHING RETURNING revision",
            self.table
        );
        let inserted: Option<i64> = bind_record(sqlx::query_scalar(&sql), key, &record)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::unavailable(StoreOp::Create, e))?;
        if let Some(revision) = inserted {
            return Ok(Create::Created(u64::try_from(revision).unwrap_or(0)));
        }
        // A row past its retention counts as absent: take it over.
        if let Some(revision) = self
            .write(StoreOp::Create, key, &record, "updated_at <= $11", None)
            .await?
        {
            return Ok(Create::Created(revision));
        }
        let found = self.select(key).await?;
        Ok(Create::Exists(
            found.map(|(record, revision)| (record.encode(), revision)),
        ))
    }

    async fn read(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        Ok(self
            .select(key)
            .await?
            .map(|(record, revision)| (record.encode(), revision)))
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<Write, StoreError> {
        let record = Self::decode(&value)?;
        let revision = i64::try_from(revision).unwrap_or(i64::MAX);
        // The expected revision, and not past retention (an expired row is gone).
        let condition = format!("revision = $11 AND updated_at > {}", self.expired_before());
        Ok(
            match self
                .write(StoreOp::Update, key, &record, &condition, Some(revision))
                .await?
            {
                Some(revision) => Write::Written(revision),
                None => Write::Conflict,
            },
        )
    }

    async fn delete_at(&self, key: &str, revision: u64) -> Result<Write, StoreError> {
        let (handler, rest) = key_columns(key);
        let deleted = sqlx::query(&format!(
            "DELETE FROM {} WHERE handler = $1 AND key = $2 AND revision = $3",
            self.table
        ))
        .bind(handler)
        .bind(rest)
        .bind(i64::try_from(revision).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable(StoreOp::Delete, e))?;
        Ok(if deleted.rows_affected() == 1 {
            Write::Written(revision)
        } else {
            Write::Conflict
        })
    }

    fn retention(&self) -> Duration {
        self.retention
    }
}
