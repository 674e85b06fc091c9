//! # idem — exactly-once effects for NATS JetStream handlers
//!
//! JetStream delivers at least once: every lost acknowledgement turns into a
//! duplicate. idem gives message handlers exactly-once *effects* on top of
//! that: the producer resends with the same `Nats-Msg-Id` until the broker
//! confirms, and the consumer claims an idempotency key in a dedup store
//! before it runs the handler and records completion after it.
//!
//! The guarantees and the claim state machine are fixed in the project's
//! design notes; this crate grows into them issue by issue.
//!
//! ## Features
//!
//! * `testing` — [`testing`]: real `nats-server` processes and 3-node
//!   clusters for tests, which can be killed, paused and restarted.

pub use idem_macros::idempotent;

#[cfg(feature = "testing")]
pub mod testing;

pub mod claim;
pub mod clock;
pub mod fingerprint;
pub mod key;
pub mod store;
