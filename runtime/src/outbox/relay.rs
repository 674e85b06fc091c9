//! The relay loop both outboxes run, over a small trait as the dedup
//! stores share `CasStore`: take a batch of stored messages, publish them
//! (each resent with its id until confirmed), settle the batch — confirmed
//! messages deleted, refused ones set aside with the reason — and, when
//! nothing is left, wait for more. Where the messages are (a redb file, a
//! PostgreSQL table) is the store's business; what is done with them is
//! this loop's.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::OutboxError;
use crate::publisher::{Outgoing, PublishError, Publisher};
use crate::retry::Schedule;

/// Messages a store handed the relay, and what it needs to settle them.
pub(super) struct Batch<K, H> {
    /// The store's hold on the batch (a locked transaction, or nothing).
    pub(super) handle: H,
    /// The messages, each under the store's key for it.
    pub(super) messages: Vec<(K, Outgoing)>,
    /// Stored entries that do not decode: set aside as refused.
    pub(super) unreadable: Vec<(K, String)>,
}

/// A store's batch.
pub(super) type StoreBatch<S> = Batch<<S as RelayStore>::Key, <S as RelayStore>::Handle>;

/// What became of a batch.
pub(super) struct Settled<K> {
    /// Confirmed by the broker, with how many sends each took.
    pub(super) confirmed: Vec<(K, u32)>,
    /// Refused for good (no stream, too large, …), with the reason.
    pub(super) refused: Vec<(K, String)>,
}

/// Where an outbox keeps its messages: what the relay asks of it.
pub(super) trait RelayStore: Send {
    /// A message's key in the store.
    type Key: Send;
    /// The store's hold on a batch until it is settled.
    type Handle: Send;

    /// The next messages to publish, at most `limit`, oldest first; `None`
    /// when there are none.
    fn take(
        &mut self,
        limit: usize,
    ) -> impl Future<Output = Result<Option<StoreBatch<Self>>, OutboxError>> + Send;

    /// Deletes the confirmed messages and sets the refused ones aside.
    fn settle(
        &mut self,
        handle: Self::Handle,
        settled: Settled<Self::Key>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Waits until more messages may have been stored (a notification, or
    /// a poll interval).
    fn more(&mut self) -> impl Future<Output = ()> + Send;
}

/// How the relay publishes.
pub(super) struct RelayConfig {
    /// Messages per batch.
    pub(super) batch: usize,
    /// Messages in flight at once.
    pub(super) window: usize,
}

/// A running relay — the same handle for either outbox: it publishes until
/// [`stop`](Relay::stop)ped (the batch in flight settled first) or dropped.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, client: async_nats::Client) -> Result<(), idem::outbox::OutboxError> {
/// use idem::outbox::PgOutbox;
/// use idem::publisher::Publisher;
///
/// let outbox = PgOutbox::open(pool, "idem").await?;
/// let relay = outbox.start_relay(Publisher::new(client));
/// // … until shutdown:
/// relay.stop().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Starts the relay loop over `store` on its own task.
    pub(super) fn spawn<S: RelayStore + 'static>(
        store: impl Future<Output = S> + Send + 'static,
        publisher: Publisher,
        config: RelayConfig,
        stop: CancellationToken,
    ) -> Self {
        let running = stop.clone();
        let task = tokio::spawn(async move { run(store.await, publisher, config, running).await });
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stops publishing: the batch in flight is settled first.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops at once, as a crash would: a batch in flight is neither
    /// settled nor rolled forward (the next relay publishes it again, with
    /// the same ids, and the broker drops the copies).
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Publishes what `store` holds until `stop`.
async fn run<S: RelayStore>(
    mut store: S,
    publisher: Publisher,
    config: RelayConfig,
    stop: CancellationToken,
) {
    // After a store failure or unconfirmed messages: 500 ms doubling to 5 s.
    let mut pauses = Schedule::exponential(Duration::from_millis(500), Duration::from_secs(5));
    while !stop.is_cancelled() {
        let batch = tokio::select! {
            batch = store.take(config.batch) => batch,
            () = stop.cancelled() => return,
        };
        let batch = match batch {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                tokio::select! {
                    () = store.more() => continue,
                    () = stop.cancelled() => return,
                }
            }
            Err(e) => {
                error!(error = %e, "outbox relay: could not read pending messages");
                pause(&stop, pauses.next()).await;
                continue;
            }
        };
        let (keys, messages): (Vec<S::Key>, Vec<Outgoing>) = batch.messages.into_iter().unzip();
        let results: Vec<_> = tokio::select! {
            results = publisher.publish_all(futures::stream::iter(messages), config.window).collect() => results,
            () = stop.cancelled() => return,
        };
        let mut settled = Settled {
            confirmed: Vec::new(),
            refused: batch.unreadable,
        };
        let mut unconfirmed = 0usize;
        for (key, result) in keys.into_iter().zip(results) {
            match result {
                Ok(published) => settled.confirmed.push((key, published.attempts)),
                Err(PublishError::DeadlineExceeded { .. }) => unconfirmed += 1,
                Err(refused) => {
                    warn!(error = %refused, "outbox relay: the broker refused a message for good; set aside");
                    settled.refused.push((key, refused.to_string()));
                }
            }
        }
        if let Err(e) = store.settle(batch.handle, settled).await {
            // The broker has them: resent later, dropped as duplicates.
            error!(error = %e, "outbox relay: could not delete confirmed messages");
            pause(&stop, pauses.next()).await;
            continue;
        }
        if unconfirmed > 0 {
            warn!(
                unconfirmed,
                "outbox relay: messages not confirmed before the publisher's deadline; resending"
            );
            pause(&stop, pauses.next()).await;
        } else {
            pauses.reset();
        }
    }
}

async fn pause(stop: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = stop.cancelled() => {}
    }
}
