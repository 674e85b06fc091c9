//! A server-free driver for unit tests of your own handlers: deliveries go
//! through the steps the runtime takes — arguments and key
//! (`handler::prepare`), the claim (on a [`MemoryStore`], the claim state
//! machine every store shares), the run with panics caught, completion with
//! the stored result, the retry policy's decision, the dead letter's reason
//! — and come back as a [`Handled`] outcome. No `nats-server`, no sleeping:
//! a retry's delay is reported, not waited for.
//!
//! What it leaves out is the transport: acks, leases renewed while a
//! handler runs, in-progress acks, redelivery timing. Handlers that take a
//! [`Tx`](crate::Tx) (`dedup = transactional`) need a database: test them
//! against the runtime.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;

use crate::claim::ClaimOutcome;
use crate::delivery_core::{Failure, after_failure};
use crate::extract::StateMap;
use crate::handler::HandlerPanicked;
use crate::handler::{
    DeadLetterReason, Dedup, Handler, HandlerConfig, OnMissingKey, PrepareError, prepare,
};
use crate::key::{HandlerName, RecordKey};
use crate::store::{DedupStore, MemoryStore};
use crate::{Delivery, Fence, HandlerError};

/// What became of one delivery.
#[derive(Debug)]
#[non_exhaustive]
pub enum Handled<T> {
    /// The handler returned `Ok`; its completion is recorded.
    Processed(T),
    /// A duplicate: acknowledged without running (`on_duplicate`, if the
    /// handler has one, was called with `stored`).
    Duplicate {
        /// The result stored when the key completed.
        stored: Option<Bytes>,
    },
    /// Another delivery holds the key: it would come back after `after`.
    InFlight {
        /// When to try again.
        after: Duration,
    },
    /// A failed attempt, to be retried after `after`.
    Retry {
        /// The policy's delay (at least the error's hint).
        after: Duration,
        /// The failure.
        error: HandlerError,
    },
    /// Given up: the message would be dead-lettered with `reason`.
    DeadLettered {
        /// Its `Idem-Reason`.
        reason: DeadLetterReason,
        /// Its `Idem-Error`.
        error: String,
    },
    /// No key and `on_missing_key = reject`: acknowledged and dropped.
    Rejected,
}

/// Feeds deliveries to one handler as the runtime would, without a server.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use idem::testing::{Driver, Handled};
/// use idem::{idempotent, Delivery, HandlerError, Json};
///
/// #[idempotent(stream = "ORDERS", key = id, store_result)]
/// async fn confirm(Json(id): Json<u64>) -> Result<String, HandlerError> {
///     Ok(format!("confirmed {id}"))
/// }
///
/// let mut driver = Driver::new(confirm);
/// let first = driver.deliver(Delivery::new("orders", "7")).await;
/// assert!(matches!(first, Handled::Processed(ref text) if text == "confirmed 7"));
/// let again = driver.deliver(Delivery::new("orders", "7")).await;
/// assert!(matches!(again, Handled::Duplicate { stored: Some(_) }));
/// let garbage = driver.deliver(Delivery::new("orders", "seven")).await;
/// assert!(matches!(garbage, Handled::DeadLettered { reason, .. } if reason.as_str() == "decode"));
/// # }
/// ```
pub struct Driver<H> {
    handler: H,
    config: HandlerConfig,
    state: StateMap,
    store: MemoryStore,
}

impl<H: Handler> Driver<H> {
    /// A driver for `handler`, with its own configuration and an empty
    /// store.
    pub fn new(handler: H) -> Self {
        let config = handler.config();
        Self {
            store: MemoryStore::new(config.retention),
            handler,
            config,
            state: StateMap::default(),
        }
    }

    /// Adds state for `State<T>` arguments, as `.state(value)` on the
    /// runtime builder does.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.insert(value);
        self
    }

    /// The store the claims are in (to inspect or `forget` keys).
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// Handles one delivery.
    pub async fn deliver(&mut self, delivery: Delivery) -> Handled<H::Output> {
        let fence = Fence::unset();
        let mut state = self.state.clone();
        state.insert(fence.clone());
        let prepared = match prepare(&self.handler, &delivery, &state) {
            Ok(prepared) => prepared,
            Err(PrepareError::Key(_)) if self.config.on_missing_key == OnMissingKey::Reject => {
                return Handled::Rejected;
            }
            Err(rejected) => {
                return Handled::DeadLettered {
                    reason: rejected.reason(),
                    error: rejected.to_string(),
                };
            }
        };
        if self.config.dedup == Dedup::Off {
            let attempt = u32::try_from(delivery.delivered()).unwrap_or(u32::MAX);
            return match self.run(prepared.args).await {
                Ok(output) => Handled::Processed(output),
                Err(error) => decided(&self.config, error, attempt),
            };
        }
        let Ok(name) = HandlerName::new(&self.config.name) else {
            return Handled::DeadLettered {
                reason: DeadLetterReason::MissingKey,
                error: format!("invalid handler name {:?}", self.config.name),
            };
        };
        let key = RecordKey::new(&name, &prepared.key);
        let claim = match self
            .store
            .claim(&key, prepared.fingerprint, self.config.lease)
            .await
        {
            Ok(ClaimOutcome::Claimed(claim) | ClaimOutcome::Reclaimed { claim, .. }) => claim,
            Ok(ClaimOutcome::Duplicate { result }) => {
                if self.config.on_duplicate
                    && let Err(error) = self
                        .handler
                        .on_duplicate(prepared.args, result.clone())
                        .await
                {
                    let attempt = u32::try_from(delivery.delivered()).unwrap_or(u32::MAX);
                    return decided(&self.config, error, attempt);
                }
                return Handled::Duplicate { stored: result };
            }
            Ok(ClaimOutcome::Dead) => return Handled::Duplicate { stored: None },
            Ok(ClaimOutcome::KeyConflict { stored }) => {
                return Handled::DeadLettered {
                    reason: DeadLetterReason::KeyConflict,
                    error: format!(
                        "key already claimed with another payload (stored fingerprint {stored:?})"
                    ),
                };
            }
            Ok(ClaimOutcome::InFlight { retry_after, .. }) => {
                return Handled::InFlight { after: retry_after };
            }
            // The runtime NAKs with backoff when its store fails (fail
            // closed); a memory store does not.
            Err(error) => {
                tracing::warn!(%error, "the memory store failed: not run");
                return Handled::InFlight {
                    after: Duration::from_millis(250),
                };
            }
        };
        fence.set(claim.revision);
        let attempt = claim.attempt;
        match self.run(prepared.args).await {
            Ok(output) => {
                let stored = if self.config.store_result {
                    self.handler.encode_result(&output).ok().flatten()
                } else {
                    None
                };
                let _ = self.store.complete(&claim, stored).await;
                Handled::Processed(output)
            }
            Err(error) => {
                let outcome = decided(&self.config, error, attempt);
                match outcome {
                    Handled::DeadLettered { .. } => {
                        let _ = self.store.mark_dead(&claim).await;
                    }
                    _ => {
                        let _ = self.store.release(&claim).await;
                    }
                }
                outcome
            }
        }
    }

    /// Delivers `delivery` again after each retry (no waiting) until it is
    /// processed, a duplicate, dead-lettered or rejected; the outcome and
    /// how many deliveries it took.
    pub async fn deliver_until_settled(&mut self, delivery: Delivery) -> (Handled<H::Output>, u64) {
        let mut delivered = delivery.delivered();
        loop {
            let outcome = self
                .deliver(delivery.clone().with_delivered(delivered))
                .await;
            match outcome {
                Handled::Retry { .. } | Handled::InFlight { .. } if delivered < 10_000 => {
                    delivered += 1
                }
                settled => return (settled, delivered),
            }
        }
    }

    async fn run(&self, args: H::Args) -> Result<H::Output, HandlerError> {
        match AssertUnwindSafe(self.handler.call(args))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(payload) => Err(HandlerError::retryable(HandlerPanicked::from_payload(
                &*payload,
            ))),
        }
    }
}

/// The runtime's decision on a failed attempt, as an outcome.
fn decided<T>(config: &HandlerConfig, error: HandlerError, attempt: u32) -> Handled<T> {
    match after_failure(&config.retry, &error, attempt) {
        Failure::Retry(after) => Handled::Retry { after, error },
        Failure::DeadLetter(reason) => Handled::DeadLettered {
            reason,
            error: error.to_string(),
        },
    }
}
