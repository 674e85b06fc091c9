//! The durable outbox: `enqueue` returns once a message is on local disk
//! (fsync); a relay task publishes it through the [`Publisher`] — resending
//! with the same id until confirmed — and deletes it on its PubAck. After a
//! crash, the next `open` of the file resends whatever was not confirmed,
//! with the same ids, and the broker's duplicate window drops the copies
//! it already had.
//!
//! Stored with [redb](https://docs.rs/redb): an embedded, crash-safe B-tree
//! file with ACID transactions, whose default exclusive lock also enforces
//! one outbox per file.
//!
//! ```no_run
//! # async fn demo(client: async_nats::Client) -> Result<(), idem::outbox::OutboxError> {
//! use idem::outbox::{Outbox, OutboxConfig};
//! use idem::publisher::{Outgoing, Publisher};
//!
//! let outbox = Outbox::open("payments.outbox", Publisher::new(client), OutboxConfig::default()).await?;
//! outbox.enqueue(Outgoing::new("payments.succeeded", r#"{"payment_id":42}"#).with_id("payment-42")).await?;
//! outbox.flush().await?; // every message confirmed by the broker
//! # Ok(()) }
//! ```
//!
//! A resend can only be caught within the stream's duplicate window: a
//! producer that stays down (or cut off from the broker) longer than the
//! window after the broker stored a message may store it a second time;
//! consumers keyed on the business operation still run it once.

mod entry;
mod error;
#[cfg(feature = "postgres")]
mod pg;
mod relay;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use error::OutboxError;
#[cfg(feature = "postgres")]
pub use pg::PgOutbox;
pub use relay::Relay;

use crate::clock::{Clock, SystemClock};
use crate::publisher::{Outgoing, Publisher};
use crate::subject::validate_publish;
use entry::Entry;

/// Messages waiting for their PubAck, by enqueue order.
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
/// Messages the broker refused for good (no stream, …), kept for inspection.
const FAILED: TableDefinition<u64, &[u8]> = TableDefinition::new("failed");

/// What `enqueue` does when the outbox is full.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait until the relay makes room (backpressure; the default).
    #[default]
    Wait,
    /// Fail with [`OutboxError::Full`].
    Reject,
}

/// How an outbox behaves. Defaults: 100,000 messages, wait when full, 256
/// publishes in flight, batches of 1,024.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// The most unconfirmed messages held.
    pub capacity: usize,
    /// What `enqueue` does at capacity.
    pub when_full: WhenFull,
    /// Publishes in flight at once.
    pub window: usize,
    /// Messages read per relay round.
    pub batch: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            when_full: WhenFull::Wait,
            window: 256,
            batch: 1_024,
        }
    }
}

/// The outbox's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages on disk, not yet confirmed.
    pub pending: usize,
    /// Messages confirmed (and deleted) since `open`.
    pub sent: u64,
    /// Extra sends (same id) needed for them.
    pub resent: u64,
    /// Messages the broker refused for good, kept in the file's `failed`
    /// table.
    pub failed: u64,
    /// How long the oldest pending message has waited.
    pub oldest_age: Option<Duration>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    publisher: Publisher,
    config: OutboxConfig,
    next_seq: AtomicU64,
    pending: AtomicUsize,
    sent: AtomicU64,
    resent: AtomicU64,
    failed: AtomicU64,
    /// Wakes the relay when something was enqueued.
    enqueued: Notify,
    /// Wakes waiters (`flush`, full `enqueue`) when the relay made room.
    drained: Notify,
    stop: CancellationToken,
}

/// A durable outbox. Clones share it; the relay stops when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
    _relay: Arc<Relay>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Inner {
    fn storage(&self, source: impl Into<crate::BoxError>) -> OutboxError {
        OutboxError::Storage {
            path: self.path.clone(),
            source: source.into(),
        }
    }

    /// Runs blocking file work off the async threads.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Inner) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let inner = self.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| self.storage(e))?
    }
}

impl Outbox {
    /// Opens (or creates) the outbox file and starts its relay, which
    /// resends at once whatever an earlier run left unconfirmed.
    pub async fn open(
        path: impl AsRef<Path>,
        publisher: Publisher,
        config: OutboxConfig,
    ) -> Result<Outbox, OutboxError> {
        let path = path.as_ref().to_owned();
        let file = path.clone();
        let opened = tokio::task::spawn_blocking(move || Database::create(&file))
            .await
            .map_err(|e| OutboxError::Storage {
                path: path.clone(),
                source: e.into(),
            })?;
        let db = match opened {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(OutboxError::InUse { path }),
            Err(e) => {
                return Err(OutboxError::Storage {
                    path,
                    source: e.into(),
                });
            }
        };
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            db,
            path,
            publisher,
            config,
            next_seq: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            enqueued: Notify::new(),
            drained: Notify::new(),
            stop: stop.clone(),
        });
        let (pending, failed, next_seq) = inner
            .blocking(|inner| {
                let txn = inner.db.begin_write().map_err(|e| inner.storage(e))?;
                let found = {
                    let pending = txn.open_table(PENDING).map_err(|e| inner.storage(e))?;
                    let failed = txn.open_table(FAILED).map_err(|e| inner.storage(e))?;
                    let last = |table: &redb::Table<u64, &[u8]>| {
                        table
                            .last()
                            .map(|last| last.map(|(k, _)| k.value()))
                            .map_err(|e| inner.storage(e))
                    };
                    // Sequence numbers continue after both tables: a refused
                    // message kept for inspection keeps its number.
                    let next = last(&pending)?.max(last(&failed)?).map_or(0, |k| k + 1);
                    (
                        pending.len().map_err(|e| inner.storage(e))?,
                        failed.len().map_err(|e| inner.storage(e))?,
                        next,
                    )
                };
                txn.commit().map_err(|e| inner.storage(e))?;
                Ok(found)
            })
            .await?;
        inner.pending.store(
            usize::try_from(pending).unwrap_or(usize::MAX),
            Ordering::SeqCst,
        );
        inner.failed.store(failed, Ordering::SeqCst);
        inner.next_seq.store(next_seq, Ordering::SeqCst);
        let config = relay::RelayConfig {
            batch: inner.config.batch,
            window: inner.config.window,
        };
        let store = FileStore(inner.clone());
        let relay = Relay::spawn(
            std::future::ready(store),
            inner.publisher.clone(),
            config,
            stop,
        );
        Ok(Outbox {
            inner,
            _relay: Arc::new(relay),
        })
    }

    /// Stores one message; returns its id once it is on disk.
    pub async fn enqueue(&self, message: Outgoing) -> Result<String, OutboxError> {
        self.enqueue_all(vec![message])
            .await?
            .into_iter()
            .next()
            .ok_or(OutboxError::Closed)
    }

    /// Stores messages in one transaction (one fsync); returns their ids once
    /// they are on disk.
    pub async fn enqueue_all(&self, messages: Vec<Outgoing>) -> Result<Vec<String>, OutboxError> {
        let messages: Vec<Outgoing> = messages.into_iter().map(Outgoing::traced).collect();
        let inner = &self.inner;
        let max = inner.publisher.max_payload();
        for message in &messages {
            validate_publish(message.subject()).map_err(|source| OutboxError::InvalidSubject {
                subject: message.subject().to_owned(),
                source,
            })?;
            if max > 0 && message.size() > max {
                return Err(OutboxError::PayloadTooLarge {
                    size: message.size(),
                    max,
                });
            }
        }
        self.room_for(messages.len()).await?;
        let first = inner
            .next_seq
            .fetch_add(messages.len() as u64, Ordering::SeqCst);
        let now = SystemClock.now();
        let ids: Vec<String> = messages.iter().map(|m| m.id().to_owned()).collect();
        let entries: Vec<(u64, Vec<u8>)> = messages
            .iter()
            .zip(first..)
            .map(|(m, seq)| (seq, Entry::from_outgoing(m, now).encode()))
            .collect();
        let count = entries.len();
        inner
            .blocking(move |inner| {
                let txn = inner.db.begin_write().map_err(|e| inner.storage(e))?;
                {
                    let mut pending = txn.open_table(PENDING).map_err(|e| inner.storage(e))?;
                    for (seq, bytes) in &entries {
                        pending
                            .insert(seq, bytes.as_slice())
                            .map_err(|e| inner.storage(e))?;
                    }
                }
                txn.commit().map_err(|e| inner.storage(e))
            })
            .await?;
        inner.pending.fetch_add(count, Ordering::SeqCst);
        inner.enqueued.notify_one();
        Ok(ids)
    }

    /// Waits until `n` more messages fit, or refuses, per `when_full`.
    async fn room_for(&self, n: usize) -> Result<(), OutboxError> {
        let inner = &self.inner;
        let full = || OutboxError::Full {
            capacity: inner.config.capacity,
        };
        let fits = |pending: usize| pending + n <= inner.config.capacity;
        if n > inner.config.capacity {
            return Err(full());
        }
        match inner.config.when_full {
            WhenFull::Reject if fits(inner.pending.load(Ordering::SeqCst)) => Ok(()),
            WhenFull::Reject => Err(full()),
            WhenFull::Wait => self.until_pending(fits).await,
        }
    }

    /// Waits until every message enqueued so far is confirmed (or failed for
    /// good).
    pub async fn flush(&self) -> Result<(), OutboxError> {
        self.until_pending(|pending| pending == 0).await
    }

    /// Waits until the number of pending messages satisfies `ready`,
    /// looking again each time the relay makes room.
    async fn until_pending(&self, ready: impl Fn(usize) -> bool) -> Result<(), OutboxError> {
        let inner = &self.inner;
        loop {
            // Registered before the check, so that no wake-up is missed.
            let drained = inner.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if ready(inner.pending.load(Ordering::SeqCst)) {
                return Ok(());
            }
            tokio::select! {
                () = drained => {}
                () = inner.stop.cancelled() => return Err(OutboxError::Closed),
            }
        }
    }

    /// The counters now, and the age of the oldest pending message.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let oldest = self
            .inner
            .blocking(|inner| {
                let txn = inner.db.begin_read().map_err(|e| inner.storage(e))?;
                let pending = txn.open_table(PENDING).map_err(|e| inner.storage(e))?;
                let first = pending.first().map_err(|e| inner.storage(e))?;
                Ok(first
                    .and_then(|(_, v)| Entry::decode(v.value()))
                    .map(|e| e.enqueued_at))
            })
            .await?;
        let inner = &self.inner;
        Ok(OutboxStats {
            pending: inner.pending.load(Ordering::SeqCst),
            sent: inner.sent.load(Ordering::SeqCst),
            resent: inner.resent.load(Ordering::SeqCst),
            failed: inner.failed.load(Ordering::SeqCst),
            oldest_age: oldest.map(|t| SystemClock.now().saturating_since(t)),
        })
    }
}

/// The outbox file as the relay's store: batches read in enqueue order,
/// settled in one write transaction.
struct FileStore(Arc<Inner>);

impl relay::RelayStore for FileStore {
    type Key = u64;
    type Handle = ();

    async fn take(&mut self, limit: usize) -> Result<Option<relay::Batch<u64, ()>>, OutboxError> {
        let stored = self
            .0
            .blocking(move |inner| {
                let txn = inner.db.begin_read().map_err(|e| inner.storage(e))?;
                let pending = txn.open_table(PENDING).map_err(|e| inner.storage(e))?;
                let mut batch = Vec::new();
                for item in pending.iter().map_err(|e| inner.storage(e))?.take(limit) {
                    let (seq, bytes) = item.map_err(|e| inner.storage(e))?;
                    batch.push((seq.value(), Entry::decode(bytes.value())));
                }
                Ok(batch)
            })
            .await?;
        if stored.is_empty() {
            return Ok(None);
        }
        let mut batch = relay::Batch {
            handle: (),
            messages: Vec::new(),
            unreadable: Vec::new(),
        };
        for (seq, entry) in stored {
            match entry {
                Some(entry) => batch.messages.push((seq, entry.to_outgoing())),
                None => batch
                    .unreadable
                    .push((seq, "the stored entry does not decode".into())),
            }
        }
        Ok(Some(batch))
    }

    async fn settle(&mut self, (): (), settled: relay::Settled<u64>) -> Result<(), OutboxError> {
        let done = settled.confirmed.len();
        let failed = settled.refused.len();
        let resent: u64 = settled
            .confirmed
            .iter()
            .map(|(_, sends)| u64::from(sends.saturating_sub(1)))
            .sum();
        self.0
            .blocking(move |inner| {
                let txn = inner.db.begin_write().map_err(|e| inner.storage(e))?;
                {
                    let mut pending = txn.open_table(PENDING).map_err(|e| inner.storage(e))?;
                    let mut failed_table = txn.open_table(FAILED).map_err(|e| inner.storage(e))?;
                    for (seq, _) in &settled.confirmed {
                        pending.remove(seq).map_err(|e| inner.storage(e))?;
                    }
                    for (seq, _) in &settled.refused {
                        let stored = pending.remove(seq).map_err(|e| inner.storage(e))?;
                        let bytes = stored.map(|s| s.value().to_vec()).unwrap_or_default();
                        failed_table
                            .insert(seq, bytes.as_slice())
                            .map_err(|e| inner.storage(e))?;
                    }
                }
                txn.commit().map_err(|e| inner.storage(e))
            })
            .await?;
        let inner = &self.0;
        inner.sent.fetch_add(done as u64, Ordering::SeqCst);
        inner.resent.fetch_add(resent, Ordering::SeqCst);
        inner.failed.fetch_add(failed as u64, Ordering::SeqCst);
        inner.pending.fetch_sub(done + failed, Ordering::SeqCst);
        inner.drained.notify_waiters();
        Ok(())
    }

    async fn more(&mut self) {
        self.0.enqueued.notified().await;
    }
}
