//! What claims cost the server as the bucket grows: idem's own records
//! (a claim, then its completion, as the runtime writes them) filled to
//! `--keys`, with the server's RSS, its store on disk, and the latency of a
//! fresh claim + completion and of a duplicate's claim at each step.
//! Opt-in (`--scenario capacity`): it takes minutes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use idem::claim::ClaimOutcome;
use idem::fingerprint::Fingerprint;
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::{DedupStore, KvStore, KvStoreConfig};
use idem::testing::NatsServer;

use crate::BoxError;
use crate::measure::percentile;

/// Claims in flight while filling.
const FILL_IN_FLIGHT: usize = 256;
/// Samples per latency figure.
const SAMPLES: usize = 2_000;
const LEASE: Duration = Duration::from_secs(30);

/// One step of the fill.
#[derive(Debug, serde::Serialize)]
pub struct CapacityRow {
    pub keys: usize,
    pub server_rss_mib: f64,
    pub rss_bytes_per_key: f64,
    pub disk_mib: f64,
    pub disk_bytes_per_key: f64,
    pub claim_p50_us: f64,
    pub claim_p99_us: f64,
    pub duplicate_p50_us: f64,
    pub duplicate_p99_us: f64,
    pub fill_per_s: f64,
}

fn key(i: usize) -> RecordKey {
    let handler = HandlerName::new("capacity").expect("a valid handler name");
    let key = IdempotencyKey::new(format!("order-{i:012}")).expect("a non-empty key");
    RecordKey::new(&handler, &key)
}

fn payload(i: usize) -> Option<Fingerprint> {
    Some(Fingerprint::of(format!("{{\"order\":{i}}}").as_bytes()))
}

/// Claims and completes key `i`, as a first delivery does.
async fn claim_and_complete(store: &KvStore, i: usize) -> Result<(), BoxError> {
    match store.claim(&key(i), payload(i), LEASE).await? {
        ClaimOutcome::Claimed(claim) => {
            store.complete(&claim, None).await?;
            Ok(())
        }
        other => Err(format!("key {i} was not fresh: {other:?}").into()),
    }
}

/// The server's resident memory, KiB.
fn rss_kib(pid: u32) -> Result<u64, BoxError> {
    crate::memory::status_kib(&pid.to_string(), "VmRSS:")
}

/// Bytes in files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn micros(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, crate::measure::micros)
}

/// Fills a bucket to `keys` on `server`, measuring at 1/30, 1/10, 1/3 and
/// all of it.
pub async fn run(server: &NatsServer, keys: usize) -> Result<Vec<CapacityRow>, BoxError> {
    let js = jetstream::new(server.connect().await?);
    let _ = js.delete_key_value("capacity").await;
    let store = Arc::new(KvStore::open(&js, KvStoreConfig::default().bucket("capacity")).await?);
    let pid = server.pid().ok_or("the bench's server has no pid")?;
    let (rss0, disk0) = (rss_kib(pid)?, disk_bytes(&server.store_dir()));
    let mut rows = Vec::new();
    let mut filled = 0;
    // Samples use keys beyond the fill, so that they never collide.
    let mut fresh = keys * 2;
    println!(
        "\ncapacity: idem claim records (claim + completion) in one bucket, file storage\n| keys | server RSS | RSS/key | disk | disk/key | claim+complete p50 / p99 | duplicate p50 / p99 | fill rate |\n|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for target in [keys / 30, keys / 10, keys / 3, keys] {
        let started = Instant::now();
        let from = filled;
        let mut filling = futures::stream::iter(from..target)
            .map(|i| {
                let store = store.clone();
                async move { claim_and_complete(&store, i).await }
            })
            .buffer_unordered(FILL_IN_FLIGHT);
        while let Some(result) = filling.next().await {
            result?;
        }
        let fill_per_s = (target - from) as f64 / started.elapsed().as_secs_f64();
        filled = target;
        let mut claims = Vec::with_capacity(SAMPLES);
        let mut duplicates = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let began = Instant::now();
            claim_and_complete(&store, fresh).await?;
            claims.push(began.elapsed());
            fresh += 1;
            let old = fastrand::usize(0..filled);
            let began = Instant::now();
            let outcome = store.claim(&key(old), payload(old), LEASE).await?;
            duplicates.push(began.elapsed());
            if !matches!(outcome, ClaimOutcome::Duplicate { .. }) {
                return Err(format!("key {old} was not a duplicate: {outcome:?}").into());
            }
        }
        // The fill and every fresh sample so far.
        let keys_now = filled + SAMPLES * (rows.len() + 1);
        let rss = rss_kib(pid)?.saturating_sub(rss0) as f64 * 1024.0;
        let disk = disk_bytes(&server.store_dir()).saturating_sub(disk0) as f64;
        let row = CapacityRow {
            keys: keys_now,
            server_rss_mib: rss / 1048576.0,
            rss_bytes_per_key: rss / keys_now as f64,
            disk_mib: disk / 1048576.0,
            disk_bytes_per_key: disk / keys_now as f64,
            claim_p50_us: micros(percentile(&mut claims, 0.5)),
            claim_p99_us: micros(percentile(&mut claims, 0.99)),
            duplicate_p50_us: micros(percentile(&mut duplicates, 0.5)),
            duplicate_p99_us: micros(percentile(&mut duplicates, 0.99)),
            fill_per_s,
        };
        println!(
            "| {} | {:.0} MiB | {:.0} B | {:.0} MiB | {:.0} B | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.0}/s |",
            row.keys,
            row.server_rss_mib,
            row.rss_bytes_per_key,
            row.disk_mib,
            row.disk_bytes_per_key,
            row.claim_p50_us,
            row.claim_p99_us,
            row.duplicate_p50_us,
            row.duplicate_p99_us,
            row.fill_per_s
        );
        rows.push(row);
    }
    let _ = js.delete_key_value("capacity").await;
    Ok(rows)
}

/// The PostgreSQL inbox at `rows`: the transactional consumer's throughput
/// and latency (c = 64, default batch) on an empty inbox and on a full one,
/// in the same run, then how long the retention purge takes for the half
/// of the rows past the retention.
pub async fn inbox(
    bench: &crate::consume::Bench,
    rows: usize,
    messages: usize,
) -> Result<(), BoxError> {
    use crate::consume::Scenario;
    use std::sync::atomic::Ordering;
    println!(
        "\ncapacity: the PostgreSQL inbox, empty and with {rows} rows (c = 64, default batch, {messages} messages)"
    );
    let empty = bench.run(Scenario::IdemTransactional, 64, messages).await?;
    bench.postgres.reset().await?;
    let expired = rows / 2;
    let filled_in = bench.postgres.fill_inbox(rows, expired).await?;
    let size = bench.postgres.inbox_mib().await?;
    println!(
        "filled {rows} rows in {:.0} s: {size:.0} MiB with indexes ({:.0} B per row)",
        filled_in.as_secs_f64(),
        size * 1048576.0 / rows as f64
    );
    bench.keep_inbox.store(true, Ordering::SeqCst);
    let full = bench.run(Scenario::IdemTransactional, 64, messages).await;
    bench.keep_inbox.store(false, Ordering::SeqCst);
    let full = full?;
    println!("| inbox | msgs/s | p50 | p99 |\n|--|--:|--:|--:|");
    for (what, figures) in [("empty", &empty), ("full", &full)] {
        println!(
            "| {what} | {:.0} | {:.0} µs | {:.0} µs |",
            figures.rate,
            micros(figures.p50),
            micros(figures.p99)
        );
    }
    let started = Instant::now();
    let purged = idem::store::PgStore::purge(
        &bench.postgres.pool,
        &bench.postgres.schema,
        None,
        Duration::from_secs(7 * 24 * 3600),
        1_000,
    )
    .await?;
    let took = started.elapsed();
    println!(
        "purge: {purged} rows past the retention in {:.1} s ({:.0} rows/s, batches of 1,000)",
        took.as_secs_f64(),
        purged as f64 / took.as_secs_f64()
    );
    bench.postgres.reset().await?;
    Ok(())
}
