//! The dedup store on JetStream Key-Value: the default.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::StorageType;
use async_nats::jetstream::{self};
use bytes::Bytes;

mod bucket;
mod server;

use super::{CasStore, Create, RevisionedMap, StoreError, StoreOp, Write};

/// The shortest retention a bucket may have.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);

/// Where and how claims are kept in JetStream KV. Defaults are safe: bucket
/// `idem_claims`, 7 days' retention, one replica, file storage, 5 s per store
/// call.
///
/// ```
/// use std::time::Duration;
/// use idem::store::KvStoreConfig;
///
/// let config = KvStoreConfig::default()
///     .bucket("payments_claims")
///     .retention(Duration::from_secs(30 * 24 * 3600))
///     .replicas(3);
/// assert_eq!(config.replica_count(), 3);
/// ```
#[derive(Clone, Debug)]
pub struct KvStoreConfig {
    bucket: String,
    retention: Duration,
    replicas: usize,
    storage: StorageType,
    op_timeout: Duration,
    shards: usize,
    shard_tags: Vec<String>,
}

impl Default for KvStoreConfig {
    fn default() -> Self {
        Self {
            bucket: "idem_claims".into(),
            retention: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
            storage: StorageType::File,
            op_timeout: Duration::from_secs(5),
            shards: 1,
            shard_tags: Vec::new(),
        }
    }
}

impl KvStoreConfig {
    /// The bucket name (letters, digits, `-`, `_`).
    pub fn bucket(mut self, name: impl Into<String>) -> Self {
        self.bucket = name.into();
        self
    }

    /// How long a record lives after its last write: duplicates are caught
    /// for this long after completion. The bucket's `max_age`.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Replicas of the bucket (1, 3 or 5 in a cluster).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// File (default: survives server restarts) or memory storage.
    pub fn storage(mut self, storage: StorageType) -> Self {
        self.storage = storage;
        self
    }

    /// How long one store call may take before it fails as unavailable.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Spreads the claims over `shards` buckets (default 1), each key in
    /// the one its hash picks: `<bucket>` and `<bucket>_shard1` …
    /// `<bucket>_shard<K-1>`. Each is a stream of its own, which the server
    /// writes independently and a cluster places on its own node (or
    /// nodes), so a deployment can grow past one node's memory and write
    /// rate; a node's loss costs the availability of its shards' keys (they
    /// fail closed), never correctness.
    ///
    /// The count is part of the layout: a bucket created with one count is
    /// refused with another ([`StoreError::IncompatibleBucket`], setting
    /// `shards`), because its keys would be looked up in the wrong shard.
    ///
    /// ```
    /// use idem::store::KvStoreConfig;
    ///
    /// let config = KvStoreConfig::default().shards(4).replicas(3);
    /// assert_eq!(config.shard_count(), 4);
    /// assert_eq!(config.shard_bucket(0), "idem_claims");
    /// assert_eq!(config.shard_bucket(3), "idem_claims_shard3");
    /// ```
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// Places shard `i` on the servers tagged `tags[i % tags.len()]` (a
    /// server's `server_tags`, e.g. one tag per node or availability zone)
    /// when it is created, so that the shards land on different nodes: a
    /// cluster otherwise places single-replica streams as it likes, often
    /// all on one node. Existing shards stay where they are.
    ///
    /// ```
    /// use idem::store::KvStoreConfig;
    ///
    /// let config = KvStoreConfig::default()
    ///     .shards(3)
    ///     .shard_tags(["az:a", "az:b", "az:c"]);
    /// assert_eq!(config.shard_tag(4), Some("az:b"));
    /// ```
    pub fn shard_tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.shard_tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// The placement tag of shard `index`, if tags were given.
    pub fn shard_tag(&self, index: usize) -> Option<&str> {
        match self.shard_tags.len() {
            0 => None,
            n => self.shard_tags.get(index % n).map(String::as_str),
        }
    }

    /// How many buckets the claims are spread over.
    pub fn shard_count(&self) -> usize {
        self.shards
    }

    /// The name of shard `index`'s bucket (shard 0 is the bucket itself).
    pub fn shard_bucket(&self, index: usize) -> String {
        if index == 0 {
            self.bucket.clone()
        } else {
            format!("{}_shard{index}", self.bucket)
        }
    }

    /// The bucket name.
    pub fn bucket_name(&self) -> &str {
        &self.bucket
    }

    /// The retention.
    pub fn retention_period(&self) -> Duration {
        self.retention
    }

    /// The replica count.
    pub fn replica_count(&self) -> usize {
        self.replicas
    }

    /// The storage type.
    pub fn storage_type(&self) -> StorageType {
        self.storage
    }
}

/// The JetStream KV [`RevisionedMap`]: `create` and `update` with an expected
/// revision, reads through `entry`, every call bounded by the configured
/// timeout.
#[derive(Clone, Debug)]
pub struct KvBucket {
    /// The bucket's name (its shards' base name).
    name: String,
    /// One store per shard; a key lives in the one [`shard_of`] picks.
    shards: Vec<kv::Store>,
    retention: Duration,
    op_timeout: Duration,
}

/// The dedup store on JetStream Key-Value.
///
/// ```no_run
/// # async fn demo(client: async_nats::Client) -> Result<(), idem::store::StoreError> {
/// use idem::store::{KvStore, KvStoreConfig};
///
/// let js = async_nats::jetstream::new(client);
/// let store = KvStore::open(&js, KvStoreConfig::default()).await?;
/// # Ok(()) }
/// ```
pub type KvStore = CasStore<KvBucket>;

impl KvStore {
    /// Opens the bucket, creating it when absent and refusing one whose
    /// settings differ from `config` ([`StoreError::IncompatibleBucket`]).
    ///
    /// Works on nats-server 2.9 and newer, except releases with a known
    /// compare-and-set defect for the configured replicas
    /// ([`StoreError::UnsupportedServer`]: replicated buckets need 2.9.21 or
    /// newer; 2.10.19 is refused). The check reads the version of the server
    /// the client is connected to; keep a cluster's nodes on one release.
    pub async fn open(js: &jetstream::Context, config: KvStoreConfig) -> Result<Self, StoreError> {
        if config.retention < MIN_RETENTION {
            return Err(StoreError::RetentionTooShort {
                retention: config.retention,
                minimum: MIN_RETENTION,
            });
        }
        let client = js.client();
        if client.server_info().version.is_empty() {
            // Not connected yet (a client made with
            // `retry_on_initial_connect`): a round trip waits for the
            // connection, and with it the server's INFO.
            tokio::time::timeout(config.op_timeout, client.flush())
                .await
                .map_err(|elapsed| StoreError::unavailable(StoreOp::Provision, elapsed))?
                .map_err(|e| StoreError::unavailable(StoreOp::Provision, e))?;
        }
        server::check(&client.server_info().version, config.replicas)?;
        let shards = bucket::open(js, &config).await?;
        Ok(CasStore::over(KvBucket {
            name: config.bucket_name().to_owned(),
            shards,
            retention: config.retention,
            op_timeout: config.op_timeout,
        }))
    }
}

impl KvStore {
    /// Opens an existing bucket as it is — its retention, replicas and
    /// shards read from the server — for tools such as the `idem` CLI that
    /// inspect the claims a runtime made; `Ok(None)` if there is no bucket
    /// of that name. Creates nothing.
    ///
    /// ```no_run
    /// # async fn demo(client: async_nats::Client) -> Result<(), idem::store::StoreError> {
    /// use idem::store::KvStore;
    ///
    /// let js = async_nats::jetstream::new(client);
    /// if let Some(store) = KvStore::open_existing(&js, "idem_claims").await? {
    ///     println!("{} shard(s)", store.map().shard_count());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn open_existing(
        js: &jetstream::Context,
        bucket: &str,
    ) -> Result<Option<Self>, StoreError> {
        match bucket::existing(js, bucket).await? {
            Some(config) => Self::open(js, config).await.map(Some),
            None => Ok(None),
        }
    }
}

/// The shard of `key` among `shards`: the first 8 bytes of its SHA-256, so
/// that every process, version and platform agrees.
fn shard_of(key: &str, shards: usize) -> usize {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let shards = u64::try_from(shards.max(1)).unwrap_or(1);
    usize::try_from(u64::from_be_bytes(first) % shards).unwrap_or(0)
}

impl KvBucket {
    /// The bucket's name, as [`KvStoreConfig::bucket`] gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many shards the bucket has.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The store of the shard that holds `key`.
    fn store(&self, key: &str) -> &kv::Store {
        let index = shard_of(key, self.shards.len());
        // `open` makes at least one shard; `shard_of` stays below their count.
        &self.shards[index.min(self.shards.len().saturating_sub(1))]
    }

    async fn bounded<T, E>(
        &self,
        op: StoreOp,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<Result<T, E>, StoreError> {
        tokio::time::timeout(self.op_timeout, call)
            .await
            .map_err(|elapsed| StoreError::unavailable(op, elapsed))
    }
}

/// Whether a write failed because the expected revision did not match: the
/// kind the client assigns, or the server's codes for it anywhere in the
/// error's sources (10071 on publish, 10164 on newer servers' KV paths,
/// which the client files under "other").
fn is_cas_conflict(error: &(dyn StdError + 'static)) -> bool {
    crate::server_error::codes(error).any(|code| {
        code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
            || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
    })
}

impl KvBucket {
    /// A write conditional on the key's revision; 0 means "absent".
    async fn write(
        &self,
        op: StoreOp,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Write, StoreError> {
        match self
            .bounded(op, self.store(key).update(key, value, revision))
            .await?
        {
            Ok(revision) => Ok(Write::Written(revision)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision || is_cas_conflict(&e) => {
                Ok(Write::Conflict)
            }
            Err(e) => Err(StoreError::unavailable(op, e)),
        }
    }

    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, StoreError> {
        self.bounded(StoreOp::Read, self.store(key).entry(key))
            .await?
            .map_err(|e| StoreError::unavailable(StoreOp::Read, e))
    }
}

impl RevisionedMap for KvBucket {
    /// A write expecting revision 0; when that fails, one read tells a live
    /// record (returned) from a delete marker left by `forget`, which is
    /// then written over with a CAS on the marker's revision (never a plain
    /// put: two claimers could both win, nats.rs#1301).
    async fn create(&self, key: &str, value: Bytes) -> Result<Create, StoreError> {
        if let Write::Written(revision) = self.write(StoreOp::Create, key, value.clone(), 0).await?
        {
            return Ok(Create::Created(revision));
        }
        match self.entry(key).await? {
            Some(entry) if entry.operation == Operation::Put => {
                Ok(Create::Exists(Some((entry.value, entry.revision))))
            }
            Some(marker) => match self
                .write(StoreOp::Create, key, value, marker.revision)
                .await?
            {
                Write::Written(revision) => Ok(Create::Created(revision)),
                Write::Conflict => Ok(Create::Exists(None)),
            },
            None => Ok(Create::Exists(None)),
        }
    }

    async fn read(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        let entry = self.entry(key).await?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| (e.value, e.revision)))
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<Write, StoreError> {
        self.write(StoreOp::Update, key, value, revision).await
    }

    /// A delete marker written only over `revision` (the server checks the
    /// subject's last sequence).
    async fn delete_at(&self, key: &str, revision: u64) -> Result<Write, StoreError> {
        match self
            .bounded(
                StoreOp::Delete,
                self.store(key).delete_expect_revision(key, Some(revision)),
            )
            .await?
        {
            Ok(()) => Ok(Write::Written(revision)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision || is_cas_conflict(&e) => {
                Ok(Write::Conflict)
            }
            Err(e) => Err(StoreError::unavailable(StoreOp::Delete, e)),
        }
    }

    fn retention(&self) -> Duration {
        self.retention
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    fn server_error(code: u64) -> jetstream::Error {
        let json =
            format!(r#"{{"code":400,"err_code":{code},"description":"wrong last sequence: 7"}}"#);
        serde_json::from_str(&json).expect("a JetStream API error")
    }

    #[test]
    fn keys_spread_over_every_shard_and_always_to_the_same_one() {
        let mut counts = [0usize; 4];
        for i in 0..4_000 {
            let key = format!("issue_card.order-{i}");
            let shard = shard_of(&key, 4);
            assert_eq!(shard, shard_of(&key, 4), "stable");
            counts[shard] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1_200).contains(&n)),
            "{counts:?}"
        );
        // Pinned: a change of the hash would move every deployed key.
        let pinned: Vec<usize> = (1..=3)
            .map(|i| shard_of(&format!("issue_card.order-{i}"), 4))
            .collect();
        assert_eq!(pinned, [1, 3, 2]);
        assert_eq!(shard_of("anything", 1), 0);
    }

    #[test]
    fn both_wrong_last_sequence_codes_mean_cas_lost_wherever_the_client_files_them() {
        for code in [10071, 10164] {
            // The client files 10071 as WrongLastRevision and 10164 as Other.
            let publish = PublishError::with_source(PublishErrorKind::Other, server_error(code));
            let update = kv::UpdateError::from(publish);
            assert!(is_cas_conflict(&update), "code {code}");
        }
        let unrelated = PublishError::with_source(PublishErrorKind::Other, server_error(10077));
        assert!(!is_cas_conflict(&kv::UpdateError::from(unrelated)));
        assert!(!is_cas_conflict(&kv::UpdateError::new(
            UpdateErrorKind::TimedOut
        )));
    }
}
