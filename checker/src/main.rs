//! `idem-checker`: checks the claim protocol model and prints, per
//! configuration, the state count, the time, and every counterexample.
//!
//! ```text
//! idem-checker                        # both CI configurations, real rules
//! idem-checker --workers 3            # every fault together, on 3 workers
//! idem-checker --mutant memory        # a fixed bug put back: its trace
//! ```

use std::process::ExitCode;

use clap::Parser;
use idem_checker::{Config, Mutant, Rules, Until, check};

/// Checks idem's claim protocol model.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Check the larger configuration (every fault together, the operator's
    /// fix) on this many workers instead of the two CI configurations.
    #[arg(long)]
    workers: Option<u8>,
    /// Put a fixed bug back into the rules (each run stops at its first
    /// failure).
    #[arg(long)]
    mutant: Option<Mutant>,
    /// Checker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Override: operator actions (forget, replay) per run.
    #[arg(long)]
    operator_actions: Option<u8>,
    /// Override: replies that may be lost per run.
    #[arg(long)]
    lost_replies: Option<u8>,
    /// Override: worker crashes per run.
    #[arg(long)]
    crashes: Option<u8>,
    /// Override: worker freezes per run.
    #[arg(long)]
    freezes: Option<u8>,
    /// Override: crashes and freezes together per run.
    #[arg(long)]
    faults: Option<u8>,
}

impl Args {
    fn configs(&self) -> Vec<Config> {
        let base = match self.workers {
            Some(workers) => vec![Config::large(workers.max(1))],
            None => vec![Config::ci(), Config::ci_freeze()],
        };
        base.into_iter()
            .map(|mut config| {
                let overrides = [
                    (self.operator_actions, &mut config.operator_actions),
                    (self.lost_replies, &mut config.lost_replies),
                    (self.crashes, &mut config.crashes),
                    (self.freezes, &mut config.freezes),
                    (self.faults, &mut config.faults),
                ];
                for (value, field) in overrides {
                    if let Some(value) = value {
                        *field = value;
                    }
                }
                config
            })
            .collect()
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (rules, until) = match args.mutant {
        Some(mutant) => (Rules::mutated(mutant), Until::FirstFailure),
        None => (Rules::real(), Until::Exhausted),
    };
    let mut ok = true;
    for config in args.configs() {
        println!(
            "checking {config:?} with {}",
            args.mutant
                .map_or_else(|| "the real rules".to_owned(), |m| format!("mutant {m}"))
        );
        let report = check(config, rules, until, args.threads);
        print!("{report}");
        ok &= report.failures.is_empty() && report.unreached_examples.is_empty();
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
