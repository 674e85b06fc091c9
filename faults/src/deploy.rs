//! The system under test: NATS servers (one, or a 3-node cluster), a proxy
//! in front of every server for every worker and for the producer, the
//! worker processes, and the database with the ledger — plus the faults
//! applied to them. Everything is killed and removed on drop, also when the
//! driver panics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;
use idem::consumer::DEAD_LETTER_STREAM;
use idem::store::KvStoreConfig;
use idem::testing::{Cluster, NatsServer, Proxy, TestDatabase};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::ledger::Ledger;
use crate::order::STREAM;
use crate::schedule::{Fault, FaultKind};

/// The driver's error: anything that stops a run before its checks.
pub type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One server or three.
pub enum Servers {
    /// A single node.
    Single(NatsServer),
    /// Three nodes; stream and claims at R3.
    Cluster(Cluster),
}

impl Servers {
    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Servers::Single(s) => vec![s.client_addr()],
            Servers::Cluster(c) => c.nodes().iter().map(NatsServer::client_addr).collect(),
        }
    }

    fn node_mut(&mut self, index: usize) -> Fallible<&mut NatsServer> {
        Ok(match self {
            Servers::Single(s) => s,
            Servers::Cluster(c) => c.node_mut(index)?,
        })
    }

    /// Replicas of the stream and claims.
    pub fn replicas(&self) -> usize {
        match self {
            Servers::Single(_) => 1,
            Servers::Cluster(_) => 3,
        }
    }

    /// The version every node runs.
    pub fn version(&self) -> String {
        match self {
            Servers::Single(s) => s.version().to_string(),
            Servers::Cluster(c) => c
                .nodes()
                .first()
                .map_or_else(String::new, |n| n.version().to_string()),
        }
    }
}

/// How far each worker slot's wall clock is off: one right, one five
/// minutes ahead, one five minutes behind.
const CLOCK_SKEW_SECS: [i64; 3] = [0, 300, -300];

/// A worker process and where its log goes.
struct Worker {
    child: Child,
    name: String,
    frozen: bool,
}

impl Worker {
    fn signal(&self, signal: Signal) -> Fallible<()> {
        let pid = self.child.id().ok_or("the worker has exited")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }
}

/// How a worker process ended.
#[derive(Debug)]
pub struct Exit {
    /// `w<slot>.<generation>`.
    pub worker: String,
    /// How it ended: SIGKILLed by a fault, or its exit status at shutdown.
    pub status: Result<ExitStatus, String>,
    /// Whether the driver killed it on purpose.
    pub killed_by_fault: bool,
}

/// Everything a run starts.
pub struct Deployment {
    /// The servers.
    pub servers: Servers,
    /// The database schema with idem's tables and the ledger.
    pub database: TestDatabase,
    /// The effect ledger.
    pub ledger: Ledger,
    /// A client straight to the servers, for the driver's own questions.
    pub admin: jetstream::Context,
    /// The producer's client (through its proxies).
    pub producer: async_nats::Client,
    producer_links: Vec<Proxy>,
    links: Vec<Vec<Proxy>>,
    workers: Vec<Option<Worker>>,
    generations: Vec<usize>,
    exits: Vec<Exit>,
    logs: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Deployment {
    /// Starts servers, the stream, proxies, the ledger and `workers`
    /// worker processes.
    pub async fn start(cluster: bool, workers: usize) -> Fallible<Self> {
        let servers = if cluster {
            Servers::Cluster(Cluster::start().await?)
        } else {
            Servers::Single(NatsServer::start().await?)
        };
        let addrs = servers.addrs();
        let urls: Vec<String> = addrs.iter().map(|a| format!("nats://{a}")).collect();
        let admin = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(urls.as_slice())
            .await?;
        let admin = jetstream::new(admin);
        admin
            .create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec!["faults.>".into()],
                storage: stream::StorageType::File,
                num_replicas: servers.replicas(),
                ..Default::default()
            })
            .await?;
        let database = TestDatabase::create().await?;
        let ledger = Ledger::new(database.schema());
        ledger.create(database.pool()).await?;

        let producer_links = proxies(&addrs).await?;
        let producer = connect_through(&producer_links).await?;
        let mut links = Vec::new();
        for _ in 0..workers {
            links.push(proxies(&addrs).await?);
        }
        let mut deployment = Self {
            servers,
            database,
            ledger,
            admin,
            producer,
            producer_links,
            links,
            workers: (0..workers).map(|_| None).collect(),
            generations: vec![0; workers],
            exits: Vec::new(),
            logs: Vec::new(),
            dir: tempfile::Builder::new().prefix("idem-faults-").tempdir()?,
        };
        for slot in 0..workers {
            deployment.spawn(slot)?;
        }
        Ok(deployment)
    }

    /// Starts the next generation of the worker in `slot`.
    fn spawn(&mut self, slot: usize) -> Fallible<()> {
        self.generations[slot] += 1;
        let name = format!("w{slot}.{}", self.generations[slot]);
        let log = self.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("worker");
        for link in &self.links[slot] {
            command.arg("--nats").arg(link.url());
        }
        command
            .arg("--database-url")
            .arg(self.database.url())
            .arg("--schema")
            .arg(self.database.schema())
            .arg("--worker")
            .arg(&name)
            .arg("--replicas")
            .arg(self.servers.replicas().to_string())
            .arg("--clock-skew-secs")
            .arg(CLOCK_SKEW_SECS[slot % CLOCK_SKEW_SECS.len()].to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        let child = command.spawn()?;
        self.logs.push(log);
        self.workers[slot] = Some(Worker {
            child,
            name,
            frozen: false,
        });
        Ok(())
    }

    fn worker(&mut self, slot: usize) -> Fallible<&mut Worker> {
        self.workers
            .get_mut(slot)
            .and_then(Option::as_mut)
            .ok_or_else(|| format!("no worker in slot {slot}").into())
    }

    /// Applies `fault`, holds it, and undoes it. Returns what was done.
    pub async fn inject(&mut self, fault: &Fault) -> Fallible<String> {
        let hold = fault.hold;
        match fault.kind {
            FaultKind::KillWorker => {
                let aimed = self.aim(fault.target).await;
                let Some(mut worker) = self.workers[fault.target].take() else {
                    return Err(format!("no worker in slot {}", fault.target).into());
                };
                worker.child.start_kill()?;
                let status = worker.child.wait().await.map_err(|e| e.to_string());
                self.exits.push(Exit {
                    worker: worker.name.clone(),
                    status,
                    killed_by_fault: true,
                });
                sleep(hold).await;
                self.spawn(fault.target)?;
                Ok(format!("killed {}{aimed}", worker.name))
            }
            FaultKind::FreezeWorker => {
                let aimed = self.aim(fault.target).await;
                let worker = self.worker(fault.target)?;
                worker.signal(Signal::SIGSTOP)?;
                worker.frozen = true;
                sleep(hold).await;
                let worker = self.worker(fault.target)?;
                worker.signal(Signal::SIGCONT)?;
                worker.frozen = false;
                Ok(format!("froze {}{aimed}", worker.name))
            }
            FaultKind::KillServer => {
                let node = self.servers.node_mut(fault.target)?;
                node.kill()?;
                sleep(hold).await;
                node.restart().await?;
                Ok(format!("killed and restarted {}", node.name()))
            }
            FaultKind::KillLeader => {
                let index = self.leader(fault.target == 0).await?;
                let node = self.servers.node_mut(index)?;
                node.kill()?;
                sleep(hold).await;
                node.restart().await?;
                Ok(format!("killed and restarted leader {}", node.name()))
            }
            FaultKind::PauseServer => {
                let node = self.servers.node_mut(fault.target)?;
                node.pause().await?;
                sleep(hold).await;
                node.resume().await?;
                Ok(format!("paused {}", node.name()))
            }
            FaultKind::CutLink => {
                for link in &self.links[fault.target] {
                    link.refuse();
                    link.cut();
                }
                sleep(hold).await;
                self.links[fault.target].iter().for_each(Proxy::open);
                Ok(format!("cut worker slot {}", fault.target))
            }
            FaultKind::StallLink => {
                self.links[fault.target].iter().for_each(Proxy::stall);
                sleep(hold).await;
                self.links[fault.target].iter().for_each(Proxy::open);
                Ok(format!("stalled worker slot {}", fault.target))
            }
            FaultKind::RollingRestart => {
                let aimed = self.aim(fault.target).await;
                let Some(mut old) = self.workers[fault.target].take() else {
                    return Err(format!("no worker in slot {}", fault.target).into());
                };
                // A deploy: the old worker is told to stop, the new one
                // starts at once.
                old.signal(Signal::SIGTERM)?;
                self.spawn(fault.target)?;
                let status = match timeout(Duration::from_secs(20), old.child.wait()).await {
                    Ok(status) => status.map_err(|e| e.to_string()),
                    Err(_) => {
                        let _ = old.child.start_kill();
                        Err("did not stop within 20 s of SIGTERM".to_owned())
                    }
                };
                self.exits.push(Exit {
                    worker: old.name.clone(),
                    status,
                    killed_by_fault: false,
                });
                Ok(format!("replaced {}{aimed}", old.name))
            }
            FaultKind::DeadLetterOutage => {
                let Ok(mut dead) = self.admin.get_stream(DEAD_LETTER_STREAM).await else {
                    return Ok("no dead-letter stream yet".to_owned());
                };
                let info = dead.info().await?.clone();
                let full = stream::Config {
                    max_messages: i64::try_from(info.state.messages.max(1)).unwrap_or(i64::MAX),
                    discard: stream::DiscardPolicy::New,
                    ..info.config.clone()
                };
                self.admin.update_stream(full).await?;
                sleep(hold).await;
                self.admin.update_stream(info.config).await?;
                Ok(format!(
                    "dead-letter stream full at {} messages",
                    info.state.messages.max(1)
                ))
            }
            FaultKind::LoseAcks => {
                self.producer_links.iter().for_each(Proxy::hold_replies);
                sleep(hold).await;
                for link in &self.producer_links {
                    link.cut();
                    link.open();
                }
                Ok("held back and cut the producer's replies".to_owned())
            }
        }
    }

    /// Waits up to 5 s until the worker in `slot` is inside a long handler
    /// (one that runs for at least 15 ms more), and says whether it was.
    async fn aim(&self, slot: usize) -> &'static str {
        let Some(name) = self.workers[slot].as_ref().map(|w| w.name.clone()) else {
            return "";
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let pool = self.database.pool();
            if let Ok(true) = self.ledger.in_handler(pool, &name, 15_000).await {
                return " inside a handler";
            }
            sleep(Duration::from_millis(5)).await;
        }
        " (no long handler in progress within 5 s)"
    }

    /// The node leading the stream (`true`) or the claim bucket.
    async fn leader(&self, of_stream: bool) -> Fallible<usize> {
        let Servers::Cluster(cluster) = &self.servers else {
            return Ok(0);
        };
        let name = if of_stream {
            STREAM.to_owned()
        } else {
            format!("KV_{}", KvStoreConfig::default().bucket_name())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leader = async {
                let mut stream = self.admin.get_stream(&name).await.ok()?;
                stream.info().await.ok()?.cluster.clone()?.leader
            };
            if let Ok(Some(leader)) = timeout(Duration::from_secs(2), leader).await
                && let Some(index) = cluster.index_of(&leader)
            {
                return Ok(index);
            }
            if Instant::now() > deadline {
                return Err(format!("no leader of {name} within 30 s").into());
            }
            sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every consumer of the stream has nothing pending and
    /// nothing unacknowledged (twice in a row). `false` on timeout.
    pub async fn drain(&self, within: Duration) -> Fallible<bool> {
        let deadline = Instant::now() + within;
        let mut quiet = 0;
        let mut last_report = Instant::now();
        while Instant::now() < deadline {
            match timeout(Duration::from_secs(5), self.outstanding()).await {
                Ok(Ok(0)) => quiet += 1,
                Ok(Ok(left)) => {
                    quiet = 0;
                    if last_report.elapsed() > Duration::from_secs(10) {
                        eprintln!("  draining: {left} messages outstanding");
                        last_report = Instant::now();
                    }
                }
                _ => quiet = 0,
            }
            if quiet >= 3 {
                return Ok(true);
            }
            sleep(Duration::from_millis(500)).await;
        }
        Ok(false)
    }

    /// Pending plus unacknowledged messages over the stream's consumers.
    pub async fn outstanding(&self) -> Fallible<u64> {
        let stream = self.admin.get_stream(STREAM).await?;
        let consumers: Vec<_> = stream.consumers().try_collect().await?;
        if consumers.len() < 3 {
            return Err("the workers have not created their consumers yet".into());
        }
        Ok(consumers
            .iter()
            .map(|c| c.num_pending + c.num_ack_pending as u64)
            .sum())
    }

    /// A server's URL, straight (not through a proxy): where the operator's
    /// tool connects.
    pub fn server_url(&self) -> String {
        self.servers
            .addrs()
            .first()
            .map_or_else(String::new, |addr| format!("nats://{addr}"))
    }

    /// Messages stored in the stream.
    pub async fn stored(&self) -> Fallible<u64> {
        Ok(self
            .admin
            .get_stream(STREAM)
            .await?
            .info()
            .await?
            .state
            .messages)
    }

    /// Stops every worker with SIGTERM (a frozen one is thawed first) and
    /// returns how each process of the run ended.
    pub async fn stop_workers(&mut self) -> Vec<Exit> {
        for slot in 0..self.workers.len() {
            let Some(mut worker) = self.workers[slot].take() else {
                continue;
            };
            if worker.frozen {
                let _ = worker.signal(Signal::SIGCONT);
            }
            let status = match worker.signal(Signal::SIGTERM) {
                Err(e) => Err(e.to_string()),
                Ok(()) => match timeout(Duration::from_secs(20), worker.child.wait()).await {
                    Ok(status) => status.map_err(|e| e.to_string()),
                    Err(_) => {
                        let _ = worker.child.start_kill();
                        Err("did not stop within 20 s of SIGTERM".to_owned())
                    }
                },
            };
            self.exits.push(Exit {
                worker: worker.name,
                status,
                killed_by_fault: false,
            });
        }
        std::mem::take(&mut self.exits)
    }

    /// Every worker log of the run.
    pub fn logs(&self) -> &[PathBuf] {
        &self.logs
    }

    /// Keeps the logs directory (printed) instead of removing it.
    pub fn keep_logs(self) -> PathBuf {
        self.dir.keep()
    }
}

/// A proxy in front of each server.
async fn proxies(addrs: &[SocketAddr]) -> Fallible<Vec<Proxy>> {
    let mut proxies = Vec::with_capacity(addrs.len());
    for addr in addrs {
        proxies.push(Proxy::start(*addr).await?);
    }
    Ok(proxies)
}

async fn connect_through(links: &[Proxy]) -> Fallible<async_nats::Client> {
    let urls: Vec<String> = links.iter().map(Proxy::url).collect();
    Ok(async_nats::ConnectOptions::new()
        .ignore_discovered_servers()
        .max_reconnects(None)
        .connect(urls.as_slice())
        .await?)
}
