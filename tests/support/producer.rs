//! A producer *process* for crash tests: puts messages in a durable outbox,
//! or drains one.
//!
//! ```text
//! idem-test-producer <nats-url> <outbox-file> enqueue <n>   # prints "ready", waits for a line on stdin,
//!                                                          # enqueues m-0..m-<n>, prints "enqueued", then idles
//! idem-test-producer <nats-url> <outbox-file> drain         # resends what is left, prints "drained <sent>"
//! ```

use std::io::BufRead;
use std::time::Duration;

use idem::outbox::{Outbox, OutboxConfig};
use idem::publisher::{Outgoing, Publisher, PublisherConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: idem-test-producer <nats-url> <outbox-file> (enqueue <n> | drain)";
    let [url, file, mode, rest @ ..] = args.as_slice() else {
        return Err(usage.into());
    };
    let client = async_nats::connect(url.as_str()).await?;
    let config = PublisherConfig {
        attempt_timeout: Duration::from_millis(500),
        ..PublisherConfig::default()
    };
    let outbox = Outbox::open(
        file,
        Publisher::with_config(client, config),
        OutboxConfig::default(),
    )
    .await?;
    match (mode.as_str(), rest) {
        ("enqueue", [n]) => {
            let n: usize = n.parse()?;
            println!("ready");
            std::io::stdin().lock().lines().next();
            let messages = (0..n)
                .map(|i| Outgoing::new("outbox.orders", format!("{i}")).with_id(format!("m-{i}")))
                .collect();
            outbox.enqueue_all(messages).await?;
            println!("enqueued");
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        ("drain", []) => {
            outbox.flush().await?;
            println!("drained {}", outbox.stats().await?.sent);
            Ok(())
        }
        _ => Err(usage.into()),
    }
}
