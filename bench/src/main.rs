//! `idem-bench`: idem against raw async-nats, measured side by side in one
//! run on a nats-server of the bench's own.
//!
//! ```text
//! cargo run --release -p idem-bench                       # the full table
//! cargo run --release -p idem-bench -- --quick            # every scenario, briefly
//! cargo run --release -p idem-bench -- --scenario consume --server 2.9
//! ```
//!
//! Every figure is the median of `--runs` runs; every ratio is against a raw
//! async-nats figure of the same run. Results go to stdout as they come, and
//! to `target/bench/bench.{json,md,svg}` at the end.

mod capacity;
mod chart;
mod cli;
mod consume;
mod measure;
mod memory;
mod postgres;
mod produce;
mod report;
mod server;
mod workload;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use idem::testing::NatsServer;
use tracing_subscriber::prelude::*;

use cli::{Cli, Group, Role};
use measure::micros;
use measure::{Figures, Latencies, SpanTimer, percentile};
use postgres::Postgres;
use report::{Latency, MemoryRow, Report, Row, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How much work each group does.
struct Plan {
    concurrencies: Vec<usize>,
    messages: usize,
    sequential: usize,
    pipelined: usize,
    in_flight: usize,
    outbox: usize,
}

impl Plan {
    fn for_cli(cli: &Cli) -> Self {
        let mut plan = Self::sized(cli);
        if !cli.concurrency.is_empty() {
            plan.concurrencies = cli.concurrency.clone();
        }
        plan
    }

    fn sized(cli: &Cli) -> Self {
        if cli.quick {
            Plan {
                concurrencies: vec![1, 64],
                messages: cli.messages.unwrap_or(600),
                sequential: 300,
                pipelined: 3_000,
                in_flight: 1_000,
                outbox: 10_000,
            }
        } else {
            Plan {
                concurrencies: vec![1, 16, 64, 256],
                messages: cli.messages.unwrap_or(5_000),
                sequential: 2_000,
                pipelined: 20_000,
                in_flight: 10_000,
                outbox: 100_000,
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("idem-bench: could not start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idem-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), BoxError> {
    match &cli.role {
        Some(Role::MemoryWorker { url, in_flight }) => {
            return memory::worker_role(url, *in_flight).await;
        }
        Some(Role::MemoryProducer { url, messages, dir }) => {
            return memory::producer_role(url, *messages, dir).await;
        }
        None => {}
    }
    let spans = Latencies::default();
    tracing_subscriber::registry()
        .with(SpanTimer::new(spans.clone()))
        .try_init()?;
    let binary = server::choose(cli.server.as_deref())?;
    let server = NatsServer::start_with(&binary).await?;
    let client = server.connect().await?;
    let plan = Plan::for_cli(&cli);
    let mut report = Report {
        commit: commit(),
        machine: report::Machine::this(),
        server: format!("{} ({})", binary.version(), binary.path().display()),
        quick: cli.quick,
        runs: cli.runs,
        ..Report::default()
    };
    println!("idem-bench: nats-server {}", report.server);
    let started = Instant::now();
    if cli.runs_group(Group::Consume) || cli.runs_group(Group::Latency) {
        let bench = consume::Bench {
            js: async_nats::jetstream::new(client.clone()),
            client: client.clone(),
            postgres: Postgres::create().await?,
            spans: spans.clone(),
            keep_inbox: false.into(),
        };
        if cli.runs_group(Group::Consume) {
            consumers(&bench, &plan, &cli, &mut report).await?;
        }
        if cli.runs_group(Group::Latency) {
            report.latency = Some(latency(&bench, &plan, cli.runs, &report.consume).await?);
        }
    }
    if cli.runs_group(Group::Produce) {
        producers(&client, &plan, &cli, &mut report).await?;
    }
    if cli.runs_group(Group::Memory) {
        println!(
            "\nmemory: a worker holding {} messages in its handlers",
            plan.in_flight
        );
        let rss = memory::worker(&server, plan.in_flight).await?;
        report.memory.push(MemoryRow {
            what: "worker, messages in running handlers (dedup = kv)",
            rss,
        });
        println!(
            "memory: a producer with {} messages in its outbox",
            plan.outbox
        );
        let rss = memory::producer(&server, plan.outbox).await?;
        report.memory.push(MemoryRow {
            what: "producer, messages in its outbox (server paused)",
            rss,
        });
    }
    if cli.runs_group(Group::Capacity) {
        report.capacity = capacity::run(&server, cli.keys).await?;
        let bench = consume::Bench {
            js: async_nats::jetstream::new(client.clone()),
            client: client.clone(),
            postgres: Postgres::create().await?,
            spans,
            keep_inbox: false.into(),
        };
        capacity::inbox(&bench, cli.inbox_rows, plan.messages).await?;
    }
    report.targets = targets(&report);
    let markdown = report.markdown();
    println!("\n{markdown}");
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(
        cli.out.join("bench.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(cli.out.join("bench.md"), &markdown)?;
    if !report.consume.is_empty() {
        chart::consumers(&report.consume, &cli.out.join("bench.svg"))?;
    }
    println!(
        "idem-bench: {:.0} s; wrote {}/bench.{{json,md,svg}}",
        started.elapsed().as_secs_f64(),
        cli.out.display()
    );
    Ok(())
}

async fn consumers(
    bench: &consume::Bench,
    plan: &Plan,
    cli: &Cli,
    report: &mut Report,
) -> Result<(), BoxError> {
    println!(
        "\nconsumers: {} messages of ~128 B JSON per run\n{}",
        plan.messages,
        Row::markdown_header(true)
    );
    let scenarios: Vec<consume::Scenario> = consume::Scenario::ALL
        .into_iter()
        .filter(|s| cli.runs_scenario(s.id()))
        .collect();
    for &c in &plan.concurrencies {
        // Runs take turns (A B C, A B C, …) so that drift on a shared
        // machine spreads over every scenario alike.
        let mut runs = vec![Vec::new(); scenarios.len()];
        for _ in 0..cli.runs {
            for (scenario, figures) in scenarios.iter().zip(&mut runs) {
                figures.push(bench.run(*scenario, c, plan.messages).await?);
            }
        }
        let medians: Vec<Figures> = runs.iter().map(|r| Figures::median(r)).collect();
        // Without its baseline in the run (`--only`), no ratio.
        let base = scenarios
            .iter()
            .position(|s| *s == consume::Scenario::RawDoubleAck)
            .map_or(f64::NAN, |i| medians[i].rate);
        for (scenario, figures) in scenarios.iter().zip(medians) {
            let row = Row::new(
                (scenario.id(), scenario.name()),
                Some(c),
                plan.messages,
                figures,
                (consume::Scenario::RawDoubleAck.id(), base),
            );
            println!("{}", row.markdown());
            report.consume.push(row);
        }
    }
    Ok(())
}

async fn producers(
    client: &async_nats::Client,
    plan: &Plan,
    cli: &Cli,
    report: &mut Report,
) -> Result<(), BoxError> {
    println!(
        "\nproducers: 128 B payloads\n{}",
        Row::markdown_header(false)
    );
    let scenarios: Vec<produce::Scenario> = produce::Scenario::ALL
        .into_iter()
        .filter(|s| cli.runs_scenario(s.id()))
        .collect();
    let messages = |scenario: produce::Scenario| {
        if scenario.sequential() {
            plan.sequential
        } else {
            plan.pipelined
        }
    };
    let mut runs = vec![Vec::new(); scenarios.len()];
    for run in 0..cli.runs as usize {
        for (scenario, figures) in scenarios.iter().zip(&mut runs) {
            figures.push(produce::run(client, *scenario, messages(*scenario), run).await?);
        }
    }
    let medians: Vec<Figures> = runs.iter().map(|r| Figures::median(r)).collect();
    for (scenario, figures) in scenarios.iter().zip(&medians) {
        let baseline = scenario.baseline();
        let base = scenarios
            .iter()
            .position(|s| *s == baseline)
            .map_or(f64::NAN, |i| medians[i].rate);
        let row = Row::new(
            (scenario.id(), scenario.name()),
            None,
            messages(*scenario),
            *figures,
            (baseline.id(), base),
        );
        println!("{}", row.markdown());
        report.produce.push(row);
    }
    Ok(())
}

/// idem kv's p50 at concurrency 1 over raw double ack's, in round trips of
/// a plain request measured now.
async fn latency(
    bench: &consume::Bench,
    plan: &Plan,
    runs: u32,
    measured: &[Row],
) -> Result<Latency, BoxError> {
    let p50 = |scenario: consume::Scenario| {
        let found = measured
            .iter()
            .find(|r| r.id == scenario.id() && r.concurrency == Some(1))
            .and_then(|r| r.p50_us);
        async move {
            match found {
                Some(us) => Ok::<f64, BoxError>(us),
                None => {
                    let mut figures = Vec::new();
                    for _ in 0..runs {
                        figures.push(bench.run(scenario, 1, plan.messages).await?);
                    }
                    Figures::median(&figures)
                        .p50
                        .map(micros)
                        .ok_or_else(|| "no latency samples".into())
                }
            }
        }
    };
    let raw = p50(consume::Scenario::RawDoubleAck).await?;
    let kv = p50(consume::Scenario::IdemKv).await?;
    let (rtt, echo) = round_trips(&bench.client).await?;
    // The round trip: a plain request measured alone, or the raw double
    // ack (itself one round trip) measured in the run — whichever is
    // shorter, so that the added latency is not understated.
    let round_trip = micros(rtt).min(raw);
    let latency = Latency {
        rtt_us: micros(rtt),
        echo_us: micros(echo),
        raw_double_ack_p50_us: raw,
        idem_kv_p50_us: kv,
        added_us: kv - raw,
        added_rtt: (kv - raw) / round_trip,
    };
    println!(
        "\nlatency at c = 1: idem kv p50 {kv:.0} µs, raw double ack p50 {raw:.0} µs, request RTT {:.0} µs → {:.2} round trips added",
        latency.rtt_us, latency.added_rtt
    );
    Ok(latency)
}

/// p50 of a request the server answers itself (`$JS.API.INFO`), and of a
/// core request/reply through a subscriber on the same connection.
async fn round_trips(client: &async_nats::Client) -> Result<(Duration, Duration), BoxError> {
    use futures::StreamExt;
    let mut echo = client.subscribe("bench.echo").await?;
    let responder = client.clone();
    let echoing = tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    let mut api = Vec::with_capacity(1_000);
    let mut core = Vec::with_capacity(1_000);
    for i in 0..1_100 {
        let began = Instant::now();
        client.request("$JS.API.INFO", "".into()).await?;
        let took = began.elapsed();
        let began = Instant::now();
        client.request("bench.echo", "ping".into()).await?;
        // The first hundred warm the connection up.
        if i >= 100 {
            api.push(took);
            core.push(began.elapsed());
        }
    }
    echoing.abort();
    Ok((
        percentile(&mut api, 0.5).unwrap_or_default(),
        percentile(&mut core, 0.5).unwrap_or_default(),
    ))
}

/// The issue's targets, for the figures this run has.
fn targets(report: &Report) -> Vec<Target> {
    let consume = |id: &str, c: usize| {
        report
            .consume
            .iter()
            .find(|r| r.id == id && r.concurrency == Some(c))
            .map(|r| r.msgs_per_s)
    };
    let mut targets = Vec::new();
    let concurrencies: Vec<usize> = report
        .consume
        .iter()
        .filter_map(|r| r.concurrency)
        .collect();
    let mut seen = Vec::new();
    for c in concurrencies {
        if seen.contains(&c) {
            continue;
        }
        seen.push(c);
        let raw = consume("raw_double_ack", c);
        let ratio = |id: &str, base: Option<f64>| Some(consume(id, c)? / base?);
        if let Some(r) = ratio("idem_off", raw) {
            targets.push(Target::at_least(
                format!("dedup = off vs raw double ack, c = {c}"),
                r,
                0.90,
            ));
        }
        if c == 64 {
            for (id, what) in [("idem_kv", "one bucket"), ("idem_kv_shards4", "4 shards")] {
                if let Some(r) = ratio(id, raw) {
                    targets.push(Target::at_least(
                        format!("dedup = kv ({what}) vs raw double ack, c = {c}"),
                        r,
                        0.50,
                    ));
                }
            }
        }
        if c == 64 {
            transactional_targets(report, &mut targets);
        }
        if let Some(r) = ratio("idem_kv", consume("naive", c)) {
            targets.push(Target::at_least(
                format!("dedup = kv vs naive dedup, c = {c}"),
                r,
                1.0,
            ));
        }
        if let Some(r) = ratio("idem_kv_dup30", consume("naive_dup30", c)) {
            targets.push(Target::at_least(
                format!("dedup = kv vs naive dedup, 30 % duplicates, c = {c}"),
                r,
                1.2,
            ));
        }
    }
    let produce = |id: &str| report.produce.iter().find(|r| r.id == id).map(|r| r.ratio);
    if let Some(r) = produce("publisher_pipelined") {
        targets.push(Target::at_least(
            "Publisher pipelined vs raw pipelined".into(),
            r,
            0.90,
        ));
    }
    if let Some(r) = produce("outbox") {
        targets.push(Target::at_least("Outbox vs raw pipelined".into(), r, 0.50));
    }
    if let Some(l) = &report.latency {
        targets.push(Target::at_most(
            "added p50 latency at c = 1, in round trips".into(),
            l.added_rtt,
            3.0,
        ));
    }
    targets
}

/// Group commit against the hand-written inbox and the raw baseline, at
/// c = 64: throughput, and a p99 no worse than the naive inbox's.
fn transactional_targets(report: &Report, targets: &mut Vec<Target>) {
    let row = |id: &str| {
        report
            .consume
            .iter()
            .find(|r| r.id == id && r.concurrency == Some(64))
    };
    let (Some(idem), Some(naive)) = (row("idem_transactional"), row("naive_transactional")) else {
        return;
    };
    targets.push(Target::at_least(
        "dedup = transactional (default batch) vs naive transactional inbox, c = 64".into(),
        idem.msgs_per_s / naive.msgs_per_s,
        3.0,
    ));
    if let Some(raw) = row("raw_double_ack") {
        targets.push(Target::at_least(
            "dedup = transactional (default batch) vs raw double ack, c = 64".into(),
            idem.msgs_per_s / raw.msgs_per_s,
            0.25,
        ));
    }
    if let (Some(idem_p99), Some(naive_p99)) = (idem.p99_us, naive.p99_us) {
        targets.push(Target::at_most(
            "dedup = transactional p99 over naive transactional p99, c = 64".into(),
            idem_p99 / naive_p99,
            1.0,
        ));
    }
}

/// The commit measured, for comparing runs.
fn commit() -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
