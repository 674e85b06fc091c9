//! Dedup stores: where claims live.
//!
//! [`DedupStore`] is what the consumer runtime talks to. [`CasStore`] runs the
//! claim state machine over any [`RevisionedMap`] — a key-value map with
//! revisions and compare-and-set — so that [`KvStore`] (JetStream Key-Value)
//! and [`MemoryStore`] (in-process, for tests) share one implementation of
//! the rules and differ only in where the bytes go.
//!
//! Every error is a [`StoreError`]; the caller maps any of them to "do not run
//! the handler" (fail closed).

mod cas;
mod error;
mod kv;
mod location;
mod memory;
#[cfg(feature = "postgres")]
mod pg;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

pub use cas::{CasStore, Create, RevisionedMap, Write};
pub use error::{StoreError, StoreOp};
pub use kv::{KvBucket, KvStore, KvStoreConfig, MIN_RETENTION};
pub use location::{StoreLocation, UnknownStore};
pub use memory::{MemoryMap, MemoryStore};
#[cfg(feature = "postgres")]
pub(crate) use pg::inbox::{
    IGNORED_FAILED_STATEMENT, SealError, TxInbox, failed_for_another, met_lock_conflict,
    waited_too_long,
};
#[cfg(feature = "postgres")]
pub(crate) use pg::migrated_schema;
#[cfg(feature = "postgres")]
pub use pg::{MIGRATOR, PgMap, PgStore};

use crate::claim::operator::Written;

/// How a transaction of `dedup = transactional` stands to group commit's
/// transactions, which hold the rows of many messages in no one order and
/// so can meet each other — or a message's own transaction — in a deadlock
/// that no handler alone would meet. Groups share the schema's group lock;
/// a message run again after such a lock conflict takes it alone, so that
/// no group runs beside it; every other transaction ignores it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    not(feature = "postgres"),
    expect(dead_code, reason = "transactional only")
)]
pub(crate) enum GroupLock {
    /// Neither taken nor waited for.
    Ignored,
    /// A group's transaction: beside other groups, never beside a message
    /// that holds the lock alone.
    Shared,
    /// A message run again after a lock conflict: beside no group.
    Exclusive,
}
use crate::claim::{Claim, ClaimOutcome, Owner, Snapshot, Transition};
use crate::fingerprint::Fingerprint;
use crate::key::RecordKey;

/// The store the consumer runtime claims keys in.
///
/// Every call that changes a record is a compare-and-set on the revision the
/// caller's [`Claim`] carries: a worker that lost its lease gets
/// [`Transition::LeaseLost`] and changes nothing.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use idem::claim::{ClaimOutcome, Transition};
/// use idem::fingerprint::Fingerprint;
/// use idem::key::{HandlerName, IdempotencyKey, RecordKey};
/// use idem::store::{DedupStore, MemoryStore};
///
/// let store = MemoryStore::new(Duration::from_secs(3600));
/// let key = RecordKey::new(&HandlerName::new("cards")?, &IdempotencyKey::new("payment-1")?);
/// let payload = Some(Fingerprint::of(b"{\"payment\":1}"));
///
/// let ClaimOutcome::Claimed(claim) = store.claim(&key, payload, Duration::from_secs(30)).await? else {
///     unreachable!("a fresh key is free");
/// };
/// // … run the handler, then record completion with its result:
/// assert_eq!(store.complete(&claim, Some("card-7".into())).await?, Transition::Applied);
///
/// // A redelivery is a duplicate and gets the stored result back.
/// let again = store.claim(&key, payload, Duration::from_secs(30)).await?;
/// assert_eq!(again, ClaimOutcome::Duplicate { result: Some("card-7".into()) });
/// # Ok(()) }
/// ```
pub trait DedupStore: Send + Sync + 'static {
    /// The identity this handle writes into records.
    fn owner(&self) -> Owner;

    /// Claims `key` for a lease of `lease`, or says why not.
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// Records completion, with the handler's result to hand to duplicates.
    fn complete(
        &self,
        claim: &Claim,
        result: Option<Bytes>,
    ) -> impl Future<Output = Result<Transition, StoreError>> + Send;

    /// Gives the claim back after a retryable failure, so that the next
    /// delivery can claim it at once.
    fn release(&self, claim: &Claim)
    -> impl Future<Output = Result<Transition, StoreError>> + Send;

    /// Marks the key dead after its message was dead-lettered.
    fn mark_dead(
        &self,
        claim: &Claim,
    ) -> impl Future<Output = Result<Transition, StoreError>> + Send;

    /// Extends the lease by the claim's lease length from now; updates the
    /// claim's revision and deadline when applied.
    fn renew(
        &self,
        claim: &mut Claim,
    ) -> impl Future<Output = Result<Transition, StoreError>> + Send;

    /// Reads the record of `key`, if any.
    fn inspect(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;

    /// Deletes the record of `key` if it is still at `revision` (an
    /// operator's tool, `idem keys forget`: the key can then be processed
    /// again). Decide first with [`operator::forget`](crate::claim::operator::forget):
    /// a pending key's owner may be running the handler.
    fn forget(
        &self,
        key: &RecordKey,
        revision: u64,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;

    /// Makes the key its payload's again for a replay (`idem dead replay`,
    /// [`Replay::Reopen`](crate::claim::operator::Replay::Reopen)): the
    /// [`reopened`](crate::claim::operator::reopened) record written over
    /// `found` (a `dead` or `released` record) by a compare-and-set on its
    /// revision, or — `found` being `None` — created for `fingerprint`.
    /// Only that payload can claim it then; another is still a key
    /// conflict. [`Written::Moved`] if the record is no longer what was
    /// read (on PostgreSQL the write first waits for a worker's
    /// uncommitted claim of the key).
    fn reopen(
        &self,
        key: &RecordKey,
        found: Option<&Snapshot>,
        fingerprint: Option<Fingerprint>,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;
}
