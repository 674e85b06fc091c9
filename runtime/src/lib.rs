//! # idem — exactly-once effects for NATS JetStream handlers
//!
//! JetStream delivers at least once: every lost acknowledgement turns into a
//! duplicate. idem gives message handlers exactly-once *effects* on top of
//! that: the producer resends with the same `Nats-Msg-Id` until the broker
//! confirms, and the consumer claims an idempotency key in a dedup store
//! before it runs the handler and records completion after it.
//!
//! ```
//! use idem::{idempotent, HandlerError, Json, Retry, State};
//!
//! #[derive(serde::Deserialize)]
//! struct PaymentSucceeded { payment_id: uuid::Uuid, user_id: u64 }
//!
//! #[derive(Clone)]
//! struct Cards;
//!
//! #[idempotent(
//!     stream = "PAYMENTS",
//!     subject = "payments.succeeded",
//!     key = payment.payment_id,
//!     retry = Retry::exponential("200ms", "30s").attempts(8).jitter(),
//!     dead_letter = "payments.dead",
//! )]
//! async fn issue_membership_card(
//!     Json(payment): Json<PaymentSucceeded>,
//!     State(cards): State<Cards>,
//! ) -> Result<(), HandlerError> {
//!     let _ = (payment.user_id, cards);
//!     Ok(())
//! }
//! ```
//!
//! ## Modules
//!
//! * [`handler`] — what the attribute generates ([`Handler`]) and the steps
//!   before a claim; [`extract`] — the argument extractors.
//! * [`claim`], [`store`] — the claim state machine and the dedup stores.
//! * [`consumer`] — the [`Runtime`] that runs handlers (stream consumers and
//!   request/reply endpoints), its stats, health and provisioning;
//!   [`reply`] — what request/reply endpoints answer with when it is not a
//!   result.
//! * [`publisher`] — [`Publisher`] (resend until confirmed) and the
//!   [`Requester`](publisher::Requester) of request/reply; [`outbox`] — the
//!   crash-safe local and PostgreSQL outboxes.
//! * [`retry`] — retry policies; [`key`], [`fingerprint`] — keys and
//!   payload fingerprints; [`subject`], [`duration`], [`clock`] — the
//!   small rules they are built on.
//! * [`permissions`] — permission violations named as such; [`trace`] —
//!   trace context across the broker.
//! * `tx` (feature `postgres`) — `Tx`, the transaction a `dedup =
//!   transactional` handler runs in.
//! * `testing` (feature `testing`) — a server-free `Driver` for your
//!   handlers, and real servers for integration tests.
//!
//! ## Features
//!
//! * `testing` — [`testing`]: real `nats-server` processes and 3-node
//!   clusters for tests, which can be killed, paused and restarted; the
//!   dedup-store conformance suite.
//! * `postgres` — `dedup = transactional`, [`Tx`], the PostgreSQL dedup
//!   store and outbox (sqlx).
//! * `metrics` — counters and latency histograms through the `metrics`
//!   facade.
//! * `opentelemetry` — W3C trace context across the broker ([`trace`]).

pub use idem_macros::idempotent;

pub mod claim;
pub mod clock;
pub mod consumer;
mod delivery;
pub mod delivery_core;
pub mod duration;
mod error;
pub mod extract;
mod fence;
pub mod fingerprint;
pub mod handler;
pub mod key;
pub mod outbox;
pub mod permissions;
pub mod publisher;
pub mod reply;
pub mod retry;
mod server_error;
pub mod store;
pub mod subject;
pub mod trace;
#[cfg(feature = "postgres")]
pub mod tx;

#[cfg(feature = "testing")]
pub mod testing;

pub use consumer::Runtime;
pub use delivery::{Delivery, MSG_ID_HEADER};
pub use error::{BoxError, ErrorKind, HandlerError, ResultExt};
pub use extract::{Json, State};
pub use fence::Fence;
pub use handler::Handler;
pub use publisher::Publisher;
pub use retry::Retry;
#[cfg(feature = "postgres")]
pub use tx::Tx;

/// What `#[idempotent]` expansions refer to. Not a public API: paths here
/// change without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::Delivery;
    pub use crate::fingerprint::Fingerprint;
    pub use crate::handler::{
        Dedup, FingerprintSource, Handler, HandlerConfig, OnMissingKey, StartAt,
    };
    pub use crate::key::{IdempotencyKey, KeyError, ToKey, from_header, from_message_id, to_key};
    pub use crate::{HandlerError, Retry};
    pub use bytes::Bytes;
    pub use serde_json::Error as SerdeJsonError;
    pub use std::time::Duration;

    /// The key of a `dedup = off` handler without one, for logs: the
    /// producer's message id, else the stream position.
    pub fn delivery_key(delivery: &Delivery) -> Result<IdempotencyKey, KeyError> {
        match delivery.message_id() {
            Some(id) => IdempotencyKey::new(id),
            None => IdempotencyKey::new(format!(
                "{}:{}",
                delivery.stream(),
                delivery.stream_sequence()
            )),
        }
    }

    /// The fingerprint of a custom `fingerprint = <expr>`.
    pub fn fingerprint_of<K: ToKey + ?Sized>(value: &K) -> Result<Option<Fingerprint>, KeyError> {
        let key = to_key(value)?;
        Ok(Some(Fingerprint::of(key.as_bytes())))
    }

    /// The stored form of a handler's `Ok` value (`store_result`): it must
    /// serialize now and deserialize when a duplicate asks for it.
    pub fn encode_result<T: serde::Serialize + serde::de::DeserializeOwned>(
        value: &T,
    ) -> Result<Option<Bytes>, serde_json::Error> {
        serde_json::to_vec(value).map(|v| Some(Bytes::from(v)))
    }

    /// What `on_duplicate = hook` calls: the stored result decoded as the
    /// handler's `Ok` type, handed to `hook`. A duplicate without a stored
    /// result (completed before `store_result` was turned on) does not call
    /// it; one whose result no longer decodes is a permanent failure, to be
    /// dead-lettered for an operator to see.
    pub async fn on_duplicate<T, F, Fut, E>(
        stored: Option<Bytes>,
        hook: F,
    ) -> Result<(), HandlerError>
    where
        T: serde::de::DeserializeOwned,
        F: FnOnce(T) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: Into<HandlerError>,
    {
        let Some(stored) = stored else {
            tracing::warn!(
                "a duplicate's key has no stored result (completed before store_result was on): on_duplicate not called"
            );
            return Ok(());
        };
        let previous = serde_json::from_slice(&stored).map_err(|source| {
            HandlerError::permanent(crate::handler::StoredResultUndecodable {
                target: std::any::type_name::<T>(),
                source,
            })
        })?;
        hook(previous).await.map_err(Into::into)
    }

    /// Converts the body's error into a `HandlerError`.
    pub fn into_handler_result<T, E: Into<HandlerError>>(
        result: Result<T, E>,
    ) -> Result<T, HandlerError> {
        result.map_err(Into::into)
    }
}
