//! One delivery as a state machine without I/O: every decision the runtime
//! makes about a message from its claim to its settlement, and nothing it
//! does. It reads no clock (time comes in as [`Time`]), touches no store
//! and sends nothing; each state is a type whose methods take the answer
//! to the I/O it asked for and return the next [`Step`]: what to do now
//! ([`Next`]) and what to count ([`Note`]s). The runtime (`consumer/`)
//! drives it over async-nats and sqlx, [`testing::Driver`] over a
//! [`MemoryStore`] with simulated time, the model checker (`checker/`) over
//! its simulated store and broker — one set of decisions, three executors,
//! as `quinn-proto` is to `quinn`.
//!
//! ```text
//!  arrival ──rejected──────────────────────────────▶ dead letter (no claim) ─┐
//!     │ ──busy here / store down──────────────────▶ Nak                      │
//!     ▼                                                                      │
//!  Claiming ──refused: duplicate / dead─────────▶ AckRecorded (hook first)   │
//!     │  ──refused: in flight / store down──────▶ Nak                        │
//!     │  ──refused: key conflict────────────────▶ dead letter (no claim) ────┤
//!     ▼ granted (reclaimed: counted)                                         │
//!  Running ⟲ upkeep: renew + progress every lease/3, fenced at its deadline  │
//!     │ ──returned────────▶ Completing ──recorded / lease lost──▶ AckRecorded│
//!     │                        │ ⟲ store down: pause, again                  │
//!     │                        │ ──aborted──▶ (failed)  ──not recorded──▶ Nak│
//!     │ ──failed: retry───▶ Closing(released) ──ours──▶ Nak(policy's delay)  │
//!     │ ──failed: give up─▶ Confirming ──ours──▶ Publishing ⟲ upkeep ◀───────┘
//!     │                                           │ ──stored──▶ Closing(dead) ──ours──▶ Term
//!     │                                           │ ──failed──▶ Closing(kept) ──ours──▶ Nak
//!     │ ──lock conflict beside groups──▶ GivingBack ──▶ Again (apart, uncounted)
//!     │ ──fenced before its first step──▶ GivingBack ──ours──▶ Nak
//!     │ ──fenced after / taken over────▶ Leave (the message is the new owner's)
//!     │ ──cut off at shutdown──────────▶ AbandonThenNak
//!  every "not ours" (a CAS that found the claim taken over) ─▶ Leave
//! ```
//!
//! Group commit's members vote and settle here too (`group.rs`); the
//! group's shared transaction — seats, one claim statement, one commit — is
//! `consumer/group.rs`'s I/O. A request of a request/reply service takes
//! the same claim, and its end is a reply: [`request`].
//!
//! [`testing::Driver`]: crate::testing
//! [`MemoryStore`]: crate::store::MemoryStore

mod group;
mod outcome;
mod pacing;
pub mod request;
mod upkeep;

use std::time::Duration;

pub use group::{GroupEnded, MemberRun, Vote};
pub use outcome::Outcome;
pub use pacing::{
    Failure, MIN_NAK_DELAY, after_failure, completion_pause, in_flight_delay, store_backoff,
};
pub use upkeep::{Renewal, Renewed, Time, Upkeep, renewal_period};

use crate::HandlerError;
use crate::claim::{Ending, Grant, Owner, Refusal};
use crate::handler::{DeadLetterReason, Dedup, HandlerConfig, OnMissingKey};
use crate::retry::Retry;
use bytes::Bytes;

/// What the core needs of a handler's configuration.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The claim's lease.
    pub lease: Duration,
    /// The handler's retry policy.
    pub retry: Retry,
    /// Where its claims are.
    pub level: Dedup,
    /// Whether duplicates are handed to an `on_duplicate` hook.
    pub on_duplicate: bool,
    /// What a delivery without a key comes to.
    pub on_missing_key: OnMissingKey,
}

impl Rules {
    /// The rules of a handler configured as `config`.
    pub fn of(config: &HandlerConfig) -> Self {
        Self {
            lease: config.lease,
            retry: config.retry.clone(),
            level: config.dedup,
            on_duplicate: config.on_duplicate,
            on_missing_key: config.on_missing_key,
        }
    }

    /// What a granted claim holds at this level.
    fn hold(&self) -> Hold {
        match self.level {
            Dedup::Off => Hold::Nothing,
            Dedup::Kv => Hold::Fenced,
            Dedup::Transactional => Hold::Locked,
        }
    }
}

/// What a delivery holds, as the decisions need to know it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Hold {
    /// No claim (`dedup = off`, or a delivery refused before one).
    Nothing,
    /// A bucket's claim: another worker takes it over once its lease runs
    /// out, so it fences the handler and stays pending when left.
    Fenced,
    /// A claim row in the delivery's transaction (or written on its own):
    /// held while the transaction lives.
    Locked,
}

impl Hold {
    fn claimed(self) -> bool {
        !matches!(self, Hold::Nothing)
    }

    /// When a message whose claim is left as it is comes back: a fenced
    /// claim after its lease (only then can it be taken over); otherwise
    /// `otherwise`.
    fn back_after(self, rules: &Rules, otherwise: Duration) -> Duration {
        match self {
            Hold::Fenced => rules.lease,
            Hold::Nothing | Hold::Locked => otherwise,
        }
    }
}

/// What to count (and log) on the way: the executor keeps the counters.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Note {
    /// Count this outcome.
    Count(Outcome),
    /// The claim stopped being this worker's (why): counted `lease_lost`
    /// and logged as such.
    LeaseLost(&'static str),
    /// Took over `from`'s expired claim: counted `reclaimed` and logged —
    /// its owner may have had its effect.
    Reclaimed {
        /// The owner whose lease expired.
        from: Owner,
    },
    /// The store could not be reached and the handler did not run:
    /// counted `store_unavailable`, logged and reported to the health
    /// probe with the error the executor holds.
    NotRun,
}

/// The notes of one step (at most two).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Notes([Option<Note>; 2]);

impl Notes {
    fn of(notes: &[Note]) -> Self {
        let mut out = [None; 2];
        for (slot, note) in out.iter_mut().zip(notes) {
            *slot = Some(*note);
        }
        Self(out)
    }

    /// The notes, in order.
    pub fn iter(&self) -> impl Iterator<Item = Note> + '_ {
        self.0.iter().flatten().copied()
    }
}

/// How a delivery ends on the server.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Settle {
    /// A confirmed ack: nothing in a store answers a redelivery, so the
    /// confirmation is what keeps a second run rare (`dedup = off`, a
    /// rejected delivery).
    Ack,
    /// A plain ack: the store answers a redelivery as a duplicate.
    AckRecorded,
    /// NAK: redelivered after the delay.
    Nak(Duration),
    /// Leave the claim as it is (a bucket's stays pending, a transaction
    /// rolls back), then NAK after the delay.
    AbandonThenNak(Duration),
    /// Terminate: dead-lettered for good.
    Term,
    /// Neither ack nor NAK: the message is whoever holds its claim now.
    Leave,
    /// Run the delivery again, apart from the groups: nothing of this run
    /// counted (a lock conflict that group commit may have caused).
    Again,
    /// A group member: run it again alone, beside the groups (its group
    /// rolled back; see [`Arrival::after_group`]).
    RunAlone,
}

/// One step: what to do next, and what to count on the way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Step {
    /// What to do.
    pub next: Next,
    /// What to count first.
    pub notes: Notes,
}

/// What to do next. Each variant but [`Settle`](Next::Settle) carries the
/// state that takes the answer. (Running the handler, or an `on_duplicate`
/// hook, is where a delivery starts — [`Started`], [`Refused::Hook`] — not
/// a step: only the executor holding the arguments can take it.)
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Next {
    /// Record completion with the handler's result.
    Complete(Completing),
    /// Wait `pause` (in-progress ack meanwhile), then record completion
    /// again.
    CompleteAfter(Completing, Duration),
    /// Write the claim's ending (`closing.ending()`).
    Close(Closing),
    /// Give the claim back uncounted (released with its attempt taken off).
    GiveBack(GivingBack),
    /// Confirm with the store that the claim is still this worker's.
    Confirm(Confirming),
    /// Store the dead letter and await its PubAck, keeping the claim up.
    Publish(Publishing),
    /// Settle the message; the delivery is over.
    Settle(Settle),
}

impl Step {
    fn to(next: Next, notes: &[Note]) -> Self {
        Self {
            next,
            notes: Notes::of(notes),
        }
    }

    fn settle(settle: Settle, notes: &[Note]) -> Self {
        Self::to(Next::Settle(settle), notes)
    }

    fn left(why: &'static str) -> Self {
        Self::settle(Settle::Leave, &[Note::LeaseLost(why)])
    }
}

/// A delivery that has arrived: JetStream's delivery count, which paces
/// everything that is not the handler's doing.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Arrival {
    delivered: u32,
}

impl Arrival {
    /// The `delivered`-th delivery of a message.
    pub fn new(delivered: u64) -> Self {
        Self {
            delivered: u32::try_from(delivered).unwrap_or(u32::MAX),
        }
    }

    /// Its arguments or key could not be made: acknowledged and dropped
    /// (no key, `on_missing_key = reject`), or dead-lettered with `reason`.
    /// `why` is the rejection, for the letter's `Idem-Error`.
    pub fn rejected(
        self,
        rules: &Rules,
        missing_key: bool,
        reason: DeadLetterReason,
        why: &dyn std::fmt::Display,
    ) -> Step {
        if missing_key && rules.on_missing_key == OnMissingKey::Reject {
            return Step::settle(Settle::Ack, &[Note::Count(Outcome::Rejected)]);
        }
        let counted =
            (reason == DeadLetterReason::Decode).then_some(Note::Count(Outcome::DecodeFailed));
        let publishing = Publishing::new(
            rules,
            reason,
            self.delivered,
            why.to_string(),
            Hold::Nothing,
            self.delivered,
        );
        Step::to(Next::Publish(publishing), counted.as_slice())
    }

    /// The store could not begin what the claim needs (fail closed: the
    /// handler does not run).
    pub fn store_failed(self) -> Step {
        Step::settle(Settle::Nak(store_backoff(self.delivered)), &[Note::NotRun])
    }

    /// Another delivery in this process kept the key for a whole lease
    /// (`dedup = kv` takes a key one delivery at a time).
    pub fn busy_here(self, rules: &Rules) -> Step {
        Step::settle(
            Settle::Nak(in_flight_delay(self.delivered, rules.lease)),
            &[Note::Count(Outcome::InFlightElsewhere)],
        )
    }

    /// `dedup = off`: the handler runs at once, holding nothing.
    pub fn unclaimed(self, rules: &Rules, now: Time) -> Running {
        Running {
            delivered: self.delivered,
            attempt: self.delivered,
            hold: Hold::Nothing,
            beside_groups: false,
            upkeep: Upkeep::new(rules.lease, now, now, false),
        }
    }

    /// The claim is asked for at `asked`; `beside_groups`: the run shares
    /// its handler with group commit (a lock conflict may be a group's
    /// doing).
    pub fn claiming(self, asked: Time, beside_groups: bool) -> Claiming {
        Claiming {
            delivered: self.delivered,
            asked,
            beside_groups,
        }
    }
}

/// The claim was asked for.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Claiming {
    delivered: u32,
    asked: Time,
    beside_groups: bool,
}

impl Claiming {
    /// The store could not answer: the handler does not run (fail closed).
    pub fn store_failed(self) -> Step {
        Arrival {
            delivered: self.delivered,
        }
        .store_failed()
    }

    /// The store granted the claim, answered at `now`: run the handler.
    pub fn granted(self, rules: &Rules, grant: &Grant, now: Time) -> Started {
        let (claim, noted) = match grant {
            Grant::Claimed(claim) => (claim, None),
            Grant::Reclaimed { claim, from } => (claim, Some(Note::Reclaimed { from: *from })),
        };
        let hold = rules.hold();
        let running = Running {
            delivered: self.delivered,
            attempt: claim.attempt(),
            hold,
            beside_groups: self.beside_groups,
            upkeep: Upkeep::new(rules.lease, self.asked, now, hold == Hold::Fenced),
        };
        Started {
            running,
            notes: Notes::of(noted.as_slice()),
        }
    }

    /// The store refused the claim.
    pub fn refused(self, rules: &Rules, refusal: &Refusal) -> Refused {
        let step = match refusal {
            Refusal::Duplicate { .. } if rules.on_duplicate => {
                return Refused::Hook {
                    hooking: Hooking {
                        delivered: self.delivered,
                    },
                    notes: Notes::of(&[Note::Count(Outcome::Duplicate)]),
                };
            }
            Refusal::Duplicate { .. } | Refusal::Dead => {
                Step::settle(Settle::AckRecorded, &[Note::Count(Outcome::Duplicate)])
            }
            Refusal::KeyConflict { stored } => Step::to(
                Next::Publish(Publishing::new(
                    rules,
                    DeadLetterReason::KeyConflict,
                    self.delivered,
                    format!(
                        "key already claimed with another payload (stored fingerprint {})",
                        stored.map_or_else(|| "none".to_owned(), |f| f.to_string())
                    ),
                    Hold::Nothing,
                    self.delivered,
                )),
                &[Note::Count(Outcome::KeyConflict)],
            ),
            Refusal::InFlight { retry_after, .. } => Step::settle(
                Settle::Nak(in_flight_delay(self.delivered, *retry_after)),
                &[Note::Count(Outcome::InFlightElsewhere)],
            ),
        };
        Refused::Answered(step)
    }
}

/// A granted claim: run the handler.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Started {
    /// The run.
    pub running: Running,
    /// What to count first (a takeover).
    pub notes: Notes,
}

/// What a refused claim comes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    /// A duplicate of a handler with `on_duplicate`: run the hook.
    Hook {
        /// The hook's run.
        hooking: Hooking,
        /// What to count first.
        notes: Notes,
    },
    /// Answered without running anything.
    Answered(Step),
}

/// How a run of the handler ended.
#[derive(Clone, Debug)]
pub enum RunEnd<'a> {
    /// It returned `Ok`; `result` is what to store with its completion.
    Returned {
        /// The stored result (`store_result`), if any.
        result: Option<Bytes>,
    },
    /// It returned `Err`, or panicked (as a retryable
    /// [`HandlerPanicked`](crate::handler) error). `lock_conflict`: the
    /// error is a deadlock, serialization failure or lock timeout.
    Failed {
        /// The failure.
        error: &'a HandlerError,
        /// Whether it is a lock conflict.
        lock_conflict: bool,
    },
    /// It was stopped before it ended.
    Stopped(Stopped),
}

/// Why a run was stopped before it ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stopped {
    /// The upkeep refused its next step: the lease ran out on this
    /// worker's clock without a confirmed renewal. `started`: it had taken
    /// a step (else the claim was answered only after its lease).
    Fenced {
        /// Whether the handler had been polled before.
        started: bool,
    },
    /// A renewal found the claim taken over.
    TakenOver,
    /// The shutdown deadline cut it off.
    CutOff,
}

impl Stopped {
    /// What it means for the claim, as logs and replies say it.
    pub fn why(self) -> &'static str {
        match self {
            Stopped::Fenced { started: true } => {
                "the lease ran out on this worker's clock without a confirmed renewal"
            }
            Stopped::Fenced { started: false } => {
                "the claim was answered after its lease: the handler was not started"
            }
            Stopped::TakenOver => "a renewal found the claim taken over",
            Stopped::CutOff => "the shutdown deadline passed while the handler ran",
        }
    }
}

/// The handler runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Running {
    delivered: u32,
    attempt: u32,
    hold: Hold,
    beside_groups: bool,
    upkeep: Upkeep,
}

impl Running {
    /// The attempt this run is: the handler's runs counted in the claim
    /// record; JetStream's delivery count where there is none.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// What the run holds.
    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// Its timers: renewals, and the fence's deadline.
    pub fn upkeep(&self) -> &Upkeep {
        &self.upkeep
    }

    /// Its timers, to feed them time and renewals.
    pub fn upkeep_mut(&mut self) -> &mut Upkeep {
        &mut self.upkeep
    }

    /// The run ended.
    pub fn ended(self, rules: &Rules, end: RunEnd<'_>) -> Step {
        match end {
            RunEnd::Returned { result } if self.hold.claimed() => Step::to(
                Next::Complete(Completing {
                    attempt: self.attempt,
                    hold: self.hold,
                    failed: 0,
                    delivered: self.delivered,
                    result,
                }),
                &[],
            ),
            RunEnd::Returned { .. } => {
                Step::settle(Settle::Ack, &[Note::Count(Outcome::Processed)])
            }
            RunEnd::Failed {
                lock_conflict: true,
                ..
            } if self.beside_groups => Step::to(
                Next::GiveBack(GivingBack {
                    delivered: self.delivered,
                    then: AfterGiveBack::Again,
                }),
                &[],
            ),
            RunEnd::Failed { error, .. } => {
                failed(rules, error, self.attempt, self.hold, self.delivered)
            }
            RunEnd::Stopped(Stopped::Fenced { started: false }) => Step::to(
                Next::GiveBack(GivingBack {
                    delivered: self.delivered,
                    then: AfterGiveBack::NotStarted,
                }),
                &[],
            ),
            RunEnd::Stopped(stopped @ (Stopped::Fenced { started: true } | Stopped::TakenOver)) => {
                Step::left(stopped.why())
            }
            RunEnd::Stopped(Stopped::CutOff) => interrupted(rules, self.hold),
        }
    }
}

/// The shutdown deadline cut the run off: its claim is left as the level
/// says (a bucket's stays pending — the effect may be under way), and the
/// message comes back once that claim may be taken over.
fn interrupted(rules: &Rules, hold: Hold) -> Step {
    Step::settle(
        Settle::AbandonThenNak(hold.back_after(rules, MIN_NAK_DELAY)),
        &[Note::Count(Outcome::Interrupted)],
    )
}

/// A failed attempt: release and retry, or dead-letter.
fn failed(rules: &Rules, error: &HandlerError, attempt: u32, hold: Hold, delivered: u32) -> Step {
    match after_failure(&rules.retry, error, attempt) {
        Failure::Retry(delay) if hold.claimed() => Step::to(
            Next::Close(Closing {
                ending: Ending::Released,
                then: AfterClose::Retry(delay),
                hold,
                delivered,
            }),
            &[],
        ),
        Failure::Retry(delay) => Step::settle(Settle::Nak(delay), &[Note::Count(Outcome::Retried)]),
        Failure::DeadLetter(reason) if hold == Hold::Fenced => Step::to(
            Next::Confirm(Confirming {
                reason,
                attempts: attempt,
                delivered,
                error: error.to_string(),
            }),
            &[],
        ),
        Failure::DeadLetter(reason) => Step::to(
            Next::Publish(Publishing::new(
                rules,
                reason,
                attempt,
                error.to_string(),
                hold,
                delivered,
            )),
            &[],
        ),
    }
}

/// A duplicate's `on_duplicate` hook runs (holding nothing).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hooking {
    delivered: u32,
}

impl Hooking {
    /// The hook ended: acknowledged, or its failure retried and
    /// dead-lettered as a handler's, with the key left completed.
    pub fn ended(self, rules: &Rules, end: RunEnd<'_>) -> Step {
        let running = Running {
            delivered: self.delivered,
            attempt: self.delivered,
            hold: Hold::Nothing,
            beside_groups: false,
            upkeep: Upkeep::new(rules.lease, Time::ZERO, Time::ZERO, false),
        };
        match end {
            RunEnd::Returned { .. } => Step::settle(Settle::AckRecorded, &[]),
            other => running.ended(rules, other),
        }
    }
}

/// Completion was asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Completing {
    attempt: u32,
    hold: Hold,
    /// How many times the store failed to record it so far.
    failed: u32,
    delivered: u32,
    result: Option<Bytes>,
}

/// What recording a completion came to.
#[derive(Clone, Debug)]
pub enum Recorded<'a> {
    /// Recorded.
    Yes,
    /// The claim had moved on to another owner: the effect may have run
    /// twice.
    LeaseLost,
    /// The handler's transaction was aborted by a statement it ignored:
    /// nothing committed, a failed attempt (`error` says so).
    Aborted {
        /// The failure it counts as.
        error: &'a HandlerError,
    },
    /// Not recorded, and safe to redeliver (the commit failed, the run's
    /// transaction rolled back).
    No {
        /// Why (the commit's error), for a request's reply.
        why: String,
    },
    /// The store could not be reached: retried while nobody else can take
    /// the claim.
    StoreFailed,
    /// The shutdown deadline passed before it was recorded.
    ShutDown,
}

impl Completing {
    /// The result to store with the completion.
    pub fn result(&self) -> Option<&Bytes> {
        self.result.as_ref()
    }

    /// The store answered.
    pub fn answered(self, rules: &Rules, recorded: Recorded<'_>) -> Step {
        match recorded {
            Recorded::Yes => Step::settle(Settle::AckRecorded, &[Note::Count(Outcome::Processed)]),
            Recorded::LeaseLost => Step::settle(
                Settle::AckRecorded,
                &[
                    Note::LeaseLost(
                        "lease lost before completion: another worker took over, the effect may run twice",
                    ),
                    Note::Count(Outcome::Processed),
                ],
            ),
            Recorded::Aborted { error } => {
                failed(rules, error, self.attempt, self.hold, self.delivered)
            }
            Recorded::No { .. } => Step::settle(
                Settle::Nak(store_backoff(self.attempt)),
                &[Note::Count(Outcome::StoreUnavailable)],
            ),
            Recorded::StoreFailed => {
                let failed = self.failed.saturating_add(1);
                Step::to(
                    Next::CompleteAfter(Completing { failed, ..self }, completion_pause(failed)),
                    &[],
                )
            }
            // The claim stays pending; the next delivery after the lease
            // reclaims it (counted as reclaimed there).
            Recorded::ShutDown => Step::settle(
                Settle::AbandonThenNak(rules.lease),
                &[Note::Count(Outcome::StoreUnavailable)],
            ),
        }
    }
}

/// What follows a claim's ending.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
enum AfterClose {
    /// A failed attempt's release: NAK after the policy's delay.
    Retry(Duration),
    /// The dead letter stored: terminate the original.
    Term,
    /// The dead letter not stored: the key kept, the message back later.
    Kept,
}

/// A claim's ending is being written.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Closing {
    ending: Ending,
    then: AfterClose,
    hold: Hold,
    delivered: u32,
}

impl Closing {
    /// The ending to write.
    pub fn ending(&self) -> Ending {
        self.ending
    }

    /// Written (`ours`), or the claim had been taken over — then the
    /// message is the new owner's: no ack, no NAK, no Term.
    pub fn ended(self, rules: &Rules, ours: bool) -> Step {
        match (ours, self.then) {
            (false, AfterClose::Retry(_)) => {
                Step::left("the claim was taken over before the failure was recorded")
            }
            (false, AfterClose::Term) => {
                Step::left("the claim was taken over while the dead letter was stored")
            }
            (false, AfterClose::Kept) => {
                Step::left("the claim was taken over while the dead letter failed")
            }
            (true, AfterClose::Retry(delay)) => {
                Step::settle(Settle::Nak(delay), &[Note::Count(Outcome::Retried)])
            }
            (true, AfterClose::Term) => {
                Step::settle(Settle::Term, &[Note::Count(Outcome::DeadLettered)])
            }
            (true, AfterClose::Kept) => Step::settle(
                Settle::Nak(self.hold.back_after(rules, store_backoff(self.delivered))),
                &[Note::Count(Outcome::DeadLetterFailed)],
            ),
        }
    }
}

/// What follows a claim given back uncounted.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
enum AfterGiveBack {
    /// The claim was answered after its lease: NAK with the store's
    /// backoff.
    NotStarted,
    /// A lock conflict beside group commit: run again apart.
    Again,
}

/// A claim whose run does not count is being given back.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct GivingBack {
    delivered: u32,
    then: AfterGiveBack,
}

impl GivingBack {
    /// Given back (`ours`), or a reader had taken the key over.
    pub fn given(self, ours: bool) -> Step {
        match (self.then, ours) {
            // Whoever holds the key now, this run never counted: it runs
            // again with no group beside it.
            (AfterGiveBack::Again, _) => {
                Step::settle(Settle::Again, &[Note::Count(Outcome::LockConflict)])
            }
            (AfterGiveBack::NotStarted, true) => Step::settle(
                Settle::Nak(store_backoff(self.delivered)),
                &[Note::Count(Outcome::StoreUnavailable)],
            ),
            (AfterGiveBack::NotStarted, false) => {
                Step::left("the claim was answered after its lease, and taken over")
            }
        }
    }
}

/// Before a dead letter (which cannot be taken back): is the fenced claim
/// still this worker's?
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Confirming {
    reason: DeadLetterReason,
    attempts: u32,
    delivered: u32,
    error: String,
}

impl Confirming {
    /// The store answered: `Some(true)` still ours, `Some(false)` taken
    /// over, `None` it could not say.
    pub fn answered(self, rules: &Rules, ours: Option<bool>) -> Step {
        match ours {
            Some(true) => Step::to(
                Next::Publish(Publishing::new(
                    rules,
                    self.reason,
                    self.attempts,
                    self.error,
                    Hold::Fenced,
                    self.delivered,
                )),
                &[],
            ),
            Some(false) => Step::left("the claim was taken over before the dead letter"),
            None => Arrival {
                delivered: self.delivered,
            }
            .store_failed(),
        }
    }
}

/// The dead letter is being stored; the claim is kept up meanwhile (a
/// stalled link or slow leader must not let the lease, or a transaction's
/// idle timeout, free the key for another payload).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Publishing {
    reason: DeadLetterReason,
    attempts: u32,
    error: String,
    hold: Hold,
    delivered: u32,
    upkeep: Upkeep,
}

impl Publishing {
    fn new(
        rules: &Rules,
        reason: DeadLetterReason,
        attempts: u32,
        error: String,
        hold: Hold,
        delivered: u32,
    ) -> Self {
        Self {
            reason,
            attempts,
            error,
            hold,
            delivered,
            // The executor starts the timers on its clock
            // ([`start`](Self::start)).
            upkeep: Upkeep::keeping(rules.lease, Time::ZERO),
        }
    }

    /// The letter's `Idem-Reason`.
    pub fn reason(&self) -> DeadLetterReason {
        self.reason
    }

    /// The attempts it records (`Idem-Attempts`).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Why it is written (`Idem-Error`).
    pub fn error(&self) -> &str {
        &self.error
    }

    /// What it holds while the letter is stored.
    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// Its timers: a renewal and an in-progress ack every third of the
    /// lease, from when [`start`](Self::start) was told.
    pub fn upkeep_mut(&mut self) -> &mut Upkeep {
        &mut self.upkeep
    }

    /// Restarts the timers at `now` (the executor's clock, when the
    /// publish begins).
    pub fn start(&mut self, lease: Duration, now: Time) {
        self.upkeep = Upkeep::keeping(lease, now);
    }

    /// A renewal while the letter waits failed: the claim must be secured
    /// for its payload on its own (a transaction that may be gone is given
    /// up and the row written as kept). `true`: secure it.
    pub fn must_secure(&self, renewed: &Renewed) -> bool {
        matches!(renewed, Renewed::Failed) && self.hold == Hold::Locked
    }

    /// The broker confirmed the letter (`stored`), or it could not be
    /// stored.
    pub fn stored(self, rules: &Rules, stored: bool) -> Step {
        let then = if stored {
            AfterClose::Term
        } else {
            AfterClose::Kept
        };
        let closing = Closing {
            ending: if stored { Ending::Dead } else { Ending::Kept },
            then,
            hold: self.hold,
            delivered: self.delivered,
        };
        if self.hold.claimed() {
            Step::to(Next::Close(closing), &[])
        } else {
            closing.ended(rules, true)
        }
    }
}

#[cfg(test)]
mod tests;
