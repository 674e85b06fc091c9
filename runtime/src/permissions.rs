//! Permission violations, named as such.
//!
//! A NATS server that refuses a publish or a subscription for lack of
//! permission tells only the client connection (`-ERR 'Permissions
//! Violation for Publish to "…"'`), and drops the message: a request then
//! simply goes unanswered. async-nats hands these errors to the
//! connection's event callback, so idem can only see them through it:
//! connect with [`watch`] (or call [`record`] from your own callback), and
//! a start-up that meets silence reports
//! [`RuntimeError::PermissionDenied`](crate::consumer::RuntimeError::PermissionDenied)
//! naming the subject the server refused, at once, instead of waiting and
//! then blaming the servers. docs/permissions.md lists what each role
//! needs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), async_nats::ConnectError> {
//! let client = idem::permissions::watch(async_nats::ConnectOptions::new())
//!     .connect("nats://127.0.0.1:4222")
//!     .await?;
//! # let _ = client; Ok(()) }
//! ```

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// What the server refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Publishing (a request is a publish).
    Publish,
    /// Subscribing.
    Subscribe,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Publish => "publish to",
            Operation::Subscribe => "subscribe to",
        })
    }
}

/// One refusal the server reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// What was refused.
    pub operation: Operation,
    /// The subject.
    pub subject: String,
    /// When the client heard of it.
    pub at: Instant,
}

/// The most refusals remembered (the newest).
const REMEMBERED: usize = 64;

static DENIALS: Mutex<VecDeque<Denial>> = Mutex::new(VecDeque::new());

/// `options` with an event callback that records the server's permission
/// violations (and logs every event at `warn`).
pub fn watch(options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
    options.event_callback(|event| async move {
        tracing::warn!(%event, "NATS connection event");
        record(&event);
    })
}

/// Records `event` if it is a permission violation; for a connection whose
/// event callback is your own.
///
/// ```
/// use async_nats::{Event, ServerError};
///
/// let event = Event::ServerError(ServerError::Other(
///     r#"Permissions Violation for Publish to "$JS.API.STREAM.NAMES""#.into(),
/// ));
/// assert_eq!(
///     idem::permissions::parse(&event).map(|d| d.subject),
///     Some("$JS.API.STREAM.NAMES".to_owned())
/// );
/// idem::permissions::record(&event);
/// ```
pub fn record(event: &async_nats::Event) {
    if let Some(denial) = parse(event) {
        let mut denials = DENIALS.lock().unwrap_or_else(PoisonError::into_inner);
        if denials.len() == REMEMBERED {
            denials.pop_front();
        }
        denials.push_back(denial);
    }
}

/// The refusal an event reports, if it is one.
pub fn parse(event: &async_nats::Event) -> Option<Denial> {
    let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = event else {
        return None;
    };
    let rest = text.strip_prefix("Permissions Violation for ")?;
    let (operation, rest) = if let Some(rest) = rest.strip_prefix("Publish to ") {
        (Operation::Publish, rest)
    } else {
        (Operation::Subscribe, rest.strip_prefix("Subscription to ")?)
    };
    let subject = rest.trim().trim_matches('"');
    // "… to \"subject\" using queue \"q\"": the subject is the first quoted part.
    let subject = subject.split('"').next().unwrap_or(subject).to_owned();
    Some(Denial {
        operation,
        subject,
        at: Instant::now(),
    })
}

/// The first refusal recorded at or after `since` of a subject `concerns`
/// admits. (Refusals are heard process-wide — async-nats gives them to a
/// connection's callback without saying which request met them — so a
/// caller names what it could have caused: another part of the program
/// publishing to a subject it may not must not be blamed on it.)
pub(crate) fn denied_since(since: Instant, concerns: impl Fn(&str) -> bool) -> Option<Denial> {
    DENIALS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|d| d.at >= since && concerns(&d.subject))
        .cloned()
}

/// Whether a refused subject is one a handler's start-up asks for: the
/// JetStream API about its stream, consumer, dead-letter stream or a claim
/// bucket (or the account's JetStream info), the claim buckets' own
/// subjects, reply inboxes, and its service's subjects.
pub(crate) fn concerns_start_up(config: &crate::handler::HandlerConfig, subject: &str) -> bool {
    let mentions = |name: &str| {
        !name.is_empty()
            && subject
                .split('.')
                .any(|token| token == name || token.strip_prefix("KV_").is_some())
    };
    let api = subject.starts_with("$JS.API.")
        && (subject == "$JS.API.INFO"
            || subject.starts_with("$JS.API.STREAM.NAMES")
            || mentions(&config.stream)
            || mentions(&config.consumer)
            || mentions(crate::consumer::DEAD_LETTER_STREAM));
    let service = config.service.is_some()
        && (subject.starts_with("$SRV.") || config.subject.as_deref() == Some(subject));
    api || service || subject.starts_with("$KV.") || subject.starts_with("_INBOX.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerConfig;

    #[test]
    fn an_unrelated_refusal_is_not_blamed_on_a_handlers_start_up() {
        let config = HandlerConfig::new("ship_order", "ORDERS");
        for unrelated in [
            "orders.audit",
            "$JS.API.STREAM.INFO.PAYMENTS",
            "$JS.API.CONSUMER.INFO.PAYMENTS.charge",
        ] {
            assert!(!concerns_start_up(&config, unrelated), "{unrelated}");
        }
        for related in [
            "$JS.API.STREAM.INFO.ORDERS",
            "$JS.API.CONSUMER.DURABLE.CREATE.ORDERS.ship_order",
            "$JS.API.STREAM.INFO.KV_idem_claims",
            "$JS.API.STREAM.INFO.IDEM_DEAD_LETTERS",
            "$JS.API.STREAM.NAMES",
            "$KV.idem_claims.idem=handlers.ship_order",
            "_INBOX.abc.def",
        ] {
            assert!(concerns_start_up(&config, related), "{related}");
        }
    }
}
