//! Dead letters: the original message, stored on the handler's dead-letter
//! subject with the reason, before the original is terminated.

use async_nats::HeaderMap;
use async_nats::jetstream;

use crate::BoxError;
use crate::Delivery;
use crate::handler::{DeadLetterReason, HandlerConfig};

/// Headers every dead letter carries.
pub mod headers {
    /// The handler that gave up.
    pub const HANDLER: &str = "Idem-Handler";
    /// Why: a [`DeadLetterReason`](crate::handler::DeadLetterReason) as text.
    pub const REASON: &str = "Idem-Reason";
    /// The error's text (one line).
    pub const ERROR: &str = "Idem-Error";
    /// How many times the handler ran (its attempts, counted in the claim
    /// record; JetStream's delivery count where there is no record).
    pub const ATTEMPTS: &str = "Idem-Attempts";
    /// The original subject.
    pub const SUBJECT: &str = "Idem-Original-Subject";
    /// The original stream.
    pub const STREAM: &str = "Idem-Original-Stream";
    /// The original stream sequence.
    pub const SEQUENCE: &str = "Idem-Original-Sequence";
    /// The original `Nats-Msg-Id`, if any.
    pub const MESSAGE_ID: &str = "Idem-Original-Msg-Id";
    /// The claim record's key (handler and idempotency key, as the store
    /// keeps it), when the message had claimed one: what a replay clears.
    pub const KEY: &str = "Idem-Key";
    /// Where that record is: `kv:<bucket>` or `postgres:<schema>`.
    pub const STORE: &str = "Idem-Store";
    /// The fingerprint of the payload that held the record (hex), when the
    /// handler keeps fingerprints: what a replay compares with the record
    /// before it deletes a letter as applied.
    pub const FINGERPRINT: &str = "Idem-Fingerprint";
    /// Every header of idem's own starts with this. Headers a producer
    /// sent under it are removed before a dead letter is stored: only idem
    /// writes them, so they can steer an operator's replay.
    pub const PREFIX: &str = "Idem-";

    /// Whether a header name is in idem's namespace (`Idem-…`, any case:
    /// header names are case-insensitive on the wire).
    ///
    /// ```
    /// use idem::consumer::headers::is_idems;
    ///
    /// assert!(is_idems("Idem-Key") && is_idems("idem-store"));
    /// assert!(!is_idems("Idempotency-Key"));
    /// ```
    pub fn is_idems(name: &str) -> bool {
        starts_with_ignoring_case(name, PREFIX)
    }

    /// Whether a header name is one the NATS server acts on when a message
    /// is published (`Nats-Msg-Id`, `Nats-Expected-Stream`,
    /// `Nats-Expected-Last-*`, `Nats-TTL`, `Nats-Rollup`, …): a dead letter
    /// and a replayed copy carry none of the original's, or a producer's
    /// header could keep its letter from being stored, expire it, or make
    /// the replay fail.
    ///
    /// ```
    /// use idem::consumer::headers::is_server_directive;
    ///
    /// assert!(is_server_directive("Nats-Expected-Stream") && is_server_directive("nats-ttl"));
    /// assert!(!is_server_directive("traceparent"));
    /// ```
    pub fn is_server_directive(name: &str) -> bool {
        starts_with_ignoring_case(name, "Nats-")
    }

    fn starts_with_ignoring_case(name: &str, prefix: &str) -> bool {
        name.get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    }
}

/// The claim record a dead letter's message held, for its headers.
pub(crate) struct Record<'a> {
    /// The record key.
    pub(crate) key: &'a crate::key::RecordKey,
    /// Where the record is ([`headers::STORE`]).
    pub(crate) store: crate::store::StoreLocation,
    /// The fingerprint of the payload that held it.
    pub(crate) fingerprint: Option<crate::fingerprint::Fingerprint>,
    /// The claim's revision when the letter was sent: one letter id per
    /// claim, so a letter of a later claim of the same original (after a
    /// replay reopened its key) is not dropped as a duplicate of this one.
    pub(crate) revision: u64,
}

/// Why a message is dead-lettered, with the error for `Idem-Error`.
pub(crate) struct Reason<'a> {
    /// The `Idem-Reason` value.
    pub(crate) code: DeadLetterReason,
    /// The error, for `Idem-Error`.
    pub(crate) error: &'a (dyn std::fmt::Display + Sync),
}

/// Stores the dead letter and waits for the broker's acknowledgement. Its
/// message id is derived from the original's stream position, so a retry
/// after a lost PubAck is dropped by the duplicate window.
pub(crate) async fn publish(
    js: &jetstream::Context,
    config: &HandlerConfig,
    delivery: &Delivery,
    reason: Reason<'_>,
    attempts: u32,
    record: Option<Record<'_>>,
) -> Result<(), BoxError> {
    let mut out = original_headers(delivery.headers());
    if let Some(id) = delivery.message_id() {
        out.insert(headers::MESSAGE_ID, id);
    }
    if let Some(record) = &record {
        out.insert(headers::KEY, record.key.as_str());
        out.insert(headers::STORE, record.store.to_string().as_str());
        if let Some(fingerprint) = record.fingerprint {
            out.insert(headers::FINGERPRINT, fingerprint.to_string().as_str());
        }
    }
    out.insert(headers::HANDLER, config.name.as_str());
    out.insert(headers::REASON, reason.code.as_str());
    out.insert(headers::ERROR, one_line(&reason.error.to_string()).as_str());
    out.insert(headers::ATTEMPTS, attempts.to_string().as_str());
    out.insert(headers::SUBJECT, delivery.subject());
    out.insert(headers::STREAM, delivery.stream());
    out.insert(
        headers::SEQUENCE,
        delivery.stream_sequence().to_string().as_str(),
    );
    let id = letter_id(
        &config.name,
        delivery.stream(),
        delivery.stream_sequence(),
        record.as_ref().map(|r| r.revision),
    );
    out.insert(crate::MSG_ID_HEADER, id.as_str());
    js.publish_with_headers(config.dead_letter.clone(), out, delivery.payload().clone())
        .await?
        .await?;
    Ok(())
}

/// The original's headers a dead letter keeps: all but those the server
/// acts on (its message id — the letter has its own —, expectations, TTLs,
/// rollups) and any in idem's namespace — a producer's `Idem-Key` or
/// `Idem-Store` would otherwise point an operator's replay at another
/// message's record.
fn original_headers(original: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in original.iter() {
        let name_str: &str = name.as_ref();
        if headers::is_server_directive(name_str) || headers::is_idems(name_str) {
            continue;
        }
        for value in values {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// A dead letter's message id: derived from the original's stream position
/// (a resend after a lost PubAck is dropped by the duplicate window) and,
/// when the message held a claim, the claim's revision — so the letter of a
/// later claim of the same original is stored too.
fn letter_id(handler: &str, stream: &str, sequence: u64, revision: Option<u64>) -> String {
    match revision {
        Some(revision) => format!("idem-dead-{handler}-{stream}-{sequence}-{revision}"),
        None => format!("idem-dead-{handler}-{stream}-{sequence}"),
    }
}

/// Header values are one line: control characters become spaces, and very
/// long texts are cut (the payload is kept whole).
fn one_line(text: &str) -> String {
    const MAX: usize = 1024;
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producers_idem_headers_are_not_kept_in_a_dead_letter() {
        let mut original = HeaderMap::new();
        original.insert("Idem-Key", "victim.k.order-1");
        original.insert("idem-store", "kv:idem_claims");
        original.insert("IDEM-Fingerprint", "00");
        original.insert("Nats-Expected-Stream", "ORDERS");
        original.insert("Nats-TTL", "1s");
        original.insert(crate::MSG_ID_HEADER, "m-1");
        original.insert("Traceparent", "00-abc-def-01");
        original.insert("Idempotency-Key", "order-1");
        let kept = original_headers(&original);
        let names: Vec<String> = kept.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(kept.iter().count(), 2, "{names:?}");
        assert!(kept.get("Traceparent").is_some());
        assert!(kept.get("Idempotency-Key").is_some(), "not idem's: kept");
    }

    #[test]
    fn every_claim_of_an_original_has_a_letter_id_of_its_own() {
        let handler = "ship";
        assert_ne!(
            letter_id(handler, "ORDERS", 7, Some(3)),
            letter_id(handler, "ORDERS", 7, Some(9))
        );
        assert_eq!(
            letter_id(handler, "ORDERS", 7, None),
            "idem-dead-ship-ORDERS-7"
        );
    }

    #[test]
    fn error_texts_become_one_bounded_line() {
        assert_eq!(one_line("a\nb\r\tc"), "a b  c");
        assert_eq!(one_line(&"x".repeat(2000)).chars().count(), 1025);
    }
}
