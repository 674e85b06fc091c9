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
mod dead_letter;
mod error;
mod faults;
#[cfg(feature = "postgres")]
mod group;
#[cfg(feature = "postgres")]
mod grouped;
mod health;
mod pace;
mod pipeline;
mod provision;
mod recent;
mod service;
mod settle;
mod shared;
mod stats;
mod worker;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

pub use crate::handler::DeadLetterReason;
pub use dead_letter::headers;
pub use error::RuntimeError;
pub use health::{HandlerHealth, Health, HealthProbe, LastError};
pub use provision::{DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECTS};
pub use stats::{Counts, Latency, Outcome, Stats};

use crate::extract::{FromDelivery, StateMap, StateNeed};
use crate::handler::{Dedup, Handler, HandlerConfig};
use crate::key::HandlerName;
use crate::store::KvStoreConfig;
use backend::Backend;
use faults::Faults;
use recent::Recent;
use shared::Shared;
use worker::{HandlerWorker, Worker};

// What idem::testing::Driver decides with, as the runtime does.
#[cfg(feature = "testing")]
pub(crate) use settle::{Failure, after_failure};
#[cfg(feature = "testing")]
pub(crate) use shared::HandlerPanicked;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What registering a handler leaves for start-up.
trait Registration: Send {
    fn config(&self) -> HandlerConfig;
    fn start(
        self: Box<Self>,
        ctx: StartContext,
    ) -> BoxFuture<Result<Box<dyn Worker>, RuntimeError>>;
}

#[derive(Clone)]
struct StartContext {
    #[cfg(feature = "postgres")]
    postgres: Option<(sqlx::PgPool, String)>,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    state: StateMap,
    kv: KvStoreConfig,
    create_streams: bool,
    stats: Stats,
    faults: Faults,
    clock: crate::clock::SkewedClock,
}

/// A handler and the deploy-time changes to its configuration.
struct Registered<H> {
    handler: H,
    tune: Box<dyn Fn(HandlerConfig) -> HandlerConfig + Send>,
}

impl<H: Handler> Registration for Registered<H> {
    fn config(&self) -> HandlerConfig {
        (self.tune)(self.handler.config())
    }

    fn start(
        self: Box<Self>,
        ctx: StartContext,
    ) -> BoxFuture<Result<Box<dyn Worker>, RuntimeError>> {
        Box::pin(async move {
            let config = self.config();
            let handler = self.handler;
            config.validate()?;
            let takes_fence = check_state::<H::Args>(&config, &ctx.state)?;
            let name = HandlerName::new(&config.name).map_err(|source| {
                crate::handler::ConfigError::Name {
                    handler: config.name.clone(),
                    source,
                }
            })?;
            let serves = config.service.is_some();
            let Provisioned { backend, consumer } =
                patiently(&config, || provision_handler(&ctx, &config)).await?;
            if serves {
                info!(handler = %config.name, service = ?config.service, subject = ?config.subject, dedup = ?config.dedup, "handler ready");
            } else {
                info!(handler = %config.name, stream = %config.stream, consumer = %config.consumer, dedup = ?config.dedup, "handler ready");
            }
            // The claim bucket keeps records for the handler's retention.
            let recent = Recent::new(config.recent_completions, config.retention);
            #[cfg(feature = "postgres")]
            let groups = match &backend {
                backend::Backend::Transactional(inbox) => {
                    group::Groups::for_handler(inbox, &config)
                }
                _ => None,
            };
            let status = Arc::new(health::HandlerStatus::new(&config.name));
            let shared = Shared {
                #[cfg(feature = "postgres")]
                groups,
                status,
                handler,
                recent,
                name,
                counters: ctx.stats.counters(&config.name),
                config,
                backend,
                js: ctx.js,
                state: ctx.state,
                faults: ctx.faults,
                hard_stop: CancellationToken::new(),
                active: active::ActiveKeys::default(),
                takes_fence,
            };
            let worker: Box<dyn Worker> = match consumer {
                Some(consumer) => Box::new(HandlerWorker {
                    shared: Arc::new(shared),
                    consumer,
                }),
                None => Box::new(service::ServiceWorker::start(&ctx.client, shared).await?),
            };
            Ok(worker)
        })
    }
}

/// Refuses a handler whose extractors take state the runtime does not
/// provide: found here, not as a dead letter per message. Returns whether
/// the handler takes a [`Fence`](crate::Fence).
#[expect(
    clippy::result_large_err,
    reason = "start-up only; the public API returns RuntimeError as it is"
)]
fn check_state<A: FromDelivery>(
    config: &HandlerConfig,
    state: &StateMap,
) -> Result<bool, RuntimeError> {
    let mut needs = Vec::new();
    A::required_state(&mut needs);
    let mut takes_fence = false;
    for StateNeed { type_id, type_name } in needs {
        if type_id == std::any::TypeId::of::<crate::Fence>() {
            if config.dedup == Dedup::Off {
                return Err(RuntimeError::MissingState {
                    handler: config.name.clone(),
                    type_name: "idem::Fence",
                    remedy: "only handlers that keep claims (`dedup = kv` or `transactional`) have a fencing token",
                });
            }
            takes_fence = true;
            continue;
        }
        #[cfg(feature = "postgres")]
        if type_id == std::any::TypeId::of::<crate::Tx>() {
            if config.dedup == Dedup::Transactional {
                continue;
            }
            return Err(RuntimeError::MissingState {
                handler: config.name.clone(),
                type_name: "idem::Tx",
                remedy: "only handlers with `dedup = transactional` get a transaction",
            });
        }
        if !state.contains(type_id) {
            return Err(RuntimeError::MissingState {
                handler: config.name.clone(),
                type_name,
                remedy: "register a value with `.state(value)` on the runtime builder",
            });
        }
    }
    Ok(takes_fence)
}

/// What a handler needs from the servers before its first fetch.
struct Provisioned {
    backend: Backend,
    /// The durable consumer; none for a request/reply handler.
    consumer: Option<async_nats::jetstream::consumer::PullConsumer>,
}

/// Checks or creates everything `config` needs: claim bucket or inbox,
/// stream, dead-letter coverage, durable consumer (the claim store only,
/// for a request/reply handler).
async fn provision_handler(
    ctx: &StartContext,
    config: &HandlerConfig,
) -> Result<Provisioned, RuntimeError> {
    let backend = match config.dedup {
        Dedup::Off => Backend::Off,
        Dedup::Kv => {
            let store = provision::claims(&ctx.js, &ctx.kv, config).await?;
            Backend::Kv(Box::new(store.using_clock(ctx.clock)))
        }
        #[cfg(feature = "postgres")]
        Dedup::Transactional => {
            let Some((pool, schema)) = &ctx.postgres else {
                return Err(RuntimeError::PostgresMissing {
                    handler: config.name.clone(),
                });
            };
            let inbox = crate::store::TxInbox::open(pool.clone(), schema)
                .await
                .map_err(|source| RuntimeError::Store {
                    handler: config.name.clone(),
                    source,
                })?;
            Backend::Transactional(inbox)
        }
        #[cfg(not(feature = "postgres"))]
        Dedup::Transactional => {
            return Err(RuntimeError::TransactionalUnsupported {
                handler: config.name.clone(),
            });
        }
    };
    if config.service.is_some() {
        return Ok(Provisioned {
            backend,
            consumer: None,
        });
    }
    let stream = provision::stream(&ctx.js, config, ctx.create_streams).await?;
    provision::dead_letters(&ctx.js, &stream, config, ctx.kv.replica_count()).await?;
    let consumer = provision::consumer(&stream, config).await?;
    Ok(Provisioned {
        backend,
        consumer: Some(consumer),
    })
}

/// How long start-up keeps trying while the servers do not answer (a
/// cluster electing leaders, a server restarting) before it gives up.
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// Runs `attempt` until it succeeds, fails for good, or
/// [`STARTUP_PATIENCE`] has passed, backing off between tries.
async fn patiently<T, F: Future<Output = Result<T, RuntimeError>>>(
    config: &HandlerConfig,
    mut attempt: impl FnMut() -> F,
) -> Result<T, RuntimeError> {
    let deadline = tokio::time::Instant::now() + STARTUP_PATIENCE;
    let mut pauses = crate::retry::Schedule::startup();
    loop {
        let pause = pauses.next();
        let began = std::time::Instant::now();
        let result = attempt().await;
        // Silence the server explained as a permission violation (seen when
        // the client was connected with `idem::permissions::watch`).
        if result.is_err()
            && let Some(denial) = crate::permissions::denied_since(began)
        {
            return Err(RuntimeError::PermissionDenied {
                handler: config.name.clone(),
                operation: denial.operation,
                subject: denial.subject,
            });
        }
        match result {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(handler = %config.name, error = %e, ?pause, "start-up: the servers did not answer; trying again");
                tokio::time::sleep(pause).await;
            }
            result => return result,
        }
    }
}

/// Configures a [`Runtime`]: handlers, shared state, the claim bucket,
/// shutdown.
#[must_use = "a builder does nothing until `.run()` or `.build()`"]
pub struct RuntimeBuilder {
    client: async_nats::Client,
    state: StateMap,
    handlers: Vec<Box<dyn Registration>>,
    kv: KvStoreConfig,
    create_streams: bool,
    shutdown: Option<BoxFuture<()>>,
    grace: Duration,
    faults: Faults,
    clock: crate::clock::SkewedClock,
    #[cfg(feature = "postgres")]
    postgres: Option<(sqlx::PgPool, String)>,
    #[cfg(feature = "postgres")]
    relays: Vec<crate::outbox::PgOutbox>,
}

impl RuntimeBuilder {
    /// Runs `outbox`'s relay with the runtime: started by
    /// [`Runtime::run`], publishing through a [`Publisher`](crate::Publisher)
    /// on the runtime's client, stopped after the handlers have finished
    /// (what they enqueued last is relayed before it stops, or by the next
    /// process). Handlers enqueue through the same `PgOutbox`, shared as
    /// state.
    ///
    /// ```no_run
    /// # use idem::{idempotent, HandlerError, Json, Tx};
    /// # #[idempotent(stream = "LEDGER", key = id, dedup = transactional)]
    /// # async fn apply_transfer(Json(id): Json<u64>, tx: Tx) -> Result<(), HandlerError> { let _ = tx; Ok(()) }
    /// # async fn demo(client: async_nats::Client, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::outbox::PgOutbox;
    /// use idem::Runtime;
    ///
    /// let outbox = PgOutbox::open(pool.clone(), "idem").await?;
    /// Runtime::builder(client)
    ///     .postgres(pool, "idem")
    ///     .state(outbox.clone())
    ///     .relay(outbox)
    ///     .handler(apply_transfer)
    ///     .run()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "postgres")]
    pub fn relay(mut self, outbox: crate::outbox::PgOutbox) -> Self {
        self.relays.push(outbox);
        self
    }

    /// The database of `dedup = transactional` handlers: their claim rows go
    /// in `schema`'s `idem_inbox` (migrate it first with
    /// [`PgStore::migrate`](crate::store::PgStore::migrate)).
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, pool: sqlx::PgPool, schema: &str) -> Self {
        self.postgres = Some((pool, schema.to_owned()));
        self
    }

    /// Registers a handler (the name of an `#[idempotent]` function).
    pub fn handler<H: Handler>(self, handler: H) -> Self {
        self.handler_with(handler, |config| config)
    }

    /// Registers a handler with changes to the configuration its attribute
    /// wrote — deploy-time tuning such as concurrency or the consumer name.
    /// The result is validated like any configuration.
    ///
    /// ```no_run
    /// # use idem::{idempotent, HandlerError, Json};
    /// # #[idempotent(stream = "PAYMENTS", key = id)]
    /// # async fn issue_card(Json(id): Json<u64>) -> Result<(), HandlerError> { Ok(()) }
    /// # fn demo(client: async_nats::Client) {
    /// let builder = idem::Runtime::builder(client).handler_with(issue_card, |config| config.concurrency(64));
    /// # }
    /// ```
    pub fn handler_with<H: Handler>(
        mut self,
        handler: H,
        tune: impl Fn(HandlerConfig) -> HandlerConfig + Send + 'static,
    ) -> Self {
        self.handlers.push(Box::new(Registered {
            handler,
            tune: Box::new(tune),
        }));
        self
    }

    /// Shares a value with handlers that take `State<T>`.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.insert(value);
        self
    }

    /// Settings of the claim buckets (replicas, storage, timeouts, name
    /// prefix); each handler's retention picks its bucket.
    pub fn claims(mut self, config: KvStoreConfig) -> Self {
        self.kv = config;
        self
    }

    /// Creates a handler's stream when it does not exist (subjects: the
    /// handler's subject). Off by default: a missing stream is an error.
    pub fn create_missing_streams(mut self) -> Self {
        self.create_streams = true;
        self
    }

    /// Stops when `signal` completes, instead of on Ctrl-C or SIGTERM — a
    /// oneshot, your own signal handling, or a `CancellationToken` your
    /// service already uses for shutdown (its `cancelled_owned()`).
    ///
    /// ```no_run
    /// # async fn demo(client: async_nats::Client) -> Result<(), idem::consumer::RuntimeError> {
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let shutdown = CancellationToken::new();
    /// let runtime = idem::Runtime::builder(client)
    ///     .shutdown_on(shutdown.clone().cancelled_owned())
    ///     .build()
    ///     .await?;
    /// // … elsewhere, on the service's own stop: `shutdown.cancel()`.
    /// runtime.run().await
    /// # }
    /// ```
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// How long running handlers may take to finish after shutdown begins
    /// (default 10 s); after that their claims are released and their
    /// messages NAKed.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Loses the acknowledgement of every `n`th successfully handled message,
    /// forcing redeliveries (tests and demonstrations only).
    #[cfg(feature = "testing")]
    pub fn drop_every_nth_ack(mut self, n: u64) -> Self {
        self.faults = Faults::drop_acks(n);
        self
    }

    /// Runs the claims' wall-clock timestamps on `clock`, as a worker whose
    /// clock is off would (tests and the fault suite: leases must not
    /// depend on it).
    #[cfg(feature = "testing")]
    pub fn wall_clock(mut self, clock: crate::clock::SkewedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Provisions everything (streams, consumers, buckets, dead-letter
    /// stream) and returns the runtime, ready to run. Requests the servers
    /// do not answer (a restart, a cluster electing leaders) are retried
    /// for up to 60 s; an error the server answers with, or a
    /// configuration error, is returned at once
    /// ([`RuntimeError::is_transient`]).
    pub async fn build(self) -> Result<Runtime, RuntimeError> {
        self.check_registrations()?;
        let stats = Stats::default();
        let ctx = self.start_context(&stats);
        let mut workers = Vec::with_capacity(self.handlers.len());
        for registration in self.handlers {
            workers.push(registration.start(ctx.clone()).await?);
        }
        let health = HealthProbe::new(
            self.client.clone(),
            workers.iter().map(|worker| worker.status()).collect(),
        );
        #[cfg(feature = "postgres")]
        let relays = {
            let publisher = crate::Publisher::new(self.client.clone());
            self.relays
                .into_iter()
                .map(|outbox| (outbox, publisher.clone()))
                .collect()
        };
        Ok(Runtime {
            workers,
            #[cfg(feature = "postgres")]
            relays,
            stats,
            health,
            shutdown: self.shutdown.unwrap_or_else(|| Box::pin(termination())),
            grace: self.grace,
        })
    }

    /// Creates (or checks) everything the handlers need — the claim
    /// bucket, the PostgreSQL inbox's tables, streams (with
    /// [`create_missing_streams`](Self::create_missing_streams)), the
    /// dead-letter stream, each handler's durable consumer — and returns
    /// without running anything: for an admin (a deploy step, or the
    /// service binary started with `--provision`), so that workers can run
    /// with a user that may not create or change any of it
    /// (docs/permissions.md).
    ///
    /// ```no_run
    /// # use idem::{idempotent, HandlerError, Json};
    /// # #[idempotent(stream = "PAYMENTS", key = id, start = all)]
    /// # async fn issue_membership_card(Json(id): Json<u64>) -> Result<(), HandlerError> { Ok(()) }
    /// # async fn demo(admin: async_nats::Client) -> Result<(), idem::consumer::RuntimeError> {
    /// use idem::Runtime;
    ///
    /// Runtime::builder(admin).handler(issue_membership_card).provision().await?;
    /// # Ok(()) }
    /// ```
    pub async fn provision(self) -> Result<(), RuntimeError> {
        self.check_registrations()?;
        #[cfg(feature = "postgres")]
        if let Some((pool, schema)) = &self.postgres {
            crate::store::PgStore::migrate(pool, schema)
                .await
                .map_err(|source| RuntimeError::Store {
                    handler: "(the inbox)".into(),
                    source,
                })?;
        }
        let ctx = self.start_context(&Stats::default());
        for registration in &self.handlers {
            let config = registration.config();
            config.validate()?;
            patiently(&config, || provision_handler(&ctx, &config)).await?;
            info!(handler = %config.name, "provisioned");
        }
        Ok(())
    }

    /// What start-up hands each registration.
    fn start_context(&self, stats: &Stats) -> StartContext {
        StartContext {
            #[cfg(feature = "postgres")]
            postgres: self.postgres.clone(),
            client: self.client.clone(),
            js: async_nats::jetstream::new(self.client.clone()),
            state: self.state.clone(),
            kv: self.kv.clone(),
            create_streams: self.create_streams,
            stats: stats.clone(),
            faults: self.faults.clone(),
            clock: self.clock,
        }
    }

    /// Refuses what no start-up can cure: no handlers, two with one name,
    /// two on one consumer.
    #[expect(
        clippy::result_large_err,
        reason = "start-up only; the public API returns RuntimeError as it is"
    )]
    fn check_registrations(&self) -> Result<(), RuntimeError> {
        if self.handlers.is_empty() {
            return Err(RuntimeError::NoHandlers);
        }
        let mut consumers: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for registration in &self.handlers {
            let config = registration.config();
            if let Some(first_stream) = names.insert(config.name.clone(), config.stream.clone()) {
                return Err(RuntimeError::DuplicateHandler {
                    handler: config.name,
                    first_stream,
                    second_stream: config.stream,
                });
            }
            if config.service.is_some() {
                continue;
            }
            if let Some(first) = consumers.insert(
                (config.stream.clone(), config.consumer.clone()),
                config.name.clone(),
            ) {
                return Err(RuntimeError::DuplicateConsumer {
                    stream: config.stream,
                    consumer: config.consumer,
                    first,
                    second: config.name,
                });
            }
        }
        Ok(())
    }

    /// Builds and runs until shutdown.
    pub async fn run(self) -> Result<(), RuntimeError> {
        self.build().await?.run().await
    }
}

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
        let stop_relays = CancellationToken::new();
        let mut relays = tokio::task::JoinSet::<()>::new();
        #[cfg(feature = "postgres")]
        for (outbox, publisher) in self.relays {
            relays.spawn(outbox.relay(publisher, stop_relays.clone()));
        }
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
        stop_relays.cancel();
        while relays.join_next().await.is_some() {}
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
