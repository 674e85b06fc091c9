//! Idempotency keys, handler names, and the record key that places a claim
//! in the dedup store.
//!
//! A user's key is arbitrary bytes. In the store it becomes
//! `<handler>.k.<escaped key>`: bytes in `[A-Za-z0-9_-]` stand for themselves
//! and every other byte is written `=XX` (two upper-case hex digits), so the
//! mapping is injective, reversible and always inside the KV key alphabet.
//! When the escaped form would exceed [`MAX_ESCAPED_LEN`] characters the
//! key is stored as `<handler>.h.<SHA-256 of the key, hex>` instead: the `k`
//! and `h` tokens keep the two forms apart, and nothing is ever truncated.

mod to_key;

use std::fmt;

use bytes::Bytes;

use sha2::{Digest, Sha256};
pub use to_key::{ToKey, from_header, from_message_id, to_key};

/// The longest escaped key stored as itself; longer keys are hashed.
pub const MAX_ESCAPED_LEN: usize = 240;
/// The longest handler name.
pub const MAX_HANDLER_LEN: usize = 64;

/// What is wrong with a key or a handler name.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The idempotency key has no bytes: every message would share it.
    #[error(
        "the idempotency key is empty: derive it from something that identifies the business operation"
    )]
    Empty,
    /// The handler name cannot be used as a KV key token.
    #[error(
        "invalid handler name {name:?}: use 1 to {MAX_HANDLER_LEN} characters from [A-Za-z0-9_-]"
    )]
    InvalidHandlerName {
        /// The name given.
        name: String,
    },
    /// The key expression gave `None`.
    #[error("no idempotency key: the key expression gave None")]
    NoneValue,
    /// The header the key is taken from is absent.
    #[error("no idempotency key: the message has no `{name}` header")]
    MissingHeader {
        /// The header.
        name: &'static str,
    },
    /// The key is the broker message id, and the producer sent none.
    #[error(
        "no idempotency key: the message has no Nats-Msg-Id header (publish it with a message id)"
    )]
    MissingMessageId,
    /// A string read back from the store is not a record key idem wrote.
    #[error(
        "{key:?} is not a record key written by idem (<handler>.k.<escaped> or <handler>.h.<sha256>)"
    )]
    Malformed {
        /// The string read.
        key: String,
    },
}

crate::error::debug_as_report!(KeyError);

/// The idempotency key of one business operation: non-empty bytes.
///
/// ```
/// use idem::key::IdempotencyKey;
///
/// let key = IdempotencyKey::new("payment-42")?;
/// assert_eq!(key.as_bytes(), b"payment-42");
/// assert!(IdempotencyKey::new("").is_err());
/// # Ok::<(), idem::key::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Bytes);

impl IdempotencyKey {
    /// A key from bytes (copied); fails on empty input.
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        let bytes = bytes.as_ref();
        if bytes.is_empty() {
            Err(KeyError::Empty)
        } else {
            Ok(Self(Bytes::copy_from_slice(bytes)))
        }
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(f, "IdempotencyKey({text:?})"),
            Err(_) => write!(f, "IdempotencyKey({:?})", self.0),
        }
    }
}

impl From<uuid::Uuid> for IdempotencyKey {
    fn from(id: uuid::Uuid) -> Self {
        Self(Bytes::copy_from_slice(
            id.hyphenated().to_string().as_bytes(),
        ))
    }
}

/// The name a handler's records are kept under: a KV key token.
///
/// ```
/// use idem::key::HandlerName;
///
/// assert!(HandlerName::new("issue_membership_card").is_ok());
/// assert!(HandlerName::new("has.dots").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HandlerName(String);

impl HandlerName {
    /// Validates a handler name.
    pub fn new(name: impl Into<String>) -> Result<Self, KeyError> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= MAX_HANDLER_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(name))
        } else {
            Err(KeyError::InvalidHandlerName { name })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HandlerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a user key ended up: itself, or its hash when it was too long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredKey {
    /// The key's bytes, recovered exactly.
    Bytes(Vec<u8>),
    /// The SHA-256 of a key too long to store as itself.
    Sha256([u8; 32]),
}

/// The key of one claim record in the store: handler name plus encoded user
/// key.
///
/// ```
/// use idem::key::{HandlerName, IdempotencyKey, RecordKey, StoredKey};
///
/// let handler = HandlerName::new("cards")?;
/// let key = RecordKey::new(&handler, &IdempotencyKey::new("order 7/β")?);
/// assert_eq!(key.as_str(), "cards.k.order=207=2F=CE=B2");
/// assert_eq!(RecordKey::parse(key.as_str())?.stored_key(), StoredKey::Bytes("order 7/β".into()));
/// # Ok::<(), idem::key::KeyError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    encoded: String,
    handler_len: usize,
}

impl RecordKey {
    /// Places `key` under `handler`.
    pub fn new(handler: &HandlerName, key: &IdempotencyKey) -> Self {
        let escaped = escape(key.as_bytes());
        let encoded = if escaped.len() <= MAX_ESCAPED_LEN {
            format!("{handler}.k.{escaped}")
        } else {
            let digest = Sha256::digest(key.as_bytes());
            format!("{handler}.h.{}", data_encoding::HEXLOWER.encode(&digest))
        };
        Self {
            encoded,
            handler_len: handler.as_str().len(),
        }
    }

    /// Reads back a record key from the store.
    pub fn parse(encoded: &str) -> Result<Self, KeyError> {
        let malformed = || KeyError::Malformed {
            key: encoded.to_owned(),
        };
        let (handler, rest) = encoded.split_once('.').ok_or_else(malformed)?;
        let handler = HandlerName::new(handler).map_err(|_| malformed())?;
        let valid = match rest.split_once('.') {
            Some(("k", escaped)) => unescape(escaped).is_some_and(|k| !k.is_empty()),
            Some(("h", hex)) => decode_digest(hex).is_some(),
            _ => false,
        };
        if !valid {
            return Err(malformed());
        }
        Ok(Self {
            encoded: encoded.to_owned(),
            handler_len: handler.as_str().len(),
        })
    }

    /// The key as the store sees it.
    pub fn as_str(&self) -> &str {
        &self.encoded
    }

    /// The handler part.
    pub fn handler(&self) -> &str {
        &self.encoded[..self.handler_len]
    }

    /// The user key, or its hash.
    pub fn stored_key(&self) -> StoredKey {
        let rest = &self.encoded[self.handler_len + 1..];
        match rest.split_once('.') {
            Some(("h", hex)) => StoredKey::Sha256(decode_digest(hex).unwrap_or([0; 32])),
            Some((_, escaped)) => StoredKey::Bytes(unescape(escaped).unwrap_or_default()),
            None => StoredKey::Bytes(Vec::new()),
        }
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encoded)
    }
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push('=');
            out.push_str(&data_encoding::HEXUPPER.encode(&[b]));
        }
    }
    out
}

fn unescape(escaped: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(escaped.len());
    let mut bytes = escaped.bytes();
    while let Some(b) = bytes.next() {
        if b == b'=' {
            let pair = [bytes.next()?, bytes.next()?];
            let decoded = data_encoding::HEXUPPER.decode(&pair).ok()?;
            // Only the canonical form: a byte that would stand for itself
            // is never escaped, so that parsing stays injective.
            match decoded.as_slice() {
                [d] if !is_plain(*d) => out.push(*d),
                _ => return None,
            }
        } else if is_plain(b) {
            out.push(b);
        } else {
            return None;
        }
    }
    Some(out)
}

fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    data_encoding::HEXLOWER
        .decode(hex.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn handler() -> HandlerName {
        HandlerName::new("h-1_x").expect("valid")
    }

    /// The characters a JetStream KV key may contain; `.` separates tokens,
    /// which may not be empty.
    fn valid_kv_key(key: &str) -> bool {
        key.bytes().all(|b| is_plain(b) || b"/=.".contains(&b))
            && key.split('.').all(|t| !t.is_empty())
    }

    #[test]
    fn hostile_keys_are_escaped_into_the_kv_alphabet() {
        for raw in [
            "a.b",
            "*",
            ">",
            "a b",
            "x/y",
            "=",
            "..",
            "🦀",
            "\0",
            "payments.>",
            "\u{7f}",
        ] {
            let key = RecordKey::new(&handler(), &IdempotencyKey::new(raw).expect("non-empty"));
            assert!(valid_kv_key(key.as_str()), "{raw:?} → {key}");
            assert_eq!(key.stored_key(), StoredKey::Bytes(raw.as_bytes().to_vec()));
        }
    }

    #[test]
    fn long_keys_are_hashed_and_marked() {
        let long = vec![b'a'; MAX_ESCAPED_LEN + 1];
        let key = RecordKey::new(
            &handler(),
            &IdempotencyKey::new(long.clone()).expect("non-empty"),
        );
        assert!(key.as_str().starts_with("h-1_x.h."), "{key}");
        let digest: [u8; 32] = Sha256::digest(&long).into();
        assert_eq!(key.stored_key(), StoredKey::Sha256(digest));
        // The longest key that is stored as itself is not hashed.
        let edge = vec![b'a'; MAX_ESCAPED_LEN];
        let key = RecordKey::new(
            &handler(),
            &IdempotencyKey::new(edge.clone()).expect("non-empty"),
        );
        assert_eq!(key.stored_key(), StoredKey::Bytes(edge));
    }

    #[test]
    fn empty_keys_and_bad_handler_names_are_rejected() {
        assert_eq!(IdempotencyKey::new(Vec::new()), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::new(String::from("owned")).map(|k| k.as_bytes().len()),
            Ok(5)
        );
        for bad in ["", "a.b", "a b", "*", "ü", &"x".repeat(MAX_HANDLER_LEN + 1)] {
            assert!(HandlerName::new(bad).is_err(), "{bad:?}");
        }
        assert!(HandlerName::new("x".repeat(MAX_HANDLER_LEN)).is_ok());
    }

    #[test]
    fn parse_rejects_what_idem_never_writes() {
        for bad in [
            "nohandler",
            "h.k.",
            "h.x.abc",
            "h.k.a.b",
            "h.k.=4",
            "h.k.=41",
            "h.k.=zz",
            "h.h.abc",
            "bad name.k.a",
        ] {
            assert!(RecordKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn encoding_is_valid_reversible_and_injective(
            a in proptest::collection::vec(any::<u8>(), 1..200),
            b in proptest::collection::vec(any::<u8>(), 1..200),
        ) {
            let ka = RecordKey::new(&handler(), &IdempotencyKey::new(a.clone()).expect("non-empty"));
            let kb = RecordKey::new(&handler(), &IdempotencyKey::new(b.clone()).expect("non-empty"));
            prop_assert!(valid_kv_key(ka.as_str()), "{}", ka);
            let parsed = RecordKey::parse(ka.as_str());
            prop_assert_eq!(parsed.as_ref(), Ok(&ka));
            prop_assert_eq!(ka.handler(), "h-1_x");
            match ka.stored_key() {
                StoredKey::Bytes(back) => prop_assert_eq!(back, a.clone()),
                StoredKey::Sha256(d) => prop_assert_eq!(d, <[u8; 32]>::from(Sha256::digest(&a))),
            }
            prop_assert_eq!(a == b, ka == kb);
        }

        /// ASCII keys of up to 80 characters escape to at most 240: never hashed.
        #[test]
        fn ascii_keys_are_stored_as_themselves(s in "[ -~]{1,80}") {
            let key = RecordKey::new(&handler(), &IdempotencyKey::new(s.clone()).expect("non-empty"));
            prop_assert!(valid_kv_key(key.as_str()));
            prop_assert_eq!(key.stored_key(), StoredKey::Bytes(s.into_bytes()));
        }
    }
}
