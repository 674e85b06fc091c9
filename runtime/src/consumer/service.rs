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
use futures::StreamExt;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, field, info_span, warn};

use super::RuntimeError;
use super::backend::{Begun, Held};
use super::shared::{Ran, Shared, Unprepared, boxed};
use super::stats::Latency;
use super::worker::Worker;
use crate::claim::{ClaimOutcome, Grant};
use crate::delivery_core::request::{
    self, Answer, Asked, RequestNext, RequestRunning, RequestStep,
};
use crate::delivery_core::{Recorded, RunEnd};
use crate::handler::Handler;
use crate::key::RecordKey;
use crate::reply::{KIND_HEADER, ReplyErrorKind};
use crate::store::GroupLock;
use crate::store::StoreError;
use crate::{Delivery, Fence};

/// Sends a request's answer as its reply.
async fn send(answer: Answer, request: &Request) {
    let sent = match answer {
        Answer::Result(body) => request.respond(Ok(body)).await,
        Answer::Error(kind, status) => {
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
                    let answer = Answer::Error(ReplyErrorKind::ShuttingDown, "the endpoint is shutting down".into());
                    send(answer, &request).await;
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
        let answer = boxed(self.reply_to(&delivery)).instrument(span).await;
        send(answer, &request).await;
    }

    /// What a request is answered with: the executor of the delivery
    /// core's request decisions (`delivery_core::request`).
    async fn reply_to(&self, delivery: &Delivery) -> Answer {
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
                Err(Unprepared::Store(e)) => {
                    let step = Asked.store_failed(&e);
                    return self.carry_out(step, Held::Nothing, Some(e)).await;
                }
                Err(Unprepared::Rejected(rejected)) => {
                    let step = Asked.rejected(&rejected);
                    return self.carry_out(step, Held::Nothing, None).await;
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
                    let step = self.request_ran(Asked.unclaimed(), ran);
                    return self.carry_out(step, held, None).await;
                }
            };
            let key = RecordKey::new(&self.name, &prepared.key);
            let asked = Instant::now();
            let claimed = claimer
                .claim(&key, prepared.fingerprint, &self.config)
                .await;
            let grant = match claimed.map(ClaimOutcome::split) {
                Ok(Ok(grant)) => grant,
                Ok(Err(refusal)) => {
                    claimer.discard().await;
                    match Asked.refused(&refusal, Instant::now() < wait_until) {
                        Ok(step) => return self.carry_out(step, Held::Nothing, None).await,
                        Err(after) => tokio::select! {
                            () = sleep(after) => continue,
                            () = self.hard_stop.cancelled() => {
                                return Answer::Error(ReplyErrorKind::ShuttingDown, "the endpoint is shutting down".into());
                            }
                        },
                    }
                }
                Err(e) => {
                    claimer.discard().await;
                    let step = Asked.store_failed(&e);
                    return self.carry_out(step, Held::Nothing, Some(e)).await;
                }
            };
            self.status.store_answered();
            self.counters.observe(Latency::Claim, asked.elapsed());
            let (running, notes) = Asked.granted(&self.rules, &grant);
            self.note(notes.iter(), None);
            let claim = match grant {
                Grant::Claimed(claim) | Grant::Reclaimed { claim, .. } => claim,
            };
            if let Some(fence) = &fence {
                fence.set(claim.revision);
            }
            let mut held = claimer.hold(claim);
            let (_, ran) = self
                .run_attempt(None, delivery, &mut held, asked, prepared.args)
                .await;
            let step = self.request_ran(running, ran);
            return self.carry_out(step, held, None).await;
        }
    }

    /// The core's step after a request's run.
    fn request_ran(&self, running: RequestRunning, ran: Ran<H::Output>) -> RequestStep {
        match ran {
            Ran::Returned(output) => running.ended(RunEnd::Returned {
                result: self.stored_result(&output),
            }),
            Ran::Failed(error) => {
                warn!(%error, "handler failed; replied as an error");
                running.ended(RunEnd::Failed {
                    error: &error,
                    lock_conflict: false,
                })
            }
            Ran::Stopped(stopped) => running.ended(RunEnd::Stopped(stopped)),
        }
    }

    /// Carries out the core's steps for a request until it answers.
    async fn carry_out(
        &self,
        mut step: RequestStep,
        mut held: Held<'_>,
        not_run: Option<StoreError>,
    ) -> Answer {
        let began = Instant::now();
        loop {
            self.note(step.notes.iter(), not_run.as_ref());
            step = match step.next {
                RequestNext::Reply(answer) => return answer,
                RequestNext::AbandonThenReply(answer) => {
                    held.abandon().await;
                    return answer;
                }
                RequestNext::Release(answer) => {
                    let ours = held.end(crate::claim::Ending::Released).await;
                    held = Held::Nothing;
                    request::released(answer, ours)
                }
                RequestNext::GiveBack => {
                    let ours = held.give_back().await;
                    held = Held::Nothing;
                    request::given_back(ours)
                }
                RequestNext::Complete(answering) => {
                    let mut aborted = None;
                    let recorded = held
                        .recorded(Some(answering.body().clone()), &mut aborted)
                        .await;
                    if matches!(recorded, Recorded::Yes | Recorded::LeaseLost) {
                        self.counters.observe(Latency::Completion, began.elapsed());
                    }
                    answering.answered(recorded)
                }
                RequestNext::CompleteAfter(answering, pause) => tokio::select! {
                    () = sleep(pause) => RequestStep {
                        next: RequestNext::Complete(answering),
                        notes: Default::default(),
                    },
                    () = self.hard_stop.cancelled() => {
                        tracing::error!("shutdown before completion was recorded");
                        answering.answered(Recorded::ShutDown)
                    }
                },
            };
        }
    }
}
