//! Least privilege: a server configured with exactly the account block of
//! docs/permissions.md. An admin provisions; a producer publishes; a worker
//! with no right to create anything runs the handler — one card per
//! payment, the poison one dead-lettered. A connection lacking a permission
//! is told which subject was refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::consumer::{Outcome, RuntimeError};
use idem::publisher::{Outgoing, Publisher};
use idem::testing::NatsServer;
use idem::{HandlerError, Json, Runtime, State, idempotent};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};

#[derive(Serialize, Deserialize)]
struct PaymentSucceeded {
    payment_id: String,
    amount_cents: i64,
}

#[derive(Clone, Default)]
struct Cards(Arc<Mutex<HashMap<String, u32>>>);

#[idempotent(
    stream = "PAYMENTS",
    subject = "payments.succeeded",
    key = payment.payment_id,
    dead_letter = "payments.dead",
    start = all,
)]
async fn issue_membership_card(
    Json(payment): Json<PaymentSucceeded>,
    State(cards): State<Cards>,
) -> Result<(), HandlerError> {
    if payment.amount_cents <= 0 {
        return Err(HandlerError::permanent("no card for a payment of nothing"));
    }
    *cards
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(payment.payment_id)
        .or_default() += 1;
    Ok(())
}

/// The `conf` block of docs/permissions.md, as it stands.
fn documented_accounts() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/permissions.md"))
        .expect("docs/permissions.md");
    let start = doc
        .find("```conf\n")
        .expect("a ```conf block in docs/permissions.md")
        + "```conf\n".len();
    let end = start + doc[start..].find("```").expect("the block's end");
    doc[start..end].to_owned()
}

async fn connect_as(server: &NatsServer, user: &str) -> async_nats::Client {
    idem::permissions::watch(async_nats::ConnectOptions::with_user_and_password(
        user.into(),
        user.into(),
    ))
    .connect(server.client_url())
    .await
    .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

async fn server() -> NatsServer {
    let config = format!("{}\nno_auth_user: admin\n", documented_accounts());
    NatsServer::start_configured(&config)
        .await
        .expect("nats-server with the documented accounts")
}

/// The admin's part: the stream, then everything the handler needs.
async fn provision(server: &NatsServer) {
    let admin = connect_as(server, "admin").await;
    jetstream::new(admin.clone())
        .create_stream(stream::Config {
            name: "PAYMENTS".into(),
            subjects: vec!["payments.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    Runtime::builder(admin)
        .handler(issue_membership_card)
        .provision()
        .await
        .expect("the admin provisions");
}

#[tokio::test]
async fn a_worker_and_a_producer_with_the_documented_permissions_run_the_main_example() {
    const PAYMENTS: usize = 20;
    let server = server().await;
    provision(&server).await;

    let producer = Publisher::new(connect_as(&server, "producer").await);
    let payment = |i: usize, amount_cents| PaymentSucceeded {
        payment_id: format!("pay-{i}"),
        amount_cents,
    };
    for i in 0..PAYMENTS {
        producer
            .send(Outgoing::json("payments.succeeded", &payment(i, 4_900)).expect("json"))
            .await
            .expect("the producer publishes");
    }
    // A resend with a new id: the worker must answer it as a duplicate.
    producer
        .send(Outgoing::json("payments.succeeded", &payment(0, 4_900)).expect("json"))
        .await
        .expect("resend");
    producer
        .send(Outgoing::json("payments.succeeded", &payment(PAYMENTS, 0)).expect("json"))
        .await
        .expect("poison");

    let cards = Cards::default();
    let runtime = Runtime::builder(connect_as(&server, "worker").await)
        .state(cards.clone())
        .handler(issue_membership_card)
        .shutdown_on(std::future::pending())
        .build()
        .await
        .expect("the worker starts without creating anything");
    let stats = runtime.stats();
    let running = tokio::spawn(runtime.run());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = stats.handler("issue_membership_card");
        if counts.get(Outcome::Processed) == PAYMENTS as u64
            && counts.get(Outcome::Duplicate) == 1
            && counts.get(Outcome::DeadLettered) == 1
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not handled within 30 s: {counts:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
    running.abort();
    let cards = cards
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(cards.len(), PAYMENTS);
    assert!(cards.values().all(|&n| n == 1), "{cards:?}");
    // The dead letter is where the worker may put it.
    let admin = jetstream::new(connect_as(&server, "admin").await);
    let dead = admin
        .get_stream("PAYMENTS")
        .await
        .expect("stream")
        .get_last_raw_message_by_subject("payments.dead")
        .await
        .expect("the poison payment's dead letter");
    assert_eq!(
        dead.headers
            .get(idem::consumer::headers::REASON)
            .map(|v| v.as_str()),
        Some("handler_error")
    );
}

#[tokio::test]
async fn a_missing_permission_is_reported_as_one_naming_the_subject() {
    let server = server().await;
    provision(&server).await;
    // The producer may not read consumers or claims: as a worker it is
    // refused, and told which subject.
    let began = Instant::now();
    let refused = Runtime::builder(connect_as(&server, "producer").await)
        .state(Cards::default())
        .handler(issue_membership_card)
        .build()
        .await
        .err()
        .expect("the producer cannot run the handler");
    match &refused {
        RuntimeError::PermissionDenied { subject, .. } => {
            assert!(
                subject.starts_with("$JS.API.") || subject.starts_with("$KV."),
                "{refused}"
            );
        }
        other => panic!("expected PermissionDenied, got {other}"),
    }
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "reported after one unanswered request, not after start-up's patience: {:?}",
        began.elapsed()
    );
    assert!(
        refused.to_string().contains("docs/permissions.md"),
        "{refused}"
    );
}
