//! One handler's fetch loop: bounded concurrency, batched pulls, graceful
//! shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::pace::Pace;
use super::process::Shared;
use crate::handler::Handler;

/// The most messages one pull asks for.
const MAX_BATCH: usize = 256;
/// How long one pull waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// NAKs a fetched message (if any) and whatever the pull still brings, so
/// that nothing waits for ack_wait after a shutdown.
async fn hand_back<S, E>(batch: &mut S, first: Option<async_nats::jetstream::Message>)
where
    S: futures::Stream<Item = Result<async_nats::jetstream::Message, E>> + Unpin,
{
    if let Some(message) = first {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
    while let Ok(Some(Ok(message))) = timeout(PULL_EXPIRES, batch.next()).await {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// A handler's loop with its type erased, so that handlers of different
/// types run in one runtime.
pub(crate) trait Worker: Send {
    fn run(
        self: Box<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

pub(crate) struct HandlerWorker<H> {
    pub(crate) shared: Arc<Shared<H>>,
    pub(crate) consumer: PullConsumer,
}

impl<H: Handler> Worker for HandlerWorker<H> {
    fn run(
        self: Box<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.fetch_loop(shutdown, grace))
    }
}

impl<H: Handler> HandlerWorker<H> {
    async fn fetch_loop(self: Box<Self>, shutdown: CancellationToken, grace: Duration) {
        #[cfg(feature = "postgres")]
        if let Some(inbox) = &self.shared.inbox {
            let config = &self.shared.config;
            let purge = inbox.clone().purge_loop(
                inbox.schema.clone(),
                config.name.clone(),
                config.retention,
                shutdown.clone(),
            );
            tokio::spawn(purge);
        }
        let permits = Arc::new(Semaphore::new(self.shared.config.concurrency));
        let pace = Arc::new(Pace::default());
        let tasks = TaskTracker::new();
        let mut pull_failures = 0u32;
        'fetching: while !shutdown.is_cancelled() {
            // A pull issued while the last messages still run (so its round
            // trip overlaps the work), for as many as can start soon (see
            // `pace`); the permits below bound how many run at once.
            let wanted = pace.pull_size(self.shared.config.concurrency, MAX_BATCH);
            let batch = tokio::select! {
                batch = self.consumer.fetch().max_messages(wanted).expires(PULL_EXPIRES).messages() => batch,
                () = shutdown.cancelled() => break,
            };
            let mut batch = match batch {
                Ok(batch) => {
                    pull_failures = 0;
                    batch
                }
                Err(e) => {
                    pull_failures += 1;
                    let pause = Duration::from_millis(100 * u64::from(pull_failures.min(20)));
                    warn!(handler = %self.shared.config.name, error = %e, ?pause, "pull failed; retrying");
                    tokio::select! { () = sleep(pause) => continue, () = shutdown.cancelled() => break }
                }
            };
            loop {
                let message = tokio::select! {
                    message = batch.next() => message,
                    () = shutdown.cancelled() => {
                        hand_back(&mut batch, None).await;
                        break 'fetching;
                    }
                };
                let message = match message {
                    None => break,
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        debug!(handler = %self.shared.config.name, error = %e, "pull ended early");
                        break;
                    }
                };
                let permit = tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break 'fetching,
                    },
                    // Shutdown while every handler runs: this message and the
                    // rest of the pull go back rather than wait.
                    () = shutdown.cancelled() => {
                        hand_back(&mut batch, Some(message)).await;
                        break 'fetching;
                    }
                };
                let (shared, pace) = (self.shared.clone(), pace.clone());
                tasks.spawn(async move {
                    let began = Instant::now();
                    shared.handle(message).await;
                    pace.record(began.elapsed());
                    drop(permit);
                });
            }
        }
        // Shutdown: no more pulls; in-flight handlers get `grace` to finish,
        // then the rest are interrupted (claims released, messages NAKed).
        tasks.close();
        if timeout(grace, tasks.wait()).await.is_err() {
            self.shared.hard_stop.cancel();
            tasks.wait().await;
        }
    }
}
