//! Handlers written with `#[idempotent]`, driven through the runtime's
//! typed steps (`prepare`, `call`, `encode_result`) on synthetic deliveries:
//! what the attribute generates must decode, key, fingerprint and run as
//! its options say.

use idem::extract::StateMap;
use idem::fingerprint::Fingerprint;
use idem::handler::{Dedup, FingerprintSource, Handler, OnMissingKey, prepare};
use idem::key::{KeyError, to_key};
use idem::{Delivery, HandlerError, Json, Retry, State, idempotent};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Debug, Deserialize)]
struct PaymentSucceeded {
    payment_id: uuid::Uuid,
    user_id: u64,
    amount_cents: i64,
}

#[derive(Clone, Debug, Default)]
struct CardService {
    issued: Arc<AtomicU32>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct CardId(u32);

/// Issues a membership card for a payment.
#[idempotent(
    stream = "PAYMENTS",
    subject = "payments.succeeded",
    key = payment.payment_id,
    retention = "7d",
    lease = "45s",
    retry = Retry::exponential("200ms", "30s").attempts(8).jitter(),
    dead_letter = "payments.dead",
    concurrency = 4,
    store_result,
)]
async fn issue_membership_card(
    Json(payment): Json<PaymentSucceeded>,
    State(cards): State<CardService>,
) -> Result<CardId, HandlerError> {
    if payment.amount_cents <= 0 {
        return Err(HandlerError::permanent("a card needs a positive payment"));
    }
    let _ = payment.user_id;
    Ok(CardId(cards.issued.fetch_add(1, Ordering::SeqCst) + 1))
}

#[idempotent(stream = "ORDERS", key = header("Idempotency-Key"), on_missing_key = reject, fingerprint = none)]
async fn by_header(raw: bytes::Bytes) -> Result<usize, HandlerError> {
    Ok(raw.len())
}

#[idempotent(stream = "ORDERS", key = msg_id)]
async fn by_message_id(delivery: Delivery) -> Result<(), HandlerError> {
    let _ = delivery.subject();
    Ok(())
}

fn order_key(delivery: &Delivery) -> Option<String> {
    delivery
        .subject()
        .strip_prefix("orders.")
        .map(str::to_owned)
}

#[idempotent(stream = "ORDERS", key = order_key, fingerprint = (line.sku, line.qty))]
async fn by_function(Json(line): Json<Line>) -> Result<(), std::io::Error> {
    let _ = line;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Line {
    sku: String,
    qty: u32,
    #[allow(dead_code)]
    note: String,
}

#[idempotent(stream = "SMS", dedup = off)]
async fn send_sms(Json(text): Json<String>) -> Result<(), HandlerError> {
    let _ = text;
    Ok(())
}

fn state() -> (StateMap, CardService) {
    let cards = CardService::default();
    let mut state = StateMap::default();
    state.insert(cards.clone());
    (state, cards)
}

fn payment(amount: i64) -> (uuid::Uuid, Delivery) {
    let id = uuid::Uuid::new_v4();
    let body = format!(r#"{{"payment_id":"{id}","user_id":7,"amount_cents":{amount}}}"#);
    (id, Delivery::new("payments.succeeded", body))
}

#[test]
fn the_attribute_writes_the_configuration() {
    let config = issue_membership_card.config();
    assert_eq!(config.validate(), Ok(()));
    assert_eq!(
        (config.name.as_str(), config.stream.as_str()),
        ("issue_membership_card", "PAYMENTS")
    );
    assert_eq!(config.consumer, "issue_membership_card");
    assert_eq!(config.subject.as_deref(), Some("payments.succeeded"));
    assert_eq!(config.retention, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(config.lease, Duration::from_secs(45));
    assert_eq!(config.retry.max_attempts(), 8);
    assert_eq!(config.dead_letter, "payments.dead");
    assert_eq!(config.concurrency, 4);
    assert!(config.store_result);
    assert_eq!(config.dedup, Dedup::Kv);

    let sms = send_sms.config();
    assert_eq!(
        (sms.dedup, sms.dead_letter.as_str()),
        (Dedup::Off, "idem.dead.send_sms")
    );
    let header = by_header.config();
    assert_eq!(
        (header.on_missing_key, header.fingerprint),
        (OnMissingKey::Reject, FingerprintSource::None)
    );
}

#[tokio::test]
async fn a_delivery_is_decoded_keyed_fingerprinted_and_run() {
    let (state, cards) = state();
    let (id, delivery) = payment(1_500);
    let ready = prepare(&issue_membership_card, &delivery, &state).expect("prepared");
    assert_eq!(ready.key, to_key(&id).expect("uuid key"));
    assert_eq!(ready.fingerprint, Some(Fingerprint::of(delivery.payload())));

    let card = issue_membership_card.call(ready.args).await.expect("runs");
    assert_eq!(card, CardId(1));
    assert_eq!(cards.issued.load(Ordering::SeqCst), 1);
    let stored = issue_membership_card
        .encode_result(&card)
        .expect("serializes");
    assert_eq!(stored.as_deref(), Some(&b"1"[..]));

    // The body stays callable on its own, e.g. for unit tests.
    let (_, other) = payment(10);
    let args = prepare(&issue_membership_card, &other, &state)
        .expect("prepared")
        .args;
    let (json, state_arg) = args;
    assert_eq!(
        issue_membership_card::run(json, state_arg)
            .await
            .expect("runs"),
        CardId(2)
    );
}

#[tokio::test]
async fn errors_keep_their_kind_and_bad_payloads_never_run() {
    let (state, cards) = state();
    let (_, refund) = payment(-5);
    let ready = prepare(&issue_membership_card, &refund, &state).expect("prepared");
    let err = issue_membership_card
        .call(ready.args)
        .await
        .expect_err("permanent");
    assert!(err.is_permanent(), "{err}");

    let garbage = Delivery::new("payments.succeeded", "{not json");
    let rejected = prepare(&issue_membership_card, &garbage, &state).expect_err("undecodable");
    assert_eq!(rejected.reason().as_str(), "decode");
    let missing_state =
        prepare(&issue_membership_card, &payment(1).1, &StateMap::default()).expect_err("no state");
    assert_eq!(missing_state.reason().as_str(), "missing_state");
    assert_eq!(cards.issued.load(Ordering::SeqCst), 0, "nothing ran");

    // `?` on any error is retryable.
    let line = Delivery::new("orders.42", r#"{"sku":"A","qty":1,"note":""}"#);
    let args = prepare(&by_function, &line, &StateMap::default())
        .expect("prepared")
        .args;
    assert!(by_function.call(args).await.is_ok());
}

#[test]
fn every_key_source_reads_its_part_of_the_delivery() {
    let none = StateMap::default();
    let with_header = Delivery::new("orders.1", "x").with_header("Idempotency-Key", "idem-1");
    assert_eq!(
        prepare(&by_header, &with_header, &none)
            .expect("key")
            .key
            .as_bytes(),
        b"idem-1"
    );
    let without =
        prepare(&by_header, &Delivery::new("orders.1", "x"), &none).expect_err("no header");
    assert_eq!(without.reason().as_str(), "missing_key");
    assert_eq!(
        prepare(&by_header, &with_header, &none)
            .expect("key")
            .fingerprint,
        None
    );

    let with_id = Delivery::new("orders.1", "").with_header("Nats-Msg-Id", "msg-9");
    assert_eq!(
        prepare(&by_message_id, &with_id, &none)
            .expect("key")
            .key
            .as_bytes(),
        b"msg-9"
    );
    assert!(matches!(
        prepare(&by_message_id, &Delivery::new("orders.1", ""), &none),
        Err(idem::handler::PrepareError::Key(KeyError::MissingMessageId))
    ));

    let line = |note: &str| {
        Delivery::new(
            "orders.42",
            format!(r#"{{"sku":"A","qty":2,"note":"{note}"}}"#),
        )
    };
    let first = prepare(&by_function, &line("a"), &none).expect("key");
    assert_eq!(first.key.as_bytes(), b"42");
    // The custom fingerprint covers sku and qty only: a different note is the same operation.
    let second = prepare(&by_function, &line("b"), &none).expect("key");
    assert_eq!(first.fingerprint, second.fingerprint);
    let elsewhere = prepare(
        &by_function,
        &Delivery::new("payments.1", r#"{"sku":"A","qty":2,"note":""}"#),
        &none,
    );
    assert_eq!(
        elsewhere.expect_err("no key").reason().as_str(),
        "missing_key"
    );

    // dedup = off needs no key; the message's identity stands in for logs.
    let sms = Delivery::new("sms", r#""hello""#).with_stream("SMS", 17);
    assert_eq!(
        prepare(&send_sms, &sms, &none)
            .expect("prepared")
            .key
            .as_bytes(),
        b"SMS:17"
    );
}
