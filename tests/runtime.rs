//! The consumer runtime against a real server: every path of the claim
//! state machine, counted in effects (what the handler did) and outcomes
//! (what the runtime says it did).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage, stream};
use idem::claim::ClaimState;
use idem::consumer::{DEAD_LETTER_STREAM, Outcome, Stats, headers};
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::{DedupStore, KvStore, KvStoreConfig};
use idem::testing::{NatsServer, Proxy};
use idem::{HandlerError, Json, Retry, Runtime, State, idempotent};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

const STREAM: &str = "ORDERS";
/// How long a test waits for the runtime to reach a state.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: String,
    #[serde(default)]
    fail_times: u32,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    poison: bool,
    /// A failed attempt asks to be retried no sooner than this (a 429's
    /// `Retry-After`).
    #[serde(default)]
    retry_after_ms: u64,
}

/// What handlers did: per key, how many times the effect ran, and when.
#[derive(Clone, Default)]
struct Effects(Arc<Mutex<HashMap<String, Vec<Instant>>>>);

impl Effects {
    fn record(&self, key: &str) -> usize {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let runs = all.entry(key.to_owned()).or_default();
        runs.push(Instant::now());
        runs.len()
    }

    fn runs(&self, key: &str) -> Vec<Instant> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    fn keys(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn max_runs(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
    }
}

/// Attempt n (counting this call) fails while n <= fail_times; poison fails
/// permanently; sleep_ms stretches the handler.
#[idempotent(
    stream = "ORDERS",
    subject = "orders.kv",
    key = order.id,
    lease = "1s",
    retry = Retry::fixed("200ms").attempts(4),
)]
async fn kv_handler(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    if order.poison {
        return Err(HandlerError::permanent(format!(
            "order {} is poison",
            order.id
        )));
    }
    let attempt = effects.record(&format!("attempt:{}", order.id));
    if attempt as u32 <= order.fail_times {
        let error = HandlerError::retryable(format!("transient failure {attempt}"));
        return Err(match order.retry_after_ms {
            0 => error,
            ms => error.retry_after(Duration::from_millis(ms)),
        });
    }
    sleep(Duration::from_millis(order.sleep_ms)).await;
    effects.record(&order.id);
    Ok(())
}

/// Stores the card it issued; a duplicate announces it again, unchanged.
#[idempotent(
    stream = "ORDERS",
    subject = "orders.announce",
    key = order.id,
    store_result,
    on_duplicate = announce_again
)]
async fn announcing_handler(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<String, HandlerError> {
    effects.record(&order.id);
    Ok(format!("card-{}-{}", order.id, uuid::Uuid::now_v7()))
}

async fn announce_again(
    card: String,
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.record(&format!("announced:{}:{card}", order.id));
    Ok(())
}

#[idempotent(stream = "ORDERS", subject = "orders.header", key = header("Idempotency-Key"), on_missing_key = reject)]
async fn rejecting_handler(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.record(&order.id);
    Ok(())
}

#[idempotent(stream = "ORDERS", subject = "orders.off", dedup = off, retry = Retry::fixed("100ms").attempts(3))]
async fn unclaimed_handler(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.record(&order.id);
    Ok(())
}

/// Panics on a poison order, after counting the attempt.
#[idempotent(
    stream = "ORDERS",
    subject = "orders.panic",
    key = order.id,
    lease = "1s",
    retry = Retry::fixed("100ms").attempts(3),
)]
async fn panicking_handler(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.record(&format!("attempt:{}", order.id));
    if order.poison {
        panic!("order {} exploded", order.id);
    }
    effects.record(&order.id);
    Ok(())
}

/// Records the claim's fencing token as its effect.
#[idempotent(stream = "ORDERS", subject = "orders.fenced", key = order.id, lease = "1s")]
async fn fenced_handler(
    Json(order): Json<Order>,
    fence: idem::Fence,
    State(tokens): State<Tokens>,
) -> Result<(), HandlerError> {
    tokens
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(order.id, fence.token());
    Ok(())
}

/// The fencing token each key ran under.
#[derive(Clone, Default)]
struct Tokens(Arc<Mutex<HashMap<String, u64>>>);

/// `kv_handler` after its function was renamed: the same identity.
#[idempotent(
    name = "kv_handler",
    stream = "ORDERS",
    subject = "orders.kv",
    key = order.id,
    lease = "1s",
    retry = Retry::fixed("200ms").attempts(4),
)]
async fn kv_handler_renamed(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.record(&order.id);
    Ok(())
}

/// Two services' handlers whose functions share a name.
mod orders {
    use super::*;

    #[idempotent(stream = "ORDERS", subject = "orders.apply", key = order.id)]
    pub(super) async fn apply(
        Json(order): Json<Order>,
        State(effects): State<Effects>,
    ) -> Result<(), HandlerError> {
        effects.record(&format!("orders:{}", order.id));
        Ok(())
    }
}

mod refunds {
    use super::*;

    #[idempotent(stream = "REFUNDS", subject = "refunds.apply", key = order.id)]
    pub(super) async fn apply(
        Json(order): Json<Order>,
        State(effects): State<Effects>,
    ) -> Result<(), HandlerError> {
        effects.record(&format!("refunds:{}", order.id));
        Ok(())
    }

    #[idempotent(name = "refunds_apply", stream = "REFUNDS", subject = "refunds.apply", key = order.id)]
    pub(super) async fn apply_named(
        Json(order): Json<Order>,
        State(effects): State<Effects>,
    ) -> Result<(), HandlerError> {
        effects.record(&format!("refunds:{}", order.id));
        Ok(())
    }
}

/// A handler added to a stream that already holds its messages.
#[idempotent(stream = "ORDERS", subject = "orders.late", key = order.id)]
async fn late_handler(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.record(&order.id);
    Ok(())
}

/// The same, told to start with what is published from now on.
#[idempotent(name = "late_handler", stream = "ORDERS", subject = "orders.late", key = order.id, start = new)]
async fn late_handler_from_now(
    Json(order): Json<Order>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.record(&order.id);
    Ok(())
}

struct Running {
    stats: Stats,
    health: idem::consumer::HealthProbe,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), idem::consumer::RuntimeError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("runtime task").expect("runtime");
    }

    fn count(&self, handler: &str, outcome: Outcome) -> u64 {
        self.stats.handler(handler).get(outcome)
    }

    /// Waits until `handler`'s counts of `outcomes` add up to `n`.
    async fn until_counted(&self, handler: &str, outcomes: &[Outcome], n: u64) {
        let counted = || {
            outcomes
                .iter()
                .map(|o| self.count(handler, *o))
                .sum::<u64>()
        };
        let what = format!("{handler}: {outcomes:?} counted {n} times");
        until(&what, || counted() == n).await;
    }
}

struct Setup {
    server: NatsServer,
    js: jetstream::Context,
    effects: Effects,
}

impl Setup {
    async fn new() -> Self {
        let server = NatsServer::start().await.expect("nats-server");
        let js = jetstream::new(server.connect().await.expect("connect"));
        js.create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
        Self {
            server,
            js,
            effects: Effects::default(),
        }
    }

    async fn start(
        &self,
        configure: impl FnOnce(idem::consumer::RuntimeBuilder) -> idem::consumer::RuntimeBuilder,
    ) -> Running {
        self.start_through(&self.server.client_url(), configure)
            .await
    }

    /// A runtime whose client connects to `url` (a proxy's, say).
    async fn start_through(
        &self,
        url: &str,
        configure: impl FnOnce(idem::consumer::RuntimeBuilder) -> idem::consumer::RuntimeBuilder,
    ) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let builder = Runtime::builder(async_nats::connect(url).await.expect("connect"))
            .state(self.effects.clone())
            .shutdown_grace(Duration::from_millis(300))
            .shutdown_on(async {
                let _ = stopped.await;
            });
        let runtime = configure(builder).build().await.expect("runtime starts");
        let stats = runtime.stats();
        Running {
            stats,
            health: runtime.health(),
            stop,
            task: tokio::spawn(runtime.run()),
        }
    }

    /// The dead-letter stream is gone: dead letters cannot be stored.
    async fn dead_letters_gone(&self) {
        self.js
            .delete_stream(DEAD_LETTER_STREAM)
            .await
            .expect("delete the dead-letter stream");
    }

    /// The dead-letter stream is back.
    async fn dead_letters_back(&self) {
        self.js
            .create_stream(stream::Config {
                name: DEAD_LETTER_STREAM.into(),
                subjects: vec!["idem.dead.>".into()],
                ..Default::default()
            })
            .await
            .expect("the dead-letter stream is back");
    }

    async fn publish(
        &self,
        subject: &str,
        order: &Order,
        message_id: Option<&str>,
        header: Option<&str>,
    ) {
        let mut message =
            PublishMessage::build().payload(serde_json::to_vec(order).expect("json").into());
        if let Some(id) = message_id {
            message = message.message_id(id);
        }
        if let Some(key) = header {
            message = message.header("Idempotency-Key", key);
        }
        self.js
            .send_publish(subject.to_owned(), message)
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }

    async fn publish_raw(&self, subject: &str, payload: &'static [u8]) {
        self.js
            .publish(subject.to_owned(), payload.into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }

    async fn consumer(&self, name: &str) -> PullConsumer {
        self.js
            .get_stream(STREAM)
            .await
            .expect("stream")
            .get_consumer(name)
            .await
            .expect("consumer")
    }

    /// Waits until the consumer has nothing pending or unacknowledged.
    async fn drained(&self, consumer: &str) {
        let mut consumer = self.consumer(consumer).await;
        let deadline = Instant::now() + SETTLE;
        loop {
            let info = consumer.info().await.expect("consumer info").clone();
            if info.num_pending == 0
                && info.num_ack_pending == 0
                && info.delivered.stream_sequence > 0
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consumer {} not drained: {info:?}",
                info.name
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// The reasons of every dead letter stored on `subject`, in order.
    async fn dead_reasons(&self, subject: &str) -> Vec<(String, String)> {
        let Ok(mut dead) = self.js.get_stream(DEAD_LETTER_STREAM).await else {
            return Vec::new();
        };
        let last = dead
            .info()
            .await
            .expect("dead-letter stream info")
            .state
            .last_sequence;
        let mut reasons = Vec::new();
        for sequence in 1..=last {
            let Ok(letter) = dead.get_raw_message(sequence).await else {
                continue;
            };
            if letter.subject.as_str() != subject {
                continue;
            }
            let header = |name: &str| {
                letter
                    .headers
                    .get(name)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            reasons.push((header(headers::REASON), header(headers::ERROR)));
        }
        reasons
    }

    async fn claims(&self) -> KvStore {
        KvStore::open(&self.js, KvStoreConfig::default())
            .await
            .expect("claim bucket")
    }
}

fn order(id: &str) -> Order {
    Order {
        id: id.into(),
        fail_times: 0,
        sleep_ms: 0,
        poison: false,
        retry_after_ms: 0,
    }
}

fn record_key(handler: &str, key: &str) -> RecordKey {
    RecordKey::new(
        &HandlerName::new(handler).expect("name"),
        &IdempotencyKey::new(key).expect("key"),
    )
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {SETTLE:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_resend_with_a_new_message_id_runs_the_effect_once() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    setup
        .publish("orders.kv", &order("o-1"), Some("first"), None)
        .await;
    setup
        .publish("orders.kv", &order("o-1"), Some("second"), None)
        .await;
    setup.drained("kv_handler").await;
    running
        .until_counted("kv_handler", &[Outcome::Processed, Outcome::Duplicate], 2)
        .await;
    assert_eq!(setup.effects.runs("o-1").len(), 1);
    assert_eq!(running.count("kv_handler", Outcome::Duplicate), 1);
    running.stop().await;
}

#[tokio::test]
async fn a_duplicate_is_handed_the_stored_result_without_running_the_effect() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(announcing_handler)).await;
    for id in ["first", "second", "third"] {
        setup
            .publish("orders.announce", &order("o-9"), Some(id), None)
            .await;
    }
    setup.drained("announcing_handler").await;
    running
        .until_counted(
            "announcing_handler",
            &[Outcome::Processed, Outcome::Duplicate],
            3,
        )
        .await;
    assert_eq!(setup.effects.runs("o-9").len(), 1, "the effect ran once");
    // Both duplicates announced the one stored card: the same result, not a
    // new one (each run makes a new uuid).
    let announced: Vec<(String, usize)> = {
        let all = setup
            .effects
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        all.iter()
            .filter(|(key, _)| key.starts_with("announced:o-9:"))
            .map(|(key, runs)| (key.clone(), runs.len()))
            .collect()
    };
    assert_eq!(
        announced.len(),
        1,
        "one card, announced by both: {announced:?}"
    );
    assert_eq!(announced[0].1, 2, "{announced:?}");
    assert!(
        announced[0].0.starts_with("announced:o-9:card-o-9-"),
        "{announced:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_duplicate_arriving_while_its_original_runs_waits_and_is_answered_as_a_duplicate() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    let slow = Order {
        sleep_ms: 400,
        ..order("o-slow")
    };
    setup
        .publish("orders.kv", &slow, Some("original"), None)
        .await;
    setup
        .publish("orders.kv", &slow, Some("resend"), None)
        .await;
    setup.drained("kv_handler").await;
    running
        .until_counted("kv_handler", &[Outcome::Processed, Outcome::Duplicate], 2)
        .await;
    assert_eq!(setup.effects.runs("o-slow").len(), 1);
    assert_eq!(running.count("kv_handler", Outcome::Duplicate), 1);
    assert_eq!(
        running.count("kv_handler", Outcome::InFlightElsewhere),
        0,
        "the resend waited for the original in this process instead of a NAK and a redelivery"
    );
    running.stop().await;
}

#[tokio::test]
async fn forgetting_a_completed_key_makes_its_next_delivery_run_again_on_the_worker_that_completed_it()
 {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    setup
        .publish("orders.kv", &order("o-mem"), Some("first"), None)
        .await;
    running
        .until_counted("kv_handler", &[Outcome::Processed], 1)
        .await;
    // An operator forgets the key (`idem keys forget`): the next delivery
    // runs the handler again — also on the worker that completed it, which
    // must not answer from a memory of its own.
    let key = record_key("kv_handler", "o-mem");
    let claims = setup.claims().await;
    let snapshot = claims
        .inspect(&key)
        .await
        .expect("read")
        .expect("a done record");
    assert_eq!(
        claims
            .forget(&key, snapshot.revision)
            .await
            .expect("forget"),
        idem::claim::operator::Written::Applied
    );
    setup
        .publish("orders.kv", &order("o-mem"), Some("second"), None)
        .await;
    running
        .until_counted("kv_handler", &[Outcome::Processed, Outcome::Duplicate], 2)
        .await;
    assert_eq!(running.count("kv_handler", Outcome::Duplicate), 0);
    assert_eq!(setup.effects.runs("o-mem").len(), 2, "ran again");
    running.stop().await;
}

#[tokio::test]
async fn a_reused_key_arriving_during_the_first_payloads_backoff_is_a_key_conflict() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    // X fails once and asks for a long backoff: its key is released.
    let first = Order {
        fail_times: 1,
        retry_after_ms: 1_500,
        ..order("r-1")
    };
    setup.publish("orders.kv", &first, None, None).await;
    let key = record_key("kv_handler", "r-1");
    let claims = setup.claims().await;
    let deadline = Instant::now() + SETTLE;
    loop {
        let state = claims
            .inspect(&key)
            .await
            .expect("read")
            .map(|s| s.record.state);
        if state == Some(ClaimState::Released) {
            break;
        }
        assert!(Instant::now() < deadline, "X's key not released: {state:?}");
        sleep(Duration::from_millis(10)).await;
    }
    // Y reuses the key with another payload during X's backoff.
    let reused = Order {
        sleep_ms: 1,
        ..order("r-1")
    };
    setup.publish("orders.kv", &reused, None, None).await;
    running
        .until_counted(
            "kv_handler",
            &[Outcome::Processed, Outcome::DeadLettered],
            2,
        )
        .await;
    assert_eq!(running.count("kv_handler", Outcome::KeyConflict), 1);
    assert_eq!(setup.effects.runs("r-1").len(), 1, "one payload applied");
    // The payload applied is X's: Y is the one dead-lettered.
    let dead = setup
        .js
        .get_stream(DEAD_LETTER_STREAM)
        .await
        .expect("dead-letter stream");
    let letter = dead.get_raw_message(1).await.expect("one dead letter");
    assert_eq!(
        letter.headers.get(headers::REASON).map(|v| v.to_string()),
        Some("key_conflict".to_owned())
    );
    let payload: Order = serde_json::from_slice(&letter.payload).expect("an order");
    assert_eq!(payload.sleep_ms, 1, "Y, not X, was dead-lettered");
    let record = claims.inspect(&key).await.expect("read").expect("record");
    assert_eq!(record.record.state, ClaimState::Done);
    assert_eq!(record.record.attempt, 2, "X's own attempts, nobody else's");
    running.stop().await;
}

#[tokio::test]
async fn a_redelivery_after_a_lost_ack_runs_the_effect_once() {
    let setup = Setup::new().await;
    // Every ack of a success is lost: each message comes back after ack_wait (1 s).
    let running = setup
        .start(|b| b.handler(kv_handler).drop_every_nth_ack(1))
        .await;
    for id in ["a", "b", "c"] {
        setup.publish("orders.kv", &order(id), None, None).await;
    }
    setup.drained("kv_handler").await;
    assert_eq!(running.count("kv_handler", Outcome::Processed), 3);
    // At least one redelivery each, all answered as duplicates (on a
    // loaded machine a message can come back once more while its first
    // redelivery waits for a permit: seen on nats-server 2.9 in CI).
    assert!(
        running.count("kv_handler", Outcome::Duplicate) >= 3,
        "each redelivery answered as a duplicate"
    );
    for id in ["a", "b", "c"] {
        assert_eq!(setup.effects.runs(id).len(), 1, "{id}");
    }
    running.stop().await;
}

#[tokio::test]
async fn health_is_ready_while_all_works_and_names_what_does_not() {
    let mut setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    until("ready", || running.health.now().is_ready()).await;
    let health = running.health.now();
    assert!(health.connected);
    let kv = &health.handlers[0];
    assert_eq!(kv.handler, "kv_handler");
    assert!(kv.running && kv.store_reachable, "{health:?}");

    // The claim bucket is gone: claims fail closed, and health says so.
    setup
        .js
        .delete_key_value("idem_claims")
        .await
        .expect("delete the claim bucket");
    setup
        .publish("orders.kv", &order("no-store"), None, None)
        .await;
    until("the store reported unreachable", || {
        !running.health.now().handlers[0].store_reachable
    })
    .await;
    let health = running.health.now();
    assert!(!health.is_ready(), "{health:?}");
    let error = health.handlers[0]
        .last_error
        .clone()
        .expect("the store's error");
    assert!(!error.message.is_empty());

    // The store comes back while the handler has nothing to claim (the
    // message is gone): it is ready again all the same.
    setup
        .js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .purge()
        .await
        .expect("purge");
    setup.claims().await;
    until("ready again once the store answers", || {
        running.health.now().is_ready()
    })
    .await;

    // The server is gone: not connected.
    setup.server.kill().expect("kill the server");
    until("disconnected", || !running.health.now().connected).await;
    assert!(!running.health.now().is_ready());
    let _ = running.stop.send(());
    let _ = running.task.await;
    assert!(
        !running.health.now().handlers[0].running,
        "a stopped runtime's handlers are not running"
    );
}

#[tokio::test]
async fn a_retry_after_hint_delays_the_retry_past_the_policys_backoff() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    // kv_handler retries after 200 ms; this failure asks for 1.5 s.
    let throttled = Order {
        fail_times: 1,
        retry_after_ms: 1_500,
        ..order("throttled")
    };
    setup.publish("orders.kv", &throttled, None, None).await;
    running
        .until_counted("kv_handler", &[Outcome::Processed], 1)
        .await;
    let attempts = setup.effects.runs("attempt:throttled");
    assert_eq!(attempts.len(), 2, "one failure, one success");
    let waited = attempts[1] - attempts[0];
    assert!(
        waited >= Duration::from_millis(1_500),
        "the retry came {waited:?} after the failure, before its hint"
    );
    assert_eq!(running.count("kv_handler", Outcome::Retried), 1);
    running.stop().await;
}

#[tokio::test]
async fn two_retryable_failures_then_success_is_one_effect_after_the_policy_delays() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    let flaky = Order {
        fail_times: 2,
        ..order("flaky")
    };
    setup.publish("orders.kv", &flaky, None, None).await;
    setup.drained("kv_handler").await;
    assert_eq!(setup.effects.runs("flaky").len(), 1);
    assert_eq!(running.count("kv_handler", Outcome::Retried), 2);
    assert_eq!(running.count("kv_handler", Outcome::Processed), 1);
    let attempts = setup.effects.runs("attempt:flaky");
    assert_eq!(attempts.len(), 3);
    for pair in attempts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(190),
            "retry came after {gap:?}, policy says 200 ms"
        );
    }
    running.stop().await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_its_reason_and_its_key_stays_dead() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    let poison = Order {
        poison: true,
        ..order("p-1")
    };
    setup
        .publish("orders.kv", &poison, Some("poison-msg"), None)
        .await;
    setup.drained("kv_handler").await;
    assert_eq!(running.count("kv_handler", Outcome::DeadLettered), 1);

    let dead = setup
        .js
        .get_stream(DEAD_LETTER_STREAM)
        .await
        .expect("dead-letter stream");
    let letter = dead
        .get_last_raw_message_by_subject("idem.dead.kv_handler")
        .await
        .expect("a dead letter");
    let header = |name: &str| letter.headers.get(name).map(|v| v.to_string());
    assert_eq!(header(headers::HANDLER).as_deref(), Some("kv_handler"));
    assert_eq!(header(headers::REASON).as_deref(), Some("handler_error"));
    assert!(
        header(headers::ERROR).is_some_and(|e| e.contains("order p-1 is poison")),
        "{:?}",
        header(headers::ERROR)
    );
    assert_eq!(header(headers::ATTEMPTS).as_deref(), Some("1"));
    assert_eq!(header(headers::SUBJECT).as_deref(), Some("orders.kv"));
    assert_eq!(header(headers::STREAM).as_deref(), Some(STREAM));
    assert_eq!(header(headers::SEQUENCE).as_deref(), Some("1"));
    assert_eq!(header(headers::MESSAGE_ID).as_deref(), Some("poison-msg"));
    assert_eq!(
        serde_json::from_slice::<Order>(&letter.payload)
            .expect("original payload")
            .id,
        "p-1"
    );

    let record = setup
        .claims()
        .await
        .inspect(&record_key("kv_handler", "p-1"))
        .await
        .expect("inspect")
        .expect("record");
    assert_eq!(record.record.state, ClaimState::Dead);

    // The same key again (a producer resend): acknowledged, never run.
    setup
        .publish("orders.kv", &poison, Some("poison-resend"), None)
        .await;
    setup.drained("kv_handler").await;
    running
        .until_counted("kv_handler", &[Outcome::Duplicate], 1)
        .await;
    assert_eq!(running.count("kv_handler", Outcome::DeadLettered), 1);
    running.stop().await;
}

#[tokio::test]
async fn undecodable_payloads_and_missing_keys_never_reach_the_handler() {
    let setup = Setup::new().await;
    let running = setup
        .start(|b| b.handler(kv_handler).handler(rejecting_handler))
        .await;
    setup.publish_raw("orders.kv", b"{not json").await;
    setup
        .publish("orders.header", &order("no-header"), None, None)
        .await;
    setup
        .publish("orders.header", &order("with-header"), None, Some("idem-7"))
        .await;
    setup.drained("kv_handler").await;
    setup.drained("rejecting_handler").await;

    assert_eq!(running.count("kv_handler", Outcome::DecodeFailed), 1);
    assert_eq!(running.count("kv_handler", Outcome::DeadLettered), 1);
    let dead = setup
        .js
        .get_stream(DEAD_LETTER_STREAM)
        .await
        .expect("dead-letter stream");
    let letter = dead
        .get_last_raw_message_by_subject("idem.dead.kv_handler")
        .await
        .expect("dead letter");
    assert_eq!(
        letter
            .headers
            .get(headers::REASON)
            .map(|v| v.to_string())
            .as_deref(),
        Some("decode")
    );
    assert_eq!(letter.payload.as_ref(), b"{not json");

    // on_missing_key = reject: acknowledged and counted, not dead-lettered.
    assert_eq!(running.count("rejecting_handler", Outcome::Rejected), 1);
    assert_eq!(running.count("rejecting_handler", Outcome::Processed), 1);
    assert_eq!(setup.effects.runs("no-header").len(), 0);
    assert_eq!(setup.effects.runs("with-header").len(), 1);
    running.stop().await;
}

#[tokio::test]
async fn a_handler_running_three_ack_waits_completes_without_redelivery() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    // ack_wait and lease are 1 s; the handler takes 3 s.
    let slow = Order {
        sleep_ms: 3_000,
        ..order("slow")
    };
    setup.publish("orders.kv", &slow, None, None).await;
    setup.drained("kv_handler").await;
    assert_eq!(setup.effects.runs("slow").len(), 1);
    assert_eq!(running.count("kv_handler", Outcome::Processed), 1);
    assert_eq!(
        running.count("kv_handler", Outcome::InFlightElsewhere),
        0,
        "no redelivery while it ran"
    );
    let info = setup
        .consumer("kv_handler")
        .await
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.num_redelivered, 0, "in-progress acks kept the message");
    running.stop().await;
}

#[tokio::test]
async fn a_server_restart_mid_stream_loses_nothing_and_doubles_nothing() {
    let mut setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    let total = 200;
    for i in 0..total {
        setup
            .publish("orders.kv", &order(&format!("r-{i}")), None, None)
            .await;
    }
    until("some processed", || {
        running.count("kv_handler", Outcome::Processed) >= 20
    })
    .await;
    setup.server.kill().expect("SIGKILL");
    setup.server.restart().await.expect("restart");
    setup.drained("kv_handler").await;
    until("every order done", || setup.effects.keys() >= total * 2).await;
    assert_eq!(setup.effects.max_runs(), 1, "no order ran twice");
    running.stop().await;
}

#[tokio::test]
async fn dedup_off_makes_no_store_calls_but_still_runs_everything() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(unclaimed_handler)).await;
    setup
        .publish("orders.off", &order("sms-1"), None, None)
        .await;
    setup
        .publish("orders.off", &order("sms-1"), None, None)
        .await;
    setup.drained("unclaimed_handler").await;
    assert_eq!(
        setup.effects.runs("sms-1").len(),
        2,
        "at-least-once: both copies run"
    );
    assert_eq!(running.count("unclaimed_handler", Outcome::Processed), 2);
    // No claim bucket was ever created, so no claim was ever made.
    assert!(
        setup.js.get_stream("KV_idem_claims").await.is_err(),
        "dedup = off must not touch the KV store"
    );
    running.stop().await;
}

#[tokio::test]
async fn start_up_errors_name_the_problem() {
    let setup = Setup::new().await;
    #[idempotent(stream = "NOPE", key = order.id)]
    async fn missing_stream(Json(order): Json<Order>) -> Result<(), HandlerError> {
        let _ = order;
        Ok(())
    }
    let client = setup.server.connect().await.expect("connect");
    let err = Runtime::builder(client.clone())
        .handler(missing_stream)
        .build()
        .await
        .err()
        .expect("no stream");
    assert!(
        matches!(err, idem::consumer::RuntimeError::StreamMissing { .. }),
        "{err}"
    );
    let err = Runtime::builder(client.clone())
        .build()
        .await
        .err()
        .expect("no handlers");
    assert!(
        matches!(err, idem::consumer::RuntimeError::NoHandlers),
        "{err}"
    );
    let err = Runtime::builder(client.clone())
        .handler(kv_handler)
        .handler(kv_handler)
        .build()
        .await
        .err()
        .expect("twice");
    assert!(
        matches!(err, idem::consumer::RuntimeError::DuplicateHandler { .. }),
        "{err}"
    );
    let err = Runtime::builder(client)
        .handler(kv_handler)
        .handler(kv_handler_renamed)
        .build()
        .await
        .err()
        .expect("one name twice");
    assert!(
        matches!(err, idem::consumer::RuntimeError::DuplicateHandler { .. }),
        "{err}"
    );
}

/// Found by the fault suite: a worker started while the cluster was
/// electing leaders died on the first timed-out provisioning request.
/// Start-up now retries what did not answer (and only that).
#[tokio::test]
async fn start_up_waits_for_servers_that_do_not_answer_yet() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(setup.server.client_addr())
        .await
        .expect("proxy");
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_millis(500)))
        .connect(proxy.url())
        .await
        .expect("connect through the proxy");
    proxy.stall();
    let starting = tokio::spawn(
        Runtime::builder(client)
            .state(setup.effects.clone())
            .handler(unclaimed_handler)
            .build(),
    );
    sleep(Duration::from_millis(1_500)).await;
    assert!(
        !starting.is_finished(),
        "start-up gave up on a stalled server"
    );
    proxy.open();
    let runtime = starting
        .await
        .expect("task")
        .expect("starts once the server answers");
    assert_eq!(
        runtime
            .stats()
            .handler("unclaimed_handler")
            .get(Outcome::Processed),
        0
    );
}

#[tokio::test]
async fn start_up_fails_at_once_on_a_missing_stream() {
    let server = NatsServer::start().await.expect("nats-server");
    let began = Instant::now();
    let error = Runtime::builder(server.connect().await.expect("connect"))
        .state(Effects::default())
        .handler(unclaimed_handler)
        .build()
        .await
        .err()
        .expect("no ORDERS stream");
    assert!(!error.is_transient(), "{error}");
    assert!(
        matches!(error, idem::consumer::RuntimeError::StreamMissing { .. }),
        "{error}"
    );
    // What `fn main() -> Result<(), Box<dyn Error>>` prints: the message
    // that says what to do, not a struct dump.
    let shown = format!("{error:?}");
    assert_eq!(shown, error.to_string());
    assert!(shown.contains("create_missing_streams"), "{shown}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "not retried: {:?}",
        began.elapsed()
    );
}

// ---- Handlers that misbehave, and operations on a running worker ----

#[tokio::test]
async fn a_panicking_handler_is_retried_then_dead_lettered_and_the_worker_keeps_serving() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(panicking_handler)).await;
    let boom = Order {
        poison: true,
        ..order("boom")
    };
    setup.publish("orders.panic", &boom, None, None).await;
    setup
        .publish("orders.panic", &order("fine"), None, None)
        .await;
    let deadline = Instant::now() + SETTLE;
    let letters = loop {
        let letters = setup.dead_reasons("idem.dead.panicking_handler").await;
        if !letters.is_empty() {
            break letters;
        }
        assert!(
            Instant::now() < deadline,
            "the panicking message was never dead-lettered"
        );
        sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, "panic");
    assert!(letters[0].1.contains("order boom exploded"), "{letters:?}");
    setup.drained("panicking_handler").await;
    assert_eq!(
        setup.effects.runs("attempt:boom").len(),
        3,
        "the policy's three attempts"
    );
    assert_eq!(
        setup.effects.runs("fine").len(),
        1,
        "the worker kept serving"
    );
    assert_eq!(running.count("panicking_handler", Outcome::Panicked), 3);
    running.stop().await;
}

#[tokio::test]
async fn a_corrected_payload_under_a_dead_key_is_a_key_conflict_not_a_duplicate() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    let poison = Order {
        poison: true,
        ..order("p-9")
    };
    setup.publish("orders.kv", &poison, None, None).await;
    setup.drained("kv_handler").await;
    running
        .until_counted("kv_handler", &[Outcome::DeadLettered], 1)
        .await;
    // The producer fixes the payload and resubmits under the same key.
    setup.publish("orders.kv", &order("p-9"), None, None).await;
    setup.drained("kv_handler").await;
    running
        .until_counted("kv_handler", &[Outcome::Duplicate, Outcome::KeyConflict], 1)
        .await;
    assert_eq!(running.count("kv_handler", Outcome::KeyConflict), 1);
    assert_eq!(setup.effects.runs("p-9").len(), 0, "never applied");
    let reasons: Vec<String> = setup
        .dead_reasons("idem.dead.kv_handler")
        .await
        .into_iter()
        .map(|(reason, _)| reason)
        .collect();
    assert_eq!(reasons, ["handler_error", "key_conflict"]);
    // The same poison payload again is still a plain duplicate.
    setup.publish("orders.kv", &poison, None, None).await;
    setup.drained("kv_handler").await;
    running
        .until_counted("kv_handler", &[Outcome::Duplicate], 1)
        .await;
    running.stop().await;
}

#[tokio::test]
async fn a_handler_cut_off_at_shutdown_keeps_its_claim_and_its_rerun_is_counted() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    // The handler has begun its effect (attempt:cut) when the deploy stops it.
    let slow = Order {
        sleep_ms: 5_000,
        ..order("cut")
    };
    setup.publish("orders.kv", &slow, None, None).await;
    until("the handler started", || {
        setup.effects.runs("attempt:cut").len() == 1
    })
    .await;
    running.stop().await; // grace 300 ms: the handler is cut off
    let claims = setup.claims().await;
    let record = claims
        .inspect(&record_key("kv_handler", "cut"))
        .await
        .expect("inspect")
        .expect("record");
    assert!(
        matches!(record.record.state, ClaimState::Pending { .. }),
        "the claim stays with the worker that may have had its effect: {:?}",
        record.record.state
    );
    // The replacement takes it over once the lease has run out — counted.
    let running = setup.start(|b| b.handler(kv_handler)).await;
    setup.drained("kv_handler").await;
    until("completed by the replacement", || {
        setup.effects.runs("cut").len() == 1
    })
    .await;
    assert_eq!(running.count("kv_handler", Outcome::Reclaimed), 1);
    assert_eq!(setup.effects.runs("attempt:cut").len(), 2);
    running.stop().await;
}

/// Every answer of the server reaches the worker 1.5 s late, past its
/// 1 s lease: the claim is granted after the lease ran out on the worker's
/// clock, when a reader may already have taken the key over. The handler
/// must not start; nothing ran, so the claim is given back — no attempt,
/// no takeover, no lost lease counted — and once answers come on time the
/// message runs once, as its first attempt.
#[tokio::test]
async fn a_claim_answered_after_its_lease_never_starts_the_handler_and_costs_no_attempt() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(setup.server.client_addr())
        .await
        .expect("proxy");
    let running = setup
        .start_through(&proxy.url(), |b| b.handler(kv_handler))
        .await;
    proxy.delay_replies(Duration::from_millis(1_500));
    setup.publish("orders.kv", &order("late"), None, None).await;
    until("a claim answered too late", || {
        running.count("kv_handler", Outcome::StoreUnavailable) >= 1
    })
    .await;
    assert!(
        setup.effects.runs("attempt:late").is_empty(),
        "the handler started on a claim whose lease had run out"
    );
    proxy.delay_replies(Duration::ZERO);
    until("applied once answers come on time", || {
        setup.effects.runs("late").len() == 1
    })
    .await;
    let record = setup
        .claims()
        .await
        .inspect(&record_key("kv_handler", "late"))
        .await
        .expect("inspect")
        .expect("record");
    assert_eq!(record.record.state, ClaimState::Done);
    assert_eq!(record.record.attempt, 1, "an unstarted claim is no attempt");
    assert_eq!(setup.effects.runs("attempt:late").len(), 1);
    assert_eq!(running.count("kv_handler", Outcome::Reclaimed), 0);
    assert_eq!(running.count("kv_handler", Outcome::LeaseLost), 0);
    running.stop().await;
}

#[tokio::test]
async fn naks_for_a_key_held_elsewhere_do_not_use_up_the_retry_budget() {
    let setup = Setup::new().await;
    let claims = setup.claims().await;
    let held = match claims
        .claim(
            &record_key("kv_handler", "held"),
            None,
            Duration::from_secs(10),
        )
        .await
        .expect("claim")
    {
        idem::claim::ClaimOutcome::Claimed(claim) => claim,
        other => panic!("expected a claim, got {other:?}"),
    };
    let running = setup.start(|b| b.handler(kv_handler)).await;
    // Fails once, then succeeds: within kv_handler's 4 attempts.
    let flaky = Order {
        fail_times: 1,
        ..order("held")
    };
    setup.publish("orders.kv", &flaky, None, None).await;
    until("several deliveries found the key held", || {
        running.count("kv_handler", Outcome::InFlightElsewhere) >= 5
    })
    .await;
    claims.release(&held).await.expect("release");
    setup.drained("kv_handler").await;
    until("applied", || setup.effects.runs("held").len() == 1).await;
    assert_eq!(running.count("kv_handler", Outcome::DeadLettered), 0);
    assert_eq!(setup.effects.runs("attempt:held").len(), 2);
    running.stop().await;
}

#[tokio::test]
async fn a_missing_state_is_refused_at_build_naming_its_type() {
    #[derive(Clone)]
    struct Mailer;
    #[idempotent(stream = "ORDERS", subject = "orders.mail", key = order.id)]
    async fn needs_a_mailer(
        Json(order): Json<Order>,
        State(mailer): State<Mailer>,
    ) -> Result<(), HandlerError> {
        let _ = (order, mailer);
        Ok(())
    }
    let setup = Setup::new().await;
    let error = Runtime::builder(setup.server.connect().await.expect("connect"))
        .handler(needs_a_mailer)
        .build()
        .await
        .err()
        .expect("a handler whose state is missing must not start");
    assert!(error.to_string().contains("Mailer"), "{error}");
    assert!(error.to_string().contains(".state("), "{error}");
}

#[tokio::test]
async fn a_worker_whose_consumer_is_deleted_stops_the_runtime_with_the_error() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(unclaimed_handler)).await;
    setup
        .js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .delete_consumer("unclaimed_handler")
        .await
        .expect("delete the consumer");
    let ended = tokio::time::timeout(SETTLE, running.task)
        .await
        .expect("the runtime stops by itself")
        .expect("task");
    let error = ended.expect_err("a lost consumer is an error, not a clean stop");
    assert!(error.to_string().contains("unclaimed_handler"), "{error}");
}

#[tokio::test]
async fn a_handler_runs_under_its_claims_fencing_token_and_a_takeover_under_a_greater_one() {
    let setup = Setup::new().await;
    // A worker that died holding key f-2: its claim stays pending.
    let claims = setup.claims().await;
    let stale = match claims
        .claim(
            &record_key("fenced_handler", "f-2"),
            None,
            Duration::from_secs(1),
        )
        .await
        .expect("claim")
    {
        idem::claim::ClaimOutcome::Claimed(claim) => claim,
        other => panic!("expected a claim, got {other:?}"),
    };
    let tokens = Tokens::default();
    let running = setup
        .start(|b| b.state(tokens.clone()).handler(fenced_handler))
        .await;
    setup
        .publish("orders.fenced", &order("f-1"), None, None)
        .await;
    setup
        .publish("orders.fenced", &order("f-2"), None, None)
        .await;
    setup.drained("fenced_handler").await;
    let token = |key: &str| {
        tokens
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    };
    until("both ran", || {
        token("f-1").is_some() && token("f-2").is_some()
    })
    .await;
    let record = claims
        .inspect(&record_key("fenced_handler", "f-1"))
        .await
        .expect("inspect")
        .expect("record");
    assert!(
        token("f-1").is_some_and(|t| t > 0 && t < record.revision),
        "f-1 ran under {:?}, its claim's revision before completion ({})",
        token("f-1"),
        record.revision
    );
    assert!(
        token("f-2").is_some_and(|t| t > stale.revision()),
        "the takeover's token {:?} must exceed the dead owner's {}",
        token("f-2"),
        stale.revision()
    );
    assert_eq!(running.count("fenced_handler", Outcome::Reclaimed), 1);
    running.stop().await;
}

#[tokio::test]
async fn a_fencing_token_is_refused_at_build_for_a_handler_without_claims() {
    #[idempotent(stream = "ORDERS", subject = "orders.nofence", dedup = off)]
    async fn unfenced(Json(order): Json<Order>, fence: idem::Fence) -> Result<(), HandlerError> {
        let _ = (order, fence);
        Ok(())
    }
    let setup = Setup::new().await;
    let error = Runtime::builder(setup.server.connect().await.expect("connect"))
        .handler(unfenced)
        .build()
        .await
        .err()
        .expect("dedup = off has no claim to fence with");
    assert!(error.to_string().contains("Fence"), "{error}");
}

#[tokio::test]
async fn two_handlers_with_one_function_name_in_one_runtime_are_refused_at_build() {
    let setup = Setup::new().await;
    let error = Runtime::builder(setup.server.connect().await.expect("connect"))
        .state(setup.effects.clone())
        .handler(orders::apply)
        .handler(refunds::apply)
        .build()
        .await
        .err()
        .expect("orders::apply and refunds::apply would share claims");
    assert!(
        matches!(error, idem::consumer::RuntimeError::DuplicateHandler { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("name = "), "{error}");
}

#[tokio::test]
async fn a_handler_name_another_service_registered_in_the_shared_bucket_is_refused() {
    let setup = Setup::new().await;
    setup
        .js
        .create_stream(stream::Config {
            name: "REFUNDS".into(),
            subjects: vec!["refunds.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    // The orders service runs its `apply` …
    let orders_service = setup.start(|b| b.handler(orders::apply)).await;
    // … and the refunds service, sharing the default bucket, starts its own.
    let refused = Runtime::builder(setup.server.connect().await.expect("connect"))
        .state(setup.effects.clone())
        .handler(refunds::apply)
        .build()
        .await
        .err()
        .expect("the refunds service must not share the orders service's claims");
    assert!(
        matches!(
            &refused,
            idem::consumer::RuntimeError::HandlerNameTaken {
                registered: idem::consumer::Registered::Stream { stream, .. },
                ..
            } if stream == "ORDERS"
        ),
        "{refused}"
    );
    // Named apart, both run, and each key is applied by its own handler.
    let refunds_service = setup.start(|b| b.handler(refunds::apply_named)).await;
    setup
        .publish("orders.apply", &order("43"), None, None)
        .await;
    setup
        .publish("refunds.apply", &order("43"), None, None)
        .await;
    setup.drained("apply").await;
    until("both applied", || {
        setup.effects.runs("orders:43").len() == 1 && setup.effects.runs("refunds:43").len() == 1
    })
    .await;
    orders_service.stop().await;
    refunds_service.stop().await;
}

#[tokio::test]
async fn a_renamed_function_keeps_its_identity_with_name_and_replays_nothing() {
    let setup = Setup::new().await;
    let before = setup.start(|b| b.handler(kv_handler)).await;
    setup.publish("orders.kv", &order("r-1"), None, None).await;
    setup.drained("kv_handler").await;
    until("applied", || setup.effects.runs("r-1").len() == 1).await;
    before.stop().await;
    // The function is renamed in a deploy; `name` keeps its identity.
    let after = setup.start(|b| b.handler(kv_handler_renamed)).await;
    setup.publish("orders.kv", &order("r-2"), None, None).await;
    setup.drained("kv_handler").await;
    until("the new message applied", || {
        setup.effects.runs("r-2").len() == 1
    })
    .await;
    assert_eq!(setup.effects.runs("r-1").len(), 1, "nothing replayed");
    after.stop().await;
}

#[tokio::test]
async fn a_new_consumer_on_a_stream_holding_its_messages_is_refused_unless_start_is_chosen() {
    let setup = Setup::new().await;
    setup
        .publish("orders.late", &order("old-1"), None, None)
        .await;
    setup
        .publish("orders.late", &order("old-2"), None, None)
        .await;
    let error = Runtime::builder(setup.server.connect().await.expect("connect"))
        .state(setup.effects.clone())
        .handler(late_handler)
        .build()
        .await
        .err()
        .expect("a new consumer would handle two old messages");
    assert!(
        matches!(
            error,
            idem::consumer::RuntimeError::NewConsumerWouldReplay { messages: 2, .. }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("start = "), "{error}");
    // Choosing `start = new`: only what is published from now on.
    let running = setup.start(|b| b.handler(late_handler_from_now)).await;
    setup
        .publish("orders.late", &order("new-1"), None, None)
        .await;
    setup.drained("late_handler").await;
    until("the new message applied", || {
        setup.effects.runs("new-1").len() == 1
    })
    .await;
    assert_eq!(setup.effects.runs("old-1").len(), 0);
    assert_eq!(setup.effects.runs("old-2").len(), 0);
    running.stop().await;
}

#[tokio::test]
async fn in_a_cluster_the_dead_letter_stream_has_the_claim_buckets_replicas() {
    let cluster = idem::testing::Cluster::start()
        .await
        .expect("3-node cluster");
    let client = cluster.connect().await.expect("connect");
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["orders.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("stream");
    let runtime = Runtime::builder(client)
        .state(Effects::default())
        .claims(KvStoreConfig::default().replicas(3))
        .handler(unclaimed_handler)
        .build()
        .await
        .expect("runtime starts");
    let mut dead = js
        .get_stream(DEAD_LETTER_STREAM)
        .await
        .expect("dead-letter stream");
    let replicas = dead.info().await.expect("info").config.num_replicas;
    assert_eq!(replicas, 3, "dead letters are as safe as the claims");
    drop(runtime);
}

#[tokio::test]
async fn a_key_whose_dead_letter_is_not_stored_yet_stays_its_payloads() {
    let setup = Setup::new().await;
    let running = setup.start(|b| b.handler(kv_handler)).await;
    // The dead-letter stream is gone for a while:
    setup.dead_letters_gone().await;
    let poison = Order {
        poison: true,
        ..order("p-7")
    };
    setup.publish("orders.kv", &poison, None, None).await;
    until("its dead letter failed", || {
        running.count("kv_handler", Outcome::DeadLetterFailed) >= 1
    })
    .await;
    // Meanwhile the key is reused with another payload: it must not run.
    setup.publish("orders.kv", &order("p-7"), None, None).await;
    until("the other payload was answered", || {
        running.count("kv_handler", Outcome::InFlightElsewhere)
            + running.count("kv_handler", Outcome::Processed)
            >= 1
    })
    .await;
    setup.dead_letters_back().await;
    setup.drained("kv_handler").await;
    running
        .until_counted("kv_handler", &[Outcome::DeadLettered], 2)
        .await;
    assert_eq!(
        setup.effects.runs("p-7").len(),
        0,
        "the other payload never ran"
    );
    let mut reasons: Vec<String> = setup
        .dead_reasons("idem.dead.kv_handler")
        .await
        .into_iter()
        .map(|(reason, _)| reason)
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["handler_error", "key_conflict"]);
    running.stop().await;
}
