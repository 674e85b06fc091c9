//! `idem status`: per handler, its consumer's backlog (pending, waiting for
//! an ack, redelivered, ack floor), the claim bucket's size, dead letters by
//! reason, and the PostgreSQL inbox's rows by state.
//!
//! Handlers are found where runtimes register them: `idem=handlers.<name>`
//! in the claim bucket (stream and consumer of each).

use std::collections::BTreeMap;

use futures::StreamExt;
use idem::store::RevisionedMap;
use serde::Serialize;

use crate::connect::Connection;
use crate::error::CliError;
use crate::output::{self, Output};

#[derive(Serialize, Default)]
struct Status {
    bucket: Option<Bucket>,
    handlers: Vec<HandlerStatus>,
    /// handler → reason → dead letters.
    dead_letters: BTreeMap<String, BTreeMap<String, u64>>,
    inbox: Vec<InboxRows>,
}

#[derive(Serialize)]
struct Bucket {
    name: String,
    shards: usize,
    records: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct HandlerStatus {
    handler: String,
    stream: String,
    consumer: String,
    /// Messages not yet delivered.
    pending: Option<u64>,
    /// Delivered, not yet acknowledged.
    ack_pending: Option<usize>,
    /// Delivered more than once, not yet acknowledged.
    redelivered: Option<usize>,
    /// The stream sequence everything up to which is acknowledged.
    ack_floor: Option<u64>,
    /// Why the numbers are missing (a service handler has no consumer).
    note: Option<String>,
}

#[derive(Serialize, sqlx::FromRow)]
struct InboxRows {
    handler: String,
    state: String,
    rows: i64,
}

#[derive(serde::Deserialize)]
struct Registration {
    stream: String,
    consumer: String,
}

pub async fn run(connection: &Connection, out: &Output) -> Result<(), CliError> {
    let js = connection.jetstream().await?;
    let mut status = Status::default();
    if let Some(store) = idem::store::KvStore::open_existing(&js, &connection.bucket).await? {
        let (bucket, names) =
            bucket_and_handlers(&js, &connection.bucket, store.map().shard_count()).await?;
        status.bucket = Some(bucket);
        for name in names {
            let key = format!("idem=handlers.{name}");
            let Some((value, _)) = store.map().read(&key).await? else {
                continue;
            };
            let Ok(registration) = serde_json::from_slice::<Registration>(&value) else {
                continue;
            };
            status
                .handlers
                .push(consumer_status(&js, name, registration).await);
        }
    }
    if let Ok(stream) = js.get_stream(&connection.dead_stream).await {
        let everything = crate::dead::Filter::default().wanted()?;
        for letter in crate::dead::read(&stream, &everything, out).await? {
            *status
                .dead_letters
                .entry(letter.handler)
                .or_default()
                .entry(letter.reason)
                .or_default() += 1;
        }
    }
    if let Some(pool) = connection.pool().await? {
        let schema = connection.schema.replace('"', "\"\"");
        status.inbox = sqlx::query_as(&format!(
            "SELECT handler, state, count(*) AS rows FROM \"{schema}\".idem_inbox GROUP BY 1, 2 ORDER BY 1, 2"
        ))
        .fetch_all(&pool)
        .await
        .map_err(CliError::Postgres)?;
    }
    out.emit(&status, tables);
    Ok(())
}

/// The bucket's size over its shards, and the handler names registered in it.
async fn bucket_and_handlers(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    shards: usize,
) -> Result<(Bucket, Vec<String>), CliError> {
    let mut size = Bucket {
        name: bucket.to_owned(),
        shards,
        records: 0,
        bytes: 0,
    };
    let mut names = Vec::new();
    let config = idem::store::KvStoreConfig::default()
        .bucket(bucket)
        .shards(shards);
    for index in 0..shards {
        let shard = config.shard_bucket(index);
        let stream = js
            .get_stream(format!("KV_{shard}"))
            .await
            .map_err(|e| CliError::jetstream(format!("read bucket {shard}"))(e.into()))?;
        let prefix = format!("$KV.{shard}.idem=handlers.");
        let mut subjects = stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| CliError::jetstream(format!("read bucket {shard}"))(e.into()))?;
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject
                .map_err(|e| CliError::jetstream(format!("read bucket {shard}"))(e.into()))?;
            if let Some(name) = subject.strip_prefix(&prefix) {
                names.push(name.to_owned());
            }
        }
        let state = &stream.cached_info().state;
        size.records += state.messages;
        size.bytes += state.bytes;
    }
    names.sort();
    Ok((size, names))
}

async fn consumer_status(
    js: &async_nats::jetstream::Context,
    handler: String,
    registration: Registration,
) -> HandlerStatus {
    let mut status = HandlerStatus {
        handler,
        stream: registration.stream,
        consumer: registration.consumer,
        pending: None,
        ack_pending: None,
        redelivered: None,
        ack_floor: None,
        note: None,
    };
    if status.stream.is_empty() {
        status.note = Some("request/reply (no consumer)".into());
        return status;
    }
    let info = match js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            &status.consumer,
            &status.stream,
        )
        .await
    {
        Ok(mut consumer) => consumer.info().await.cloned().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match info {
        Ok(info) => {
            status.pending = Some(info.num_pending);
            status.ack_pending = Some(info.num_ack_pending);
            status.redelivered = Some(info.num_redelivered);
            status.ack_floor = Some(info.ack_floor.stream_sequence);
        }
        Err(e) => status.note = Some(format!("consumer unavailable: {e}")),
    }
    status
}

fn tables(status: &Status) -> comfy_table::Table {
    let mut table = output::table([
        "handler",
        "stream / consumer",
        "pending",
        "ack pending",
        "redelivered",
        "ack floor",
        "dead letters",
    ]);
    let number = |n: Option<String>| n.unwrap_or_else(|| "-".to_owned());
    for h in &status.handlers {
        let dead = status
            .dead_letters
            .get(&h.handler)
            .map(|reasons| {
                reasons
                    .iter()
                    .map(|(reason, n)| format!("{reason} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let place = match &h.note {
            Some(note) if h.pending.is_none() => note.clone(),
            _ => format!("{} / {}", h.stream, h.consumer),
        };
        table.add_row([
            h.handler.clone(),
            place,
            number(h.pending.map(|n| n.to_string())),
            number(h.ack_pending.map(|n| n.to_string())),
            number(h.redelivered.map(|n| n.to_string())),
            number(h.ack_floor.map(|n| n.to_string())),
            dead,
        ]);
    }
    if let Some(bucket) = &status.bucket {
        table.add_row([
            format!("(claims: {})", bucket.name),
            format!("{} shard(s)", bucket.shards),
            format!("{} records", bucket.records),
            format!("{} bytes", bucket.bytes),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    for rows in &status.inbox {
        table.add_row([
            rows.handler.clone(),
            format!("(inbox: {})", rows.state),
            format!("{} rows", rows.rows),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    table
}
