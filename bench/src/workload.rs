//! The messages a scenario consumes: small JSON orders on a fresh stream,
//! optionally with 30 % duplicates, preloaded before the clock starts.

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::BoxError;

/// The stream every consumer scenario reads.
pub const STREAM: &str = "BENCH";
/// The subject its messages are published on.
pub const SUBJECT: &str = "bench.orders";

/// One message: about 128 bytes of JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub account: String,
    pub amount: i64,
    pub currency: String,
    pub memo: String,
}

impl Order {
    pub fn numbered(n: usize) -> Self {
        Self {
            id: format!("order-{n:08}"),
            account: format!("acct-{:06}", n % 1_000),
            amount: (n as i64 % 10_000) + 1,
            currency: "EUR".into(),
            memo: "benchmark order, padded to about 128 b".into(),
        }
    }
}

/// Which orders a run's messages carry, in publishing order. With
/// duplicates, every tenth message from the third on resends one of the
/// orders published before it (as a producer's republish would, under a new
/// message id): 30 % of the messages.
pub fn order_numbers(messages: usize, duplicates: bool) -> Vec<usize> {
    let mut originals = 0;
    (0..messages)
        .map(|i| {
            if duplicates && matches!(i % 10, 3 | 6 | 9) && originals > 0 {
                // Spread over the orders published so far, oldest first.
                (i * 7) % originals
            } else {
                originals += 1;
                originals - 1
            }
        })
        .collect()
}

/// Recreates the stream (dropping its consumers) and publishes the orders,
/// 256 in flight, each confirmed.
pub async fn preload(js: &jetstream::Context, numbers: &[usize]) -> Result<(), BoxError> {
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![SUBJECT.into()],
        ..Default::default()
    })
    .await?;
    let payloads: Vec<bytes::Bytes> = numbers
        .iter()
        .map(|&n| serde_json::to_vec(&Order::numbered(n)).map(Into::into))
        .collect::<Result<_, _>>()?;
    let acks: Vec<_> = futures::stream::iter(payloads)
        .map(|payload| {
            let js = js.clone();
            async move { js.publish(SUBJECT, payload).await?.await }
        })
        .buffered(256)
        .collect()
        .await;
    for ack in acks {
        ack?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_about_128_bytes() {
        let size = serde_json::to_vec(&Order::numbered(12_345))
            .map(|v| v.len())
            .unwrap_or(0);
        assert!((120..=136).contains(&size), "{size} bytes");
    }

    #[test]
    fn thirty_percent_are_resends_of_earlier_orders() {
        let numbers = order_numbers(1_000, true);
        let mut seen = std::collections::HashSet::new();
        let mut repeats = 0;
        for n in numbers {
            if !seen.insert(n) {
                repeats += 1;
            } else {
                // A first appearance is the next original: a resend never
                // comes before the order it repeats.
                assert_eq!(n, seen.len() - 1);
            }
        }
        assert_eq!(repeats, 300);
        assert_eq!(order_numbers(5, false), vec![0, 1, 2, 3, 4]);
    }
}
