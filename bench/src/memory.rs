//! Peak resident memory of a worker holding many messages in its handlers,
//! and of a producer whose outbox holds many messages: each measured in a
//! child process of its own (this binary in a hidden role), so the figure is
//! the worker's or producer's alone.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::handler::HandlerConfig;
use idem::outbox::{Outbox, OutboxConfig};
use idem::publisher::{Outgoing, Publisher};
use idem::testing::NatsServer;
use idem::{HandlerError, Json, Runtime, State, idempotent};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;

use crate::BoxError;
use crate::workload::{self, Order};

/// How long a child may take for each step before the bench gives up.
const STEP: Duration = Duration::from_secs(180);

/// What a child reports.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Rss {
    /// Resident memory before the work began, KiB.
    pub idle_kib: u64,
    /// Peak resident memory (VmHWM) while the work was held, KiB.
    pub peak_kib: u64,
    /// How many messages were held at the peak.
    pub held: usize,
}

/// Peak RSS of a worker process with `in_flight` messages in running
/// handlers (dedup = kv: each also holds its claim).
pub async fn worker(server: &NatsServer, in_flight: usize) -> Result<Rss, BoxError> {
    let js = jetstream::new(server.connect().await?);
    workload::preload(&js, &workload::order_numbers(in_flight, false)).await?;
    let _ = js.delete_key_value("idem_claims").await;
    let mut child = spawn(&[
        "memory-worker",
        "--url",
        &server.client_url(),
        "--in-flight",
        &in_flight.to_string(),
    ])?;
    let mut lines = reader(&mut child)?;
    let rss = report(&mut lines).await?;
    finish(child).await?;
    Ok(rss)
}

/// Peak RSS of a producer process that enqueues `messages` into its outbox
/// while the server is paused (so all of them are held), then delivers them
/// once it resumes; the stream must end up with every one.
pub async fn producer(server: &NatsServer, messages: usize) -> Result<Rss, BoxError> {
    let js = jetstream::new(server.connect().await?);
    let _ = js.delete_stream("MEMORY").await;
    js.create_stream(stream::Config {
        name: "MEMORY".into(),
        subjects: vec!["memory.orders".into()],
        ..Default::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let mut child = spawn(&[
        "memory-producer",
        "--url",
        &server.client_url(),
        "--messages",
        &messages.to_string(),
        "--dir",
        &dir.path().display().to_string(),
    ])?;
    let mut lines = reader(&mut child)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or("the producer child has no stdin")?;
    expect(&mut lines, "ready").await?;
    server.pause().await?;
    stdin.write_all(b"paused\n").await?;
    let rss = report(&mut lines).await;
    server.resume().await?;
    let rss = rss?;
    stdin.write_all(b"resumed\n").await?;
    expect(&mut lines, "delivered").await?;
    finish(child).await?;
    let stored = js.get_stream("MEMORY").await?.info().await?.state.messages;
    js.delete_stream("MEMORY").await?;
    if stored != messages as u64 {
        return Err(format!("outbox: {stored} of {messages} messages stored").into());
    }
    Ok(rss)
}

fn spawn(args: &[&str]) -> Result<Child, BoxError> {
    Ok(Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

type Lines = tokio::io::Lines<BufReader<ChildStdout>>;

fn reader(child: &mut Child) -> Result<Lines, BoxError> {
    let stdout = child.stdout.take().ok_or("the child has no stdout")?;
    Ok(BufReader::new(stdout).lines())
}

async fn next_line(lines: &mut Lines) -> Result<String, BoxError> {
    match timeout(STEP, lines.next_line()).await {
        Err(_) => Err("the memory child did not answer in time".into()),
        Ok(Ok(Some(line))) => Ok(line),
        Ok(Ok(None)) => Err("the memory child exited early (see its stderr above)".into()),
        Ok(Err(e)) => Err(e.into()),
    }
}

async fn expect(lines: &mut Lines, word: &str) -> Result<(), BoxError> {
    let line = next_line(lines).await?;
    if line.trim() == word {
        Ok(())
    } else {
        Err(format!("the memory child said {line:?}, expected {word:?}").into())
    }
}

async fn report(lines: &mut Lines) -> Result<Rss, BoxError> {
    Ok(serde_json::from_str(&next_line(lines).await?)?)
}

async fn finish(mut child: Child) -> Result<(), BoxError> {
    let status = timeout(STEP, child.wait()).await??;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the memory child failed: {status}").into())
    }
}

/// Resident and peak resident memory of this process, KiB.
fn own_rss() -> Result<(u64, u64), BoxError> {
    Ok((status_kib("self", "VmRSS:")?, status_kib("self", "VmHWM:")?))
}

/// A memory field (`VmRSS:`, `VmHWM:`) of process `pid` (or `self`), KiB.
pub fn status_kib(pid: &str, name: &str) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .ok_or_else(|| format!("/proc/{pid}/status has no {name}").into())
}

/// A child's report to the bench: one JSON line on stdout.
fn tell_peak(idle_kib: u64, held: usize) -> Result<(), BoxError> {
    let (_, peak_kib) = own_rss()?;
    let rss = Rss {
        idle_kib,
        peak_kib,
        held,
    };
    println!("{}", serde_json::to_string(&rss)?);
    Ok(())
}

/// Counts handlers that have started and holds them until released.
#[derive(Clone)]
struct Gate {
    entered: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
}

#[idempotent(stream = "BENCH", subject = "bench.orders", key = order.id, lease = "5m", start = all)]
async fn bench_hold(
    Json(order): Json<Order>,
    State(gate): State<Gate>,
) -> Result<(), HandlerError> {
    std::hint::black_box(order);
    gate.entered.fetch_add(1, Ordering::SeqCst);
    let mut released = gate.release.subscribe();
    let _ = released.wait_for(|r| *r).await;
    Ok(())
}

/// The worker role: hold `in_flight` messages, report, finish them.
pub async fn worker_role(url: &str, in_flight: usize) -> Result<(), BoxError> {
    let client = async_nats::connect(url).await?;
    let (idle_kib, _) = own_rss()?;
    let gate = Gate {
        entered: Arc::new(AtomicUsize::new(0)),
        release: tokio::sync::watch::channel(false).0,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = Runtime::builder(client)
        .state(gate.clone())
        .handler_with(bench_hold, move |c: HandlerConfig| c.concurrency(in_flight))
        .shutdown_on(async {
            let _ = stopped.await;
        })
        .build()
        .await?;
    let stats = runtime.stats();
    let running = tokio::spawn(runtime.run());
    timeout(STEP, async {
        while gate.entered.load(Ordering::SeqCst) < in_flight {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| {
        format!(
            "only {} of {in_flight} handlers started",
            gate.entered.load(Ordering::SeqCst)
        )
    })?;
    tell_peak(idle_kib, in_flight)?;
    gate.release.send_replace(true);
    timeout(STEP, async {
        while (stats
            .handler("bench_hold")
            .get(idem::consumer::Outcome::Processed) as usize)
            < in_flight
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| "the held handlers did not finish")?;
    let _ = stop.send(());
    running.await??;
    Ok(())
}

/// The producer role: fill the outbox while the server is paused, report,
/// deliver everything once it resumes.
pub async fn producer_role(url: &str, messages: usize, dir: &Path) -> Result<(), BoxError> {
    let client = async_nats::connect(url).await?;
    let outbox = Outbox::open(
        dir.join("memory.outbox"),
        Publisher::new(client),
        OutboxConfig {
            capacity: messages,
            ..OutboxConfig::default()
        },
    )
    .await?;
    let (idle_kib, _) = own_rss()?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    println!("ready");
    wait_for(&mut stdin, "paused").await?;
    for chunk in 0..messages.div_ceil(1_000) {
        let batch = (chunk * 1_000..((chunk + 1) * 1_000).min(messages))
            .map(|i| {
                Outgoing::json("memory.orders", &Order::numbered(i))
                    .map(|o| o.with_id(format!("memory-{i}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        outbox.enqueue_all(batch).await?;
    }
    tell_peak(idle_kib, outbox.stats().await?.pending)?;
    wait_for(&mut stdin, "resumed").await?;
    timeout(STEP, outbox.flush())
        .await
        .map_err(|_| "the outbox did not deliver in time")??;
    println!("delivered");
    Ok(())
}

async fn wait_for(
    stdin: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    word: &str,
) -> Result<(), BoxError> {
    match stdin.next_line().await? {
        Some(line) if line.trim() == word => Ok(()),
        other => Err(format!("expected {word:?} from the bench, got {other:?}").into()),
    }
}
