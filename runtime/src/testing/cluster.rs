//! A 3-node JetStream cluster on loopback, for replication and failover tests.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::time::{Instant, sleep};

use super::ports::free_port;
use super::ready::{self, POLL, READY_TIMEOUT};
use super::server::Route;
use super::{HarnessError, NatsBinary, NatsServer};

/// How many nodes a cluster has: the smallest that survives losing one.
const SIZE: usize = 3;
/// How often a start is retried when another process took a port first.
const START_ATTEMPTS: usize = 3;
/// The stream the readiness probe creates and deletes.
const PROBE_STREAM: &str = "IDEM_HARNESS_PROBE";

/// Three `nats-server` processes routed to each other on loopback, each with
/// JetStream and its own temporary store directory.
///
/// [`Cluster::start`] returns once an R3 stream can be placed, so a test can
/// create replicated streams and KV buckets at once. Nodes are killed,
/// paused and restarted through [`node_mut`](Self::node_mut) with the same
/// methods as a single [`NatsServer`]; all are cleaned up on drop.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::testing::Cluster;
///
/// let mut cluster = Cluster::start().await?;
/// let client = cluster.connect().await?;
/// let js = async_nats::jetstream::new(client);
/// let mut stream = js
///     .create_stream(async_nats::jetstream::stream::Config {
///         name: "ORDERS".into(),
///         subjects: vec!["orders.>".into()],
///         num_replicas: 3,
///         ..Default::default()
///     })
///     .await?;
/// let leader = stream.info().await?.cluster.clone().and_then(|c| c.leader);
/// if let Some(index) = leader.and_then(|name| cluster.index_of(&name)) {
///     cluster.node_mut(index)?.kill()?; // the stream elects a new leader
///     cluster.node_mut(index)?.restart().await?; // and the node rejoins
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<NatsServer>,
}

impl Cluster {
    /// Starts a 3-node cluster with the binary [`NatsBinary::locate`] finds.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(&NatsBinary::locate()?).await
    }

    /// Starts a 3-node cluster with the given binary.
    pub async fn start_with(binary: &NatsBinary) -> Result<Self, HarnessError> {
        let mut attempt = 1;
        loop {
            match Self::try_start(binary).await {
                Err(e) if e.is_port_collision() && attempt < START_ATTEMPTS => attempt += 1,
                result => return result,
            }
        }
    }

    async fn try_start(binary: &NatsBinary) -> Result<Self, HarnessError> {
        let client_ports = (0..SIZE)
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let route_ports = (0..SIZE)
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let cluster_name = format!("idem-{}", route_ports[0]);
        let mut nodes = Vec::with_capacity(SIZE);
        for (i, (&port, &route_port)) in client_ports.iter().zip(&route_ports).enumerate() {
            let route = Route {
                cluster_name: cluster_name.clone(),
                port: route_port,
                peer_ports: route_ports
                    .iter()
                    .copied()
                    .filter(|p| *p != route_port)
                    .collect(),
            };
            nodes.push(NatsServer::spawn(
                binary,
                format!("n{i}"),
                port,
                Some(route),
                "",
            )?);
        }
        // All nodes run before any is awaited: a meta leader needs a quorum.
        for node in &mut nodes {
            ready::until_ready(node).await?;
        }
        let cluster = Self { nodes };
        cluster.until_replicated().await?;
        Ok(cluster)
    }

    /// Waits until R3 streams can be created with either storage, which
    /// proves that every node has joined the JetStream meta group and
    /// reported itself to the meta leader. (Seen under load: a memory
    /// probe placed while a file stream right after was refused "no
    /// suitable peers for placement, peer offline".)
    async fn until_replicated(&self) -> Result<(), HarnessError> {
        let started = Instant::now();
        let client = self.connect().await?;
        let js = jetstream::new(client);
        let config = stream::Config {
            name: PROBE_STREAM.into(),
            subjects: vec!["idem.harness.probe".into()],
            num_replicas: SIZE,
            storage: stream::StorageType::Memory,
            ..Default::default()
        };
        let mut placed = Vec::new();
        loop {
            for storage in [stream::StorageType::Memory, stream::StorageType::File] {
                if placed.contains(&storage) {
                    continue;
                }
                let probe = stream::Config {
                    storage,
                    ..config.clone()
                };
                if js.create_stream(probe).await.is_ok() {
                    placed.push(storage);
                    // The probe stream is left over only if this delete
                    // fails, and it holds nothing.
                    let _ = js.delete_stream(PROBE_STREAM).await;
                }
            }
            if placed.len() == 2 {
                return Ok(());
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(HarnessError::NotReady {
                    name: "cluster".into(),
                    waited: started.elapsed(),
                    waiting_for: "an R3 stream to be placed on all three nodes",
                    log: self.log_tails(),
                });
            }
            sleep(POLL).await;
        }
    }

    fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name(), n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The client URLs of all nodes, for `async_nats::connect(urls.as_slice())`.
    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::client_url).collect()
    }

    /// Connects a client that knows every node and fails over between them.
    pub async fn connect(&self) -> Result<async_nats::Client, HarnessError> {
        let urls = self.client_urls();
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(urls.as_slice())
            .await
            .map_err(|source| HarnessError::Connect {
                url: urls.join(","),
                source,
            })
    }

    /// The nodes, in start order (`n0`, `n1`, `n2`).
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// One node, to kill, pause or restart it.
    pub fn node_mut(&mut self, index: usize) -> Result<&mut NatsServer, HarnessError> {
        let len = self.nodes.len();
        self.nodes
            .get_mut(index)
            .ok_or(HarnessError::NoSuchNode { index, len })
    }

    /// The index of the node with this server name, e.g. the `leader` that
    /// JetStream reports in a stream's cluster info.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == server_name)
    }
}
