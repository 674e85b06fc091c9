//! `idem-faults`: the fault-injection suite's driver (and, as
//! `idem-faults worker`, its worker processes). See the crate docs.

use std::process::ExitCode;

use clap::Parser;
use idem_faults::cli::{Cli, Command};
use idem_faults::{report, run, worker};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Worker(args)) = cli.command {
        return match worker::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = cli.run.settings();
    eprintln!(
        "idem fault suite: profile {:?}, seed {} ({} keys, {} faults over {} s, {})",
        cli.run.profile,
        settings.seed,
        settings.messages,
        settings.faults,
        settings.window.as_secs(),
        if settings.cluster {
            "3-node cluster"
        } else {
            "single server"
        }
    );
    match run::run(settings).await {
        Ok(outcome) => {
            report::print(&outcome);
            if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("the run could not complete: {e}");
            ExitCode::FAILURE
        }
    }
}
