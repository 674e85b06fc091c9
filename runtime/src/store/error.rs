//! The errors of the store layer.

use std::fmt;
use std::time::Duration;

use crate::claim::RecordError;
use crate::key::RecordKey;

use crate::BoxError;

/// The store operation that failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOp {
    /// Creating a record (a fresh claim).
    Create,
    /// Reading a record.
    Read,
    /// A compare-and-set update.
    Update,
    /// Deleting a record.
    Delete,
    /// Creating or checking the bucket at start-up.
    Provision,
}

impl fmt::Display for StoreOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreOp::Create => "create a record",
            StoreOp::Read => "read a record",
            StoreOp::Update => "update a record",
            StoreOp::Delete => "delete a record",
            StoreOp::Provision => "provision the bucket",
        })
    }
}

/// What went wrong in a dedup store. Whatever it is, the handler must not run
/// for the message at hand (fail closed): NAK it with a backoff.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer, or answered with an error: disconnected,
    /// timed out, no JetStream, no quorum. (What follows for the handler is
    /// the caller's to say: a claim that fails means it does not run, a
    /// completion that fails is retried after it ran.)
    #[error("the dedup store could not {op}: {source}")]
    Unavailable {
        /// What was attempted.
        op: StoreOp,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// A record exists but cannot be read; it is left untouched.
    #[error("the claim record at `{key}` cannot be read ({source}); it is left as it is")]
    Corrupt {
        /// The record's key.
        key: RecordKey,
        /// Why it does not decode.
        #[source]
        source: RecordError,
    },
    /// The bucket exists with settings idem cannot work with.
    #[error(
        "the KV bucket `{bucket}` exists with {setting} = {found}, but this store needs {expected}: \
         delete the bucket (`nats kv rm {bucket}`) or configure another bucket name"
    )]
    IncompatibleBucket {
        /// The bucket.
        bucket: String,
        /// The setting that differs.
        setting: &'static str,
        /// What the bucket has.
        found: String,
        /// What the configuration asks for.
        expected: String,
    },
    /// The server release has a known compare-and-set defect for this
    /// configuration: claims could be won twice.
    #[error("nats-server {version} cannot be trusted with claims: {reason}")]
    UnsupportedServer {
        /// The version the server reported.
        version: String,
        /// The defect, where it was reported, and the way out.
        reason: &'static str,
    },
    /// The schema name cannot be used (PostgreSQL store).
    #[error(
        "invalid schema name {name:?}: use lower-case letters, digits and '_', starting with a letter or '_'"
    )]
    InvalidSchemaName {
        /// The name given.
        name: String,
    },
    /// The schema has no `idem_inbox` table (PostgreSQL store).
    #[error(
        "schema `{schema}` has no idem_inbox table: run `PgStore::migrate(&pool, \"{schema}\")` (or apply \
         idem's migrations by hand) with a role that may create tables there"
    )]
    SchemaMissing {
        /// The schema.
        schema: String,
    },
    /// The schema lacks a table of a newer idem migration (PostgreSQL
    /// store).
    #[error(
        "schema `{schema}` has no {table} table: idem's newer migrations are not applied; run \
         `PgStore::migrate(&pool, \"{schema}\")` (or `RuntimeBuilder::provision`, or apply idem's \
         migrations by hand)"
    )]
    SchemaOutdated {
        /// The schema.
        schema: String,
        /// The missing table.
        table: &'static str,
    },
    /// The database role may not do what idem needs in the schema.
    #[error(
        "the database role may not {action} in schema `{schema}` ({detail}): grant it (e.g. `GRANT CREATE, USAGE \
         ON SCHEMA {schema} TO <role>` and table privileges), or run the migrations as an owner"
    )]
    PermissionDenied {
        /// The schema.
        schema: String,
        /// What was refused.
        action: &'static str,
        /// PostgreSQL's message.
        detail: String,
    },
    /// The bucket name cannot be used.
    #[error("invalid KV bucket name {name:?}: use letters, digits, '-' and '_'")]
    InvalidBucketName {
        /// The name given.
        name: String,
    },
    /// The retention is too short to be safe.
    #[error(
        "a retention of {retention:?} is too short: it must be at least {minimum:?} and longer than \
         any lease, or records vanish while their work is in flight"
    )]
    RetentionTooShort {
        /// The retention asked for.
        retention: Duration,
        /// The shortest allowed.
        minimum: Duration,
    },
    /// A lease as long as the retention: the record could expire while its
    /// owner still works, and a second worker would then run the handler.
    #[error(
        "a lease of {lease:?} is not shorter than the store's retention of {retention:?}: \
         shorten the lease or lengthen the retention"
    )]
    LeaseTooLong {
        /// The lease asked for.
        lease: Duration,
        /// The store's retention.
        retention: Duration,
    },
}

crate::error::debug_as_report!(StoreError);

impl StoreError {
    pub(crate) fn unavailable(op: StoreOp, source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable {
            op,
            source: source.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_does_not_say_what_happened_to_the_handler() {
        // A completion's failure comes after the handler ran: the message
        // must not claim it did not (the caller says what follows).
        let failed = StoreError::unavailable(StoreOp::Update, "timed out");
        assert!(!failed.to_string().contains("not run"), "{failed}");
    }
}
