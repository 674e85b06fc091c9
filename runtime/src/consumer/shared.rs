//! What every delivery of one handler shares, and the small types the
//! consumer's steps (pipeline, settle, group, service) pass between them —
//! kept here, below all of them, so that none imports another in a circle.

use std::borrow::Cow;
use std::sync::Arc;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use super::active::ActiveKeys;
use super::backend::{Backend, Begun};
use super::faults::Faults;
use super::stats::Counters;
use crate::extract::StateMap;
use crate::handler::HandlerConfig;
use crate::key::HandlerName;
use crate::{Fence, HandlerError};

/// Everything a handler's messages share.
pub(crate) struct Shared<H> {
    pub(crate) handler: H,
    pub(crate) name: HandlerName,
    pub(crate) config: HandlerConfig,
    /// What the delivery core decides with (from `config`).
    pub(crate) rules: crate::delivery_core::Rules,
    pub(crate) backend: Backend,
    pub(crate) js: jetstream::Context,
    pub(crate) state: StateMap,
    pub(crate) counters: Arc<Counters>,
    pub(crate) faults: Faults,
    /// Cancelled when the shutdown deadline has passed: running handlers
    /// are abandoned.
    pub(crate) hard_stop: CancellationToken,
    /// Keys this process is working on right now.
    pub(crate) active: ActiveKeys,
    /// Whether the handler takes the claim's [`Fence`].
    pub(crate) takes_fence: bool,
    /// What the worker reports to the runtime's health probe.
    pub(crate) status: Arc<super::health::HandlerStatus>,
    /// `dedup = transactional` with `batch > 1`: the group commits.
    #[cfg(feature = "postgres")]
    pub(crate) groups: Option<super::group::Groups>,
}

/// How a handler's run ended.
pub(super) enum Ran<T> {
    /// It returned `Ok`.
    Returned(T),
    /// It returned `Err`, or panicked.
    Failed(HandlerError),
    /// It was stopped before it ended: fenced, taken over, cut off.
    Stopped(crate::delivery_core::Stopped),
}

impl<H> Shared<H> {
    /// Starts what a running handler keeps up in the background until
    /// `stop`: its name's registration in the claim bucket (`kv`), the
    /// inbox's purge of rows past the retention (`transactional`).
    pub(super) fn start_housekeeping(&self, stop: &CancellationToken) {
        let config = &self.config;
        let status = self.status.clone();
        match &self.backend {
            Backend::Kv(store) => {
                let keeper = super::name_registry::keep_registered(
                    (**store).clone(),
                    config.clone(),
                    stop.clone(),
                );
                tokio::spawn(keeper);
                let store = (**store).clone();
                let probe = super::name_registry::key(config);
                tokio::spawn(super::health::watch_store(
                    status,
                    move || {
                        let (store, probe) = (store.clone(), probe.clone());
                        async move {
                            use crate::store::RevisionedMap;
                            store.map().read(&probe).await.is_ok()
                        }
                    },
                    stop.clone(),
                ));
            }
            #[cfg(feature = "postgres")]
            Backend::Transactional(inbox) => {
                let purge =
                    inbox
                        .clone()
                        .purge_loop(config.name.clone(), config.retention, stop.clone());
                tokio::spawn(purge);
                let inbox = inbox.clone();
                tokio::spawn(super::health::watch_store(
                    status,
                    move || {
                        let inbox = inbox.clone();
                        async move { inbox.answers().await }
                    },
                    stop.clone(),
                ));
            }
            Backend::Off => {}
        }
    }

    /// Shutdown: nothing new is started; the running handlers (`tasks`)
    /// get `grace` to finish, then the rest are cut off (claims left as
    /// each level says, messages NAKed, requests answered
    /// `shutting_down`). For the fetch loop and the service endpoint alike.
    pub(super) async fn drain(
        &self,
        tasks: tokio_util::task::TaskTracker,
        grace: std::time::Duration,
    ) {
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            self.hard_stop.cancel();
            tasks.wait().await;
        }
    }
}

/// Why a delivery was not ready to claim.
pub(super) enum Unprepared {
    /// The store could not begin (fail closed: the handler does not run).
    Store(crate::store::StoreError),
    /// No arguments or no key: the delivery never reaches its handler.
    Rejected(crate::handler::PrepareError),
}

/// A boxed, `Send` future: keeps a rare or large step's state out of every
/// delivery's task, and tells the compiler the step is `Send` where it
/// cannot see it through the handler's generic future.
pub(super) fn boxed<'a, T>(
    step: impl Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(step)
}

/// The state a delivery's extractors see: the runtime's, plus the
/// transaction begun for it and its fencing token, if the handler takes
/// them (a clone only then).
pub(super) fn state_with<'a>(
    state: &'a StateMap,
    begun: &Begun<'_>,
    fence: Option<&Fence>,
) -> Cow<'a, StateMap> {
    #[cfg(feature = "postgres")]
    if let Some(tx) = begun.tx() {
        return Cow::Owned(state_in(state, tx, fence));
    }
    let _ = begun;
    match fence {
        None => Cow::Borrowed(state),
        Some(fence) => {
            let mut state = state.clone();
            state.insert(fence.clone());
            Cow::Owned(state)
        }
    }
}

/// The state a delivery's extractors see in transaction `tx`.
#[cfg(feature = "postgres")]
pub(super) fn state_in(state: &StateMap, tx: &crate::Tx, fence: Option<&Fence>) -> StateMap {
    let mut state = state.clone();
    state.insert(tx.clone());
    if let Some(fence) = fence {
        state.insert(fence.clone());
    }
    state
}
