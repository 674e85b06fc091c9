//! One delivery of a JetStream message, as handlers and extractors see it.

use async_nats::HeaderMap;
use bytes::Bytes;

/// The message being handled: subject, payload, headers and JetStream
/// metadata. Extract it whole with `delivery: Delivery` in a handler's
/// arguments.
///
/// ```
/// use idem::Delivery;
///
/// let delivery = Delivery::new("payments.succeeded", r#"{"id":1}"#)
///     .with_header("Idempotency-Key", "pay-1")
///     .with_delivered(2);
/// assert_eq!(delivery.header("Idempotency-Key"), Some("pay-1"));
/// assert_eq!(delivery.delivered(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct Delivery {
    subject: String,
    payload: Bytes,
    headers: HeaderMap,
    stream: String,
    stream_sequence: u64,
    delivered: u64,
}

/// The header that carries the broker-level message id.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

impl Delivery {
    /// A first delivery of `payload` on `subject` (for tests and tools).
    pub fn new(subject: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            subject: subject.into(),
            payload: payload.into(),
            headers: HeaderMap::new(),
            stream: String::new(),
            stream_sequence: 0,
            delivered: 1,
        }
    }

    /// The delivery of a JetStream message as the runtime received it.
    pub(crate) fn from_jetstream(message: &async_nats::jetstream::Message) -> Self {
        let (stream, stream_sequence, delivered) = message
            .info()
            .map(|info| {
                (
                    info.stream.to_owned(),
                    info.stream_sequence,
                    u64::try_from(info.delivered).unwrap_or(1),
                )
            })
            .unwrap_or_default();
        Self {
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            headers: message.headers.clone().unwrap_or_default(),
            stream,
            stream_sequence,
            delivered: delivered.max(1),
        }
    }

    /// A request to a request/reply handler: subject, payload and headers;
    /// no stream, first delivery.
    pub(crate) fn from_request(message: &async_nats::Message) -> Self {
        Self {
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            headers: message.headers.clone().unwrap_or_default(),
            stream: String::new(),
            stream_sequence: 0,
            delivered: 1,
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the stream and the message's sequence in it.
    pub fn with_stream(mut self, stream: impl Into<String>, sequence: u64) -> Self {
        self.stream = stream.into();
        self.stream_sequence = sequence;
        self
    }

    /// Sets how many times the message has been delivered, this time included.
    pub fn with_delivered(mut self, delivered: u64) -> Self {
        self.delivered = delivered;
        self
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// All headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// One header's (first) value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// The broker message id (`Nats-Msg-Id`) the producer sent, if any.
    pub fn message_id(&self) -> Option<&str> {
        self.header(MSG_ID_HEADER)
    }

    /// The stream the message is stored in.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The message's sequence in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }

    /// How many times it has been delivered, this time included (1 at first):
    /// the attempt number retry policies count.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}
