//! Waiting, bounded, for a server to get ready: polling, never a fixed sleep.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use super::{HarnessError, NatsServer};

/// How long a server may take to accept clients and answer JetStream.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between two probes.
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Polls `done` every [`POLL`] until it is true (→ `true`) or `limit` has
/// passed (→ `false`).
pub(crate) async fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(POLL).await;
    }
}

/// Waits until the server accepts client connections (it sends its `INFO`
/// line) and JetStream answers `$JS.API.INFO` without an error (for a cluster
/// node: a meta leader is known). Fails at once if the process exits.
pub(crate) async fn until_ready(server: &mut NatsServer) -> Result<(), HarnessError> {
    let started = Instant::now();
    let mut client: Option<async_nats::Client> = None;
    loop {
        server.check_alive()?;
        let waiting_for = match &client {
            Some(client) if jetstream_answers(client).await => return Ok(()),
            Some(_) => "JetStream to answer $JS.API.INFO",
            None if sends_info(server.port()).await => {
                client = connect(&server.client_url()).await;
                if client.is_some() {
                    continue;
                }
                "a client connection"
            }
            None => "the client port to send INFO",
        };
        if started.elapsed() >= READY_TIMEOUT {
            return Err(HarnessError::NotReady {
                name: server.name().to_owned(),
                waited: started.elapsed(),
                waiting_for,
                log: server.log_tail(),
            });
        }
        sleep(POLL).await;
    }
}

/// A client for probes: short timeouts, so that a probe never hangs.
pub(crate) async fn connect(url: &str) -> Option<async_nats::Client> {
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(PROBE_TIMEOUT)
        .request_timeout(Some(PROBE_TIMEOUT));
    timeout(PROBE_TIMEOUT, options.connect(url))
        .await
        .ok()?
        .ok()
}

/// Whether something on `port` speaks the NATS protocol.
async fn sends_info(port: u16) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.ok()?;
        Some(&head == b"INFO ")
    };
    matches!(timeout(PROBE_TIMEOUT, probe).await, Ok(Some(true)))
}

/// Whether JetStream answers an account-info request without an error. The
/// answer is read as plain JSON: async-nats' typed account info does not parse
/// nats-server 2.9's answer.
async fn jetstream_answers(client: &async_nats::Client) -> bool {
    let Ok(Ok(reply)) = timeout(PROBE_TIMEOUT, client.request("$JS.API.INFO", Bytes::new())).await
    else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&reply.payload)
        .map(|answer| answer.get("error").is_none())
        .unwrap_or(false)
}
