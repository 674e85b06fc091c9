//! Where a handler's claim records live, as dead letters name it in their
//! `Idem-Store` header — written by the runtime, read by the `idem` CLI, in
//! one spelling: `kv:<bucket>` or `postgres:<schema>`.

use std::fmt;
use std::str::FromStr;

/// A store of claim records: a claim bucket, or a PostgreSQL inbox.
///
/// ```
/// use idem::store::StoreLocation;
///
/// let kv: StoreLocation = "kv:idem_claims".parse().unwrap();
/// assert_eq!(kv, StoreLocation::Kv { bucket: "idem_claims".into() });
/// assert_eq!(kv.to_string(), "kv:idem_claims");
/// assert!("redis:x".parse::<StoreLocation>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StoreLocation {
    /// A JetStream key-value bucket (`dedup = kv`).
    Kv {
        /// The bucket's name.
        bucket: String,
    },
    /// The `idem_inbox` table of a PostgreSQL schema (`dedup =
    /// transactional`).
    Postgres {
        /// The schema's name.
        schema: String,
    },
}

/// A store location that is neither `kv:<bucket>` nor `postgres:<schema>`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown store {0:?} (kv:<bucket> or postgres:<schema>)")]
pub struct UnknownStore(pub String);

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Kv { bucket } => write!(f, "kv:{bucket}"),
            StoreLocation::Postgres { schema } => write!(f, "postgres:{schema}"),
        }
    }
}

impl FromStr for StoreLocation {
    type Err = UnknownStore;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            Some(("kv", bucket)) if !bucket.is_empty() => Ok(StoreLocation::Kv {
                bucket: bucket.to_owned(),
            }),
            Some(("postgres", schema)) if !schema.is_empty() => Ok(StoreLocation::Postgres {
                schema: schema.to_owned(),
            }),
            _ => Err(UnknownStore(text.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_read_by_kind_and_written_as_read() {
        for text in ["kv:idem_claims", "postgres:idem"] {
            let location: StoreLocation = text.parse().expect(text);
            assert_eq!(location.to_string(), text);
        }
        assert_eq!(
            "postgres:idem".parse(),
            Ok(StoreLocation::Postgres {
                schema: "idem".into()
            })
        );
        for bad in ["kv:", "postgres:", "redis:x", "idem_claims", ""] {
            assert_eq!(
                bad.parse::<StoreLocation>(),
                Err(UnknownStore(bad.into())),
                "{bad}"
            );
        }
    }
}
