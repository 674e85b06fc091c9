//! How a delivery ends when it does not complete: a retry, a dead letter,
//! a key conflict, a rejection, an interruption — and the acknowledgements
//! that carry each to the server.
//!
//! The order on the way to a dead letter is fixed: the dead letter is
//! stored (its PubAck awaited), then the key is marked dead, then the
//! original is terminated. A crash between any two steps leaves a
//! redelivery or a dead letter with its record, never neither.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use tokio::time::Instant;
use tracing::{error, warn};

use super::acks::{
    MIN_NAK_DELAY, ack, ack_recorded, deliveries, in_flight_delay, nak, store_backoff,
};
use super::backend::Held;
use super::dead_letter::{self, Reason};
use super::shared::{Ran, Shared};
#[cfg(feature = "metrics")]
use super::stats::Latency;
use super::stats::Outcome;
use crate::claim::{Refusal, Transition};
use crate::delivery_core::{Failure, after_failure};
use crate::fingerprint::Fingerprint;
use crate::handler::{DeadLetterReason, Handler, OnMissingKey, PrepareError};
use crate::store::StoreError;
use crate::{Delivery, HandlerError};

impl<H: Handler> Shared<H> {
    /// Answers a claim that may not run: a duplicate, a conflict, a key
    /// held elsewhere.
    pub(super) async fn refused(
        &self,
        message: &Message,
        delivery: &Delivery,
        refusal: Refusal,
        args: H::Args,
    ) {
        match refusal {
            Refusal::Duplicate { result } if self.config.on_duplicate => {
                self.count(Outcome::Duplicate);
                self.answer_duplicate(message, delivery, args, result).await;
            }
            Refusal::Duplicate { .. } | Refusal::Dead => {
                self.count(Outcome::Duplicate);
                ack_recorded(message).await;
            }
            Refusal::KeyConflict { stored } => {
                self.key_conflict(message, delivery, stored).await;
            }
            Refusal::InFlight { retry_after, .. } => {
                self.count(Outcome::InFlightElsewhere);
                nak(message, in_flight_delay(deliveries(delivery), retry_after)).await;
            }
        }
    }

    /// Hands a duplicate and its stored result to the handler's
    /// `on_duplicate` (panics caught, progress acks sent as for a run),
    /// then acknowledges it; a failure is retried and dead-lettered as a
    /// handler's, with the key left completed.
    async fn answer_duplicate(
        &self,
        message: &Message,
        delivery: &Delivery,
        args: H::Args,
        stored: Option<bytes::Bytes>,
    ) {
        let mut held = Held::Nothing;
        let hook = self.handler.on_duplicate(args, stored);
        match self
            .run(Some(message), &mut held, Instant::now(), hook)
            .await
        {
            Ran::Returned(()) => ack_recorded(message).await,
            Ran::Failed(error) => {
                let attempt = deliveries(delivery);
                Box::pin(self.failed(message, delivery, error, attempt, held)).await;
            }
            Ran::CutOff => self.interrupted(message, held).await,
            Ran::NotStarted => self.not_started(message, delivery, held).await,
            Ran::LeaseLost(why) => self.lease_lost(why),
        }
    }

    /// The dedup store could not be reached: the handler was not run (fail
    /// closed); NAK with backoff. Not an attempt.
    pub(super) async fn store_unavailable(
        &self,
        message: &Message,
        delivery: &Delivery,
        error: StoreError,
    ) {
        self.not_run_for(&error);
        nak(message, store_backoff(deliveries(delivery))).await;
    }

    /// Logs, reports to the health probe and counts a run the store's
    /// failure prevented — for a delivery (NAKed) and a request (replied)
    /// alike.
    pub(super) fn not_run_for(&self, error: &StoreError) {
        warn!(error = %error, "dedup store unavailable: the handler was not run");
        self.status.store_failed(error);
        self.count(Outcome::StoreUnavailable);
    }

    /// Counts and acknowledges a success. With the completion recorded in
    /// the store (`recorded`), a plain ack suffices: if it is lost, the
    /// redelivery is answered as a duplicate, so the confirmed ack's extra
    /// round trip buys nothing. Without a record (`dedup = off`) the
    /// confirmed ack is what keeps a second run rare.
    pub(super) async fn succeeded(&self, message: &Message, recorded: bool) {
        self.count(Outcome::Processed);
        // Parsing the ack subject for the publish time is only worth it
        // when the histogram goes somewhere.
        #[cfg(feature = "metrics")]
        if let Ok(info) = message.info()
            && let Ok(waited) = std::time::SystemTime::now().duration_since(info.published.into())
        {
            self.counters.observe(Latency::EndToEnd, waited);
        }
        if self.faults.drop_this_ack() {
            return;
        }
        if recorded {
            ack_recorded(message).await;
        } else {
            ack(message).await;
        }
    }

    /// A failed attempt: release and retry, or dead-letter.
    pub(super) async fn failed(
        &self,
        message: &Message,
        delivery: &Delivery,
        error: HandlerError,
        attempt: u32,
        held: Held<'_>,
    ) {
        match self.after_failure(&error, attempt) {
            Failure::Retry(delay) => {
                warn!(%error, attempt, ?delay, "handler failed; retrying");
                if !held.release().await {
                    return self
                        .lease_lost("the claim was taken over before the failure was recorded");
                }
                self.count(Outcome::Retried);
                nak(message, delay).await;
            }
            Failure::DeadLetter(reason) => {
                self.dead_letter(message, delivery, reason, &error, held, attempt)
                    .await;
            }
        }
    }

    /// What this handler's failed attempt leads to ([`after_failure`]).
    pub(super) fn after_failure(&self, error: &HandlerError, attempt: u32) -> Failure {
        after_failure(&self.config.retry, error, attempt)
    }

    /// Dead-letters a payload that reuses a key first claimed by another.
    pub(super) async fn key_conflict(
        &self,
        message: &Message,
        delivery: &Delivery,
        stored: Option<Fingerprint>,
    ) {
        let error = format!(
            "key already claimed with another payload (stored fingerprint {})",
            stored.map_or_else(|| "none".to_owned(), |f| f.to_string())
        );
        self.counters.count(Outcome::KeyConflict);
        let attempts = deliveries(delivery);
        self.dead_letter(
            message,
            delivery,
            DeadLetterReason::KeyConflict,
            &error,
            Held::Nothing,
            attempts,
        )
        .await;
    }

    /// A delivery that never reached its handler: no key, or arguments
    /// that could not be made.
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
        if rejected.reason() == DeadLetterReason::Decode {
            self.counters.count(Outcome::DecodeFailed);
        }
        let attempts = deliveries(delivery);
        self.dead_letter(
            message,
            delivery,
            rejected.reason(),
            &rejected,
            Held::Nothing,
            attempts,
        )
        .await;
    }

    /// The claim stopped being this worker's while the handler ran: the
    /// handler was stopped. The message is left alone — not acknowledged,
    /// retried, dead-lettered or terminated: it belongs to whoever holds
    /// the claim now (or to the next delivery, which takes the claim over
    /// after a lease, counted there as `reclaimed`).
    pub(super) fn lease_lost(&self, why: &'static str) {
        warn!(
            event = "lease_lost",
            why,
            "lease lost while the handler ran: the handler was stopped and the message left to the claim's holder"
        );
        self.count(Outcome::LeaseLost);
    }

    /// The claim was answered only after its lease had run out on this
    /// worker's clock: the handler never started. Nothing ran, so it is not
    /// an attempt: the claim is given back — released with the attempt it
    /// counted taken off — and the message NAKed with the store's backoff.
    /// If a reader took the key over meanwhile, the message is the new
    /// owner's: counted `lease_lost`, neither acknowledged nor NAKed.
    pub(super) async fn not_started(&self, message: &Message, delivery: &Delivery, held: Held<'_>) {
        if !held.give_back().await {
            return self.lease_lost("the claim was answered after its lease, and taken over");
        }
        warn!(
            "the claim was answered only after its lease ran out: the handler was not started; the claim is given back and the message NAKed"
        );
        self.count(Outcome::StoreUnavailable);
        nak(message, super::acks::store_backoff(deliveries(delivery))).await;
    }

    /// The shutdown deadline cut the handler off. Its claim is left as the
    /// backend says (a KV claim stays pending: the effect may be under
    /// way), and the message comes back once that claim may be taken over.
    pub(super) async fn interrupted(&self, message: &Message, held: Held<'_>) {
        // A fenced (bucket) claim stays pending until its lease runs out.
        let delay = if held.fenced() {
            self.config.lease
        } else {
            MIN_NAK_DELAY
        };
        warn!(
            ?delay,
            "shutdown deadline passed while the handler ran: the message is NAKed; a kept claim is taken over after its lease"
        );
        held.abandon().await;
        self.count(Outcome::Interrupted);
        nak(message, delay).await;
    }

    /// Stores the dead letter, then marks the key dead and terminates the
    /// original. If the dead letter cannot be stored, the key is kept for
    /// this payload and the original NAKed: a message is never given up
    /// before its dead letter exists, and no other payload takes its key
    /// meanwhile.
    pub(super) async fn dead_letter(
        &self,
        message: &Message,
        delivery: &Delivery,
        code: DeadLetterReason,
        error: &(dyn std::fmt::Display + Sync),
        mut held: Held<'_>,
        attempts: u32,
    ) {
        // A dead letter cannot be taken back: first make sure the message
        // is still this worker's to give up.
        match held.confirm().await {
            Ok(true) => {}
            Ok(false) => return self.lease_lost("the claim was taken over before the dead letter"),
            Err(e) => return self.store_unavailable(message, delivery, e).await,
        }
        let reason = Reason { code, error };
        let claimed = held
            .claim()
            .map(|c| (c.key.clone(), c.fingerprint, c.revision));
        let record = claimed.as_ref().zip(self.backend.location()).map(
            |((key, fingerprint, revision), store)| dead_letter::Record {
                key,
                store,
                fingerprint: *fingerprint,
                revision: *revision,
            },
        );
        // The letter's PubAck may take a while (a stalled link, a slow
        // leader): meanwhile the original is kept in progress and the claim
        // held — a KV lease renewed, a transaction kept from its idle
        // timeout (which would free the row's lock for another payload).
        let published = keep_held(
            message,
            &mut held,
            self.config.lease,
            dead_letter::publish(&self.js, &self.config, delivery, reason, attempts, record),
        )
        .await;
        if let Err(e) = published {
            error!(error = %e, reason = %code, subject = %self.config.dead_letter, "could not store the dead letter; the message and its key are kept");
            // The key stays this payload's: a KV claim stays pending (the
            // message comes back once its lease ran out), a transactional
            // row is kept for the payload.
            let back_after = if held.fenced() {
                self.config.lease
            } else {
                store_backoff(deliveries(delivery))
            };
            if !held.keep().await {
                return self.lease_lost("the claim was taken over while the dead letter failed");
            }
            self.count(Outcome::DeadLetterFailed);
            return nak(message, back_after).await;
        }
        warn!(reason = %code, %error, subject = %self.config.dead_letter, "dead-lettered");
        if !held.mark_dead().await {
            // Taken over while the letter was stored: the message is the new
            // owner's now — no Term (its letter stays, and a replay finds
            // the key held, done or released).
            return self.lease_lost("the claim was taken over while the dead letter was stored");
        }
        self.count(Outcome::DeadLettered);
        if let Err(e) = message.ack_with(AckKind::Term).await {
            warn!(error = %e, "could not terminate the original; its redelivery will find the key dead");
        }
    }
}

/// Runs `work` while holding `held`: every third of `lease` an in-progress
/// ack for `message` and a renewal of the claim (for a transaction, a
/// statement that keeps it from its idle timeout), until `work` ends.
async fn keep_held<T>(
    message: &Message,
    held: &mut Held<'_>,
    lease: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let every = (lease / 3).max(MIN_NAK_DELAY);
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            () = tokio::time::sleep(every) => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "could not send an in-progress ack");
                }
                match held.renew().await {
                    Ok(Transition::Applied) => {}
                    Ok(Transition::LeaseLost { .. }) => {
                        warn!("the claim was taken over while its dead letter was being stored");
                    }
                    Err(e) => {
                        warn!(error = %e, "could not renew the claim while its dead letter was being stored; keeping the key for its payload on its own");
                        held.secure().await;
                    }
                }
            }
        }
    }
}
