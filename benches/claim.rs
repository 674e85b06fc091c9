//! Latency of the KV dedup store's claim and complete, against a raw KV put
//! (one JetStream write round trip) measured in the same run.
//!
//! ```text
//! cargo bench --bench claim                 # newest nats-server found (IDEM_NATS_SERVER / PATH)
//! IDEM_NATS_SERVER=/usr/sbin/nats-server cargo bench --bench claim
//! ```
//!
//! Starts its own nats-server (file storage, single node). Each figure is the
//! median of 3 runs of `OPS` operations at the given concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::join_all;
use idem::claim::ClaimOutcome;
use idem::fingerprint::Fingerprint;
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::{DedupStore, KvStore, KvStoreConfig};
use idem::testing::NatsServer;
use tokio::sync::Semaphore;

const OPS: usize = 2_000;
const RUNS: usize = 3;
const LEASE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Op {
    RawPut,
    Claim,
    Complete,
    DuplicateClaim,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::RawPut => "raw KV put (baseline)",
            Op::Claim => "claim (fresh key)",
            Op::Complete => "complete",
            Op::DuplicateClaim => "claim (duplicate)",
        }
    }
}

struct Figures {
    p50: Duration,
    p99: Duration,
    ops_per_sec: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(server.connect().await?);
    println!(
        "nats-server {} at {}; {OPS} ops per run, median of {RUNS} runs\n",
        server.version(),
        server.client_url()
    );
    println!("| concurrency | operation | p50 | p99 | ops/s | p50 vs raw put |");
    println!("|---|---|---|---|---|---|");
    for concurrency in [1, 64] {
        let mut raw_p50 = None;
        for op in [Op::RawPut, Op::Claim, Op::Complete, Op::DuplicateClaim] {
            let mut runs = Vec::with_capacity(RUNS);
            for run in 0..RUNS {
                runs.push(measure(&js, op, concurrency, run).await?);
            }
            runs.sort_by_key(|f| f.p50);
            let median = &runs[RUNS / 2];
            let base = *raw_p50.get_or_insert(median.p50);
            println!(
                "| {concurrency} | {} | {:.0} µs | {:.0} µs | {:.0} | {:.2}× |",
                op.name(),
                micros(median.p50),
                micros(median.p99),
                median.ops_per_sec,
                micros(median.p50) / micros(base)
            );
        }
    }
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs `OPS` operations of one kind on a fresh bucket and times each. The
/// keys a `Complete` or `DuplicateClaim` needs are prepared untimed.
async fn measure(
    js: &jetstream::Context,
    op: Op,
    concurrency: usize,
    run: usize,
) -> Result<Figures, Box<dyn std::error::Error + Send + Sync>> {
    let bucket = format!("bench_{}_{concurrency}_{run}", op.name().len());
    let _ = js.delete_stream(format!("KV_{bucket}")).await;
    let store = KvStore::open(js, KvStoreConfig::default().bucket(&bucket)).await?;
    let kv = js.get_key_value(&bucket).await?;
    let handler = HandlerName::new("bench")?;
    let keys: Vec<RecordKey> = (0..OPS)
        .map(|i| IdempotencyKey::new(format!("payment-{i}")).map(|k| RecordKey::new(&handler, &k)))
        .collect::<Result<_, _>>()?;
    let payload = Some(Fingerprint::of(b"{\"payment\":1}"));

    let mut claims = Vec::new();
    if matches!(op, Op::Complete | Op::DuplicateClaim) {
        for key in &keys {
            if let ClaimOutcome::Claimed(claim) = store.claim(key, payload, LEASE).await? {
                if matches!(op, Op::DuplicateClaim) {
                    store.complete(&claim, None).await?;
                }
                claims.push(claim);
            }
        }
    }

    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let timed = (0..OPS).map(|i| {
        let (permits, store, kv, key, claim) = (
            permits.clone(),
            store.clone(),
            kv.clone(),
            keys[i].clone(),
            claims.get(i).cloned(),
        );
        async move {
            let _permit = permits.acquire().await.map_err(|e| e.to_string())?;
            let t = Instant::now();
            match op {
                Op::RawPut => kv
                    .put(key.as_str(), "x".into())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())?,
                Op::Claim | Op::DuplicateClaim => store
                    .claim(&key, payload, LEASE)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())?,
                Op::Complete => {
                    let claim = claim.ok_or("no claim prepared")?;
                    store
                        .complete(&claim, None)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())?
                }
            }
            Ok::<Duration, String>(t.elapsed())
        }
    });
    let mut latencies = join_all(timed)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let elapsed = started.elapsed();
    latencies.sort();
    let _ = js.delete_stream(format!("KV_{bucket}")).await;
    Ok(Figures {
        p50: latencies[OPS / 2],
        p99: latencies[OPS * 99 / 100],
        ops_per_sec: OPS as f64 / elapsed.as_secs_f64(),
    })
}
