//! Group commit for `dedup = transactional` (`batch > 1`): deliveries of a
//! handler that are ready at about the same time share one transaction —
//! one claim statement, one seal, one `COMMIT` (one WAL flush) — instead of
//! one each.
//!
//! A group forms around the first delivery that takes a seat and admits
//! others until it is full ([`HandlerConfig::group_size`]), or its linger
//! has passed and one of the handler's group slots is free — as many
//! groups run at once as the handler's concurrency fills, so that while
//! they run, the next one gathers the deliveries that arrive. Its driver
//! then begins the transaction, claims every key, and answers each seat;
//! the granted deliveries run their handlers concurrently in the one
//! transaction and vote. Every vote `Ok`: the results are sealed and the
//! group commits, once. Anything else — a handler's failure or panic, a
//! transaction a handler left aborted, a claim statement that met a lock
//! timeout or deadlock, a failed commit — and the group rolls back, so that
//! nothing of it committed, and each of its deliveries runs again alone
//! (the `batch = 1` path), where its own failure is counted and settled.
//! Exactly-once inside the database holds either way: an effect commits
//! only with its claim row.
//!
//! [`HandlerConfig::group_size`]: crate::handler::HandlerConfig::group_size

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore, oneshot};
use tracing::{debug, warn};

use super::backend::{Committed, commit_sealed, roll_back};

use crate::Tx;
use crate::claim::{Claim, Grant, Refusal};
use crate::delivery_core::Vote;
use crate::fingerprint::Fingerprint;
use crate::handler::HandlerConfig;
use crate::key::RecordKey;
use crate::store::{GroupLock, TxInbox};
use crate::tx::Slot;

/// The groups of one handler: the one open for new seats, and how many of
/// the handler's deliveries are on their way to a seat.
pub(crate) struct Groups {
    inbox: TxInbox,
    size: usize,
    linger: Duration,
    lease: Duration,
    retention: Duration,
    /// How many groups may run at once: as many as the permits fill. A
    /// group that cannot run yet keeps admitting members.
    running: Arc<Semaphore>,
    open: Mutex<Option<Arc<Group>>>,
}

/// One group: its transaction's slot, and its seats until it closes.
struct Group {
    slot: Slot,
    seats: Mutex<Seats>,
    /// Told when the group closed before its linger ran out.
    closed: Notify,
}

#[derive(Default)]
struct Seats {
    members: Vec<Member>,
    closed: bool,
}

struct Member {
    key: RecordKey,
    fingerprint: Option<Fingerprint>,
    answer: oneshot::Sender<Answer>,
}

/// What the group's driver answers a seat.
pub(crate) enum Answer {
    /// The group could not take this delivery (it could not begin or claim):
    /// run it alone.
    Alone,
    /// Its claim was refused: a duplicate, a dead or conflicting key, or a
    /// key held elsewhere. Nothing of the group's is the delivery's.
    Refused(Refusal),
    /// Claimed in the group's transaction: run the handler, then vote.
    Claimed(Claim, Ballot),
}

/// A granted delivery's say in its group's commit.
pub(crate) struct Ballot {
    vote: oneshot::Sender<Vote>,
    end: oneshot::Receiver<GroupEnd>,
}

/// How a group ended, for each of its granted deliveries.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum GroupEnd {
    /// Every effect and claim row committed: acknowledge.
    Committed,
    /// Nothing committed: run the delivery again, alone.
    RolledBack,
    /// Nothing committed: the delivery's handler returned `Ok` but left the
    /// transaction aborted (it ignored a failed statement). Only said when
    /// it was the group's one voter; with several, none can be blamed and
    /// each runs again alone, where its own commit tells.
    Aborted,
}

impl Ballot {
    /// Votes, and returns how the group ended.
    pub(crate) async fn vote(self, vote: Vote) -> GroupEnd {
        let _ = self.vote.send(vote);
        self.end.await.unwrap_or(GroupEnd::RolledBack)
    }
}

/// A lock that a panic elsewhere cannot poison for the runtime: the seats
/// are plain data, valid after any step.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Groups {
    /// The groups of a transactional handler; `None` when it commits every
    /// message alone (`batch = 1`, or `concurrency = 1`).
    pub(crate) fn for_handler(inbox: &TxInbox, config: &HandlerConfig) -> Option<Self> {
        let size = config.group_size();
        (size > 1).then(|| Self {
            inbox: inbox.clone(),
            size,
            linger: config.linger,
            lease: config.lease,
            retention: config.retention,
            running: Arc::new(Semaphore::new(config.concurrency.div_ceil(size))),
            open: Mutex::new(None),
        })
    }

    /// The inbox the groups' claim rows are in.
    pub(crate) fn inbox(&self) -> &TxInbox {
        &self.inbox
    }

    /// Seats a delivery whose handler arguments hold `tx` in the open group
    /// (opening one if there is none), binding `tx` to the group's
    /// transaction. `None`: the group has this key already — the delivery
    /// runs alone (and meets the group's row).
    pub(crate) fn seat(
        &self,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        tx: &Tx,
    ) -> Option<oneshot::Receiver<Answer>> {
        let mut open = lock(&self.open);
        // A group its driver closed (its linger ran out) admits nobody:
        // the next seat opens a new one.
        let current = open
            .as_ref()
            .filter(|group| !lock(&group.seats).closed)
            .cloned();
        let group = current.unwrap_or_else(|| {
            let group = Arc::new(Group {
                slot: Slot::default(),
                seats: Mutex::new(Seats::default()),
                closed: Notify::new(),
            });
            *open = Some(group.clone());
            tokio::spawn(self.driver(group.clone()));
            group
        });
        let mut seats = lock(&group.seats);
        // Closed in between by its driver, or holding this key already.
        if seats.closed
            || seats.members.iter().any(|member| member.key == *key)
            || !tx.bind(&group.slot)
        {
            return None;
        }
        let (answer, answered) = oneshot::channel();
        seats.members.push(Member {
            key: key.clone(),
            fingerprint,
            answer,
        });
        if seats.members.len() >= self.size {
            seats.closed = true;
            *open = None;
            group.closed.notify_one();
        }
        Some(answered)
    }

    /// The task that waits for the group to close, then claims, collects
    /// the votes and commits or rolls back.
    fn driver(&self, group: Arc<Group>) -> impl Future<Output = ()> + Send + 'static {
        let inbox = self.inbox.clone();
        let (linger, lease, retention) = (self.linger, self.lease, self.retention);
        let running = self.running.clone();
        async move {
            tokio::select! {
                () = group.closed.notified() => {}
                () = tokio::time::sleep(linger) => {}
            }
            // Still admitting while the groups before it run.
            let Ok(_running) = running.acquire_owned().await else {
                return;
            };
            let members = {
                let mut seats = lock(&group.seats);
                seats.closed = true;
                std::mem::take(&mut seats.members)
            };
            drive(&inbox, &group.slot, members, lease, retention).await;
        }
    }
}

/// Claims the members' keys in one transaction, answers each, collects the
/// granted ones' votes, and commits or rolls back.
async fn drive(
    inbox: &TxInbox,
    slot: &Slot,
    members: Vec<Member>,
    lease: Duration,
    retention: Duration,
) {
    let (keys, answers): (Vec<_>, Vec<_>) = members
        .into_iter()
        .map(|m| ((m.key, m.fingerprint), m.answer))
        .unzip();
    let alone = |answers: Vec<oneshot::Sender<Answer>>| {
        for answer in answers {
            let _ = answer.send(Answer::Alone);
        }
    };
    let transaction = match inbox.begin(lease, GroupLock::Shared).await {
        Ok(transaction) => transaction,
        Err(e) => {
            debug!(error = %e, "could not begin a group's transaction; its messages run alone");
            return alone(answers);
        }
    };
    *slot.lock().await = Some(transaction);
    let tx = Tx::bound_to(slot.clone());
    let claimed = match tx.conn().await {
        Ok(mut conn) => inbox.claim_group(&mut conn, &keys, lease, retention).await,
        Err(closed) => Err(sqlx::Error::Protocol(closed.to_string())),
    };
    let outcomes = match claimed {
        Ok(outcomes) if outcomes.len() == answers.len() => outcomes,
        Ok(_) => {
            roll_back(&tx).await;
            warn!(
                "a group's claim answered for a different number of keys; its messages run alone"
            );
            return alone(answers);
        }
        Err(e) => {
            debug!(error = %e, "a group's claim failed; its messages run alone");
            roll_back(&tx).await;
            return alone(answers);
        }
    };
    let mut voters = Vec::new();
    for ((key, _), (answer, outcome)) in keys.into_iter().zip(answers.into_iter().zip(outcomes)) {
        match outcome.split() {
            Ok(Grant::Claimed(claim) | Grant::Reclaimed { claim, .. }) => {
                let (vote, voted) = oneshot::channel();
                let (ended, end) = oneshot::channel();
                // A delivery gone before its answer votes no by its absence.
                let _ = answer.send(Answer::Claimed(claim, Ballot { vote, end }));
                voters.push((key, voted, ended));
            }
            Err(refused) => {
                let _ = answer.send(Answer::Refused(refused));
            }
        }
    }
    let mut results = Vec::with_capacity(voters.len());
    let mut all_commit = true;
    for (key, voted, _) in &mut voters {
        match voted.await {
            Ok(Vote::Commit { result }) => results.push((key.clone(), result)),
            // Gone before voting: its run ended without a word.
            Ok(Vote::RollBack) | Err(oneshot::error::RecvError { .. }) => all_commit = false,
        }
    }
    let end = if all_commit && !results.is_empty() {
        match commit(inbox, &tx, &results).await {
            GroupEnd::Aborted if results.len() > 1 => GroupEnd::RolledBack,
            end => end,
        }
    } else {
        roll_back(&tx).await;
        GroupEnd::RolledBack
    };
    debug!(claimed = voters.len(), ?end, "a group ended");
    for (_, _, ended) in voters {
        let _ = ended.send(end);
    }
}

/// Seals the group's claim rows with their results and commits. A failure
/// anywhere rolls the whole group back: its messages run again alone (a
/// commit whose outcome is unknown is safe to run again too — the row
/// either committed with its effect, and the rerun finds a duplicate, or
/// neither did).
async fn commit(inbox: &TxInbox, tx: &Tx, results: &[(RecordKey, Option<Bytes>)]) -> GroupEnd {
    let sealed = match tx.conn().await {
        Ok(mut conn) => inbox.seal_group(&mut conn, results).await,
        Err(_) => return GroupEnd::RolledBack,
    };
    match commit_sealed(tx, sealed).await {
        Committed::Yes => GroupEnd::Committed,
        Committed::Aborted(_) => {
            roll_back(tx).await;
            GroupEnd::Aborted
        }
        Committed::Failed(e) => {
            debug!(error = %e, "a group's transaction could not be sealed or committed; its messages run alone");
            GroupEnd::RolledBack
        }
    }
}
