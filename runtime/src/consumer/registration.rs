//! Start-up, per handler: what registering one leaves behind, the checks
//! no message should discover (state nobody provides, a fencing token
//! without claims), provisioning what it needs from the servers, and the
//! patience start-up has with servers that do not answer yet.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::backend::Backend;
use super::faults::Faults;
use super::shared::Shared;
use super::stats::Stats;
use super::worker::{HandlerWorker, Worker};
use super::{BoxFuture, RuntimeError, active, health, provision, service};
use crate::extract::{FromDelivery, StateMap, StateNeed};
use crate::handler::{Dedup, Handler, HandlerConfig};
use crate::key::HandlerName;
use crate::store::KvStoreConfig;

/// What registering a handler leaves for start-up.
pub(super) trait Registration: Send {
    fn config(&self) -> HandlerConfig;
    fn start(
        self: Box<Self>,
        ctx: StartContext,
    ) -> BoxFuture<Result<Box<dyn Worker>, RuntimeError>>;
}

#[derive(Clone)]
pub(super) struct StartContext {
    #[cfg(feature = "postgres")]
    pub(super) postgres: Option<(sqlx::PgPool, String)>,
    pub(super) client: async_nats::Client,
    pub(super) js: async_nats::jetstream::Context,
    pub(super) state: StateMap,
    pub(super) kv: KvStoreConfig,
    pub(super) create_streams: bool,
    pub(super) stats: Stats,
    pub(super) faults: Faults,
    pub(super) clock: crate::clock::SkewedClock,
}

/// A handler and the deploy-time changes to its configuration.
pub(super) struct Registered<H> {
    pub(super) handler: H,
    pub(super) tune: Box<dyn Fn(HandlerConfig) -> HandlerConfig + Send>,
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
            #[cfg(feature = "postgres")]
            let groups = match &backend {
                Backend::Transactional(inbox) => super::group::Groups::for_handler(inbox, &config),
                Backend::Off | Backend::Kv(_) => None,
            };
            let status = Arc::new(health::HandlerStatus::new(&config.name));
            let shared = Shared {
                #[cfg(feature = "postgres")]
                groups,
                status,
                handler,
                name,
                counters: ctx.stats.counters(&config.name),
                rules: crate::delivery_core::Rules::of(&config),
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
pub(super) struct Provisioned {
    backend: Backend,
    /// The durable consumer; none for a request/reply handler.
    consumer: Option<async_nats::jetstream::consumer::PullConsumer>,
}

/// Checks or creates everything `config` needs: claim bucket or inbox,
/// stream, dead-letter coverage, durable consumer (the claim store only,
/// for a request/reply handler).
pub(super) async fn provision_handler(
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
            let store_error = |source| RuntimeError::Store {
                handler: config.name.clone(),
                source,
            };
            let inbox = crate::store::TxInbox::open(pool.clone(), schema)
                .await
                .map_err(store_error)?;
            // What the operator's `idem inbox purge` must not undercut.
            crate::store::PgStore::register_retention(
                pool,
                schema,
                config.name.as_str(),
                config.retention,
            )
            .await
            .map_err(store_error)?;
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
pub(super) async fn patiently<T, F: Future<Output = Result<T, RuntimeError>>>(
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
            && let Some(denial) = crate::permissions::denied_since(began, |subject| {
                crate::permissions::concerns_start_up(config, subject)
            })
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
