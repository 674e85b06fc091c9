//! Consumer throughput: idem's runtime against raw async-nats pull
//! consumers and the naive KV dedup a user would hand-write, measured in
//! the same run on a fresh local nats-server.
//!
//! ```text
//! cargo bench --bench consume            # concurrency 1, 16, 64, 256
//! cargo bench --bench consume -- --quick # concurrency 16 only, fewer messages
//! ```
//!
//! Each figure is the median of 3 runs over fresh streams; ratios are
//! against raw pull + double ack at the same concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use idem::runtime::Outcome;
use idem::testing::NatsServer;
use idem::{HandlerError, Json, Runtime, idempotent};
use tokio::sync::Semaphore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const RUNS: usize = 3;

#[derive(serde::Deserialize)]
struct Event {
    id: u64,
}

#[idempotent(stream = "CONSUME", subject = "consume.events", key = event.id, dedup = off)]
async fn idem_off(Json(event): Json<Event>) -> Result<(), HandlerError> {
    let _ = event.id;
    Ok(())
}

#[idempotent(stream = "CONSUME", subject = "consume.events", key = event.id)]
async fn idem_kv(Json(event): Json<Event>) -> Result<(), HandlerError> {
    let _ = event.id;
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    RawAck,
    RawDoubleAck,
    NaiveDedup,
    IdemOff,
    IdemKv,
    IdemKvDuplicates,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::RawAck => "raw pull + ack",
            Scenario::RawDoubleAck => "raw pull + double ack (baseline)",
            Scenario::NaiveDedup => "naive dedup: KV get, put, double ack",
            Scenario::IdemOff => "idem dedup = off",
            Scenario::IdemKv => "idem dedup = kv",
            Scenario::IdemKvDuplicates => "idem dedup = kv, 30 % duplicates",
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (concurrencies, messages): (&[usize], usize) = if quick {
        (&[16], 1_000)
    } else {
        (&[1, 16, 64, 256], 3_000)
    };
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    println!(
        "nats-server {}; {messages} messages of ~20 B per run; median of {RUNS} runs\n",
        server.version()
    );
    println!("| concurrency | scenario | msgs/s | vs baseline |");
    println!("|---|---|---|---|");
    let scenarios = [
        Scenario::RawDoubleAck,
        Scenario::RawAck,
        Scenario::NaiveDedup,
        Scenario::IdemOff,
        Scenario::IdemKv,
        Scenario::IdemKvDuplicates,
    ];
    for &concurrency in concurrencies {
        let mut baseline = None;
        for scenario in scenarios {
            let mut rates = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                rates.push(run(&client, scenario, concurrency, messages).await?);
            }
            rates.sort_by(f64::total_cmp);
            let rate = rates[RUNS / 2];
            let base = *baseline.get_or_insert(rate);
            println!(
                "| {concurrency} | {} | {rate:.0} | {:.2}× |",
                scenario.name(),
                rate / base
            );
        }
    }
    Ok(())
}

/// Preloads a fresh stream and consumes it; messages per second.
async fn run(
    client: &async_nats::Client,
    scenario: Scenario,
    concurrency: usize,
    messages: usize,
) -> Result<f64, BoxError> {
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream("CONSUME").await;
    let stream = js
        .create_stream(stream::Config {
            name: "CONSUME".into(),
            subjects: vec!["consume.>".into()],
            ..Default::default()
        })
        .await?;
    let _ = js.delete_key_value("idem_claims").await;
    let _ = js.delete_key_value("naive_claims").await;
    // With duplicates, the last 30 % of the messages resend earlier ids (as a
    // producer's resends would arrive: after the originals).
    let originals = if scenario == Scenario::IdemKvDuplicates {
        messages * 7 / 10
    } else {
        messages
    };
    let ids = (0..messages).map(move |i| {
        if i < originals {
            i as u64
        } else {
            ((i - originals) * 2 % originals) as u64
        }
    });
    let acks: Vec<_> = futures::stream::iter(ids)
        .map(|id| {
            let js = js.clone();
            async move {
                js.publish("consume.events", format!("{{\"id\":{id}}}").into())
                    .await?
                    .await
            }
        })
        .buffered(256)
        .collect()
        .await;
    acks.into_iter().collect::<Result<Vec<_>, _>>()?;

    let mut started = Instant::now();
    match scenario {
        Scenario::IdemOff | Scenario::IdemKv | Scenario::IdemKvDuplicates => {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let builder = Runtime::builder(client.clone()).shutdown_on(async {
                let _ = stopped.await;
            });
            let tune = move |config: idem::handler::HandlerConfig| config.concurrency(concurrency);
            let (builder, name) = if scenario == Scenario::IdemOff {
                (builder.handler_with(idem_off, tune), "idem_off")
            } else {
                (builder.handler_with(idem_kv, tune), "idem_kv")
            };
            let runtime = builder.build().await?;
            // Provisioning is start-up cost, not throughput.
            started = Instant::now();
            let stats = runtime.stats();
            let running = tokio::spawn(runtime.run());
            loop {
                let counts = stats.handler(name);
                if (counts.get(Outcome::Processed) + counts.get(Outcome::Duplicate)) as usize
                    >= messages
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let took = started.elapsed();
            let _ = stop.send(());
            running.await??;
            Ok(messages as f64 / took.as_secs_f64())
        }
        Scenario::RawAck | Scenario::RawDoubleAck | Scenario::NaiveDedup => {
            let consumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some("raw".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    max_ack_pending: (concurrency * 4).max(64) as i64,
                    ..Default::default()
                })
                .await?;
            let kv = if scenario == Scenario::NaiveDedup {
                Some(
                    js.create_key_value(jetstream::kv::Config {
                        bucket: "naive_claims".into(),
                        ..Default::default()
                    })
                    .await?,
                )
            } else {
                None
            };
            let permits = Arc::new(Semaphore::new(concurrency));
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut handled = 0;
            while handled < messages {
                let mut batch = consumer
                    .fetch()
                    .max_messages(concurrency.min(256))
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await?;
                while let Some(message) = batch.next().await {
                    let message = message?;
                    let permit = permits.clone().acquire_owned().await?;
                    let (kv, done) = (kv.clone(), done.clone());
                    tokio::spawn(async move {
                        let result: Result<(), BoxError> = async {
                            match (scenario, kv) {
                                (Scenario::RawAck, _) => message.ack().await?,
                                (Scenario::NaiveDedup, Some(kv)) => {
                                    let event: Event = serde_json::from_slice(&message.payload)?;
                                    let key = format!("h.{}", event.id);
                                    if kv.get(&key).await?.is_none() {
                                        kv.put(&key, "done".into()).await?;
                                    }
                                    message.double_ack().await?
                                }
                                _ => message.double_ack().await?,
                            }
                            Ok(())
                        }
                        .await;
                        if let Err(e) = result {
                            eprintln!("bench message failed: {e}");
                        }
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        drop(permit);
                    });
                    handled += 1;
                }
            }
            while done.load(std::sync::atomic::Ordering::SeqCst) < messages {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(messages as f64 / started.elapsed().as_secs_f64())
        }
    }
}
