//! A server-free driver for unit tests of your own handlers: a third
//! executor of the delivery core (`delivery_core`), beside the runtime and
//! the model checker. Deliveries go through the very decisions the runtime
//! makes — arguments and key (`handler::prepare`), the claim (on a
//! [`MemoryStore`], the claim state machine every store shares), the run
//! with panics caught and its lease kept up and fenced, completion with the
//! stored result, the retry policy, the dead letter's steps — and come back
//! as a [`Handled`] outcome. No `nats-server`, no sleeping: time is a
//! [`ManualClock`] the test moves ([`Driver::clock`]), and a retry's delay
//! is reported, not waited for.
//!
//! What it leaves out is the transport: acks, in-progress acks, the broker's
//! redelivery timing, a dead-letter stream (every letter is taken as
//! stored). The simulated clock is read whenever the handler yields, so a
//! handler that moves it past its lease is fenced before its next step,
//! as the runtime fences a worker that wakes from a freeze. Handlers that
//! take a [`Tx`](crate::Tx) (`dedup = transactional`) need a database: test
//! them against the runtime.

use std::panic::AssertUnwindSafe;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;

use crate::claim::{Claim, ClaimOutcome, Ending, Grant, Refusal, Transition};
use crate::clock::{Clock, ManualClock};
use crate::delivery_core::{
    Arrival, Next, Note, Outcome, Recorded, Refused, Renewed, Rules, RunEnd, Settle, Step, Stopped,
    Time,
};
use crate::extract::StateMap;
use crate::handler::{
    DeadLetterReason, Dedup, Handler, HandlerConfig, HandlerPanicked, PrepareError, prepare,
};
use crate::key::{HandlerName, RecordKey};
use crate::store::{DedupStore, MemoryStore};
use crate::{Delivery, Fence, HandlerError};

/// What became of one delivery.
#[derive(Debug)]
#[non_exhaustive]
pub enum Handled<T> {
    /// The handler returned `Ok`; its completion is recorded.
    Processed(T),
    /// A duplicate: acknowledged without running (`on_duplicate`, if the
    /// handler has one, was called with `stored`).
    Duplicate {
        /// The result stored when the key completed.
        stored: Option<Bytes>,
    },
    /// Another delivery holds the key: it would come back after `after`.
    InFlight {
        /// When to try again.
        after: Duration,
    },
    /// A failed attempt, to be retried after `after`.
    Retry {
        /// The policy's delay (at least the error's hint).
        after: Duration,
        /// The failure.
        error: HandlerError,
    },
    /// Given up: the message would be dead-lettered with `reason`.
    DeadLettered {
        /// Its `Idem-Reason`.
        reason: DeadLetterReason,
        /// Its `Idem-Error`.
        error: String,
    },
    /// No key and `on_missing_key = reject`: acknowledged and dropped.
    Rejected,
    /// The dedup store could not be reached: not run (fail closed), back
    /// after `after`.
    StoreUnavailable {
        /// When it would come back.
        after: Duration,
    },
    /// The claim stopped being this delivery's while its handler ran (its
    /// lease ran out on the simulated clock without a confirmed renewal,
    /// or a renewal found it taken over): the handler was stopped before
    /// its next step, and the message is left to whoever holds the claim.
    LeaseLost,
}

/// Feeds deliveries to one handler as the runtime would, without a server.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use idem::testing::{Driver, Handled};
/// use idem::{idempotent, Delivery, HandlerError, Json};
///
/// #[idempotent(stream = "ORDERS", key = id, store_result)]
/// async fn confirm(Json(id): Json<u64>) -> Result<String, HandlerError> {
///     Ok(format!("confirmed {id}"))
/// }
///
/// let mut driver = Driver::new(confirm);
/// let first = driver.deliver(Delivery::new("orders", "7")).await;
/// assert!(matches!(first, Handled::Processed(ref text) if text == "confirmed 7"));
/// let again = driver.deliver(Delivery::new("orders", "7")).await;
/// assert!(matches!(again, Handled::Duplicate { stored: Some(_) }));
/// let garbage = driver.deliver(Delivery::new("orders", "seven")).await;
/// assert!(matches!(garbage, Handled::DeadLettered { reason, .. } if reason.as_str() == "decode"));
/// # }
/// ```
pub struct Driver<H> {
    handler: H,
    config: HandlerConfig,
    rules: Rules,
    state: StateMap,
    store: MemoryStore,
    clock: ManualClock,
    origin: crate::clock::UnixMillis,
}

/// What a delivery's execution keeps for its outcome.
struct Kept<T> {
    output: Option<T>,
    failure: Option<HandlerError>,
    duplicate: Option<Option<Bytes>>,
    letter: Option<(DeadLetterReason, String)>,
    counted: Option<Outcome>,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self {
            output: None,
            failure: None,
            duplicate: None,
            letter: None,
            counted: None,
        }
    }
}

/// How many times a completion the memory store failed is tried again
/// before the driver gives up, as the runtime does at shutdown.
const COMPLETION_TRIES: u32 = 100;

impl<H: Handler> Driver<H> {
    /// A driver for `handler`, with its own configuration, an empty store
    /// and a simulated clock.
    pub fn new(handler: H) -> Self {
        let config = handler.config();
        let clock = ManualClock::starting_now();
        Self {
            store: MemoryStore::with_clock(config.retention, clock.clone()),
            rules: Rules::of(&config),
            origin: clock.now(),
            clock,
            handler,
            config,
            state: StateMap::default(),
        }
    }

    /// Adds state for `State<T>` arguments, as `.state(value)` on the
    /// runtime builder does.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.insert(value);
        self
    }

    /// The store the claims are in (to inspect or `forget` keys).
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// The simulated clock leases, retention and the fence follow: move it
    /// (from the test, or from a handler given it as state) to let time
    /// pass without sleeping.
    pub fn clock(&self) -> ManualClock {
        self.clock.clone()
    }

    /// The core's time: since the driver was made, on its clock.
    fn now(&self) -> Time {
        Time(self.clock.now().saturating_since(self.origin))
    }

    /// Handles one delivery.
    pub async fn deliver(&mut self, delivery: Delivery) -> Handled<H::Output> {
        loop {
            if let Some(handled) = self.deliver_once(&delivery).await {
                return handled;
            }
        }
    }

    /// One run of a delivery; `None`: run it again (the core's
    /// [`Settle::Again`], never asked without group commit).
    async fn deliver_once(&mut self, delivery: &Delivery) -> Option<Handled<H::Output>> {
        let arrival = Arrival::new(delivery.delivered());
        let fence = Fence::unset();
        let mut state = self.state.clone();
        state.insert(fence.clone());
        let mut kept = Kept::default();
        let prepared = match prepare(&self.handler, delivery, &state) {
            Ok(prepared) => prepared,
            Err(rejected) => {
                let missing_key = matches!(rejected, PrepareError::Key(_));
                let step = arrival.rejected(&self.rules, missing_key, rejected.reason(), &rejected);
                return self.execute(step, None, kept).await;
            }
        };
        if self.config.dedup == Dedup::Off {
            let running = arrival.unclaimed(&self.rules, self.now());
            let step = self.run(running, None, prepared.args, &mut kept).await;
            return self.execute(step, None, kept).await;
        }
        let name = match HandlerName::new(&self.config.name) {
            Ok(name) => name,
            Err(e) => {
                let step = arrival.rejected(&self.rules, false, DeadLetterReason::MissingKey, &e);
                return self.execute(step, None, kept).await;
            }
        };
        let key = RecordKey::new(&name, &prepared.key);
        let claiming = arrival.claiming(self.now(), false);
        let claimed = self
            .store
            .claim(&key, prepared.fingerprint, self.config.lease)
            .await;
        let grant = match claimed.map(ClaimOutcome::split) {
            Ok(Ok(grant)) => grant,
            Ok(Err(refusal)) => {
                // What a duplicate's (or a dead key's) answer hands back.
                let stored = match &refusal {
                    Refusal::Duplicate { result } => Some(result.clone()),
                    Refusal::Dead => Some(None),
                    Refusal::KeyConflict { .. } | Refusal::InFlight { .. } => None,
                };
                let step = match claiming.refused(&self.rules, &refusal) {
                    Refused::Answered(step) => step,
                    Refused::Hook { hooking, notes } => {
                        kept.note(notes.iter());
                        let hook = self
                            .handler
                            .on_duplicate(prepared.args, stored.clone().flatten());
                        let failure = match AssertUnwindSafe(hook).catch_unwind().await {
                            Ok(Ok(())) => None,
                            Ok(Err(error)) => Some(error),
                            Err(payload) => Some(panicked(&*payload)),
                        };
                        let end = match &failure {
                            None => RunEnd::Returned { result: None },
                            Some(error) => RunEnd::Failed {
                                error,
                                lock_conflict: false,
                            },
                        };
                        let step = hooking.ended(&self.rules, end);
                        kept.failure = failure;
                        step
                    }
                };
                kept.duplicate = stored;
                return self.execute(step, None, kept).await;
            }
            Err(error) => {
                tracing::warn!(%error, "the memory store failed: not run");
                return self.execute(claiming.store_failed(), None, kept).await;
            }
        };
        let started = claiming.granted(&self.rules, &grant, self.now());
        kept.note(started.notes.iter());
        let mut claim = match grant {
            Grant::Claimed(claim) | Grant::Reclaimed { claim, .. } => claim,
        };
        fence.set(claim.revision);
        let step = self
            .run(started.running, Some(&mut claim), prepared.args, &mut kept)
            .await;
        self.execute(step, Some(claim), kept).await
    }

    /// Runs the handler, its claim kept up as `running`'s upkeep says on
    /// the simulated clock: a due renewal before each poll, and no poll
    /// once the lease ran out without a confirmed one.
    async fn run(
        &self,
        mut running: crate::delivery_core::Running,
        mut claim: Option<&mut Claim>,
        args: H::Args,
        kept: &mut Kept<H::Output>,
    ) -> Step {
        /// What the driver found before a poll of the handler, or after.
        enum Polled<T> {
            Done(T),
            Fenced,
            Renew(crate::delivery_core::Renewal),
        }
        let mut call = std::pin::pin!(AssertUnwindSafe(self.handler.call(args)).catch_unwind());
        let mut started = false;
        let ended = loop {
            // The clock is looked at before every poll, as the runtime's
            // guard does: a due renewal first, and no step past the lease.
            let polled = futures::future::poll_fn(|cx| {
                let now = self.now();
                let upkeep = running.upkeep_mut();
                if !upkeep.allows(now) {
                    return Poll::Ready(Polled::Fenced);
                }
                if let Some(renewal) = upkeep.on_timer(now) {
                    return Poll::Ready(Polled::Renew(renewal));
                }
                started = true;
                call.as_mut().poll(cx).map(Polled::Done)
            })
            .await;
            match polled {
                Polled::Done(done) => break Ok(done),
                Polled::Fenced => break Err(Stopped::Fenced { started }),
                Polled::Renew(renewal) => {
                    let renewed = match claim.as_deref_mut() {
                        Some(claim) => match self.store.renew(claim).await {
                            Ok(transition) => Renewed::Answered(transition),
                            Err(_) => Renewed::Failed,
                        },
                        None => Renewed::Answered(Transition::Applied),
                    };
                    if !running.upkeep_mut().on_renewed(renewal, &renewed) {
                        break Err(Stopped::TakenOver);
                    }
                }
            }
        };
        let end = match ended {
            Ok(Ok(Ok(output))) => {
                let result = if self.config.store_result {
                    self.handler.encode_result(&output).ok().flatten()
                } else {
                    None
                };
                kept.output = Some(output);
                return running.ended(&self.rules, RunEnd::Returned { result });
            }
            Ok(Ok(Err(error))) => error,
            Ok(Err(payload)) => panicked(&*payload),
            Err(stopped) => return running.ended(&self.rules, RunEnd::Stopped(stopped)),
        };
        let step = running.ended(
            &self.rules,
            RunEnd::Failed {
                error: &end,
                lock_conflict: false,
            },
        );
        kept.failure = Some(end);
        step
    }

    /// Carries out the core's steps on the memory store until it settles
    /// the delivery; `None`: the core asks for another run.
    async fn execute(
        &self,
        mut step: Step,
        mut claim: Option<Claim>,
        mut kept: Kept<H::Output>,
    ) -> Option<Handled<H::Output>> {
        let mut failed_completions = 0;
        loop {
            kept.note(step.notes.iter());
            step = match step.next {
                Next::Settle(settle) => return kept.handled(settle),
                Next::Complete(completing) => {
                    let recorded = match &claim {
                        Some(claim) => {
                            match self
                                .store
                                .complete(claim, completing.result().cloned())
                                .await
                            {
                                Ok(Transition::Applied) => Recorded::Yes,
                                Ok(Transition::LeaseLost { .. }) => Recorded::LeaseLost,
                                Err(_) if failed_completions >= COMPLETION_TRIES => {
                                    Recorded::ShutDown
                                }
                                Err(_) => Recorded::StoreFailed,
                            }
                        }
                        None => Recorded::Yes,
                    };
                    completing.answered(&self.rules, recorded)
                }
                Next::CompleteAfter(completing, pause) => {
                    failed_completions += 1;
                    self.clock.advance(pause);
                    Step {
                        next: Next::Complete(completing),
                        notes: Default::default(),
                    }
                }
                Next::Close(closing) => {
                    let ours = match &claim {
                        Some(claim) => {
                            let ended = match closing.ending() {
                                Ending::Released => self.store.release(claim).await,
                                Ending::Kept => Ok(Transition::Applied),
                                Ending::Dead => self.store.mark_dead(claim).await,
                            };
                            !matches!(ended, Ok(Transition::LeaseLost { .. }))
                        }
                        None => true,
                    };
                    closing.ended(&self.rules, ours)
                }
                Next::GiveBack(giving) => {
                    let ours = match &claim {
                        Some(claim) => !matches!(
                            self.store.release(&claim.given_back()).await,
                            Ok(Transition::LeaseLost { .. })
                        ),
                        None => true,
                    };
                    giving.given(ours)
                }
                Next::Confirm(confirming) => {
                    let ours = match claim.as_mut() {
                        Some(claim) => match self.store.renew(claim).await {
                            Ok(Transition::Applied) => Some(true),
                            Ok(Transition::LeaseLost { .. }) => Some(false),
                            Err(_) => None,
                        },
                        None => Some(true),
                    };
                    confirming.answered(&self.rules, ours)
                }
                // No dead-letter stream here: every letter is stored.
                Next::Publish(publishing) => {
                    kept.letter = Some((publishing.reason(), publishing.error().to_owned()));
                    publishing.stored(&self.rules, true)
                }
            };
        }
    }

    /// Delivers `delivery` again after each retry — the simulated clock
    /// moved by the delay the runtime would wait, no sleeping — until it
    /// is processed, a duplicate, dead-lettered, rejected or left to
    /// another owner; the outcome and how many deliveries it took.
    pub async fn deliver_until_settled(&mut self, delivery: Delivery) -> (Handled<H::Output>, u64) {
        let mut delivered = delivery.delivered();
        loop {
            let outcome = self
                .deliver(delivery.clone().with_delivered(delivered))
                .await;
            match outcome {
                Handled::Retry { after, .. }
                | Handled::InFlight { after }
                | Handled::StoreUnavailable { after }
                    if delivered < 10_000 =>
                {
                    self.clock.advance(after);
                    delivered += 1;
                }
                settled => return (settled, delivered),
            }
        }
    }
}

impl<T> Kept<T> {
    /// Keeps the outcome counted last that decides the answer.
    fn note(&mut self, notes: impl Iterator<Item = Note>) {
        for note in notes {
            match note {
                Note::Count(outcome) => self.counted = Some(outcome),
                Note::NotRun => self.counted = Some(Outcome::StoreUnavailable),
                Note::LeaseLost(_) => self.counted = Some(Outcome::LeaseLost),
                Note::Reclaimed { .. } => {}
            }
        }
    }

    /// The outcome of a delivery the core settled as `settle`.
    fn handled(self, settle: Settle) -> Option<Handled<T>> {
        Some(match settle {
            // Never asked without group commit; run it again, as the
            // runtime would.
            Settle::Again | Settle::RunAlone => return None,
            Settle::Leave => Handled::LeaseLost,
            Settle::Term => {
                let (reason, error) = self
                    .letter
                    .unwrap_or((DeadLetterReason::HandlerError, String::new()));
                Handled::DeadLettered { reason, error }
            }
            Settle::Ack | Settle::AckRecorded => match (self.output, self.duplicate) {
                (Some(output), _) => Handled::Processed(output),
                (None, Some(stored)) => Handled::Duplicate { stored },
                (None, None) => Handled::Rejected,
            },
            Settle::Nak(after) | Settle::AbandonThenNak(after) => {
                match (self.counted, self.failure) {
                    (Some(Outcome::Retried), Some(error)) => Handled::Retry { after, error },
                    (Some(Outcome::InFlightElsewhere), _) => Handled::InFlight { after },
                    _ => Handled::StoreUnavailable { after },
                }
            }
        })
    }
}

/// A handler's panic, as the retryable failure it is counted as.
fn panicked(payload: &(dyn std::any::Any + Send)) -> HandlerError {
    HandlerError::retryable(HandlerPanicked::from_payload(payload))
}
