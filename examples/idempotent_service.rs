//! Idempotent request/reply: a client that times out and asks again gets
//! *one* execution and *the same* answer.
//!
//! `charge_card` is served as an endpoint of the NATS micro service
//! `payments` (it answers `$SRV.PING`, `INFO` and `STATS`). Its first run is
//! slow — a payment gateway taking 1.5 s — and the client gives up on each
//! attempt after 0.5 s. The `Requester` asks again with the same request;
//! the endpoint sees the key is being charged, waits for that run, and
//! answers every copy with its stored receipt.
//!
//! ```text
//! cargo run --example idempotent_service
//! ```
//!
//! Connects to `NATS_URL` or nats://127.0.0.1:4222; if nothing listens there
//! and a `nats-server` binary is available, starts a throw-away one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem::publisher::Requester;
use idem::store::KvStoreConfig;
use idem::{HandlerError, Json, Retry, Runtime, State, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Charge {
    charge_id: String,
    cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
    receipt: String,
}

/// The payment gateway: counts charges, and is slow the first time.
#[derive(Clone, Default)]
struct Gateway {
    charges: Arc<AtomicU32>,
}

/// Charges a card once per `charge_id`; the receipt is the reply.
#[idempotent(service = "payments", subject = "payments.charge", key = charge.charge_id, lease = "10s")]
async fn charge_card(
    Json(charge): Json<Charge>,
    State(gateway): State<Gateway>,
) -> Result<Receipt, HandlerError> {
    gateway.charges.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    println!(
        "  gateway: charged {} cents for {}",
        charge.cents, charge.charge_id
    );
    Ok(Receipt {
        receipt: format!("rcpt-{}", uuid::Uuid::now_v7()),
        charge_id: charge.charge_id,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Dev helper: $NATS_URL, or a throw-away nats-server for this run.
    let (client, _nats) = idem::testing::LocalNats::connect().await?;

    // The service.
    let gateway = Gateway::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = Runtime::builder(client.clone())
        .claims(KvStoreConfig::default().bucket("idem_example_claims"))
        .state(gateway.clone())
        .handler(charge_card)
        .shutdown_on(async {
            let _ = stopped.await;
        })
        .build()
        .await?;
    let running = tokio::spawn(service.run());

    // The client: 0.5 s per attempt, asking again every 0.3 s.
    let requester = Requester::new(client)
        .timeout(Duration::from_millis(500))
        .retry(Retry::fixed("300ms").attempts(10));
    let charge = Charge {
        charge_id: format!("ch-{}", uuid::Uuid::now_v7()),
        cents: 4_900,
    };
    println!(
        "client: charging {} (the gateway takes 1.5 s, the client waits 0.5 s per attempt)",
        charge.charge_id
    );
    let first: Receipt = requester.request_json("payments.charge", &charge).await?;
    println!("client: receipt {}", first.receipt);
    println!("client: asking once more, much later");
    let again: Receipt = requester.request_json("payments.charge", &charge).await?;
    println!("client: receipt {}", again.receipt);

    let _ = stop.send(());
    running.await??;
    let charges = gateway.charges.load(Ordering::SeqCst);
    println!("\ncharges at the gateway: {charges}");
    if charges == 1 && first == again {
        println!("one execution, the same answer every time: ok");
        Ok(())
    } else {
        Err(format!(
            "expected one charge and equal receipts, got {charges} and {first:?} / {again:?}"
        )
        .into())
    }
}
