//! The acknowledgements that carry a delivery's end to the server — ack,
//! confirmed ack, NAK with a delay — and how NAKs that are not a handler's
//! failures are paced (by JetStream's delivery count, never using up the
//! handler's attempts).

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use tracing::warn;

use crate::Delivery;
pub(super) use crate::delivery_core::{MIN_NAK_DELAY, in_flight_delay, store_backoff};
use crate::retry::Schedule;

/// How many times JetStream has delivered the message: paces NAKs that are
/// not the handler's failures (they never use up its attempts).
pub(super) fn deliveries(delivery: &Delivery) -> u32 {
    u32::try_from(delivery.delivered()).unwrap_or(u32::MAX)
}

/// A confirmed acknowledgement, retried briefly. Once completion is
/// recorded a lost ack only costs a redelivery, answered as a duplicate.
pub(super) async fn ack(message: &Message) {
    const TRIES: u32 = 3;
    let mut pauses = Schedule::confirmed_ack();
    for tried in 1..=TRIES {
        match message.double_ack().await {
            Ok(()) => return,
            Err(e) if tried == TRIES => {
                warn!(error = %e, "could not acknowledge; the redelivery will be a duplicate")
            }
            Err(_) => tokio::time::sleep(pauses.next()).await,
        }
    }
}

/// A plain ack for a message whose key the store holds as done: a lost ack
/// only costs a redelivery that is answered as a duplicate, so waiting for
/// the server's confirmation buys nothing.
pub(super) async fn ack_recorded(message: &Message) {
    if let Err(e) = message.ack().await {
        warn!(error = %e, "could not acknowledge; the redelivery will be a duplicate");
    }
}

pub(super) async fn nak(message: &Message, delay: Duration) {
    if let Err(e) = message
        .ack_with(AckKind::Nak(Some(delay.max(MIN_NAK_DELAY))))
        .await
    {
        warn!(error = %e, "could not NAK; the server redelivers after ack_wait");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_delays_double_from_50ms_and_stop_at_the_lease() {
        let lease = Duration::from_secs(30);
        let delays: Vec<u128> = (1..=6)
            .map(|a| in_flight_delay(a, lease).as_millis())
            .collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600]);
        assert_eq!(in_flight_delay(40, lease), lease);
        assert_eq!(
            in_flight_delay(3, Duration::from_millis(120)),
            Duration::from_millis(120)
        );
        assert_eq!(in_flight_delay(1, Duration::ZERO), MIN_NAK_DELAY);
    }
}
