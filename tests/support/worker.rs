//! A worker *process* for crash tests: runs one `#[idempotent]` handler
//! whose every execution is appended (and fsynced) to an effect log, so a
//! test can SIGKILL it mid-handler and count what really happened.
//!
//! ```text
//! idem-test-worker <nats-url> <effect-log> <handler-sleep-ms>
//! ```
//!
//! Runs until SIGTERM or SIGKILL.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use idem::{HandlerError, Json, Runtime, State, idempotent};

/// Where effects are written, and how long each takes.
#[derive(Clone)]
struct Effects {
    log: Arc<PathBuf>,
    sleep: Duration,
}

impl Effects {
    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&*self.log)?;
        writeln!(file, "{line} {}", std::process::id())?;
        file.sync_all()
    }
}

#[idempotent(stream = "CRASH", subject = "crash.orders", key = order, lease = "2s")]
async fn crash_handler(
    Json(order): Json<String>,
    State(effects): State<Effects>,
) -> Result<(), HandlerError> {
    effects.append(&format!("start {order}"))?;
    tokio::time::sleep(effects.sleep).await;
    effects.append(&format!("end {order}"))?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: idem-test-worker <nats-url> <effect-log> <handler-sleep-ms>";
    let url = args.next().ok_or(usage)?;
    let log = PathBuf::from(args.next().ok_or(usage)?);
    let sleep_ms: u64 = args.next().ok_or(usage)?.parse()?;
    let client = async_nats::connect(url).await?;
    let effects = Effects {
        log: Arc::new(log),
        sleep: Duration::from_millis(sleep_ms),
    };
    Runtime::builder(client)
        .state(effects)
        .handler(crash_handler)
        .run()
        .await?;
    Ok(())
}
