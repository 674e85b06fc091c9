//! A message on its way to the broker: subject, payload, headers, and the
//! message id every resend repeats.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;

use super::PublishError;

/// An outgoing message.
///
/// The id defaults to a fresh UUID v7. Give one derived from the business
/// operation (`with_id`) when the operation itself may be re-run after a
/// crash: the re-run then repeats the id and the broker drops the copy.
///
/// ```
/// use idem::publisher::Outgoing;
///
/// let message = Outgoing::new("payments.succeeded", "{}").with_id("payment-42").header("Source", "checkout");
/// assert_eq!(message.id(), "payment-42");
/// assert_eq!(message.subject(), "payments.succeeded");
/// ```
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub(crate) subject: String,
    pub(crate) payload: Bytes,
    pub(crate) id: String,
    pub(crate) headers: HeaderMap,
}

impl Outgoing {
    /// A message with a fresh UUID v7 id.
    pub fn new(subject: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            subject: subject.into(),
            payload: payload.into(),
            id: uuid::Uuid::now_v7().to_string(),
            headers: HeaderMap::new(),
        }
    }

    /// A message whose payload is `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(
        subject: impl Into<String>,
        value: &T,
    ) -> Result<Self, PublishError> {
        Ok(Self::new(subject, serde_json::to_vec(value)?))
    }

    /// Sets the message id (`Nats-Msg-Id`).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The message with the current span's trace context in its headers
    /// (feature `opentelemetry`; see `trace.rs`).
    pub(crate) fn traced(mut self) -> Self {
        crate::trace::inject(&mut self.headers);
        self
    }

    /// The headers as (name, value) pairs, for storing the message.
    pub(crate) fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(move |v| (name.to_owned(), v.as_str().to_owned()))
            })
            .collect()
    }

    /// Adds headers read back from storage.
    pub(crate) fn with_header_pairs(
        mut self,
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        for (name, value) in pairs {
            self.headers.append(name.as_str(), value.as_str());
        }
        self
    }

    /// Payload plus headers, as the server counts them against max_payload
    /// (approximately: header framing is counted generously).
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        self.payload.len() + headers + self.id.len() + "NATS/1.0\r\nNats-Msg-Id: \r\n\r\n\r\n".len()
    }
}
