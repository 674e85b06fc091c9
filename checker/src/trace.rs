//! Counterexamples as people read them: one line per action, naming the
//! actor, what it did and what came of it, e.g.
//! `W1 claims X (message 0) → Claimed(rev 1, attempt 1)`.

use std::fmt::Write as _;

use stateright::Model;
use stateright::Path;

use crate::model::{Action, HandlerOutcome, IdemModel, Outcome, Write};
use crate::state::{Plan, Settle, State};

/// The line for `action` taken in `state`, or `None` if it changes nothing.
pub fn describe(model: &IdemModel, state: &State, action: Action) -> Option<String> {
    let (_, outcome) = model.step(state, action)?;
    let payload = |message: usize| {
        state
            .messages
            .get(message)
            .map_or_else(|| "?".to_owned(), |m| m.payload.to_string())
    };
    let working = |worker: crate::state::WorkerId| {
        state.workers[worker.index()]
            .job
            .message()
            .map_or_else(|| "?".to_owned(), payload)
    };
    let what = match action {
        Action::PublishY => "producer publishes Y under X's key".to_owned(),
        Action::Take {
            worker, message, ..
        } => {
            let copy = if state.messages[message].copy {
                " copy"
            } else {
                ""
            };
            format!(
                "{worker} takes {}{copy} (message {message}) and claims",
                payload(message)
            )
        }
        Action::Run { worker, outcome } => {
            let how = match outcome {
                HandlerOutcome::Ok => "Ok (effect applied)",
                HandlerOutcome::Retryable => "a retryable Err",
                HandlerOutcome::Permanent => "a permanent Err",
            };
            format!("{worker} runs the handler on {}: {how}", working(worker))
        }
        Action::StopFenced { worker, started } => {
            let how = if started {
                "fenced before its next step, the message left alone"
            } else {
                "fenced before its first step, the claim given back"
            };
            format!(
                "{worker} wakes past its own lease: handler on {} {how}",
                working(worker)
            )
        }
        Action::Complete { worker, .. } => {
            format!("{worker} completes {} and acks", working(worker))
        }
        Action::PublishLetter { worker, .. } => {
            format!("{worker} publishes a dead letter of {}", working(worker))
        }
        Action::MarkDead { worker, .. } => {
            format!("{worker} marks {} dead and terms it", working(worker))
        }
        Action::Crash(worker) => format!("{worker} crashes"),
        Action::Freeze(worker) => format!("{worker} freezes"),
        Action::Wake(worker) => format!("{worker} wakes"),
        Action::LeaseRunsOut => format!(
            "the lease of the record's owner runs out ({})",
            state.store.view()
        ),
        Action::RetentionExpires => "retention expires the record".to_owned(),
        Action::Forget => format!("operator forgets the key ({})", state.store.view()),
        Action::ReplayDecide { letter } => {
            let found = state.letters[letter];
            format!(
                "operator replays letter {letter} ({} {}; store: {})",
                found.payload,
                found.reason,
                state.store.view()
            )
        }
        Action::ReplayCarryOut => format!(
            "operator carries out the replay (store: {})",
            state.store.view()
        ),
        Action::Fix => "operator fixes the handler".to_owned(),
    };
    Some(format!("{what} → {}", outcome_text(outcome)))
}

fn outcome_text(outcome: Outcome) -> String {
    match outcome {
        Outcome::Published { message } => format!("Published(message {message})"),
        Outcome::Claimed {
            revision,
            attempt,
            from,
            reply_lost,
        } => {
            let mut text = match from {
                Some(from) => {
                    format!("Reclaimed(rev {revision}, attempt {attempt}, from {from}; counted)")
                }
                None => format!("Claimed(rev {revision}, attempt {attempt})"),
            };
            if reply_lost {
                text.push_str(", answer lost: NAK");
            }
            text
        }
        Outcome::Duplicate {
            dead,
            store,
            ack_lost,
        } => {
            let kind = if dead { "Dead" } else { "Duplicate" };
            format!(
                "{kind}: ack without running (store: {store}){}",
                lost_text(ack_lost)
            )
        }
        Outcome::FromMemory { store, ack_lost } => format!(
            "Duplicate from memory: ack without running (store: {store}){}",
            lost_text(ack_lost)
        ),
        Outcome::Conflict { store } => format!("KeyConflict (store: {store})"),
        Outcome::Ran { outcome, release } => match (outcome, release) {
            (HandlerOutcome::Ok, _) => "complete next".to_owned(),
            (_, Some(write)) => format!("release: {}, NAK", write_text(write)),
            (_, None) => "dead letter next".to_owned(),
        },
        Outcome::Stopped => "message left alone".to_owned(),
        Outcome::Transition {
            write: Write::LeaseLost(store),
            settled: Some((settle, lost)),
        } => {
            let kind = match settle {
                Settle::Ack => "Ack",
                Settle::Term => "Term",
            };
            format!(
                "LeaseLost (store: {store}), yet {kind}{}: another worker's message settled",
                lost_text(lost)
            )
        }
        Outcome::Transition { write, settled } => {
            let mut text = write_text(write);
            if let Some((settle, lost)) = settled {
                let kind = match settle {
                    Settle::Ack => "Ack",
                    Settle::Term => "Term",
                };
                let _ = write!(text, ", {kind}{}", lost_text(lost));
            }
            text
        }
        Outcome::NotOurs { store } => {
            format!("claim not ours any more (store: {store}): message left alone")
        }
        Outcome::LetterStored {
            letter,
            ack_lost,
            termed,
        } => {
            if ack_lost {
                format!("letter {letter} stored, PubAck lost: NAK, key kept")
            } else if termed {
                format!("letter {letter} stored, Term")
            } else {
                format!("letter {letter} stored")
            }
        }
        Outcome::Fault => "ok".to_owned(),
        Outcome::Vanished { was } => format!("Delete (was {was})"),
        Outcome::Planned(plan) => plan_text(plan),
        Outcome::Replanned(plan) => {
            format!("reopen CAS failed; decided again: {}", plan_text(plan))
        }
        Outcome::Replayed { copy } => match copy {
            Some(message) => format!("republished as message {message}, letter deleted"),
            None => "letter deleted".to_owned(),
        },
        Outcome::Fixed => "ok".to_owned(),
    }
}

fn lost_text(lost: bool) -> &'static str {
    if lost { " (lost: redelivered)" } else { "" }
}

fn write_text(write: Write) -> String {
    match write {
        Write::Applied(revision) => format!("Applied(rev {revision})"),
        Write::AnswerLost(revision) => format!("written (rev {revision}), answer lost: retry"),
        Write::FoundOwn => "Applied (found its own earlier write)".to_owned(),
        Write::LeaseLost(store) => format!("LeaseLost (store: {store}): message left alone"),
    }
}

fn plan_text(plan: Plan) -> String {
    match plan {
        Plan::Republish => "Republish".to_owned(),
        Plan::Reopen {
            revision: Some(revision),
        } => format!("Reopen(rev {revision})"),
        Plan::Reopen { revision: None } => "Reopen(create)".to_owned(),
        Plan::AlreadyDone => "AlreadyDone".to_owned(),
    }
}

/// The whole path, one numbered line per action.
pub fn render(model: &IdemModel, path: &Path<State, Action>) -> Vec<String> {
    path.clone()
        .into_vec()
        .into_iter()
        .filter_map(|(state, action)| {
            let action = action?;
            Some(
                model
                    .format_step(&state, action)
                    .unwrap_or_else(|| format!("{action:?} → (no change)")),
            )
        })
        .enumerate()
        .map(|(i, line)| {
            let mut numbered = String::new();
            let _ = write!(numbered, "{:>2}. {line}", i + 1);
            numbered
        })
        .collect()
}
