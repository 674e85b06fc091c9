//! Why the runtime could not start (or had to stop).

use crate::BoxError;
use crate::handler::ConfigError;
use crate::store::StoreError;

/// A start-up failure, naming the handler and what to do.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A handler's configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Two handlers share a durable consumer.
    #[error(
        "handlers `{first}` and `{second}` both use consumer `{consumer}` on stream `{stream}`: give one a `consumer = \"…\"`"
    )]
    DuplicateConsumer {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
        /// One handler.
        first: String,
        /// The other.
        second: String,
    },
    /// Two handlers in one runtime have the same name: they would share
    /// claims (one's keys answered as the other's duplicates) and stats.
    #[error(
        "two handlers are named `{handler}` (streams `{first_stream}` and `{second_stream}`): handler names \
         are identities — claims, consumers and stats are keyed by them; give one a `name = \"…\"`"
    )]
    DuplicateHandler {
        /// The name.
        handler: String,
        /// The first handler's stream.
        first_stream: String,
        /// The second handler's stream.
        second_stream: String,
    },
    /// Another handler uses the same name in the same claim bucket — for
    /// another stream or consumer, or another service or endpoint: their
    /// claims would mix.
    #[error(
        "handler `{handler}` is registered in claim bucket `{bucket}` for {registered} — \
         another handler, whose claims would mix with this one's: give this handler another \
         `name = \"…\"`, or give each service its own bucket (`.claims(KvStoreConfig::default().bucket(…))`)"
    )]
    HandlerNameTaken {
        /// The name.
        handler: String,
        /// The bucket.
        bucket: String,
        /// What it is registered for.
        registered: super::name_registry::Registered,
    },
    /// A new consumer would start on a stream that already holds messages
    /// for it, without the handler saying where to start: a renamed handler
    /// would replay its stream.
    #[error(
        "handler `{handler}` has no consumer on stream `{stream}` yet, and the stream holds {messages} message(s) \
         it would handle: if the handler was renamed, keep its identity with `name = \"<old name>\"`; \
         otherwise choose where the new consumer starts: `start = all`, `start = new` or `start = <sequence>`"
    )]
    NewConsumerWouldReplay {
        /// The handler.
        handler: String,
        /// The stream.
        stream: String,
        /// The consumer it would create.
        consumer: String,
        /// How many messages it would handle.
        messages: u64,
    },
    /// The stream does not exist and the runtime may not create it.
    #[error(
        "stream `{stream}` (handler `{handler}`) does not exist: create it, or let the runtime do so with \
         `Runtime::builder(client).create_missing_streams()`"
    )]
    StreamMissing {
        /// The stream.
        stream: String,
        /// The handler.
        handler: String,
    },
    /// An existing durable consumer was made with other settings.
    #[error(
        "consumer `{consumer}` on stream `{stream}` exists with {setting} = {found}, but handler `{handler}` needs \
         {expected}: delete the consumer or name another with `consumer = \"…\"`"
    )]
    ConsumerConflict {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
        /// The handler.
        handler: String,
        /// The setting.
        setting: &'static str,
        /// What the consumer has.
        found: String,
        /// What the handler needs.
        expected: String,
    },
    /// No stream stores the dead-letter subject: dead letters could not be
    /// kept, so messages could not be given up safely.
    #[error(
        "no stream captures dead-letter subject `{subject}` (handler `{handler}`): add it to a stream, \
         or use a subject under `idem.dead.>` which the runtime provisions"
    )]
    DeadLetterUncovered {
        /// The subject.
        subject: String,
        /// The handler.
        handler: String,
    },
    /// `dedup = transactional` without idem's `postgres` feature.
    #[error("handler `{handler}` uses `dedup = transactional`: enable idem's `postgres` feature")]
    TransactionalUnsupported {
        /// The handler.
        handler: String,
    },
    /// `dedup = transactional` without a database on the builder.
    #[error(
        "handler `{handler}` uses `dedup = transactional` but the runtime has no database: \
         add `.postgres(pool, schema)` to the builder"
    )]
    PostgresMissing {
        /// The handler.
        handler: String,
    },
    /// The dedup store could not be opened.
    #[error("handler `{handler}`: {source}")]
    Store {
        /// The handler.
        handler: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// JetStream refused or did not answer a provisioning request.
    #[error("handler `{handler}`: could not {action}: {source}")]
    JetStream {
        /// The handler.
        handler: String,
        /// What was attempted.
        action: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// No handler was registered.
    #[error("no handlers registered: add one with `.handler(name)`")]
    NoHandlers,
    /// A handler takes `State<T>` (or `Tx`) that the runtime does not
    /// provide: every message would be dead-lettered `missing_state`.
    #[error("handler `{handler}` takes {type_name}, which the runtime does not provide: {remedy}")]
    MissingState {
        /// The handler.
        handler: String,
        /// The state's type.
        type_name: &'static str,
        /// What to do about it.
        remedy: &'static str,
    },
    /// A handler's durable consumer (or its stream) was deleted while the
    /// runtime ran: it stopped rather than pull from nothing.
    #[error(
        "handler `{handler}`: consumer `{consumer}` on stream `{stream}` no longer exists (deleted while running);          the runtime stopped: restart it to provision the consumer again"
    )]
    ConsumerGone {
        /// The handler.
        handler: String,
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
    },
    /// A handler's worker task ended abnormally (a panic in the runtime).
    #[error("handler `{handler}`: its worker stopped abnormally: {reason}")]
    WorkerFailed {
        /// The handler.
        handler: String,
        /// What happened.
        reason: String,
    },
    /// The server refused a publish or subscription the handler needs: the
    /// account lacks a permission (see docs/permissions.md).
    #[error(
        "handler `{handler}`: the server refused to let this connection {operation} {subject:?}: \
         grant it in the account's permissions (docs/permissions.md lists what a worker needs), \
         or provision with an admin (`RuntimeBuilder::provision`, `idem provision`)"
    )]
    PermissionDenied {
        /// The handler.
        handler: String,
        /// What was refused.
        operation: crate::permissions::Operation,
        /// The subject.
        subject: String,
    },
    /// A request/reply handler's service or endpoint could not be started
    /// (e.g. a version that is not semver, or no permission to subscribe to
    /// the endpoint's subject).
    #[error("handler `{handler}`: its service endpoint could not start: {reason}")]
    ServiceFailed {
        /// The handler.
        handler: String,
        /// What the client library said.
        reason: String,
    },
}

crate::error::debug_as_report!(RuntimeError);

impl RuntimeError {
    /// Whether trying again may cure it: the dedup store or JetStream did
    /// not answer (as opposed to answering with an error) (a server restarting, a cluster electing
    /// leaders). Start-up retries these for a while; everything else is a
    /// configuration to fix.
    ///
    /// ```
    /// use idem::consumer::RuntimeError;
    ///
    /// assert!(!RuntimeError::NoHandlers.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            RuntimeError::Store {
                source: StoreError::Unavailable { .. },
                ..
            } => true,
            RuntimeError::JetStream { source, .. } => unanswered(source.as_ref()),
            _ => false,
        }
    }
}

/// Whether the server never answered: no JetStream API error (the server's
/// considered "no") among the causes — a timeout, no responders, a broken
/// connection.
fn unanswered(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::server_error::codes(error).next().is_none()
}
