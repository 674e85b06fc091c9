//! The transactional outbox on PostgreSQL (feature `postgres`): messages
//! are written in the caller's business transaction — committed with the
//! effect or not at all — and a relay publishes them through the
//! [`Publisher`], with the row's id as the message id, then deletes them.
//!
//! A relay that crashes after publishing and before deleting leaves the rows;
//! the next relay publishes them again with the same ids, and the stream's
//! duplicate window drops the copies. Several relays can run at once: each
//! batch is locked with `FOR UPDATE SKIP LOCKED`. Relays wake on
//! `LISTEN/NOTIFY` when a message is committed, and poll slowly as a safety
//! net.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use sqlx::{PgConnection, Row};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::OutboxError;
use super::relay::{Batch, Relay, RelayConfig, RelayStore, Settled};
use crate::publisher::{Outgoing, Publisher};
use crate::store::{StoreError, StoreOp, migrated_schema};

/// How many rows a relay publishes per transaction.
const BATCH: usize = 512;
/// How long a relay sleeps without a notification before it looks anyway.
const POLL: Duration = Duration::from_secs(5);

/// The outbox table of a schema.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, client: async_nats::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use idem::outbox::PgOutbox;
/// use idem::publisher::{Outgoing, Publisher};
///
/// let outbox = PgOutbox::open(pool.clone(), "idem").await?;
/// let mut tx = pool.begin().await?;
/// // … the business writes, then the message, in the same transaction:
/// outbox.enqueue(&mut tx, Outgoing::new("transfers.completed", "{}")).await?;
/// tx.commit().await?;
///
/// // Elsewhere (one or more): publish what was committed.
/// let relay = outbox.start_relay(Publisher::new(client));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PgOutbox {
    pool: PgPool,
    table: String,
    channel: String,
}

impl PgOutbox {
    /// The outbox of a migrated schema ([`PgStore::migrate`](crate::store::PgStore::migrate)).
    pub async fn open(pool: PgPool, schema: &str) -> Result<Self, OutboxError> {
        let ident =
            migrated_schema(&pool, schema)
                .await
                .map_err(|source| OutboxError::Database {
                    table: format!("{schema}.idem_outbox"),
                    source,
                })?;
        Ok(Self {
            pool,
            table: format!("{ident}.idem_outbox"),
            channel: format!("idem_outbox_{schema}"),
        })
    }

    /// Writes `message` in the caller's transaction (pass `&mut *tx`); it
    /// is published after the transaction commits, never if it rolls back.
    /// Returns the message id.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        message: Outgoing,
    ) -> Result<String, OutboxError> {
        let message = message.traced();
        let headers =
            serde_json::to_string(&message.header_pairs()).map_err(|e| OutboxError::Database {
                table: self.table.clone(),
                source: StoreError::unavailable(StoreOp::Create, e),
            })?;
        sqlx::query(&format!(
            "INSERT INTO {} (id, subject, payload, headers) VALUES ($1, $2, $3, $4)",
            self.table
        ))
        .bind(&message.id)
        .bind(&message.subject)
        .bind(message.payload.to_vec())
        .bind(headers)
        .execute(&mut *conn)
        .await
        .map_err(self.failed(StoreOp::Create))?;
        // Delivered to listeners when (and only if) the transaction commits.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *conn)
            .await
            .map_err(self.failed(StoreOp::Create))?;
        Ok(message.id)
    }

    /// How many messages wait to be published (refused ones excluded).
    pub async fn pending(&self) -> Result<i64, OutboxError> {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE failed_at IS NULL",
            self.table
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(self.failed(StoreOp::Read))
    }

    /// Starts a relay: publishes committed messages — batches locked with
    /// `FOR UPDATE SKIP LOCKED`, each message resent until confirmed, rows
    /// deleted on their PubAck — until the returned [`Relay`] is stopped or
    /// dropped; the same loop and handle as the [`Outbox`](super::Outbox)'s.
    /// Several relays (in this or other processes) may run at once.
    /// [`RuntimeBuilder::relay`](crate::consumer::RuntimeBuilder::relay)
    /// starts one with a runtime.
    pub fn start_relay(&self, publisher: Publisher) -> Relay {
        let outbox = self.clone();
        let store = async move {
            let listener = match PgListener::connect_with(&outbox.pool).await {
                Ok(mut listener) => match listener.listen(&outbox.channel).await {
                    Ok(()) => Some(listener),
                    Err(e) => {
                        warn!(error = %e, "outbox relay: LISTEN failed; polling instead");
                        None
                    }
                },
                Err(e) => {
                    warn!(error = %e, "outbox relay: no listener connection; polling instead");
                    None
                }
            };
            TableStore { outbox, listener }
        };
        let config = RelayConfig {
            batch: BATCH,
            window: 256,
        };
        Relay::spawn(store, publisher, config, CancellationToken::new())
    }

    fn failed(&self, op: StoreOp) -> impl FnOnce(sqlx::Error) -> OutboxError + '_ {
        move |e| OutboxError::Database {
            table: self.table.clone(),
            source: StoreError::unavailable(op, e),
        }
    }
}

/// The outbox table as the relay's store: a batch is a transaction holding
/// its rows locked until they are settled.
struct TableStore {
    outbox: PgOutbox,
    listener: Option<PgListener>,
}

impl RelayStore for TableStore {
    type Key = String;
    type Handle = sqlx::Transaction<'static, sqlx::Postgres>;

    async fn take(
        &mut self,
        limit: usize,
    ) -> Result<Option<Batch<String, Self::Handle>>, OutboxError> {
        let outbox = &self.outbox;
        let mut tx = outbox
            .pool
            .begin()
            .await
            .map_err(outbox.failed(StoreOp::Read))?;
        let rows = sqlx::query(&format!(
            "SELECT id, subject, payload, headers FROM {} WHERE failed_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
            outbox.table
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(outbox.failed(StoreOp::Read))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut batch = Batch {
            handle: tx,
            messages: Vec::with_capacity(rows.len()),
            unreadable: Vec::new(),
        };
        for row in &rows {
            let id: String = row.try_get("id").map_err(outbox.failed(StoreOp::Read))?;
            let subject: String = row
                .try_get("subject")
                .map_err(outbox.failed(StoreOp::Read))?;
            let payload: Vec<u8> = row
                .try_get("payload")
                .map_err(outbox.failed(StoreOp::Read))?;
            let headers: String = row
                .try_get("headers")
                .map_err(outbox.failed(StoreOp::Read))?;
            match serde_json::from_str::<Vec<(String, String)>>(&headers) {
                Ok(headers) => batch.messages.push((
                    id.clone(),
                    Outgoing::new(subject, payload)
                        .with_id(id)
                        .with_header_pairs(headers),
                )),
                Err(e) => batch
                    .unreadable
                    .push((id, format!("its headers do not decode: {e}"))),
            }
        }
        Ok(Some(batch))
    }

    async fn settle(
        &mut self,
        mut tx: Self::Handle,
        settled: Settled<String>,
    ) -> Result<(), OutboxError> {
        let outbox = &self.outbox;
        for (id, reason) in &settled.refused {
            sqlx::query(&format!(
                "UPDATE {} SET failed_at = now(), error = $2 WHERE id = $1",
                outbox.table
            ))
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await
            .map_err(outbox.failed(StoreOp::Update))?;
        }
        let confirmed: Vec<String> = settled.confirmed.into_iter().map(|(id, _)| id).collect();
        sqlx::query(&format!("DELETE FROM {} WHERE id = ANY($1)", outbox.table))
            .bind(&confirmed)
            .execute(&mut *tx)
            .await
            .map_err(outbox.failed(StoreOp::Delete))?;
        tx.commit().await.map_err(outbox.failed(StoreOp::Delete))?;
        if !confirmed.is_empty() {
            info!(published = confirmed.len(), "outbox relay: published");
        }
        Ok(())
    }

    async fn more(&mut self) {
        let woken = async {
            match self.listener.as_mut() {
                Some(listener) => {
                    let _ = listener.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}
