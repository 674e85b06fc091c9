//! `idem keys`: one key's claim record — shown, or forgotten so that the key
//! runs again.

use clap::Subcommand;
use idem::claim::operator::{self, Forget, Written};
use idem::claim::{ClaimState, Snapshot};
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::DedupStore;
use serde::Serialize;

use crate::connect::Connection;
use crate::error::CliError;
use crate::output::{self, Output};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// State, owner, lease, attempts, fingerprint, stored result, times.
    Show(KeyArgs),
    /// Deletes the record: the next delivery of the key runs the handler
    /// again, on every worker. Asks first; refuses a key a worker holds
    /// (pending) unless forced.
    Forget {
        #[command(flatten)]
        key: KeyArgs,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Forget a pending key too: its owner may be running the handler
        /// right now, and another worker would run it again (its effect can
        /// happen twice, and nobody counts it).
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
pub struct KeyArgs {
    /// The handler's name (`name = "…"`, else its function's).
    handler: String,
    /// The idempotency key, as the handler extracts it.
    key: String,
    /// The handler uses `dedup = transactional`: the record is in the
    /// PostgreSQL inbox, not the claim bucket.
    #[arg(long)]
    transactional: bool,
}

impl KeyArgs {
    fn record_key(&self) -> Result<RecordKey, CliError> {
        let handler = HandlerName::new(&self.handler)
            .map_err(|e| CliError::Invalid(format!("handler {:?}: {e}", self.handler)))?;
        let key = IdempotencyKey::new(&self.key)
            .map_err(|e| CliError::Invalid(format!("key {:?}: {e}", self.key)))?;
        Ok(RecordKey::new(&handler, &key))
    }
}

/// A record as printed.
#[derive(Serialize)]
pub struct Shown {
    pub record_key: String,
    pub state: &'static str,
    pub lease_until: Option<String>,
    pub owner: String,
    pub attempts: u32,
    pub fingerprint: Option<String>,
    pub result: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub revision: u64,
}

impl Shown {
    pub fn of(key: &RecordKey, snapshot: &Snapshot) -> Self {
        let record = &snapshot.record;
        let (state, lease_until) = match record.state {
            ClaimState::Pending { lease_until } => ("pending", Some(output::millis(lease_until.0))),
            ClaimState::Released => ("released", None),
            ClaimState::Done => ("done", None),
            ClaimState::Dead => ("dead", None),
        };
        Self {
            record_key: key.as_str().to_owned(),
            state,
            lease_until,
            owner: record.owner.to_string(),
            attempts: record.attempt,
            fingerprint: record.fingerprint.map(|f| f.to_string()),
            result: record.result.as_deref().map(output::text_or_base64),
            created_at: output::millis(record.created_at.0),
            updated_at: output::millis(record.updated_at.0),
            revision: snapshot.revision,
        }
    }
}

pub async fn run(
    connection: &Connection,
    out: &Output,
    command: KeysCommand,
) -> Result<(), CliError> {
    match command {
        KeysCommand::Show(args) => {
            let key = args.record_key()?;
            let snapshot = if args.transactional {
                connection
                    .inbox(&connection.schema)
                    .await?
                    .inspect(&key)
                    .await?
            } else {
                let js = connection.jetstream().await?;
                connection
                    .bucket(&js, &connection.bucket)
                    .await?
                    .inspect(&key)
                    .await?
            };
            let snapshot = snapshot.ok_or_else(|| {
                CliError::NotFound(format!(
                    "no record of key {:?} for handler `{}`",
                    args.key, args.handler
                ))
            })?;
            out.emit(&Shown::of(&key, &snapshot), |shown| {
                let mut table = output::table(["field", "value"]);
                let none = || "-".to_owned();
                for (field, value) in [
                    ("record key", shown.record_key.clone()),
                    ("state", shown.state.to_owned()),
                    (
                        "lease until",
                        shown.lease_until.clone().unwrap_or_else(none),
                    ),
                    ("owner", shown.owner.clone()),
                    ("attempts", shown.attempts.to_string()),
                    (
                        "fingerprint",
                        shown.fingerprint.clone().unwrap_or_else(none),
                    ),
                    ("stored result", shown.result.clone().unwrap_or_else(none)),
                    ("created", shown.created_at.clone()),
                    ("updated", shown.updated_at.clone()),
                    ("revision", shown.revision.to_string()),
                ] {
                    table.add_row([field.to_owned(), value]);
                }
                table
            });
            Ok(())
        }
        KeysCommand::Forget {
            key: args,
            yes,
            force,
        } => {
            if args.transactional {
                let inbox = connection.inbox(&connection.schema).await?;
                forget(&inbox, &args, yes, force, out).await
            } else {
                let js = connection.jetstream().await?;
                let bucket = connection.bucket(&js, &connection.bucket).await?;
                forget(&bucket, &args, yes, force, out).await
            }
        }
    }
}

/// Forgets a key as [`operator::forget`] decides, by a delete at the
/// revision it read: a record that moved meanwhile is left alone.
async fn forget<S: DedupStore>(
    store: &S,
    args: &KeyArgs,
    yes: bool,
    force: bool,
    out: &Output,
) -> Result<(), CliError> {
    let key = args.record_key()?;
    let snapshot = store.inspect(&key).await?;
    let revision = match operator::forget(snapshot.as_ref(), force) {
        Forget::Absent => {
            return Err(CliError::NotFound(format!(
                "no record of key {:?} for handler `{}`",
                args.key, args.handler
            )));
        }
        Forget::Refused { owner, lease_until } => {
            return Err(CliError::Refused(format!(
                "key {:?} of handler `{}` is pending: worker {owner} holds it (lease until {} on its clock) \
                 and may be running the handler now. Forgetting it lets another worker run the handler \
                 again while it may still run: the effect can happen twice, and nobody counts it. \
                 Wait until it is done, released or dead (idem keys show), or pass --force.",
                args.key,
                args.handler,
                output::millis(lease_until.0)
            )));
        }
        Forget::Delete { revision } => revision,
    };
    let question = format!(
        "Forget key {:?} of handler `{}`? Its next delivery runs the handler again.",
        args.key, args.handler
    );
    crate::confirm(&question, yes).await?;
    match store.forget(&key, revision).await? {
        Written::Applied => {
            out.note(&format!("forgot {}", key.as_str()));
            Ok(())
        }
        Written::Moved => Err(CliError::Moved(format!(
            "the record of key {:?} changed while it was being forgotten (a worker claimed or \
             completed it): nothing was deleted; look again with idem keys show",
            args.key
        ))),
    }
}
