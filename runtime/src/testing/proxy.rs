//! A TCP proxy on loopback that a test puts between a client and a server to
//! break the connection on purpose: cut it, stall it in both directions,
//! hold back only the server's replies (lost PubAcks and acks), or make
//! them late — the network faults that a process signal cannot produce.
//!
//! Every accepted connection opens its own connection upstream, so a client
//! that reconnects after a cut simply gets a fresh path.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
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
    /// How late the server's bytes reach the client, in milliseconds.
    reply_delay: Arc<AtomicU64>,
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
        let reply_delay = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            flow.clone(),
            reply_delay.clone(),
            connections.clone(),
        ));
        Ok(Self {
            addr,
            flow,
            reply_delay,
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

    /// Delivers the server's bytes `delay` after they arrive (zero: at
    /// once), in order: every answer is late — a slow link or an overloaded
    /// server — while the flow says they pass at all.
    ///
    /// ```no_run
    /// # async fn demo(proxy: idem::testing::Proxy) {
    /// use std::time::Duration;
    ///
    /// proxy.delay_replies(Duration::from_millis(1_500)); // answers come late…
    /// proxy.delay_replies(Duration::ZERO);               // …and on time again
    /// # }
    /// ```
    pub fn delay_replies(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.reply_delay.store(millis, Ordering::Relaxed);
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
    reply_delay: Arc<AtomicU64>,
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
        let reply_delay = reply_delay.clone();
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
                () = pump(client_read, server_write, true, flow.clone(), None) => {}
                () = pump(server_read, client_write, false, flow, Some(reply_delay)) => {}
            }
        });
    }
}

/// Copies one direction while the flow lets it, each chunk `delay` after
/// it was read (if given); returns when either side closes.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    upstream: bool,
    flow: watch::Receiver<Flow>,
    delay: Option<Arc<AtomicU64>>,
) {
    let (queue, mut queued) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let mut reading = flow.clone();
    let read = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            if reading.wait_for(|f| f.passes(upstream)).await.is_err() {
                return;
            }
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let late = delay
                .as_ref()
                .map_or(0, |delay| delay.load(Ordering::Relaxed));
            let due = tokio::time::Instant::now() + Duration::from_millis(late);
            if queue.send((due, buffer[..read].to_vec())).is_err() {
                return;
            }
        }
    };
    let mut writing = flow;
    let write = async move {
        while let Some((due, bytes)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            // Bytes read just before a stall wait with the rest.
            if writing.wait_for(|f| f.passes(upstream)).await.is_err() {
                return;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    // The reader ends at a close; the writer then delivers what was read.
    tokio::join!(read, write);
}
