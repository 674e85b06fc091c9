//! The core's decisions, one path each, driven as an executor would.

use std::time::Duration;

use super::*;
use crate::claim::{Claim, Transition};
use crate::clock::UnixMillis;
use crate::key::{HandlerName, IdempotencyKey, RecordKey};

const LEASE: Duration = Duration::from_secs(3);

fn rules(level: Dedup) -> Rules {
    Rules {
        lease: LEASE,
        retry: Retry::fixed(Duration::from_secs(1)).attempts(2),
        level,
        on_duplicate: false,
        on_missing_key: OnMissingKey::DeadLetter,
    }
}

fn at(millis: u64) -> Time {
    Time(Duration::from_millis(millis))
}

fn claim(attempt: u32) -> Claim {
    Claim {
        key: RecordKey::new(
            &HandlerName::new("h").expect("name"),
            &IdempotencyKey::new("k").expect("key"),
        ),
        owner: Owner::random(),
        revision: 7,
        lease: LEASE,
        lease_until: Some(UnixMillis(3_000)),
        attempt,
        fingerprint: None,
        created_at: UnixMillis(0),
    }
}

/// Claims at 0 ms, granted at `now`, at `attempt`.
fn running(rules: &Rules, attempt: u32, now: Time) -> Running {
    Arrival::new(1)
        .claiming(at(0), false)
        .granted(rules, &Grant::Claimed(claim(attempt)), now)
        .running
}

/// A fenced claim's handler declined for good, its claim confirmed: the
/// letter is to be stored.
fn declined_and_confirmed(rules: &Rules) -> Publishing {
    let error = HandlerError::permanent("declined");
    let step = running(rules, 1, at(0)).ended(
        rules,
        RunEnd::Failed {
            error: &error,
            lock_conflict: false,
        },
    );
    let Next::Confirm(confirming) = step.next else {
        panic!("not confirmed: {step:?}");
    };
    match confirming.answered(rules, Some(true)).next {
        Next::Publish(publishing) => publishing,
        other => panic!("not published: {other:?}"),
    }
}

fn notes(step: &Step) -> Vec<Note> {
    step.notes.iter().collect()
}

#[test]
fn a_returned_run_is_recorded_then_acknowledged() {
    let rules = rules(Dedup::Kv);
    let step = running(&rules, 1, at(10)).ended(&rules, RunEnd::Returned { result: None });
    let Next::Complete(completing) = step.next else {
        panic!("not completed: {step:?}");
    };
    let step = completing.answered(&rules, Recorded::Yes);
    assert_eq!(step.next, Next::Settle(Settle::AckRecorded));
    assert_eq!(notes(&step), [Note::Count(Outcome::Processed)]);
}

#[test]
fn an_unclaimed_run_is_acknowledged_with_confirmation() {
    let rules = rules(Dedup::Off);
    let step = Arrival::new(1)
        .unclaimed(&rules, at(0))
        .ended(&rules, RunEnd::Returned { result: None });
    assert_eq!(step.next, Next::Settle(Settle::Ack));
}

#[test]
fn a_completion_the_store_cannot_record_is_retried_with_growing_pauses() {
    let rules = rules(Dedup::Kv);
    let Next::Complete(completing) = running(&rules, 1, at(0))
        .ended(&rules, RunEnd::Returned { result: None })
        .next
    else {
        panic!("not completed");
    };
    let Next::CompleteAfter(again, first) = completing.answered(&rules, Recorded::StoreFailed).next
    else {
        panic!("not retried");
    };
    let Next::CompleteAfter(_, second) = again.answered(&rules, Recorded::StoreFailed).next else {
        panic!("not retried");
    };
    assert_eq!((first, second), (completion_pause(1), completion_pause(2)));
    assert!(second > first);
}

#[test]
fn a_retryable_failure_releases_the_claim_then_naks_with_the_policys_delay() {
    let rules = rules(Dedup::Kv);
    let error = HandlerError::retryable("timeout");
    let step = running(&rules, 1, at(0)).ended(
        &rules,
        RunEnd::Failed {
            error: &error,
            lock_conflict: false,
        },
    );
    let Next::Close(closing) = step.next else {
        panic!("not released: {step:?}");
    };
    assert_eq!(closing.ending(), Ending::Released);
    let step = closing.ended(&rules, true);
    assert_eq!(step.next, Next::Settle(Settle::Nak(Duration::from_secs(1))));
    assert_eq!(notes(&step), [Note::Count(Outcome::Retried)]);
}

#[test]
fn the_last_failure_of_a_fenced_claim_is_confirmed_stored_marked_dead_then_termed() {
    let rules = rules(Dedup::Kv);
    let error = HandlerError::retryable("timeout");
    let step = running(&rules, 2, at(0)).ended(
        &rules,
        RunEnd::Failed {
            error: &error,
            lock_conflict: false,
        },
    );
    let Next::Confirm(confirming) = step.next else {
        panic!("not confirmed first: {step:?}");
    };
    let Next::Publish(publishing) = confirming.answered(&rules, Some(true)).next else {
        panic!("not published");
    };
    assert_eq!(publishing.reason(), DeadLetterReason::RetriesExhausted);
    assert_eq!(publishing.error(), "retryable: timeout");
    assert_eq!(publishing.attempts(), 2);
    let Next::Close(closing) = publishing.stored(&rules, true).next else {
        panic!("not marked dead");
    };
    assert_eq!(closing.ending(), Ending::Dead);
    let step = closing.ended(&rules, true);
    assert_eq!(step.next, Next::Settle(Settle::Term));
    assert_eq!(notes(&step), [Note::Count(Outcome::DeadLettered)]);
}

#[test]
fn a_dead_mark_that_finds_the_claim_taken_over_sends_no_term() {
    let rules = rules(Dedup::Kv);
    let publishing = declined_and_confirmed(&rules);
    let Next::Close(closing) = publishing.stored(&rules, true).next else {
        panic!("not marked dead");
    };
    let step = closing.ended(&rules, false);
    assert_eq!(step.next, Next::Settle(Settle::Leave));
    assert!(matches!(notes(&step)[..], [Note::LeaseLost(_)]));
}

#[test]
fn a_letter_that_cannot_be_stored_keeps_the_key_and_the_message_comes_back_after_the_lease() {
    let rules = rules(Dedup::Kv);
    let publishing = declined_and_confirmed(&rules);
    let Next::Close(closing) = publishing.stored(&rules, false).next else {
        panic!("not kept");
    };
    assert_eq!(closing.ending(), Ending::Kept);
    let step = closing.ended(&rules, true);
    assert_eq!(step.next, Next::Settle(Settle::Nak(LEASE)));
    assert_eq!(notes(&step), [Note::Count(Outcome::DeadLetterFailed)]);
}

#[test]
fn a_fenced_handler_is_left_to_the_new_owner_or_given_back_if_it_never_started() {
    let rules = rules(Dedup::Kv);
    let mut run = running(&rules, 1, at(100));
    assert!(run.upkeep().allows(at(2_999)));
    assert!(
        !run.upkeep().allows(at(3_000)),
        "the lease counts from the question"
    );
    let renewal = run
        .upkeep_mut()
        .on_timer(at(1_100))
        .expect("a renewal is due");
    assert!(
        run.upkeep_mut()
            .on_renewed(renewal, &Renewed::Answered(Transition::Applied))
    );
    assert!(run.upkeep().allows(at(4_000)));
    let step = run
        .clone()
        .ended(&rules, RunEnd::Stopped(Stopped::Fenced { started: true }));
    assert_eq!(step.next, Next::Settle(Settle::Leave));
    let Next::GiveBack(giving) = run
        .ended(&rules, RunEnd::Stopped(Stopped::Fenced { started: false }))
        .next
    else {
        panic!("not given back");
    };
    // The store's backoff (jittered): not an attempt.
    let step = giving.given(true);
    assert!(
        matches!(step.next, Next::Settle(Settle::Nak(_))),
        "{step:?}"
    );
    assert_eq!(notes(&step), [Note::Count(Outcome::StoreUnavailable)]);
}

#[test]
fn a_lock_conflict_beside_groups_runs_again_apart_uncounted() {
    let rules = rules(Dedup::Transactional);
    let run = Arrival::new(1)
        .claiming(at(0), true)
        .granted(&rules, &Grant::Claimed(claim(1)), at(0))
        .running;
    let error = HandlerError::retryable("deadlock detected");
    let Next::GiveBack(giving) = run
        .ended(
            &rules,
            RunEnd::Failed {
                error: &error,
                lock_conflict: true,
            },
        )
        .next
    else {
        panic!("not given back");
    };
    let step = giving.given(true);
    assert_eq!(step.next, Next::Settle(Settle::Again));
    assert_eq!(notes(&step), [Note::Count(Outcome::LockConflict)]);
}

#[test]
fn refusals_are_answered_without_running() {
    let rules = rules(Dedup::Kv);
    let claiming = Arrival::new(3).claiming(at(0), false);
    let answered = |refusal: &Refusal| match claiming.refused(&rules, refusal) {
        Refused::Answered(step) => step,
        hook @ Refused::Hook { .. } => panic!("no hook: {hook:?}"),
    };
    let duplicate = answered(&Refusal::Duplicate { result: None });
    assert_eq!(duplicate.next, Next::Settle(Settle::AckRecorded));
    let in_flight = answered(&Refusal::InFlight {
        owner: None,
        retry_after: Duration::from_secs(2),
    });
    assert_eq!(
        in_flight.next,
        Next::Settle(Settle::Nak(in_flight_delay(3, Duration::from_secs(2))))
    );
    let Next::Publish(conflict) = answered(&Refusal::KeyConflict { stored: None }).next else {
        panic!("not dead-lettered");
    };
    assert_eq!(conflict.reason(), DeadLetterReason::KeyConflict);
    assert_eq!(conflict.hold(), Hold::Nothing);
    assert!(
        conflict.error().contains("another payload"),
        "{}",
        conflict.error()
    );
    let step = conflict.stored(&rules, true);
    assert_eq!(step.next, Next::Settle(Settle::Term));
}

#[test]
fn a_delivery_without_a_key_is_dropped_only_when_the_handler_says_reject() {
    let mut rules = rules(Dedup::Kv);
    let step = Arrival::new(1).rejected(&rules, true, DeadLetterReason::MissingKey, &"no key");
    assert!(matches!(step.next, Next::Publish(_)));
    rules.on_missing_key = OnMissingKey::Reject;
    let step = Arrival::new(1).rejected(&rules, true, DeadLetterReason::MissingKey, &"no key");
    assert_eq!(step.next, Next::Settle(Settle::Ack));
    assert_eq!(notes(&step), [Note::Count(Outcome::Rejected)]);
}

#[test]
fn a_group_member_is_acknowledged_released_or_run_again_alone_as_its_group_ended() {
    let rules = rules(Dedup::Transactional);
    let arrival = Arrival::new(1);
    let ok = MemberRun::Returned { result: None };
    assert_eq!(
        ok.vote(),
        Vote::Commit { result: None },
        "a returned run votes to commit"
    );
    let committed = arrival.after_group(&rules, 1, GroupEnded::Committed, &ok, false);
    assert_eq!(committed.next, Next::Settle(Settle::AckRecorded));
    // Its own failure with attempts left: released on its own, NAKed.
    let error = HandlerError::retryable("timeout");
    let own = MemberRun::Failed {
        error: &error,
        lock_conflict: false,
        for_another: false,
    };
    assert_eq!(own.vote(), Vote::RollBack);
    let Next::Close(closing) = arrival
        .after_group(&rules, 1, GroupEnded::RolledBack, &own, false)
        .next
    else {
        panic!("not released");
    };
    assert_eq!(closing.ending(), Ending::Released);
    // Its last failure: run again alone, where the key stays locked to the
    // dead mark.
    let last = arrival.after_group(&rules, 2, GroupEnded::RolledBack, &own, false);
    assert_eq!(last.next, Next::Settle(Settle::RunAlone));
    // A lock conflict is the grouping's: not counted against it.
    let conflict = MemberRun::Failed {
        error: &error,
        lock_conflict: true,
        for_another: false,
    };
    let step = arrival.after_group(&rules, 2, GroupEnded::RolledBack, &conflict, false);
    assert_eq!(step.next, Next::Settle(Settle::RunAlone));
    assert_eq!(notes(&step), [Note::Count(Outcome::LockConflict)]);
    // Another member's failure, or its own Ok in a rolled-back group.
    let bystander = MemberRun::Failed {
        error: &error,
        lock_conflict: false,
        for_another: true,
    };
    for run in [&bystander, &ok] {
        let step = arrival.after_group(&rules, 1, GroupEnded::RolledBack, run, false);
        assert_eq!(step.next, Next::Settle(Settle::RunAlone));
        assert!(notes(&step).is_empty());
    }
    // Its Ok left the transaction aborted: its own failure.
    let aborted = HandlerError::retryable("aborted");
    let step = arrival.after_group(
        &rules,
        1,
        GroupEnded::Aborted { error: &aborted },
        &ok,
        false,
    );
    assert!(matches!(step.next, Next::Close(_)), "{step:?}");
    // Past the shutdown deadline: NAKed, nothing committed.
    let step = arrival.after_group(&rules, 1, GroupEnded::RolledBack, &ok, true);
    assert_eq!(
        step.next,
        Next::Settle(Settle::AbandonThenNak(MIN_NAK_DELAY))
    );
}

#[test]
fn a_request_is_answered_from_its_stored_reply_or_with_an_error_of_its_kind() {
    use super::request::{Answer, Asked, RequestNext};
    use crate::reply::ReplyErrorKind;
    let rules = rules(Dedup::Kv);
    let stored = bytes::Bytes::from_static(b"receipt");
    let repeat = Asked
        .refused(
            &Refusal::Duplicate {
                result: Some(stored.clone()),
            },
            true,
        )
        .expect("answered");
    assert_eq!(repeat.next, RequestNext::Reply(Answer::Result(stored)));
    let held = Refusal::InFlight {
        owner: None,
        retry_after: LEASE,
    };
    assert!(Asked.refused(&held, true).is_err(), "it looks again");
    let gave_up = Asked.refused(&held, false).expect("answered");
    assert!(matches!(
        gave_up.next,
        RequestNext::Reply(Answer::Error(ReplyErrorKind::InFlight, _))
    ));
    // A run's body is stored with its completion and replied; a completion
    // that found the claim taken over says the outcome is another's.
    let (running, _) = Asked.granted(&rules, &Grant::Claimed(claim(1)));
    let body = bytes::Bytes::from_static(b"ok");
    let RequestNext::Complete(answering) = running
        .ended(RunEnd::Returned {
            result: Some(body.clone()),
        })
        .next
    else {
        panic!("not completed");
    };
    assert_eq!(answering.body(), &body);
    let lost = answering.clone().answered(Recorded::LeaseLost);
    assert!(matches!(
        lost.next,
        RequestNext::Reply(Answer::Error(ReplyErrorKind::OutcomeUnknown, _))
    ));
    assert_eq!(
        answering.answered(Recorded::Yes).next,
        RequestNext::Reply(Answer::Result(body))
    );
    // A permanent failure is released and replied as rejected.
    let error = HandlerError::permanent("declined");
    let step = running.ended(RunEnd::Failed {
        error: &error,
        lock_conflict: false,
    });
    assert!(matches!(
        step.next,
        RequestNext::Release(Answer::Error(ReplyErrorKind::Rejected, _))
    ));
}
