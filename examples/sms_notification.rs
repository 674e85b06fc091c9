//! A cheap, harmless effect with `dedup = off`: sending a notification SMS
//! twice annoys nobody, and skipping the dedup store saves a round trip per
//! message. The handler still gets retries with backoff and a dead letter.
//!
//! ```text
//! cargo run --example sms_notification
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::consumer::Outcome;
use idem::{HandlerError, Json, Retry, Runtime, State, idempotent};

#[derive(serde::Deserialize)]
struct Sms {
    to: String,
    text: String,
}

/// A flaky SMS gateway: every third send times out.
#[derive(Clone, Default)]
struct Gateway {
    calls: Arc<AtomicU32>,
}

#[idempotent(
    stream = "IDEM_SMS",
    start = all, // a new consumer handles what the stream already holds
    subject = "sms.send",
    dedup = off,
    retry = Retry::exponential("50ms", "1s").attempts(5).jitter(),
)]
async fn send_sms(
    Json(sms): Json<Sms>,
    State(gateway): State<Gateway>,
) -> Result<(), HandlerError> {
    if gateway.calls.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
        return Err(HandlerError::retryable("gateway timed out"));
    }
    println!("sms to {}: {}", sms.to, sms.text);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Dev helper: $NATS_URL, or a throw-away nats-server for this run.
    let (client, _nats) = idem::testing::LocalNats::connect().await?;
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream("IDEM_SMS").await;
    js.create_stream(stream::Config {
        name: "IDEM_SMS".into(),
        subjects: vec!["sms.>".into()],
        ..Default::default()
    })
    .await?;
    for i in 1..=5 {
        let body = format!(r#"{{"to":"+4670000000{i}","text":"your parcel {i} is on its way"}}"#);
        js.publish("sms.send", body.into()).await?.await?;
    }

    let runtime = Runtime::builder(client)
        .state(Gateway::default())
        .handler(send_sms)
        .shutdown_on(tokio::time::sleep(Duration::from_secs(3)))
        .build()
        .await?;
    let stats = runtime.stats();
    runtime.run().await?;
    let counts = stats.handler("send_sms");
    println!(
        "sent {}, retried {}, dead-lettered {}",
        counts.get(Outcome::Processed),
        counts.get(Outcome::Retried),
        counts.get(Outcome::DeadLettered)
    );
    let _ = js.delete_stream("IDEM_SMS").await;
    Ok(())
}
