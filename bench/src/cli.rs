//! The command line: which scenarios, how many messages, which server, where
//! the results go.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// idem against raw async-nats, measured side by side in one run.
///
/// Starts its own nats-server (file storage, single node), preloads each
/// scenario's messages, and prints msgs/s and latency p50/p99 with ratios
/// against the raw baseline of the same run (median of `--runs`). Results
/// also go to `<out>/bench.json` and `<out>/bench.md`, and a chart to
/// `<out>/bench.svg`. The transactional scenario uses PostgreSQL at
/// `DATABASE_URL` (default: the local `test` database), in a schema of its
/// own that is dropped afterwards.
#[derive(Debug, Parser)]
#[command(name = "idem-bench", version)]
pub struct Cli {
    /// A short run (fewer messages, concurrency 1 and 64, smaller memory
    /// figures): checks that every scenario still works.
    #[arg(long)]
    pub quick: bool,

    /// Only these groups of scenarios (repeat or comma-separate).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenario: Vec<Group>,

    /// The nats-server to start: a path, or a version prefix such as `2.9`
    /// to pick among the servers found (`IDEM_NATS_SERVER`, `PATH`, the
    /// test script's cache). Default: the newest found.
    #[arg(long)]
    pub server: Option<String>,

    /// Only the scenarios with these ids (e.g. `idem_kv,raw_double_ack`),
    /// say to profile one; ratios need their baseline in the list.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,

    /// Concurrencies for the consumer scenarios (default 1,16,64,256;
    /// 1,64 with `--quick`).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,

    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=15))]
    pub runs: u32,

    /// Messages per consumer run (default 5,000; 600 with `--quick`).
    #[arg(long)]
    pub messages: Option<usize>,

    /// Keys the capacity scenario fills its bucket to.
    #[arg(long, default_value_t = 3_000_000)]
    pub keys: usize,

    /// Rows the capacity scenario fills the PostgreSQL inbox with (half of
    /// them past the retention, for the purge).
    #[arg(long, default_value_t = 10_000_000)]
    pub inbox_rows: usize,

    /// Where bench.json, bench.md and bench.svg are written.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,

    #[command(subcommand)]
    pub role: Option<Role>,
}

/// A group of scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Group {
    /// Consumers: raw pull consumers, naive dedup, idem at each dedup level.
    Consume,
    /// Producers: raw publish, Publisher, Outbox.
    Produce,
    /// Added latency at concurrency 1, in round trips.
    Latency,
    /// Peak resident memory of a worker and of a producer.
    Memory,
    /// What claims cost the server as the bucket grows to `--keys` (opt-in:
    /// minutes).
    Capacity,
}

/// The child processes the memory scenarios measure (started by the bench
/// itself, so that their peak RSS is theirs alone).
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Hold `in_flight` messages in running handlers, print the peak RSS.
    #[command(hide = true)]
    MemoryWorker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        in_flight: usize,
    },
    /// Fill an outbox with `messages` while the server is paused, print the
    /// peak RSS, then deliver them.
    #[command(hide = true)]
    MemoryProducer {
        #[arg(long)]
        url: String,
        #[arg(long)]
        messages: usize,
        #[arg(long)]
        dir: PathBuf,
    },
}

impl Cli {
    /// Whether the scenario with this id runs.
    pub fn runs_scenario(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == id)
    }

    /// Whether a group runs.
    pub fn runs_group(&self, group: Group) -> bool {
        let by_default = group != Group::Capacity;
        (by_default && self.scenario.is_empty()) || self.scenario.contains(&group)
    }
}
