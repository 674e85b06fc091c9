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

use super::RuntimeError;
use super::pace::Pace;
use super::shared::Shared;
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
    /// The handler's name.
    fn name(&self) -> &str;

    /// What the worker reports to the runtime's health probe.
    fn status(&self) -> Arc<super::health::HandlerStatus>;

    /// Fetches and handles until `shutdown` (then lets running handlers
    /// finish within `grace`), or until the consumer is gone.
    fn run(
        self: Box<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<(), RuntimeError>> + Send>>;
}

pub(crate) struct HandlerWorker<H> {
    pub(crate) shared: Arc<Shared<H>>,
    pub(crate) consumer: PullConsumer,
}

impl<H: Handler> Worker for HandlerWorker<H> {
    fn name(&self) -> &str {
        &self.shared.config.name
    }

    fn status(&self) -> Arc<super::health::HandlerStatus> {
        self.shared.status.clone()
    }

    fn run(
        self: Box<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<(), RuntimeError>> + Send>> {
        Box::pin(self.fetch_loop(shutdown, grace))
    }
}

/// How many pulls in a row must find the consumer gone before the worker
/// gives up on it (a cluster electing a leader can answer oddly once).
const GONE_AFTER: u32 = 3;
/// How often an idle worker asks whether its consumer still exists: some
/// servers (2.9) answer a pull for a deleted consumer with silence, not an
/// error, so empty pulls alone never tell.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Tells a consumer that was deleted from one that is merely slow to
/// answer: counts failed pulls in a row, and asks the server (rarely)
/// whether the consumer still exists.
struct Liveness {
    failures: u32,
    pauses: crate::retry::Schedule,
    idle_checked: Instant,
    seen_gone: u32,
}

impl Liveness {
    fn new() -> Self {
        Self {
            failures: 0,
            pauses: crate::retry::Schedule::pulls(),
            idle_checked: Instant::now(),
            seen_gone: 0,
        }
    }

    /// A pull brought a message, or ended as the server ends pulls.
    fn answered(&mut self) {
        self.failures = 0;
        self.pauses.reset();
    }

    /// A pull failed.
    fn failed(&mut self) {
        self.failures += 1;
    }

    /// After failed pulls: the pause before the next, or `None` once
    /// enough of them in a row and the server say the consumer is gone.
    async fn pause_unless_gone(&mut self, consumer: &PullConsumer) -> Option<Duration> {
        if self.failures >= GONE_AFTER && consumer_gone(consumer).await {
            return None;
        }
        Some(self.pauses.next())
    }

    /// After an empty pull: whether the consumer is gone, asked at most
    /// every [`IDLE_CHECK`] and believed the second time in a row.
    async fn gone_while_idle(&mut self, consumer: &PullConsumer) -> bool {
        if self.idle_checked.elapsed() < IDLE_CHECK {
            return false;
        }
        self.idle_checked = Instant::now();
        self.seen_gone = if consumer_gone(consumer).await {
            self.seen_gone + 1
        } else {
            0
        };
        self.seen_gone >= 2
    }
}

/// Whether the server says the consumer (or its stream) does not exist.
async fn consumer_gone(consumer: &PullConsumer) -> bool {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    match consumer.get_info().await {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
        ),
    }
}

impl<H: Handler> HandlerWorker<H> {
    fn gone(&self) -> RuntimeError {
        let config = &self.shared.config;
        RuntimeError::ConsumerGone {
            handler: config.name.clone(),
            stream: config.stream.clone(),
            consumer: config.consumer.clone(),
        }
    }

    async fn fetch_loop(
        self: Box<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        self.shared.start_housekeeping(&shutdown);
        let status = self.shared.status.clone();
        status.running(true);
        let result = self.fetch_until(shutdown, grace).await;
        if let Err(e) = &result {
            status.failed(e);
        }
        status.running(false);
        result
    }

    /// Fetches and handles until shutdown (then lets running handlers
    /// finish within `grace`), or until the consumer is gone.
    async fn fetch_until(
        &self,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        let mut running = Running {
            permits: Arc::new(Semaphore::new(self.shared.config.concurrency)),
            pace: Arc::new(Pace::default()),
            tasks: TaskTracker::new(),
        };
        let mut liveness = Liveness::new();
        let mut result = Ok(());
        while !shutdown.is_cancelled() {
            let flow = match self.pull(&running, &mut liveness, &shutdown).await {
                Pulled::Batch(batch) => {
                    self.dispatch(batch, &mut running, &mut liveness, &shutdown)
                        .await
                }
                Pulled::Paused => Flow::Next,
                Pulled::Stop => Flow::Stop,
                Pulled::Gone => Flow::Gone,
            };
            match flow {
                Flow::Next => {}
                Flow::Stop => break,
                Flow::Gone => {
                    result = Err(self.gone());
                    break;
                }
            }
        }
        self.shared.drain(running.tasks, grace).await;
        result
    }

    /// One pull, issued while the last messages still run (so its round
    /// trip overlaps the work), for as many as can start soon (see
    /// `pace`). A failed pull pauses (or finds the consumer gone).
    async fn pull(
        &self,
        running: &Running,
        liveness: &mut Liveness,
        shutdown: &CancellationToken,
    ) -> Pulled {
        let wanted = running
            .pace
            .pull_size(self.shared.config.concurrency, MAX_BATCH);
        let batch = tokio::select! {
            batch = self.consumer.fetch().max_messages(wanted).expires(PULL_EXPIRES).messages() => batch,
            () = shutdown.cancelled() => return Pulled::Stop,
        };
        match batch {
            Ok(batch) => Pulled::Batch(batch),
            Err(e) => {
                liveness.failed();
                let Some(pause) = liveness.pause_unless_gone(&self.consumer).await else {
                    return Pulled::Gone;
                };
                warn!(handler = %self.shared.config.name, error = %e, ?pause, "pull failed; retrying");
                self.shared.status.failed(&format_args!("pull failed: {e}"));
                tokio::select! { () = sleep(pause) => Pulled::Paused, () = shutdown.cancelled() => Pulled::Stop }
            }
        }
    }

    /// Hands each message of a pull to a task of its own once a permit is
    /// free; on shutdown, what was not started goes back to the server.
    async fn dispatch(
        &self,
        mut batch: Batch,
        running: &mut Running,
        liveness: &mut Liveness,
        shutdown: &CancellationToken,
    ) -> Flow {
        let mut pulled_any = false;
        loop {
            let message = tokio::select! {
                message = batch.next() => message,
                () = shutdown.cancelled() => {
                    hand_back(&mut batch, None).await;
                    return Flow::Stop;
                }
            };
            let message = match message {
                None => {
                    liveness.answered();
                    if !pulled_any && liveness.gone_while_idle(&self.consumer).await {
                        return Flow::Gone;
                    }
                    return Flow::Next;
                }
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    // The pull was refused (e.g. no responders: the
                    // consumer is gone); pause before the next.
                    liveness.failed();
                    debug!(handler = %self.shared.config.name, error = %e, "pull ended early");
                    if pulled_any {
                        return Flow::Next;
                    }
                    let Some(pause) = liveness.pause_unless_gone(&self.consumer).await else {
                        return Flow::Gone;
                    };
                    return tokio::select! { () = sleep(pause) => Flow::Next, () = shutdown.cancelled() => Flow::Stop };
                }
            };
            pulled_any = true;
            liveness.answered();
            let permit = tokio::select! {
                permit = running.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return Flow::Stop,
                },
                // Shutdown while every handler runs: this message and the
                // rest of the pull go back rather than wait.
                () = shutdown.cancelled() => {
                    hand_back(&mut batch, Some(message)).await;
                    return Flow::Stop;
                }
            };
            let (shared, pace) = (self.shared.clone(), running.pace.clone());
            running.tasks.spawn(async move {
                let began = Instant::now();
                shared.handle(message).await;
                pace.record(began.elapsed());
                drop(permit);
            });
        }
    }
}

/// What a fetch loop runs its handlers with.
struct Running {
    permits: Arc<Semaphore>,
    pace: Arc<Pace>,
    tasks: TaskTracker,
}

/// The messages of one pull.
type Batch = async_nats::jetstream::consumer::pull::Batch;

/// What a pull came to.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per pull and consumed at once; boxing would allocate per pull"
)]
enum Pulled {
    Batch(Batch),
    /// It failed; the pause after it is over.
    Paused,
    Stop,
    Gone,
}

/// What the loop does next.
enum Flow {
    Next,
    Stop,
    Gone,
}
