//! A group member's decisions under group commit (`dedup = transactional`,
//! `batch > 1`): its vote on the group's commit, and what its run comes to
//! once the group ended. The group itself — seats, the shared claim
//! statement, the commit — is `consumer/group.rs`'s I/O.

use bytes::Bytes;

use super::{Arrival, Hold, Note, Outcome, Rules, Settle, Step, Stopped, failed, interrupted};
use crate::HandlerError;
use crate::delivery_core::pacing::{Failure, after_failure};

/// What a granted member's run says about its group's commit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Vote {
    /// Its handler returned `Ok`: commit, storing `result` with its claim.
    Commit {
        /// The handler's stored result (`store_result`), if any.
        result: Option<Bytes>,
    },
    /// Its handler failed, panicked, was cut off or fenced: roll the group
    /// back. (A member gone before it voted counts as this.)
    RollBack,
}

/// How a member's run in its group's transaction ended.
#[derive(Clone, Debug)]
pub enum MemberRun<'a> {
    /// It returned `Ok`.
    Returned {
        /// What to store with its completion.
        result: Option<Bytes>,
    },
    /// It failed. `lock_conflict`: a deadlock, serialization failure or
    /// lock timeout (the grouping's doing); `for_another`: its statement
    /// failed only because another member had aborted the transaction.
    Failed {
        /// The failure.
        error: &'a HandlerError,
        /// Whether it is a lock conflict.
        lock_conflict: bool,
        /// Whether another member's failure caused it.
        for_another: bool,
    },
    /// It was stopped before it ended.
    Stopped(Stopped),
}

impl MemberRun<'_> {
    /// Its vote.
    pub fn vote(&self) -> Vote {
        match self {
            MemberRun::Returned { result } => Vote::Commit {
                result: result.clone(),
            },
            MemberRun::Failed { .. } | MemberRun::Stopped(_) => Vote::RollBack,
        }
    }
}

/// How the member's group ended.
#[derive(Clone, Copy, Debug)]
pub enum GroupEnded<'a> {
    /// Every effect and claim row committed.
    Committed,
    /// Nothing committed.
    RolledBack,
    /// Nothing committed: this member, the group's one voter, returned `Ok`
    /// but left the transaction aborted (`error` says so) — its own failure.
    Aborted {
        /// The failure it counts as.
        error: &'a HandlerError,
    },
}

impl Arrival {
    /// What member run `run` (attempt `attempt`) comes to once its group
    /// ended `ended`; `shutting_down`: the shutdown deadline has passed.
    ///
    /// Committed: acknowledged. Its own failure with attempts left: counted
    /// and released on its own (its row's ending written alone). Its last
    /// failure, another member's, a lock conflict (the grouping's doing,
    /// not counted) or the group's commit: run again alone
    /// ([`Settle::RunAlone`]) — for a last failure because the key must
    /// stay its payload's from the failure to the dead mark, which only a
    /// transaction of its own can promise; the group's run was never
    /// recorded, so it is the same attempt.
    pub fn after_group(
        self,
        rules: &Rules,
        attempt: u32,
        ended: GroupEnded<'_>,
        run: &MemberRun<'_>,
        shutting_down: bool,
    ) -> Step {
        let own = match (ended, run) {
            (GroupEnded::Committed, _) => {
                return Step::settle(Settle::AckRecorded, &[Note::Count(Outcome::Processed)]);
            }
            (_, MemberRun::Stopped(Stopped::CutOff)) => return interrupted(rules, Hold::Nothing),
            _ if shutting_down => return interrupted(rules, Hold::Nothing),
            (GroupEnded::Aborted { error }, _) => Some(error),
            (
                GroupEnded::RolledBack,
                MemberRun::Failed {
                    lock_conflict: true,
                    ..
                },
            ) => {
                return Step::settle(Settle::RunAlone, &[Note::Count(Outcome::LockConflict)]);
            }
            (
                GroupEnded::RolledBack,
                MemberRun::Failed {
                    error,
                    for_another: false,
                    ..
                },
            ) => Some(&**error),
            (
                GroupEnded::RolledBack,
                MemberRun::Failed {
                    for_another: true, ..
                }
                | MemberRun::Returned { .. }
                | MemberRun::Stopped(_),
            ) => None,
        };
        match own {
            Some(error) => match after_failure(&rules.retry, error, attempt) {
                Failure::Retry(_) => failed(rules, error, attempt, Hold::Locked, self.delivered),
                Failure::DeadLetter(_) => Step::settle(Settle::RunAlone, &[]),
            },
            None => Step::settle(Settle::RunAlone, &[]),
        }
    }
}
