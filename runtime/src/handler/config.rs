//! A handler's static configuration: what `#[idempotent(...)]` writes, with
//! the defaults in one place.

use std::time::Duration;

use crate::key::{HandlerName, KeyError};
use crate::retry::{Retry, RetryError};
use crate::subject::{SubjectError, validate_filter, validate_publish};

/// Where a handler's claims are kept, and so what it guarantees.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Dedup {
    /// No dedup store: at-least-once, still with retries, backoff and dead
    /// letters. For effects that are harmless twice.
    Off,
    /// JetStream KV (the default): exactly once, but for a crash between the
    /// effect and the completion write.
    #[default]
    Kv,
    /// The user's PostgreSQL database, in the handler's transaction.
    Transactional,
}

/// What happens to a message whose key cannot be extracted.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum OnMissingKey {
    /// Dead-letter it with reason `missing_key` (the default).
    #[default]
    DeadLetter,
    /// Acknowledge and drop it, counted as `rejected` — for streams where
    /// keyless messages are expected noise.
    Reject,
}

/// Where a handler's durable consumer starts when it is created. Only
/// matters the first time: an existing consumer keeps its place.
///
/// Without a choice, the runtime refuses to create a consumer on a stream
/// that already holds messages for it — a renamed handler (or a new one on
/// an old stream) would silently handle all of them.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// Every message the stream holds.
    All,
    /// Only messages published after the consumer is created.
    New,
    /// Messages from this stream sequence on.
    Sequence(u64),
}

/// What tells a duplicate from a reused key.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum FingerprintSource {
    /// The whole payload (the default).
    #[default]
    Payload,
    /// No fingerprint: any payload under a completed key is a duplicate.
    None,
    /// An expression over the handler's arguments.
    Custom,
}

/// Why a handler configuration cannot run.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The handler name is not a valid key token.
    #[error("handler `{handler}`: {source}")]
    Name {
        /// The handler.
        handler: String,
        /// The problem.
        source: KeyError,
    },
    /// No stream.
    #[error("handler `{handler}`: no stream given")]
    NoStream {
        /// The handler.
        handler: String,
    },
    /// A service name NATS micro services do not accept.
    #[error("handler `{handler}`: service name {service:?} must be letters, digits, `_` or `-`")]
    ServiceName {
        /// The handler.
        handler: String,
        /// The name.
        service: String,
    },
    /// A request/reply handler without the subject its requests arrive on.
    #[error("handler `{handler}`: a service handler needs the subject its requests arrive on")]
    NoEndpointSubject {
        /// The handler.
        handler: String,
    },
    /// A request/reply handler told not to store its result: every repeat
    /// of a request would be answered with an empty body.
    #[error(
        "handler `{handler}`: a service handler answers every repeat of a request with the stored result; \
         without `store_result` repeats would get an empty body"
    )]
    ServiceWithoutStoredResult {
        /// The handler.
        handler: String,
    },
    /// A bad subject.
    #[error("handler `{handler}`: {option}: {source}")]
    Subject {
        /// The handler.
        handler: String,
        /// `subject` or `dead_letter`.
        option: &'static str,
        /// The problem.
        source: SubjectError,
    },
    /// Dead letters would be consumed by the handler that produced them.
    #[error(
        "handler `{handler}`: dead_letter {subject:?} is the handler's own subject; dead letters would loop"
    )]
    DeadLetterLoop {
        /// The handler.
        handler: String,
        /// The subject.
        subject: String,
    },
    /// `concurrency = 0`.
    #[error("handler `{handler}`: concurrency must be at least 1")]
    ZeroConcurrency {
        /// The handler.
        handler: String,
    },
    /// `batch = 0`.
    #[error("handler `{handler}`: batch must be at least 1 (1 = a transaction per message)")]
    ZeroBatch {
        /// The handler.
        handler: String,
    },
    /// A linger as long as the lease: a group would hold its keys' rows
    /// before its handlers even start.
    #[error(
        "handler `{handler}`: the linger ({linger:?}) must be shorter than the lease ({lease:?}); a few milliseconds is usual"
    )]
    LingerNotShorterThanLease {
        /// The handler.
        handler: String,
        /// The linger.
        linger: Duration,
        /// The lease.
        lease: Duration,
    },
    /// An invalid retry policy.
    #[error("handler `{handler}`: {source}")]
    Retry {
        /// The handler.
        handler: String,
        /// The problem.
        source: RetryError,
    },
    /// A lease the retention would outlive.
    #[error(
        "handler `{handler}`: the lease ({lease:?}) must be shorter than the retention ({retention:?})"
    )]
    LeaseNotShorterThanRetention {
        /// The handler.
        handler: String,
        /// The lease.
        lease: Duration,
        /// The retention.
        retention: Duration,
    },
}

crate::error::debug_as_report!(ConfigError);

/// The static configuration of one handler.
///
/// ```
/// use std::time::Duration;
/// use idem::handler::{Dedup, HandlerConfig};
/// use idem::Retry;
///
/// let config = HandlerConfig::new("issue_card", "PAYMENTS")
///     .subject("payments.succeeded")
///     .retry(Retry::fixed("1s").attempts(3))
///     .lease(Duration::from_secs(60));
/// assert_eq!(config.validate(), Ok(()));
/// assert_eq!(config.consumer, "issue_card");
/// assert_eq!(config.dead_letter, "idem.dead.issue_card");
/// assert_eq!(config.dedup, Dedup::Kv);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HandlerConfig {
    /// The handler's identity (`name = "…"`, else the function's name):
    /// namespaces its claims, names its consumer, stats and dead letters.
    /// Keep it when renaming the function.
    pub name: String,
    /// The stream it consumes (empty for a request/reply handler).
    pub stream: String,
    /// The NATS micro service that serves the handler as a request/reply
    /// endpoint on `subject`, instead of a stream's consumer (see
    /// [`service`](Self::service)).
    pub service: Option<String>,
    /// The service's version (semver; default `0.1.0`), as
    /// `$SRV.INFO` shows it.
    pub version: String,
    /// The durable consumer's name (default: the handler's name).
    pub consumer: String,
    /// The filter subject (default: all of the stream's subjects).
    pub subject: Option<String>,
    /// The dedup store (default: KV).
    pub dedup: Dedup,
    /// How long completed keys are remembered (default: 7 days).
    pub retention: Duration,
    /// How long a claim holds before another worker may take over (default:
    /// 30 s; renewed while the handler runs).
    pub lease: Duration,
    /// The retry policy (default: [`Retry::default`]).
    pub retry: Retry,
    /// Where dead letters go (default: `idem.dead.<handler>`).
    pub dead_letter: String,
    /// Messages handled at once (default: 16).
    pub concurrency: usize,
    /// What happens when no key can be extracted.
    pub on_missing_key: OnMissingKey,
    /// What the payload fingerprint covers.
    pub fingerprint: FingerprintSource,
    /// Whether the `Ok` value is stored for duplicates.
    pub store_result: bool,
    /// Whether a duplicate's delivery is handed to the handler's
    /// [`on_duplicate`](crate::Handler::on_duplicate) with the stored
    /// result (the attribute's `on_duplicate = …`).
    pub on_duplicate: bool,
    /// Where a newly created consumer starts (default: none chosen — a new
    /// consumer on a stream holding messages is refused).
    pub start: Option<StartAt>,
    /// `dedup = transactional`: how many messages at most share one
    /// transaction and one commit (default: 32, never more than
    /// `concurrency`; 1 = a transaction per message). See
    /// [`batch`](Self::batch).
    pub batch: usize,
    /// `dedup = transactional`: how long the first message of a group waits
    /// for others to join before the group's transaction begins (default:
    /// 2 ms). A group starts at once when no other message is on its way.
    pub linger: Duration,
}

impl HandlerConfig {
    /// The defaults for a handler `name` on `stream`.
    pub fn new(name: &str, stream: &str) -> Self {
        Self {
            name: name.to_owned(),
            stream: stream.to_owned(),
            service: None,
            version: "0.1.0".to_owned(),
            consumer: name.to_owned(),
            subject: None,
            dedup: Dedup::default(),
            retention: Duration::from_secs(7 * 24 * 3600),
            lease: Duration::from_secs(30),
            retry: Retry::default(),
            dead_letter: format!("idem.dead.{name}"),
            concurrency: 16,
            on_missing_key: OnMissingKey::default(),
            fingerprint: FingerprintSource::default(),
            store_result: false,
            on_duplicate: false,
            start: None,
            batch: 32,
            linger: Duration::from_millis(2),
        }
    }

    /// The defaults for a handler `name` served as a request/reply endpoint
    /// of the NATS micro service `service` (async-nats' `service` API, so it
    /// answers `$SRV.PING`, `INFO` and `STATS`), on `subject`: the first
    /// request with a key runs, its result is stored with the claim and
    /// replied; a request repeating it gets the stored reply. Results are
    /// always stored.
    ///
    /// ```
    /// use idem::handler::HandlerConfig;
    ///
    /// let config = HandlerConfig::service("charge", "payments").subject("payments.charge");
    /// assert_eq!(config.validate(), Ok(()));
    /// assert!(config.store_result);
    /// ```
    pub fn service(name: &str, service: &str) -> Self {
        let mut config = Self::new(name, "");
        config.service = Some(service.to_owned());
        config.store_result = true;
        config
    }

    /// The service's version (`service` handlers only).
    ///
    /// ```
    /// use idem::handler::HandlerConfig;
    ///
    /// let config = HandlerConfig::service("charge", "payments").version("2.1.0");
    /// assert_eq!(config.version, "2.1.0");
    /// ```
    pub fn version(mut self, version: &str) -> Self {
        self.version = version.to_owned();
        self
    }

    /// `dedup = transactional`: lets up to `messages` deliveries share one
    /// transaction — one claim statement, one commit, one WAL flush —
    /// instead of one each (group commit). Handlers are unchanged, but one
    /// must not assume:
    ///
    /// * that its [`Tx`](crate::Tx) holds only its own message's rows: the
    ///   other messages of the group write in the same transaction, and
    ///   their statements may interleave with its own;
    /// * that it runs once per delivery: if any handler of the group fails
    ///   (or the commit meets a deadlock or serialization failure), the
    ///   whole group rolls back and each message runs again in a
    ///   transaction of its own. Effects in the transaction never commit
    ///   twice; an effect outside the database (an HTTP call, a publish)
    ///   inside a transactional handler may happen again, as it may after
    ///   any rollback.
    ///
    /// A group commits when its last handler returns, so a slow handler
    /// delays its group's acknowledgements. `1` gives every message its own
    /// transaction.
    ///
    /// ```
    /// use idem::handler::{Dedup, HandlerConfig};
    ///
    /// let config = HandlerConfig::new("apply", "LEDGER")
    ///     .dedup(Dedup::Transactional)
    ///     .batch(64)
    ///     .concurrency(128);
    /// assert_eq!(config.validate(), Ok(()));
    /// assert_eq!(config.group_size(), 64);
    /// ```
    pub fn batch(mut self, messages: usize) -> Self {
        self.batch = messages;
        self
    }

    /// `dedup = transactional`: how long a group waits for more messages
    /// before it begins (see [`batch`](Self::batch)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem::handler::HandlerConfig;
    ///
    /// let config = HandlerConfig::new("apply", "LEDGER").linger(Duration::from_millis(5));
    /// assert_eq!(config.linger, Duration::from_millis(5));
    /// ```
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// How many messages one transaction takes: `batch`, at most
    /// `concurrency`; 1 for any level but `transactional`.
    ///
    /// ```
    /// use idem::handler::HandlerConfig;
    ///
    /// // The default level (kv) commits nothing in groups.
    /// assert_eq!(HandlerConfig::new("h", "S").group_size(), 1);
    /// ```
    pub fn group_size(&self) -> usize {
        if self.dedup == Dedup::Transactional {
            self.batch.min(self.concurrency).max(1)
        } else {
            1
        }
    }

    /// Where a newly created consumer starts.
    ///
    /// ```
    /// use idem::handler::{HandlerConfig, StartAt};
    ///
    /// let config = HandlerConfig::new("issue_card", "PAYMENTS").start(StartAt::New);
    /// assert_eq!(config.start, Some(StartAt::New));
    /// ```
    pub fn start(mut self, start: StartAt) -> Self {
        self.start = Some(start);
        self
    }

    /// Sets the durable consumer name.
    pub fn consumer(mut self, consumer: &str) -> Self {
        self.consumer = consumer.to_owned();
        self
    }

    /// Sets the filter subject.
    pub fn subject(mut self, subject: &str) -> Self {
        self.subject = Some(subject.to_owned());
        self
    }

    /// Sets the dedup store.
    pub fn dedup(mut self, dedup: Dedup) -> Self {
        self.dedup = dedup;
        self
    }

    /// Sets the retention of completed keys.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the dead-letter subject.
    pub fn dead_letter(mut self, subject: &str) -> Self {
        self.dead_letter = subject.to_owned();
        self
    }

    /// Sets how many messages are handled at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets what happens without a key.
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.on_missing_key = policy;
        self
    }

    /// Sets what the fingerprint covers.
    pub fn fingerprint(mut self, source: FingerprintSource) -> Self {
        self.fingerprint = source;
        self
    }

    /// Stores the handler's `Ok` value for duplicates.
    pub fn store_result(mut self, store: bool) -> Self {
        self.store_result = store;
        self
    }

    /// Hands each duplicate's delivery, with the stored result, to the
    /// handler's [`on_duplicate`](crate::Handler::on_duplicate) before it
    /// is acknowledged (what `on_duplicate = …` sets).
    ///
    /// ```
    /// use idem::handler::HandlerConfig;
    ///
    /// let config = HandlerConfig::new("issue_card", "PAYMENTS").store_result(true).on_duplicate(true);
    /// assert!(config.on_duplicate);
    /// ```
    pub fn on_duplicate(mut self, hook: bool) -> Self {
        self.on_duplicate = hook;
        self
    }
    /// Checks the configuration; the runtime refuses to start a handler whose
    /// configuration is invalid. (`#[idempotent]` checks literals at compile
    /// time already; this catches values computed at run time.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        let handler = || self.name.clone();
        HandlerName::new(&self.name).map_err(|source| ConfigError::Name {
            handler: handler(),
            source,
        })?;
        match &self.service {
            Some(service)
                if service.is_empty()
                    || !service
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                return Err(ConfigError::ServiceName {
                    handler: handler(),
                    service: service.clone(),
                });
            }
            Some(_) if self.subject.is_none() => {
                return Err(ConfigError::NoEndpointSubject { handler: handler() });
            }
            Some(_) if !self.store_result => {
                return Err(ConfigError::ServiceWithoutStoredResult { handler: handler() });
            }
            Some(_) => {}
            None if self.stream.is_empty() => {
                return Err(ConfigError::NoStream { handler: handler() });
            }
            None => {}
        }
        let subject_error = |option, source| ConfigError::Subject {
            handler: handler(),
            option,
            source,
        };
        if let Some(subject) = &self.subject {
            validate_filter(subject).map_err(|e| subject_error("subject", e))?;
            if *subject == self.dead_letter {
                return Err(ConfigError::DeadLetterLoop {
                    handler: handler(),
                    subject: subject.clone(),
                });
            }
        }
        validate_publish(&self.dead_letter).map_err(|e| subject_error("dead_letter", e))?;
        if self.concurrency == 0 {
            return Err(ConfigError::ZeroConcurrency { handler: handler() });
        }
        if self.batch == 0 {
            return Err(ConfigError::ZeroBatch { handler: handler() });
        }
        if self.dedup == Dedup::Transactional && self.linger >= self.lease {
            return Err(ConfigError::LingerNotShorterThanLease {
                handler: handler(),
                linger: self.linger,
                lease: self.lease,
            });
        }
        self.retry.validate().map_err(|source| ConfigError::Retry {
            handler: handler(),
            source,
        })?;
        if self.dedup != Dedup::Off && self.lease >= self.retention {
            return Err(ConfigError::LeaseNotShorterThanRetention {
                handler: handler(),
                lease: self.lease,
                retention: self.retention,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant_name(error: &ConfigError) -> &'static str {
        match error {
            ConfigError::Name { .. } => "Name",
            ConfigError::NoStream { .. } => "NoStream",
            ConfigError::ServiceName { .. } => "ServiceName",
            ConfigError::NoEndpointSubject { .. } => "NoEndpointSubject",
            ConfigError::ServiceWithoutStoredResult { .. } => "ServiceWithoutStoredResult",
            ConfigError::Subject { .. } => "Subject",
            ConfigError::DeadLetterLoop { .. } => "DeadLetterLoop",
            ConfigError::ZeroConcurrency { .. } => "ZeroConcurrency",
            ConfigError::ZeroBatch { .. } => "ZeroBatch",
            ConfigError::LingerNotShorterThanLease { .. } => "LingerNotShorterThanLease",
            ConfigError::Retry { .. } => "Retry",
            ConfigError::LeaseNotShorterThanRetention { .. } => "LeaseNotShorterThanRetention",
        }
    }

    #[test]
    fn each_invalid_setting_is_named() {
        let base = || HandlerConfig::new("h", "S").subject("orders.created");
        assert_eq!(base().validate(), Ok(()));
        let cases = [
            (HandlerConfig::new("h.x", "S"), "Name"),
            (HandlerConfig::new("h", ""), "NoStream"),
            (
                HandlerConfig::service("h", "pay.ments").subject("a"),
                "ServiceName",
            ),
            (HandlerConfig::service("h", "payments"), "NoEndpointSubject"),
            (
                HandlerConfig::service("h", "payments")
                    .subject("a")
                    .store_result(false),
                "ServiceWithoutStoredResult",
            ),
            (base().subject("orders..x"), "Subject"),
            (base().dead_letter("dead.*"), "Subject"),
            (base().dead_letter("orders.created"), "DeadLetterLoop"),
            (base().concurrency(0), "ZeroConcurrency"),
            (base().batch(0), "ZeroBatch"),
            (
                base()
                    .dedup(Dedup::Transactional)
                    .linger(Duration::from_secs(30)),
                "LingerNotShorterThanLease",
            ),
            (base().retry(Retry::fixed("1s").attempts(0)), "Retry"),
            (
                base()
                    .lease(Duration::from_secs(3600))
                    .retention(Duration::from_secs(60)),
                "LeaseNotShorterThanRetention",
            ),
        ];
        for (config, variant) in cases {
            let err = config.validate().expect_err(variant);
            assert_eq!(variant_name(&err), variant, "{err}");
        }
        // Without dedup, the lease and retention do not matter.
        let off = base()
            .dedup(Dedup::Off)
            .lease(Duration::from_secs(3600))
            .retention(Duration::from_secs(60));
        assert_eq!(off.validate(), Ok(()));
    }
}
