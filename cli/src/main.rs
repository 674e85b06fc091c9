//! `idem`, the operator's tool: look at a key's claim, forget it, list dead
//! letters by reason, replay them after a fix, see every handler's backlog.
//!
//! It reads what a runtime uses — the server (`NATS_URL`), credentials
//! (`NATS_CREDS`), the claim bucket (`IDEM_BUCKET`), the PostgreSQL inbox
//! (`DATABASE_URL`, `IDEM_SCHEMA`) — from flags or the environment.
//!
//! Exit codes: 0 done; 1 failed (the message says why); 2 bad usage; 3 not
//! found; 4 not confirmed; 5 refused (it would risk an effect twice or a
//! message lost: the message says why, and which flag overrides it).

mod connect;
mod dead;
mod durability;
mod error;
mod inbox;
mod keys;
mod output;
mod provision;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use connect::Connection;
use error::CliError;

/// idem: claims, dead letters, replays and status of idem handlers.
#[derive(Parser)]
#[command(name = "idem", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    /// Print listings as JSON (one document) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A key's claim record: show it, or forget it so that the key runs again.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Dead letters: list, show, replay.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Per handler: consumer backlog, claims, dead letters by reason.
    Status,
    /// The PostgreSQL inbox (`dedup = transactional`).
    #[command(subcommand)]
    Inbox(inbox::InboxCommand),
    /// Creates (or checks) the claim bucket and the dead-letter stream, for
    /// workers that may not create them.
    Provision(provision::ProvisionArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = output::Output::new(cli.json);
    let result = match cli.command {
        Command::Keys(command) => keys::run(&cli.connection, &out, command).await,
        Command::Dead(command) => dead::run(&cli.connection, &out, command).await,
        Command::Status => status::run(&cli.connection, &out).await,
        Command::Inbox(command) => inbox::run(&cli.connection, &out, command).await,
        Command::Provision(args) => provision::run(&cli.connection, &out, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("idem: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Asks on the terminal; `--yes` answers for scripts.
async fn confirm(question: &str, yes: bool) -> Result<(), CliError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    if yes {
        return Ok(());
    }
    let mut stderr = tokio::io::stderr();
    let prompt = format!("{question} [y/N] ");
    stderr
        .write_all(prompt.as_bytes())
        .await
        .map_err(CliError::Terminal)?;
    stderr.flush().await.map_err(CliError::Terminal)?;
    let mut answer = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut answer)
        .await
        .map_err(CliError::Terminal)?;
    match answer.trim() {
        "y" | "Y" | "yes" => Ok(()),
        _ => Err(CliError::NotConfirmed),
    }
}
