//! Producer scenarios: raw async-nats publishing (sequential, pipelined)
//! against idem's `Publisher` and `Outbox`, each run on a fresh stream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures::StreamExt;
use idem::outbox::{Outbox, OutboxConfig};
use idem::publisher::{Outgoing, Publisher};

use crate::BoxError;
use crate::measure::Figures;

/// Messages in flight when pipelining.
pub const WINDOW: usize = 256;
/// Messages the outbox is given per `enqueue_all` (one fsync each).
const OUTBOX_BATCH: usize = 1_000;
const PAYLOAD: [u8; 128] = [b'x'; 128];

/// One producer scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    RawSequential,
    PublisherSequential,
    RawPipelined,
    PublisherPipelined,
    Outbox,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::RawSequential,
        Scenario::PublisherSequential,
        Scenario::RawPipelined,
        Scenario::PublisherPipelined,
        Scenario::Outbox,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::RawSequential => "raw publish, await each PubAck",
            Scenario::PublisherSequential => "Publisher::send, sequential",
            Scenario::RawPipelined => "raw publish, 256 in flight",
            Scenario::PublisherPipelined => "Publisher::publish_all, 256 in flight",
            Scenario::Outbox => "Outbox enqueue (batches of 1,000) → confirmed",
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Scenario::RawSequential => "raw_sequential",
            Scenario::PublisherSequential => "publisher_sequential",
            Scenario::RawPipelined => "raw_pipelined",
            Scenario::PublisherPipelined => "publisher_pipelined",
            Scenario::Outbox => "outbox",
        }
    }

    /// The raw scenario this one is compared with.
    pub fn baseline(self) -> Scenario {
        match self {
            Scenario::RawSequential | Scenario::PublisherSequential => Scenario::RawSequential,
            _ => Scenario::RawPipelined,
        }
    }

    pub fn sequential(self) -> bool {
        self.baseline() == Scenario::RawSequential
    }
}

/// Publishes `messages` in this scenario's way; `run` names a fresh stream.
pub async fn run(
    client: &async_nats::Client,
    scenario: Scenario,
    messages: usize,
    run: usize,
) -> Result<Figures, BoxError> {
    let js = jetstream::new(client.clone());
    let name = format!("PRODUCE_{}_{run}", scenario.id().to_uppercase());
    let _ = js.delete_stream(&name).await;
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("produce.{run}.{}", scenario.id())],
        ..Default::default()
    })
    .await?;
    let subject = format!("produce.{run}.{}", scenario.id());
    let publisher = Publisher::new(client.clone());
    let mut latencies = Vec::with_capacity(messages);
    let started = Instant::now();
    match scenario {
        Scenario::RawSequential => {
            for i in 0..messages {
                let began = Instant::now();
                let message = PublishMessage::build()
                    .payload(PAYLOAD.to_vec().into())
                    .message_id(i.to_string());
                js.send_publish(subject.clone(), message).await?.await?;
                latencies.push(began.elapsed());
            }
        }
        Scenario::PublisherSequential => {
            for i in 0..messages {
                let began = Instant::now();
                publisher
                    .send(Outgoing::new(subject.clone(), PAYLOAD.to_vec()).with_id(i.to_string()))
                    .await?;
                latencies.push(began.elapsed());
            }
        }
        Scenario::RawPipelined => {
            let results: Vec<Result<Duration, BoxError>> = futures::stream::iter(0..messages)
                .map(|i| {
                    let (js, subject) = (js.clone(), subject.clone());
                    async move {
                        let began = Instant::now();
                        let message = PublishMessage::build()
                            .payload(PAYLOAD.to_vec().into())
                            .message_id(i.to_string());
                        js.send_publish(subject, message).await?.await?;
                        Ok(began.elapsed())
                    }
                })
                .buffered(WINDOW)
                .collect()
                .await;
            for took in results {
                latencies.push(took?);
            }
        }
        Scenario::PublisherPipelined => {
            // `publish_all` answers in order: the send instants queue up in
            // the same order as the answers.
            let sent = Arc::new(Mutex::new(VecDeque::with_capacity(WINDOW)));
            let outgoing = {
                let sent = sent.clone();
                (0..messages).map(move |i| {
                    sent.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push_back(Instant::now());
                    Outgoing::new(subject.clone(), PAYLOAD.to_vec()).with_id(i.to_string())
                })
            };
            let mut answers = publisher.publish_all(futures::stream::iter(outgoing), WINDOW);
            while let Some(answer) = answers.next().await {
                answer?;
                let began = sent
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                latencies.extend(began.map(|b| b.elapsed()));
            }
        }
        Scenario::Outbox => {
            let dir = tempfile::tempdir()?;
            let outbox = Outbox::open(
                dir.path().join("bench.outbox"),
                publisher,
                OutboxConfig::default(),
            )
            .await?;
            for chunk in 0..messages.div_ceil(OUTBOX_BATCH) {
                let batch = (chunk * OUTBOX_BATCH..((chunk + 1) * OUTBOX_BATCH).min(messages))
                    .map(|i| {
                        Outgoing::new(subject.clone(), PAYLOAD.to_vec()).with_id(i.to_string())
                    })
                    .collect();
                outbox.enqueue_all(batch).await?;
            }
            outbox.flush().await?;
        }
    }
    let took = started.elapsed();
    let stored = js.get_stream(&name).await?.info().await?.state.messages;
    js.delete_stream(&name).await?;
    if stored != messages as u64 {
        return Err(format!("{}: {stored} of {messages} stored", scenario.name()).into());
    }
    Ok(Figures::new(messages, took, &mut latencies))
}
