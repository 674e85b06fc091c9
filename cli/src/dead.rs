//! `idem dead`: the dead-letter stream, read by its `Idem-*` headers —
//! listed, shown, and replayed after a fix.
//!
//! A replay, per dead letter: clears its key's `dead` record (so the
//! handler runs again; a key already `done` is left, and the letter counts
//! as applied), republishes the original payload and headers to the
//! original subject with a message id derived from the letter (a repeated
//! replay inside the duplicate window is dropped by the broker), waits for
//! the broker's confirmation, then deletes the letter. Replaying twice
//! therefore applies nothing twice: the letter is gone, or its key is done,
//! or the broker drops the copy, or the handler's claim answers it as a
//! duplicate.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt;
use idem::claim::ClaimState;
use idem::consumer::headers;
use idem::handler::DeadLetterReason;
use idem::key::RecordKey;
use idem::publisher::{Outgoing, Publisher};
use idem::store::{DedupStore, KvStore, PgStore};
use serde::Serialize;

use crate::connect::Connection;
use crate::error::CliError;
use crate::output::{self, Output};

#[derive(Subcommand)]
pub enum DeadCommand {
    /// A table of dead letters (newest last).
    List(Filter),
    /// One dead letter: every header and the payload.
    Show {
        /// Its sequence in the dead-letter stream.
        sequence: u64,
    },
    /// Republishes dead letters to their original subjects, after clearing
    /// their keys' dead records, and deletes them.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// List what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters.
#[derive(clap::Args, Default)]
pub struct Filter {
    /// Only this handler's.
    #[arg(long)]
    handler: Option<String>,
    /// Only this reason's (decode, missing_key, missing_state,
    /// handler_error, retries_exhausted, panic, key_conflict).
    #[arg(long)]
    reason: Option<String>,
    /// Only those stored since: a duration back ("2h") or a time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
}

pub struct Wanted {
    handler: Option<String>,
    reason: Option<DeadLetterReason>,
    since: Option<SystemTime>,
}

impl Filter {
    pub fn wanted(&self) -> Result<Wanted, CliError> {
        let reason = match &self.reason {
            None => None,
            Some(text) => Some(DeadLetterReason::parse(text).ok_or_else(|| {
                let known: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
                CliError::Invalid(format!(
                    "unknown reason {text:?}; the reasons are: {}",
                    known.join(", ")
                ))
            })?),
        };
        let since = self
            .since
            .as_deref()
            .map(output::parse_since)
            .transpose()
            .map_err(CliError::Invalid)?;
        Ok(Wanted {
            handler: self.handler.clone(),
            reason,
            since,
        })
    }
}

impl Wanted {
    fn admits(&self, letter: &Letter) -> bool {
        self.handler.as_ref().is_none_or(|h| *h == letter.handler)
            && self.reason.is_none_or(|r| r.as_str() == letter.reason)
            && self.since.is_none_or(|since| letter.at >= since)
    }
}

/// One dead letter, as its headers describe it.
#[derive(Serialize)]
pub struct Letter {
    /// Its sequence in the dead-letter stream.
    pub sequence: u64,
    /// When it was stored.
    pub time: String,
    #[serde(skip)]
    pub at: SystemTime,
    pub handler: String,
    pub reason: String,
    pub error: String,
    pub attempts: Option<u32>,
    /// The original subject.
    pub subject: String,
    pub original_stream: String,
    pub original_sequence: Option<u64>,
    pub original_message_id: Option<String>,
    /// The claim record's key, if the message had claimed one.
    pub record_key: Option<String>,
    /// Where that record is (`kv:<bucket>`, `postgres:<schema>`).
    pub store: Option<String>,
    #[serde(skip)]
    pub headers: HeaderMap,
    #[serde(skip)]
    pub payload: Bytes,
}

impl Letter {
    fn new(sequence: u64, at: SystemTime, headers: HeaderMap, payload: Bytes) -> Self {
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        Self {
            sequence,
            time: output::time(at),
            at,
            handler: get(headers::HANDLER).unwrap_or_default(),
            reason: get(headers::REASON).unwrap_or_default(),
            error: get(headers::ERROR).unwrap_or_default(),
            attempts: get(headers::ATTEMPTS).and_then(|a| a.parse().ok()),
            subject: get(headers::SUBJECT).unwrap_or_default(),
            original_stream: get(headers::STREAM).unwrap_or_default(),
            original_sequence: get(headers::SEQUENCE).and_then(|s| s.parse().ok()),
            original_message_id: get(headers::MESSAGE_ID),
            record_key: get(headers::KEY),
            store: get(headers::STORE),
            headers,
            payload,
        }
    }

    /// The original's headers: the letter's, without idem's.
    fn original_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(name, _)| {
                let name: &str = name.as_ref();
                !name.starts_with("Idem-") && name != idem::MSG_ID_HEADER
            })
            .flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(move |v| (name.to_owned(), v.as_str().to_owned()))
            })
            .collect()
    }
}

pub async fn run(
    connection: &Connection,
    out: &Output,
    command: DeadCommand,
) -> Result<(), CliError> {
    // Bad usage is reported before anything is asked of the server.
    if let DeadCommand::List(filter) | DeadCommand::Replay { filter, .. } = &command {
        filter.wanted()?;
    }
    let js = connection.jetstream().await?;
    let stream = match dead_stream(&js, &connection.dead_stream).await {
        Ok(stream) => stream,
        // No stream yet: no handler has dead-lettered anything.
        Err(missing @ CliError::NotFound(_)) if !matches!(command, DeadCommand::Show { .. }) => {
            out.note(&format!("{missing}: no dead letters"));
            out.emit(&Vec::<Letter>::new(), |letters| list_table(letters));
            return Ok(());
        }
        Err(missing) => return Err(missing),
    };
    match command {
        DeadCommand::List(filter) => {
            let letters = read(&stream, &filter.wanted()?, out).await?;
            out.emit(&letters, |letters| list_table(letters));
            Ok(())
        }
        DeadCommand::Show { sequence } => {
            let raw = stream.get_raw_message(sequence).await.map_err(|e| {
                CliError::NotFound(format!(
                    "no dead letter {sequence} in {}: {e}",
                    connection.dead_stream
                ))
            })?;
            let letter = Letter::new(
                sequence,
                SystemTime::from(raw.time),
                raw.headers,
                raw.payload,
            );
            #[derive(Serialize)]
            struct Shown<'a> {
                #[serde(flatten)]
                letter: &'a Letter,
                headers: BTreeMap<String, Vec<String>>,
                payload: String,
            }
            let shown = Shown {
                headers: letter
                    .headers
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.to_string(),
                            v.iter().map(|v| v.as_str().to_owned()).collect(),
                        )
                    })
                    .collect(),
                payload: output::text_or_base64(&letter.payload),
                letter: &letter,
            };
            out.emit(&shown, |shown| {
                let mut table = output::table(["field", "value"]);
                table.add_row(["sequence".to_owned(), shown.letter.sequence.to_string()]);
                table.add_row(["stored".to_owned(), shown.letter.time.clone()]);
                for (name, values) in &shown.headers {
                    table.add_row([name.clone(), values.join(", ")]);
                }
                table.add_row(["payload".to_owned(), shown.payload.clone()]);
                table
            });
            Ok(())
        }
        DeadCommand::Replay {
            filter,
            dry_run,
            yes,
        } => {
            let letters = read(&stream, &filter.wanted()?, out).await?;
            // A key conflict replayed conflicts again, unless its key was
            // forgotten: replayed only when asked for by reason.
            let asked_for_conflicts =
                filter.reason.as_deref() == Some(DeadLetterReason::KeyConflict.as_str());
            let (letters, skipped): (Vec<Letter>, Vec<Letter>) =
                letters.into_iter().partition(|l| {
                    asked_for_conflicts || l.reason != DeadLetterReason::KeyConflict.as_str()
                });
            if !skipped.is_empty() {
                out.note(&format!(
                    "skipping {} key_conflict dead letter(s): their keys belong to another payload; \
                     forget a key first (idem keys forget) and replay with --reason key_conflict",
                    skipped.len()
                ));
            }
            if dry_run || letters.is_empty() {
                out.emit(&letters, |letters| list_table(letters));
                out.note(&format!(
                    "{} dead letter(s) would be replayed",
                    letters.len()
                ));
                return Ok(());
            }
            crate::confirm(&format!("Replay {} dead letter(s)?", letters.len()), yes).await?;
            let mut replay = Replay::new(connection, js.clone(), stream);
            let bar = out.progress(letters.len() as u64, "replaying");
            let mut report = Vec::with_capacity(letters.len());
            for letter in &letters {
                let done = replay.one(letter).await?;
                report.push(Replayed {
                    sequence: letter.sequence,
                    handler: letter.handler.clone(),
                    subject: letter.subject.clone(),
                    outcome: done,
                });
                bar.inc(1);
            }
            bar.finish_and_clear();
            out.emit(&report, |report| {
                let mut table = output::table(["seq", "handler", "subject", "outcome"]);
                for r in report {
                    table.add_row([
                        r.sequence.to_string(),
                        r.handler.clone(),
                        r.subject.clone(),
                        r.outcome.to_owned(),
                    ]);
                }
                table
            });
            Ok(())
        }
    }
}

async fn dead_stream(js: &jetstream::Context, name: &str) -> Result<Stream, CliError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    js.get_stream(name).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
        {
            CliError::NotFound(format!("no dead-letter stream `{name}`"))
        }
        _ => CliError::jetstream(format!("read the dead-letter stream `{name}`"))(e.into()),
    })
}

fn list_table(letters: &[Letter]) -> comfy_table::Table {
    let mut table = output::table([
        "seq", "stored", "handler", "reason", "attempts", "subject", "error",
    ]);
    for l in letters {
        let mut error = l.error.clone();
        if let Some((cut, _)) = error.char_indices().nth(60) {
            error.truncate(cut);
            error.push('…');
        }
        table.add_row([
            l.sequence.to_string(),
            l.time.clone(),
            l.handler.clone(),
            l.reason.clone(),
            l.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            l.subject.clone(),
            error,
        ]);
    }
    table
}

/// Every dead letter `wanted` admits, oldest first, read with an ordered
/// consumer (from `--since` on, if given).
pub async fn read(stream: &Stream, wanted: &Wanted, out: &Output) -> Result<Vec<Letter>, CliError> {
    let mut stream = stream.clone();
    let info = stream
        .info()
        .await
        .map_err(|e| CliError::jetstream("read the dead-letter stream's info")(e.into()))?;
    let total = info.state.messages;
    if total == 0 {
        return Ok(Vec::new());
    }
    let deliver_policy = match wanted.since {
        Some(since) => DeliverPolicy::ByStartTime {
            start_time: since.into(),
        },
        None => DeliverPolicy::All,
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| CliError::jetstream("read the dead letters")(e.into()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| CliError::jetstream("read the dead letters")(e.into()))?;
    let bar = out.progress(total, "reading dead letters");
    let mut letters = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let message = match next {
            Err(_) | Ok(None) => break,
            Ok(Some(message)) => {
                message.map_err(|e| CliError::jetstream("read a dead letter")(e.into()))?
            }
        };
        let Ok(info) = message.info() else {
            continue;
        };
        let (sequence, pending, at) = (
            info.stream_sequence,
            info.pending,
            SystemTime::from(info.published),
        );
        let letter = Letter::new(
            sequence,
            at,
            message.headers.clone().unwrap_or_default(),
            message.payload.clone(),
        );
        if wanted.admits(&letter) {
            letters.push(letter);
        }
        bar.inc(1);
        if pending == 0 {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(letters)
}

#[derive(Serialize)]
struct Replayed {
    sequence: u64,
    handler: String,
    subject: String,
    /// `republished`, or `already_done` (its key completed meanwhile).
    outcome: &'static str,
}

/// Replays letters, keeping the stores it opened.
struct Replay<'a> {
    connection: &'a Connection,
    js: jetstream::Context,
    stream: Stream,
    publisher: Publisher,
    buckets: HashMap<String, KvStore>,
    inboxes: HashMap<String, PgStore>,
}

impl<'a> Replay<'a> {
    fn new(connection: &'a Connection, js: jetstream::Context, stream: Stream) -> Self {
        Self {
            connection,
            publisher: Publisher::new(js.client()),
            js,
            stream,
            buckets: HashMap::new(),
            inboxes: HashMap::new(),
        }
    }

    async fn one(&mut self, letter: &Letter) -> Result<&'static str, CliError> {
        let outcome = match self.clear_dead_record(letter).await? {
            Cleared::AlreadyDone => "already_done",
            Cleared::Ready => {
                let mut outgoing = Outgoing::new(letter.subject.clone(), letter.payload.clone())
                    .with_id(format!(
                        "idem-replay-{}-{}",
                        self.stream.cached_info().config.name,
                        letter.sequence
                    ));
                for (name, value) in letter.original_headers() {
                    outgoing = outgoing.header(&name, &value);
                }
                self.publisher
                    .send(outgoing)
                    .await
                    .map_err(|source| CliError::Replay {
                        sequence: letter.sequence,
                        source,
                    })?;
                "republished"
            }
        };
        // Confirmed (or already applied): the letter has done its work.
        self.stream
            .delete_message(letter.sequence)
            .await
            .map_err(|e| {
                CliError::jetstream(format!("delete dead letter {}", letter.sequence))(e.into())
            })?;
        Ok(outcome)
    }

    /// Makes the letter's key runnable again: a `dead` record is deleted.
    async fn clear_dead_record(&mut self, letter: &Letter) -> Result<Cleared, CliError> {
        let (Some(key), Some(store)) = (&letter.record_key, &letter.store) else {
            return Ok(Cleared::Ready);
        };
        let key = RecordKey::parse(key)
            .map_err(|e| CliError::Invalid(format!("dead letter {}: {e}", letter.sequence)))?;
        let snapshot = match store.split_once(':') {
            Some(("kv", bucket)) => self.bucket(bucket).await?.inspect(&key).await?,
            Some(("postgres", schema)) => self.inbox(schema).await?.inspect(&key).await?,
            _ => {
                return Err(CliError::Invalid(format!(
                    "dead letter {}: unknown store {store:?}",
                    letter.sequence
                )));
            }
        };
        match snapshot.map(|s| s.record.state) {
            Some(ClaimState::Done) => Ok(Cleared::AlreadyDone),
            Some(ClaimState::Dead) => {
                match store.split_once(':') {
                    Some(("kv", bucket)) => self.bucket(bucket).await?.forget(&key).await?,
                    Some((_, schema)) => self.inbox(schema).await?.forget(&key).await?,
                    None => {}
                }
                Ok(Cleared::Ready)
            }
            _ => Ok(Cleared::Ready),
        }
    }

    async fn bucket(&mut self, bucket: &str) -> Result<&KvStore, CliError> {
        if !self.buckets.contains_key(bucket) {
            let store = self.connection.bucket(&self.js, bucket).await?;
            self.buckets.insert(bucket.to_owned(), store);
        }
        self.buckets
            .get(bucket)
            .ok_or_else(|| CliError::NotFound(format!("claim bucket `{bucket}`")))
    }

    async fn inbox(&mut self, schema: &str) -> Result<&PgStore, CliError> {
        if !self.inboxes.contains_key(schema) {
            let store = self.connection.inbox(schema).await?;
            self.inboxes.insert(schema.to_owned(), store);
        }
        self.inboxes
            .get(schema)
            .ok_or_else(|| CliError::NotFound(format!("inbox schema `{schema}`")))
    }
}

enum Cleared {
    Ready,
    AlreadyDone,
}
