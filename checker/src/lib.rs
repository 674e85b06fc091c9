//! A model checker for idem's claim protocol.
//!
//! The model ([`model`]) plays two workers (three on demand), one dedup
//! store holding one record per key with revisions (create-if-absent, then
//! compare-and-set), the broker (messages redelivered until acknowledged or
//! terminated), dead letters, faults (a crash, a freeze, lost replies, lease
//! expiry, retention expiry) and the operator's tools (`idem keys forget`,
//! `idem dead replay`, a fix of the handler). Every decision is made by the
//! runtime's own functions — `idem::claim::decide`,
//! `idem::claim::operator::forget` and `idem::claim::operator::replay` —
//! through [`Rules`], so the model cannot drift from the code; the
//! [`Mutant`]s put fixed bugs back to show that the checker finds them.
//!
//! The [`properties`] are checked in every reachable state by stateright's
//! breadth-first search; a failure is printed as a readable trace
//! ([`trace`]), one line per action.
//!
//! Run it:
//!
//! ```text
//! cargo run --release -p idem-checker                       # the CI configuration
//! cargo run --release -p idem-checker -- --workers 3        # the larger one
//! cargo run --release -p idem-checker -- --mutant memory    # a known bug, found
//! ```
//!
//! Mutants: `released-any-payload`, `replay-ignores-fingerprint`, `memory`,
//! `forget-pending`, `replay-in-flight`. See `checker/README.md` for what is modelled and what
//! is abstracted.

pub mod check;
pub mod model;
pub mod properties;
pub mod rules;
pub mod state;
pub mod trace;

pub use check::{Report, Until, check};
pub use model::{Config, IdemModel};
pub use rules::{Mutant, Rules};
