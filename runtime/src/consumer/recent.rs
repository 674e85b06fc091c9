//! Keys this process completed recently, so that their duplicates are
//! answered without a round trip to the dedup store.
//!
//! Only what the store confirmed goes in: a completion this process
//! recorded (`done`, by compare-and-set). A `done` record never changes
//! state again until it expires, so remembering it is as good as reading
//! it — for as long as the record lives: an entry counts from the moment
//! the completion was *sent*, so it never outlives the record written after
//! it. A different payload under a remembered key is not answered here: it
//! goes to the store, which reports the conflict.

use std::time::Duration;

use quick_cache::sync::Cache;
use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::key::RecordKey;

/// A bounded, concurrent memory of completed keys.
pub(super) struct Recent {
    /// `None` when turned off (capacity 0).
    done: Option<Cache<RecordKey, (Option<Fingerprint>, Instant)>>,
    /// How long a record outlives its completion in the store.
    lifetime: Duration,
}

impl Recent {
    /// Remembers up to `capacity` keys, each for at most `lifetime`.
    pub(super) fn new(capacity: usize, lifetime: Duration) -> Self {
        Self {
            done: (capacity > 0).then(|| Cache::new(capacity)),
            lifetime,
        }
    }

    /// The store confirmed `key` done with `fingerprint`, by a write sent
    /// at `sent` (the record lives `lifetime` from its write, so at least
    /// that long from `sent`).
    pub(super) fn remember(
        &self,
        key: &RecordKey,
        fingerprint: Option<Fingerprint>,
        sent: Instant,
    ) {
        if let Some(done) = &self.done {
            done.insert(key.clone(), (fingerprint, sent));
        }
    }

    /// Whether `key` is known done with this very `fingerprint`.
    pub(super) fn is_done(&self, key: &RecordKey, fingerprint: Option<Fingerprint>) -> bool {
        let Some((stored, at)) = self.done.as_ref().and_then(|done| done.get(key)) else {
            return false;
        };
        stored == fingerprint && at.elapsed() < self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{HandlerName, IdempotencyKey};

    fn key(k: &str) -> RecordKey {
        let handler = HandlerName::new("h").expect("a valid handler name");
        RecordKey::new(&handler, &IdempotencyKey::new(k).expect("a valid key"))
    }

    fn fingerprint(payload: &[u8]) -> Option<Fingerprint> {
        Some(Fingerprint::of(payload))
    }

    #[test]
    fn a_remembered_key_with_the_same_payload_is_done() {
        let recent = Recent::new(16, Duration::from_secs(60));
        recent.remember(&key("a"), fingerprint(b"x"), Instant::now());
        assert!(recent.is_done(&key("a"), fingerprint(b"x")));
        assert!(!recent.is_done(&key("b"), fingerprint(b"x")), "never seen");
    }

    #[test]
    fn another_payload_is_left_to_the_store() {
        let recent = Recent::new(16, Duration::from_secs(60));
        recent.remember(&key("a"), fingerprint(b"x"), Instant::now());
        assert!(!recent.is_done(&key("a"), fingerprint(b"y")));
        assert!(!recent.is_done(&key("a"), None));
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_expires_with_the_record() {
        let recent = Recent::new(16, Duration::from_secs(60));
        recent.remember(&key("a"), fingerprint(b"x"), Instant::now());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!recent.is_done(&key("a"), fingerprint(b"x")));
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let recent = Recent::new(0, Duration::from_secs(60));
        recent.remember(&key("a"), fingerprint(b"x"), Instant::now());
        assert!(!recent.is_done(&key("a"), fingerprint(b"x")));
    }
}
