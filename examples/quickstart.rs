//! The smallest useful idem program: one handler that charges each order
//! once, however often the order event is delivered.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Connects to `NATS_URL` or nats://127.0.0.1:4222 (starting a throw-away
//! nats-server if none listens and a binary is available), publishes one
//! order three times, and stops after two seconds.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::{HandlerError, Json, Runtime, idempotent};

#[derive(serde::Deserialize)]
struct OrderPlaced {
    order_id: u64,
    total_cents: i64,
}

/// Charges the order. `key` says what makes two messages "the same order".
#[idempotent(
    stream = "IDEM_QUICKSTART",
    subject = "quickstart.orders",
    key = order.order_id,
    start = all, // a new consumer handles what the stream already holds
)]
async fn charge_order(Json(order): Json<OrderPlaced>) -> Result<(), HandlerError> {
    println!(
        "charging order {} for {} cents",
        order.order_id, order.total_cents
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Dev helper: $NATS_URL, or a throw-away nats-server for this run.
    let (client, _nats) = idem::testing::LocalNats::connect().await?;
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream("IDEM_QUICKSTART").await;
    js.create_stream(stream::Config {
        name: "IDEM_QUICKSTART".into(),
        subjects: vec!["quickstart.>".into()],
        ..Default::default()
    })
    .await?;

    // The same order, delivered three times (say, a producer that retried).
    let order_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    for _ in 0..3 {
        let body = format!(r#"{{"order_id":{order_id},"total_cents":4200}}"#);
        js.publish("quickstart.orders", body.into()).await?.await?;
    }

    Runtime::builder(client)
        .handler(charge_order)
        .shutdown_on(tokio::time::sleep(Duration::from_secs(2)))
        .run()
        .await?;
    println!("three deliveries, one charge");
    let _ = js.delete_stream("IDEM_QUICKSTART").await;
    Ok(())
}
