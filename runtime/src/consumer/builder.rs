//! Configuring a [`Runtime`]: handlers, shared state, stores, relays,
//! shutdown — then building it (provisioning each handler) or provisioning
//! only.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tracing::info;

use super::faults::Faults;
use super::health::HealthProbe;
use super::registration::{Registered, Registration, StartContext, patiently, provision_handler};
use super::stats::Stats;
use super::{BoxFuture, Runtime, RuntimeError, termination};
use crate::extract::StateMap;
use crate::handler::{Handler, HandlerConfig};
use crate::store::KvStoreConfig;

/// Configures a [`Runtime`]: handlers, shared state, the claim bucket,
/// shutdown.
#[must_use = "a builder does nothing until `.run()` or `.build()`"]
pub struct RuntimeBuilder {
    pub(super) client: async_nats::Client,
    pub(super) state: StateMap,
    pub(super) handlers: Vec<Box<dyn Registration>>,
    pub(super) kv: KvStoreConfig,
    pub(super) create_streams: bool,
    pub(super) shutdown: Option<BoxFuture<()>>,
    pub(super) grace: Duration,
    pub(super) faults: Faults,
    pub(super) clock: crate::clock::SkewedClock,
    #[cfg(feature = "postgres")]
    pub(super) postgres: Option<(sqlx::PgPool, String)>,
    #[cfg(feature = "postgres")]
    pub(super) relays: Vec<crate::outbox::PgOutbox>,
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
