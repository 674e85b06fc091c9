//! One delivery, start to finish, for every dedup level: prepare → claim →
//! run (lease renewal, progress acks, panics caught, the fence) — then the
//! core's later steps (`settle.rs`). The I/O executor of the delivery core
//! (`delivery_core`, docs/design.md "One delivery, step by step"): every
//! decision is the core's, what each level does at each step is
//! `backend.rs`'s.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use async_nats::jetstream::{AckKind, Message};
use futures::FutureExt;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, Span, error, field, info_span, warn};

use super::active::ActiveKey;
use super::backend::{Begun, Claimer, Held};
use super::shared::{Ran, Shared, Unprepared, boxed, state_with};
use super::stats::{Latency, Outcome};
use crate::claim::{ClaimOutcome, Grant, Refusal};
use crate::delivery_core::{
    Arrival, Refused, RunEnd, Running, Settle, Started, Step, Stopped, Time, Upkeep,
};
use crate::handler::{Handler, HandlerPanicked, PrepareError, Prepared, prepare};
use crate::key::RecordKey;
use crate::store::GroupLock;
use crate::{Delivery, Fence, HandlerError};

/// The executor's clock for one delivery: the core's [`Time`] is the time
/// since `origin` on tokio's monotonic clock.
#[derive(Copy, Clone, Debug)]
pub(super) struct Origin(Instant);

impl Origin {
    /// A clock whose zero is now.
    pub(super) fn now() -> Self {
        Self(Instant::now())
    }

    /// A clock whose zero is `at`.
    pub(super) fn at(at: Instant) -> Self {
        Self(at)
    }

    /// The core's time now.
    pub(super) fn time(self) -> Time {
        Time(self.0.elapsed())
    }

    /// The instant the core's `time` is.
    pub(super) fn instant(self, time: Time) -> Instant {
        self.0 + time.0
    }
}

/// How a delivery run alone stands to group commit (`dedup =
/// transactional` with `batch > 1`; always `Beside` elsewhere), whose
/// transactions can meet it in a deadlock no handler alone would meet.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Apart {
    /// Beside whatever runs: a lock conflict may be a group's doing; it
    /// costs no attempt and earns a run apart from every group.
    Beside,
    /// Apart from every group (the group lock held exclusively): a lock
    /// conflict is the handler's own, and counts.
    FromGroups,
    /// The group lock could not be had within a lease (a group ran
    /// longer): beside whatever runs, a lock conflict counted as the
    /// handler's — so that no message waits for it for ever.
    #[cfg_attr(
        not(feature = "postgres"),
        expect(dead_code, reason = "transactional only")
    )]
    Counted,
}

impl Apart {
    /// The group lock its transaction takes.
    fn group_lock(self) -> GroupLock {
        match self {
            Apart::Beside | Apart::Counted => GroupLock::Ignored,
            Apart::FromGroups => GroupLock::Exclusive,
        }
    }
}

/// How a delivery's run alone ended.
enum Alone {
    /// Settled: acknowledged, retried, dead-lettered, or left for later.
    Settled,
    /// Nothing of it counted: run again, standing as said.
    Again(Apart),
}

impl<H: Handler> Shared<H> {
    /// Handles one delivery inside its tracing span.
    pub(crate) async fn handle(self: Arc<Self>, message: Message) {
        let delivery = Delivery::from_jetstream(&message);
        let span = info_span!(
            "idem.message",
            handler = %self.config.name,
            stream_sequence = delivery.stream_sequence(),
            delivered = delivery.delivered(),
            key = field::Empty,
            outcome = field::Empty,
        );
        crate::trace::continue_in(&span, delivery.headers());
        self.process(&message, &delivery).instrument(span).await;
    }

    pub(super) fn count(&self, outcome: Outcome) {
        Span::current().record("outcome", outcome.name());
        self.counters.count(outcome);
    }

    async fn process(&self, message: &Message, delivery: &Delivery) {
        #[cfg(feature = "postgres")]
        if let Some(groups) = &self.groups {
            return boxed(self.process_in_group(groups, message, delivery)).await;
        }
        self.process_alone(message, delivery, Apart::Beside).await;
    }

    /// Begins what the level needs (a transaction for `transactional`,
    /// standing to group commit as `group` says) and makes the arguments,
    /// key and fingerprint — the steps before a claim, for a stream's
    /// delivery and a request alike. `fence` is handed to extractors that
    /// take it.
    pub(super) async fn begin_prepared(
        &self,
        delivery: &Delivery,
        fence: Option<&Fence>,
        group: GroupLock,
    ) -> Result<(Begun<'_>, Prepared<H::Args>), Unprepared> {
        let begun = self
            .backend
            .begin(self.config.lease, group)
            .await
            .map_err(Unprepared::Store)?;
        let state = state_with(&self.state, &begun, fence);
        let prepared = prepare(&self.handler, delivery, &state);
        drop(state);
        match prepared {
            Ok(prepared) => Ok((begun, prepared)),
            Err(rejected) => {
                begun.discard().await;
                Err(Unprepared::Rejected(rejected))
            }
        }
    }

    /// One delivery in a transaction of its own (standing to group commit
    /// as `apart` says), or no transaction at all.
    pub(super) async fn process_alone(&self, message: &Message, delivery: &Delivery, apart: Apart) {
        let mut apart = apart;
        while let Alone::Again(next) = self.run_alone(message, delivery, apart).await {
            apart = next;
        }
    }

    /// One run of [`process_alone`](Self::process_alone): the executor of
    /// the delivery core (`delivery_core`) for a delivery alone — it
    /// carries out each step the core asks for and hands it the answer.
    async fn run_alone(&self, message: &Message, delivery: &Delivery, apart: Apart) -> Alone {
        let origin = Origin::now();
        let rules = &self.rules;
        let arrival = Arrival::new(delivery.delivered());
        let fence = self.takes_fence.then(Fence::unset);
        let (begun, prepared) = match self
            .begin_prepared(delivery, fence.as_ref(), apart.group_lock())
            .await
        {
            Ok(ready) => ready,
            #[cfg(feature = "postgres")]
            Err(Unprepared::Store(e))
                if apart == Apart::FromGroups && crate::store::waited_too_long(&e) =>
            {
                warn!(error = %e, "the group lock was held longer than a lease; the message runs beside the groups, a lock conflict counted as its own");
                return Alone::Again(Apart::Counted);
            }
            Err(Unprepared::Store(e)) => {
                let step = arrival.store_failed();
                boxed(self.drive(message, delivery, step, Held::Nothing, origin, Some(e))).await;
                return Alone::Settled;
            }
            Err(Unprepared::Rejected(rejected)) => {
                boxed(self.rejected(message, delivery, &rejected)).await;
                return Alone::Settled;
            }
        };
        Span::current().record("key", field::debug(&prepared.key));
        let claimer = match begun {
            Begun::Claims(claimer) => claimer,
            Begun::Unclaimed => {
                let running = arrival.unclaimed(rules, origin.time());
                let mut held = Held::Nothing;
                let step = self
                    .run_handler(message, running, &mut held, origin, prepared.args)
                    .await;
                boxed(self.drive(message, delivery, step, held, origin, None)).await;
                return Alone::Settled;
            }
        };
        let key = RecordKey::new(&self.name, &prepared.key);
        // dedup = kv: one delivery per key at a time in this process (a
        // duplicate waits for its original; the store answers it then).
        let mut _working = None;
        if matches!(claimer, Claimer::Kv(_)) {
            let Some(working) = self.work_on(&key).await else {
                let step = arrival.busy_here(rules);
                boxed(self.drive(message, delivery, step, Held::Nothing, origin, None)).await;
                return Alone::Settled;
            };
            _working = Some(working);
        }
        #[cfg(feature = "postgres")]
        let beside_groups = self.groups.is_some() && apart == Apart::Beside;
        #[cfg(not(feature = "postgres"))]
        let beside_groups = false;
        let asked = origin.time();
        let claiming = arrival.claiming(asked, beside_groups);
        let claimed = boxed(claimer.claim(&key, prepared.fingerprint, &self.config)).await;
        if claimed.is_ok() {
            self.status.store_answered();
            // The claim's own round trips, not the begin and prepare before.
            self.counters
                .observe(Latency::Claim, origin.time().since(asked));
        }
        let grant = match claimed.map(ClaimOutcome::split) {
            Ok(Ok(grant)) => grant,
            Ok(Err(refusal)) => {
                claimer.discard().await;
                let step = boxed(self.refused(message, &claiming, refusal, prepared.args)).await;
                boxed(self.drive(message, delivery, step, Held::Nothing, origin, None)).await;
                return Alone::Settled;
            }
            Err(e) => {
                claimer.discard().await;
                let step = claiming.store_failed();
                boxed(self.drive(message, delivery, step, Held::Nothing, origin, Some(e))).await;
                return Alone::Settled;
            }
        };
        let Started { running, notes } = claiming.granted(rules, &grant, origin.time());
        self.note(notes.iter(), None);
        let claim = match grant {
            Grant::Claimed(claim) | Grant::Reclaimed { claim, .. } => claim,
        };
        if let Some(fence) = &fence {
            fence.set(claim.revision);
        }
        let mut held = claimer.hold(claim);
        let step = self
            .run_handler(message, running, &mut held, origin, prepared.args)
            .await;
        match boxed(self.drive(message, delivery, step, held, origin, None)).await {
            // Perhaps a group's doing: none of the run's effects committed,
            // its claim was given back uncounted (the key stays its
            // payload's), and it runs again with no group beside it, where a
            // lock conflict is its own.
            Settle::Again => Alone::Again(Apart::FromGroups),
            Settle::Ack
            | Settle::AckRecorded
            | Settle::Nak(_)
            | Settle::AbandonThenNak(_)
            | Settle::Term
            | Settle::Leave
            | Settle::RunAlone => Alone::Settled,
        }
    }

    /// A delivery that never reached its handler: no key, or arguments
    /// that could not be made.
    pub(super) async fn rejected(
        &self,
        message: &Message,
        delivery: &Delivery,
        rejected: &PrepareError,
    ) {
        let missing_key = matches!(rejected, PrepareError::Key(_));
        if missing_key {
            warn!(error = %rejected, "no idempotency key");
        }
        let step = Arrival::new(delivery.delivered()).rejected(
            &self.rules,
            missing_key,
            rejected.reason(),
            rejected,
        );
        self.drive(message, delivery, step, Held::Nothing, Origin::now(), None)
            .await;
    }

    /// A refused claim, as the core answers it — with a duplicate first
    /// handed to the handler's `on_duplicate` (with the stored result).
    pub(super) async fn refused(
        &self,
        message: &Message,
        claiming: &crate::delivery_core::Claiming,
        refusal: Refusal,
        args: H::Args,
    ) -> Step {
        match claiming.refused(&self.rules, &refusal) {
            Refused::Answered(step) => step,
            Refused::Hook { hooking, notes } => {
                self.note(notes.iter(), None);
                let stored = match refusal {
                    Refusal::Duplicate { result } => result,
                    Refusal::Dead | Refusal::KeyConflict { .. } | Refusal::InFlight { .. } => None,
                };
                let hook = self.handler.on_duplicate(args, stored);
                let origin = Origin::now();
                let mut upkeep = Upkeep::new(self.config.lease, Time::ZERO, Time::ZERO, false);
                let mut held = Held::Nothing;
                let ran = self
                    .run(Some(message), &mut upkeep, &mut held, origin, hook)
                    .await;
                let error;
                let end = match ran {
                    Ran::Returned(()) => RunEnd::Returned { result: None },
                    Ran::Failed(failure) => {
                        error = failure;
                        warn!(%error, "the on_duplicate hook failed");
                        RunEnd::Failed {
                            error: &error,
                            lock_conflict: false,
                        }
                    }
                    Ran::Stopped(stopped) => RunEnd::Stopped(stopped),
                };
                hooking.ended(&self.rules, end)
            }
        }
    }

    /// Runs the handler on `args` while holding `held`, as `running`
    /// says; the step its end leads to.
    async fn run_handler(
        &self,
        message: &Message,
        mut running: Running,
        held: &mut Held<'_>,
        origin: Origin,
        args: H::Args,
    ) -> Step {
        let began = Instant::now();
        let ran = self
            .run(
                Some(message),
                running.upkeep_mut(),
                held,
                origin,
                self.handler.call(args),
            )
            .await;
        self.counters.observe(Latency::Handler, began.elapsed());
        let error;
        let end = match ran {
            Ran::Returned(output) => RunEnd::Returned {
                result: self.stored_result(&output),
            },
            Ran::Failed(failure) => {
                error = failure;
                warn!(%error, attempt = running.attempt(), "handler failed");
                RunEnd::Failed {
                    error: &error,
                    lock_conflict: lock_conflict(&error),
                }
            }
            Ran::Stopped(stopped) => RunEnd::Stopped(stopped),
        };
        running.ended(&self.rules, end)
    }

    /// Runs the handler on `args` while holding `held` (the attempt counted
    /// before it starts, its lease counting from `asked`), for the paths
    /// not driven by the core yet (group commit, services): which attempt
    /// the run is, and how it ended.
    pub(super) async fn run_attempt(
        &self,
        progress: Option<&Message>,
        delivery: &Delivery,
        held: &mut Held<'_>,
        asked: Instant,
        args: H::Args,
    ) -> (u32, Ran<H::Output>) {
        let attempt = held.attempt(delivery);
        let origin = Origin::at(asked);
        let mut upkeep = Upkeep::new(self.config.lease, Time::ZERO, origin.time(), held.fenced());
        let began = Instant::now();
        let ran = self
            .run(progress, &mut upkeep, held, origin, self.handler.call(args))
            .await;
        self.counters.observe(Latency::Handler, began.elapsed());
        (attempt, ran)
    }

    /// Marks `key` as worked on here. If another delivery in this process
    /// has it (a duplicate arriving while its original runs, or a
    /// redelivery while completion is still being retried after an outage),
    /// waits for that to end — at most a lease, and never past shutdown —
    /// rather than claim the key from ourselves or NAK a duplicate that is
    /// about to be answered. `None`: still held.
    async fn work_on(&self, key: &RecordKey) -> Option<ActiveKey<'_>> {
        let deadline = Instant::now() + self.config.lease;
        loop {
            let mut finished = match self.active.enter(key) {
                Ok(entered) => return Some(entered),
                Err(finished) => finished,
            };
            tokio::select! {
                ended = tokio::time::timeout_at(deadline, finished.changed()) => {
                    if ended.is_err() {
                        return None;
                    }
                }
                () = self.hard_stop.cancelled() => return None,
            }
        }
    }

    /// Runs the handler while keeping its claim up as `upkeep` says —
    /// renewals and in-progress acks (for `progress`) every third of the
    /// lease — and, for a fenced claim, stopping it at the deadline. A
    /// panic is caught and counted, and ends the run as a failure.
    ///
    /// The core's upkeep is asked before every poll of the handler whether
    /// it may take a step (a KV claim's lease may have run out on this
    /// worker's clock without a confirmed renewal: it was frozen, or the
    /// store was out of reach), so a process waking from a freeze stops its
    /// handler before the handler takes another step. Time is `origin`'s.
    pub(super) async fn run<T>(
        &self,
        progress: Option<&Message>,
        upkeep: &mut Upkeep,
        held: &mut Held<'_>,
        origin: Origin,
        call: impl Future<Output = Result<T, HandlerError>>,
    ) -> Ran<T> {
        // Shared by the guard (before each poll) and the timers below.
        let shared = Mutex::new(upkeep.clone());
        let lock = || shared.lock().unwrap_or_else(PoisonError::into_inner);
        let mut call = std::pin::pin!(AssertUnwindSafe(call).catch_unwind());
        let mut started = false;
        let mut guarded = std::pin::pin!(futures::future::poll_fn(|cx| {
            if !lock().allows(origin.time()) {
                return std::task::Poll::Ready(Err(started));
            }
            started = true;
            call.as_mut().poll(cx).map(Ok)
        }));
        let ran = loop {
            let timer = origin.instant(lock().timer());
            tokio::select! {
                biased;
                result = &mut guarded => break match result {
                    Err(started) => Ran::Stopped(Stopped::Fenced { started }),
                    Ok(Ok(Ok(output))) => Ran::Returned(output),
                    Ok(Ok(Err(e))) => Ran::Failed(e),
                    Ok(Err(payload)) => {
                        let panicked = HandlerPanicked::from_payload(&*payload);
                        error!(error = %panicked, "the handler panicked; counted as a failed attempt");
                        self.counters.count(Outcome::Panicked);
                        Ran::Failed(HandlerError::retryable(panicked))
                    }
                },
                () = self.hard_stop.cancelled() => break Ran::Stopped(Stopped::CutOff),
                // The next renewal, or the deadline if it comes first (it
                // wakes the task so that the guard above runs even while
                // the handler waits on nothing that would).
                () = sleep_until(timer) => {
                    let Some(renewal) = lock().on_timer(origin.time()) else {
                        continue;
                    };
                    if let Some(message) = progress
                        && let Err(e) = Box::pin(message.ack_with(AckKind::Progress)).await
                    {
                        warn!(error = %e, "could not send an in-progress ack");
                    }
                    // The handler stops if the lease runs out first.
                    let renewed = held
                        .renewed_within(renewal.within, "while the handler runs")
                        .await;
                    if !lock().on_renewed(renewal, &renewed) {
                        break Ran::Stopped(Stopped::TakenOver);
                    }
                }
            }
        };
        *upkeep = lock().clone();
        ran
    }

    /// The result to store with the claim (`store_result`), if it can be
    /// encoded.
    pub(super) fn stored_result(&self, output: &H::Output) -> Option<bytes::Bytes> {
        if !self.config.store_result {
            return None;
        }
        self.handler.encode_result(output).unwrap_or_else(|e| {
            warn!(error = %e, "could not serialize the result; duplicates will get none");
            None
        })
    }
}

/// Whether a failure is a lock conflict (deadlock, serialization failure,
/// lock timeout) — which group commit may have caused.
fn lock_conflict(error: &HandlerError) -> bool {
    #[cfg(feature = "postgres")]
    return crate::store::met_lock_conflict(error);
    #[cfg(not(feature = "postgres"))]
    {
        let _ = error;
        false
    }
}
