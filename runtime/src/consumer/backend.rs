//! The three dedup levels behind one interface: where a delivery's claim
//! is made, and what completing, releasing or dead-lettering it means.
//!
//! The pipeline (`pipeline.rs`) is written once against [`Backend`],
//! [`Claimer`] and [`Held`]; each level differs only here, and a claim is
//! held by the store that granted it — no pair of a claim and another
//! level's store can be formed:
//!
//! | step       | `Off`   | `Kv`                       | `Transactional`                           |
//! |------------|---------|----------------------------|-------------------------------------------|
//! | claim      | —       | create / CAS in the bucket | row in the handler's transaction          |
//! | renew      | —       | CAS, every lease / 3       | `SELECT 1` (the server ends an idle one)  |
//! | complete   | —       | CAS to `done`              | seal the row, `COMMIT`                    |
//! | release    | —       | CAS to `released`          | back to the savepoint, row `released` with the attempt, `COMMIT` |
//! | keep (dead letter not stored) | — | left pending   | back to the savepoint, row `pending` with the payload, `COMMIT` |
//! | mark dead  | —       | CAS to `dead`              | back to the savepoint, row `dead` with the payload, `COMMIT` |
//! | cut off    | —       | kept pending (a takeover is counted) | `ROLLBACK` (nothing committed) |
//!
//! Under group commit (`group.rs`) a delivery's claim row is in its group's
//! transaction: the group completes it; a failed run's group rolls back,
//! and its ending is written on its own ([`Held::RolledBack`]).

use bytes::Bytes;
use tracing::warn;

use crate::Delivery;
use crate::claim::{Claim, ClaimOutcome, Ending, Transition};
use crate::delivery_core::{Recorded, Renewed};
use crate::fingerprint::Fingerprint;
use crate::key::RecordKey;
#[cfg(feature = "postgres")]
use crate::store::StoreOp;
use crate::store::{DedupStore, GroupLock, KvStore, StoreError, StoreLocation};

/// Where a handler's claims live.
pub(crate) enum Backend {
    /// `dedup = off`: no claims.
    Off,
    /// `dedup = kv`: the claim bucket (boxed: the store's handle is large,
    /// and the other levels would carry its size).
    Kv(Box<KvStore>),
    /// `dedup = transactional`: the inbox table, in the handler's transaction.
    #[cfg(feature = "postgres")]
    Transactional(crate::store::TxInbox),
}

impl Backend {
    /// Where the claims are, as dead letters name it (`Idem-Store`):
    /// `kv:<bucket>` or `postgres:<schema>`; none without claims.
    pub(crate) fn location(&self) -> Option<StoreLocation> {
        match self {
            Backend::Off => None,
            Backend::Kv(store) => Some(StoreLocation::Kv {
                bucket: store.map().name().to_owned(),
            }),
            #[cfg(feature = "postgres")]
            Backend::Transactional(inbox) => Some(StoreLocation::Postgres {
                schema: inbox.schema.clone(),
            }),
        }
    }
}

/// What a delivery begins with, before its arguments are made: nothing to
/// claim (`dedup = off`), or the claimer of its level — for
/// `transactional`, with the transaction begun for it.
pub(crate) enum Begun<'b> {
    /// `dedup = off`: the handler runs without a claim.
    Unclaimed,
    /// The claim is to be made here.
    Claims(Claimer<'b>),
}

/// Where a delivery's claim is made: the level's store, and for
/// `transactional` the delivery's own transaction. Each claim it grants is
/// held in the same place ([`Claimer::hold`]), so that no claim is ever
/// carried to another level's store.
pub(crate) enum Claimer<'b> {
    /// The claim bucket.
    Kv(&'b KvStore),
    /// The inbox table, in the transaction begun for the delivery.
    #[cfg(feature = "postgres")]
    Tx {
        /// The transaction, shared with the handler's `Tx` argument.
        tx: crate::Tx,
        /// The inbox.
        inbox: &'b crate::store::TxInbox,
    },
}

/// What a delivery holds while its handler runs. A held claim carries the
/// store it was granted by: every transition goes back there.
pub(crate) enum Held<'b> {
    /// Nothing to hold (`dedup = off`, or a delivery that never got a claim).
    Nothing,
    /// A claim in the bucket.
    Kv {
        /// The claim.
        claim: Claim,
        /// The bucket that granted it.
        store: &'b KvStore,
    },
    /// The claim row in the open transaction.
    #[cfg(feature = "postgres")]
    Tx {
        /// The transaction, shared with the handler's `Tx` argument.
        tx: crate::Tx,
        /// The claim row.
        claim: Claim,
        /// The inbox the row is in.
        inbox: &'b crate::store::TxInbox,
    },
    /// A claim row whose transaction ended without it: a group commit
    /// rolled back after this delivery's handler failed, or the
    /// transaction was given up while a dead letter was stored. Its ending
    /// is written on its own.
    #[cfg(feature = "postgres")]
    RolledBack {
        /// The claim row.
        claim: Claim,
        /// The inbox the row is in.
        inbox: &'b crate::store::TxInbox,
    },
}

/// What completing a held claim came to.
pub(crate) enum Completion {
    /// Recorded: acknowledge.
    Recorded,
    /// The claim had moved on to another owner: the effect may have run
    /// twice (count `lease_lost`); acknowledge.
    LeaseLost,
    /// The handler's transaction was aborted by a statement it ignored:
    /// nothing committed; a failed attempt.
    #[cfg_attr(
        not(feature = "postgres"),
        expect(dead_code, reason = "transactional only")
    )]
    Aborted(crate::BoxError),
    /// Not recorded, outcome known to be safe to redeliver (store down past
    /// the shutdown deadline, commit failed, the run's transaction rolled
    /// back): NAK.
    #[cfg_attr(
        not(feature = "postgres"),
        expect(dead_code, reason = "transactional only")
    )]
    NotRecorded(crate::BoxError),
}

impl Backend {
    /// Begins what the handler's arguments need before the claim: the
    /// transaction of `dedup = transactional`, its waits bounded by `lease`,
    /// standing to group commit as `group` says.
    pub(crate) async fn begin(
        &self,
        lease: std::time::Duration,
        group: GroupLock,
    ) -> Result<Begun<'_>, StoreError> {
        let _ = (lease, group);
        match self {
            Backend::Off => Ok(Begun::Unclaimed),
            Backend::Kv(store) => Ok(Begun::Claims(Claimer::Kv(store))),
            #[cfg(feature = "postgres")]
            Backend::Transactional(inbox) => inbox
                .begin(lease, group)
                .await
                .map(|open| {
                    Begun::Claims(Claimer::Tx {
                        tx: crate::Tx::new(open),
                        inbox,
                    })
                })
                .map_err(|e| StoreError::unavailable(StoreOp::Create, e)),
        }
    }
}

impl Begun<'_> {
    /// The transaction begun, if any (handed to `Tx` arguments).
    #[cfg(feature = "postgres")]
    pub(crate) fn tx(&self) -> Option<&crate::Tx> {
        match self {
            #[cfg(feature = "postgres")]
            Begun::Claims(Claimer::Tx { tx, .. }) => Some(tx),
            Begun::Unclaimed | Begun::Claims(Claimer::Kv(_)) => None,
        }
    }

    /// Rolls back a transaction begun for a delivery that never ran its
    /// handler.
    pub(crate) async fn discard(self) {
        if let Begun::Claims(claimer) = self {
            claimer.discard().await;
        }
    }
}

impl<'b> Claimer<'b> {
    /// Claims `key`.
    pub(crate) async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        config: &crate::handler::HandlerConfig,
    ) -> Result<ClaimOutcome, StoreError> {
        match self {
            // Boxed: a delivery's task lives as long as its handler runs,
            // and would otherwise carry the store's state all that time.
            Claimer::Kv(store) => Box::pin(store.claim(key, fingerprint, config.lease)).await,
            #[cfg(feature = "postgres")]
            Claimer::Tx { tx, inbox } => {
                let mut conn = tx
                    .conn()
                    .await
                    .map_err(|e| StoreError::unavailable(StoreOp::Create, e))?;
                Box::pin(inbox.claim(&mut conn, key, fingerprint, config.lease, config.retention))
                    .await
            }
        }
    }

    /// Holds `claim`, which this claimer granted.
    pub(crate) fn hold(self, claim: Claim) -> Held<'b> {
        match self {
            Claimer::Kv(store) => Held::Kv { claim, store },
            #[cfg(feature = "postgres")]
            Claimer::Tx { tx, inbox } => Held::Tx { tx, claim, inbox },
        }
    }

    /// Rolls back the transaction begun for a delivery whose claim was
    /// refused or failed.
    pub(crate) async fn discard(self) {
        match self {
            Claimer::Kv(_) => {}
            #[cfg(feature = "postgres")]
            Claimer::Tx { tx, .. } => roll_back(&tx).await,
        }
    }
}

impl Held<'_> {
    /// The attempt this run is: the handler's runs counted in the claim
    /// record; JetStream's delivery count where there is none.
    pub(crate) fn attempt(&self, delivery: &Delivery) -> u32 {
        match self.claim() {
            None => u32::try_from(delivery.delivered()).unwrap_or(u32::MAX),
            Some(claim) => claim.attempt,
        }
    }

    /// The claim, if any.
    pub(crate) fn claim(&self) -> Option<&Claim> {
        match self {
            Held::Nothing => None,
            Held::Kv { claim, .. } => Some(claim),
            #[cfg(feature = "postgres")]
            Held::Tx { claim, .. } | Held::RolledBack { claim, .. } => Some(claim),
        }
    }

    /// Whether the claim is fenced by its lease: a bucket's claim is
    /// another worker's to take over once it runs out; a transaction's
    /// row stays locked while the transaction lives.
    pub(crate) fn fenced(&self) -> bool {
        match self {
            Held::Kv { .. } => true,
            Held::Nothing => false,
            #[cfg(feature = "postgres")]
            Held::Tx { .. } | Held::RolledBack { .. } => false,
        }
    }

    /// Extends the lease. A KV claim is renewed by CAS. A transaction holds
    /// its row by itself, but the server ends one that stays idle for a
    /// lease (so that a frozen worker cannot block its keys): a statement
    /// on it tells the server this worker lives — unless the handler holds
    /// the connection right now, in which case it is the handler's to use.
    /// Nothing held, or a row whose transaction ended, has no lease to
    /// extend.
    pub(crate) async fn renew(&mut self) -> Result<Transition, StoreError> {
        match self {
            Held::Kv { claim, store } => Box::pin(store.renew(claim)).await,
            #[cfg(feature = "postgres")]
            Held::Tx { tx, .. } => {
                if let Some(mut conn) = tx.try_conn() {
                    sqlx::query("SELECT 1")
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| StoreError::unavailable(StoreOp::Update, e))?;
                }
                Ok(Transition::Applied)
            }
            Held::Nothing => Ok(Transition::Applied),
            #[cfg(feature = "postgres")]
            Held::RolledBack { .. } => Ok(Transition::Applied),
        }
    }

    /// Renews the claim ([`renew`](Self::renew)) within `within` — a
    /// renewal period, whatever the store's own timeout: the next renewal
    /// follows then — as the core's upkeep takes the answer. `while_`: what
    /// the renewal keeps up, for the logs.
    pub(crate) async fn renewed_within(
        &mut self,
        within: std::time::Duration,
        while_: &'static str,
    ) -> Renewed {
        match tokio::time::timeout(within, self.renew()).await {
            Ok(Ok(transition)) => Renewed::Answered(transition),
            Ok(Err(e)) => {
                warn!(error = %e, "could not renew the claim {while_}");
                Renewed::Failed
            }
            Err(_) => {
                warn!(?within, "a renewal {while_} took longer than its period");
                Renewed::Failed
            }
        }
    }

    /// Records completion with the handler's result, once, and gives the
    /// answer as the core takes it; `aborted` keeps the failure an aborted
    /// transaction counts as.
    pub(crate) async fn recorded<'e>(
        &self,
        result: Option<Bytes>,
        aborted: &'e mut Option<crate::HandlerError>,
    ) -> Recorded<'e> {
        match self.complete(result).await {
            Ok(Completion::Recorded) => Recorded::Yes,
            Ok(Completion::LeaseLost) => Recorded::LeaseLost,
            Ok(Completion::Aborted(e)) => {
                let error = aborted.insert(crate::HandlerError::retryable(e));
                warn!(%error, "the handler's transaction did not commit");
                Recorded::Aborted { error }
            }
            Ok(Completion::NotRecorded(e)) => {
                warn!(error = %e, "completion was not recorded; it is safe to run again");
                Recorded::No { why: e.to_string() }
            }
            Err(e) => {
                warn!(error = %e, "could not record completion; retrying");
                Recorded::StoreFailed
            }
        }
    }

    /// Records completion with the handler's result, once. (Retries of a
    /// KV completion are the pipeline's: they keep the message in progress.)
    /// Nothing held has nothing to record; a row whose transaction rolled
    /// back cannot record its run, which never committed.
    pub(crate) async fn complete(&self, result: Option<Bytes>) -> Result<Completion, StoreError> {
        match self {
            Held::Kv { claim, store } => match Box::pin(store.complete(claim, result)).await? {
                Transition::Applied => Ok(Completion::Recorded),
                Transition::LeaseLost { .. } => Ok(Completion::LeaseLost),
            },
            #[cfg(feature = "postgres")]
            Held::Tx { tx, claim, inbox } => Ok(Box::pin(commit(inbox, tx, claim, result)).await),
            Held::Nothing => Ok(Completion::Recorded),
            #[cfg(feature = "postgres")]
            Held::RolledBack { .. } => Ok(Completion::NotRecorded(
                "the run's transaction rolled back: nothing of it committed".into(),
            )),
        }
    }

    /// Ends the claim as the delivery core says (`claim::Ending`): released
    /// after a failed attempt (the next delivery takes it at once, the
    /// attempt kept), kept for its payload while its dead letter cannot be
    /// stored, or dead after its letter was stored. A CAS in the bucket (a
    /// kept claim is left pending); for a transaction, a rollback to the
    /// savepoint after the claim and the row's new state committed in the
    /// same transaction. `false`: the claim had been taken over — the
    /// message is the new owner's (no NAK, no Term). Nothing held ends at
    /// once.
    pub(crate) async fn end(self, end: Ending) -> bool {
        match self {
            Held::Kv { claim, store } => {
                let ended = match end {
                    Ending::Released => store.release(&claim).await,
                    // Left pending: it runs out after a lease, and only
                    // this payload may take it over then.
                    Ending::Kept => Ok(Transition::Applied),
                    Ending::Dead => store.mark_dead(&claim).await,
                };
                let lost = matches!(ended, Ok(Transition::LeaseLost { .. }));
                log_transition(end.what(), ended);
                !lost
            }
            #[cfg(feature = "postgres")]
            Held::Tx { tx, claim, inbox } => {
                // In the run's own transaction, its effects rolled back:
                // the key is never free in between.
                if let Err(e) = inbox.end_in(&tx, &claim, end).await {
                    // The transaction is gone (aborted past its savepoint,
                    // its connection lost): write the ending on its own.
                    warn!(error = %e, "could not {} in the handler's transaction; writing it on its own", end.what());
                    roll_back(&tx).await;
                    end_alone(inbox, &claim, end).await;
                }
                true
            }
            #[cfg(feature = "postgres")]
            Held::RolledBack { claim, inbox } => {
                end_alone(inbox, &claim, end).await;
                true
            }
            Held::Nothing => true,
        }
    }

    /// After a failed renewal while the claim must stay this payload's (a
    /// dead letter being stored): a transaction that may be gone — its
    /// session ended, the row's lock and an uncommitted claim with it — is
    /// given up, and the row written on its own as kept for this payload,
    /// so that no other payload claims the key meanwhile. Its ending is
    /// then written on its own too ([`Held::RolledBack`]). A KV claim needs
    /// nothing: it stays pending until its lease runs out.
    pub(crate) async fn secure(&mut self) {
        #[cfg(feature = "postgres")]
        if let Held::Tx { tx, claim, inbox } = &*self {
            roll_back(tx).await;
            end_alone(inbox, claim, Ending::Kept).await;
            *self = Held::RolledBack {
                claim: claim.clone(),
                inbox,
            };
        }
    }

    /// Whether the claim is still this worker's, confirmed by the store
    /// (a renewal) before an irreversible step such as a dead letter.
    /// `Err`: the store could not say. A transaction is this worker's
    /// until it ends; a row written on its own ends only for its payload.
    pub(crate) async fn confirm(&mut self) -> Result<bool, StoreError> {
        match self {
            Held::Kv { claim, store } => match Box::pin(store.renew(claim)).await? {
                Transition::Applied => Ok(true),
                Transition::LeaseLost { .. } => Ok(false),
            },
            Held::Nothing => Ok(true),
            #[cfg(feature = "postgres")]
            Held::Tx { .. } | Held::RolledBack { .. } => Ok(true),
        }
    }

    /// Gives back a claim whose run does not count — a handler that never
    /// started, or a run that met a lock conflict group commit may have
    /// caused: released with the attempt it counted taken off, still its
    /// payload's (in the bucket: a compare-and-set on its revision; in a
    /// transaction: rolled back to the savepoint after the claim, the row
    /// `released` committed with its lock held throughout, so that no other
    /// payload takes the key meanwhile). `false`: a reader had taken the
    /// key over, and nothing was written.
    pub(crate) async fn give_back(self) -> bool {
        match self {
            Held::Kv { claim, store } => {
                let given = store.release(&claim.given_back()).await;
                let lost = matches!(given, Ok(Transition::LeaseLost { .. }));
                log_transition("give the claim back", given);
                !lost
            }
            #[cfg(feature = "postgres")]
            Held::Tx { tx, claim, inbox } => {
                let unrun = claim.given_back();
                if let Err(e) = inbox.end_in(&tx, &unrun, Ending::Released).await {
                    warn!(error = %e, "could not give the claim back in its transaction; writing it on its own");
                    roll_back(&tx).await;
                    end_alone(inbox, &unrun, Ending::Released).await;
                }
                true
            }
            #[cfg(feature = "postgres")]
            Held::RolledBack { claim, inbox } => {
                end_alone(inbox, &claim.given_back(), Ending::Released).await;
                true
            }
            Held::Nothing => true,
        }
    }

    /// Leaves the claim as the shutdown deadline found it. A KV claim stays
    /// pending: the handler may have had its effect, so the next owner takes
    /// it over only after the lease, and counts it (`reclaimed`). A
    /// transaction is rolled back: nothing of it committed.
    pub(crate) async fn abandon(self) {
        #[cfg(feature = "postgres")]
        if let Held::Tx { tx, .. } = self {
            roll_back(&tx).await;
        }
    }
}

fn log_transition(what: &str, result: Result<Transition, StoreError>) {
    match result {
        Ok(Transition::Applied) => {}
        Ok(lost @ Transition::LeaseLost { .. }) => {
            warn!(?lost, "could not {what}: the claim was taken over")
        }
        Err(e) => warn!(error = %e, "could not {what}; the lease frees it when it ends"),
    }
}

/// Seals the claim row and commits. A statement on the row fails in an
/// aborted transaction: then nothing commits and the attempt failed.
#[cfg(feature = "postgres")]
async fn commit(
    inbox: &crate::store::TxInbox,
    tx: &crate::Tx,
    claim: &Claim,
    result: Option<Bytes>,
) -> Completion {
    let sealed = match tx.conn().await {
        Ok(mut conn) => inbox.seal(&mut conn, &claim.key, result).await,
        Err(closed) => return Completion::NotRecorded(closed.into()),
    };
    match commit_sealed(tx, sealed).await {
        Committed::Yes => Completion::Recorded,
        // Left open: the failed run's ending rolls back to the savepoint
        // after the claim, which recovers an aborted transaction.
        Committed::Aborted(e) => {
            Completion::Aborted(format!("{}: {e}", crate::store::IGNORED_FAILED_STATEMENT).into())
        }
        // Unknown outcome if the commit itself failed: the redelivery
        // finds the row (duplicate) or not (runs again) — never both effects.
        Committed::Failed(e) => Completion::NotRecorded(e),
    }
}

/// How sealing and committing a transaction went.
#[cfg(feature = "postgres")]
pub(crate) enum Committed {
    /// Committed.
    Yes,
    /// A handler left the transaction aborted; nothing committed, and the
    /// transaction is left open for its caller to roll back (to a
    /// savepoint, or all of it).
    Aborted(sqlx::Error),
    /// The seal or the commit failed; the transaction is rolled back or
    /// gone.
    Failed(crate::BoxError),
}

/// Commits `tx` after its seal (`sealed`), for one message's transaction
/// and for a group's alike.
#[cfg(feature = "postgres")]
pub(crate) async fn commit_sealed(
    tx: &crate::Tx,
    sealed: Result<(), crate::store::SealError>,
) -> Committed {
    use crate::store::SealError;
    match sealed {
        Ok(()) => {}
        Err(SealError::Aborted(e)) => return Committed::Aborted(e),
        Err(SealError::Database(e)) => {
            roll_back(tx).await;
            return Committed::Failed(e.into());
        }
    }
    match tx.take().await {
        Some(open) => match open.commit().await {
            Ok(()) => Committed::Yes,
            Err(e) => Committed::Failed(e.into()),
        },
        None => Committed::Failed(crate::tx::TxClosed.into()),
    }
}

/// Writes a claim row's ending in a transaction of its own.
#[cfg(feature = "postgres")]
async fn end_alone(inbox: &crate::store::TxInbox, claim: &Claim, end: Ending) {
    match inbox.end_alone(claim, end).await {
        Ok(true) => {}
        Ok(false) => warn!(
            "could not {}: the key is completed, dead, or another payload's since this run's transaction ended",
            end.what()
        ),
        Err(e) => {
            warn!(error = %e, "could not {}; a redelivery counts from the last recorded attempt (a dead letter is published again under the same id)", end.what())
        }
    }
}

/// Rolls the message's transaction back, if it is still open.
#[cfg(feature = "postgres")]
pub(crate) async fn roll_back(tx: &crate::Tx) {
    if let Some(open) = tx.take().await
        && let Err(e) = open.rollback().await
    {
        warn!(error = %e, "rollback failed; the connection discards the transaction");
    }
}

#[cfg(all(test, feature = "testing", feature = "postgres"))]
mod tests {
    use super::Held;
    use crate::claim::ClaimOutcome;
    use crate::fingerprint::Fingerprint;
    use crate::key::{HandlerName, IdempotencyKey, RecordKey};
    use crate::store::TxInbox;
    use crate::testing::TestDatabase;

    /// X's first run met a lock conflict beside group commit and runs
    /// again apart from the groups — possibly after a wait. Its claim is
    /// given back uncounted, but the key stays X's meanwhile: payload Y
    /// reusing it is a conflict, and X's next run is still its first
    /// attempt.
    #[tokio::test]
    async fn a_claim_given_back_after_a_lock_conflict_keeps_the_key_its_payloads_uncounted() {
        let db = TestDatabase::create().await.expect("PostgreSQL");
        let inbox = TxInbox::open(db.pool().clone(), db.schema())
            .await
            .expect("inbox");
        let key = RecordKey::new(
            &HandlerName::new("h").expect("name"),
            &IdempotencyKey::new("k").expect("key"),
        );
        let (x, y) = (Fingerprint::of(b"X"), Fingerprint::of(b"Y"));
        let (tx, ClaimOutcome::Claimed(claimed)) = inbox.claim_in_a_transaction(&key, x).await
        else {
            panic!("a fresh key is free");
        };
        assert!(
            Held::Tx {
                tx,
                claim: claimed,
                inbox: &inbox
            }
            .give_back()
            .await
        );
        let (tx, outcome) = inbox.claim_in_a_transaction(&key, y).await;
        if let Some(open) = tx.take().await {
            open.rollback().await.expect("Y's claim rolled back");
        }
        assert!(
            matches!(outcome, ClaimOutcome::KeyConflict { .. }),
            "another payload took the key X gave back: {outcome:?}"
        );
        let (tx, outcome) = inbox.claim_in_a_transaction(&key, x).await;
        if let Some(open) = tx.take().await {
            open.rollback().await.expect("X's claim rolled back");
        }
        match outcome {
            ClaimOutcome::Claimed(again) => assert_eq!(again.attempt(), 1),
            other => panic!("X could not claim its key again: {other:?}"),
        }
    }
}
