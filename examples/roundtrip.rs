//! The smallest JetStream round trip, and the first half of idem's cure:
//! publish one message *twice* with the same `Nats-Msg-Id` (as a producer
//! whose PubAck was lost would), see the broker store it once, then consume
//! it with a confirmed acknowledgement.
//!
//! ```text
//! cargo run --example roundtrip
//! ```
//!
//! Connects to `NATS_URL` or nats://127.0.0.1:4222; if nothing listens there
//! and a `nats-server` binary is available, starts a throw-away one.

use std::error::Error;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures::StreamExt;
use idem::testing::LocalNats;

const STREAM: &str = "IDEM_ROUNDTRIP";
const SUBJECT: &str = "idem.roundtrip.greeting";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let nats = LocalNats::from_env_or_spawn().await?;
    println!("{}", nats.describe());
    let js = jetstream::new(async_nats::connect(nats.url()).await?);

    // A fresh stream each run, so that the report below is about this run.
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;

    // The producer sends, "loses" the PubAck, and resends with the same id.
    let message_id = uuid::Uuid::now_v7().to_string();
    for attempt in 1..=2 {
        let ack = js
            .send_publish(
                SUBJECT,
                PublishMessage::build()
                    .payload("hello, exactly once".into())
                    .message_id(&message_id),
            )
            .await?
            .await?;
        println!(
            "publish attempt {attempt} with Nats-Msg-Id {message_id}: stream sequence {}, duplicate: {}",
            ack.sequence, ack.duplicate
        );
    }

    // The consumer fetches and acknowledges with a confirmed (double) ack.
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("roundtrip".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await?;
    let mut received = 0;
    while let Some(message) = batch.next().await {
        let message = message?;
        println!(
            "consumed {:?} from {}",
            std::str::from_utf8(&message.payload)?,
            message.subject
        );
        message.double_ack().await?;
        received += 1;
    }

    println!(
        "stored once, consumed {received} time(s): {}",
        if received == 1 { "ok" } else { "UNEXPECTED" }
    );
    js.delete_stream(STREAM).await?;
    if received == 1 {
        Ok(())
    } else {
        Err("the broker kept a duplicate".into())
    }
}
