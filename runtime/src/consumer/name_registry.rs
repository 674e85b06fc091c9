//! Who a handler name belongs to in a claim bucket: a stream's consumer or
//! a service's endpoint. Claims are namespaced by handler name, so two
//! handlers of one name in one bucket — in two services, or on two streams —
//! would answer each other's keys as duplicates or conflicts. The first to
//! register a name in a bucket keeps it; another is refused at start-up;
//! deployments of the same handler (same stream and consumer, or same
//! service and subject) share it on purpose.
//!
//! The registration (`idem=handlers.<name>`: the `=` is in no handler name,
//! so it is never a claim record's key) is rewritten while the handler
//! runs, so it never expires with the bucket's `max_age` — else a
//! conflicting handler would no longer be refused.

use std::fmt;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::RuntimeError;
use crate::handler::HandlerConfig;
use crate::store::{Create, KvStore, RevisionedMap, StoreError, Write};

/// What a handler name in a claim bucket is registered for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Registered {
    /// A service endpoint's handler (`service = "…"`).
    Service {
        /// The NATS micro service.
        service: String,
        /// The subject its requests arrive on.
        subject: String,
    },
    /// A stream's handler, through its durable consumer.
    Stream {
        /// The stream.
        stream: String,
        /// The durable consumer.
        consumer: String,
    },
}

impl Registered {
    /// What `config` registers.
    pub(crate) fn of(config: &HandlerConfig) -> Self {
        match &config.service {
            Some(service) => Registered::Service {
                service: service.clone(),
                subject: config.subject.clone().unwrap_or_default(),
            },
            None => Registered::Stream {
                stream: config.stream.clone(),
                consumer: config.consumer.clone(),
            },
        }
    }

    /// A service registration written before services registered as such
    /// (a stream registration without a stream): rewritten, not refused.
    fn is_legacy_service(&self) -> bool {
        matches!(self, Registered::Stream { stream, .. } if stream.is_empty())
    }
}

impl fmt::Display for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Registered::Service { service, subject } => {
                write!(f, "service `{service}`, subject `{subject}`")
            }
            Registered::Stream { stream, consumer } => {
                write!(f, "stream `{stream}`, consumer `{consumer}`")
            }
        }
    }
}

/// The registration's key: also what the health probe reads to see whether
/// the bucket answers.
pub(super) fn key(config: &HandlerConfig) -> String {
    format!("idem=handlers.{}", config.name)
}

fn encode(registered: &Registered) -> bytes::Bytes {
    serde_json::to_vec(registered).unwrap_or_default().into()
}

/// What the bucket says about `config`'s name.
enum Found {
    /// Registered for this handler (at this revision).
    Mine(u64),
    /// Registered for another handler.
    Theirs(Registered),
    /// Not registered (absent, or gone between two reads).
    Free,
    /// Registered in a form this idem cannot read (a newer idem's, or
    /// written by hand): it names nobody, so it refuses nobody — and it is
    /// not this handler's to overwrite.
    Unreadable,
}

/// What an existing registration `stored` says about `mine`.
fn classify(stored: &[u8], mine: &Registered) -> Stored {
    match serde_json::from_slice::<Registered>(stored) {
        Ok(theirs) if theirs == *mine => Stored::Mine,
        Ok(theirs) if theirs.is_legacy_service() && matches!(mine, Registered::Service { .. }) => {
            Stored::Legacy
        }
        Ok(theirs) => Stored::Theirs(theirs),
        Err(_) => Stored::Unreadable,
    }
}

/// An existing registration, read.
#[derive(Debug, PartialEq, Eq)]
enum Stored {
    /// This handler's.
    Mine,
    /// This service handler's, written before services registered as such:
    /// rewritten.
    Legacy,
    /// Another handler's.
    Theirs(Registered),
    /// Not readable by this idem.
    Unreadable,
}

async fn look(
    store: &KvStore,
    config: &HandlerConfig,
    mine: &Registered,
) -> Result<Found, StoreError> {
    let key = key(config);
    let (bytes, revision) = match store.map().create(&key, encode(mine)).await? {
        Create::Created(revision) => return Ok(Found::Mine(revision)),
        Create::Exists(None) => return Ok(Found::Free),
        Create::Exists(Some(found)) => found,
    };
    Ok(match classify(&bytes, mine) {
        Stored::Mine => Found::Mine(revision),
        Stored::Legacy => match store.map().update(&key, encode(mine), revision).await? {
            Write::Written(revision) => Found::Mine(revision),
            Write::Conflict => Found::Free,
        },
        Stored::Theirs(theirs) => Found::Theirs(theirs),
        Stored::Unreadable => Found::Unreadable,
    })
}

/// Registers `config.name` in this bucket for its stream's consumer or its
/// service's endpoint, or refuses a name registered for another.
pub(super) async fn register(
    store: &KvStore,
    bucket: &str,
    config: &HandlerConfig,
) -> Result<(), RuntimeError> {
    let mine = Registered::of(config);
    let found = look(store, config, &mine)
        .await
        .map_err(|source| RuntimeError::Store {
            handler: config.name.clone(),
            source,
        })?;
    match found {
        Found::Mine(_) | Found::Free | Found::Unreadable => Ok(()),
        Found::Theirs(registered) => Err(RuntimeError::HandlerNameTaken {
            handler: config.name.clone(),
            bucket: bucket.to_owned(),
            registered,
        }),
    }
}

/// How often a running handler rewrites its registration: a quarter of the
/// bucket's retention (at least every hour, at most ten times a second).
fn refresh_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600))
}

/// Rewrites `config`'s registration every [`refresh_every`] of the
/// bucket's retention until `stop`, so that it lives as long as the handler
/// runs. A name found registered for another handler is logged as an error
/// (two handlers' claims now mix: one of them was started while the
/// registration had expired).
pub(super) async fn keep_registered(
    store: KvStore,
    config: HandlerConfig,
    stop: CancellationToken,
) {
    let mine = Registered::of(&config);
    let every = refresh_every(config.retention);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let key = key(&config);
        match look(&store, &config, &mine).await {
            Ok(Found::Mine(revision)) => {
                match store.map().update(&key, encode(&mine), revision).await {
                    Ok(Write::Written(_)) => {
                        debug!(handler = %config.name, "registration rewritten")
                    }
                    // Changed since it was read: looked at again next time.
                    Ok(Write::Conflict) => {}
                    Err(e) => {
                        warn!(handler = %config.name, error = %e, "could not rewrite the handler's registration; trying again")
                    }
                }
            }
            Ok(Found::Free | Found::Unreadable) => {}
            Ok(Found::Theirs(theirs)) => error!(
                handler = %config.name,
                registered = %theirs,
                "the handler's name is registered in its claim bucket for another handler: their claims mix"
            ),
            Err(e) => {
                warn!(handler = %config.name, error = %e, "could not read the handler's registration; trying again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_written_before_services_registered_as_such_still_read() {
        let legacy: Registered =
            serde_json::from_str(r#"{"stream":"","consumer":"charge"}"#).expect("legacy");
        assert!(legacy.is_legacy_service());
        let service: Registered =
            serde_json::from_str(r#"{"service":"payments","subject":"payments.charge"}"#)
                .expect("service");
        assert_eq!(
            service,
            Registered::Service {
                service: "payments".into(),
                subject: "payments.charge".into()
            }
        );
        let stream: Registered =
            serde_json::from_str(r#"{"stream":"ORDERS","consumer":"ship"}"#).expect("stream");
        assert!(!stream.is_legacy_service());
    }

    #[test]
    fn an_unreadable_registration_refuses_nobody_and_is_not_rewritten() {
        let mine = Registered::Stream {
            stream: "ORDERS".into(),
            consumer: "ship".into(),
        };
        assert_eq!(
            classify(b"{\"v\":2,\"owner\":\"x\"}", &mine),
            Stored::Unreadable
        );
        assert_eq!(classify(&encode(&mine), &mine), Stored::Mine);
        let service = Registered::Service {
            service: "payments".into(),
            subject: "payments.charge".into(),
        };
        assert_eq!(
            classify(br#"{"stream":"","consumer":"charge"}"#, &service),
            Stored::Legacy
        );
        assert_eq!(
            classify(&encode(&service), &mine),
            Stored::Theirs(service.clone())
        );
    }

    #[test]
    fn a_registration_is_rewritten_well_within_the_retention() {
        assert_eq!(
            refresh_every(Duration::from_secs(4)),
            Duration::from_secs(1)
        );
        assert_eq!(
            refresh_every(Duration::from_secs(7 * 86_400)),
            Duration::from_secs(3600)
        );
    }
}
