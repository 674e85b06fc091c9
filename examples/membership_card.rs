//! The story idem exists for: a payment service tells the card service, over
//! JetStream, to issue a membership card for each successful payment. Lost
//! acknowledgements on either side must never issue two cards for one
//! payment.
//!
//! This program injects both halves of the problem and shows the result:
//!
//! * the producer resends some payments with a **new** message id (the
//!   broker cannot tell them apart: the consumer must), and some with the
//!   **same** id (the broker's duplicate window drops them);
//! * the consumer loses the acknowledgement of every 7th card it issues, so
//!   the broker redelivers messages whose card already exists.
//!
//! ```text
//! cargo run --example membership_card
//! ```
//!
//! Connects to `NATS_URL` or nats://127.0.0.1:4222; if nothing listens there
//! and a `nats-server` binary is available, starts a throw-away one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use idem::consumer::{DEAD_LETTER_STREAM, Outcome, headers};
use idem::store::KvStoreConfig;
use idem::{HandlerError, Json, Retry, Runtime, State, idempotent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const PAYMENTS: usize = 200;
const RESENT_WITH_NEW_ID: usize = 20;
const RESENT_WITH_SAME_ID: usize = 10;
const LOSE_EVERY_NTH_ACK: u64 = 7;

#[derive(Debug, Serialize, Deserialize)]
struct PaymentSucceeded {
    payment_id: Uuid,
    user_id: u64,
    amount_cents: i64,
}

/// The card system: remembers every card it issued, per payment.
#[derive(Clone, Default)]
struct CardService {
    cards: Arc<Mutex<HashMap<Uuid, u32>>>,
}

impl CardService {
    fn issue(&self, payment: Uuid) -> u32 {
        let mut cards = self.cards.lock().unwrap_or_else(PoisonError::into_inner);
        let count = cards.entry(payment).or_default();
        *count += 1;
        *count
    }

    fn report(&self) -> (usize, usize) {
        let cards = self.cards.lock().unwrap_or_else(PoisonError::into_inner);
        let issued = cards.values().map(|n| *n as usize).sum();
        let doubled = cards.values().filter(|n| **n > 1).count();
        (issued, doubled)
    }
}

/// Issues one membership card per successful payment.
#[idempotent(
    stream = "IDEM_EXAMPLE_PAYMENTS",
    start = all, // a new consumer handles what the stream already holds
    subject = "example.payments.succeeded",
    key = payment.payment_id,
    lease = "2s",
    retry = Retry::exponential("100ms", "2s").attempts(4).jitter(),
)]
async fn issue_membership_card(
    Json(payment): Json<PaymentSucceeded>,
    State(cards): State<CardService>,
) -> Result<(), HandlerError> {
    if payment.amount_cents <= 0 {
        return Err(HandlerError::permanent(format!(
            "payment {} of {} cents cannot buy a card",
            payment.payment_id, payment.amount_cents
        )));
    }
    cards.issue(payment.payment_id);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    // Dev helper: $NATS_URL, or a throw-away nats-server for this run.
    let (client, _nats) = idem::testing::LocalNats::connect().await?;
    let js = jetstream::new(client.clone());

    // A fresh stream for this run.
    let _ = js.delete_stream("IDEM_EXAMPLE_PAYMENTS").await;
    js.create_stream(stream::Config {
        name: "IDEM_EXAMPLE_PAYMENTS".into(),
        subjects: vec!["example.payments.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;

    // The payment service: one event per payment, its id as the message id …
    let payments: Vec<PaymentSucceeded> = (0..PAYMENTS)
        .map(|i| PaymentSucceeded {
            payment_id: Uuid::now_v7(),
            user_id: i as u64,
            amount_cents: 4_900,
        })
        .collect();
    let poison = PaymentSucceeded {
        payment_id: Uuid::now_v7(),
        user_id: 999,
        amount_cents: 0,
    };
    for payment in payments.iter().chain([&poison]) {
        publish(&js, payment, &payment.payment_id.to_string()).await?;
    }
    // … and the first half of the problem: resends after lost PubAcks.
    for payment in &payments[..RESENT_WITH_NEW_ID] {
        publish(&js, payment, &Uuid::now_v7().to_string()).await?;
    }
    let mut dropped_by_broker = 0;
    for payment in &payments[RESENT_WITH_NEW_ID..RESENT_WITH_NEW_ID + RESENT_WITH_SAME_ID] {
        dropped_by_broker +=
            usize::from(publish(&js, payment, &payment.payment_id.to_string()).await?);
    }

    // The card service, losing every 7th ack: the second half of the problem.
    let cards = CardService::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = Runtime::builder(client)
        .state(cards.clone())
        .handler(issue_membership_card)
        .claims(KvStoreConfig::default().bucket("idem_example_claims"))
        .drop_every_nth_ack(LOSE_EVERY_NTH_ACK)
        .shutdown_on(async {
            let _ = stopped.await;
        })
        .build()
        .await?;
    let stats = runtime.stats();
    let running = tokio::spawn(runtime.run());

    // Wait until the consumer has nothing pending or unacknowledged.
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("IDEM_EXAMPLE_PAYMENTS")
        .await?
        .get_consumer("issue_membership_card")
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the card service did not finish within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop.send(());
    running.await??;

    let counts = stats.handler("issue_membership_card");
    let stored = js
        .get_stream("IDEM_EXAMPLE_PAYMENTS")
        .await?
        .cached_info()
        .state
        .messages;
    let (issued, doubled) = cards.report();
    let dead = js.get_stream(DEAD_LETTER_STREAM).await?;
    let last_dead = dead
        .get_last_raw_message_by_subject("idem.dead.issue_membership_card")
        .await?;
    let reason = last_dead
        .headers
        .get(headers::REASON)
        .map(|v| v.to_string())
        .unwrap_or_default();

    println!();
    println!(
        "payments                        {:>4}  (+1 with an invalid amount)",
        PAYMENTS
    );
    println!(
        "resent with a new message id    {RESENT_WITH_NEW_ID:>4}  the broker stores them: the consumer must catch them"
    );
    println!(
        "resent with the same message id {RESENT_WITH_SAME_ID:>4}  dropped by the broker's duplicate window: {dropped_by_broker}"
    );
    println!("messages in the stream          {stored:>4}");
    println!("acks lost on purpose            every {LOSE_EVERY_NTH_ACK}th, forcing redeliveries");
    println!(
        "handler runs                    {:>4}",
        counts.get(Outcome::Processed) + counts.get(Outcome::DeadLettered)
    );
    println!(
        "duplicates answered, not run    {:>4}",
        counts.get(Outcome::Duplicate)
    );
    println!("cards issued                    {issued:>4}");
    println!("payments with two cards         {doubled:>4}");
    println!(
        "dead letters                    {:>4}  (reason: {reason})",
        counts.get(Outcome::DeadLettered)
    );

    let _ = js.delete_stream("IDEM_EXAMPLE_PAYMENTS").await;
    if issued == PAYMENTS && doubled == 0 {
        println!("\none card per payment: ok");
        Ok(())
    } else {
        Err(format!("expected {PAYMENTS} cards and no doubles, got {issued} and {doubled}").into())
    }
}

/// Publishes a payment and waits for the PubAck; true if the broker
/// reported it as a duplicate.
async fn publish(
    js: &jetstream::Context,
    payment: &PaymentSucceeded,
    message_id: &str,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let body = serde_json::to_vec(payment)?;
    let ack = js
        .send_publish(
            "example.payments.succeeded",
            PublishMessage::build()
                .payload(body.into())
                .message_id(message_id),
        )
        .await?
        .await?;
    Ok(ack.duplicate)
}
