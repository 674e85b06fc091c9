//! The fault-injection suite of idem, in the spirit of Jepsen's analysis of
//! JetStream: real worker processes and real `nats-server`s, faults drawn
//! from a seed, and a ground-truth ledger of every execution of every
//! effect, checked against the guarantees of `docs/guarantees.md` when the
//! stream has drained.
//!
//! * [`order`] — the messages and the three handlers (`kv`, `transactional`,
//!   `off`) that the worker binary runs;
//! * [`ledger`] — the effect log: one PostgreSQL row per execution, with no
//!   unique constraint, so it records what deduplication let through;
//! * [`workload`] and [`schedule`] — what the driver publishes and which
//!   faults it injects when, both derived from the seed alone;
//! * [`deploy`] — servers, proxies and worker processes, and the faults
//!   applied to them;
//! * [`operator`] — the operator's turn once the faults healed: a fix and
//!   two concurrent replays of the permanent failures' dead letters, and
//!   forgotten keys sent again;
//! * [`check`] — the invariants, evaluated on the ledger, the dead letters,
//!   the workers' logs and the stream.
//!
//! Run `cargo run -p idem-faults -- --help`.

pub mod check;
pub mod cli;
pub mod deploy;
pub mod evidence;
pub mod ledger;
pub mod operator;
pub mod order;
pub mod report;
pub mod run;
pub mod schedule;
pub mod worker;
pub mod workload;
