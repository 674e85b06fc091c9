//! The protocol as a state machine: the actions of workers, broker, store,
//! faults and operator, and what each does to the [`State`]. Every decision
//! is the [`Rules`]' (the runtime's own functions unless mutated); this
//! module only carries decisions out, the way `runtime/src/store/cas.rs` and
//! the consumer do.

use std::time::Duration;

use idem::claim::operator::{Forget, LetterClaim, Replay, reopened};
use idem::claim::{Claim, ClaimOutcome, ClaimRecord, ClaimState, Decision, Ending, Owner};
use idem::delivery_core::{self as core, Next, RunEnd, Settle as CoreSettle, Step, Stopped, Time};
use stateright::{Model, Property};

use crate::rules::Rules;
use crate::state::{
    Budget, Ghost, Held, Job, Letter, LetterStep, Message, Operator, Payload, Plan, Reason, Settle,
    State, Status, StoreView, Worker, WorkerId,
};

/// The lease every claim takes.
pub const LEASE: Duration = Duration::from_secs(5);

/// The one key every message is published under, as a record key.
fn model_key() -> idem::key::RecordKey {
    static KEY: std::sync::LazyLock<idem::key::RecordKey> = std::sync::LazyLock::new(|| {
        idem::key::RecordKey::new(
            &idem::key::HandlerName::new("model").expect("a valid handler name"),
            &idem::key::IdempotencyKey::new("k").expect("a valid key"),
        )
    });
    KEY.clone()
}

/// The operator's tool's identity in the records it creates.
const OPERATOR: Owner = Owner::from_uuid(uuid::Uuid::from_u128(0x0be7_a702));

/// The bounds of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// How many workers consume the stream.
    pub workers: u8,
    /// The retry policy's attempts: after the last, `retries_exhausted`.
    pub max_attempts: u32,
    /// How many replies (claim, completion, ack/term, PubAck) may be lost.
    pub lost_replies: u8,
    /// How many worker crashes.
    pub crashes: u8,
    /// How many worker freezes.
    pub freezes: u8,
    /// How many crashes and freezes together.
    pub faults: u8,
    /// How many operator actions (forget, replay).
    pub operator_actions: u8,
    /// Whether the operator may fix the handler (after which it never
    /// fails). A fix only removes behaviours, so it adds nothing to the
    /// safety properties; off in CI.
    pub fix: bool,
}

impl Config {
    /// The configuration CI checks first: two workers, a lost reply (claim,
    /// completion, ack/term or PubAck), a crash, one operator action.
    pub fn ci() -> Self {
        Self {
            workers: 2,
            max_attempts: 2,
            lost_replies: 1,
            crashes: 1,
            freezes: 0,
            faults: 1,
            operator_actions: 1,
            fix: false,
        }
    }

    /// The configuration CI checks second: a freeze instead (a frozen
    /// worker's lease runs out and it is fenced), no lost reply.
    pub fn ci_freeze() -> Self {
        Self {
            lost_replies: 0,
            crashes: 0,
            freezes: 1,
            ..Self::ci()
        }
    }

    /// Every fault together, and the operator's fix, on `workers` workers
    /// (on demand: 2 workers take about a minute in release mode).
    pub fn large(workers: u8) -> Self {
        Self {
            workers,
            freezes: 1,
            faults: 2,
            fix: true,
            ..Self::ci()
        }
    }
}

/// How one run of the handler ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandlerOutcome {
    /// `Ok`: the effect happened.
    Ok,
    /// A retryable `Err`.
    Retryable,
    /// A permanent `Err`.
    Permanent,
}

/// One step of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The producer publishes `Y` under `X`'s key.
    PublishY,
    /// A worker takes a delivery of `message` and claims its key; with
    /// `lose_reply`, a claim the store wrote is answered with an error.
    Take {
        /// The worker.
        worker: WorkerId,
        /// The message.
        message: usize,
        /// The store's answer is lost.
        lose_reply: bool,
    },
    /// The handler runs once.
    Run {
        /// The worker.
        worker: WorkerId,
        /// How it ends.
        outcome: HandlerOutcome,
    },
    /// A worker whose own lease ran out stops its handler before its next
    /// step, as the core says: a handler that had started leaves the
    /// message alone; one that never started gives its claim back.
    StopFenced {
        /// The worker.
        worker: WorkerId,
        /// Whether the handler had taken a step before the freeze.
        started: bool,
    },
    /// Record completion (CAS `done`), then acknowledge.
    Complete {
        /// The worker.
        worker: WorkerId,
        /// What is lost on the way.
        loss: Loss,
    },
    /// Confirm the claim and publish the dead letter.
    PublishLetter {
        /// The worker.
        worker: WorkerId,
        /// The letter is stored but its PubAck is lost.
        lose_ack: bool,
    },
    /// Mark the key dead (CAS), then terminate the original.
    MarkDead {
        /// The worker.
        worker: WorkerId,
        /// The Term is lost: the original is redelivered.
        lose_term: bool,
    },
    /// The worker crashes: its memory is gone, its claim stays.
    Crash(WorkerId),
    /// The worker freezes.
    Freeze(WorkerId),
    /// The frozen worker wakes.
    Wake(WorkerId),
    /// The pending record's owner (crashed, frozen, or no longer holding
    /// it) let its lease run out: readers have watched the revision for a
    /// full lease.
    LeaseRunsOut,
    /// A `done`, `dead` or `released` record reaches its retention.
    RetentionExpires,
    /// `idem keys forget` (not forced).
    Forget,
    /// `idem dead replay` reads the record and decides about a letter.
    ReplayDecide {
        /// The letter.
        letter: usize,
    },
    /// `idem dead replay` carries out what it decided.
    ReplayCarryOut,
    /// The operator fixes the handler: it never fails again.
    Fix,
}

/// What a completion loses on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Loss {
    /// Nothing.
    Nothing,
    /// The store wrote `done` but its answer is lost: the worker retries.
    Answer,
    /// The ack is lost: the message is redelivered.
    Ack,
}

/// What a compare-and-set transition of a held claim came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Written at this revision.
    Applied(u64),
    /// Written at this revision, but the answer was lost.
    AnswerLost(u64),
    /// The CAS failed, and the record is this claim's own earlier write.
    FoundOwn,
    /// The record moved on: nothing written, the message left alone.
    LeaseLost(StoreView),
}

impl Write {
    /// The transition is (now known to be) in the store.
    pub fn applied(self) -> bool {
        matches!(self, Write::Applied(_) | Write::FoundOwn)
    }
}

/// What an action did, for traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A message was published.
    Published {
        /// Its index.
        message: usize,
    },
    /// The claim created or updated the record.
    Claimed {
        /// The revision written.
        revision: u64,
        /// The attempt.
        attempt: u32,
        /// A takeover from this worker (counted).
        from: Option<WorkerId>,
        /// The answer was lost: the worker NAKed.
        reply_lost: bool,
    },
    /// The store answered: do not run; acknowledge.
    Duplicate {
        /// The decision's kind.
        dead: bool,
        /// What the store held.
        store: StoreView,
        /// The ack was lost.
        ack_lost: bool,
    },
    /// The worker acknowledged from its memory.
    FromMemory {
        /// What the store held.
        store: StoreView,
        /// The ack was lost.
        ack_lost: bool,
    },
    /// Another payload owns the key.
    Conflict {
        /// What the store held.
        store: StoreView,
    },
    /// The handler ran; a retryable failure released the claim.
    Ran {
        /// How it ended.
        outcome: HandlerOutcome,
        /// The release, if it was one.
        release: Option<Write>,
    },
    /// Fenced: the handler stopped, the message is left alone.
    Stopped,
    /// A transition of a held claim, and the ack or term after it.
    Transition {
        /// The write.
        write: Write,
        /// The settlement that followed, and whether it was lost.
        settled: Option<(Settle, bool)>,
    },
    /// The dead letter's claim was confirmed lost: nothing published.
    NotOurs {
        /// What the store held.
        store: StoreView,
    },
    /// A letter was stored.
    LetterStored {
        /// Its index.
        letter: usize,
        /// Its PubAck was lost: the worker NAKed, keeping the key.
        ack_lost: bool,
        /// The original was terminated at once (no claim to mark dead).
        termed: bool,
    },
    /// A fault happened.
    Fault,
    /// The record vanished.
    Vanished {
        /// What it was.
        was: StoreView,
    },
    /// The replay decided.
    Planned(Plan),
    /// The replay's reopen CAS failed; it read and decided again.
    Replanned(Plan),
    /// The replay was carried out.
    Replayed {
        /// The copy published, if any.
        copy: Option<usize>,
    },
    /// The handler is fixed.
    Fixed,
}

/// The model: configuration and rules.
#[derive(Clone, Debug)]
pub struct IdemModel {
    /// The bounds.
    pub config: Config,
    /// The decisions.
    pub rules: Rules,
    /// What the delivery core decides a worker's steps with: a `kv`
    /// handler with the model's lease and attempts.
    pub core: core::Rules,
}

impl IdemModel {
    /// A model of `config` under `rules`.
    pub fn new(config: Config, rules: Rules) -> Self {
        let core = core::Rules {
            lease: LEASE,
            retry: idem::Retry::fixed(Duration::from_secs(1)).attempts(config.max_attempts),
            level: idem::handler::Dedup::Kv,
            on_duplicate: false,
            on_missing_key: idem::handler::OnMissingKey::DeadLetter,
        };
        Self {
            config,
            rules,
            core,
        }
    }

    fn workers(&self) -> impl Iterator<Item = WorkerId> + use<> {
        (0..self.config.workers).map(WorkerId)
    }

    /// The worker an owner identity belongs to.
    fn worker_of(&self, owner: idem::claim::Owner) -> Option<WorkerId> {
        self.workers().find(|w| w.owner() == owner)
    }

    /// Carries out `action` on `state`: the next state and what happened, or
    /// `None` when the action changes nothing (an in-flight NAK, a refused
    /// forget, a reply that could not be lost because nothing was written).
    pub fn step(&self, state: &State, action: Action) -> Option<(State, Outcome)> {
        let mut next = state.clone();
        let outcome = match action {
            Action::PublishY => {
                next.budget.y_unpublished = false;
                next.messages.push(Message {
                    payload: Payload::Y,
                    copy: false,
                    settled: false,
                });
                Outcome::Published {
                    message: next.messages.len() - 1,
                }
            }
            Action::Take {
                worker,
                message,
                lose_reply,
            } => self.take(&mut next, worker, message, lose_reply)?,
            Action::Run { worker, outcome } => self.run(&mut next, worker, outcome)?,
            Action::StopFenced { worker, started } => {
                let Job::Running {
                    message,
                    held,
                    core,
                } = next.workers[worker.index()].job.clone()
                else {
                    return None;
                };
                let step = core.ended(&self.core, RunEnd::Stopped(Stopped::Fenced { started }));
                let step = match step.next {
                    // Never started: the claim given back uncounted (a CAS).
                    Next::GiveBack(giving) => {
                        let payload = next.messages[message].payload;
                        let given = Held {
                            attempt: held.attempt.saturating_sub(1),
                            ..held
                        };
                        let write = self.transition(
                            &mut next,
                            worker,
                            given,
                            payload,
                            ClaimState::Released,
                        );
                        giving.given(write.applied())
                    }
                    _ => step,
                };
                self.follow(&mut next, worker, message, Some(held), step, false)?;
                Outcome::Stopped
            }
            Action::Complete { worker, loss } => {
                let Job::Completing {
                    message,
                    held,
                    core,
                } = next.workers[worker.index()].job.clone()
                else {
                    return None;
                };
                let payload = next.messages[message].payload;
                let write = self.transition(&mut next, worker, held, payload, ClaimState::Done);
                let recorded = match (write, loss) {
                    (Write::Applied(_), Loss::Answer) => {
                        next.budget.lost_replies -= 1;
                        core::Recorded::StoreFailed
                    }
                    (_, Loss::Answer) => return None,
                    (write, _) if write.applied() => {
                        next.workers[worker.index()].remembers[payload.index()] = true;
                        core::Recorded::Yes
                    }
                    // Taken over: acknowledged all the same (the ack may be
                    // lost too).
                    _ => core::Recorded::LeaseLost,
                };
                let step = core.answered(&self.core, recorded);
                let settled = self.follow(
                    &mut next,
                    worker,
                    message,
                    Some(held),
                    step,
                    loss == Loss::Ack,
                )?;
                let write = match (write, loss) {
                    (Write::Applied(revision), Loss::Answer) => Write::AnswerLost(revision),
                    (write, _) => write,
                };
                Outcome::Transition { write, settled }
            }
            Action::PublishLetter { worker, lose_ack } => {
                self.publish_letter(&mut next, worker, lose_ack)?
            }
            Action::MarkDead { worker, lose_term } => {
                let Job::MarkingDead {
                    message,
                    held,
                    core,
                } = next.workers[worker.index()].job.clone()
                else {
                    return None;
                };
                let payload = next.messages[message].payload;
                let write = self.transition(&mut next, worker, held, payload, ClaimState::Dead);
                let mut step = core.ended(&self.core, write.applied());
                if !write.applied() && self.rules.term_after_lost_dead_mark {
                    // The old bug: the original of a claim another worker
                    // holds is terminated — a step of a fenced worker.
                    next.ghost.fenced_violation = true;
                    step = Step {
                        next: Next::Settle(CoreSettle::Term),
                        notes: Default::default(),
                    };
                }
                let settled =
                    self.follow(&mut next, worker, message, Some(held), step, lose_term)?;
                Outcome::Transition { write, settled }
            }
            Action::Crash(worker) => {
                next.budget.crashes -= 1;
                next.budget.faults -= 1;
                next.workers[worker.index()] = Worker {
                    status: Status::Crashed,
                    job: Job::Idle,
                    remembers: [false; 2],
                };
                Outcome::Fault
            }
            Action::Freeze(worker) => {
                next.budget.freezes -= 1;
                next.budget.faults -= 1;
                next.workers[worker.index()].status = Status::Frozen;
                Outcome::Fault
            }
            Action::Wake(worker) => {
                next.workers[worker.index()].status = Status::Up;
                Outcome::Fault
            }
            Action::LeaseRunsOut => {
                let stored = next.store.record.as_ref()?;
                let revision = stored.revision;
                let owner = self.worker_of(stored.record.owner)?;
                next.lapsed_revision = Some(revision);
                let worker = &mut next.workers[owner.index()];
                // A frozen owner's own lease ran out too: it is fenced.
                if worker.status == Status::Frozen
                    && let Some(held) = worker.job.held_mut()
                {
                    held.lapsed = true;
                }
                Outcome::Fault
            }
            Action::RetentionExpires => {
                next.budget.retention = false;
                let was = next.store.view();
                let revision = next.store.record.as_ref()?.revision;
                next.store.delete(revision);
                self.vanished(&mut next, was);
                Outcome::Vanished { was }
            }
            Action::Forget => {
                let snapshot = next.store.snapshot();
                let Forget::Delete { revision } = (self.rules.forget)(snapshot.as_ref(), false)
                else {
                    return None;
                };
                next.budget.operator -= 1;
                let was = next.store.view();
                if !next.store.delete(revision) {
                    return None;
                }
                self.vanished(&mut next, was);
                Outcome::Vanished { was }
            }
            Action::ReplayDecide { letter } => {
                let plan = self.plan(&next, letter)?;
                next.budget.operator -= 1;
                next.operator = Operator::Replaying { letter, plan };
                Outcome::Planned(plan)
            }
            Action::ReplayCarryOut => self.carry_out(&mut next)?,
            Action::Fix => {
                next.fixed = true;
                Outcome::Fixed
            }
        };
        Some((next, outcome))
    }

    /// Acknowledges or terminates `message`, or loses it (it is
    /// redelivered); returns whether it was lost.
    fn settle(&self, next: &mut State, message: usize, lose: bool) -> bool {
        if lose {
            next.budget.lost_replies -= 1;
        } else {
            next.messages[message].settled = true;
        }
        lose
    }

    /// A delivery: memory, then the store's claim (create, or decide on
    /// what it holds and CAS).
    fn take(
        &self,
        next: &mut State,
        worker: WorkerId,
        message: usize,
        lose_reply: bool,
    ) -> Option<Outcome> {
        let payload = next.messages[message].payload;
        let fingerprint = payload.fingerprint();
        let store = next.store.view();
        if self.rules.memory && next.workers[worker.index()].remembers[payload.index()] {
            if !store.backs_duplicate_of(payload) {
                next.ghost.unbacked_duplicate = true;
            }
            let ack_lost = self.settle(next, message, lose_reply);
            return Some(Outcome::FromMemory { store, ack_lost });
        }
        let now = next.store.now();
        let Some(found) = next.store.snapshot() else {
            let record = ClaimRecord {
                state: ClaimState::Pending {
                    lease_until: now + LEASE,
                },
                owner: worker.owner(),
                attempt: 1,
                fingerprint: Some(fingerprint),
                result: None,
                created_at: now,
                updated_at: now,
            };
            let revision = next.store.create(record)?;
            next.ghost.first_claimer = Some(payload);
            return Some(self.claimed(next, worker, message, lose_reply, revision, 1, now, None));
        };
        let observed = match (found.record.state, next.lapsed_revision) {
            (ClaimState::Pending { lease_until }, Some(lapsed)) if lapsed == found.revision => {
                lease_until.saturating_since(found.record.updated_at)
            }
            _ => Duration::ZERO,
        };
        let from = match (self.rules.decide)(&found.record, observed, Some(&fingerprint)) {
            Decision::Claim => None,
            Decision::Reclaim { from } => Some(self.worker_of(from)?),
            decision @ (Decision::Duplicate | Decision::Dead | Decision::Conflict { .. }) => {
                let outcome = match decision {
                    Decision::Duplicate => ClaimOutcome::Duplicate { result: None },
                    Decision::Dead => ClaimOutcome::Dead,
                    Decision::Conflict { stored } => ClaimOutcome::KeyConflict { stored },
                    Decision::Claim | Decision::Reclaim { .. } | Decision::InFlight { .. } => {
                        return None;
                    }
                };
                return self.refused(next, worker, message, lose_reply, outcome, store);
            }
            // NAK: nothing changes.
            Decision::InFlight { .. } => return None,
        };
        let attempt = found.record.attempt.saturating_add(1);
        let record = ClaimRecord {
            state: ClaimState::Pending {
                lease_until: now + LEASE,
            },
            owner: worker.owner(),
            attempt,
            fingerprint: Some(fingerprint),
            result: None,
            created_at: found.record.created_at,
            updated_at: now,
        };
        let revision = next.store.update(record, found.revision)?;
        if next.ghost.first_claimer.is_none() {
            next.ghost.first_claimer = Some(payload);
        }
        if let Some(from) = from {
            next.ghost.takeovers[payload.index()] += 1;
            if let Some(held) = next.workers[from.index()].job.held_mut() {
                held.superseded = true;
            }
        }
        Some(self.claimed(
            next,
            worker,
            message,
            lose_reply,
            revision,
            attempt,
            found.record.created_at,
            from,
        ))
    }

    /// The worker holds the claim just written (unless its answer was lost).
    #[allow(clippy::too_many_arguments)]
    fn claimed(
        &self,
        next: &mut State,
        worker: WorkerId,
        message: usize,
        lose_reply: bool,
        revision: u64,
        attempt: u32,
        created_at: idem::clock::UnixMillis,
        from: Option<WorkerId>,
    ) -> Outcome {
        if lose_reply {
            next.budget.lost_replies -= 1;
        } else {
            // The claim as the store grants it; the core reads its attempt.
            let record = ClaimRecord {
                state: ClaimState::Pending {
                    lease_until: created_at + LEASE,
                },
                owner: worker.owner(),
                attempt,
                fingerprint: None,
                result: None,
                created_at,
                updated_at: created_at,
            };
            let claim = Claim::granted(&model_key(), &record, revision, LEASE);
            let grant = match from {
                Some(from) => idem::claim::Grant::Reclaimed {
                    claim,
                    from: from.owner(),
                },
                None => idem::claim::Grant::Claimed(claim),
            };
            let started = core::Arrival::new(1).claiming(Time::ZERO, false).granted(
                &self.core,
                &grant,
                Time::ZERO,
            );
            next.workers[worker.index()].job = Job::Running {
                message,
                held: Held {
                    revision,
                    attempt,
                    created_at,
                    lapsed: false,
                    superseded: false,
                },
                core: started.running,
            };
        }
        Outcome::Claimed {
            revision,
            attempt,
            from,
            reply_lost: lose_reply,
        }
    }

    /// One run of the handler, and what the core makes of its end: a
    /// completion, a release and NAK, or a dead letter.
    fn run(&self, next: &mut State, worker: WorkerId, outcome: HandlerOutcome) -> Option<Outcome> {
        let Job::Running {
            message,
            held,
            core,
        } = next.workers[worker.index()].job.clone()
        else {
            return None;
        };
        let payload = next.messages[message].payload;
        let error = match outcome {
            HandlerOutcome::Ok => None,
            HandlerOutcome::Retryable => Some(idem::HandlerError::retryable("retryable")),
            HandlerOutcome::Permanent => Some(idem::HandlerError::permanent("permanent")),
        };
        let end = match &error {
            None => {
                let ghost = &mut next.ghost;
                ghost.applications[payload.index()] += 1;
                if ghost.first_claimer.is_some_and(|first| first != payload) {
                    ghost.foreign_applied = true;
                }
                if held.superseded {
                    ghost.fenced_violation = true;
                }
                RunEnd::Returned { result: None }
            }
            Some(error) => RunEnd::Failed {
                error,
                lock_conflict: false,
            },
        };
        let mut step = core.ended(&self.core, end);
        let mut release = None;
        // A retryable failure's release is written in the same step.
        if let Next::Close(closing) = &step.next
            && closing.ending() == Ending::Released
        {
            let write = self.transition(next, worker, held, payload, ClaimState::Released);
            release = Some(write);
            step = closing.ended(&self.core, write.applied());
        }
        self.follow(next, worker, message, Some(held), step, false)?;
        Some(Outcome::Ran { outcome, release })
    }

    /// A claim the store refused, as the core answers it: a duplicate
    /// acknowledged, a key conflict dead-lettered without a claim.
    fn refused(
        &self,
        next: &mut State,
        worker: WorkerId,
        message: usize,
        lose_reply: bool,
        outcome: ClaimOutcome,
        store: StoreView,
    ) -> Option<Outcome> {
        let payload = next.messages[message].payload;
        let Err(refusal) = outcome.split() else {
            return None;
        };
        let dead = matches!(refusal, idem::claim::Refusal::Dead);
        let conflict = matches!(refusal, idem::claim::Refusal::KeyConflict { .. });
        let core::Refused::Answered(step) = core::Arrival::new(1)
            .claiming(Time::ZERO, false)
            .refused(&self.core, &refusal)
        else {
            return None;
        };
        if conflict {
            // The claim's answer lost: NAK, nothing changes.
            if lose_reply {
                return None;
            }
            self.follow(next, worker, message, None, step, false)?;
            return Some(Outcome::Conflict { store });
        }
        if !store.backs_duplicate_of(payload) {
            next.ghost.unbacked_duplicate = true;
        }
        let settled = self.follow(next, worker, message, None, step, lose_reply)?;
        Some(Outcome::Duplicate {
            dead,
            store,
            ack_lost: settled.is_some_and(|(_, lost)| lost),
        })
    }

    /// Carries the core's `step` for `worker`'s delivery of `message` as
    /// far as it goes without another action: a settlement (`lose`: the ack
    /// or Term is lost, and the message redelivered) or the job whose action
    /// takes the next answer. The settlement, if any, and whether it was
    /// lost; `None`: the step cannot be taken here.
    #[allow(clippy::too_many_arguments)]
    fn follow(
        &self,
        next: &mut State,
        worker: WorkerId,
        message: usize,
        held: Option<Held>,
        step: Step,
        lose: bool,
    ) -> Option<Option<(Settle, bool)>> {
        let job = match step.next {
            Next::Settle(settle) => {
                next.workers[worker.index()].job = Job::Idle;
                let settle = match settle {
                    CoreSettle::Ack | CoreSettle::AckRecorded => Settle::Ack,
                    CoreSettle::Term => Settle::Term,
                    // Redelivered, or the new owner's: nothing to settle.
                    CoreSettle::Nak(_)
                    | CoreSettle::AbandonThenNak(_)
                    | CoreSettle::Leave
                    | CoreSettle::Again
                    | CoreSettle::RunAlone => {
                        return if lose { None } else { Some(None) };
                    }
                };
                return Some(Some((settle, self.settle(next, message, lose))));
            }
            Next::Complete(core) | Next::CompleteAfter(core, _) => Job::Completing {
                message,
                held: held?,
                core,
            },
            Next::Confirm(core) => Job::DeadLettering {
                message,
                held,
                core: LetterStep::Confirm(core),
            },
            Next::Publish(core) => Job::DeadLettering {
                message,
                held,
                core: LetterStep::Publish(core),
            },
            Next::Close(core) if core.ending() == Ending::Dead => Job::MarkingDead {
                message,
                held: held?,
                core,
            },
            // Another ending, or a give-back, is written by the action that
            // led to it; reaching one here is the model's gap, not a step.
            Next::Close(_) | Next::GiveBack(_) => return None,
        };
        next.workers[worker.index()].job = job;
        Some(None)
    }

    /// A transition of a held claim, as `CasStore::transition`: a CAS on the
    /// claim's revision; when it fails, the record is read, and if it still
    /// carries this claim's owner and attempt in the target state, the write
    /// was this claim's own (a lost answer); anything else is a lost lease.
    fn transition(
        &self,
        next: &mut State,
        worker: WorkerId,
        held: Held,
        payload: Payload,
        target: ClaimState,
    ) -> Write {
        let record = ClaimRecord {
            state: target,
            owner: worker.owner(),
            attempt: held.attempt,
            fingerprint: Some(payload.fingerprint()),
            result: None,
            created_at: held.created_at,
            updated_at: next.store.now(),
        };
        if let Some(revision) = next.store.update(record, held.revision) {
            if held.superseded {
                next.ghost.fenced_violation = true;
            }
            return Write::Applied(revision);
        }
        let mine = next.store.record.as_ref().is_some_and(|stored| {
            stored.record.owner == worker.owner()
                && stored.record.attempt == held.attempt
                && std::mem::discriminant(&stored.record.state) == std::mem::discriminant(&target)
        });
        if mine {
            Write::FoundOwn
        } else {
            Write::LeaseLost(next.store.view())
        }
    }

    /// Confirm the claim (the core asks it of a fenced claim), publish the
    /// letter; on a lost PubAck the core keeps the key and NAKs.
    fn publish_letter(
        &self,
        next: &mut State,
        worker: WorkerId,
        lose_ack: bool,
    ) -> Option<Outcome> {
        let Job::DeadLettering {
            message,
            held,
            core,
        } = next.workers[worker.index()].job.clone()
        else {
            return None;
        };
        let publishing = match core {
            LetterStep::Publish(publishing) => publishing,
            LetterStep::Confirm(confirming) => {
                // The confirmation is a renewal: the record still at the
                // claim's revision and owner.
                let ours = held.is_some_and(|held| {
                    next.store.record.as_ref().is_some_and(|stored| {
                        stored.revision == held.revision && stored.record.owner == worker.owner()
                    })
                });
                match confirming.answered(&self.core, Some(ours)).next {
                    Next::Publish(publishing) => publishing,
                    _ if lose_ack => return None,
                    _ => {
                        next.workers[worker.index()].job = Job::Idle;
                        return Some(Outcome::NotOurs {
                            store: next.store.view(),
                        });
                    }
                }
            }
        };
        next.letters.push(Letter {
            payload: next.messages[message].payload,
            reason: Reason::of(publishing.reason()),
            alive: true,
        });
        let letter = next.letters.len() - 1;
        if lose_ack {
            next.budget.lost_replies -= 1;
        }
        let mut step = publishing.stored(&self.core, !lose_ack);
        // The key kept for the payload: a bucket's claim is left pending.
        if let Next::Close(closing) = &step.next
            && closing.ending() == Ending::Kept
        {
            step = closing.ended(&self.core, true);
        }
        let settled = self.follow(next, worker, message, held, step, false)?;
        Some(Outcome::LetterStored {
            letter,
            ack_lost: lose_ack,
            termed: settled.is_some_and(|(settle, _)| settle == Settle::Term),
        })
    }

    /// The record is gone (forgotten or expired): the key starts afresh.
    fn vanished(&self, next: &mut State, was: StoreView) {
        if let StoreView::Record {
            phase: crate::state::Phase::Done,
            payload: Some(payload),
            ..
        } = was
        {
            next.ghost.forgotten_done[payload.index()] += 1;
        }
        next.ghost.first_claimer = None;
    }

    /// What `replay` decides about `letter` on the record now stored.
    fn plan(&self, state: &State, letter: usize) -> Option<Plan> {
        let found = state.letters.get(letter)?;
        let claim = match found.reason {
            Reason::KeyConflict => LetterClaim::None,
            Reason::HandlerError | Reason::RetriesExhausted => {
                LetterClaim::Held(Some(found.payload.fingerprint()))
            }
        };
        let snapshot = state.store.snapshot();
        match (self.rules.replay)(claim, snapshot.as_ref()) {
            Replay::Republish => Some(Plan::Republish),
            Replay::Reopen { revision } => Some(Plan::Reopen { revision }),
            Replay::AlreadyDone => Some(Plan::AlreadyDone),
            Replay::InFlight | Replay::Conflict { .. } | Replay::Unknown => None,
        }
    }

    /// Carries out the replay's plan; a failed reopen CAS reads and decides
    /// again.
    fn carry_out(&self, next: &mut State) -> Option<Outcome> {
        let Operator::Replaying { letter, plan } = next.operator else {
            return None;
        };
        let payload = next.letters[letter].payload;
        if let Plan::Reopen { revision } = plan {
            // The record the runtime's stores write: `operator::reopened`.
            let found = next.store.record.as_ref().map(|stored| &stored.record);
            let record = reopened(
                found,
                Some(payload.fingerprint()),
                OPERATOR,
                next.store.now(),
            );
            let written = match revision {
                Some(revision) => next.store.update(record, revision),
                None => next.store.create(record),
            };
            if written.is_none() {
                return Some(match self.plan(next, letter) {
                    Some(plan) => {
                        next.operator = Operator::Replaying { letter, plan };
                        Outcome::Replanned(plan)
                    }
                    None => {
                        next.operator = Operator::Idle;
                        Outcome::Replayed { copy: None }
                    }
                });
            }
        }
        let copy = match plan {
            Plan::Republish | Plan::Reopen { .. } => {
                next.messages.push(Message {
                    payload,
                    copy: true,
                    settled: false,
                });
                Some(next.messages.len() - 1)
            }
            Plan::AlreadyDone => {
                if !next.applied(payload) {
                    next.ghost.letter_deleted_unapplied = true;
                }
                None
            }
        };
        next.letters[letter].alive = false;
        next.operator = Operator::Idle;
        Some(Outcome::Replayed { copy })
    }
}

impl Model for IdemModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let config = self.config;
        vec![State {
            store: Default::default(),
            messages: vec![Message {
                payload: Payload::X,
                copy: false,
                settled: false,
            }],
            letters: Vec::new(),
            workers: self
                .workers()
                .map(|_| Worker {
                    status: Status::Up,
                    job: Job::Idle,
                    remembers: [false; 2],
                })
                .collect(),
            operator: Operator::Idle,
            fixed: false,
            lapsed_revision: None,
            budget: Budget {
                lost_replies: config.lost_replies,
                crashes: config.crashes,
                freezes: config.freezes,
                faults: config.faults,
                operator: config.operator_actions,
                y_unpublished: true,
                retention: true,
            },
            ghost: Ghost::default(),
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        let budget = state.budget;
        let lossy = [false, true];
        let losses = if budget.lost_replies > 0 { 2 } else { 1 };
        if budget.y_unpublished {
            actions.push(Action::PublishY);
        }
        for worker in self.workers() {
            let w = &state.workers[worker.index()];
            match w.status {
                Status::Crashed => continue,
                Status::Frozen => {
                    actions.push(Action::Wake(worker));
                    continue;
                }
                Status::Up => {}
            }
            match &w.job {
                Job::Idle => {
                    for message in 0..state.messages.len() {
                        if state.deliverable(message) {
                            for &lose_reply in &lossy[..losses] {
                                actions.push(Action::Take {
                                    worker,
                                    message,
                                    lose_reply,
                                });
                            }
                        }
                    }
                }
                // The core's fence: the worker's own lease ran out (it was
                // frozen past it) — no step but stopping.
                Job::Running { held, core, .. }
                    if !core.upkeep().allows(if held.lapsed {
                        Time(LEASE)
                    } else {
                        Time::ZERO
                    }) =>
                {
                    for started in [false, true] {
                        actions.push(Action::StopFenced { worker, started });
                    }
                }
                Job::Running { .. } => {
                    actions.push(Action::Run {
                        worker,
                        outcome: HandlerOutcome::Ok,
                    });
                    if !state.fixed {
                        actions.push(Action::Run {
                            worker,
                            outcome: HandlerOutcome::Retryable,
                        });
                        actions.push(Action::Run {
                            worker,
                            outcome: HandlerOutcome::Permanent,
                        });
                    }
                }
                Job::Completing { .. } => {
                    actions.push(Action::Complete {
                        worker,
                        loss: Loss::Nothing,
                    });
                    if budget.lost_replies > 0 {
                        for loss in [Loss::Answer, Loss::Ack] {
                            actions.push(Action::Complete { worker, loss });
                        }
                    }
                }
                Job::DeadLettering { .. } => {
                    for &lose_ack in &lossy[..losses] {
                        actions.push(Action::PublishLetter { worker, lose_ack });
                    }
                }
                Job::MarkingDead { .. } => {
                    for &lose_term in &lossy[..losses] {
                        actions.push(Action::MarkDead { worker, lose_term });
                    }
                }
            }
            if !matches!(w.job, Job::Idle) && budget.crashes > 0 && budget.faults > 0 {
                actions.push(Action::Crash(worker));
            }
            if w.job.held().is_some() && budget.freezes > 0 && budget.faults > 0 {
                actions.push(Action::Freeze(worker));
            }
        }
        if let Some(stored) = &state.store.record {
            let lapsable = matches!(stored.record.state, ClaimState::Pending { .. })
                && state.lapsed_revision != Some(stored.revision)
                && self.worker_of(stored.record.owner).is_some_and(|owner| {
                    let w = &state.workers[owner.index()];
                    w.status != Status::Up
                        || w.job
                            .held()
                            .is_none_or(|held| held.revision != stored.revision)
                });
            if lapsable {
                actions.push(Action::LeaseRunsOut);
            }
            if budget.retention && !matches!(stored.record.state, ClaimState::Pending { .. }) {
                actions.push(Action::RetentionExpires);
            }
        }
        match state.operator {
            Operator::Replaying { .. } => actions.push(Action::ReplayCarryOut),
            Operator::Idle if budget.operator > 0 => {
                if state.store.record.is_some() {
                    actions.push(Action::Forget);
                }
                for (letter, found) in state.letters.iter().enumerate() {
                    if found.alive {
                        actions.push(Action::ReplayDecide { letter });
                    }
                }
            }
            Operator::Idle => {}
        }
        if self.config.fix && !state.fixed && state.letters.iter().any(|letter| letter.alive) {
            actions.push(Action::Fix);
        }
    }

    fn next_state(&self, last_state: &State, action: Action) -> Option<State> {
        self.step(last_state, action).map(|(state, _)| state)
    }

    fn format_action(&self, action: &Action) -> String {
        format!("{action:?}")
    }

    fn format_step(&self, last_state: &State, action: Action) -> Option<String> {
        crate::trace::describe(self, last_state, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        crate::properties::all()
    }
}
