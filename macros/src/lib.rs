//! The `#[idempotent]` attribute of idem. Use it through the `idem` crate:
//! `use idem::idempotent;`.
//!
//! A parser (`options`, `signature`), a validator (`validate`) and an
//! expander (`expand`): errors are collected from all three and reported
//! together, each at its own token; behaviour lives in the runtime.

mod errors;
mod expand;
mod options;
mod retry;
mod signature;
mod validate;

use proc_macro::TokenStream;
use syn::ItemFn;

use errors::Errors;
use options::{Options, RawOptions};

/// Turns an `async fn` into an idempotent JetStream message handler.
///
/// The function becomes a unit struct of the same name implementing
/// `idem::Handler`: register it with the runtime by name. Its body stays
/// callable as `name::run(...)`.
///
/// ```ignore
/// #[idem::idempotent(
///     stream = "PAYMENTS",
///     subject = "payments.succeeded",
///     key = payment.payment_id,
///     retention = "7d",
///     retry = Retry::exponential("200ms", "30s").attempts(8).jitter(),
///     dead_letter = "payments.dead",
/// )]
/// async fn issue_membership_card(
///     Json(payment): Json<PaymentSucceeded>,
///     State(cards): State<CardService>,
/// ) -> Result<CardId, HandlerError> { … }
/// ```
///
/// # Options
///
/// | option | default | meaning |
/// |---|---|---|
/// | `stream = "NAME"` | required (or `service`) | the JetStream stream consumed |
/// | `name = "NAME"` | the function's name | the handler's identity: its claims, consumer, stats and dead-letter subject are keyed by it. Set it to keep the identity when renaming the function; unique in a runtime (and in a claim bucket, across services) |
/// | `start = all \| new \| <sequence>` | none | where a *new* durable consumer starts. Without it, a new consumer on a stream that already holds its messages is refused at start-up (a renamed handler would replay them) |
/// | `consumer = "NAME"` | the handler's name | the durable consumer |
/// | `subject = "a.b.>"` | all the stream's subjects | the filter subject |
/// | `key = …` | required unless `dedup = off` | the idempotency key: an expression over the arguments (`order.id`, `(order.id, line.no)`), `header("Idempotency-Key")`, `msg_id` (the producer's `Nats-Msg-Id`), or a function path `fn(&Delivery) -> impl ToKey` |
/// | `dedup = off \| kv \| transactional` | `kv` | where claims live: none, JetStream KV, or the handler's database transaction (`tx: Tx` argument) |
/// | `retention = "7d"` | `"7d"` | how long completed keys are remembered |
/// | `lease = "30s"` | `"30s"` | how long a claim holds without renewal |
/// | `retry = <expr>` | `Retry::default()` | an `idem::Retry` value, e.g. `Retry::exponential("200ms", "30s").attempts(8).jitter()` |
/// | `dead_letter = "subject"` | `"idem.dead.<name>"` | where messages that cannot be processed go |
/// | `concurrency = 16` | `16` | messages handled at once |
/// | `batch = 32` | `32` | `dedup = transactional`: messages that may share one transaction and one commit (group commit; at most `concurrency`; `1` = a transaction each). See [`HandlerConfig::batch`](../idem/handler/struct.HandlerConfig.html#method.batch) for what a handler must not assume |
/// | `linger = "2ms"` | `"2ms"` | `dedup = transactional`: how long a group waits for more messages before it begins |
/// | `on_missing_key = dead_letter \| reject` | `dead_letter` | what to do when no key can be extracted |
/// | `fingerprint = payload \| none \| <expr>` | `payload` | what tells a duplicate from a reused key |
/// | `store_result` | off | store the `Ok` value (`Serialize + DeserializeOwned`) and hand it to duplicates |
/// | `on_duplicate = hook` | none | with `store_result`: each duplicate delivery calls `hook(stored_result, <the handler's arguments but its Tx>)` (an `async fn` returning `Result<(), E>`) before it is acknowledged — e.g. to announce the outcome again without running the effect. A duplicate has no transaction: its effect committed with the first delivery |
/// | `service = "NAME"` | — | instead of `stream`: serve the handler as a request/reply endpoint of the NATS micro service `NAME`, on `subject` (required); the result is stored and replied, repeats get the stored reply |
/// | `version = "1.0.0"` | `"0.1.0"` | the service's version |
///
/// `retention`, `lease`, `fingerprint` and `store_result` need dedup on;
/// `consumer`, `dead_letter`, `start`, `retry`, `batch`, `linger` and
/// `on_duplicate` are for stream handlers, not services.
/// Literals (durations, subjects, attempts, concurrency) are checked at
/// compile time; every mistake is reported at once, at its token.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let item_tokens = proc_macro2::TokenStream::from(item);
    match generate(args.into(), item_tokens.clone()) {
        Ok(expansion) => expansion.into(),
        Err(errors) => {
            let mut out = errors.into_compile_errors();
            // Keep a free function so that its own code still type-checks
            // and no "cannot find" errors pile up at its call sites; a
            // function with `self` would only add rustc's error to ours.
            let free = syn::parse2::<ItemFn>(item_tokens.clone())
                .is_ok_and(|f| f.sig.receiver().is_none());
            if free {
                out.extend(quote::quote!(#[allow(dead_code)] #item_tokens));
            }
            out.into()
        }
    }
}

/// Parse, validate, expand — or every error found on the way.
fn generate(
    args: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> Result<proc_macro2::TokenStream, Errors> {
    let mut errors = Errors::default();
    let item = match syn::parse2::<ItemFn>(item) {
        Ok(item) => item,
        Err(error) => {
            errors.push(error.span(), error);
            return Err(errors);
        }
    };
    let options = match syn::parse2::<RawOptions>(args) {
        Ok(raw) => Options::from_raw(raw, &mut errors),
        Err(error) => {
            errors.push(error.span(), error);
            Options::default()
        }
    };
    let signature = signature::analyze(&item, &mut errors);
    let key = validate::validate(&options, &signature, &mut errors);
    if errors.is_empty() {
        Ok(expand::expand(item, &options, &signature, key))
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests;
