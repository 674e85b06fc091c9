//! A TCP proxy on loopback that a test puts between a client and a server to
//! break the connection on purpose: cut it, stall it in both directions, or
//! hold back only the server's replies (lost PubAcks and acks) — the network
//! faults that a process signal cannot produce.
//!
//! Every accepted connection opens its own connection upstream, so a client
//! that reconnects after a cut simply gets a fresh path.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::HarnessError;

/// What the proxy lets through.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Flow {
    /// Everything, both ways.
    Open,
    /// Nothing either way; connections stay open and bytes wait.
    Stalled,
    /// Client → server flows, server → client waits: the server does the
    /// work, its answers do not arrive.
    HoldReplies,
    /// New connections are closed at once (the server looks down).
    Refused,
}

impl Flow {
    fn passes(self, upstream: bool) -> bool {
        match self {
            Flow::Open => true,
            Flow::HoldReplies => upstream,
            Flow::Stalled | Flow::Refused => false,
        }
    }
}

/// A proxy from a loopback port to one upstream address; stops (closing
/// every connection) on drop.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::testing::{NatsServer, Proxy};
///
/// let server = NatsServer::start().await?;
/// let proxy = Proxy::start(server.client_addr()).await?;
/// let client = async_nats::connect(proxy.url()).await?;
/// proxy.stall();   // requests now time out…
/// proxy.open();    // …and flow again
/// proxy.cut();     // the client reconnects through the proxy
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    flow: watch::Sender<Flow>,
    connections: Arc<Mutex<CancellationToken>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self, HarnessError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(HarnessError::Port)?;
        let addr = listener.local_addr().map_err(HarnessError::Port)?;
        let (flow, _) = watch::channel(Flow::Open);
        let connections = Arc::new(Mutex::new(CancellationToken::new()));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            flow.clone(),
            connections.clone(),
        ));
        Ok(Self {
            addr,
            flow,
            connections,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// What passes now.
    pub fn flow(&self) -> Flow {
        *self.flow.borrow()
    }

    /// Lets everything through again (waiting bytes are delivered).
    pub fn open(&self) {
        self.flow.send_replace(Flow::Open);
    }

    /// Stops forwarding both ways without closing anything.
    pub fn stall(&self) {
        self.flow.send_replace(Flow::Stalled);
    }

    /// Forwards the client's bytes but holds the server's.
    pub fn hold_replies(&self) {
        self.flow.send_replace(Flow::HoldReplies);
    }

    /// Closes new connections at once until [`open`](Self::open).
    pub fn refuse(&self) {
        self.flow.send_replace(Flow::Refused);
    }

    /// Closes every current connection (bytes held back are lost); new ones
    /// are accepted according to the flow.
    pub fn cut(&self) {
        let mut current = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.cancel();
        *current = CancellationToken::new();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    flow: watch::Sender<Flow>,
    connections: Arc<Mutex<CancellationToken>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *flow.borrow() == Flow::Refused {
            drop(client);
            continue;
        }
        let cut = connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let flow = flow.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return; // the server is down: the client sees a closed connection
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Biased: a cut that came before an `open` wins over bytes the
            // open would release.
            tokio::select! {
                biased;
                () = cut.cancelled() => {}
                () = pump(client_read, server_write, true, flow.clone()) => {}
                () = pump(server_read, client_write, false, flow) => {}
            }
        });
    }
}

/// Copies one direction while the flow lets it; returns when either side
/// closes.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    upstream: bool,
    mut flow: watch::Receiver<Flow>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if flow.wait_for(|f| f.passes(upstream)).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a stall wait with the rest.
        if flow.wait_for(|f| f.passes(upstream)).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
