//! The command line: a profile, a seed, and overrides.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::worker::WorkerArgs;

/// Breaks idem on purpose and checks that nothing was lost and nothing
/// done twice.
#[derive(Parser, Debug)]
#[command(name = "idem-faults", args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// (Internal) run as one of the driver's worker processes.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// What to run.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The driver's subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// A worker process (started by the driver, not by hand).
    Worker(WorkerArgs),
}

/// A run of the suite.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// `quick`: ≈5,000 messages, 5 faults, one server (CI). `soak`:
    /// 100,000 messages, 50 faults, a 3-node cluster.
    #[arg(long, value_enum, default_value_t = Profile::Quick)]
    pub profile: Profile,
    /// Replays a run: the same seed gives the same workload and schedule.
    /// Default: a random seed, printed first.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Unique keys to publish (overrides the profile).
    #[arg(long)]
    pub messages: Option<usize>,
    /// Faults to inject (overrides the profile).
    #[arg(long)]
    pub faults: Option<usize>,
    /// Seconds over which messages are published and faults injected
    /// (overrides the profile).
    #[arg(long)]
    pub window: Option<u64>,
    /// Run on a 3-node cluster with R3 stream and claims (the soak default).
    #[arg(long)]
    pub cluster: bool,
    /// Run on one server (the quick default).
    #[arg(long, conflicts_with = "cluster")]
    pub single: bool,
}

/// A named set of sizes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// CI: a few minutes on two cores.
    Quick,
    /// Behind a flag: long, with a cluster.
    Soak,
}

/// What one run does, resolved from the profile and the overrides.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The seed of workload and schedule.
    pub seed: u64,
    /// Unique keys.
    pub messages: usize,
    /// Faults.
    pub faults: usize,
    /// Publishing and fault window.
    pub window: Duration,
    /// Three nodes, R3.
    pub cluster: bool,
    /// Worker processes.
    pub workers: usize,
    /// How long the stream may take to drain after the window.
    pub drain_timeout: Duration,
}

impl RunArgs {
    /// The settings of this run.
    pub fn settings(&self) -> Settings {
        let (messages, faults, window, cluster) = match self.profile {
            Profile::Quick => (5_000, 5, 45, false),
            Profile::Soak => (100_000, 50, 400, true),
        };
        let messages = self.messages.unwrap_or(messages);
        Settings {
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
            messages,
            faults: self.faults.unwrap_or(faults),
            window: Duration::from_secs(self.window.unwrap_or(window)),
            cluster: (cluster || self.cluster) && !self.single,
            workers: 3,
            drain_timeout: Duration::from_secs(120 + messages as u64 / 200),
        }
    }
}
