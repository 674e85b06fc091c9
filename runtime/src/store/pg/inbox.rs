//! `dedup = transactional` (feature `postgres`): the claim row is written in
//! the handler's own database transaction, so the effect and its record
//! commit together or not at all — no lease, no crash window.
//!
//! A concurrent worker inserting the same key waits on the uncommitted row
//! (up to `lock_timeout` = the lease), then sees it done: a duplicate. If
//! the first transaction rolls back, the row vanishes with the effect and
//! the waiter claims it.
//!
//! This module owns the inbox's SQL; what the consumer does with each
//! answer is in `consumer/backend.rs` and `consumer/pipeline.rs`, shared
//! with `dedup = kv`.

use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};

use super::{RowState, fingerprint_column, key_columns, migrated_schema, revision_sequence};
use crate::claim::{Claim, ClaimOutcome, Ending, Owner};
use crate::clock::{Clock, SystemClock, UnixMillis};
use crate::fingerprint::Fingerprint;
use crate::key::RecordKey;
use crate::store::{GroupLock, PgStore, StoreError, StoreOp};

/// The savepoint between a claim and the handler's effects.
const HANDLER_SAVEPOINT: &str = "idem_handler";

/// PostgreSQL's "lock not available" (a `lock_timeout` ran out).
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// PostgreSQL's "deadlock detected": the transaction was chosen to end a
/// circle of waits.
const DEADLOCK_DETECTED: &str = "40P01";
/// PostgreSQL's "could not serialize access": a concurrent transaction
/// changed what this one read (`REPEATABLE READ` and `SERIALIZABLE`).
const SERIALIZATION_FAILURE: &str = "40001";
/// The group lock's class in PostgreSQL's advisory lock space (its upper
/// 32 bits; the inbox table's oid is the rest), so that it names this
/// schema's groups and no lock of the application's.
const GROUP_LOCK_CLASS: i64 = 0x1de3 << 32;
/// PostgreSQL's "current transaction is aborted, commands ignored until end
/// of transaction block": a statement in the transaction failed earlier.
const IN_FAILED_TRANSACTION: &str = "25P02";

/// The inbox table transactional handlers claim in.
#[derive(Clone, Debug)]
pub(crate) struct TxInbox {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    table: String,
    sequence: String,
    owner: Owner,
}

/// A statement that fails in an aborted transaction and does nothing else:
/// the seal when there is no result to store (an `UPDATE` of the claim
/// rows would only write new row versions of them).
async fn check_open(conn: &mut PgConnection) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    sqlx::query("SELECT 1").execute(&mut *conn).await
}

impl From<sqlx::Error> for SealError {
    fn from(error: sqlx::Error) -> Self {
        if has_code(&error, IN_FAILED_TRANSACTION) {
            SealError::Aborted(error)
        } else {
            SealError::Database(error)
        }
    }
}

/// Why the claim row could not be sealed before `COMMIT`.
pub(crate) enum SealError {
    /// The handler left the transaction aborted (it ignored a failed
    /// statement): committing would silently roll back effect and claim.
    Aborted(sqlx::Error),
    /// The database did not answer.
    Database(sqlx::Error),
}

fn millis_now() -> i64 {
    i64::try_from(SystemClock.now().0).unwrap_or(i64::MAX)
}

fn unavailable(op: StoreOp) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::unavailable(op, e)
}

fn has_code(error: &sqlx::Error, code: &str) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|c| c == code)
}

/// The failure of a handler that returned `Ok` in an aborted transaction.
pub(crate) const IGNORED_FAILED_STATEMENT: &str =
    "the handler returned Ok, but its transaction was aborted by a failed statement it ignored";

/// Whether a handler's error is only that its transaction was aborted
/// before its statement — under group commit, by another message's
/// handler: not this message's failure.
pub(crate) fn failed_for_another(error: &crate::HandlerError) -> bool {
    database_error(error.error()).is_some_and(|sql| has_code(sql, IN_FAILED_TRANSACTION))
}

/// Whether a handler's error is a lock conflict — a deadlock, a
/// serialization failure, or a lock timeout — which group commit can cause
/// (its transactions hold the rows of many messages, in no one order) and
/// so is not counted against a grouped handler's retries until it meets one
/// with no group beside it ([`GroupLock::Exclusive`]).
pub(crate) fn met_lock_conflict(error: &crate::HandlerError) -> bool {
    // A handler that calls its error permanent has said what it is.
    !error.is_permanent()
        && database_error(error.error()).is_some_and(|sql| {
            [DEADLOCK_DETECTED, SERIALIZATION_FAILURE, LOCK_NOT_AVAILABLE]
                .into_iter()
                .any(|code| has_code(sql, code))
        })
}

/// Whether a store error is a wait for a lock that ran past the
/// transaction's lock timeout (the group lock's, at [`TxInbox::begin`]).
pub(crate) fn waited_too_long(error: &StoreError) -> bool {
    database_error(error).is_some_and(|sql| has_code(sql, LOCK_NOT_AVAILABLE))
}

/// The database error an error carries, if any.
fn database_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a sqlx::Error> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(sql) = error.downcast_ref::<sqlx::Error>() {
            return Some(sql);
        }
        source = error.source();
    }
    None
}

impl TxInbox {
    /// Checks that the schema is migrated.
    pub(crate) async fn open(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        let ident = migrated_schema(&pool, schema).await?;
        Ok(Self {
            pool,
            schema: schema.to_owned(),
            table: format!("{ident}.idem_inbox"),
            sequence: revision_sequence(&ident),
            owner: Owner::random(),
        })
    }

    /// A claim on a row of this inbox, as the pipeline holds it.
    fn granted(
        &self,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        row: &sqlx::postgres::PgRow,
        lease: Duration,
    ) -> Result<Claim, sqlx::Error> {
        let revision: i64 = row.try_get("revision")?;
        let attempt: i32 = row.try_get("attempt")?;
        let created_at: i64 = row.try_get("created_at")?;
        Ok(Claim {
            key: key.clone(),
            owner: self.owner,
            revision: u64::try_from(revision).unwrap_or_default(),
            lease,
            lease_until: None,
            attempt: u32::try_from(attempt).unwrap_or(1),
            fingerprint,
            created_at: UnixMillis(u64::try_from(created_at).unwrap_or_default()),
        })
    }

    /// Claims `key` inside the transaction on `conn` (begun by
    /// [`begin`](Self::begin)). The row is written as
    /// `done` in this transaction: it commits with the handler's effect. A
    /// failed run rolls back to the savepoint after it and commits its
    /// ending instead ([`end_in`](Self::end_in)); the attempt counts the
    /// handler's runs.
    pub(crate) async fn claim(
        &self,
        conn: &mut PgConnection,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
        retention: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let (handler, rest) = key_columns(key.as_str());
        let busy = ClaimOutcome::InFlight {
            owner: None,
            retry_after: lease,
        };
        let inserted = sqlx::query(&format!(
            "INSERT INTO {} (handler, key, state, owner, attempt, fingerprint, created_at, updated_at) \
             VALUES ($1, $2, 'done', $3, 1, $4, $5, $5) ON CONFLICT (handler, key) DO NOTHING \
             RETURNING revision, attempt, created_at",
            self.table
        ))
        .bind(handler)
        .bind(rest)
        .bind(*self.owner.as_uuid())
        .bind(fingerprint.map(|f| f.as_bytes().to_vec()))
        .bind(millis_now())
        .fetch_optional(&mut *conn)
        .await;
        let outcome = match inserted {
            Ok(Some(row)) => self
                .granted(key, fingerprint, &row, lease)
                .map(ClaimOutcome::Claimed)
                .map_err(unavailable(StoreOp::Create))?,
            Ok(None) => match self
                .existing(conn, key, fingerprint, lease, retention)
                .await
            {
                Ok(outcome) => outcome,
                Err(e) if has_code(&e, LOCK_NOT_AVAILABLE) => return Ok(busy),
                Err(e) => return Err(StoreError::unavailable(StoreOp::Update, e)),
            },
            Err(e) if has_code(&e, LOCK_NOT_AVAILABLE) => return Ok(busy),
            Err(e) => return Err(StoreError::unavailable(StoreOp::Create, e)),
        };
        match outcome {
            ClaimOutcome::Claimed(claim) => Self::mark_handler_start(conn, claim).await,
            refused => Ok(refused),
        }
    }

    /// Begins a transaction whose waits are bounded, in one round trip:
    /// for a row lock (a key another transaction holds), and idle (a worker
    /// frozen inside its transaction must not hold its keys for as long as
    /// it stays frozen: the server ends a transaction idle for a lease, and
    /// nothing of it commits). Then it takes the schema's group lock as
    /// `group` says, before any row — waiting for it holds nothing another
    /// waits for, and at most a third of the lease — in a statement of its
    /// own: one that fails (its wait ran out) rolls the transaction back,
    /// and the connection returns to the pool clean.
    pub(crate) async fn begin(
        &self,
        lease: Duration,
        group: GroupLock,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let lease_ms = lease.as_millis().max(1);
        let mut transaction = self
            .pool
            .begin_with(format!(
                "BEGIN; SET LOCAL lock_timeout = {lease_ms}; \
                 SET LOCAL idle_in_transaction_session_timeout = {lease_ms}"
            ))
            .await?;
        let lock = match group {
            GroupLock::Ignored => return Ok(transaction),
            GroupLock::Shared => "pg_advisory_xact_lock_shared",
            GroupLock::Exclusive => "pg_advisory_xact_lock",
        };
        // A third of the lease at most: a queued exclusive request holds
        // back every new group behind it, and a seated delivery sends no
        // in-progress acks while its group begins.
        let wait_ms = (lease / 3).as_millis().max(1);
        let statements = format!(
            "SET LOCAL lock_timeout = {wait_ms}; \
             SELECT {lock}({GROUP_LOCK_CLASS} + '{}'::regclass::oid::bigint); \
             SET LOCAL lock_timeout = {lease_ms}",
            self.table
        );
        // Unprepared (no arguments): the three statements in one round trip.
        let locked = sqlx::Executor::execute(&mut *transaction, statements.as_str()).await;
        match locked {
            Ok(_) => Ok(transaction),
            Err(e) => {
                if let Err(rollback) = transaction.rollback().await {
                    tracing::debug!(error = %rollback, "could not roll back after the group lock's wait failed");
                }
                Err(e)
            }
        }
    }

    /// Claims `key` whose row exists already, by the claim state machine: a
    /// released, kept-for-this-payload or expired row is taken (attempt
    /// counted on); a completed one is a duplicate, a dead one dead, one
    /// with another payload a conflict. Waits for the row's lock (up to
    /// `lock_timeout`): a row another transaction holds is decided once it
    /// commits or rolls back.
    async fn existing(
        &self,
        conn: &mut PgConnection,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
        retention: Duration,
    ) -> Result<ClaimOutcome, sqlx::Error> {
        let (handler, rest) = key_columns(key.as_str());
        let now = millis_now();
        let row = sqlx::query(&format!(
            "SELECT state, fingerprint, result, updated_at FROM {} WHERE handler = $1 AND key = $2 FOR UPDATE",
            self.table
        ))
        .bind(handler)
        .bind(rest)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            // Deleted in between (forgotten): the next delivery inserts it.
            return Ok(ClaimOutcome::InFlight {
                owner: None,
                retry_after: lease,
            });
        };
        let state: String = row.try_get("state")?;
        let state = RowState::decode(&state)?;
        let stored: Option<Vec<u8>> = row.try_get("fingerprint")?;
        let result: Option<Vec<u8>> = row.try_get("result")?;
        let updated_at: i64 = row.try_get("updated_at")?;
        let expired = updated_at
            <= now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let stored = fingerprint_column(stored);
        let conflict =
            matches!((stored, fingerprint), (Some(stored), Some(mine)) if stored != mine);
        // A `pending` row is a payload whose dead letter is not stored yet:
        // it keeps the key (see `keep`); a `released` one had no effect, and
        // is its own payload's to retry — another payload reusing the key
        // during the backoff is a conflict (the first to claim a key owns
        // it). A row past the retention is taken by anyone, afresh.
        match (expired, conflict, state) {
            (true, _, _) | (false, false, RowState::Released | RowState::Pending) => {}
            (false, true, _) => return Ok(ClaimOutcome::KeyConflict { stored }),
            (false, false, RowState::Done) => {
                return Ok(ClaimOutcome::Duplicate {
                    result: result.map(Bytes::from),
                });
            }
            (false, false, RowState::Dead) => return Ok(ClaimOutcome::Dead),
        }
        let row = sqlx::query(&format!(
            "UPDATE {} SET state = 'done', owner = $3, lease_until = NULL, \
             attempt = CASE WHEN $6 THEN 1 ELSE attempt + 1 END, fingerprint = $4, \
             result = NULL, updated_at = $5, revision = nextval('{}') \
             WHERE handler = $1 AND key = $2 RETURNING revision, attempt, created_at",
            self.table, self.sequence
        ))
        .bind(handler)
        .bind(rest)
        .bind(*self.owner.as_uuid())
        .bind(fingerprint.map(|f| f.as_bytes().to_vec()))
        .bind(now)
        .bind(expired)
        .fetch_one(&mut *conn)
        .await?;
        self.granted(key, fingerprint, &row, lease)
            .map(ClaimOutcome::Claimed)
    }

    /// Claims a group's keys in the transaction on `conn`: the new ones in
    /// one statement, in key order (so that two groups wait for each other's
    /// rows in one order, never in a circle); existing rows one by one, as
    /// [`existing`](Self::existing) decides. The keys must be distinct. Any
    /// error leaves the transaction unusable: the caller rolls it back.
    pub(crate) async fn claim_group(
        &self,
        conn: &mut PgConnection,
        keys: &[(RecordKey, Option<Fingerprint>)],
        lease: Duration,
        retention: Duration,
    ) -> Result<Vec<ClaimOutcome>, sqlx::Error> {
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&a, &b| keys[a].0.as_str().cmp(keys[b].0.as_str()));
        let Some(&first) = order.first() else {
            return Ok(Vec::new());
        };
        let (handler, _) = key_columns(keys[first].0.as_str());
        let rests: Vec<&str> = order
            .iter()
            .map(|&i| key_columns(keys[i].0.as_str()).1)
            .collect();
        let fingerprints: Vec<Option<Vec<u8>>> = order
            .iter()
            .map(|&i| keys[i].1.map(|f| f.as_bytes().to_vec()))
            .collect();
        let rows = sqlx::query(&format!(
            "INSERT INTO {} (handler, key, state, owner, attempt, fingerprint, created_at, updated_at) \
             SELECT $1, claim.key, 'done', $2, 1, claim.fingerprint, $3, $3 \
             FROM unnest($4::text[], $5::bytea[]) AS claim (key, fingerprint) \
             ON CONFLICT (handler, key) DO NOTHING \
             RETURNING key, revision, attempt, created_at",
            self.table
        ))
        .bind(handler)
        .bind(*self.owner.as_uuid())
        .bind(millis_now())
        .bind(&rests)
        .bind(&fingerprints)
        .fetch_all(&mut *conn)
        .await?;
        let index: std::collections::HashMap<&str, usize> = order
            .iter()
            .zip(&rests)
            .map(|(&i, &rest)| (rest, i))
            .collect();
        let mut outcomes: Vec<Option<ClaimOutcome>> = keys.iter().map(|_| None).collect();
        for row in &rows {
            let rest: String = row.try_get("key")?;
            let Some(&i) = index.get(rest.as_str()) else {
                continue;
            };
            let (key, fingerprint) = &keys[i];
            outcomes[i] = Some(ClaimOutcome::Claimed(self.granted(
                key,
                *fingerprint,
                row,
                lease,
            )?));
        }
        for &i in &order {
            if outcomes[i].is_none() {
                let (key, fingerprint) = &keys[i];
                outcomes[i] = Some(
                    self.existing(conn, key, *fingerprint, lease, retention)
                        .await?,
                );
            }
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// A savepoint between the claim and the handler's effects: a failed
    /// run rolls back to it, keeping the claim row (and its lock) in the
    /// transaction, so that its ending — released, kept, dead — commits
    /// with nobody able to claim the key in between.
    async fn mark_handler_start(
        conn: &mut PgConnection,
        claim: Claim,
    ) -> Result<ClaimOutcome, StoreError> {
        sqlx::query(&format!("SAVEPOINT {HANDLER_SAVEPOINT}"))
            .execute(&mut *conn)
            .await
            .map_err(unavailable(StoreOp::Create))?;
        Ok(ClaimOutcome::Claimed(claim))
    }

    /// Ends a failed run in its own transaction: its effects rolled back to
    /// the savepoint, the claim row set to `ending` (`released`, `pending`
    /// kept for its payload, or `dead`), committed. The row stayed locked
    /// all along: no other payload could claim the key in between.
    pub(crate) async fn end_in(
        &self,
        tx: &crate::Tx,
        claim: &Claim,
        ending: Ending,
    ) -> Result<(), sqlx::Error> {
        let (handler, rest) = key_columns(claim.key.as_str());
        {
            let mut conn = tx
                .conn()
                .await
                .map_err(|closed| sqlx::Error::Protocol(closed.to_string()))?;
            sqlx::query(&format!("ROLLBACK TO SAVEPOINT {HANDLER_SAVEPOINT}"))
                .execute(&mut *conn)
                .await?;
            sqlx::query(&format!(
                "UPDATE {} SET state = $3, owner = $4, attempt = $5, fingerprint = $6, result = NULL, \
                 updated_at = $7, revision = nextval('{}') WHERE handler = $1 AND key = $2",
                self.table, self.sequence
            ))
            .bind(handler)
            .bind(rest)
            .bind(RowState::from(ending).as_str())
            .bind(*self.owner.as_uuid())
            .bind(i32::try_from(claim.attempt).unwrap_or(i32::MAX))
            .bind(claim.fingerprint.map(|f| f.as_bytes().to_vec()))
            .bind(millis_now())
            .execute(&mut *conn)
            .await?;
        }
        match tx.take().await {
            Some(open) => open.commit().await,
            None => Err(sqlx::Error::Protocol(crate::tx::TxClosed.to_string())),
        }
    }

    /// Stores the handler's result in the claim row, in the same
    /// transaction, just before `COMMIT` — or, without a result, runs a
    /// statement that does nothing else. Any statement fails in an aborted
    /// transaction, which PostgreSQL would answer `COMMIT` with `ROLLBACK`
    /// and sqlx report as success, so this is also the check that the
    /// effect is about to commit.
    pub(crate) async fn seal(
        &self,
        conn: &mut PgConnection,
        key: &RecordKey,
        result: Option<Bytes>,
    ) -> Result<(), SealError> {
        let sealed = match result {
            Some(result) => {
                let (handler, rest) = key_columns(key.as_str());
                sqlx::query(&format!(
                    "UPDATE {} SET result = $3 WHERE handler = $1 AND key = $2",
                    self.table
                ))
                .bind(handler)
                .bind(rest)
                .bind(result.to_vec())
                .execute(&mut *conn)
                .await
            }
            None => check_open(conn).await,
        };
        sealed.map(drop).map_err(SealError::from)
    }

    /// Stores a group's results in their claim rows just before `COMMIT`,
    /// in one statement — which, like [`seal`](Self::seal), fails if a
    /// handler of the group left the transaction aborted.
    pub(crate) async fn seal_group(
        &self,
        conn: &mut PgConnection,
        results: &[(RecordKey, Option<Bytes>)],
    ) -> Result<(), SealError> {
        let stored: Vec<(&str, &[u8])> = results
            .iter()
            .filter_map(|(key, result)| Some((key.as_str(), result.as_deref()?)))
            .collect();
        let Some(&(first, _)) = stored.first() else {
            return check_open(conn).await.map(drop).map_err(SealError::from);
        };
        let (handler, _) = key_columns(first);
        let rests: Vec<&str> = stored.iter().map(|(key, _)| key_columns(key).1).collect();
        let values: Vec<&[u8]> = stored.iter().map(|(_, result)| *result).collect();
        sqlx::query(&format!(
            "UPDATE {} AS inbox SET result = sealed.result \
             FROM unnest($2::text[], $3::bytea[]) AS sealed (key, result) \
             WHERE inbox.handler = $1 AND inbox.key = sealed.key",
            self.table
        ))
        .bind(handler)
        .bind(&rests)
        .bind(&values)
        .execute(&mut *conn)
        .await
        .map(drop)
        .map_err(SealError::from)
    }

    /// Writes a failed run's ending on its own, when its transaction is
    /// gone (the fallback of [`end_in`](Self::end_in)): `released` with the
    /// attempt (the next claim counts on from it), `pending` kept for the
    /// payload while its dead letter cannot be stored (only the same
    /// payload may claim it), or `dead` with the payload's fingerprint (a
    /// later payload under the key is a conflict, the same one a
    /// duplicate). A completed or dead row is left as it is, and so is
    /// another payload's: with the transaction gone, the key was free, and
    /// the first payload to claim it since owns it. `false`: left as it was.
    pub(crate) async fn end_alone(
        &self,
        claim: &Claim,
        ending: Ending,
    ) -> Result<bool, sqlx::Error> {
        let (handler, rest) = key_columns(claim.key.as_str());
        sqlx::query(&format!(
            "INSERT INTO {t} AS inbox (handler, key, state, owner, attempt, fingerprint, created_at, updated_at) \
             VALUES ($1, $2, $6, $3, $4, $5, $7, $7) \
             ON CONFLICT (handler, key) DO UPDATE SET state = $6, owner = $3, attempt = $4, \
             fingerprint = $5, updated_at = $7, revision = nextval('{s}') \
             WHERE inbox.state NOT IN ('done', 'dead') \
             AND inbox.fingerprint IS NOT DISTINCT FROM EXCLUDED.fingerprint",
            t = self.table,
            s = self.sequence,
        ))
        .bind(handler)
        .bind(rest)
        .bind(*self.owner.as_uuid())
        .bind(i32::try_from(claim.attempt).unwrap_or(i32::MAX))
        .bind(claim.fingerprint.map(|f| f.as_bytes().to_vec()))
        .bind(RowState::from(ending).as_str())
        .bind(millis_now())
        .execute(&self.pool)
        .await
        .map(|done| done.rows_affected() > 0)
    }

    /// Whether the database answers a statement (for the health probe).
    pub(crate) async fn answers(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Deletes the handler's completed rows past the retention, every
    /// quarter of the retention (at least every minute, at most every hour),
    /// until `stop`.
    pub(crate) async fn purge_loop(
        self,
        handler: String,
        retention: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let every = (retention / 4).clamp(Duration::from_secs(60), Duration::from_secs(3600));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            match PgStore::purge(&self.pool, &self.schema, Some(&handler), retention, 1_000).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(
                    handler,
                    purged,
                    "purged completed inbox rows past their retention"
                ),
                Err(e) => tracing::warn!(handler, error = %e, "could not purge the inbox"),
            }
        }
    }
}

#[cfg(all(test, feature = "testing"))]
impl TxInbox {
    /// Claims `key` for `payload` in a transaction of its own, left open
    /// (leases 5 s, retention 1 h): what tests start from.
    pub(crate) async fn claim_in_a_transaction(
        &self,
        key: &RecordKey,
        payload: Fingerprint,
    ) -> (crate::Tx, ClaimOutcome) {
        const LEASE: Duration = Duration::from_secs(5);
        let tx = crate::Tx::new(self.begin(LEASE, GroupLock::Ignored).await.expect("begin"));
        let outcome = {
            let mut conn = tx.conn().await.expect("conn");
            self.claim(
                &mut conn,
                key,
                Some(payload),
                LEASE,
                Duration::from_secs(3600),
            )
            .await
            .expect("claim")
        };
        (tx, outcome)
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::key::{HandlerName, IdempotencyKey};
    use crate::store::GroupLock;
    use crate::testing::TestDatabase;

    const LEASE: Duration = Duration::from_secs(5);

    async fn claimed(
        inbox: &TxInbox,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> (crate::Tx, Claim) {
        let (tx, outcome) = inbox.claim_in_a_transaction(key, fingerprint).await;
        match outcome {
            ClaimOutcome::Claimed(claim) => (tx, claim),
            other => panic!("not claimed: {other:?}"),
        }
    }

    /// A group's begin waits for the group lock past its lock timeout (a
    /// message holds it apart from the groups): the begin fails, and the
    /// connection goes back to the pool clean — the next transaction on it
    /// works (it once stayed inside an aborted transaction).
    #[tokio::test]
    async fn a_begin_whose_group_lock_wait_failed_leaves_its_connection_usable() {
        let db = TestDatabase::create().await.expect("PostgreSQL");
        let apart = TxInbox::open(db.pool().clone(), db.schema())
            .await
            .expect("inbox");
        let one = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(db.url())
            .await
            .expect("a one-connection pool");
        let inbox = TxInbox::open(one, db.schema()).await.expect("inbox");
        let holder = apart
            .begin(LEASE, GroupLock::Exclusive)
            .await
            .expect("the group lock, exclusively");
        let waited = inbox
            .begin(Duration::from_millis(200), GroupLock::Shared)
            .await;
        let Err(waited) = waited else {
            panic!("the group lock was not held");
        };
        // How the pipeline tells this wait (to run the message beside the
        // groups, counted) from a store that does not answer.
        assert!(waited_too_long(&StoreError::unavailable(
            StoreOp::Create,
            waited
        )));
        holder.rollback().await.expect("released");
        let mut next = inbox
            .begin(LEASE, GroupLock::Ignored)
            .await
            .expect("a transaction on the same connection");
        sqlx::query("SELECT 1")
            .execute(&mut *next)
            .await
            .expect("the connection works");
        next.rollback().await.expect("rolled back");
    }

    /// A group member X failed and its group rolled back, so that the key
    /// was free; payload Y reused it, failed permanently and, its dead
    /// letter not stored yet, kept the row for itself (`pending`). X's
    /// ending, written on its own, must leave Y's row alone — else X owns
    /// the key again and Y's kept claim is lost.
    #[tokio::test]
    async fn an_ending_written_alone_leaves_another_payloads_kept_row_alone() {
        let db = TestDatabase::create().await.expect("PostgreSQL");
        let inbox = TxInbox::open(db.pool().clone(), db.schema())
            .await
            .expect("inbox");
        let name = HandlerName::new("h").expect("name");
        let key = RecordKey::new(&name, &IdempotencyKey::new("k").expect("key"));
        let (x, y) = (Fingerprint::of(b"X"), Fingerprint::of(b"Y"));
        let (x_tx, x_claim) = claimed(&inbox, &key, x).await;
        x_tx.take()
            .await
            .expect("X's transaction")
            .rollback()
            .await
            .expect("X's group rolled back");
        let (y_tx, y_claim) = claimed(&inbox, &key, y).await;
        inbox
            .end_in(&y_tx, &y_claim, Ending::Kept)
            .await
            .expect("Y kept");
        let written = inbox
            .end_alone(&x_claim, Ending::Released)
            .await
            .expect("X's ending");
        assert!(!written, "X's ending found the row another payload's");
        let (handler, rest) = key_columns(key.as_str());
        let (state, fingerprint): (String, Option<Vec<u8>>) = sqlx::query_as(&format!(
            "SELECT state, fingerprint FROM {} WHERE handler = $1 AND key = $2",
            inbox.table
        ))
        .bind(handler)
        .bind(rest)
        .fetch_one(db.pool())
        .await
        .expect("the row");
        assert_eq!(state, "pending");
        assert_eq!(fingerprint_column(fingerprint), Some(y));
    }
}
