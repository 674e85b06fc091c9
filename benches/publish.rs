//! Producer throughput: idem's Publisher and Outbox against raw async-nats
//! publishing, measured in the same run on a fresh local nats-server.
//!
//! ```text
//! cargo bench --bench publish
//! ```
//!
//! Each figure is the median of 3 runs; ratios are against the raw
//! figure of the same kind (sequential or pipelined).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures::StreamExt;
use idem::outbox::{Outbox, OutboxConfig};
use idem::publisher::{Outgoing, Publisher};
use idem::testing::NatsServer;

const SEQUENTIAL: usize = 2_000;
const PIPELINED: usize = 20_000;
const WINDOW: usize = 256;
const RUNS: usize = 3;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    println!("nats-server {}; median of {RUNS} runs\n", server.version());
    println!("| scenario | messages | msgs/s | vs raw |");
    println!("|---|---|---|---|");

    let raw_seq = median(|run| raw_sequential(js.clone(), run)).await?;
    row(
        "raw publish, await each PubAck",
        SEQUENTIAL,
        raw_seq,
        raw_seq,
    );
    let idem_seq = median(|run| publisher_sequential(client.clone(), js.clone(), run)).await?;
    row("Publisher::send, sequential", SEQUENTIAL, idem_seq, raw_seq);
    let raw_pipe = median(|run| raw_pipelined(js.clone(), run)).await?;
    row("raw publish, 256 in flight", PIPELINED, raw_pipe, raw_pipe);
    let idem_pipe = median(|run| publisher_pipelined(client.clone(), js.clone(), run)).await?;
    row(
        "Publisher::publish_all, 256 in flight",
        PIPELINED,
        idem_pipe,
        raw_pipe,
    );
    let outbox = median(|run| outbox_confirmed(client.clone(), js.clone(), run)).await?;
    row(
        "Outbox enqueue (batches of 1000) → confirmed",
        PIPELINED,
        outbox,
        raw_pipe,
    );
    Ok(())
}

fn row(name: &str, messages: usize, rate: f64, baseline: f64) {
    println!(
        "| {name} | {messages} | {rate:.0} | {:.2}× |",
        rate / baseline
    );
}

async fn median<F, Fut>(mut bench: F) -> Result<f64, BoxError>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<f64, BoxError>>,
{
    let mut rates = Vec::with_capacity(RUNS);
    for run in 0..RUNS {
        rates.push(bench(run).await?);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[RUNS / 2])
}

/// A fresh stream per run, so that duplicate windows do not carry over.
async fn fresh(js: &jetstream::Context, name: &str) -> Result<String, BoxError> {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![format!("{}.>", name.to_lowercase())],
        ..Default::default()
    })
    .await?;
    Ok(format!("{}.events", name.to_lowercase()))
}

fn rate(messages: usize, took: Duration) -> f64 {
    messages as f64 / took.as_secs_f64()
}

async fn raw_sequential(js: jetstream::Context, run: usize) -> Result<f64, BoxError> {
    let subject = fresh(&js, &format!("RAWSEQ{run}")).await?;
    let started = Instant::now();
    for i in 0..SEQUENTIAL {
        let message = PublishMessage::build()
            .payload(vec![b'x'; 128].into())
            .message_id(format!("{i}"));
        js.send_publish(subject.clone(), message).await?.await?;
    }
    Ok(rate(SEQUENTIAL, started.elapsed()))
}

async fn publisher_sequential(
    client: async_nats::Client,
    js: jetstream::Context,
    run: usize,
) -> Result<f64, BoxError> {
    let subject = fresh(&js, &format!("PUBSEQ{run}")).await?;
    let publisher = Publisher::new(client);
    let started = Instant::now();
    for i in 0..SEQUENTIAL {
        publisher
            .send(Outgoing::new(subject.clone(), vec![b'x'; 128]).with_id(format!("{i}")))
            .await?;
    }
    Ok(rate(SEQUENTIAL, started.elapsed()))
}

async fn raw_pipelined(js: jetstream::Context, run: usize) -> Result<f64, BoxError> {
    let subject = fresh(&js, &format!("RAWPIPE{run}")).await?;
    let started = Instant::now();
    let results: Vec<Result<(), BoxError>> = futures::stream::iter(0..PIPELINED)
        .map(|i| {
            let (js, subject) = (js.clone(), subject.clone());
            async move {
                let message = PublishMessage::build()
                    .payload(vec![b'x'; 128].into())
                    .message_id(format!("{i}"));
                js.send_publish(subject, message).await?.await?;
                Ok(())
            }
        })
        .buffered(WINDOW)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(rate(PIPELINED, started.elapsed()))
}

async fn publisher_pipelined(
    client: async_nats::Client,
    js: jetstream::Context,
    run: usize,
) -> Result<f64, BoxError> {
    let subject = fresh(&js, &format!("PUBPIPE{run}")).await?;
    let publisher = Publisher::new(client);
    let messages = (0..PIPELINED)
        .map(move |i| Outgoing::new(subject.clone(), vec![b'x'; 128]).with_id(format!("{i}")));
    let started = Instant::now();
    let results: Vec<_> = publisher
        .publish_all(futures::stream::iter(messages), WINDOW)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(rate(PIPELINED, started.elapsed()))
}

async fn outbox_confirmed(
    client: async_nats::Client,
    js: jetstream::Context,
    run: usize,
) -> Result<f64, BoxError> {
    let subject = fresh(&js, &format!("OUTBOX{run}")).await?;
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(
        dir.path().join("bench.outbox"),
        Publisher::new(client),
        OutboxConfig::default(),
    )
    .await?;
    let started = Instant::now();
    for chunk in 0..PIPELINED / 1_000 {
        let messages = (0..1_000)
            .map(|i| {
                Outgoing::new(subject.clone(), vec![b'x'; 128]).with_id(format!("{chunk}-{i}"))
            })
            .collect();
        outbox.enqueue_all(messages).await?;
    }
    outbox.flush().await?;
    Ok(rate(PIPELINED, started.elapsed()))
}
