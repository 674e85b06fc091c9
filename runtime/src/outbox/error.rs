//! The errors of the durable outbox.

use std::path::PathBuf;

use crate::BoxError;
use crate::subject::SubjectError;

/// Why a message could not be put in the outbox.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// Another outbox (in this or another process) has the file open.
    #[error(
        "the outbox file {path} is open in another outbox (this or another process): one file per producer"
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be read or written.
    #[error("the outbox file {path} failed: {source}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// The storage error.
        source: BoxError,
    },
    /// The outbox holds `capacity` unconfirmed messages and is configured to
    /// refuse more.
    #[error(
        "the outbox is full ({capacity} unconfirmed messages): the broker is not keeping up or unreachable"
    )]
    Full {
        /// The configured capacity.
        capacity: usize,
    },
    /// The subject cannot be published to.
    #[error("cannot publish to {subject:?}: {source}")]
    InvalidSubject {
        /// The subject.
        subject: String,
        /// What is wrong with it.
        source: SubjectError,
    },
    /// Payload and headers exceed the server's `max_payload`.
    #[error("the message is {size} bytes, over the server's max_payload of {max} bytes")]
    PayloadTooLarge {
        /// Payload plus headers.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// The PostgreSQL outbox's table could not be read or written.
    #[error("the outbox table {table} failed: {source}")]
    Database {
        /// The table.
        table: String,
        /// The store error.
        source: crate::store::StoreError,
    },
    /// The outbox was closed.
    #[error("the outbox is closed")]
    Closed,
}

crate::error::debug_as_report!(OutboxError);
