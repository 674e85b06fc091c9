//! The claim record: what the dedup store keeps per (handler, key), and its
//! versioned binary encoding.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Owner;
use crate::clock::UnixMillis;
use crate::fingerprint::Fingerprint;

/// The first byte of every encoded record. A worker refuses records of a
/// version it does not know (fail closed) instead of overwriting them.
pub const FORMAT_VERSION: u8 = 1;

/// Where a key is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimState {
    /// A worker runs the handler; nobody else may until `lease_until`.
    Pending {
        /// The end of the owner's lease.
        lease_until: UnixMillis,
    },
    /// The owner gave the claim back after a retryable failure; the next
    /// delivery may claim it. (A release is a CAS update to this state, never
    /// a delete: see docs/design.md on create-after-delete.)
    Released,
    /// The handler's effect happened and was recorded.
    Done,
    /// The message was dead-lettered; redeliveries are acknowledged.
    Dead,
}

/// One claim record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    /// The state.
    pub state: ClaimState,
    /// The worker that wrote the record last.
    pub owner: Owner,
    /// How many times the key has been claimed (1 for the first claim).
    pub attempt: u32,
    /// The fingerprint of the payload that claimed it, if the handler uses
    /// fingerprints.
    pub fingerprint: Option<Fingerprint>,
    /// The handler's stored result, for duplicates (`store_result`).
    pub result: Option<Bytes>,
    /// When the key was first claimed.
    pub created_at: UnixMillis,
    /// When the record was last written.
    pub updated_at: UnixMillis,
}

/// Why stored bytes are not a claim record.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Nothing stored.
    #[error("the record is empty")]
    Empty,
    /// Written by a newer (or foreign) version of idem.
    #[error(
        "the record has format version {0}, this idem reads version {FORMAT_VERSION}: \
         upgrade this worker, it will not overwrite records it cannot read"
    )]
    UnknownVersion(u8),
    /// The bytes do not decode.
    #[error("the record does not decode: {0}")]
    Malformed(#[source] postcard::Error),
}

crate::error::debug_as_report!(RecordError);

impl ClaimRecord {
    /// Encodes as `[FORMAT_VERSION] ++ postcard(record)`.
    ///
    /// ```
    /// use idem::claim::{ClaimRecord, ClaimState, Owner};
    /// use idem::clock::UnixMillis;
    ///
    /// let record = ClaimRecord {
    ///     state: ClaimState::Done,
    ///     owner: Owner::random(),
    ///     attempt: 1,
    ///     fingerprint: None,
    ///     result: None,
    ///     created_at: UnixMillis(1),
    ///     updated_at: UnixMillis(2),
    /// };
    /// assert_eq!(ClaimRecord::decode(&record.encode())?, record);
    /// # Ok::<(), idem::claim::RecordError>(())
    /// ```
    pub fn encode(&self) -> Bytes {
        let mut out = vec![FORMAT_VERSION];
        // Serializing plain data into a Vec cannot fail.
        let body = postcard::to_stdvec(self).unwrap_or_default();
        out.extend_from_slice(&body);
        Bytes::from(out)
    }

    /// Decodes what [`encode`](Self::encode) wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        match bytes.split_first() {
            None => Err(RecordError::Empty),
            Some((&FORMAT_VERSION, body)) => {
                postcard::from_bytes(body).map_err(RecordError::Malformed)
            }
            Some((&other, _)) => Err(RecordError::UnknownVersion(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ClaimRecord {
        ClaimRecord {
            state: ClaimState::Pending {
                lease_until: UnixMillis(1_700_000_030_000),
            },
            owner: Owner::random(),
            attempt: 3,
            fingerprint: Some(Fingerprint::of(b"payload")),
            result: Some(Bytes::from_static(b"{\"card\":7}")),
            created_at: UnixMillis(1_700_000_000_000),
            updated_at: UnixMillis(1_700_000_000_500),
        }
    }

    #[test]
    fn round_trips_and_stays_compact() {
        let record = record();
        let bytes = record.encode();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(ClaimRecord::decode(&bytes).expect("decodes"), record);
        assert!(bytes.len() < 80, "{} bytes", bytes.len());
    }

    #[test]
    fn refuses_unknown_versions_and_garbage() {
        let mut bytes = record().encode().to_vec();
        bytes[0] = 2;
        assert!(matches!(
            ClaimRecord::decode(&bytes),
            Err(RecordError::UnknownVersion(2))
        ));
        assert!(matches!(ClaimRecord::decode(&[]), Err(RecordError::Empty)));
        assert!(matches!(
            ClaimRecord::decode(&[FORMAT_VERSION, 9]),
            Err(RecordError::Malformed(_))
        ));
    }
}
