//! The results of one bench run: rows with their ratios, the targets they
//! are held to, and the JSON and markdown they are written as.

use std::fmt::Write as _;

use serde::Serialize;

use crate::measure::{Figures, micros};
use crate::memory::Rss;

/// Everything one run measured, with where and on what.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub commit: Option<String>,
    pub machine: Machine,
    pub server: String,
    pub quick: bool,
    pub runs: u32,
    pub consume: Vec<Row>,
    pub produce: Vec<Row>,
    pub latency: Option<Latency>,
    pub memory: Vec<MemoryRow>,
    pub capacity: Vec<crate::capacity::CapacityRow>,
    pub targets: Vec<Target>,
}

/// The machine the figures come from.
#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub memory_gib: Option<f64>,
}

impl Machine {
    pub fn this() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let cpu_model = read("/proc/cpuinfo").and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        });
        let memory_gib = read("/proc/meminfo").and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
        });
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease").map(|k| k.trim().to_owned()),
            memory_gib,
        }
    }
}

/// One scenario at one concurrency, against its baseline of the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub id: &'static str,
    pub scenario: &'static str,
    pub concurrency: Option<usize>,
    pub messages: usize,
    pub msgs_per_s: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub baseline: &'static str,
    pub ratio: f64,
}

impl Row {
    pub fn new(
        (id, scenario): (&'static str, &'static str),
        concurrency: Option<usize>,
        messages: usize,
        figures: Figures,
        (baseline, baseline_rate): (&'static str, f64),
    ) -> Self {
        Self {
            id,
            scenario,
            concurrency,
            messages,
            msgs_per_s: figures.rate,
            p50_us: figures.p50.map(micros),
            p99_us: figures.p99.map(micros),
            baseline,
            ratio: figures.rate / baseline_rate,
        }
    }

    pub fn markdown_header(with_concurrency: bool) -> String {
        if with_concurrency {
            "| c | scenario | msgs/s | p50 | p99 | vs baseline |\n|--:|---|--:|--:|--:|--:|".into()
        } else {
            "| scenario | messages | msgs/s | p50 | p99 | vs baseline |\n|---|--:|--:|--:|--:|--:|"
                .into()
        }
    }

    pub fn markdown(&self) -> String {
        let lead = match self.concurrency {
            Some(c) => format!("| {c} | {} ", self.scenario),
            None => format!("| {} | {} ", self.scenario, self.messages),
        };
        format!(
            "{lead}| {:.0} | {} | {} | {:.2}× `{}` |",
            self.msgs_per_s,
            show_us(self.p50_us),
            show_us(self.p99_us),
            self.ratio,
            self.baseline
        )
    }
}

/// Added latency at concurrency 1, in round trips.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// p50 of a plain request the server answers itself (`$JS.API.INFO`).
    pub rtt_us: f64,
    /// p50 of a core request/reply through a subscriber on the same
    /// connection (two trips through the server).
    pub echo_us: f64,
    pub raw_double_ack_p50_us: f64,
    pub idem_kv_p50_us: f64,
    pub added_us: f64,
    /// `added_us` over the shorter of `rtt_us` and `raw_double_ack_p50_us`.
    pub added_rtt: f64,
}

/// Peak RSS of one process.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    pub what: &'static str,
    #[serde(flatten)]
    pub rss: Rss,
}

/// One of the targets, checked against this run.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub measured: f64,
    pub required: f64,
    /// `true` when at least `required` must be reached, `false` when at most.
    pub at_least: bool,
    pub met: bool,
}

impl Target {
    pub fn at_least(what: String, measured: f64, required: f64) -> Self {
        Self {
            what,
            measured,
            required,
            at_least: true,
            met: measured >= required,
        }
    }

    pub fn at_most(what: String, measured: f64, required: f64) -> Self {
        Self {
            what,
            measured,
            required,
            at_least: false,
            met: measured <= required,
        }
    }
}

impl Report {
    /// The whole report as markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "nats-server {} · {} CPUs ({}) · {} GiB · Linux {} · commit {} · {}median of {} runs\n",
            self.server,
            m.cpus,
            m.cpu_model.as_deref().unwrap_or("unknown CPU"),
            m.memory_gib.map_or("?".into(), |g| g.to_string()),
            m.kernel.as_deref().unwrap_or("?"),
            self.commit.as_deref().unwrap_or("unknown"),
            if self.quick { "--quick, " } else { "" },
            self.runs,
        );
        if !self.consume.is_empty() {
            let _ = writeln!(md, "### Consumers\n\n{}", Row::markdown_header(true));
            for row in &self.consume {
                let _ = writeln!(md, "{}", row.markdown());
            }
            md.push('\n');
        }
        if !self.produce.is_empty() {
            let _ = writeln!(md, "### Producers\n\n{}", Row::markdown_header(false));
            for row in &self.produce {
                let _ = writeln!(md, "{}", row.markdown());
            }
            md.push('\n');
        }
        if let Some(l) = &self.latency {
            let _ = writeln!(
                md,
                "### Added latency at concurrency 1\n\n\
                 A round trip is the shorter of a plain request measured alone and the raw double \
                 ack's p50 (one round trip, measured in the run).\n\n\
                 | request RTT | core echo | raw double ack p50 | idem kv p50 | added | added in round trips |\n\
                 |--:|--:|--:|--:|--:|--:|\n\
                 | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.2} |\n",
                l.rtt_us,
                l.echo_us,
                l.raw_double_ack_p50_us,
                l.idem_kv_p50_us,
                l.added_us,
                l.added_rtt
            );
        }
        if !self.memory.is_empty() {
            let _ = writeln!(
                md,
                "### Peak memory\n\n| process | held | idle RSS | peak RSS | per message |\n|---|--:|--:|--:|--:|"
            );
            for row in &self.memory {
                let r = &row.rss;
                let per =
                    r.peak_kib.saturating_sub(r.idle_kib) as f64 * 1024.0 / r.held.max(1) as f64;
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} MiB | {:.1} MiB | {:.0} B |",
                    row.what,
                    r.held,
                    r.idle_kib as f64 / 1024.0,
                    r.peak_kib as f64 / 1024.0,
                    per
                );
            }
            md.push('\n');
        }
        if !self.targets.is_empty() {
            let _ = writeln!(
                md,
                "### Targets\n\n| target | measured | required | |\n|---|--:|--:|---|"
            );
            for t in &self.targets {
                let _ = writeln!(
                    md,
                    "| {} | {:.2} | {} {:.2} | {} |",
                    t.what,
                    t.measured,
                    if t.at_least { "≥" } else { "≤" },
                    t.required,
                    if t.met { "met" } else { "**missed**" }
                );
            }
        }
        md
    }
}

fn show_us(us: Option<f64>) -> String {
    match us {
        None => "—".into(),
        Some(us) if us >= 10_000.0 => format!("{:.1} ms", us / 1000.0),
        Some(us) => format!("{us:.0} µs"),
    }
}
