//! The producer side: publish with a message id, and resend with the *same*
//! id until the broker confirms — JetStream's duplicate window drops the
//! copies a lost PubAck would otherwise store twice.
//!
//! ```no_run
//! # async fn demo(client: async_nats::Client) -> Result<(), idem::publisher::PublishError> {
//! use idem::publisher::{Outgoing, Publisher};
//!
//! let publisher = Publisher::new(client);
//! let confirmed = publisher
//!     .send(Outgoing::new("payments.succeeded", r#"{"payment_id":42}"#).with_id("payment-42"))
//!     .await?;
//! println!("stored at {} (duplicate: {})", confirmed.sequence, confirmed.duplicate);
//! # Ok(()) }
//! ```

mod error;
mod message;
mod request;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::time::{Instant, sleep, timeout};
use tracing::debug;

pub use error::PublishError;
pub use message::Outgoing;
pub use request::{RequestError, Requester};

use crate::BoxError;
use crate::retry::{Retry, Schedule};
use crate::subject::validate_publish;

/// How the publisher resends. Defaults: 2 s per attempt, backoff from 100 ms
/// to 2 s with jitter, give up after 60 s — inside JetStream's default
/// 2-minute duplicate window.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// How long to wait for one PubAck before resending.
    pub attempt_timeout: Duration,
    /// The first pause between attempts.
    pub backoff_base: Duration,
    /// The longest pause between attempts.
    pub backoff_cap: Duration,
    /// How long to keep resending one message: the retry horizon, checked
    /// against each stream's duplicate window.
    pub deadline: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
        }
    }
}

/// How many checked subjects are remembered.
const MAX_KNOWN_SUBJECTS: usize = 4096;

/// The broker's confirmation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The stream that stored the message.
    pub stream: String,
    /// Its sequence in the stream.
    pub sequence: u64,
    /// Whether the broker had it already (a resend, or a re-run with the
    /// same id): stored once either way.
    pub duplicate: bool,
    /// The message id.
    pub message_id: String,
    /// How many times it was sent.
    pub attempts: u32,
}

/// Publishes to JetStream and resends until confirmed. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    js: jetstream::Context,
    client: async_nats::Client,
    config: PublisherConfig,
    /// Pauses between attempts, from the config.
    backoff: Schedule,
    /// Subjects whose stream and duplicate window were checked.
    streams: Mutex<HashSet<String>>,
    /// Held while a subject is looked up: the first burst of sends to a new
    /// subject (say, `publish_all`'s whole window) waits for one lookup
    /// instead of each making its own.
    lookup: tokio::sync::Mutex<()>,
}

/// What one attempt came to.
enum Attempt {
    Confirmed(jetstream::publish::PublishAck),
    /// Worth resending with the same id.
    Transient(BoxError),
}

impl Publisher {
    /// A publisher with the default resend policy.
    pub fn new(client: async_nats::Client) -> Self {
        Self::with_config(client, PublisherConfig::default())
    }

    /// A publisher with its own resend policy.
    pub fn with_config(client: async_nats::Client, config: PublisherConfig) -> Self {
        let backoff =
            Schedule::of(Retry::exponential(config.backoff_base, config.backoff_cap).jitter());
        Self {
            inner: Arc::new(Shared {
                js: jetstream::new(client.clone()),
                client,
                config,
                backoff,
                streams: Mutex::default(),
                lookup: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The server's `max_payload`.
    pub fn max_payload(&self) -> usize {
        self.inner.client.max_payload()
    }

    /// The resend policy.
    pub fn config(&self) -> &PublisherConfig {
        &self.inner.config
    }

    /// Publishes bytes with a fresh UUID v7 message id.
    pub async fn publish(
        &self,
        subject: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<Published, PublishError> {
        self.send(Outgoing::new(subject, payload)).await
    }

    /// Publishes `value` as JSON with a fresh UUID v7 message id.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
    ) -> Result<Published, PublishError> {
        self.send(Outgoing::json(subject, value)?).await
    }

    /// Sends `message` and resends it with the same id until the broker
    /// confirms it or the deadline passes. Bad input fails at once.
    pub async fn send(&self, message: Outgoing) -> Result<Published, PublishError> {
        let message = message.traced();
        validate_publish(&message.subject).map_err(|source| PublishError::InvalidSubject {
            subject: message.subject.clone(),
            source,
        })?;
        let max = self.max_payload();
        if max > 0 && message.size() > max {
            return Err(PublishError::PayloadTooLarge {
                size: message.size(),
                max,
            });
        }
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // Each attempt (lookup included) ends by the deadline.
            let limit = self
                .inner
                .config
                .attempt_timeout
                .min(self.inner.config.deadline.saturating_sub(started.elapsed()));
            let attempt = async {
                // Never into a connection known to be down: async-nats
                // queues such a publish and sends it on reconnect — maybe
                // after this send gave up, and after the duplicate window,
                // when it would be stored a second time.
                self.connected().await;
                if !self.known_subjects().contains(&message.subject) {
                    // Once per subject: boxed, so that every send does not
                    // carry the lookup's state around.
                    Box::pin(self.check_stream(&message.subject)).await?;
                }
                self.attempt(&message).await
            };
            let outcome = match timeout(limit, attempt).await {
                Ok(outcome) => outcome,
                Err(elapsed) => Ok(Attempt::Transient(Box::new(elapsed))),
            };
            let last_error = match outcome {
                Ok(Attempt::Confirmed(ack)) => {
                    return Ok(Published {
                        stream: ack.stream,
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                        message_id: message.id.clone(),
                        attempts,
                    });
                }
                Ok(Attempt::Transient(e)) => e,
                Err(Resolve::Fatal(e)) => return Err(e),
                Err(Resolve::Transient(e)) => e,
            };
            let pause = self.inner.backoff.at(attempts);
            if started.elapsed() + pause >= self.inner.config.deadline {
                return Err(PublishError::DeadlineExceeded {
                    message_id: message.id.clone(),
                    attempts,
                    waited: started.elapsed(),
                    last_error,
                });
            }
            debug!(id = %message.id, attempts, error = %last_error, ?pause, "not confirmed; resending with the same id");
            sleep(pause).await;
        }
    }

    /// Publishes a stream of messages with up to `window` in flight, each
    /// resent until confirmed; results come in input order.
    ///
    /// ```no_run
    /// # async fn demo(publisher: idem::publisher::Publisher) {
    /// use futures::StreamExt;
    /// use idem::publisher::Outgoing;
    ///
    /// let messages = (0..10_000).map(|i| Outgoing::new("orders.created", format!("{i}")).with_id(format!("order-{i}")));
    /// let results: Vec<_> = publisher.publish_all(futures::stream::iter(messages), 256).collect().await;
    /// assert!(results.iter().all(|r| r.is_ok()));
    /// # }
    /// ```
    pub fn publish_all<S>(
        &self,
        messages: S,
        window: usize,
    ) -> impl Stream<Item = Result<Published, PublishError>> + Send + 'static
    where
        S: Stream<Item = Outgoing> + Send + 'static,
    {
        let publisher = self.clone();
        messages
            .map(move |message| {
                let publisher = publisher.clone();
                async move { publisher.send(message).await }
            })
            .buffered(window.max(1))
    }

    /// Returns once the client is connected (the caller bounds the wait).
    async fn connected(&self) {
        use async_nats::connection::State;
        while self.inner.client.connection_state() != State::Connected {
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// One send and its PubAck (the caller bounds it).
    async fn attempt(&self, message: &Outgoing) -> Result<Attempt, Resolve> {
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(message.headers.clone())
            .message_id(&message.id);
        let sent = async {
            let ack = self
                .inner
                .js
                .send_publish(message.subject.clone(), publish)
                .await?;
            ack.await
        };
        match sent.await {
            Ok(ack) => Ok(Attempt::Confirmed(ack)),
            Err(e) => match e.kind() {
                // Lost PubAck, broken connection, no responders while a
                // stream leader is elected or the server restarts.
                PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::StreamNotFound
                | PublishErrorKind::MaxAckPending => Ok(Attempt::Transient(Box::new(e))),
                // A replicated stream is still storing the first copy of
                // this id (10158): the resend will be answered "duplicate".
                PublishErrorKind::Other if in_process(&e) => Ok(Attempt::Transient(Box::new(e))),
                PublishErrorKind::MaxPayloadExceeded => {
                    Err(Resolve::Fatal(PublishError::PayloadTooLarge {
                        size: message.size(),
                        max: self.max_payload(),
                    }))
                }
                _ => Err(Resolve::Fatal(PublishError::Rejected {
                    message_id: message.id.clone(),
                    source: Box::new(e),
                })),
            },
        }
    }

    /// Finds the stream capturing `subject` and checks its duplicate window
    /// against the deadline, once per subject: the caller skips subjects
    /// already known, and a send that waited here for another's lookup of
    /// the same subject finds it known.
    async fn check_stream(&self, subject: &str) -> Result<(), Resolve> {
        let _looking = self.inner.lookup.lock().await;
        if self.known_subjects().contains(subject) {
            return Ok(());
        }
        let stream = match self.inner.js.stream_by_subject(subject).await {
            Ok(stream) => stream,
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                return Err(Resolve::Fatal(PublishError::NoStream {
                    subject: subject.to_owned(),
                }));
            }
            Err(e) => return Err(Resolve::Transient(Box::new(e))),
        };
        let mut info = self
            .inner
            .js
            .get_stream(&stream)
            .await
            .map_err(|e| Resolve::Transient(Box::new(e)))?;
        let window = info
            .info()
            .await
            .map_err(|e| Resolve::Transient(Box::new(e)))?
            .config
            .duplicate_window;
        if window < self.inner.config.deadline {
            return Err(Resolve::Fatal(PublishError::DuplicateWindowTooShort {
                stream,
                window,
                horizon: self.inner.config.deadline,
            }));
        }
        let mut known = self.known_subjects();
        // Publishers to ever-new subjects (orders.<id>) must not grow this
        // without bound; a cleared set costs one lookup per subject.
        if known.len() >= MAX_KNOWN_SUBJECTS {
            known.clear();
        }
        known.insert(subject.to_owned());
        Ok(())
    }

    fn known_subjects(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A failure before or of an attempt.
enum Resolve {
    /// Bad input or a refusal: never resent.
    Fatal(PublishError),
    /// Worth another attempt.
    Transient(BoxError),
}

/// Whether the server answered "duplicate message id is in process" (10158):
/// a resend that overtook the replication of its first copy.
fn in_process(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::server_error::codes(error)
        .any(|code| code == async_nats::jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT)
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    use super::in_process;

    fn server_error(code: u64) -> PublishError {
        let error: async_nats::jetstream::Error = serde_json::from_str(&format!(
            r#"{{"code":409,"err_code":{code},"description":"from the server"}}"#
        ))
        .expect("a JetStream error");
        PublishError::with_source(PublishErrorKind::Other, error)
    }

    #[test]
    fn a_copy_still_being_stored_is_resent_other_refusals_are_not() {
        assert!(in_process(&server_error(10158)));
        assert!(!in_process(&server_error(10060)));
    }
}
