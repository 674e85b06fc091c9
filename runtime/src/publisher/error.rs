//! The errors of the producer side.

use std::time::Duration;

use crate::BoxError;
use crate::subject::SubjectError;

/// Why a message was not confirmed by the broker.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The subject cannot be published to (empty, wildcards, spaces, …).
    #[error("cannot publish to {subject:?}: {source}")]
    InvalidSubject {
        /// The subject.
        subject: String,
        /// What is wrong with it.
        source: SubjectError,
    },
    /// Payload and headers exceed the server's `max_payload`.
    #[error(
        "the message is {size} bytes, over the server's max_payload of {max} bytes: split it or store it elsewhere"
    )]
    PayloadTooLarge {
        /// Payload plus headers.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// No stream captures the subject: the message would never be stored.
    #[error(
        "no JetStream stream captures {subject:?}: create one, or publish to a subject a stream covers"
    )]
    NoStream {
        /// The subject.
        subject: String,
    },
    /// The stream's duplicate window is shorter than the publisher's retry
    /// horizon: a late resend would be stored twice.
    #[error(
        "stream `{stream}` has a duplicate window of {window:?}, shorter than this publisher's retry horizon of \
         {horizon:?}: a resend after the window would be stored twice. Raise the stream's duplicate_window to at \
         least {horizon:?}, or lower PublisherConfig::deadline below {window:?}"
    )]
    DuplicateWindowTooShort {
        /// The stream.
        stream: String,
        /// Its duplicate window.
        window: Duration,
        /// The publisher's deadline.
        horizon: Duration,
    },
    /// The broker answered with an error a resend cannot fix.
    #[error("the broker refused message {message_id}: {source}")]
    Rejected {
        /// The message id.
        message_id: String,
        /// The broker's answer.
        source: BoxError,
    },
    /// No PubAck before the deadline, after resending with the same id.
    ///
    /// The outcome is **unknown**, not failed: the broker may have stored
    /// the message and its PubAck been lost, and a copy the client queued
    /// while disconnected is sent when the connection comes back — possibly
    /// after the deadline. Resend it with the same id (the stream's
    /// duplicate window drops a second copy inside the window), or keep it
    /// in an `Outbox`, which does so.
    #[error(
        "message {message_id}: outcome unknown — not confirmed within {waited:?} ({attempts} attempts, all \
         with the same Nats-Msg-Id); the broker may have stored it, or store a copy still queued in the \
         client once it reconnects: resend with the same id rather than a new one; last error: {last_error}"
    )]
    DeadlineExceeded {
        /// The message id.
        message_id: String,
        /// How many times it was sent.
        attempts: u32,
        /// How long the publisher tried.
        waited: Duration,
        /// The last attempt's error.
        last_error: BoxError,
    },
    /// The value could not be serialized (`publish_json`).
    #[error("could not serialize the message as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

crate::error::debug_as_report!(PublishError);
