//! Payload fingerprints: what tells a true duplicate from a reused key.
//!
//! A claim stores the fingerprint of the payload that claimed it. A later
//! message with the same key and the same fingerprint is a duplicate; with a
//! different fingerprint it is a *key conflict* — the key was reused for
//! another operation — and is dead-lettered rather than acknowledged, because
//! acknowledging it would silently drop a different business operation.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first 128 bits of the SHA-256 of a payload (or of the part of it a
/// handler declares significant).
///
/// ```
/// use idem::fingerprint::Fingerprint;
///
/// let a = Fingerprint::of(br#"{"amount":100}"#);
/// assert_eq!(a, Fingerprint::of(br#"{"amount":100}"#));
/// assert_ne!(a, Fingerprint::of(br#"{"amount":200}"#));
/// ```
#[derive(Copy, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    /// Fingerprints bytes.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(first)
    }

    /// A fingerprint read back from a store.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

/// Text that is not a fingerprint (32 lowercase hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a fingerprint (32 hex digits): {0:?}")]
pub struct ParseFingerprintError(String);

impl std::str::FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    /// Reads what [`Display`](fmt::Display) writes.
    ///
    /// ```
    /// use idem::fingerprint::Fingerprint;
    ///
    /// let f = Fingerprint::of(b"abc");
    /// assert_eq!(f.to_string().parse::<Fingerprint>(), Ok(f));
    /// assert!("abc".parse::<Fingerprint>().is_err());
    /// ```
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .map_err(|_| ParseFingerprintError(text.to_owned()))?;
        let bytes: [u8; 16] = bytes
            .try_into()
            .map_err(|_| ParseFingerprintError(text.to_owned()))?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_stable_across_releases() {
        // SHA-256("abc") begins ba7816bf…; a change here breaks every stored claim.
        assert_eq!(
            Fingerprint::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223"
        );
    }
}
