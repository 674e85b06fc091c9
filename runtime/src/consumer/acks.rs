//! The acknowledgements that carry a delivery's end to the server — ack,
//! confirmed ack, NAK with a delay. (How long a NAK waits is the delivery
//! core's decision: `delivery_core::pacing`.)

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use tracing::warn;

use crate::delivery_core::MIN_NAK_DELAY;
use crate::retry::Schedule;

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
