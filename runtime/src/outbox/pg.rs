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

use futures::StreamExt;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{PgConnection, Row};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::publisher::{Outgoing, PublishError, Publisher};
use crate::store::{StoreError, StoreOp, migrated_schema};

/// How many rows a relay publishes per transaction.
const BATCH: i64 = 512;
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
/// tokio::spawn(outbox.relay(Publisher::new(client), tokio_util::sync::CancellationToken::new()));
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
    pub async fn open(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        let ident = migrated_schema(&pool, schema).await?;
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
    ) -> Result<String, StoreError> {
        let message = message.traced();
        let headers = serde_json::to_string(&message.header_pairs())
            .map_err(|e| StoreError::unavailable(StoreOp::Create, e))?;
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
        .map_err(|e| StoreError::unavailable(StoreOp::Create, e))?;
        // Delivered to listeners when (and only if) the transaction commits.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *conn)
            .await
            .map_err(|e| StoreError::unavailable(StoreOp::Create, e))?;
        Ok(message.id)
    }

    /// How many messages wait to be published (refused ones excluded).
    pub async fn pending(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE failed_at IS NULL",
            self.table
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable(StoreOp::Read, e))
    }

    /// Publishes committed messages until `stop`: batches locked with
    /// `FOR UPDATE SKIP LOCKED`, each message resent until confirmed, rows
    /// deleted on their PubAck.
    pub async fn relay(self, publisher: Publisher, stop: CancellationToken) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut listener) => match listener.listen(&self.channel).await {
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
        while !stop.is_cancelled() {
            match self.publish_batch(&publisher).await {
                Ok(Drained::More) => continue,
                Ok(Drained::Empty) => {}
                Ok(Drained::Unconfirmed) | Err(_) => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            }
            let woken = async {
                match listener.as_mut() {
                    Some(listener) => {
                        let _ = listener.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(POLL) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Publishes one locked batch and deletes what the broker confirmed.
    async fn publish_batch(&self, publisher: &Publisher) -> Result<Drained, StoreError> {
        let unavailable = |op| move |e: sqlx::Error| StoreError::unavailable(op, e);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(unavailable(StoreOp::Read))?;
        let rows = sqlx::query(&format!(
            "SELECT id, subject, payload, headers FROM {} WHERE failed_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
            self.table
        ))
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable(StoreOp::Read))?;
        if rows.is_empty() {
            return Ok(Drained::Empty);
        }
        let full = rows.len() as i64 == BATCH;
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id").map_err(unavailable(StoreOp::Read))?;
            let subject: String = row.try_get("subject").map_err(unavailable(StoreOp::Read))?;
            let payload: Vec<u8> = row.try_get("payload").map_err(unavailable(StoreOp::Read))?;
            let headers: String = row.try_get("headers").map_err(unavailable(StoreOp::Read))?;
            let headers =
                serde_json::from_str::<Vec<(String, String)>>(&headers).unwrap_or_default();
            messages.push(
                Outgoing::new(subject, payload)
                    .with_id(id)
                    .with_header_pairs(headers),
            );
        }
        let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
        let results: Vec<_> = publisher
            .publish_all(futures::stream::iter(messages), 256)
            .collect()
            .await;
        let mut confirmed = Vec::new();
        let mut unconfirmed = false;
        for (id, result) in ids.into_iter().zip(results) {
            match result {
                Ok(_) => confirmed.push(id),
                Err(PublishError::DeadlineExceeded { .. }) => unconfirmed = true,
                Err(refused) => {
                    warn!(%id, error = %refused, "outbox relay: the broker refused a message for good; marked failed");
                    sqlx::query(&format!(
                        "UPDATE {} SET failed_at = now(), error = $2 WHERE id = $1",
                        self.table
                    ))
                    .bind(&id)
                    .bind(refused.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable(StoreOp::Update))?;
                }
            }
        }
        sqlx::query(&format!("DELETE FROM {} WHERE id = ANY($1)", self.table))
            .bind(&confirmed)
            .execute(&mut *tx)
            .await
            .map_err(unavailable(StoreOp::Delete))?;
        tx.commit().await.map_err(unavailable(StoreOp::Delete))?;
        if !confirmed.is_empty() {
            info!(published = confirmed.len(), "outbox relay: published");
        }
        Ok(if unconfirmed {
            Drained::Unconfirmed
        } else if full {
            Drained::More
        } else {
            Drained::Empty
        })
    }
}

/// What a batch left behind.
enum Drained {
    /// The batch was full: there may be more.
    More,
    /// Nothing more right now.
    Empty,
    /// Some messages were not confirmed before the deadline: back off.
    Unconfirmed,
}
