//! `dedup = transactional` (feature `postgres`): the claim row is written in
//! the handler's own database transaction, so the effect and its record
//! commit together or not at all — no lease, no crash window.
//!
//! A concurrent worker inserting the same key waits on the uncommitted row
//! (up to `lock_timeout` = the lease), then sees it done: a duplicate. If
//! the first transaction rolls back, the row vanishes with the effect and
//! the waiter claims it.

use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};

use crate::claim::Owner;
use crate::clock::{Clock, SystemClock};
use crate::fingerprint::Fingerprint;
use crate::key::RecordKey;
use crate::store::{
    PgStore, StoreError, fingerprint_column, key_columns, migrated_schema, revision_sequence,
};

/// PostgreSQL's "lock not available" (a `lock_timeout` ran out).
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The inbox table transactional handlers claim in.
#[derive(Clone, Debug)]
pub(crate) struct TxInbox {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    table: String,
    sequence: String,
    owner: Owner,
}

/// What the claim inside a transaction found.
pub(crate) enum TxClaim {
    /// The row is ours in this transaction: run the handler.
    Claimed,
    /// Completed before with the same payload.
    Duplicate,
    /// Completed before with another payload.
    Conflict(Option<Fingerprint>),
    /// Dead-lettered before.
    Dead,
    /// Another worker's transaction holds the key longer than the lease.
    Busy,
}

fn millis_now() -> i64 {
    i64::try_from(SystemClock.now().0).unwrap_or(i64::MAX)
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

    /// Claims `key` inside the transaction on `conn`.
    pub(crate) async fn claim(
        &self,
        conn: &mut PgConnection,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        attempt: u32,
        lease: Duration,
        retention: Duration,
    ) -> Result<TxClaim, sqlx::Error> {
        let (handler, rest) = key_columns(key.as_str());
        let now = millis_now();
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            lease.as_millis().max(1)
        ))
        .execute(&mut *conn)
        .await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO {} (handler, key, state, owner, attempt, fingerprint, created_at, updated_at) \
             VALUES ($1, $2, 'done', $3, $4, $5, $6, $6) ON CONFLICT (handler, key) DO NOTHING",
            self.table
        ))
        .bind(handler)
        .bind(rest)
        .bind(*self.owner.as_uuid())
        .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
        .bind(fingerprint.map(|f| f.as_bytes().to_vec()))
        .bind(now)
        .execute(&mut *conn)
        .await;
        match inserted {
            Ok(done) if done.rows_affected() == 1 => return Ok(TxClaim::Claimed),
            Ok(_) => {}
            Err(e) if is_lock_timeout(&e) => return Ok(TxClaim::Busy),
            Err(e) => return Err(e),
        }
        let row = sqlx::query(&format!(
            "SELECT state, fingerprint, updated_at FROM {} WHERE handler = $1 AND key = $2 FOR UPDATE",
            self.table
        ))
        .bind(handler)
        .bind(rest)
        .fetch_optional(&mut *conn)
        .await;
        let row = match row {
            Ok(Some(row)) => row,
            // Deleted in between (forgotten): the next delivery inserts it.
            Ok(None) => return Ok(TxClaim::Busy),
            Err(e) if is_lock_timeout(&e) => return Ok(TxClaim::Busy),
            Err(e) => return Err(e),
        };
        let state: String = row.try_get("state")?;
        let stored: Option<Vec<u8>> = row.try_get("fingerprint")?;
        let updated_at: i64 = row.try_get("updated_at")?;
        let expired = updated_at
            <= now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        if expired || state == "pending" || state == "released" {
            sqlx::query(&format!(
                "UPDATE {} SET state = 'done', owner = $3, lease_until = NULL, attempt = attempt + 1, fingerprint = $4, \
                 result = NULL, updated_at = $5, revision = nextval('{}') WHERE handler = $1 AND key = $2",
                self.table, self.sequence
            ))
            .bind(handler)
            .bind(rest)
            .bind(*self.owner.as_uuid())
            .bind(fingerprint.map(|f| f.as_bytes().to_vec()))
            .bind(now)
            .execute(&mut *conn)
            .await?;
            return Ok(TxClaim::Claimed);
        }
        if state == "dead" {
            return Ok(TxClaim::Dead);
        }
        let stored = fingerprint_column(stored);
        Ok(match (stored, fingerprint) {
            (Some(stored), Some(mine)) if stored != mine => TxClaim::Conflict(Some(stored)),
            _ => TxClaim::Duplicate,
        })
    }

    /// Stores the handler's result in the claim row (same transaction).
    pub(crate) async fn set_result(
        &self,
        conn: &mut PgConnection,
        key: &RecordKey,
        result: Bytes,
    ) -> Result<(), sqlx::Error> {
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
        .map(drop)
    }

    /// Records that the key was dead-lettered (its own transaction).
    pub(crate) async fn mark_dead(&self, key: &RecordKey, attempt: u32) -> Result<(), sqlx::Error> {
        let (handler, rest) = key_columns(key.as_str());
        let now = millis_now();
        sqlx::query(&format!(
            "INSERT INTO {t} AS inbox (handler, key, state, owner, attempt, created_at, updated_at) \
             VALUES ($1, $2, 'dead', $3, $4, $5, $5) \
             ON CONFLICT (handler, key) DO UPDATE SET state = 'dead', updated_at = $5 WHERE inbox.state <> 'done'",
            t = self.table
        ))
        .bind(handler)
        .bind(rest)
        .bind(*self.owner.as_uuid())
        .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
        .bind(now)
        .execute(&self.pool)
        .await
        .map(drop)
    }
}

impl TxInbox {
    /// Deletes the handler's completed rows past the retention, every
    /// quarter of the retention (at least every minute, at most every hour),
    /// until `stop`.
    pub(crate) async fn purge_loop(
        self,
        schema: String,
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
            match PgStore::purge(&self.pool, &schema, Some(&handler), retention, 1_000).await {
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

fn is_lock_timeout(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == LOCK_NOT_AVAILABLE)
}

mod path {
    //! The transactional path of one delivery.

    use async_nats::jetstream::Message;
    use tracing::{Span, field, warn};

    use super::{TxClaim, TxInbox};
    use crate::handler::{Handler, prepare};
    use crate::key::RecordKey;
    use crate::runtime::process::{
        Failure, Shared, ack_recorded, in_flight_delay, nak, store_backoff,
    };
    use crate::runtime::stats::Outcome;
    use crate::{Delivery, Tx};

    /// Rolls the message's transaction back, if it is still open.
    async fn roll_back(tx: &Tx) {
        if let Some(open) = tx.take().await
            && let Err(e) = open.rollback().await
        {
            warn!(error = %e, "rollback failed; the connection discards the transaction");
        }
    }

    impl<H: Handler> Shared<H> {
        pub(in crate::runtime) async fn process_transactional(
            &self,
            inbox: &TxInbox,
            message: &Message,
            delivery: &Delivery,
        ) {
            let attempt = u32::try_from(delivery.delivered()).unwrap_or(u32::MAX);
            let tx = match inbox.pool.begin().await {
                Ok(open) => Tx::new(open),
                Err(e) => {
                    warn!(error = %e, "database unavailable: the handler was not run");
                    self.count(Outcome::StoreUnavailable);
                    return nak(message, store_backoff(attempt)).await;
                }
            };
            let mut state = self.state.clone();
            state.insert(tx.clone());
            let prepared = match prepare(&self.handler, delivery, &state) {
                Ok(prepared) => prepared,
                Err(rejected) => {
                    roll_back(&tx).await;
                    return self.rejected(message, delivery, rejected).await;
                }
            };
            Span::current().record("key", field::debug(&prepared.key));
            let key = RecordKey::new(&self.name, &prepared.key);
            let claimed = match tx.conn().await {
                Ok(mut conn) => inbox
                    .claim(
                        &mut conn,
                        &key,
                        prepared.fingerprint,
                        attempt,
                        self.config.lease,
                        self.config.retention,
                    )
                    .await
                    .map_err(|e| e.to_string()),
                Err(closed) => Err(closed.to_string()),
            };
            let outcome = match claimed {
                Ok(TxClaim::Claimed) => None,
                Ok(other) => Some(other),
                Err(e) => {
                    warn!(error = %e, "database error while claiming: the handler was not run");
                    roll_back(&tx).await;
                    self.count(Outcome::StoreUnavailable);
                    return nak(message, store_backoff(attempt)).await;
                }
            };
            if let Some(other) = outcome {
                roll_back(&tx).await;
                return match other {
                    TxClaim::Duplicate | TxClaim::Dead => {
                        self.count(Outcome::Duplicate);
                        ack_recorded(message).await
                    }
                    TxClaim::Busy => {
                        self.count(Outcome::InFlightElsewhere);
                        nak(message, in_flight_delay(attempt, self.config.lease)).await
                    }
                    TxClaim::Conflict(stored) => self.key_conflict(message, delivery, stored).await,
                    TxClaim::Claimed => {}
                };
            }

            let result = self
                .run(message, None, self.handler.call(prepared.args))
                .await;
            let output = match result {
                None => {
                    roll_back(&tx).await;
                    return self.interrupted(message, None).await;
                }
                Some(Err(error)) => {
                    // Effect and claim vanish together.
                    roll_back(&tx).await;
                    match self.after_failure(&error, attempt) {
                        Failure::Retry(delay) => {
                            warn!(%error, ?delay, "handler failed; rolled back, retrying");
                            self.count(Outcome::Retried);
                            return nak(message, delay).await;
                        }
                        Failure::DeadLetter(code) => {
                            self.dead_letter(message, delivery, code, &error, None)
                                .await
                        }
                    }
                    if let Err(e) = inbox.mark_dead(&key, attempt).await {
                        warn!(error = %e, "could not mark the key dead in the inbox");
                    }
                    return;
                }
                Some(Ok(output)) => output,
            };
            if self.config.store_result {
                match self.handler.encode_result(&output) {
                    Ok(Some(bytes)) => {
                        let stored = match tx.conn().await {
                            Ok(mut conn) => inbox
                                .set_result(&mut conn, &key, bytes)
                                .await
                                .map_err(|e| e.to_string()),
                            Err(closed) => Err(closed.to_string()),
                        };
                        if let Err(e) = stored {
                            warn!(error = %e, "could not store the result; rolled back");
                            roll_back(&tx).await;
                            self.count(Outcome::StoreUnavailable);
                            return nak(message, store_backoff(attempt)).await;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, "could not serialize the result; duplicates will get none")
                    }
                }
            }
            let committed = match tx.take().await {
                Some(open) => open.commit().await.map_err(|e| e.to_string()),
                None => Err("the transaction was closed by the handler".to_owned()),
            };
            match committed {
                Ok(()) => self.succeeded(message, true).await,
                // Unknown outcome: the redelivery finds the row (duplicate)
                // or not (runs again) — never both effects.
                Err(e) => {
                    warn!(error = %e, "commit failed; the message will be redelivered");
                    self.count(Outcome::StoreUnavailable);
                    nak(message, store_backoff(attempt)).await;
                }
            }
        }
    }
}
