//! Testing handlers: [`Driver`] runs your handler's deliveries through
//! claim, retry and dead-letter decisions on an in-memory store, with no
//! server at all; the rest of this module runs real servers.
//!
//! Real `nats-server` processes for tests: single servers and 3-node
//! clusters on loopback, each with a fresh temporary store, that a test can
//! kill (SIGKILL), stop (SIGTERM), pause (SIGSTOP), resume (SIGCONT) and
//! restart on the same port and store, and a TCP [`Proxy`] that cuts or
//! stalls the connection between a client and a server.
//!
//! Enabled by the `testing` feature. Everything started here is killed and
//! its directory removed on drop, also when a test panics.
//!
//! The binary is `IDEM_NATS_SERVER` if set, else the first `nats-server` on
//! `PATH`. When there is none, starting fails with an error that says how to
//! get one: tests never skip silently.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem::testing::NatsServer;
//!
//! let server = NatsServer::start().await?;
//! let js = async_nats::jetstream::new(server.connect().await?);
//! # Ok(()) }
//! ```

mod binary;
mod cluster;
pub mod conformance;
#[cfg(feature = "postgres")]
mod database;
mod driver;
mod error;
mod local;
mod ports;
mod proxy;
mod ready;
mod server;

pub use binary::NatsBinary;
pub use cluster::Cluster;
#[cfg(feature = "postgres")]
pub use database::{DEFAULT_DATABASE_URL, TestDatabase};
pub use driver::{Driver, Handled};
pub use error::HarnessError;
pub use local::{DEFAULT_URL, LocalNats};
pub use proxy::{Flow, Proxy};
pub use server::NatsServer;
