//! The executor of the delivery core's steps after a run (or instead of
//! one): each [`Next`] carried out — completion recorded, a claim's ending
//! written, a dead letter stored while its claim is kept up — its answer
//! handed back to the core, until the core settles the message: an ack, a
//! NAK, a Term, or nothing (the message is another owner's). The decisions
//! are `delivery_core`'s; what is here is I/O, logs and counters.
//!
//! The order on the way to a dead letter is the core's, and fixed: the
//! dead letter is stored (its PubAck awaited), then the key is marked dead,
//! then the original is terminated. A crash between any two steps leaves a
//! redelivery or a dead letter with its record, never neither.

use async_nats::jetstream::{AckKind, Message};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{error, warn};

use super::acks::{ack, ack_recorded, nak};
use super::backend::Held;
use super::dead_letter::{self, Reason};
use super::pipeline::Origin;
use super::shared::Shared;
use super::stats::{Latency, Outcome};
use crate::Delivery;
use crate::delivery_core::{Next, Note, Publishing, Recorded, Settle, Step};
use crate::handler::Handler;
use crate::store::StoreError;

impl<H: Handler> Shared<H> {
    /// Carries out `step` and every step after it until the core settles
    /// the message; returns how it was settled. `held` is what the delivery
    /// holds; `not_run` the store's error, if the core is told the store
    /// could not be reached (for the health probe).
    pub(super) async fn drive(
        &self,
        message: &Message,
        delivery: &Delivery,
        mut step: Step,
        mut held: Held<'_>,
        origin: Origin,
        mut not_run: Option<StoreError>,
    ) -> Settle {
        let rules = &self.rules;
        let mut completing_since = None;
        loop {
            self.note(step.notes.iter(), not_run.as_ref());
            let processed = step
                .notes
                .iter()
                .any(|note| note == Note::Count(Outcome::Processed));
            step = match step.next {
                Next::Settle(settle) => {
                    self.settle(message, settle, held, processed).await;
                    return settle;
                }
                Next::Complete(completing) => {
                    let began = *completing_since.get_or_insert_with(Instant::now);
                    let mut aborted = None;
                    let recorded = held
                        .recorded(completing.result().cloned(), &mut aborted)
                        .await;
                    if matches!(recorded, Recorded::Yes | Recorded::LeaseLost) {
                        self.counters.observe(Latency::Completion, began.elapsed());
                    }
                    completing.answered(rules, recorded)
                }
                Next::CompleteAfter(completing, pause) => {
                    // In-progress acks between attempts keep the server from
                    // redelivering the message meanwhile.
                    let _ = message.ack_with(AckKind::Progress).await;
                    tokio::select! {
                        () = sleep(pause) => Step {
                            next: Next::Complete(completing),
                            notes: Default::default(),
                        },
                        () = self.hard_stop.cancelled() => {
                            error!("shutdown before completion was recorded: the message will be redelivered and reclaimed");
                            completing.answered(rules, Recorded::ShutDown)
                        }
                    }
                }
                Next::Close(closing) => {
                    let ours = held.end(closing.ending()).await;
                    held = Held::Nothing;
                    closing.ended(rules, ours)
                }
                Next::GiveBack(giving) => {
                    warn!(
                        "the run does not count (the claim was answered only after its lease, or a lock conflict beside group commit): its claim is given back uncounted"
                    );
                    let ours = held.give_back().await;
                    held = Held::Nothing;
                    giving.given(ours)
                }
                Next::Confirm(confirming) => {
                    let ours = match held.confirm().await {
                        Ok(ours) => Some(ours),
                        Err(e) => {
                            not_run = Some(e);
                            None
                        }
                    };
                    confirming.answered(rules, ours)
                }
                Next::Publish(mut publishing) => {
                    publishing.start(rules.lease, origin.time());
                    let stored = self
                        .publish_letter(message, delivery, &mut publishing, &mut held, origin)
                        .await;
                    publishing.stored(rules, stored)
                }
            };
        }
    }

    /// Logs and counts what the core noted.
    pub(super) fn note(&self, notes: impl Iterator<Item = Note>, not_run: Option<&StoreError>) {
        for note in notes {
            match note {
                Note::Count(outcome) => self.count(outcome),
                Note::LeaseLost(why) => self.lease_lost(why),
                Note::Reclaimed { from } => {
                    warn!(event = "reclaimed", previous_owner = %from, "took over an expired claim: its owner may have had its effect");
                    self.counters.count(Outcome::Reclaimed);
                }
                Note::NotRun => match not_run {
                    Some(error) => self.not_run_for(error),
                    None => self.count(Outcome::StoreUnavailable),
                },
            }
        }
    }

    /// Settles the message on the server; `processed`: a success (the
    /// fault injection's dropped acks and the end-to-end latency are
    /// successes').
    async fn settle(&self, message: &Message, settle: Settle, held: Held<'_>, processed: bool) {
        if processed {
            // Parsing the ack subject for the publish time is only worth it
            // when the histogram goes somewhere.
            #[cfg(feature = "metrics")]
            if let Ok(info) = message.info()
                && let Ok(waited) =
                    std::time::SystemTime::now().duration_since(info.published.into())
            {
                self.counters.observe(Latency::EndToEnd, waited);
            }
            if self.faults.drop_this_ack() {
                return;
            }
        }
        match settle {
            Settle::Ack => ack(message).await,
            Settle::AckRecorded => ack_recorded(message).await,
            Settle::Nak(delay) => {
                tracing::debug!(?delay, "NAKed");
                nak(message, delay).await;
            }
            Settle::AbandonThenNak(delay) => {
                warn!(
                    ?delay,
                    "the message is NAKed with its claim left as it is: a kept claim is taken over after its lease"
                );
                held.abandon().await;
                nak(message, delay).await;
            }
            Settle::Term => {
                if let Err(e) = message.ack_with(AckKind::Term).await {
                    warn!(error = %e, "could not terminate the original; its redelivery will find the key dead");
                }
            }
            // The message is whoever holds its claim now; or the run
            // apart, or alone, follows.
            Settle::Leave | Settle::Again | Settle::RunAlone => {}
        }
    }

    /// Logs, reports to the health probe and counts a run the store's
    /// failure prevented — for a delivery (NAKed) and a request (replied)
    /// alike.
    pub(super) fn not_run_for(&self, error: &StoreError) {
        warn!(error = %error, "dedup store unavailable: the handler was not run");
        self.status.store_failed(error);
        self.count(Outcome::StoreUnavailable);
    }

    /// The claim stopped being this worker's (why): the handler was stopped
    /// or its ending not written. The message is left alone — not
    /// acknowledged, retried, dead-lettered or terminated: it belongs to
    /// whoever holds the claim now (or to the next delivery, which takes
    /// the claim over after a lease, counted there as `reclaimed`).
    pub(super) fn lease_lost(&self, why: &'static str) {
        warn!(
            event = "lease_lost",
            why, "lease lost: the message is left to the claim's holder; the effect may run twice"
        );
        self.count(Outcome::LeaseLost);
    }

    /// Stores the dead letter `publishing` describes and awaits its PubAck,
    /// while the claim is kept up: every third of the lease an in-progress
    /// ack for the original and a renewal of the claim (for a transaction,
    /// a statement that keeps it from its idle timeout, which would free
    /// the row's lock for another payload; one that fails has its row
    /// secured on its own). `true`: stored.
    async fn publish_letter(
        &self,
        message: &Message,
        delivery: &Delivery,
        publishing: &mut Publishing,
        held: &mut Held<'_>,
        origin: Origin,
    ) -> bool {
        let code = publishing.reason();
        let error = publishing.error().to_owned();
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
        let reason = Reason {
            code,
            error: &error,
        };
        let work = dead_letter::publish(
            &self.js,
            &self.config,
            delivery,
            reason,
            publishing.attempts(),
            record,
        );
        let mut work = std::pin::pin!(work);
        let claims = publishing.hold() != crate::delivery_core::Hold::Nothing;
        let published = loop {
            let timer = origin.instant(publishing.upkeep_mut().timer());
            tokio::select! {
                done = &mut work => break done,
                () = sleep_until(timer) => {
                    let Some(renewal) = publishing.upkeep_mut().on_timer(origin.time()) else {
                        continue;
                    };
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "could not send an in-progress ack");
                    }
                    if !claims {
                        continue;
                    }
                    // Bounded like the run's renewals: a hung store must not
                    // hold back the in-progress acks that follow.
                    let renewed = held
                        .renewed_within(renewal.within, "while its dead letter is stored")
                        .await;
                    if !publishing.upkeep_mut().on_renewed(renewal, &renewed) {
                        warn!("the claim was taken over while its dead letter was being stored");
                    }
                    if publishing.must_secure(&renewed) {
                        warn!("keeping the key for its payload on its own");
                        held.secure().await;
                    }
                }
            }
        };
        match published {
            Ok(()) => {
                warn!(reason = %code, %error, subject = %self.config.dead_letter, "dead-lettered");
                true
            }
            Err(e) => {
                error!(error = %e, reason = %code, subject = %self.config.dead_letter, "could not store the dead letter; the message and its key are kept");
                false
            }
        }
    }
}
