//! Creating the claim bucket, or checking that an existing one fits.
//!
//! The bucket's backing stream is created directly (`KV_<bucket>`, subjects
//! `$KV.<bucket>.>`, the same settings a KV client would use) rather than
//! through `create_key_value`, which first asks for account info that
//! nats-server 2.9 answers in a form async-nats cannot parse.
//!
//! Direct get is on only for a single replica, where the one server that
//! answers it is the one that writes. On a replicated bucket reads go to
//! the stream leader, never to a follower that may lag: fencing does not
//! depend on it (a stale read can only make a CAS fail), but a follower's
//! stale copy could show a forgotten or expired record as still done, or
//! hide a record it has not received yet.

use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, kv};

use super::{KvStoreConfig, StoreError, StoreOp};

/// JetStream's default duplicate window; a bucket's may not exceed its max age.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Opens the bucket `config` names — each of its shards — creating what is
/// absent.
pub(super) async fn open(
    js: &jetstream::Context,
    config: &KvStoreConfig,
) -> Result<Vec<kv::Store>, StoreError> {
    let mut shards = Vec::with_capacity(config.shard_count());
    for index in 0..config.shard_count() {
        shards.push(open_shard(js, config, index).await?);
    }
    Ok(shards)
}

/// The configuration of the existing bucket `bucket`, read from its first
/// shard's stream: for tools that open a bucket as it is, not as a runtime
/// would create it. `Ok(None)`: there is no such bucket.
pub(super) async fn existing(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<Option<KvStoreConfig>, StoreError> {
    let found = match js.get_stream(format!("KV_{bucket}")).await {
        Ok(stream) => stream.cached_info().config.clone(),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(StoreError::unavailable(StoreOp::Read, e)),
    };
    // "…, shard 1 of K" for K > 1; no count for one shard.
    let shards = found
        .description
        .as_deref()
        .and_then(|d| d.rsplit_once(" of "))
        .and_then(|(_, count)| count.parse().ok())
        .unwrap_or(1);
    Ok(Some(
        KvStoreConfig::default()
            .bucket(bucket)
            .retention(found.max_age)
            .replicas(found.num_replicas.max(1))
            .storage(found.storage)
            .shards(shards),
    ))
}

/// Opens shard `index` of the bucket, creating it when absent.
async fn open_shard(
    js: &jetstream::Context,
    config: &KvStoreConfig,
    index: usize,
) -> Result<kv::Store, StoreError> {
    let bucket = &config.shard_bucket(index);
    let valid = !bucket.is_empty()
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(StoreError::InvalidBucketName {
            name: bucket.to_owned(),
        });
    }
    let wanted = stream_config(config, index);
    match js.get_stream(&wanted.name).await {
        Ok(existing) => check(config, index, &existing.cached_info().config)?,
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            match js.create_stream(wanted.clone()).await {
                Ok(_) => {}
                // Another worker created it first: check theirs.
                Err(e) if matches!(e.kind(), CreateStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NAME_EXIST) =>
                {
                    let existing = js
                        .get_stream(&wanted.name)
                        .await
                        .map_err(|e| StoreError::unavailable(StoreOp::Provision, e))?;
                    check(config, index, &existing.cached_info().config)?;
                }
                Err(e) => return Err(StoreError::unavailable(StoreOp::Provision, e)),
            }
        }
        Err(e) => return Err(StoreError::unavailable(StoreOp::Provision, e)),
    }
    js.get_key_value(bucket)
        .await
        .map_err(|e| StoreError::unavailable(StoreOp::Provision, e))
}

/// What a shard's stream says it is: the shard count is part of the
/// layout (a key's shard depends on it), so it is written where every open
/// checks it. One shard keeps the description buckets always had.
fn description(config: &KvStoreConfig, index: usize) -> String {
    match config.shard_count() {
        1 => "idem claim records (dedup store)".into(),
        count => format!(
            "idem claim records (dedup store), shard {} of {count}",
            index + 1
        ),
    }
}

fn stream_config(config: &KvStoreConfig, index: usize) -> stream::Config {
    let bucket = config.shard_bucket(index);
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description(config, index)),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: config.retention_period(),
        storage: config.storage_type(),
        num_replicas: config.replica_count(),
        duplicate_window: DEFAULT_DUPLICATE_WINDOW.min(config.retention_period()),
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: config.replica_count() == 1,
        discard: DiscardPolicy::New,
        placement: config.shard_tag(index).map(|tag| stream::Placement {
            cluster: None,
            tags: vec![tag.to_owned()],
        }),
        ..Default::default()
    }
}

/// Refuses a bucket whose settings would break the store's guarantees.
fn check(config: &KvStoreConfig, index: usize, found: &stream::Config) -> Result<(), StoreError> {
    let bucket = &config.shard_bucket(index);
    let mismatch = |setting, found: String, expected: String| StoreError::IncompatibleBucket {
        bucket: bucket.clone(),
        setting,
        found,
        expected,
    };
    // A bucket made by an idem without shards (no description of its own)
    // counts as one shard.
    let layout = found
        .description
        .clone()
        .unwrap_or_else(|| description(&KvStoreConfig::default(), 0));
    if layout != description(config, index) {
        return Err(mismatch(
            "shards (a key's shard depends on the count: keep it, or use a new bucket name)",
            layout,
            description(config, index),
        ));
    }
    let subject = format!("$KV.{bucket}.>");
    if !found.subjects.contains(&subject) {
        return Err(mismatch(
            "subjects",
            format!("{:?}", found.subjects),
            format!("[{subject:?}]"),
        ));
    }
    if found.max_messages_per_subject != 1 {
        return Err(mismatch(
            "history",
            found.max_messages_per_subject.to_string(),
            "1".into(),
        ));
    }
    if found.max_age != config.retention_period() {
        return Err(mismatch(
            "max_age (retention)",
            format!("{:?}", found.max_age),
            format!("{:?}", config.retention_period()),
        ));
    }
    if found.num_replicas.max(1) != config.replica_count() {
        return Err(mismatch(
            "replicas",
            found.num_replicas.to_string(),
            config.replica_count().to_string(),
        ));
    }
    if found.allow_direct && config.replica_count() > 1 {
        return Err(mismatch(
            "allow_direct (reads from followers)",
            "true".into(),
            "false".into(),
        ));
    }
    // With `discard old`, a bucket that reaches a limit (max_bytes,
    // max_msgs — now or set later by an operator) deletes its oldest
    // records: completions forgotten, their keys run again. With `discard
    // new` a full bucket refuses writes, and claims fail closed.
    if found.discard != DiscardPolicy::New {
        return Err(mismatch(
            "discard (old records evicted when full)",
            "old".into(),
            "new".into(),
        ));
    }
    if found.storage != config.storage_type() {
        return Err(mismatch(
            "storage",
            storage_name(found.storage),
            storage_name(config.storage_type()),
        ));
    }
    Ok(())
}

fn storage_name(storage: StorageType) -> String {
    match storage {
        StorageType::File => "file".into(),
        StorageType::Memory => "memory".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting_refused(config: &KvStoreConfig, found: &stream::Config) -> Option<&'static str> {
        match check(config, 0, found) {
            Ok(()) => None,
            Err(StoreError::IncompatibleBucket { setting, .. }) => Some(setting),
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn the_bucket_idem_creates_passes_its_own_check() {
        for replicas in [1, 3] {
            let config = KvStoreConfig::default().replicas(replicas);
            assert_eq!(setting_refused(&config, &stream_config(&config, 0)), None);
        }
    }

    #[test]
    fn a_bucket_sharded_another_way_is_refused() {
        let one = KvStoreConfig::default();
        let four = KvStoreConfig::default().shards(4);
        for index in 0..4 {
            assert!(check(&four, index, &stream_config(&four, index)).is_ok());
        }
        let refused =
            Some("shards (a key's shard depends on the count: keep it, or use a new bucket name)");
        assert_eq!(setting_refused(&four, &stream_config(&one, 0)), refused);
        assert_eq!(setting_refused(&one, &stream_config(&four, 0)), refused);
        let two = KvStoreConfig::default().shards(2);
        assert_eq!(setting_refused(&two, &stream_config(&four, 0)), refused);
    }

    /// A change to a bucket's configuration.
    type Spoil = fn(&mut stream::Config);

    #[test]
    fn a_bucket_that_can_evict_records_is_refused_by_name() {
        let config = KvStoreConfig::default();
        let cases: [(&str, Spoil); 3] = [
            ("discard (old records evicted when full)", |c| {
                c.discard = DiscardPolicy::Old
            }),
            ("discard (old records evicted when full)", |c| {
                c.discard = DiscardPolicy::Old;
                c.max_bytes = 1 << 20;
            }),
            ("discard (old records evicted when full)", |c| {
                c.discard = DiscardPolicy::Old;
                c.max_messages = 1_000;
            }),
        ];
        for (setting, spoil) in cases {
            let mut found = stream_config(&config, 0);
            spoil(&mut found);
            assert_eq!(setting_refused(&config, &found), Some(setting));
        }
        // Limits with `discard new` refuse writes when full: claims fail
        // closed, nothing is forgotten.
        let mut bounded = stream_config(&config, 0);
        bounded.max_bytes = 1 << 30;
        assert_eq!(setting_refused(&config, &bounded), None);
    }

    #[test]
    fn each_unsafe_setting_is_named() {
        let r3 = KvStoreConfig::default().replicas(3);
        let cases: [(&str, Spoil); 6] = [
            ("subjects", |c| c.subjects = vec!["orders.>".into()]),
            ("history", |c| c.max_messages_per_subject = 5),
            ("max_age (retention)", |c| {
                c.max_age = Duration::from_secs(60)
            }),
            ("replicas", |c| c.num_replicas = 1),
            ("allow_direct (reads from followers)", |c| {
                c.allow_direct = true
            }),
            ("storage", |c| c.storage = StorageType::Memory),
        ];
        for (setting, spoil) in cases {
            let mut found = stream_config(&r3, 0);
            spoil(&mut found);
            assert_eq!(setting_refused(&r3, &found), Some(setting));
        }
    }
}
