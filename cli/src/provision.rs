//! `idem provision`: what every handler shares — the claim bucket and the
//! dead-letter stream — created (or checked) by an admin, so that workers
//! can run without the right to create them. Each handler's durable
//! consumer is its own: `RuntimeBuilder::provision()` in the service.

use std::time::Duration;

use async_nats::jetstream::stream;
use idem::consumer::{DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECTS};
use idem::store::{KvStore, KvStoreConfig};
use serde::Serialize;

use crate::connect::Connection;
use crate::durability::{Finding, Holds, stream_findings, sync_finding, varz_of_every_server};
use crate::error::CliError;
use crate::output::Output;

#[derive(clap::Args)]
pub struct ProvisionArgs {
    /// How long completed keys are remembered (the handlers' `retention`).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Replicas of the bucket and the dead-letter stream.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Buckets the claims are spread over (`KvStoreConfig::shards`).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Creates nothing: reads the claim bucket, the dead-letter stream and
    /// each `--stream`, and reports the settings that weaken idem's
    /// guarantees (exit 6 if there are any).
    #[arg(long)]
    check: bool,
    /// A stream the handlers consume, to check too (repeatable).
    #[arg(long = "stream", requires = "check")]
    streams: Vec<String>,
    /// A connection to the system account (e.g. `nats://sys:secret@host:4222`),
    /// to read every server's JetStream sync setting.
    #[arg(long, requires = "check")]
    system_url: Option<String>,
}

/// What `--check` found.
#[derive(Serialize)]
struct Checked {
    checked: Vec<String>,
    findings: Vec<Finding>,
    /// What could not be looked at, and how to.
    unchecked: Vec<String>,
}

#[derive(Serialize)]
struct Provisioned {
    bucket: String,
    shards: usize,
    retention_seconds: u64,
    dead_letter_stream: String,
}

pub async fn run(
    connection: &Connection,
    out: &Output,
    args: ProvisionArgs,
) -> Result<(), CliError> {
    let js = connection.jetstream().await?;
    if args.check {
        return check(connection, &js, out, &args).await;
    }
    let config = KvStoreConfig::default()
        .bucket(&connection.bucket)
        .retention(args.retention)
        .replicas(args.replicas)
        .shards(args.shards);
    KvStore::open(&js, config).await?;
    js.get_or_create_stream(stream::Config {
        name: DEAD_LETTER_STREAM.into(),
        subjects: vec![DEAD_LETTER_SUBJECTS.into()],
        description: Some(
            "messages idem could not process, with the reason in Idem-* headers".into(),
        ),
        num_replicas: args.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| CliError::jetstream("create the dead-letter stream")(e.into()))?;
    let done = Provisioned {
        bucket: connection.bucket.clone(),
        shards: args.shards,
        retention_seconds: args.retention.as_secs(),
        dead_letter_stream: DEAD_LETTER_STREAM.into(),
    };
    out.emit(&done, |done| {
        let mut table = crate::output::table(["provisioned", "name"]);
        table.add_row([
            "claim bucket".to_owned(),
            format!("{} ({} shard(s))", done.bucket, done.shards),
        ]);
        table.add_row([
            "dead-letter stream".to_owned(),
            done.dead_letter_stream.clone(),
        ]);
        table
    });
    Ok(())
}

/// `--check`: reads, never writes.
async fn check(
    connection: &Connection,
    js: &async_nats::jetstream::Context,
    out: &Output,
    args: &ProvisionArgs,
) -> Result<(), CliError> {
    let mut streams = Vec::new();
    match KvStore::open_existing(js, &connection.bucket).await? {
        Some(store) => {
            let shards = store.map().shard_count();
            let layout = KvStoreConfig::default()
                .bucket(&connection.bucket)
                .shards(shards);
            for shard in 0..shards {
                streams.push((format!("KV_{}", layout.shard_bucket(shard)), Holds::Claims));
            }
        }
        None => {
            return Err(CliError::NotFound(format!(
                "no claim bucket {} (run `idem provision` first)",
                connection.bucket
            )));
        }
    }
    streams.push((DEAD_LETTER_STREAM.to_owned(), Holds::Letters));
    streams.extend(
        args.streams
            .iter()
            .map(|name| (name.clone(), Holds::Messages)),
    );
    let mut checked = Checked {
        checked: Vec::new(),
        findings: Vec::new(),
        unchecked: Vec::new(),
    };
    for (name, holds) in &streams {
        let mut stream = js
            .get_stream(name)
            .await
            .map_err(|e| CliError::jetstream("read a stream")(e.into()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| CliError::jetstream("read a stream's configuration")(e.into()))?;
        checked.checked.push(format!("stream {name}"));
        checked
            .findings
            .extend(stream_findings(name, *holds, &info.config));
    }
    match &args.system_url {
        Some(url) => {
            // The client takes no credentials from a URL: they are given
            // to it as a user and password.
            let addr: async_nats::ServerAddr = url
                .parse()
                .map_err(|e| CliError::Invalid(format!("--system-url {url}: {e}")))?;
            let options = match (addr.username(), addr.password()) {
                (Some(user), Some(password)) => {
                    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                }
                _ => async_nats::ConnectOptions::new(),
            };
            let system = options
                .name("idem-cli (system account)")
                .connect(addr)
                .await
                .map_err(|source| CliError::Connect {
                    url: url.clone(),
                    source,
                })?;
            let every = varz_of_every_server(&system, Duration::from_secs(1))
                .await
                .map_err(CliError::jetstream("ask the servers for their settings"))?;
            if every.is_empty() {
                checked.unchecked.push(format!(
                    "no server answered $SYS.REQ.SERVER.PING.VARZ on {url}: is it a system-account user?"
                ));
            }
            for varz in &every {
                let name = varz
                    .get("server_name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("?");
                checked.checked.push(format!("server {name}"));
                checked.findings.extend(sync_finding(varz));
            }
        }
        None => checked.unchecked.push(
            "the servers' sync setting (give --system-url, a system-account connection)".into(),
        ),
    }
    out.emit(&checked, |checked| {
        let mut table = crate::output::table(["checked", "setting", "what it costs"]);
        for finding in &checked.findings {
            table.add_row([
                finding.subject.clone(),
                finding.setting.clone(),
                finding.says.clone(),
            ]);
        }
        for subject in &checked.checked {
            if !checked.findings.iter().any(|f| &f.subject == subject) {
                table.add_row([subject.clone(), "ok".to_owned(), String::new()]);
            }
        }
        for what in &checked.unchecked {
            table.add_row(["not checked".to_owned(), String::new(), what.clone()]);
        }
        table
    });
    match checked.findings.len() {
        0 => Ok(()),
        n => Err(CliError::Weakened(n)),
    }
}
