//! The consumer runtime: runs every registered handler against its durable
//! pull consumer, executing the claim state machine of docs/design.md for
//! each delivery.
//!
//! ```no_run
//! # use idem::{idempotent, HandlerError, Json};
//! # #[idempotent(stream = "PAYMENTS", key = id)]
//! # async fn issue_membership_card(Json(id): Json<u64>) -> Result<(), HandlerError> { Ok(()) }
//! # async fn demo(client: async_nats::Client) -> Result<(), idem::consumer::RuntimeError> {
//! use idem::Runtime;
//!
//! Runtime::builder(client)
//!     .handler(issue_membership_card)
//!     .run() // until Ctrl-C or SIGTERM
//!     .await?;
//! # Ok(()) }
//! ```

mod acks;
mod active;
mod backend;
mod builder;
mod dead_letter;
mod error;
mod faults;
#[cfg(feature = "postgres")]
mod group;
#[cfg(feature = "postgres")]
mod grouped;
mod health;
mod name_registry;
mod pace;
mod pipeline;
mod provision;
mod registration;
mod service;
mod settle;
mod shared;
mod stats;
mod worker;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

pub use crate::handler::DeadLetterReason;
pub use builder::RuntimeBuilder;
pub use dead_letter::headers;
pub use error::RuntimeError;
pub use health::{HandlerHealth, Health, HealthProbe, LastError};
pub use name_registry::Registered;
pub use provision::{DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECTS};
pub use stats::{Counts, Latency, Outcome, Stats};

use crate::extract::StateMap;
use crate::store::KvStoreConfig;
use faults::Faults;
use worker::Worker;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs registered handlers until shutdown.
pub struct Runtime {
    workers: Vec<Box<dyn Worker>>,
    /// PostgreSQL outboxes to relay while the handlers run.
    #[cfg(feature = "postgres")]
    relays: Vec<(crate::outbox::PgOutbox, crate::Publisher)>,
    stats: Stats,
    health: HealthProbe,
    shutdown: BoxFuture<()>,
    grace: Duration,
}

impl Runtime {
    /// Starts configuring a runtime on a connected client.
    pub fn builder(client: async_nats::Client) -> RuntimeBuilder {
        RuntimeBuilder {
            client,
            state: StateMap::default(),
            handlers: Vec::new(),
            kv: KvStoreConfig::default(),
            create_streams: false,
            shutdown: None,
            grace: Duration::from_secs(10),
            faults: Faults::default(),
            clock: crate::clock::SkewedClock::default(),
            #[cfg(feature = "postgres")]
            postgres: None,
            #[cfg(feature = "postgres")]
            relays: Vec::new(),
        }
    }

    /// The live counters; clone it before [`run`](Self::run).
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// A probe of the runtime's readiness — connected, every handler's
    /// fetch loop running, its store answering, the last error each met —
    /// for a readiness endpoint; take it before [`run`](Self::run).
    pub fn health(&self) -> HealthProbe {
        self.health.clone()
    }

    /// Handles messages until the shutdown signal, then stops fetching, lets
    /// running handlers finish within the grace period, and returns.
    ///
    /// If a handler's worker fails (its consumer was deleted, or it stopped
    /// abnormally), every other worker is shut down the same way and the
    /// first failure is returned.
    #[expect(
        clippy::result_large_err,
        reason = "a worker's error ends the runtime once; the public API returns RuntimeError as it is"
    )]
    pub async fn run(self) -> Result<(), RuntimeError> {
        let stop = CancellationToken::new();
        // Relays stop after the workers: what the last handlers enqueued
        // still goes out.
        #[cfg(feature = "postgres")]
        let relays: Vec<crate::outbox::Relay> = self
            .relays
            .into_iter()
            .map(|(outbox, publisher)| outbox.start_relay(publisher))
            .collect();
        let mut running = tokio::task::JoinSet::new();
        for worker in self.workers {
            let handler = worker.name().to_owned();
            let status = worker.status();
            let run = std::panic::AssertUnwindSafe(worker.run(stop.clone(), self.grace));
            running.spawn(async move {
                futures::FutureExt::catch_unwind(run)
                    .await
                    .unwrap_or_else(|_| {
                        let failed = RuntimeError::WorkerFailed {
                            handler,
                            reason: "its fetch loop panicked".into(),
                        };
                        status.running(false);
                        status.failed(&failed);
                        Err(failed)
                    })
            });
        }
        let mut shutdown = self.shutdown;
        let mut failure = None;
        while failure.is_none() && !running.is_empty() {
            tokio::select! {
                () = &mut shutdown => break,
                ended = running.join_next() => failure = ended.and_then(failed_worker),
            }
        }
        match &failure {
            None => info!("shutting down: no more fetches; waiting for running handlers"),
            Some(e) => tracing::error!(error = %e, "a worker failed: shutting the others down"),
        }
        stop.cancel();
        while let Some(ended) = running.join_next().await {
            if let Some(e) = failed_worker(ended) {
                failure.get_or_insert(e);
            }
        }
        #[cfg(feature = "postgres")]
        for relay in relays {
            relay.stop().await;
        }
        failure.map_or(Ok(()), Err)
    }
}

/// The error a worker's task ended with, if any.
fn failed_worker(
    ended: Result<Result<(), RuntimeError>, tokio::task::JoinError>,
) -> Option<RuntimeError> {
    match ended {
        Ok(result) => result.err(),
        Err(e) => Some(RuntimeError::WorkerFailed {
            handler: "(a worker task)".into(),
            reason: e.to_string(),
        }),
    }
}

/// Ctrl-C, or SIGTERM on Unix.
async fn termination() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
