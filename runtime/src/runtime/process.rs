//! One delivery, start to finish: prepare, claim, run (with lease renewal
//! and progress acks), complete, acknowledge — or retry, or dead-letter.
//! Executes the design notes' steps; the decisions themselves are made by
//! the claim state machine and the retry policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, error, field, info_span, warn};

use super::dead_letter::{self, Reason};
use super::faults::Faults;
use super::recent::Recent;
use super::stats::{Counters, Outcome};
use crate::claim::{Claim, ClaimOutcome, Transition};
use crate::extract::StateMap;
use crate::fingerprint::Fingerprint;
use crate::handler::{Handler, HandlerConfig, OnMissingKey, PrepareError, prepare};
use crate::key::{HandlerName, RecordKey};
use crate::retry::{Retry, RetryDecision};
use crate::store::{DedupStore, KvStore};
use crate::{Delivery, HandlerError};

/// Everything a handler's messages share.
pub(crate) struct Shared<H> {
    pub(crate) handler: H,
    pub(crate) name: HandlerName,
    pub(crate) config: HandlerConfig,
    pub(crate) store: Option<KvStore>,
    pub(crate) js: jetstream::Context,
    pub(crate) state: StateMap,
    pub(crate) counters: Arc<Counters>,
    pub(crate) faults: Faults,
    /// Cancelled when the shutdown deadline has passed: running handlers
    /// are abandoned, their claims released.
    pub(crate) hard_stop: CancellationToken,
    /// Keys this process is working on right now, each with a channel that
    /// closes when the work ends.
    pub(crate) active: Mutex<HashMap<RecordKey, watch::Receiver<()>>>,
    /// Keys this process completed recently.
    pub(super) recent: Recent,
    /// The inbox of a `dedup = transactional` handler.
    #[cfg(feature = "postgres")]
    pub(crate) inbox: Option<super::transactional::TxInbox>,
}

/// Marks a key as worked on by this process for as long as it lives.
struct ActiveKey<'a> {
    active: &'a Mutex<HashMap<RecordKey, watch::Receiver<()>>>,
    key: RecordKey,
    /// Dropped last: whoever waits on the key wakes once it is free.
    _working: watch::Sender<()>,
}

impl<'a> ActiveKey<'a> {
    /// Marks `key`, or, if another delivery here is working on it, hands
    /// back a receiver whose `changed()` returns once that work has ended.
    fn enter(
        active: &'a Mutex<HashMap<RecordKey, watch::Receiver<()>>>,
        key: &RecordKey,
    ) -> Result<Self, watch::Receiver<()>> {
        let mut keys = active.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(busy) = keys.get(key) {
            return Err(busy.clone());
        }
        let (working, finished) = watch::channel(());
        keys.insert(key.clone(), finished);
        Ok(ActiveKey {
            active,
            key: key.clone(),
            _working: working,
        })
    }
}

impl Drop for ActiveKey<'_> {
    fn drop(&mut self) {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Backoff while the dedup store is unreachable.
pub(super) fn store_backoff(attempt: u32) -> Duration {
    match Retry::exponential(Duration::from_millis(250), Duration::from_secs(10))
        .attempts(u32::MAX)
        .jitter()
        .after_failure(attempt)
    {
        RetryDecision::RetryAfter(delay) => delay.max(Duration::from_millis(50)),
        RetryDecision::GiveUp => Duration::from_secs(10),
    }
}

/// What a failed attempt leads to.
pub(super) enum Failure {
    /// NAK with this delay.
    Retry(Duration),
    /// Dead-letter with this reason.
    DeadLetter(&'static str),
}

/// How long a delivery whose key is held elsewhere waits: doubling from
/// 50 ms with each delivery, never past the holder's lease. Most holders
/// finish in milliseconds, so the duplicate is answered soon; a slow holder
/// costs a handful of cheap claim attempts, not a storm.
pub(super) fn in_flight_delay(attempt: u32, remaining_lease: Duration) -> Duration {
    let backoff = Duration::from_millis(50)
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)));
    backoff.min(remaining_lease).max(MIN_NAK_DELAY)
}

/// The shortest NAK delay: a redelivery storm helps nobody.
const MIN_NAK_DELAY: Duration = Duration::from_millis(20);

impl<H: Handler> Shared<H> {
    /// Handles one delivery inside its tracing span.
    pub(crate) async fn handle(self: Arc<Self>, message: Message) {
        let delivery = Delivery::from_jetstream(&message);
        let span = info_span!(
            "idem.message",
            handler = %self.config.name,
            stream_sequence = delivery.stream_sequence(),
            attempt = delivery.delivered(),
            key = field::Empty,
            outcome = field::Empty,
        );
        self.process(&message, &delivery).instrument(span).await;
    }

    pub(super) fn count(&self, outcome: Outcome) {
        Span::current().record("outcome", outcome.name());
        self.counters.count(outcome);
    }

    async fn process(&self, message: &Message, delivery: &Delivery) {
        #[cfg(feature = "postgres")]
        if let Some(inbox) = &self.inbox {
            // Boxed: a kv handler's every message would otherwise carry the
            // transactional path's state.
            return Box::pin(self.process_transactional(inbox, message, delivery)).await;
        }
        let attempt = u32::try_from(delivery.delivered()).unwrap_or(u32::MAX);
        let prepared = match prepare(&self.handler, delivery, &self.state) {
            Ok(prepared) => prepared,
            Err(rejected) => return Box::pin(self.rejected(message, delivery, rejected)).await,
        };
        Span::current().record("key", field::debug(&prepared.key));
        let Some(store) = &self.store else {
            let result = self
                .run(message, None, self.handler.call(prepared.args))
                .await;
            return match result {
                None => self.interrupted(message, None).await,
                Some(Ok(_)) => self.succeeded(message, false).await,
                Some(Err(e)) => Box::pin(self.failed(message, delivery, e, attempt, None)).await,
            };
        };
        let key = RecordKey::new(&self.name, &prepared.key);
        let Some(_working) = self.work_on(&key).await else {
            self.count(Outcome::InFlightElsewhere);
            return nak(message, in_flight_delay(attempt, self.config.lease)).await;
        };
        if self.recent.is_done(&key, prepared.fingerprint) {
            self.count(Outcome::Duplicate);
            return ack_recorded(message).await;
        }
        // The store's futures are boxed here and below: a delivery's task
        // lives as long as its handler runs, and would otherwise carry their
        // state (several KB) all that time.
        let claim = match Box::pin(store.claim(&key, prepared.fingerprint, self.config.lease)).await
        {
            Err(e) => {
                warn!(error = %e, "dedup store unavailable: the handler was not run");
                self.count(Outcome::StoreUnavailable);
                return nak(message, store_backoff(attempt)).await;
            }
            Ok(ClaimOutcome::Claimed(claim)) => claim,
            Ok(ClaimOutcome::Reclaimed { claim, from }) => {
                warn!(event = "reclaimed", previous_owner = %from, "took over an expired claim: its owner may have had its effect");
                self.counters.count(Outcome::Reclaimed);
                claim
            }
            Ok(ClaimOutcome::Duplicate { .. } | ClaimOutcome::Dead) => {
                self.count(Outcome::Duplicate);
                return ack_recorded(message).await;
            }
            Ok(ClaimOutcome::KeyConflict { stored }) => {
                return Box::pin(self.key_conflict(message, delivery, stored)).await;
            }
            Ok(ClaimOutcome::InFlight { retry_after, .. }) => {
                self.count(Outcome::InFlightElsewhere);
                return nak(message, in_flight_delay(attempt, retry_after)).await;
            }
        };
        self.run_claimed(message, delivery, store, claim, prepared.args, attempt)
            .await;
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
            let mut finished = match ActiveKey::enter(&self.active, key) {
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

    async fn run_claimed(
        &self,
        message: &Message,
        delivery: &Delivery,
        store: &KvStore,
        mut claim: Claim,
        args: H::Args,
        attempt: u32,
    ) {
        let result = self
            .run(message, Some((store, &mut claim)), self.handler.call(args))
            .await;
        let output = match result {
            None => return self.interrupted(message, Some((store, &claim))).await,
            Some(Err(e)) => {
                // The failure paths are boxed: rare, and large (dead letters).
                return Box::pin(self.failed(message, delivery, e, attempt, Some((store, &claim))))
                    .await;
            }
            Some(Ok(output)) => output,
        };
        let stored = if self.config.store_result {
            self.handler.encode_result(&output).unwrap_or_else(|e| {
                warn!(error = %e, "could not serialize the result; duplicates will get none");
                None
            })
        } else {
            None
        };
        let sent = Instant::now();
        match self.complete(message, store, &claim, stored).await {
            Some(Transition::Applied) => {
                self.recent.remember(&claim.key, claim.fingerprint, sent);
                self.succeeded(message, true).await;
            }
            Some(Transition::LeaseLost { current_owner }) => {
                warn!(
                    event = "lease_lost",
                    ?current_owner,
                    "lease lost before completion: another worker took over, the effect may run twice"
                );
                self.counters.count(Outcome::LeaseLost);
                self.succeeded(message, true).await;
            }
            // Shutdown: the claim stays pending; the next delivery after the
            // lease reclaims it (counted as reclaimed there).
            None => {
                self.count(Outcome::StoreUnavailable);
                nak(message, self.config.lease).await;
            }
        }
    }

    /// Records completion, retrying until the store answers: while it is
    /// unreachable nobody else can take the claim over, and the claim's
    /// revision fences a retry that lands late. In-progress acks between
    /// attempts keep the server from redelivering the message meanwhile.
    /// Gives up only at the shutdown deadline (`None`).
    async fn complete(
        &self,
        message: &Message,
        store: &KvStore,
        claim: &Claim,
        result: Option<bytes::Bytes>,
    ) -> Option<Transition> {
        let mut pause = Duration::from_millis(50);
        loop {
            match Box::pin(store.complete(claim, result.clone())).await {
                Ok(transition) => return Some(transition),
                Err(e) => {
                    warn!(error = %e, ?pause, "could not record completion; retrying");
                    let _ = message.ack_with(AckKind::Progress).await;
                    tokio::select! {
                        () = sleep(pause) => {}
                        () = self.hard_stop.cancelled() => {
                            error!("shutdown before completion was recorded: the message will be redelivered and reclaimed");
                            return None;
                        }
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Runs the handler while renewing the claim and telling the server the
    /// message is in progress; `None` when the shutdown deadline cut it off.
    pub(super) async fn run<T>(
        &self,
        message: &Message,
        mut claim: Option<(&KvStore, &mut Claim)>,
        call: impl Future<Output = Result<T, HandlerError>>,
    ) -> Option<Result<T, HandlerError>> {
        let period = (self.config.lease / 3).max(Duration::from_millis(100));
        let mut keepalive = interval_at(Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut call = std::pin::pin!(call);
        loop {
            tokio::select! {
                biased;
                result = &mut call => return Some(result),
                () = self.hard_stop.cancelled() => return None,
                _ = keepalive.tick() => {
                    if let Err(e) = Box::pin(message.ack_with(AckKind::Progress)).await {
                        warn!(error = %e, "could not send an in-progress ack");
                    }
                    if let Some((store, claim)) = claim.as_mut() {
                        match Box::pin(store.renew(claim)).await {
                            Ok(Transition::Applied) => {}
                            Ok(Transition::LeaseLost { current_owner }) => {
                                warn!(?current_owner, "lease lost while the handler runs");
                            }
                            Err(e) => warn!(error = %e, "could not renew the lease"),
                        }
                    }
                }
            }
        }
    }

    /// Counts and acknowledges a success. With the completion recorded in
    /// the store (`recorded`), a plain ack suffices: if it is lost, the
    /// redelivery is answered as a duplicate, so the confirmed ack's extra
    /// round trip buys nothing. Without a record (`dedup = off`) the
    /// confirmed ack is what keeps a second run rare.
    pub(super) async fn succeeded(&self, message: &Message, recorded: bool) {
        self.count(Outcome::Processed);
        if self.faults.drop_this_ack() {
            return;
        }
        if recorded {
            ack_recorded(message).await;
        } else {
            ack(message).await;
        }
    }

    async fn failed(
        &self,
        message: &Message,
        delivery: &Delivery,
        error: HandlerError,
        attempt: u32,
        claim: Option<(&KvStore, &Claim)>,
    ) {
        match self.after_failure(&error, attempt) {
            Failure::Retry(delay) => {
                warn!(%error, ?delay, "handler failed; retrying");
                self.release(claim).await;
                self.count(Outcome::Retried);
                nak(message, delay).await;
            }
            Failure::DeadLetter(code) => {
                self.dead_letter(message, delivery, code, &error, claim)
                    .await
            }
        }
    }

    /// Retry per the policy, or dead-letter (permanent errors, last attempt).
    pub(super) fn after_failure(&self, error: &HandlerError, attempt: u32) -> Failure {
        if error.is_permanent() {
            return Failure::DeadLetter("handler_error");
        }
        match self.config.retry.after_failure(attempt) {
            RetryDecision::RetryAfter(delay) => Failure::Retry(delay),
            RetryDecision::GiveUp => Failure::DeadLetter("retries_exhausted"),
        }
    }

    /// Dead-letters a payload that reuses a completed key.
    pub(super) async fn key_conflict(
        &self,
        message: &Message,
        delivery: &Delivery,
        stored: Option<Fingerprint>,
    ) {
        let error = format!(
            "key already completed with another payload (stored fingerprint {})",
            stored.map_or_else(|| "none".to_owned(), |f| f.to_string())
        );
        self.counters.count(Outcome::KeyConflict);
        self.dead_letter(message, delivery, "key_conflict", &error, None)
            .await;
    }

    pub(super) async fn rejected(
        &self,
        message: &Message,
        delivery: &Delivery,
        rejected: PrepareError,
    ) {
        if matches!(rejected, PrepareError::Key(_))
            && self.config.on_missing_key == OnMissingKey::Reject
        {
            warn!(error = %rejected, "no idempotency key: rejected");
            self.count(Outcome::Rejected);
            return ack(message).await;
        }
        if rejected.reason() == "decode" {
            self.counters.count(Outcome::DecodeFailed);
        }
        self.dead_letter(message, delivery, rejected.reason(), &rejected, None)
            .await;
    }

    pub(super) async fn interrupted(&self, message: &Message, claim: Option<(&KvStore, &Claim)>) {
        warn!("shutdown deadline passed while the handler ran: claim released, message NAKed");
        self.release(claim).await;
        self.count(Outcome::Interrupted);
        nak(message, MIN_NAK_DELAY).await;
    }

    async fn release(&self, claim: Option<(&KvStore, &Claim)>) {
        if let Some((store, claim)) = claim {
            match store.release(claim).await {
                Ok(Transition::Applied) => {}
                Ok(lost @ Transition::LeaseLost { .. }) => warn!(?lost, "claim already taken over"),
                Err(e) => {
                    warn!(error = %e, "could not release the claim; it frees itself when the lease ends")
                }
            }
        }
    }

    /// Stores the dead letter, then marks the key dead and terminates the
    /// original. If the dead letter cannot be stored, the original is NAKed
    /// and kept: a message is never given up before its dead letter exists.
    pub(super) async fn dead_letter(
        &self,
        message: &Message,
        delivery: &Delivery,
        code: &'static str,
        error: &(dyn std::fmt::Display + Sync),
        claim: Option<(&KvStore, &Claim)>,
    ) {
        let reason = Reason { code, error };
        if let Err(e) = dead_letter::publish(&self.js, &self.config, delivery, reason).await {
            error!(error = %e, reason = code, subject = %self.config.dead_letter, "could not store the dead letter; the message is kept");
            self.release(claim).await;
            self.count(Outcome::DeadLetterFailed);
            let attempt = u32::try_from(delivery.delivered()).unwrap_or(u32::MAX);
            return nak(message, store_backoff(attempt)).await;
        }
        warn!(reason = code, %error, subject = %self.config.dead_letter, "dead-lettered");
        if let Some((store, claim)) = claim {
            match store.mark_dead(claim).await {
                Ok(Transition::Applied) => {}
                Ok(lost) => warn!(?lost, "could not mark the key dead: claim taken over"),
                Err(e) => warn!(error = %e, "could not mark the key dead"),
            }
        }
        self.count(Outcome::DeadLettered);
        if let Err(e) = message.ack_with(AckKind::Term).await {
            warn!(error = %e, "could not terminate the original; its redelivery will find the key dead");
        }
    }
}

/// A confirmed acknowledgement, retried briefly. Once completion is
/// recorded a lost ack only costs a redelivery, answered as a duplicate.
pub(super) async fn ack(message: &Message) {
    for pause in [
        Duration::from_millis(100),
        Duration::from_millis(500),
        Duration::ZERO,
    ] {
        match message.double_ack().await {
            Ok(()) => return,
            Err(e) if pause.is_zero() => {
                warn!(error = %e, "could not acknowledge; the redelivery will be a duplicate")
            }
            Err(_) => sleep(pause).await,
        }
    }
}

/// A plain ack for a message whose key the store holds as done: a lost ack
/// only costs a redelivery that is answered as a duplicate, so waiting for
/// the server's confirmation buys nothing.
pub(super) async fn ack_recorded(message: &Message) {
    if let Err(e) = message.ack().await {
        warn!(error = %e, "could not acknowledge; the redelivery will be a duplicate");
    }
}

pub(super) async fn nak(message: &Message, delay: Duration) {
    if let Err(e) = message
        .ack_with(AckKind::Nak(Some(delay.max(MIN_NAK_DELAY))))
        .await
    {
        warn!(error = %e, "could not NAK; the server redelivers after ack_wait");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_delays_double_from_50ms_and_stop_at_the_lease() {
        let lease = Duration::from_secs(30);
        let delays: Vec<u128> = (1..=6)
            .map(|a| in_flight_delay(a, lease).as_millis())
            .collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600]);
        assert_eq!(in_flight_delay(40, lease), lease);
        assert_eq!(
            in_flight_delay(3, Duration::from_millis(120)),
            Duration::from_millis(120)
        );
        assert_eq!(in_flight_delay(1, Duration::ZERO), MIN_NAK_DELAY);
    }
}
