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
