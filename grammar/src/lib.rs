//! The text rules `#[idempotent]` checks on literals at compile time and the
//! runtime checks on values made at run time — NATS subjects and durations —
//! kept in one place so that the two can never disagree. Used through
//! `idem::subject` and `idem::duration`; no dependencies but `humantime`.

pub mod duration;
pub mod subject;
