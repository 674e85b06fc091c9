//! Request/reply handlers: a handler configured with a `service` is served
//! as an endpoint of a NATS micro service (async-nats' `service` API), and
//! each request goes through the same claim as a stream's delivery — but
//! its answer is a reply, not an ack:
//!
//! * the first request with a key runs; its result is stored with the
//!   completion and replied;
//! * a request repeating it (same key, same fingerprint) gets the stored
//!   reply without running; one that arrives while the first still runs
//!   waits for it, at most a lease;
//! * the same key with another payload, a failure, an unreachable store
//!   are replied as errors of a [`ReplyErrorKind`] (see `reply.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::service::{Request, error::Error as ServiceError};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, field, info_span, warn};

use super::RuntimeError;
use super::backend::{Begun, Completion, Held};
use super::shared::{Granted, Ran, Shared, Unprepared, boxed};
use super::stats::{Latency, Outcome};
use super::worker::Worker;
use crate::claim::{Claim, Refusal};
use crate::delivery_core::Stopped;
use crate::handler::Handler;
use crate::key::RecordKey;
use crate::reply::{KIND_HEADER, ReplyErrorKind};
use crate::store::GroupLock;
use crate::{Delivery, Fence};

/// A request's answer: the handler's (stored) result, or an error.
pub(super) enum Reply {
    Result(Bytes),
    Error(ReplyErrorKind, String),
}

impl Reply {
    fn error(kind: ReplyErrorKind, message: impl std::fmt::Display) -> Self {
        Reply::Error(kind, message.to_string())
    }

    /// Sends it as the request's reply.
    async fn send(self, request: &Request) {
        let sent = match self {
            Reply::Result(body) => request.respond(Ok(body)).await,
            Reply::Error(kind, status) => {
                let mut headers = HeaderMap::new();
                headers.insert(KIND_HEADER, kind.as_str());
                let error = ServiceError {
                    status,
                    code: kind.code(),
                };
                request.respond_with_headers(Err(error), headers).await
            }
        };
        if let Err(e) = sent {
            warn!(error = %e, "could not send the reply; the client may ask again");
        }
    }
}

/// A service handler's endpoint loop.
pub(crate) struct ServiceWorker<H> {
    pub(crate) shared: Arc<Shared<H>>,
    pub(crate) service: async_nats::service::Service,
    pub(crate) endpoint: async_nats::service::endpoint::Endpoint,
}

impl<H: Handler> ServiceWorker<H> {
    /// Starts the service `config.service` and its endpoint for the handler.
    pub(crate) async fn start(
        client: &async_nats::Client,
        shared: Shared<H>,
    ) -> Result<Self, RuntimeError> {
        use async_nats::service::ServiceExt;
        let config = &shared.config;
        let failed = |reason: String| RuntimeError::ServiceFailed {
            handler: config.name.clone(),
            reason,
        };
        let service_name = config.service.clone().unwrap_or_default();
        let subject = config.subject.clone().unwrap_or_default();
        let service = client
            .service_builder()
            .description(format!("idem: idempotent request/reply ({})", config.name))
            .start(&service_name, &config.version)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let endpoint = service
            .endpoint_builder()
            .name(&config.name)
            .add(subject)
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(Self {
            shared: Arc::new(shared),
            service,
            endpoint,
        })
    }

    async fn serve(
        mut self: Box<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        self.shared.start_housekeeping(&shutdown);
        let status = self.shared.status.clone();
        status.running(true);
        let permits = Arc::new(tokio::sync::Semaphore::new(self.shared.config.concurrency));
        let tasks = TaskTracker::new();
        loop {
            let request = tokio::select! {
                request = self.endpoint.next() => request,
                () = shutdown.cancelled() => break,
            };
            let Some(request) = request else {
                break;
            };
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit,
                () = shutdown.cancelled() => {
                    Reply::error(ReplyErrorKind::ShuttingDown, "the endpoint is shutting down").send(&request).await;
                    break;
                }
            };
            let shared = self.shared.clone();
            tasks.spawn(async move {
                shared.answer(request).await;
                drop(permit);
            });
        }
        // No new requests (other instances of the service take them), then
        // the running ones get `grace`.
        if let Err(e) = self.endpoint.stop().await {
            warn!(error = %e, "could not stop the endpoint's subscription");
        }
        self.shared.drain(tasks, grace).await;
        let _ = self.service.stop().await;
        status.running(false);
        Ok(())
    }
}

impl<H: Handler> Worker for ServiceWorker<H> {
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
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), RuntimeError>> + Send>> {
        Box::pin(self.serve(shutdown, grace))
    }
}

/// How long a request waits between looks at a key another request holds.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(25);

impl<H: Handler> Shared<H> {
    /// Answers one request inside its tracing span.
    async fn answer(&self, request: Request) {
        let delivery = Delivery::from_request(&request.message);
        let span = info_span!(
            "idem.request",
            handler = %self.config.name,
            subject = %delivery.subject(),
            key = field::Empty,
            outcome = field::Empty,
        );
        crate::trace::continue_in(&span, delivery.headers());
        let reply = boxed(self.reply_to(&delivery)).instrument(span).await;
        reply.send(&request).await;
    }

    /// What a request is answered with.
    async fn reply_to(&self, delivery: &Delivery) -> Reply {
        // Every look at the key is a transaction of its own (transactional):
        // a request waiting for another cannot hold one open.
        let wait_until = Instant::now() + self.config.lease;
        let fence = self.takes_fence.then(Fence::unset);
        loop {
            let (begun, prepared) = match self
                .begin_prepared(delivery, fence.as_ref(), GroupLock::Ignored)
                .await
            {
                Ok(ready) => ready,
                Err(Unprepared::Store(e)) => return self.unavailable(e),
                Err(Unprepared::Rejected(rejected)) => {
                    self.count(Outcome::Rejected);
                    return Reply::error(ReplyErrorKind::BadRequest, rejected);
                }
            };
            Span::current().record("key", field::debug(&prepared.key));
            let claimer = match begun {
                Begun::Claims(claimer) => claimer,
                Begun::Unclaimed => {
                    let mut held = Held::Nothing;
                    let (_, ran) = self
                        .run_attempt(None, delivery, &mut held, Instant::now(), prepared.args)
                        .await;
                    return self.replied(held, ran).await;
                }
            };
            let key = RecordKey::new(&self.name, &prepared.key);
            let asked = Instant::now();
            let claimed = claimer
                .claim(&key, prepared.fingerprint, &self.config)
                .await;
            let claim = match claimed.map(|outcome| self.granted(outcome)) {
                Ok(Granted::Run(claim)) => claim,
                Ok(Granted::Refused(Refusal::InFlight { .. })) if Instant::now() < wait_until => {
                    claimer.discard().await;
                    tokio::select! {
                        () = sleep(IN_FLIGHT_POLL) => continue,
                        () = self.hard_stop.cancelled() => {
                            return Reply::error(ReplyErrorKind::ShuttingDown, "the endpoint is shutting down");
                        }
                    }
                }
                Ok(Granted::Refused(refused)) => {
                    claimer.discard().await;
                    return self.refused_request(refused);
                }
                Err(e) => {
                    claimer.discard().await;
                    return self.unavailable(e);
                }
            };
            self.status.store_answered();
            self.counters.observe(Latency::Claim, asked.elapsed());
            if let Some(fence) = &fence {
                fence.set(claim.revision);
            }
            let mut held = claimer.hold(claim);
            let (_, ran) = self
                .run_attempt(None, delivery, &mut held, asked, prepared.args)
                .await;
            return self.replied(held, ran).await;
        }
    }

    /// The reply to a claim that may not run.
    fn refused_request(&self, refusal: Refusal) -> Reply {
        match refusal {
            Refusal::Duplicate { result } => {
                self.count(Outcome::Duplicate);
                match result {
                    Some(result) => Reply::Result(result),
                    None => Reply::error(
                        ReplyErrorKind::OutcomeUnknown,
                        "the key completed without a stored result (before the handler was served as a service?)",
                    ),
                }
            }
            Refusal::KeyConflict { stored } => {
                self.counters.count(Outcome::KeyConflict);
                Reply::error(
                    ReplyErrorKind::KeyConflict,
                    format!(
                        "key already used with another request (stored fingerprint {})",
                        stored.map_or_else(|| "none".to_owned(), |f| f.to_string())
                    ),
                )
            }
            Refusal::Dead => {
                self.count(Outcome::Duplicate);
                Reply::error(
                    ReplyErrorKind::Dead,
                    "the key's request failed for good earlier",
                )
            }
            Refusal::InFlight { retry_after, .. } => {
                self.count(Outcome::InFlightElsewhere);
                Reply::error(
                    ReplyErrorKind::InFlight,
                    format!(
                        "the key's first request is still running; ask again in {retry_after:?}"
                    ),
                )
            }
        }
    }

    fn unavailable(&self, error: crate::store::StoreError) -> Reply {
        self.not_run_for(&error);
        Reply::error(
            ReplyErrorKind::StoreUnavailable,
            format!("dedup store unavailable, the handler did not run: {error}"),
        )
    }

    /// What a run comes to: its result recorded and replied, or an error
    /// reply with the key released for the next request.
    async fn replied(&self, held: Held<'_>, ran: Ran<H::Output>) -> Reply {
        let output = match ran {
            Ran::Returned(output) => output,
            Ran::Failed(error) => return self.request_failed(held, &error).await,
            Ran::Stopped(Stopped::CutOff) => {
                held.abandon().await;
                self.count(Outcome::Interrupted);
                return Reply::error(
                    ReplyErrorKind::ShuttingDown,
                    "the endpoint shut down while the handler ran",
                );
            }
            Ran::Stopped(Stopped::Fenced { started: false }) => {
                if !held.give_back().await {
                    let why = "the claim was answered after its lease, and taken over";
                    self.lease_lost(why);
                    return Reply::error(ReplyErrorKind::OutcomeUnknown, why);
                }
                self.count(Outcome::StoreUnavailable);
                return Reply::error(
                    ReplyErrorKind::StoreUnavailable,
                    "the claim was answered only after its lease ran out: the handler did not run",
                );
            }
            Ran::Stopped(stopped @ (Stopped::Fenced { started: true } | Stopped::TakenOver)) => {
                let why = stopped.why();
                self.lease_lost(why);
                return Reply::error(ReplyErrorKind::OutcomeUnknown, why);
            }
        };
        let body = self.stored_result(&output).unwrap_or_default();
        let Some(claim) = held.claim().cloned() else {
            self.count(Outcome::Processed);
            return Reply::Result(body);
        };
        match self.record_completion(&held, Some(body.clone())).await {
            Some(Completion::Recorded) => {
                self.count(Outcome::Processed);
                Reply::Result(body)
            }
            Some(Completion::LeaseLost(lost)) => {
                warn!(
                    event = "lease_lost",
                    ?lost,
                    "lease lost before completion: another request may have run it too"
                );
                self.counters.count(Outcome::LeaseLost);
                // This run's body is not what the key records (the record
                // is its successor's, or gone): a repeat could be answered
                // differently. Say so; asking again gets the key's answer.
                Reply::error(
                    ReplyErrorKind::OutcomeUnknown,
                    "the claim was taken over before this run's completion was recorded: \
                     the key's outcome is the other run's; ask again for it",
                )
            }
            Some(Completion::Aborted(e)) => {
                self.count(Outcome::Retried);
                let _ = held.release().await;
                Reply::error(
                    ReplyErrorKind::Failed,
                    format!("the transaction did not commit: {e}"),
                )
            }
            Some(Completion::NotRecorded(e)) => self.unrecorded(&claim, e),
            None => {
                self.count(Outcome::StoreUnavailable);
                held.abandon().await;
                Reply::error(
                    ReplyErrorKind::OutcomeUnknown,
                    "shut down before the completion was recorded",
                )
            }
        }
    }

    fn unrecorded(&self, claim: &Claim, error: impl std::fmt::Display) -> Reply {
        warn!(key = ?claim.key, %error, "completion was not recorded");
        self.count(Outcome::StoreUnavailable);
        Reply::error(
            ReplyErrorKind::OutcomeUnknown,
            format!("the handler ran but its completion was not recorded: {error}"),
        )
    }

    /// A failed run: the key released (a request asking again runs it
    /// again) and the failure replied with its kind.
    async fn request_failed(&self, held: Held<'_>, error: &crate::HandlerError) -> Reply {
        warn!(%error, "handler failed; replied as an error");
        if !held.release().await {
            self.lease_lost("the claim was taken over before the failure was recorded");
        }
        if error.is_permanent() {
            self.count(Outcome::Rejected);
            Reply::error(ReplyErrorKind::Rejected, error)
        } else {
            self.count(Outcome::Retried);
            Reply::error(ReplyErrorKind::Failed, error)
        }
    }
}
