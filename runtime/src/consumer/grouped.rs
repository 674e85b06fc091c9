//! One delivery of a handler that commits in groups (`dedup =
//! transactional`, `batch > 1`): seated in a group (`group.rs`), run in the
//! group's transaction, and — when the group rolls back — run again alone.
//! A lock conflict met in a group (a deadlock between groups, say) is the
//! grouping's doing, not the handler's: it costs no attempt.

use async_nats::jetstream::Message;
use tokio::time::Instant;
use tracing::{Span, field, warn};

use super::backend::Held;
use super::group::{Answer, GroupEnd, Groups};
use super::pipeline::Apart;
use super::pipeline::Origin;
use super::shared::{Ran, Shared, boxed, state_in};
use crate::delivery_core::{Arrival, GroupEnded, MemberRun, Settle};
use crate::handler::{Handler, prepare};
use crate::key::RecordKey;
use crate::store::{IGNORED_FAILED_STATEMENT, failed_for_another, met_lock_conflict};
use crate::{Delivery, Fence, HandlerError, Tx};

impl<H: Handler> Shared<H> {
    /// One delivery through a group commit: seated, claimed with the group,
    /// run in the group's transaction, acknowledged once the group
    /// committed — or run again alone if the group rolled back.
    pub(super) async fn process_in_group(
        &self,
        groups: &Groups,
        message: &Message,
        delivery: &Delivery,
    ) {
        let origin = Origin::now();
        let arrival = Arrival::new(delivery.delivered());
        let tx = Tx::unbound();
        let fence = self.takes_fence.then(Fence::unset);
        let state = state_in(&self.state, &tx, fence.as_ref());
        let prepared = prepare(&self.handler, delivery, &state);
        drop(state);
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(rejected) => {
                return boxed(self.rejected(message, delivery, &rejected)).await;
            }
        };
        Span::current().record("key", field::debug(&prepared.key));
        let key = RecordKey::new(&self.name, &prepared.key);
        let answer = match groups.seat(&key, prepared.fingerprint, &tx) {
            Some(seat) => seat.await.unwrap_or(Answer::Alone),
            None => Answer::Alone,
        };
        if !matches!(answer, Answer::Alone) {
            self.status.store_answered();
        }
        let (claim, ballot) = match answer {
            Answer::Claimed(claim, ballot) => (claim, ballot),
            Answer::Refused(refusal) => {
                let claiming = arrival.claiming(origin.time(), false);
                let step = boxed(self.refused(message, &claiming, refusal, prepared.args)).await;
                self.drive(message, delivery, step, Held::Nothing, origin, None)
                    .await;
                return;
            }
            Answer::Alone => {
                drop(prepared);
                return boxed(self.process_alone(message, delivery, Apart::Beside)).await;
            }
        };
        if let Some(fence) = &fence {
            fence.set(claim.revision);
        }
        let mut held = Held::Tx {
            tx,
            claim: claim.clone(),
            inbox: groups.inbox(),
        };
        let (attempt, ran) = self
            .run_attempt(
                Some(message),
                delivery,
                &mut held,
                Instant::now(),
                prepared.args,
            )
            .await;
        // The group commits or rolls back the transaction: nothing of it
        // is this delivery's to end.
        drop(held);
        let run = match &ran {
            Ran::Returned(output) => MemberRun::Returned {
                result: self.stored_result(output),
            },
            Ran::Failed(error) => MemberRun::Failed {
                error,
                lock_conflict: met_lock_conflict(error),
                for_another: failed_for_another(error),
            },
            Ran::Stopped(stopped) => MemberRun::Stopped(*stopped),
        };
        let aborted = HandlerError::retryable(IGNORED_FAILED_STATEMENT);
        let ended = match ballot.vote(run.vote()).await {
            GroupEnd::Committed => GroupEnded::Committed,
            GroupEnd::RolledBack => GroupEnded::RolledBack,
            GroupEnd::Aborted => GroupEnded::Aborted { error: &aborted },
        };
        if let MemberRun::Failed { error, .. } = &run {
            warn!(%error, attempt, "handler failed in its group");
        }
        let step = arrival.after_group(
            &self.rules,
            attempt,
            ended,
            &run,
            self.hard_stop.is_cancelled(),
        );
        drop(run);
        // Its own failure with attempts left is released on its own (its
        // row's ending written alone; a released key is free to the next
        // claim either way).
        let held = Held::RolledBack {
            claim,
            inbox: groups.inbox(),
        };
        if let Settle::RunAlone =
            boxed(self.drive(message, delivery, step, held, origin, None)).await
        {
            boxed(self.process_alone(message, delivery, Apart::Beside)).await;
        }
    }
}
