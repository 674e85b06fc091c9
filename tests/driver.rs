//! `idem::testing::Driver`: a user's handler tested without any server —
//! duplicates, retries, panics, permanent failures, decode failures, key
//! conflicts and `on_duplicate`, leases and the fence on simulated time,
//! as the runtime decides them (the same delivery core).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use idem::clock::ManualClock;
use idem::handler::DeadLetterReason;
use idem::testing::{Driver, Handled};
use idem::{Delivery, HandlerError, Json, Retry, State, idempotent};
use serde::Deserialize;

#[derive(Deserialize)]
struct Order {
    id: u64,
    #[serde(default)]
    fail_times: u32,
    #[serde(default)]
    panics: bool,
    #[serde(default)]
    declined: bool,
}

#[derive(Clone, Default)]
struct Runs {
    attempts: Arc<AtomicU32>,
    announced: Arc<AtomicU32>,
}

#[idempotent(
    stream = "ORDERS",
    key = order.id,
    store_result,
    on_duplicate = announce_again,
    retry = Retry::fixed("1s").attempts(3),
)]
async fn ship(Json(order): Json<Order>, State(runs): State<Runs>) -> Result<u64, HandlerError> {
    let attempt = runs.attempts.fetch_add(1, Ordering::SeqCst) + 1;
    if order.panics {
        panic!("the label printer is on fire");
    }
    if order.declined {
        return Err(HandlerError::permanent("address rejected"));
    }
    if attempt <= order.fail_times {
        return Err(HandlerError::retryable("warehouse timeout"));
    }
    Ok(order.id * 100)
}

async fn announce_again(
    parcel: u64,
    _: Json<Order>,
    State(runs): State<Runs>,
) -> Result<(), HandlerError> {
    assert_eq!(parcel % 100, 0);
    runs.announced.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn order(json: &str) -> Delivery {
    Delivery::new("orders", json.to_owned())
}

#[tokio::test]
async fn a_duplicate_is_answered_from_the_record_and_handed_to_on_duplicate() {
    let runs = Runs::default();
    let mut driver = Driver::new(ship).state(runs.clone());
    assert!(matches!(
        driver.deliver(order(r#"{"id":1}"#)).await,
        Handled::Processed(100)
    ));
    let again = driver.deliver(order(r#"{"id":1}"#)).await;
    assert!(
        matches!(&again, Handled::Duplicate { stored: Some(s) } if s.as_ref() == b"100"),
        "{again:?}"
    );
    assert_eq!(runs.attempts.load(Ordering::SeqCst), 1);
    assert_eq!(runs.announced.load(Ordering::SeqCst), 1);
    // The same key with another payload is a key conflict.
    let conflict = driver
        .deliver(order(
            r#"{"id":1,"fail_times":0,"declined":false,"panics":false}"#,
        ))
        .await;
    assert!(
        matches!(
            conflict,
            Handled::DeadLettered {
                reason: DeadLetterReason::KeyConflict,
                ..
            }
        ),
        "{conflict:?}"
    );
}

#[tokio::test]
async fn retryable_failures_are_retried_with_the_policy_s_delay_then_succeed() {
    let runs = Runs::default();
    let mut driver = Driver::new(ship).state(runs.clone());
    let first = driver.deliver(order(r#"{"id":2,"fail_times":2}"#)).await;
    assert!(
        matches!(first, Handled::Retry { after, .. } if after == Duration::from_secs(1)),
        "{first:?}"
    );
    let (settled, deliveries) = driver
        .deliver_until_settled(order(r#"{"id":2,"fail_times":2}"#))
        .await;
    assert!(matches!(settled, Handled::Processed(200)), "{settled:?}");
    assert_eq!(deliveries, 2, "the second and third attempts");
    assert_eq!(runs.attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn panics_permanent_errors_and_garbage_are_dead_lettered_with_their_reasons() {
    let mut driver = Driver::new(ship).state(Runs::default());
    let (panicked, _) = driver
        .deliver_until_settled(order(r#"{"id":3,"panics":true}"#))
        .await;
    assert!(
        matches!(
            panicked,
            Handled::DeadLettered {
                reason: DeadLetterReason::Panic,
                ..
            }
        ),
        "{panicked:?}"
    );
    let declined = driver.deliver(order(r#"{"id":4,"declined":true}"#)).await;
    assert!(
        matches!(&declined, Handled::DeadLettered { reason: DeadLetterReason::HandlerError, error } if error.contains("address rejected")),
        "{declined:?}"
    );
    let garbage = driver.deliver(order("not json")).await;
    assert!(
        matches!(
            garbage,
            Handled::DeadLettered {
                reason: DeadLetterReason::Decode,
                ..
            }
        ),
        "{garbage:?}"
    );
    // A dead key's redelivery is answered, not run.
    assert!(matches!(
        driver.deliver(order(r#"{"id":4,"declined":true}"#)).await,
        Handled::Duplicate { .. }
    ));
}

/// How far a freezing handler got, and whether it freezes.
#[derive(Clone, Default)]
struct Steps {
    freeze: Arc<AtomicBool>,
    before: Arc<AtomicU32>,
    after: Arc<AtomicU32>,
}

#[derive(Deserialize)]
struct Job {
    id: u64,
}

/// A handler whose worker "freezes" past its lease while told to: it moves
/// the driver's clock 4 s (the lease is 3 s) and then yields — its next
/// step comes after the lease ran out.
#[idempotent(stream = "JOBS", key = job.id, lease = "3s")]
async fn freezing(
    Json(job): Json<Job>,
    State(clock): State<ManualClock>,
    State(steps): State<Steps>,
) -> Result<u64, HandlerError> {
    steps.before.fetch_add(1, Ordering::SeqCst);
    if steps.freeze.load(Ordering::SeqCst) {
        clock.advance(Duration::from_secs(4));
        tokio::task::yield_now().await;
    }
    steps.after.fetch_add(1, Ordering::SeqCst);
    Ok(job.id)
}

/// A handler that takes five 2 s steps under a 3 s lease.
#[idempotent(stream = "JOBS", key = job.id, lease = "3s")]
async fn stepping(
    Json(job): Json<Job>,
    State(clock): State<ManualClock>,
) -> Result<u64, HandlerError> {
    for _ in 0..5 {
        clock.advance(Duration::from_secs(2));
        tokio::task::yield_now().await;
    }
    Ok(job.id)
}

#[tokio::test]
async fn a_handler_frozen_past_its_lease_is_fenced_and_its_key_taken_over_after_the_lease() {
    let steps = Steps::default();
    steps.freeze.store(true, Ordering::SeqCst);
    let driver = Driver::new(freezing);
    let clock = driver.clock();
    let mut driver = driver.state(clock.clone()).state(steps.clone());
    // The handler's step after the freeze never runs: the lease ran out on
    // the worker's clock without a confirmed renewal.
    let fenced = driver.deliver(order(r#"{"id":1}"#)).await;
    assert!(matches!(fenced, Handled::LeaseLost), "{fenced:?}");
    assert_eq!(steps.before.load(Ordering::SeqCst), 1);
    assert_eq!(
        steps.after.load(Ordering::SeqCst),
        0,
        "a step after the fence"
    );
    // Its claim is still pending: a redelivery must see it unchanged for a
    // whole lease of its own time before it takes it over.
    steps.freeze.store(false, Ordering::SeqCst);
    let held = driver.deliver(order(r#"{"id":1}"#).with_delivered(2)).await;
    assert!(matches!(held, Handled::InFlight { .. }), "{held:?}");
    assert_eq!(steps.before.load(Ordering::SeqCst), 1, "run while held");
    clock.advance(Duration::from_secs(3));
    let taken = driver.deliver(order(r#"{"id":1}"#).with_delivered(3)).await;
    assert!(matches!(taken, Handled::Processed(1)), "{taken:?}");
    assert_eq!(steps.after.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_handler_whose_lease_is_renewed_between_its_steps_is_not_fenced() {
    // A renewal is due every second; each 2 s step is followed by one
    // before the handler's next poll, so the lease never runs out.
    let driver = Driver::new(stepping);
    let clock = driver.clock();
    let mut driver = driver.state(clock);
    let done = driver.deliver(order(r#"{"id":7}"#)).await;
    assert!(matches!(done, Handled::Processed(7)), "{done:?}");
}
