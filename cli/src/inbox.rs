//! `idem inbox`: the PostgreSQL inbox of `dedup = transactional` handlers.

use std::time::Duration;

use clap::Subcommand;
use idem::store::PgStore;
use serde::Serialize;

use crate::connect::Connection;
use crate::error::CliError;
use crate::output::Output;

#[derive(Subcommand)]
pub enum InboxCommand {
    /// Deletes completed rows (`done`, `dead`) older than the retention, in
    /// short batches — what runtimes do in the background, now.
    Purge {
        /// Only this handler's rows.
        #[arg(long)]
        handler: Option<String>,
        /// How long completed keys are kept (the handlers' `retention`).
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Rows per batch.
        #[arg(long, default_value_t = 1_000)]
        batch: i64,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Serialize)]
struct Purged {
    schema: String,
    handler: Option<String>,
    rows: u64,
}

pub async fn run(
    connection: &Connection,
    out: &Output,
    command: InboxCommand,
) -> Result<(), CliError> {
    match command {
        InboxCommand::Purge {
            handler,
            older_than,
            batch,
            yes,
        } => {
            let pool = connection.pool().await?.ok_or(CliError::NoPostgres)?;
            let question = format!(
                "Delete completed keys older than {} from {}.idem_inbox{}? Their redeliveries would run again.",
                humantime::format_duration(older_than),
                connection.schema,
                handler
                    .as_deref()
                    .map(|h| format!(" (handler {h})"))
                    .unwrap_or_default()
            );
            crate::confirm(&question, yes).await?;
            let spinner = out.progress(0, "purging");
            let rows = PgStore::purge(
                &pool,
                &connection.schema,
                handler.as_deref(),
                older_than,
                batch,
            )
            .await?;
            spinner.finish_and_clear();
            let purged = Purged {
                schema: connection.schema.clone(),
                handler,
                rows,
            };
            out.emit(&purged, |p| {
                let mut table = crate::output::table(["schema", "handler", "rows deleted"]);
                table.add_row([
                    p.schema.clone(),
                    p.handler.clone().unwrap_or_else(|| "(all)".into()),
                    p.rows.to_string(),
                ]);
                table
            });
            Ok(())
        }
    }
}
