//! Readiness: whether a runtime can do its work right now — connected to
//! NATS, every handler's fetch loop running, its dedup store answering —
//! and the last error each handler met, for a readiness probe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// A handle that reads a runtime's [`Health`] at any time, also while it
/// runs; take it from [`Runtime::health`](super::Runtime::health) before
/// [`run`](super::Runtime::run).
///
/// ```no_run
/// # async fn demo(runtime: idem::Runtime) {
/// let health = runtime.health();
/// tokio::spawn(runtime.run());
/// // in the readiness endpoint:
/// let now = health.now();
/// if !now.is_ready() {
///     eprintln!("not ready: {now:?}");
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct HealthProbe {
    client: async_nats::Client,
    handlers: Arc<[Arc<HandlerStatus>]>,
}

impl std::fmt::Debug for HealthProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.now().fmt(f)
    }
}

/// A runtime's health at one moment.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Health {
    /// Whether the NATS client is connected.
    pub connected: bool,
    /// Each handler's state, in registration order.
    pub handlers: Vec<HandlerHealth>,
}

/// One handler's health.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HandlerHealth {
    /// The handler's name.
    pub handler: String,
    /// Whether its fetch loop runs: its consumer was provisioned at build
    /// time and has not gone away. `false` before `run` and after it ends.
    pub running: bool,
    /// Whether its dedup store answered the last time it was asked (`true`
    /// for `dedup = off`, and until the store is first asked).
    pub store_reachable: bool,
    /// The last error the handler's worker met: the store out of reach, a
    /// failed pull, the consumer gone.
    pub last_error: Option<LastError>,
}

/// An error a handler's worker met, and when.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LastError {
    /// When.
    pub at: SystemTime,
    /// What, as the error's message.
    pub message: String,
}

impl Health {
    /// Connected, and every handler running with its store reachable.
    pub fn is_ready(&self) -> bool {
        self.connected && self.handlers.iter().all(|h| h.running && h.store_reachable)
    }
}

impl HealthProbe {
    pub(super) fn new(client: async_nats::Client, handlers: Vec<Arc<HandlerStatus>>) -> Self {
        Self {
            client,
            handlers: handlers.into(),
        }
    }

    /// The runtime's health now.
    pub fn now(&self) -> Health {
        Health {
            connected: self.client.connection_state() == async_nats::connection::State::Connected,
            handlers: self.handlers.iter().map(|h| h.read()).collect(),
        }
    }
}

/// What one handler's worker reports about itself.
#[derive(Debug)]
pub(crate) struct HandlerStatus {
    handler: String,
    running: AtomicBool,
    store_unreachable: AtomicBool,
    last_error: Mutex<Option<LastError>>,
}

impl HandlerStatus {
    pub(crate) fn new(handler: &str) -> Self {
        Self {
            handler: handler.to_owned(),
            running: AtomicBool::new(false),
            store_unreachable: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    fn read(&self) -> HandlerHealth {
        HandlerHealth {
            handler: self.handler.clone(),
            running: self.running.load(Ordering::Relaxed),
            store_reachable: !self.store_unreachable.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// The fetch loop started (`true`) or ended.
    pub(crate) fn running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }

    /// The dedup store answered.
    pub(crate) fn store_answered(&self) {
        // A load first: the common case writes nothing shared.
        if self.store_unreachable.load(Ordering::Relaxed) {
            self.store_unreachable.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the dedup store was last found unreachable.
    pub(crate) fn store_is_unreachable(&self) -> bool {
        self.store_unreachable.load(Ordering::Relaxed)
    }

    /// The dedup store could not be reached.
    pub(crate) fn store_failed(&self, error: &dyn std::fmt::Display) {
        self.store_unreachable.store(true, Ordering::Relaxed);
        self.failed(error);
    }

    /// The worker met `error`.
    pub(crate) fn failed(&self, error: &dyn std::fmt::Display) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(LastError {
            at: SystemTime::now(),
            message: error.to_string(),
        });
    }
}

/// How often an idle handler whose store was found unreachable looks again.
const STORE_LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// While `status` says the store is unreachable, looks at it every
/// [`STORE_LOOK_EVERY`] (`answers`: a cheap read) and clears the mark when
/// it answers — so that a handler with nothing to claim does not stay
/// not-ready after its store came back. Until `stop`.
pub(crate) async fn watch_store<F, Fut>(
    status: std::sync::Arc<HandlerStatus>,
    answers: F,
    stop: tokio_util::sync::CancellationToken,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        tokio::select! {
            () = tokio::time::sleep(STORE_LOOK_EVERY) => {}
            () = stop.cancelled() => return,
        }
        if status.store_is_unreachable() && answers().await {
            status.store_answered();
        }
    }
}
