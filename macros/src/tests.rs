//! The parser and validator on token streams: no compiler needed.

use proc_macro2::TokenStream;
use quote::quote;

use crate::generate;

const HANDLER: &str = "async fn h(Json(order): Json<Order>, State(db): State<Db>) -> Result<(), HandlerError> { Ok(()) }";

fn errors(args: TokenStream, item: &str) -> Vec<String> {
    let item: TokenStream = item.parse().expect("item tokens");
    match generate(args, item) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.messages(),
    }
}

fn errors_for(args: TokenStream) -> Vec<String> {
    errors(args, HANDLER)
}

fn assert_one(args: TokenStream, needle: &str) {
    let found = errors_for(args);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].contains(needle),
        "{:?} should mention {needle:?}",
        found[0]
    );
}

#[test]
fn a_complete_attribute_expands() {
    let found = errors_for(quote!(
        stream = "ORDERS",
        consumer = "orders-h",
        subject = "orders.created",
        key = order.id,
        dedup = kv,
        retention = "7d",
        lease = "45s",
        retry = Retry::exponential("200ms", "30s").attempts(8).jitter(),
        dead_letter = "orders.dead",
        concurrency = 32,
        on_missing_key = reject,
        fingerprint = (order.id, order.total),
        store_result,
    ));
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn unknown_options_get_a_suggestion() {
    assert_one(
        quote!(stream = "S", key = order.id, retension = "7d"),
        "did you mean `retention`",
    );
    assert_one(
        quote!(stream = "S", key = order.id, colour = "red"),
        "the options are",
    );
}

#[test]
fn duplicate_and_missing_options() {
    assert_one(
        quote!(stream = "S", stream = "T", key = order.id),
        "duplicate option `stream`",
    );
    assert_one(quote!(key = order.id), "missing `stream");
    assert_one(quote!(stream = "S"), "missing `key");
    assert!(errors_for(quote!(stream = "S", dedup = off)).is_empty());
}

#[test]
fn literal_values_are_checked() {
    assert_one(
        quote!(stream = "S", key = order.id, retention = "5x"),
        "\"5x\" is not a duration",
    );
    assert_one(
        quote!(stream = "S", key = order.id, lease = 30),
        "string literal",
    );
    assert_one(
        quote!(stream = "S", key = order.id, concurrency = 0),
        "at least 1",
    );
    assert_one(
        quote!(stream = "S", key = order.id, dedup = sometimes),
        "`dedup` is one of",
    );
    assert_one(
        quote!(stream = "S", key = order.id, subject = "a..b"),
        "empty token",
    );
    assert_one(
        quote!(stream = "S", key = order.id, subject = "a.>.b"),
        "`>` a whole last token",
    );
    assert_one(
        quote!(stream = "S", key = order.id, dead_letter = "dead.*"),
        "has a wildcard, but messages are published to it",
    );
    assert_one(
        quote!(
            stream = "S",
            key = order.id,
            retry = Retry::fixed("1s").attempts(0)
        ),
        "at least 1 attempt",
    );
    assert_one(
        quote!(
            stream = "S",
            key = order.id,
            retry = Retry::exponential("5x", "1s")
        ),
        "\"5x\" is not a duration",
    );
    assert_one(quote!(stream = "a.b", key = order.id), "without `.`");
}

#[test]
fn key_and_fingerprint_names_must_be_arguments() {
    assert_one(
        quote!(stream = "S", key = ordr.id),
        "`ordr` in `key` is not an argument",
    );
    assert_one(
        quote!(stream = "S", key = (order.id, line.no)),
        "`line` in `key`",
    );
    assert_one(
        quote!(stream = "S", key = order.id, fingerprint = totl.amount),
        "`totl` in `fingerprint`",
    );
    // Every key source of the docs is accepted.
    for key in [
        quote!(order.id),
        quote!((order.id, order.line)),
        quote!(header("Idempotency-Key")),
        quote!(msg_id),
        quote!(keys::order_key),
        quote!(order_key),
        quote!(order.id.to_string()),
    ] {
        assert!(
            errors_for(quote!(stream = "S", key = #key)).is_empty(),
            "{key}"
        );
    }
}

#[test]
fn options_that_need_dedup_are_refused_without_it() {
    let found = errors_for(quote!(
        stream = "S",
        dedup = off,
        retention = "1d",
        lease = "1m",
        fingerprint = none,
        store_result
    ));
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(
        found
            .iter()
            .all(|e| e.contains("no effect with `dedup = off`"))
    );
}

#[test]
fn dead_letter_loops_and_transactions_are_caught() {
    assert_one(
        quote!(
            stream = "S",
            key = order.id,
            subject = "orders.x",
            dead_letter = "orders.x"
        ),
        "dead letters would be consumed",
    );
    assert_one(
        quote!(stream = "S", key = order.id, dedup = transactional),
        "take it as an argument",
    );
    let with_tx =
        "async fn h(Json(order): Json<Order>, tx: Tx) -> Result<(), HandlerError> { Ok(()) }";
    assert!(
        errors(
            quote!(stream = "S", key = order.id, dedup = transactional),
            with_tx
        )
        .is_empty()
    );
}

#[test]
fn the_function_must_be_a_plain_async_fn_returning_result() {
    let cases = [
        (
            "fn h(Json(order): Json<Order>) -> Result<(), E> { Ok(()) }",
            "must be `async fn`",
        ),
        (
            "async fn h(&self, Json(order): Json<Order>) -> Result<(), E> { Ok(()) }",
            "not `self`",
        ),
        (
            "async fn h<T>(Json(order): Json<T>) -> Result<(), E> { Ok(()) }",
            "cannot be generic",
        ),
        (
            "async fn h(Json(order): Json<Order>) -> u32 { 1 }",
            "return `Result<T, E>`",
        ),
        (
            "async fn h(Json(order): Json<Order>) { }",
            "return `Result<T, E>`",
        ),
        (
            "async fn h(Json(order): Json<Order>, raw: Bytes) -> Result<(), E> { Ok(()) }",
            "two payload extractors",
        ),
    ];
    for (item, needle) in cases {
        let found = errors(quote!(stream = "S", key = order.id), item);
        assert_eq!(found.len(), 1, "{item}: {found:#?}");
        assert!(found[0].contains(needle), "{item}: {:?}", found[0]);
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let found = errors(
        quote!(retension = "7d", lease = "5x", concurrency = 0),
        "fn h(self) -> u32 { 1 }",
    );
    // unknown option, bad duration, zero concurrency, missing stream,
    // missing key, not async, self, return type.
    assert_eq!(found.len(), 8, "{found:#?}");
}
