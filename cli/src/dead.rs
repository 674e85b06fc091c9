//! `idem dead`: the dead-letter stream, read by its `Idem-*` headers —
//! listed, shown, and replayed after a fix.
//!
//! A replay, per dead letter, does what [`idem::claim::operator::replay`]
//! decides about the record under the letter's key (the key and the
//! payload's fingerprint idem wrote into the letter; a producer's own
//! `Idem-*` headers never reach a letter):
//!
//! * the letter's own payload is `dead` or `released`, or there is no
//!   record: the key is *reopened* for it (a compare-and-set to `released`
//!   on the revision read, or a create — attempts counted afresh, only this
//!   payload can claim it, never another reusing the key), then the payload
//!   is republished. The write is what decides, not the read: a read misses
//!   a transactional worker's uncommitted claim, the write waits for it and
//!   finds the record moved, and the replay reads again;
//! * its own payload held by a worker (`pending`): the letter is kept
//!   (`in_flight`) — the worker may be between storing this letter and
//!   marking the key dead, and a copy would then be answered unrun;
//! * its own payload is `done`: the letter is deleted, nothing published;
//! * another payload's record, or a done record whose payload cannot be
//!   told: the letter is kept and reported (`conflict`, `unknown`).
//!
//! A republished copy carries a message id unique to the letter (its
//! stream, sequence and the time it was stored), so a second replay of the
//! same letter — after a crash, or by a second operator at the same time —
//! is dropped by the broker's duplicate window or answered by the claim;
//! the letter is deleted only after the broker confirmed the copy, and a
//! letter another replay deleted first is reported, not failed on. No
//! letter is deleted unless its payload is applied or confirmed
//! republished.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt;
use idem::claim::Snapshot;
use idem::claim::operator::{self, LetterClaim, Replay, Written};
use idem::consumer::headers;
use idem::fingerprint::Fingerprint;
use idem::handler::DeadLetterReason;
use idem::key::RecordKey;
use idem::publisher::{Outgoing, Publisher};
use idem::store::{DedupStore, KvStore, PgStore, StoreLocation};
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
    /// The fingerprint of the payload that held the record.
    pub fingerprint: Option<String>,
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
            fingerprint: get(headers::FINGERPRINT),
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
                !headers::is_idems(name) && !headers::is_server_directive(name)
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
            let mut replay = Replayer::new(connection, js.clone(), stream);
            let bar = out.progress(letters.len() as u64, "replaying");
            let mut report = Vec::with_capacity(letters.len());
            for letter in &letters {
                // One payload in memory at a time: the listing read headers.
                let outcome = match replay.payload_of(letter).await? {
                    Some(whole) => replay.one(&whole).await?,
                    None => Outcome::ReplayedElsewhere,
                };
                report.push(Replayed {
                    sequence: letter.sequence,
                    handler: letter.handler.clone(),
                    subject: letter.subject.clone(),
                    outcome: outcome.as_str(),
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
/// consumer (from `--since` on, if given) — headers only: a listing holds
/// no payloads (a replay fetches each one when it comes to it).
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
            headers_only: true,
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
    /// What the replay did: [`Outcome`]'s names.
    outcome: &'static str,
}

/// What replaying one letter came to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// As decided: republished (letter deleted), already done (letter
    /// deleted), or kept (`conflict`, `unknown`).
    Decided(Replay),
    /// Republished, and another replay deleted the letter first.
    ReplayedElsewhere,
    /// The record kept moving under the replay (workers busy with the key):
    /// the letter is kept; replay it again later.
    Busy,
    /// Its `Idem-Key` or `Idem-Store` does not read: the letter is kept.
    Unreadable,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Decided(replay) => replay.as_str(),
            Outcome::ReplayedElsewhere => "replayed_elsewhere",
            Outcome::Busy => "busy",
            Outcome::Unreadable => "unreadable",
        }
    }
}

/// A letter's claim, as idem wrote it into the letter.
struct Claimed {
    key: RecordKey,
    location: StoreLocation,
    letter: LetterClaim,
}

/// How many times a replay reads and decides again when the record moved
/// under its compare-and-set.
const ROUNDS: usize = 4;

/// Replays letters, keeping the stores it opened.
struct Replayer<'a> {
    connection: &'a Connection,
    js: jetstream::Context,
    stream: Stream,
    publisher: Publisher,
    buckets: HashMap<String, KvStore>,
    inboxes: HashMap<String, PgStore>,
}

impl<'a> Replayer<'a> {
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

    async fn one(&mut self, letter: &Letter) -> Result<Outcome, CliError> {
        let claimed = match claimed(letter) {
            Ok(claimed) => claimed,
            // One letter whose idem headers do not read stops nothing
            // else: it is kept and reported.
            Err(e) => {
                warn_letter(letter.sequence, &e);
                return Ok(Outcome::Unreadable);
            }
        };
        let mut decided = None;
        for _ in 0..ROUNDS {
            let decision = match &claimed {
                None => operator::replay(LetterClaim::None, None),
                Some(claimed) => {
                    let snapshot = self.inspect(claimed).await?;
                    let decision = operator::replay(claimed.letter, snapshot.as_ref());
                    if let (Replay::Reopen { .. }, LetterClaim::Held(fingerprint)) =
                        (&decision, claimed.letter)
                        && self.reopen(claimed, snapshot.as_ref(), fingerprint).await?
                            == Written::Moved
                    {
                        // A worker (or another replay) moved the record
                        // since it was read: read it again.
                        continue;
                    }
                    decision
                }
            };
            decided = Some(decision);
            break;
        }
        let Some(decision) = decided else {
            return Ok(Outcome::Busy);
        };
        match decision {
            Replay::Republish | Replay::Reopen { .. } => self.republish(letter).await?,
            Replay::AlreadyDone => {}
            Replay::InFlight | Replay::Conflict { .. } | Replay::Unknown => {
                return Ok(Outcome::Decided(decision));
            }
        }
        // Confirmed (or applied already): the letter has done its work.
        match self.stream.delete_message(letter.sequence).await {
            Ok(_) => Ok(Outcome::Decided(decision)),
            Err(e) if self.gone(letter.sequence).await => {
                // Another replay deleted it between our read and our delete.
                let _ = e;
                Ok(Outcome::ReplayedElsewhere)
            }
            Err(e) => Err(CliError::jetstream(format!(
                "delete dead letter {}",
                letter.sequence
            ))(e.into())),
        }
    }

    /// Whether the letter at `sequence` is no longer in the stream (the
    /// server says "no message found"; any other answer: not known gone).
    async fn gone(&self, sequence: u64) -> bool {
        matches!(self.stored(sequence).await, Ok(None))
    }

    /// The letter whole (payload and headers as stored), or `None` if it is
    /// gone (another replay deleted it).
    async fn payload_of(&self, letter: &Letter) -> Result<Option<Letter>, CliError> {
        let sequence = letter.sequence;
        let raw = self
            .stored(sequence)
            .await
            .map_err(|e| CliError::jetstream(format!("read dead letter {sequence}"))(e.into()))?;
        Ok(raw.map(|raw| {
            Letter::new(
                sequence,
                SystemTime::from(raw.time),
                raw.headers,
                raw.payload,
            )
        }))
    }

    /// The stored message at `sequence`; `None` when the server says there
    /// is none.
    async fn stored(
        &self,
        sequence: u64,
    ) -> Result<
        Option<async_nats::jetstream::message::StreamMessage>,
        async_nats::jetstream::stream::RawMessageError,
    > {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self.stream.get_raw_message(sequence).await {
            Ok(raw) => Ok(Some(raw)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Publishes the letter's original payload and headers to its subject
    /// and waits for the broker's confirmation.
    async fn republish(&self, letter: &Letter) -> Result<(), CliError> {
        let mut outgoing =
            Outgoing::new(letter.subject.clone(), letter.payload.clone()).with_id(replay_id(
                &self.stream.cached_info().config.name,
                letter.sequence,
                letter.at,
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
        Ok(())
    }

    async fn inspect(&mut self, claimed: &Claimed) -> Result<Option<Snapshot>, CliError> {
        Ok(match &claimed.location {
            StoreLocation::Kv { bucket } => {
                self.bucket(bucket).await?.inspect(&claimed.key).await?
            }
            StoreLocation::Postgres { schema } => {
                self.inbox(schema).await?.inspect(&claimed.key).await?
            }
        })
    }

    async fn reopen(
        &mut self,
        claimed: &Claimed,
        found: Option<&Snapshot>,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Written, CliError> {
        Ok(match &claimed.location {
            StoreLocation::Kv { bucket } => {
                self.bucket(bucket)
                    .await?
                    .reopen(&claimed.key, found, fingerprint)
                    .await?
            }
            StoreLocation::Postgres { schema } => {
                self.inbox(schema)
                    .await?
                    .reopen(&claimed.key, found, fingerprint)
                    .await?
            }
        })
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

fn warn_letter(sequence: u64, error: &CliError) {
    eprintln!("idem: dead letter {sequence} is kept: {error}");
}

/// The claim a letter names, if it held one.
fn claimed(letter: &Letter) -> Result<Option<Claimed>, CliError> {
    let (Some(key), Some(store)) = (&letter.record_key, &letter.store) else {
        return Ok(None);
    };
    let key = RecordKey::parse(key)
        .map_err(|e| CliError::Invalid(format!("dead letter {}: {e}", letter.sequence)))?;
    let location: StoreLocation = store
        .parse()
        .map_err(|e| CliError::Invalid(format!("dead letter {}: {e}", letter.sequence)))?;
    // A fingerprint that does not read is no fingerprint: a done record is
    // then `unknown` and the letter kept.
    let fingerprint = letter.fingerprint.as_deref().and_then(|f| f.parse().ok());
    Ok(Some(Claimed {
        key,
        location,
        letter: LetterClaim::Held(fingerprint),
    }))
}

/// The message id of a letter's republished copy: unique to the letter
/// (the dead-letter stream's name, the letter's sequence and the time it
/// was stored), so a recreated dead-letter stream's letter 1 is not taken
/// for an earlier stream's letter 1 inside the duplicate window.
fn replay_id(stream: &str, sequence: u64, stored: SystemTime) -> String {
    let nanos = stored
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("idem-replay-{stream}-{sequence}-{nanos}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_ids_differ_for_a_recreated_stream_s_letter_of_the_same_sequence() {
        let first = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let later = first + Duration::from_millis(1);
        assert_ne!(
            replay_id("IDEM_DEAD", 1, first),
            replay_id("IDEM_DEAD", 1, later)
        );
        assert_eq!(
            replay_id("IDEM_DEAD", 1, first),
            replay_id("IDEM_DEAD", 1, first)
        );
    }
}
