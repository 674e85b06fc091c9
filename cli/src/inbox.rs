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
    /// Deletes completed rows (`done`, `dead`) older than their handler's
    /// retention (as each transactional handler registered it), in short
    /// batches — what runtimes do in the background, now.
    Purge {
        /// Only this handler's rows.
        #[arg(long)]
        handler: Option<String>,
        /// Delete rows older than this instead of each handler's own
        /// retention; refused if shorter than a registered handler's
        /// retention (its redeliveries would run again) unless forced.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Rows per batch.
        #[arg(long, default_value_t = 1_000)]
        batch: i64,
        /// Purge younger rows than a handler's retention.
        #[arg(long)]
        force: bool,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Serialize)]
struct Purged {
    schema: String,
    /// Per handler (or `(all)` for `--older-than` over every handler).
    handlers: Vec<PurgedRows>,
    /// Every row deleted.
    rows: u64,
}

#[derive(Serialize)]
struct PurgedRows {
    handler: String,
    older_than: String,
    rows: u64,
}

/// What one purge deletes: a handler's rows (or every handler's) older
/// than an age.
struct Cut {
    handler: Option<String>,
    older_than: Duration,
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
            force,
            yes,
        } => {
            let pool = connection.pool().await?.ok_or(CliError::NoPostgres)?;
            let schema = &connection.schema;
            let registered = PgStore::retentions(&pool, schema).await?;
            let cuts = plan(&registered, handler.as_deref(), older_than, force)?;
            if cuts.is_empty() {
                out.note(&format!(
                    "no transactional handler registered a retention in {schema}; pass --older-than"
                ));
            }
            let described: Vec<String> = cuts
                .iter()
                .map(|cut| {
                    format!(
                        "{} older than {}",
                        cut.handler.as_deref().unwrap_or("(all handlers)"),
                        humantime::format_duration(cut.older_than)
                    )
                })
                .collect();
            if !cuts.is_empty() {
                let question = format!(
                    "Delete completed keys from {schema}.idem_inbox: {}? Their redeliveries would run again.",
                    described.join("; ")
                );
                crate::confirm(&question, yes).await?;
            }
            let spinner = out.progress(0, "purging");
            let mut handlers = Vec::with_capacity(cuts.len());
            for cut in &cuts {
                let rows =
                    PgStore::purge(&pool, schema, cut.handler.as_deref(), cut.older_than, batch)
                        .await?;
                handlers.push(PurgedRows {
                    handler: cut.handler.clone().unwrap_or_else(|| "(all)".into()),
                    older_than: humantime::format_duration(cut.older_than).to_string(),
                    rows,
                });
            }
            spinner.finish_and_clear();
            let purged = Purged {
                schema: schema.clone(),
                rows: handlers.iter().map(|h| h.rows).sum(),
                handlers,
            };
            out.emit(&purged, |p| {
                let mut table = crate::output::table(["handler", "older than", "rows deleted"]);
                for h in &p.handlers {
                    table.add_row([h.handler.clone(), h.older_than.clone(), h.rows.to_string()]);
                }
                table
            });
            Ok(())
        }
    }
}

/// What to purge: each registered handler's rows past its own retention,
/// or — with `--older-than` — rows past that age, refused (unless forced)
/// where it undercuts a registered handler's retention.
fn plan(
    registered: &[(String, Duration)],
    handler: Option<&str>,
    older_than: Option<Duration>,
    force: bool,
) -> Result<Vec<Cut>, CliError> {
    let affected: Vec<&(String, Duration)> = registered
        .iter()
        .filter(|(name, _)| handler.is_none_or(|h| h == name))
        .collect();
    let Some(older_than) = older_than else {
        if let Some(handler) = handler
            && affected.is_empty()
        {
            return Err(CliError::NotFound(format!(
                "handler `{handler}` registered no retention in this inbox: pass --older-than"
            )));
        }
        return Ok(affected
            .into_iter()
            .map(|(name, retention)| Cut {
                handler: Some(name.clone()),
                older_than: *retention,
            })
            .collect());
    };
    if !force && let Some((name, retention)) = affected.iter().find(|(_, r)| older_than < *r) {
        return Err(CliError::Refused(format!(
            "handler `{name}` keeps its keys for {}: purging rows older than {} would let a \
             redelivery of such a key run its effect again, uncounted. Purge without --older-than \
             (each handler's own retention), or pass --force.",
            humantime::format_duration(*retention),
            humantime::format_duration(older_than)
        )));
    }
    Ok(vec![Cut {
        handler: handler.map(str::to_owned),
        older_than,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn registered() -> Vec<(String, Duration)> {
        vec![("ledger".into(), 30 * DAY), ("mail".into(), 2 * DAY)]
    }

    #[test]
    fn by_default_each_handler_is_purged_past_its_own_retention() {
        let cuts = plan(&registered(), None, None, false).expect("a plan");
        let cuts: Vec<(Option<String>, Duration)> = cuts
            .into_iter()
            .map(|c| (c.handler, c.older_than))
            .collect();
        assert_eq!(
            cuts,
            [
                (Some("ledger".into()), 30 * DAY),
                (Some("mail".into()), 2 * DAY)
            ]
        );
    }

    #[test]
    fn an_age_shorter_than_a_handlers_retention_is_refused_unless_forced() {
        let refused = plan(&registered(), None, Some(7 * DAY), false);
        assert!(
            matches!(&refused, Err(CliError::Refused(why)) if why.contains("ledger")),
            "{:?}",
            refused.err()
        );
        assert!(plan(&registered(), Some("mail"), Some(7 * DAY), false).is_ok());
        assert!(plan(&registered(), None, Some(7 * DAY), true).is_ok());
        assert!(plan(&registered(), None, Some(30 * DAY), false).is_ok());
    }
}
