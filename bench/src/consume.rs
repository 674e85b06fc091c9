//! Consumer scenarios: raw pull consumers (the baselines), the naive KV
//! dedup a user would hand-write, and idem at each dedup level — each run
//! over a freshly preloaded stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use idem::consumer::Outcome;
use idem::handler::HandlerConfig;
use idem::store::KvStoreConfig;
use idem::{HandlerError, Json, Runtime, State, Tx, idempotent};
use tokio::sync::Semaphore;

use crate::measure::{Figures, Latencies};
use crate::workload::{self, Order};
use crate::{BoxError, Postgres};
use tracing::Instrument;

/// One consumer scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    RawAck,
    RawDoubleAck,
    Naive,
    NaiveDuplicates,
    IdemOff,
    IdemKv,
    IdemKvDuplicates,
    IdemKvSharded,
    NaiveTransactional,
    IdemTransactionalAlone,
    IdemTransactional,
}

impl Scenario {
    /// Every scenario, the baseline first.
    pub const ALL: [Scenario; 11] = [
        Scenario::RawDoubleAck,
        Scenario::RawAck,
        Scenario::Naive,
        Scenario::NaiveDuplicates,
        Scenario::IdemOff,
        Scenario::IdemKv,
        Scenario::IdemKvDuplicates,
        Scenario::IdemKvSharded,
        Scenario::NaiveTransactional,
        Scenario::IdemTransactionalAlone,
        Scenario::IdemTransactional,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::RawAck => "raw pull + ack",
            Scenario::RawDoubleAck => "raw pull + double ack",
            Scenario::Naive => "naive dedup (KV get, put, double ack)",
            Scenario::NaiveDuplicates => "naive dedup, 30 % duplicates",
            Scenario::IdemOff => "idem dedup = off",
            Scenario::IdemKv => "idem dedup = kv",
            Scenario::IdemKvDuplicates => "idem dedup = kv, 30 % duplicates",
            Scenario::IdemKvSharded => "idem dedup = kv, claims in 4 shards",
            Scenario::NaiveTransactional => {
                "naive transactional inbox (a PostgreSQL transaction per message, double ack)"
            }
            Scenario::IdemTransactionalAlone => "idem dedup = transactional, batch = 1",
            Scenario::IdemTransactional => {
                "idem dedup = transactional, default batch (group commit)"
            }
        }
    }

    /// A stable identifier for JSON and the chart.
    pub fn id(self) -> &'static str {
        match self {
            Scenario::RawAck => "raw_ack",
            Scenario::RawDoubleAck => "raw_double_ack",
            Scenario::Naive => "naive",
            Scenario::NaiveDuplicates => "naive_dup30",
            Scenario::IdemOff => "idem_off",
            Scenario::IdemKv => "idem_kv",
            Scenario::IdemKvDuplicates => "idem_kv_dup30",
            Scenario::IdemKvSharded => "idem_kv_shards4",
            Scenario::NaiveTransactional => "naive_transactional",
            Scenario::IdemTransactionalAlone => "idem_transactional_batch1",
            Scenario::IdemTransactional => "idem_transactional",
        }
    }

    fn duplicates(self) -> bool {
        matches!(self, Scenario::NaiveDuplicates | Scenario::IdemKvDuplicates)
    }
}

/// The shards of the sharded kv scenario.
const SHARDS: usize = 4;

/// What every run shares.
pub struct Bench {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub postgres: Postgres,
    /// Filled by the span timer while an idem runtime runs.
    pub spans: Latencies,
    /// Keep the inbox's rows between runs (the capacity scenario fills
    /// it before a run).
    pub keep_inbox: std::sync::atomic::AtomicBool,
}

#[idempotent(stream = "BENCH", subject = "bench.orders", key = order.id, dedup = off, start = all)]
async fn bench_off(Json(order): Json<Order>) -> Result<(), HandlerError> {
    std::hint::black_box(order);
    Ok(())
}

#[idempotent(stream = "BENCH", subject = "bench.orders", key = order.id, start = all)]
async fn bench_kv(Json(order): Json<Order>) -> Result<(), HandlerError> {
    std::hint::black_box(order);
    Ok(())
}

/// The one-row effect, in the handler's transaction.
#[idempotent(
    stream = "BENCH",
    start = all,
    subject = "bench.orders",
    key = order.id,
    dedup = transactional
)]
async fn bench_tx(
    Json(order): Json<Order>,
    tx: Tx,
    State(effect): State<Effect>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    sqlx::query(&effect.insert)
        .bind(&order.id)
        .bind(order.amount)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The inbox a user writes by hand: per message, one transaction that
/// records the message id and applies the effect, then a double ack.
#[derive(Clone)]
struct NaiveInbox {
    pool: sqlx::PgPool,
    claim: Arc<str>,
    effect: Arc<str>,
}

impl NaiveInbox {
    fn new(postgres: &Postgres) -> Self {
        let schema = &postgres.schema;
        Self {
            pool: postgres.pool.clone(),
            claim: format!(
                "INSERT INTO {schema}.naive_processed (id) VALUES ($1) ON CONFLICT DO NOTHING"
            )
            .into(),
            effect: format!("INSERT INTO {schema}.bench_effects (id, amount) VALUES ($1, $2)")
                .into(),
        }
    }

    async fn apply(&self, payload: &[u8]) -> Result<(), BoxError> {
        let order: Order = serde_json::from_slice(payload)?;
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(&self.claim)
            .bind(&order.id)
            .execute(&mut *tx)
            .await?;
        if claimed.rows_affected() == 1 {
            sqlx::query(&self.effect)
                .bind(&order.id)
                .bind(order.amount)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The transactional handler's statement, with the bench's schema.
#[derive(Clone)]
struct Effect {
    insert: Arc<str>,
}

impl Bench {
    /// The hand-written dedup's bucket. Its stream is created as a KV client
    /// would (`create_key_value` itself cannot parse nats-server 2.9's
    /// account info).
    async fn naive_bucket(&self) -> Result<jetstream::kv::Store, BoxError> {
        self.js
            .create_stream(stream::Config {
                name: "KV_naive_claims".into(),
                subjects: vec!["$KV.naive_claims.>".into()],
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::New,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                ..Default::default()
            })
            .await?;
        Ok(self.js.get_key_value("naive_claims").await?)
    }

    /// Preloads `messages` and consumes them at `concurrency`.
    pub async fn run(
        &self,
        scenario: Scenario,
        concurrency: usize,
        messages: usize,
    ) -> Result<Figures, BoxError> {
        let numbers = workload::order_numbers(messages, scenario.duplicates());
        workload::preload(&self.js, &numbers).await?;
        for shard in 0..SHARDS {
            let _ = self
                .js
                .delete_key_value(KvStoreConfig::default().shards(SHARDS).shard_bucket(shard))
                .await;
        }
        let _ = self.js.delete_key_value("naive_claims").await;
        match scenario {
            Scenario::IdemOff
            | Scenario::IdemKv
            | Scenario::IdemKvDuplicates
            | Scenario::IdemKvSharded => self.idem(scenario, concurrency, messages).await,
            Scenario::IdemTransactional | Scenario::IdemTransactionalAlone => {
                if !self.keep_inbox.load(Ordering::SeqCst) {
                    self.postgres.reset().await?;
                }
                self.idem(scenario, concurrency, messages).await
            }
            Scenario::NaiveTransactional => {
                self.postgres.reset().await?;
                self.raw(scenario, concurrency, messages).await
            }
            _ => self.raw(scenario, concurrency, messages).await,
        }
    }

    async fn idem(
        &self,
        scenario: Scenario,
        concurrency: usize,
        messages: usize,
    ) -> Result<Figures, BoxError> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let builder = Runtime::builder(self.client.clone()).shutdown_on(async {
            let _ = stopped.await;
        });
        let builder = if scenario == Scenario::IdemKvSharded {
            builder.claims(KvStoreConfig::default().shards(SHARDS))
        } else {
            builder
        };
        let tune = move |config: HandlerConfig| config.concurrency(concurrency);
        let (builder, name) = match scenario {
            Scenario::IdemOff => (builder.handler_with(bench_off, tune), "bench_off"),
            Scenario::IdemTransactional | Scenario::IdemTransactionalAlone => (
                builder
                    .postgres(self.postgres.pool.clone(), &self.postgres.schema)
                    .state(Effect {
                        insert: format!(
                            "INSERT INTO {}.bench_effects (id, amount) VALUES ($1, $2)",
                            self.postgres.schema
                        )
                        .into(),
                    })
                    .handler_with(bench_tx, move |config| {
                        let config = tune(config);
                        if scenario == Scenario::IdemTransactionalAlone {
                            config.batch(1)
                        } else {
                            config
                        }
                    }),
                "bench_tx",
            ),
            _ => (builder.handler_with(bench_kv, tune), "bench_kv"),
        };
        let runtime = builder.build().await?;
        let stats = runtime.stats();
        self.spans.take();
        // Provisioning is start-up cost, not throughput.
        let started = Instant::now();
        let running = tokio::spawn(runtime.run());
        loop {
            let counts = stats.handler(name);
            let answered = counts.get(Outcome::Processed) + counts.get(Outcome::Duplicate);
            let failed = counts.get(Outcome::DeadLettered) + counts.get(Outcome::KeyConflict);
            if failed > 0 {
                return Err(
                    format!("{name}: {failed} messages dead-lettered in a bench run").into(),
                );
            }
            if answered as usize >= messages {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = started.elapsed();
        let _ = stop.send(());
        running.await??;
        let mut spans = self.spans.take();
        Ok(Figures::new(messages, took, &mut spans))
    }

    async fn raw(
        &self,
        scenario: Scenario,
        concurrency: usize,
        messages: usize,
    ) -> Result<Figures, BoxError> {
        let stream = self.js.get_stream(workload::STREAM).await?;
        // As idem provisions its consumers.
        let max_ack_pending = (concurrency * 4).max(64);
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: max_ack_pending as i64,
                ..Default::default()
            })
            .await?;
        let kv = if matches!(scenario, Scenario::Naive | Scenario::NaiveDuplicates) {
            Some(self.naive_bucket().await?)
        } else {
            None
        };
        let inbox =
            (scenario == Scenario::NaiveTransactional).then(|| NaiveInbox::new(&self.postgres));
        self.spans.take();
        let permits = Arc::new(Semaphore::new(concurrency));
        let done = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut pulled = consumer
            .stream()
            // Pull ahead as far as the consumer lets messages be pending (a
            // batch of one waits out each pull's round trip and expiry).
            .max_messages_per_batch(max_ack_pending.min(256))
            .messages()
            .await?
            .take(messages);
        while let Some(message) = pulled.next().await {
            let message = message?;
            let permit = permits.clone().acquire_owned().await?;
            let (kv, inbox) = (kv.clone(), inbox.clone());
            let (done, failed) = (done.clone(), failed.clone());
            tokio::spawn(async move {
                // Timed exactly as idem's deliveries are: a span of the same
                // name, from permit to acknowledgement.
                let result: Result<(), BoxError> = async {
                    match (kv, inbox) {
                        (Some(kv), _) => {
                            let order: Order = serde_json::from_slice(&message.payload)?;
                            if kv.get(&order.id).await?.is_none() {
                                std::hint::black_box(&order);
                                kv.put(&order.id, "done".into()).await?;
                            }
                            message.double_ack().await?
                        }
                        (None, Some(inbox)) => {
                            inbox.apply(&message.payload).await?;
                            message.double_ack().await?
                        }
                        (None, None) if scenario == Scenario::RawAck => message.ack().await?,
                        (None, None) => message.double_ack().await?,
                    }
                    Ok(())
                }
                .instrument(tracing::info_span!("idem.message"))
                .await;
                if let Err(e) = result {
                    eprintln!("bench message failed: {e}");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
                drop(permit);
            });
        }
        while done.load(Ordering::SeqCst) < messages {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = started.elapsed();
        if failed.load(Ordering::SeqCst) > 0 {
            return Err(format!("{}: messages failed in a bench run", scenario.name()).into());
        }
        Ok(Figures::new(messages, took, &mut self.spans.take()))
    }
}
