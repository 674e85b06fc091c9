//! The handler contract: what `#[idempotent]` generates for a function, and
//! the typed steps the runtime takes with it before any claim is made.
//!
//! The attribute turns `async fn issue_card(...)` into a unit struct
//! `issue_card` that implements [`Handler`]: its arguments come from
//! [`FromDelivery`] extractors, its key and fingerprint from the attribute,
//! its body runs in [`Handler::call`]. Everything else — claims, leases,
//! acks, retries — is the runtime's.

mod config;
mod panicked;
mod reason;

use std::future::Future;

use bytes::Bytes;

pub use config::{ConfigError, Dedup, FingerprintSource, HandlerConfig, OnMissingKey, StartAt};
pub(crate) use panicked::HandlerPanicked;
pub use reason::DeadLetterReason;

use crate::extract::{FromDelivery, Rejection, StateMap};
use crate::fingerprint::Fingerprint;
use crate::key::{IdempotencyKey, KeyError};
use crate::{Delivery, HandlerError};

/// An idempotent message handler. Written by `#[idempotent]`; implement it
/// by hand only for handlers the attribute cannot express.
///
/// ```
/// use idem::handler::{Handler, HandlerConfig};
/// use idem::key::{IdempotencyKey, KeyError, to_key};
/// use idem::{Delivery, HandlerError, Json};
///
/// #[derive(serde::Deserialize)]
/// struct Payment { id: u64 }
///
/// struct IssueCard;
///
/// impl Handler for IssueCard {
///     type Args = (Json<Payment>,);
///     type Output = ();
///
///     fn config(&self) -> HandlerConfig {
///         HandlerConfig::new("issue_card", "PAYMENTS")
///     }
///     fn key(&self, (Json(payment),): &Self::Args, _: &Delivery) -> Result<IdempotencyKey, KeyError> {
///         to_key(&payment.id)
///     }
///     async fn call(&self, (Json(payment),): Self::Args) -> Result<(), HandlerError> {
///         println!("card for payment {}", payment.id);
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The arguments, extracted from each delivery.
    type Args: FromDelivery;
    /// The value of a successful call.
    type Output: Send + 'static;

    /// The static configuration.
    fn config(&self) -> HandlerConfig;

    /// The idempotency key of a delivery.
    fn key(&self, args: &Self::Args, delivery: &Delivery) -> Result<IdempotencyKey, KeyError>;

    /// The fingerprint that tells a duplicate from a reused key: by default
    /// the payload's.
    fn fingerprint(
        &self,
        args: &Self::Args,
        delivery: &Delivery,
    ) -> Result<Option<Fingerprint>, KeyError> {
        let _ = args;
        Ok(Some(Fingerprint::of(delivery.payload())))
    }

    /// The result to store for duplicates (`store_result`); none by default.
    fn encode_result(&self, output: &Self::Output) -> Result<Option<Bytes>, serde_json::Error> {
        let _ = output;
        Ok(None)
    }

    /// What a duplicate's delivery does, given the arguments made from it
    /// and the result stored when its key completed (`None` if none was
    /// stored): nothing by default. `on_duplicate = hook` on the attribute
    /// calls `hook(previous, <the handler's arguments but its Tx>)` — a
    /// duplicate has no transaction of its own — e.g. to announce
    /// the outcome again for a consumer that missed it — without running
    /// the effect again. Its `Err` is retried and dead-lettered as a
    /// handler's; the key stays completed either way.
    fn on_duplicate(
        &self,
        args: Self::Args,
        stored: Option<Bytes>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (args, stored);
        std::future::ready(Ok(()))
    }

    /// Runs the handler's body.
    fn call(
        &self,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, HandlerError>> + Send;
}

/// A delivery ready to be claimed: arguments made, key and fingerprint known.
#[derive(Debug)]
pub struct Prepared<A> {
    /// The handler's arguments.
    pub args: A,
    /// The idempotency key.
    pub key: IdempotencyKey,
    /// The payload fingerprint, if the handler uses one.
    pub fingerprint: Option<Fingerprint>,
}

/// Why a delivery never reaches its handler. Each is dead-lettered with its
/// reason (or, for a missing key under `on_missing_key = reject`,
/// acknowledged and counted).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PrepareError {
    /// The arguments could not be made (reason `decode`).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// No key could be extracted (reason `missing_key`).
    #[error(transparent)]
    Key(#[from] KeyError),
}

crate::error::debug_as_report!(PrepareError);

impl PrepareError {
    /// The dead letter's `Idem-Reason`.
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            PrepareError::Rejected(Rejection::MissingState { .. }) => {
                DeadLetterReason::MissingState
            }
            PrepareError::Rejected(_) => DeadLetterReason::Decode,
            PrepareError::Key(_) => DeadLetterReason::MissingKey,
        }
    }
}

/// A duplicate's stored result that no longer decodes as the handler's
/// `Ok` type (it changed since the key completed): `on_duplicate` cannot be
/// called, and the duplicate is dead-lettered with this error.
#[derive(Debug, thiserror::Error)]
#[error("the stored result does not decode as {target}: {source}")]
pub struct StoredResultUndecodable {
    /// The handler's `Ok` type.
    pub target: &'static str,
    /// The decoder's error.
    #[source]
    pub source: serde_json::Error,
}

/// Extracts the arguments, the key and the fingerprint of a delivery for
/// `handler` — the steps before the claim.
///
/// ```
/// # use idem::handler::{Handler, HandlerConfig, prepare};
/// # use idem::key::{IdempotencyKey, KeyError, to_key};
/// # use idem::{Delivery, HandlerError, Json};
/// # use idem::extract::StateMap;
/// # #[derive(serde::Deserialize)] struct Payment { id: u64 }
/// # struct IssueCard;
/// # impl Handler for IssueCard {
/// #     type Args = (Json<Payment>,);
/// #     type Output = ();
/// #     fn config(&self) -> HandlerConfig { HandlerConfig::new("issue_card", "PAYMENTS") }
/// #     fn key(&self, (Json(p),): &Self::Args, _: &Delivery) -> Result<IdempotencyKey, KeyError> { to_key(&p.id) }
/// #     async fn call(&self, _: Self::Args) -> Result<(), HandlerError> { Ok(()) }
/// # }
/// let ready = prepare(&IssueCard, &Delivery::new("payments", r#"{"id":9}"#), &StateMap::default())?;
/// assert_eq!(ready.key.as_bytes(), b"9");
///
/// let garbage = prepare(&IssueCard, &Delivery::new("payments", "not json"), &StateMap::default());
/// assert_eq!(garbage.err().map(|e| e.reason().as_str()), Some("decode"));
/// # Ok::<(), idem::handler::PrepareError>(())
/// ```
pub fn prepare<H: Handler>(
    handler: &H,
    delivery: &Delivery,
    state: &StateMap,
) -> Result<Prepared<H::Args>, PrepareError> {
    let args = H::Args::from_delivery(delivery, state)?;
    let key = handler.key(&args, delivery)?;
    let fingerprint = handler.fingerprint(&args, delivery)?;
    Ok(Prepared {
        args,
        key,
        fingerprint,
    })
}
