//! The model's state: the store's one record, the broker's messages, the
//! dead letters, the workers, the operator, the fault budgets, and the ghost
//! counters the properties read.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use idem::claim::{ClaimRecord, ClaimState, Owner, Snapshot};
use idem::clock::UnixMillis;
use idem::delivery_core as core;
use idem::fingerprint::Fingerprint;

/// The two payloads published under the one key: `X` first, `Y` reusing the
/// key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Payload {
    /// The first payload.
    X,
    /// Another payload under the same key.
    Y,
}

impl Payload {
    /// Both payloads.
    pub const ALL: [Payload; 2] = [Payload::X, Payload::Y];

    /// Its index in per-payload arrays.
    pub fn index(self) -> usize {
        match self {
            Payload::X => 0,
            Payload::Y => 1,
        }
    }

    /// Its fingerprint, as the runtime computes it (once).
    pub fn fingerprint(self) -> Fingerprint {
        static FINGERPRINTS: LazyLock<[Fingerprint; 2]> =
            LazyLock::new(|| [Fingerprint::of(b"X"), Fingerprint::of(b"Y")]);
        FINGERPRINTS[self.index()]
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A worker, by index (`W1` is index 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkerId(pub u8);

impl WorkerId {
    /// Its owner identity in claim records: a fixed UUID, one per worker.
    pub fn owner(self) -> Owner {
        Owner::from_uuid(uuid::Uuid::from_u128(u128::from(self.0) + 1))
    }

    /// Its index in [`State::workers`].
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "W{}", u16::from(self.0) + 1)
    }
}

/// A claim record as the store holds it, with its revision. (A newtype
/// because `ClaimRecord` has no `Hash`, which the checker needs.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The record, of the runtime's own type.
    pub record: ClaimRecord,
    /// Its revision: the CAS token.
    pub revision: u64,
}

impl Stored {
    /// As the runtime's `Snapshot`.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            record: self.record.clone(),
            revision: self.revision,
        }
    }
}

impl Hash for Stored {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let record = &self.record;
        match record.state {
            ClaimState::Pending { lease_until } => (0u8, lease_until).hash(state),
            ClaimState::Released => 1u8.hash(state),
            ClaimState::Done => 2u8.hash(state),
            ClaimState::Dead => 3u8.hash(state),
        }
        record.owner.hash(state);
        record.attempt.hash(state);
        record.fingerprint.hash(state);
        record.result.hash(state);
        record.created_at.hash(state);
        record.updated_at.hash(state);
        self.revision.hash(state);
    }
}

/// The dedup store: one record for the one key, and the last revision it
/// handed out (revisions only grow, across deletes too).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Store {
    /// The record, if any.
    pub record: Option<Stored>,
    /// The last revision written (0: none yet).
    pub last_revision: u64,
}

impl Store {
    /// The model's abstract clock: every write happens one second after the
    /// last, so the time of the next write follows from the revisions.
    pub fn now(&self) -> UnixMillis {
        UnixMillis(1_000 * (self.last_revision + 1))
    }

    /// What a reader gets.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.record.as_ref().map(Stored::snapshot)
    }

    /// Writes `record` if the key is absent.
    pub fn create(&mut self, record: ClaimRecord) -> Option<u64> {
        match self.record {
            Some(_) => None,
            None => Some(self.put(record)),
        }
    }

    /// Writes `record` if the key is at `revision` (compare-and-set).
    pub fn update(&mut self, record: ClaimRecord, revision: u64) -> Option<u64> {
        match &self.record {
            Some(stored) if stored.revision == revision => Some(self.put(record)),
            _ => None,
        }
    }

    /// Deletes the record if it is at `revision`.
    pub fn delete(&mut self, revision: u64) -> bool {
        match &self.record {
            Some(stored) if stored.revision == revision => {
                self.last_revision += 1;
                self.record = None;
                true
            }
            _ => false,
        }
    }

    fn put(&mut self, record: ClaimRecord) -> u64 {
        self.last_revision += 1;
        self.record = Some(Stored {
            record,
            revision: self.last_revision,
        });
        self.last_revision
    }

    /// The payload and phase of the record, for traces and properties.
    pub fn view(&self) -> StoreView {
        match &self.record {
            None => StoreView::Absent,
            Some(stored) => StoreView::Record {
                phase: Phase::of(&stored.record.state),
                payload: payload_of(stored.record.fingerprint.as_ref()),
                revision: stored.revision,
            },
        }
    }
}

/// The payload a stored fingerprint belongs to (the model always stores
/// one).
pub fn payload_of(fingerprint: Option<&Fingerprint>) -> Option<Payload> {
    let fingerprint = fingerprint?;
    Payload::ALL
        .into_iter()
        .find(|payload| payload.fingerprint() == *fingerprint)
}

/// A record's state without its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `pending`.
    Pending,
    /// `released`.
    Released,
    /// `done`.
    Done,
    /// `dead`.
    Dead,
}

impl Phase {
    /// The phase of a state.
    pub fn of(state: &ClaimState) -> Self {
        match state {
            ClaimState::Pending { .. } => Phase::Pending,
            ClaimState::Released => Phase::Released,
            ClaimState::Done => Phase::Done,
            ClaimState::Dead => Phase::Dead,
        }
    }
}

/// What the store held at some moment, in short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreView {
    /// No record.
    Absent,
    /// A record.
    Record {
        /// Its state.
        phase: Phase,
        /// Its payload, if it has a known fingerprint.
        payload: Option<Payload>,
        /// Its revision.
        revision: u64,
    },
}

impl StoreView {
    /// Whether this is a `done` or `dead` record of `payload`: what a
    /// duplicate answer for it must stand on.
    pub fn backs_duplicate_of(self, payload: Payload) -> bool {
        matches!(
            self,
            StoreView::Record { phase: Phase::Done | Phase::Dead, payload: Some(p), .. } if p == payload
        )
    }
}

impl fmt::Display for StoreView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreView::Absent => f.write_str("absent"),
            StoreView::Record {
                phase,
                payload,
                revision,
            } => {
                let phase = match phase {
                    Phase::Pending => "pending",
                    Phase::Released => "released",
                    Phase::Done => "done",
                    Phase::Dead => "dead",
                };
                match payload {
                    Some(payload) => write!(f, "{phase} {payload} (rev {revision})"),
                    None => write!(f, "{phase} (rev {revision})"),
                }
            }
        }
    }
}

/// A message in the broker, redelivered until it is acknowledged or
/// terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Message {
    /// Its payload (the key is the same for all).
    pub payload: Payload,
    /// Whether it is an operator's republished copy of a dead letter.
    pub copy: bool,
    /// Acknowledged or terminated: never delivered again.
    pub settled: bool,
}

/// Why a message was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Another payload owns the key; the message never held a claim.
    KeyConflict,
    /// The handler failed permanently.
    HandlerError,
    /// The last attempt failed retryably.
    RetriesExhausted,
}

impl Reason {
    /// The model's name for the reason the core dead-lettered with. The
    /// model's handler never panics and its payloads always decode, so the
    /// core gives only these three.
    pub fn of(reason: idem::handler::DeadLetterReason) -> Self {
        use idem::handler::DeadLetterReason as Core;
        match reason {
            Core::KeyConflict => Reason::KeyConflict,
            Core::HandlerError => Reason::HandlerError,
            Core::RetriesExhausted => Reason::RetriesExhausted,
            other => panic!("the core dead-lettered for {other:?}, which the model never causes"),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::KeyConflict => "key_conflict",
            Reason::HandlerError => "handler_error",
            Reason::RetriesExhausted => "retries_exhausted",
        })
    }
}

/// A dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Letter {
    /// The original's payload.
    pub payload: Payload,
    /// Why.
    pub reason: Reason,
    /// Not deleted by a replay.
    pub alive: bool,
}

/// Whether a worker process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Running.
    Up,
    /// Frozen (a GC pause, a stopped VM): keeps its memory, takes no step.
    Frozen,
    /// Gone, with everything it held in memory.
    Crashed,
}

/// A claim a worker holds, as the runtime's `Claim` remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Held {
    /// The revision it was granted at (the fencing token).
    pub revision: u64,
    /// The record's attempt count.
    pub attempt: u32,
    /// When the key was first claimed.
    pub created_at: UnixMillis,
    /// The worker's own lease ran out (it was frozen past it): it is fenced.
    pub lapsed: bool,
    /// Ghost: another worker took this claim over.
    pub superseded: bool,
}

/// How a worker lets a message go for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Settle {
    /// Acknowledge.
    Ack,
    /// Terminate (after a dead letter).
    Term,
}

/// What a worker is doing with one delivery: the delivery core's state
/// (`idem::delivery_core`), which makes every decision, beside the claim the
/// model tracks for its properties.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Job {
    /// Nothing: ready for a delivery.
    Idle,
    /// Claimed: the handler runs next.
    Running {
        /// The message.
        message: usize,
        /// The claim.
        held: Held,
        /// The core's run.
        core: core::Running,
    },
    /// The handler succeeded: record completion next.
    Completing {
        /// The message.
        message: usize,
        /// The claim.
        held: Held,
        /// The core's completion.
        core: core::Completing,
    },
    /// Confirm the claim (if any) and publish a dead letter next.
    DeadLettering {
        /// The message.
        message: usize,
        /// The claim, unless it is a key conflict.
        held: Option<Held>,
        /// The core's step: confirm the claim first, or publish.
        core: LetterStep,
    },
    /// The letter is stored: mark the key dead next.
    MarkingDead {
        /// The message.
        message: usize,
        /// The claim.
        held: Held,
        /// The core's ending.
        core: core::Closing,
    },
}

/// Where a worker's dead letter stands in the core.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LetterStep {
    /// The claim is to be confirmed first (a fenced claim).
    Confirm(core::Confirming),
    /// The letter is to be published.
    Publish(core::Publishing),
}

impl Job {
    /// The message it works on.
    pub fn message(&self) -> Option<usize> {
        match *self {
            Job::Idle => None,
            Job::Running { message, .. }
            | Job::Completing { message, .. }
            | Job::DeadLettering { message, .. }
            | Job::MarkingDead { message, .. } => Some(message),
        }
    }

    /// The claim it holds.
    pub fn held(&self) -> Option<Held> {
        match *self {
            Job::Idle => None,
            Job::DeadLettering { held, .. } => held,
            Job::Running { held, .. }
            | Job::Completing { held, .. }
            | Job::MarkingDead { held, .. } => Some(held),
        }
    }

    /// The claim it holds, to change.
    pub fn held_mut(&mut self) -> Option<&mut Held> {
        match self {
            Job::Idle => None,
            Job::DeadLettering { held, .. } => held.as_mut(),
            Job::Running { held, .. }
            | Job::Completing { held, .. }
            | Job::MarkingDead { held, .. } => Some(held),
        }
    }
}

/// One worker process.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Worker {
    /// Running, frozen or crashed.
    pub status: Status,
    /// Its delivery.
    pub job: Job,
    /// Payloads whose completion it recorded (by index), used only when the
    /// rules answer duplicates from memory.
    pub remembers: [bool; 2],
}

/// What the operator's replay decided, to carry out in a later step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plan {
    /// Republish the payload, then delete the letter.
    Republish,
    /// Reopen the key for the letter's payload — CAS at `revision` (a
    /// `dead` or `released` record), or create it (`None`) — republish,
    /// delete the letter.
    Reopen {
        /// The revision read (`None`: absent).
        revision: Option<u64>,
    },
    /// Delete the letter.
    AlreadyDone,
}

/// The operator's tool, between reading and writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    /// Not running.
    Idle,
    /// `idem dead replay` decided `plan` for a letter.
    Replaying {
        /// The letter's index.
        letter: usize,
        /// What it decided.
        plan: Plan,
    },
}

/// What is left of each bounded nondeterministic choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Budget {
    /// Replies (claim, completion, ack/term, PubAck) that may still be lost.
    pub lost_replies: u8,
    /// Crashes left.
    pub crashes: u8,
    /// Freezes left.
    pub freezes: u8,
    /// Crashes and freezes left, together.
    pub faults: u8,
    /// Operator actions (forget, replay) left.
    pub operator: u8,
    /// Whether `Y` can still be published.
    pub y_unpublished: bool,
    /// Whether a record may still expire.
    pub retention: bool,
}

/// Ghost state: what happened, for the properties; no actor reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ghost {
    /// Effect applications per payload.
    pub applications: [u8; 2],
    /// Executed `Reclaim` decisions per payload (counted takeovers).
    pub takeovers: [u8; 2],
    /// `done` records of the payload that vanished (forgotten or expired):
    /// after one, the payload runs again by design.
    pub forgotten_done: [u8; 2],
    /// The payload that claimed the key first since it was last absent.
    pub first_claimer: Option<Payload>,
    /// A payload other than the first claimer was applied.
    pub foreign_applied: bool,
    /// A letter was deleted while its payload was neither applied nor
    /// republished.
    pub letter_deleted_unapplied: bool,
    /// A worker whose claim was taken over applied an effect or wrote.
    pub fenced_violation: bool,
    /// A duplicate answer was given without a `done`/`dead` record of that
    /// payload in the store.
    pub unbacked_duplicate: bool,
}

/// The whole state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The dedup store.
    pub store: Store,
    /// Every message ever published, in order.
    pub messages: Vec<Message>,
    /// Every dead letter ever published, in order.
    pub letters: Vec<Letter>,
    /// The workers.
    pub workers: Vec<Worker>,
    /// The operator's tool.
    pub operator: Operator,
    /// The operator fixed the handler: no payload fails any more.
    pub fixed: bool,
    /// The pending revision every reader has now watched unchanged for a
    /// full lease (its owner's lease ran out).
    pub lapsed_revision: Option<u64>,
    /// What is left of the bounded choices.
    pub budget: Budget,
    /// What the properties read.
    pub ghost: Ghost,
}

impl State {
    /// Whether `message` may be delivered: unsettled, and no running worker
    /// holds it (a frozen worker's delivery times out and is redelivered).
    pub fn deliverable(&self, message: usize) -> bool {
        self.messages.get(message).is_some_and(|m| !m.settled)
            && !self
                .workers
                .iter()
                .any(|w| w.status == Status::Up && w.job.message() == Some(message))
    }

    /// Every message is acknowledged or terminated: nothing more will run
    /// unless the operator republishes.
    pub fn settled(&self) -> bool {
        self.messages.iter().all(|m| m.settled)
    }

    /// Whether a live dead letter holds `payload`.
    pub fn has_live_letter(&self, payload: Payload) -> bool {
        self.letters
            .iter()
            .any(|letter| letter.alive && letter.payload == payload)
    }

    /// Whether `payload` was applied at least once.
    pub fn applied(&self, payload: Payload) -> bool {
        self.ghost.applications[payload.index()] > 0
    }
}
