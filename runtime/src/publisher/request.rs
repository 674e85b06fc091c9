//! The asking side of idempotent request/reply: send the *same* request
//! (same payload, same headers, so the same key) again after a timeout or a
//! retryable error reply, until an answer comes — the endpoint runs it once
//! and answers every copy with the stored reply.

use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::sleep;
use tracing::debug;

use crate::reply::{KIND_HEADER, ReplyErrorKind};
use crate::retry::{Retry, RetryDecision};

/// Why a request got no answer.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The endpoint answered with an error asking again cannot cure (or
    /// with a retryable one on the last attempt).
    #[error("{subject}: the endpoint answered {kind} ({code}): {message}")]
    Refused {
        /// The request's subject.
        subject: String,
        /// Why (the `Idem-Error` header; `failed` for a service error
        /// without one).
        kind: ReplyErrorKind,
        /// The service error code.
        code: usize,
        /// The endpoint's message.
        message: String,
    },
    /// No answer within the retry policy's attempts (timeouts, no
    /// responders, retryable error replies).
    #[error("{subject}: no answer after {attempts} attempts; the last: {last}")]
    GaveUp {
        /// The request's subject.
        subject: String,
        /// How many requests were sent.
        attempts: u32,
        /// What the last attempt met.
        last: String,
    },
    /// The request cannot be sent at all (a subject with spaces, a payload
    /// over the server's `max_payload`): asking again cannot help.
    #[error("{subject}: the request cannot be sent: {source}")]
    Unsendable {
        /// The request's subject.
        subject: String,
        /// The client library's error.
        #[source]
        source: async_nats::RequestError,
    },
    /// The request could not be encoded as JSON.
    #[error("the request does not encode as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// The answer is not the JSON the caller expects.
    #[error("the reply does not decode as {target}: {source}")]
    Decode {
        /// The expected type.
        target: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
}

crate::error::debug_as_report!(RequestError);

impl RequestError {
    /// The endpoint's refusal, if that is why.
    pub fn kind(&self) -> Option<ReplyErrorKind> {
        match self {
            RequestError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Sends requests to idempotent endpoints, asking again with the same
/// request until one is answered.
///
/// The key must be in the request (its payload, or a header the handler's
/// `key = header("…")` reads): each copy is then the same operation, and the
/// endpoint answers every copy after the first from its stored result.
///
/// ```no_run
/// # async fn demo(client: async_nats::Client) -> Result<(), idem::publisher::RequestError> {
/// use std::time::Duration;
/// use idem::publisher::Requester;
///
/// #[derive(serde::Serialize)]
/// struct Charge { charge_id: String, cents: u64 }
/// #[derive(serde::Deserialize)]
/// struct Receipt { receipt: String }
///
/// let requester = Requester::new(client).timeout(Duration::from_secs(2));
/// let receipt: Receipt = requester
///     .request_json("payments.charge", &Charge { charge_id: "ch-1".into(), cents: 500 })
///     .await?;
/// println!("{}", receipt.receipt);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Requester {
    client: async_nats::Client,
    timeout: Duration,
    retry: Retry,
}

impl Requester {
    /// A requester with the defaults: 5 s per attempt; asking again after
    /// 100 ms, doubling to 5 s, with jitter, 8 attempts in all.
    pub fn new(client: async_nats::Client) -> Self {
        Self {
            client,
            timeout: Duration::from_secs(5),
            retry: Retry::exponential(Duration::from_millis(100), Duration::from_secs(5))
                .attempts(8)
                .jitter(),
        }
    }

    /// How long one attempt waits for its reply.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// When to ask again, and how often (see [`Retry`]).
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sends `payload` to `subject` until it is answered; the reply's body.
    pub async fn request(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes, RequestError> {
        self.request_with_headers(subject, HeaderMap::new(), payload)
            .await
    }

    /// [`request`](Self::request), JSON both ways.
    pub async fn request_json<Q: Serialize, A: DeserializeOwned>(
        &self,
        subject: &str,
        request: &Q,
    ) -> Result<A, RequestError> {
        let payload = serde_json::to_vec(request).map_err(RequestError::Encode)?;
        let reply = self.request(subject, payload).await?;
        serde_json::from_slice(&reply).map_err(|source| RequestError::Decode {
            target: std::any::type_name::<A>(),
            source,
        })
    }

    /// [`request`](Self::request) with headers (e.g. an
    /// `Idempotency-Key`), sent unchanged with every copy.
    pub async fn request_with_headers(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes, RequestError> {
        let payload = payload.into();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = match self.attempt(subject, &headers, &payload).await {
                Ok(body) => return Ok(body),
                Err(Attempt::Refused(refused)) => match refused.kind() {
                    Some(kind) if kind.is_retryable() => refused.to_string(),
                    _ => return Err(refused),
                },
                Err(Attempt::Unanswered(why)) => why,
                Err(Attempt::Fatal(error)) => return Err(error),
            };
            match self.retry.after_failure(attempt) {
                RetryDecision::RetryAfter(pause) => {
                    debug!(subject, attempt, ?pause, why = %last, "no answer; asking again with the same request");
                    sleep(pause).await;
                }
                RetryDecision::GiveUp => {
                    return Err(RequestError::GaveUp {
                        subject: subject.to_owned(),
                        attempts: attempt,
                        last,
                    });
                }
            }
        }
    }

    async fn attempt(
        &self,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> Result<Bytes, Attempt> {
        let request = async_nats::Request::new()
            .payload(payload.clone())
            .headers(headers.clone())
            .timeout(Some(self.timeout));
        let reply = match self.client.send_request(subject.to_owned(), request).await {
            Ok(reply) => reply,
            Err(e) => {
                let why = match e.kind() {
                    RequestErrorKind::TimedOut => format!("no reply within {:?}", self.timeout),
                    RequestErrorKind::NoResponders => "no endpoint is serving the subject".into(),
                    RequestErrorKind::Other => e.to_string(),
                    RequestErrorKind::InvalidSubject | RequestErrorKind::MaxPayloadExceeded => {
                        return Err(Attempt::Fatal(RequestError::Unsendable {
                            subject: subject.to_owned(),
                            source: e,
                        }));
                    }
                };
                return Err(Attempt::Unanswered(why));
            }
        };
        match refusal(subject, reply.headers.as_ref()) {
            Some(refused) => Err(Attempt::Refused(refused)),
            None => Ok(reply.payload),
        }
    }
}

/// How one attempt ended without an answer.
enum Attempt {
    Refused(RequestError),
    Unanswered(String),
    Fatal(RequestError),
}

/// The error a reply's headers carry, if it is one.
fn refusal(subject: &str, headers: Option<&HeaderMap>) -> Option<RequestError> {
    let headers = headers?;
    let message = headers.get("Nats-Service-Error")?.as_str().to_owned();
    let code = headers
        .get("Nats-Service-Error-Code")
        .and_then(|code| code.as_str().parse().ok())
        .unwrap_or(500);
    let kind = headers
        .get(KIND_HEADER)
        .and_then(|kind| ReplyErrorKind::parse(kind.as_str()))
        .unwrap_or(ReplyErrorKind::Failed);
    Some(RequestError::Refused {
        subject: subject.to_owned(),
        kind,
        code,
        message,
    })
}
