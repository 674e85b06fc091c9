//! A request's decisions (request/reply services): the same claim as a
//! stream's delivery, but its end is a reply, not an acknowledgement — the
//! first request with a key runs and its result is stored with the
//! completion; a repeat gets the stored reply; one arriving while the first
//! runs looks again, at most a lease; a refusal, a failure or an
//! unreachable store is an error reply of a [`ReplyErrorKind`].

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use super::{Hold, Note, Notes, Outcome, Recorded, Rules, RunEnd, Stopped, completion_pause};
use crate::claim::{Grant, Refusal};
use crate::reply::ReplyErrorKind;

/// How often a request looks again at a key another request holds.
pub const LOOK_AGAIN: Duration = Duration::from_millis(25);

/// What a request is answered with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Answer {
    /// The handler's (stored) result.
    Result(Bytes),
    /// An error of a kind the requester can act on, with its text.
    Error(ReplyErrorKind, String),
}

impl Answer {
    fn error(kind: ReplyErrorKind, text: impl fmt::Display) -> Self {
        Answer::Error(kind, text.to_string())
    }
}

/// One step of a request: what to do, and what to count first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestStep {
    /// What to do.
    pub next: RequestNext,
    /// What to count first.
    pub notes: Notes,
}

/// What to do next for a request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RequestNext {
    /// Record completion with the reply's body as the stored result.
    Complete(Answering),
    /// Wait `pause`, then record completion again.
    CompleteAfter(Answering, Duration),
    /// Release the claim (a failed run), then reply `answer`; a claim
    /// found taken over is noted as lost.
    Release(Answer),
    /// Give the claim back uncounted (the handler never started), then
    /// reply.
    GiveBack,
    /// Reply.
    Reply(Answer),
    /// Leave the claim as it is (a transaction rolled back), then reply.
    AbandonThenReply(Answer),
}

impl RequestStep {
    fn to(next: RequestNext, notes: &[Note]) -> Self {
        Self {
            next,
            notes: Notes::of(notes),
        }
    }

    fn reply(answer: Answer, notes: &[Note]) -> Self {
        Self::to(RequestNext::Reply(answer), notes)
    }
}

/// A request that has arrived.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Asked;

impl Asked {
    /// Its arguments or key could not be made: asking again cannot cure it.
    pub fn rejected(self, why: &dyn fmt::Display) -> RequestStep {
        RequestStep::reply(
            Answer::error(ReplyErrorKind::BadRequest, why),
            &[Note::Count(Outcome::Rejected)],
        )
    }

    /// The store could not be reached: the handler did not run.
    pub fn store_failed(self, error: &dyn fmt::Display) -> RequestStep {
        RequestStep::reply(
            Answer::error(
                ReplyErrorKind::StoreUnavailable,
                format!("dedup store unavailable, the handler did not run: {error}"),
            ),
            &[Note::NotRun],
        )
    }

    /// `dedup = off`: the handler runs at once, holding nothing.
    pub fn unclaimed(self) -> RequestRunning {
        RequestRunning {
            hold: Hold::Nothing,
        }
    }

    /// The store granted the claim: run the handler (a takeover noted).
    pub fn granted(self, rules: &Rules, grant: &Grant) -> (RequestRunning, Notes) {
        let noted = match grant {
            Grant::Claimed(_) => None,
            Grant::Reclaimed { from, .. } => Some(Note::Reclaimed { from: *from }),
        };
        (
            RequestRunning { hold: rules.hold() },
            Notes::of(noted.as_slice()),
        )
    }

    /// The store refused the claim; `may_wait`: the request may still wait
    /// for a key another request holds (a lease from its arrival).
    /// `Err(after)`: another request holds the key — look again after this
    /// long (with a claim of its own: nothing of this look is kept).
    pub fn refused(self, refusal: &Refusal, may_wait: bool) -> Result<RequestStep, Duration> {
        Ok(match refusal {
            Refusal::InFlight { .. } if may_wait => return Err(LOOK_AGAIN),
            Refusal::Duplicate { result } => RequestStep::reply(
                match result {
                    Some(result) => Answer::Result(result.clone()),
                    None => Answer::error(
                        ReplyErrorKind::OutcomeUnknown,
                        "the key completed without a stored result (before the handler was served as a service?)",
                    ),
                },
                &[Note::Count(Outcome::Duplicate)],
            ),
            Refusal::KeyConflict { stored } => RequestStep::reply(
                Answer::error(
                    ReplyErrorKind::KeyConflict,
                    format!(
                        "key already used with another request (stored fingerprint {})",
                        stored.map_or_else(|| "none".to_owned(), |f| f.to_string())
                    ),
                ),
                &[Note::Count(Outcome::KeyConflict)],
            ),
            Refusal::Dead => RequestStep::reply(
                Answer::error(
                    ReplyErrorKind::Dead,
                    "the key's request failed for good earlier",
                ),
                &[Note::Count(Outcome::Duplicate)],
            ),
            Refusal::InFlight { retry_after, .. } => RequestStep::reply(
                Answer::error(
                    ReplyErrorKind::InFlight,
                    format!(
                        "the key's first request is still running; ask again in {retry_after:?}"
                    ),
                ),
                &[Note::Count(Outcome::InFlightElsewhere)],
            ),
        })
    }
}

/// The handler runs for a request.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestRunning {
    hold: Hold,
}

impl RequestRunning {
    /// The run ended.
    pub fn ended(self, end: RunEnd<'_>) -> RequestStep {
        match end {
            RunEnd::Returned { result } => {
                let body = result.unwrap_or_default();
                if self.hold == Hold::Nothing {
                    return RequestStep::reply(
                        Answer::Result(body),
                        &[Note::Count(Outcome::Processed)],
                    );
                }
                RequestStep::to(RequestNext::Complete(Answering { body, failed: 0 }), &[])
            }
            // A failed run: the key released (asking again runs it again)
            // and the failure replied with its kind.
            RunEnd::Failed { error, .. } if error.is_permanent() => RequestStep::to(
                RequestNext::Release(Answer::error(ReplyErrorKind::Rejected, error)),
                &[Note::Count(Outcome::Rejected)],
            ),
            RunEnd::Failed { error, .. } => RequestStep::to(
                RequestNext::Release(Answer::error(ReplyErrorKind::Failed, error)),
                &[Note::Count(Outcome::Retried)],
            ),
            RunEnd::Stopped(Stopped::CutOff) => RequestStep::to(
                RequestNext::AbandonThenReply(Answer::error(
                    ReplyErrorKind::ShuttingDown,
                    "the endpoint shut down while the handler ran",
                )),
                &[Note::Count(Outcome::Interrupted)],
            ),
            RunEnd::Stopped(Stopped::Fenced { started: false }) => {
                RequestStep::to(RequestNext::GiveBack, &[])
            }
            RunEnd::Stopped(stopped @ (Stopped::Fenced { started: true } | Stopped::TakenOver)) => {
                RequestStep::reply(
                    Answer::error(ReplyErrorKind::OutcomeUnknown, stopped.why()),
                    &[Note::LeaseLost(stopped.why())],
                )
            }
        }
    }
}

/// The claim given back after a handler that never started: `ours`, or a
/// reader had taken the key over meanwhile.
pub fn given_back(ours: bool) -> RequestStep {
    if ours {
        RequestStep::reply(
            Answer::error(
                ReplyErrorKind::StoreUnavailable,
                "the claim was answered only after its lease ran out: the handler did not run",
            ),
            &[Note::Count(Outcome::StoreUnavailable)],
        )
    } else {
        let why = "the claim was answered after its lease, and taken over";
        RequestStep::reply(
            Answer::error(ReplyErrorKind::OutcomeUnknown, why),
            &[Note::LeaseLost(why)],
        )
    }
}

/// A failed run's release came back: `ours`, or the claim had been taken
/// over (then noted lost; the failure is replied either way).
pub fn released(answer: Answer, ours: bool) -> RequestStep {
    let lost = [Note::LeaseLost(
        "the claim was taken over before the failure was recorded",
    )];
    RequestStep::reply(answer, if ours { &[] } else { &lost })
}

/// A request's completion is being recorded, with its reply's body as the
/// stored result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Answering {
    body: Bytes,
    failed: u32,
}

impl Answering {
    /// The body to store and reply.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The store answered.
    pub fn answered(self, recorded: Recorded<'_>) -> RequestStep {
        match recorded {
            Recorded::Yes => RequestStep::reply(
                Answer::Result(self.body),
                &[Note::Count(Outcome::Processed)],
            ),
            // This run's body is not what the key records (the record is
            // its successor's, or gone): a repeat could be answered
            // differently. Say so; asking again gets the key's answer.
            Recorded::LeaseLost => RequestStep::reply(
                Answer::error(
                    ReplyErrorKind::OutcomeUnknown,
                    "the claim was taken over before this run's completion was recorded: \
                     the key's outcome is the other run's; ask again for it",
                ),
                &[Note::LeaseLost(
                    "lease lost before completion: another request may have run it too",
                )],
            ),
            Recorded::Aborted { error } => RequestStep::to(
                RequestNext::Release(Answer::error(
                    ReplyErrorKind::Failed,
                    format!("the transaction did not commit: {}", error.error()),
                )),
                &[Note::Count(Outcome::Retried)],
            ),
            Recorded::No { why } => RequestStep::reply(
                Answer::error(
                    ReplyErrorKind::OutcomeUnknown,
                    format!("the handler ran but its completion was not recorded: {why}"),
                ),
                &[Note::Count(Outcome::StoreUnavailable)],
            ),
            Recorded::StoreFailed => {
                let failed = self.failed.saturating_add(1);
                RequestStep::to(
                    RequestNext::CompleteAfter(
                        Answering { failed, ..self },
                        completion_pause(failed),
                    ),
                    &[],
                )
            }
            Recorded::ShutDown => RequestStep::to(
                RequestNext::AbandonThenReply(Answer::error(
                    ReplyErrorKind::OutcomeUnknown,
                    "shut down before the completion was recorded",
                )),
                &[Note::Count(Outcome::StoreUnavailable)],
            ),
        }
    }
}
