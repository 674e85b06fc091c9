//! One delivery, start to finish, for every dedup level: prepare → claim →
//! run (lease renewal, progress acks, panics caught) → finish → acknowledge
//! — or retry, or dead-letter (`settle.rs`). Executes docs/design.md's
//! steps; the decisions are the claim state machine's and the retry
//! policy's, and what each level does at each step is `backend.rs`'s.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use futures::FutureExt;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout_at};
use tracing::{Instrument, Span, error, field, info_span, warn};

use super::acks::{deliveries, in_flight_delay, nak};
use super::active::ActiveKey;
use super::backend::{Begun, Claimer, Completion, Held};
use super::shared::{Granted, Ran, Shared, Unprepared, boxed, state_with};
use super::stats::{Latency, Outcome};
use crate::claim::Transition;
use crate::handler::HandlerPanicked;
use crate::handler::{Handler, Prepared, prepare};
use crate::key::RecordKey;
use crate::store::GroupLock;
use crate::{Delivery, Fence, HandlerError};

/// When the lease this worker holds ends, on its monotonic clock, as the
/// renewals move it. Shared by the handler's guard and the renewals.
struct LeaseEnd {
    origin: Instant,
    /// Milliseconds after `origin`.
    at: std::sync::atomic::AtomicU64,
}

impl LeaseEnd {
    fn new(at: Instant) -> Self {
        let origin = Instant::now();
        let end = Self {
            origin,
            at: std::sync::atomic::AtomicU64::new(0),
        };
        end.extend_to(at);
        end
    }

    fn extend_to(&self, at: Instant) {
        let millis = u64::try_from(at.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(u64::MAX);
        self.at.store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.origin + Duration::from_millis(self.at.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn passed(&self) -> bool {
        Instant::now() >= self.at()
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
    #[cfg_attr(
        not(feature = "postgres"),
        expect(dead_code, reason = "transactional only")
    )]
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
    #[cfg_attr(
        not(feature = "postgres"),
        expect(dead_code, reason = "transactional only")
    )]
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

    /// One run of [`process_alone`](Self::process_alone).
    async fn run_alone(&self, message: &Message, delivery: &Delivery, apart: Apart) -> Alone {
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
                self.store_unavailable(message, delivery, e).await;
                return Alone::Settled;
            }
            Err(Unprepared::Rejected(rejected)) => {
                Box::pin(self.rejected(message, delivery, rejected)).await;
                return Alone::Settled;
            }
        };
        Span::current().record("key", field::debug(&prepared.key));
        let claimer = match begun {
            Begun::Claims(claimer) => claimer,
            Begun::Unclaimed => {
                let mut held = Held::Nothing;
                let (attempt, ran) = self
                    .run_attempt(
                        Some(message),
                        delivery,
                        &mut held,
                        Instant::now(),
                        prepared.args,
                    )
                    .await;
                boxed(self.finish(message, delivery, held, attempt, ran)).await;
                return Alone::Settled;
            }
        };
        let key = RecordKey::new(&self.name, &prepared.key);
        // dedup = kv: one delivery per key at a time in this process (a
        // duplicate waits for its original; the store answers it then).
        let mut _working = None;
        if matches!(claimer, Claimer::Kv(_)) {
            let Some(working) = self.work_on(&key).await else {
                self.count(Outcome::InFlightElsewhere);
                let delay = in_flight_delay(deliveries(delivery), self.config.lease);
                nak(message, delay).await;
                return Alone::Settled;
            };
            _working = Some(working);
        }
        let asked = Instant::now();
        let claimed = boxed(claimer.claim(&key, prepared.fingerprint, &self.config)).await;
        if claimed.is_ok() {
            self.status.store_answered();
            self.counters.observe(Latency::Claim, asked.elapsed());
        }
        let claim = match claimed.map(|outcome| self.granted(outcome)) {
            Ok(Granted::Run(claim)) => claim,
            Ok(Granted::Refused(refused)) => {
                claimer.discard().await;
                let args = prepared.args;
                Box::pin(self.refused(message, delivery, refused, args)).await;
                return Alone::Settled;
            }
            Err(e) => {
                claimer.discard().await;
                self.store_unavailable(message, delivery, e).await;
                return Alone::Settled;
            }
        };
        if let Some(fence) = &fence {
            fence.set(claim.revision);
        }
        let mut held = claimer.hold(claim);
        let (attempt, ran) = self
            .run_attempt(Some(message), delivery, &mut held, asked, prepared.args)
            .await;
        #[cfg(feature = "postgres")]
        if let Ran::Failed(error) = &ran
            && self.groups.is_some()
            && apart == Apart::Beside
            && crate::store::met_lock_conflict(error)
        {
            // Perhaps a group's doing: none of the run's effects commit, its
            // claim is given back uncounted (the key stays its payload's),
            // and it runs again with no group beside it, where a lock
            // conflict is its own.
            held.give_back().await;
            self.count(Outcome::LockConflict);
            return Alone::Again(Apart::FromGroups);
        }
        boxed(self.finish(message, delivery, held, attempt, ran)).await;
        Alone::Settled
    }

    /// Runs the handler on `args` while holding `held`: which attempt the
    /// run is (counted before it starts), and how it ended.
    pub(super) async fn run_attempt(
        &self,
        progress: Option<&Message>,
        delivery: &Delivery,
        held: &mut Held<'_>,
        asked: Instant,
        args: H::Args,
    ) -> (u32, Ran<H::Output>) {
        let attempt = held.attempt(delivery);
        let began = Instant::now();
        let ran = self
            .run(progress, held, asked, self.handler.call(args))
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
                ended = timeout_at(deadline, finished.changed()) => {
                    if ended.is_err() {
                        return None;
                    }
                }
                () = self.hard_stop.cancelled() => return None,
            }
        }
    }

    /// Runs the handler while renewing the claim and telling the server the
    /// message is in progress. A panic is caught and counted, and ends the
    /// run as a failure.
    ///
    /// A KV claim fences the handler: the run ends ([`Ran::LeaseLost`])
    /// when a renewal finds the claim taken over, or when this worker's own
    /// monotonic clock says the lease ran out without a confirmed renewal
    /// (it was frozen, or the store was out of reach). The deadline is
    /// checked before every poll of the handler, so a process waking from a
    /// freeze stops its handler before the handler takes another step.
    /// `asked` is when the claim was requested: the lease counts from then.
    /// `progress`: the JetStream message to send in-progress acks for.
    pub(super) async fn run<T>(
        &self,
        progress: Option<&Message>,
        held: &mut Held<'_>,
        asked: Instant,
        call: impl Future<Output = Result<T, HandlerError>>,
    ) -> Ran<T> {
        let lease = self.config.lease;
        let period = (lease / 3).max(Duration::from_millis(100));
        let mut keepalive = interval_at(Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let fenced = held.fenced();
        let lease_ends = LeaseEnd::new(asked + lease);
        let mut call = std::pin::pin!(AssertUnwindSafe(call).catch_unwind());
        let mut started = false;
        let mut guarded = std::pin::pin!(futures::future::poll_fn(|cx| {
            if fenced && lease_ends.passed() {
                return std::task::Poll::Ready(Err(started));
            }
            started = true;
            call.as_mut().poll(cx).map(Ok)
        }));
        loop {
            tokio::select! {
                biased;
                result = &mut guarded => return match result {
                    Err(false) => Ran::NotStarted,
                    Err(true) => Ran::LeaseLost("the lease ran out on this worker's clock without a confirmed renewal"),
                    Ok(Ok(Ok(output))) => Ran::Returned(output),
                    Ok(Ok(Err(e))) => Ran::Failed(e),
                    Ok(Err(payload)) => {
                        let panicked = HandlerPanicked::from_payload(&*payload);
                        error!(error = %panicked, "the handler panicked; counted as a failed attempt");
                        self.counters.count(Outcome::Panicked);
                        Ran::Failed(HandlerError::retryable(panicked))
                    }
                },
                () = self.hard_stop.cancelled() => return Ran::CutOff,
                // Wakes the task when the lease ends, so that the check above
                // runs even while the handler waits on nothing that would.
                () = tokio::time::sleep_until(lease_ends.at()), if fenced => {}
                _ = keepalive.tick() => {
                    if let Some(message) = progress
                        && let Err(e) = Box::pin(message.ack_with(AckKind::Progress)).await
                    {
                        warn!(error = %e, "could not send an in-progress ack");
                    }
                    // A renewal may take no longer than a renewal period,
                    // whatever the store's own timeout: the next one
                    // follows, and the lease is judged on this clock.
                    let sent = Instant::now();
                    match timeout_at(sent + period, held.renew()).await {
                        Ok(Ok(Transition::Applied)) => lease_ends.extend_to(sent + lease),
                        Ok(Ok(Transition::LeaseLost { .. })) => {
                            return Ran::LeaseLost("a renewal found the claim taken over");
                        }
                        Ok(Err(e)) => warn!(error = %e, "could not renew the lease; the handler stops if the lease runs out first"),
                        Err(_) => warn!(?period, "a renewal took longer than a third of the lease; the handler stops if the lease runs out first"),
                    }
                }
            }
        }
    }

    /// What a run comes to: completion recorded and acknowledged, a retry,
    /// a dead letter, or (cut off) a claim left for the next owner.
    async fn finish(
        &self,
        message: &Message,
        delivery: &Delivery,
        held: Held<'_>,
        attempt: u32,
        ran: Ran<H::Output>,
    ) {
        let output = match ran {
            Ran::Returned(output) => output,
            Ran::CutOff => return self.interrupted(message, held).await,
            Ran::NotStarted => return self.not_started(message, delivery, held).await,
            Ran::LeaseLost(why) => return self.lease_lost(why),
            // The failure paths are boxed: rare, and large (dead letters).
            Ran::Failed(error) => {
                return Box::pin(self.failed(message, delivery, error, attempt, held)).await;
            }
        };
        if held.claim().is_none() {
            return self.succeeded(message, false).await;
        }
        let stored = self.stored_result(&output);
        match self.record_completion(Some(message), &held, stored).await {
            Some(Completion::Recorded) => {
                self.succeeded(message, true).await;
            }
            Some(Completion::LeaseLost(lost)) => {
                warn!(
                    event = "lease_lost",
                    ?lost,
                    "lease lost before completion: another worker took over, the effect may run twice"
                );
                self.counters.count(Outcome::LeaseLost);
                self.succeeded(message, true).await;
            }
            Some(Completion::Aborted(e)) => {
                let error = HandlerError::retryable(e);
                Box::pin(self.failed(message, delivery, error, attempt, held)).await;
            }
            Some(Completion::NotRecorded(e)) => {
                warn!(error = %e, "completion was not recorded; the message will be redelivered");
                self.count(Outcome::StoreUnavailable);
                nak(message, super::acks::store_backoff(attempt)).await;
            }
            // Shutdown: the claim stays pending; the next delivery after the
            // lease reclaims it (counted as reclaimed there).
            None => {
                self.count(Outcome::StoreUnavailable);
                held.abandon().await;
                nak(message, self.config.lease).await;
            }
        }
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

    /// Records completion, retrying while the store cannot be reached:
    /// meanwhile nobody else can take the claim over, and the claim's
    /// revision fences a retry that lands late. In-progress acks between
    /// attempts keep the server from redelivering the message (`progress`).
    /// Gives up only at the shutdown deadline (`None`).
    pub(super) async fn record_completion(
        &self,
        progress: Option<&Message>,
        held: &Held<'_>,
        result: Option<bytes::Bytes>,
    ) -> Option<Completion> {
        let mut pauses = crate::retry::Schedule::completion();
        let began = Instant::now();
        loop {
            match held.complete(result.clone()).await {
                Ok(completion) => {
                    self.counters.observe(Latency::Completion, began.elapsed());
                    return Some(completion);
                }
                Err(e) => {
                    let pause = pauses.next();
                    warn!(error = %e, ?pause, "could not record completion; retrying");
                    if let Some(message) = progress {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    tokio::select! {
                        () = sleep(pause) => {}
                        () = self.hard_stop.cancelled() => {
                            error!("shutdown before completion was recorded: the message will be redelivered and reclaimed");
                            return None;
                        }
                    }
                }
            }
        }
    }
}
