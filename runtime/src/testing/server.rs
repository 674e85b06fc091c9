//! One `nats-server` process: start, signal, restart, clean up.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use semver::Version;
use tempfile::TempDir;

use super::ports::free_port;
use super::ready;
use super::{HarnessError, NatsBinary};

/// How long [`NatsServer::stop`] waits for a graceful exit before it kills.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a signalled process may take to stop or continue.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a start is retried when another process took the port first.
const START_ATTEMPTS: usize = 3;
/// How much of the log an error shows.
const LOG_TAIL_LINES: usize = 30;

/// A `nats-server` with JetStream on a free loopback port and a fresh
/// temporary store directory, owned by the test that started it.
///
/// The process is killed and the directory removed when the value is dropped,
/// including while a panicking test unwinds.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::testing::NatsServer;
///
/// let mut server = NatsServer::start().await?;
/// let client = async_nats::connect(server.client_url()).await?;
///
/// server.kill()?; // SIGKILL: the client sees a disconnect
/// server.restart().await?; // same port, same store: streams survive
/// client.flush().await?; // the client has reconnected
/// # Ok(()) }
/// ```
pub struct NatsServer {
    name: String,
    binary: NatsBinary,
    port: u16,
    route: Option<Route>,
    child: Option<Child>,
    dir: TempDir,
}

/// Cluster membership of a node: its route port and its peers' route ports.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub(crate) cluster_name: String,
    pub(crate) port: u16,
    pub(crate) peer_ports: Vec<u16>,
}

impl NatsServer {
    /// Starts a single server with the binary [`NatsBinary::locate`] finds,
    /// and waits until it accepts clients and JetStream answers.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(&NatsBinary::locate()?).await
    }

    /// Starts a single server with the given binary (to test against a
    /// specific server version).
    pub async fn start_with(binary: &NatsBinary) -> Result<Self, HarnessError> {
        Self::start_configured_with(binary, "").await
    }

    /// Starts a single server with `config` added to its configuration
    /// file — accounts, users and their permissions, limits. Give the
    /// configuration a `no_auth_user` so that the harness (and
    /// [`connect`](Self::connect)) can still connect without credentials.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), idem::testing::HarnessError> {
    /// use idem::testing::NatsServer;
    ///
    /// let server = NatsServer::start_configured(r#"
    ///     accounts { APP { jetstream: enabled, users: [ {user: admin, password: admin} ] } }
    ///     no_auth_user: admin
    /// "#).await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_configured(config: &str) -> Result<Self, HarnessError> {
        Self::start_configured_with(&NatsBinary::locate()?, config).await
    }

    async fn start_configured_with(
        binary: &NatsBinary,
        config: &str,
    ) -> Result<Self, HarnessError> {
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let mut server = Self::spawn(binary, format!("idem-{port}"), port, None, config)?;
            match ready::until_ready(&mut server).await {
                Ok(()) => return Ok(server),
                Err(e) if e.is_port_collision() && attempt < START_ATTEMPTS => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the store directory and launches the process, without waiting
    /// for it to get ready.
    pub(crate) fn spawn(
        binary: &NatsBinary,
        name: String,
        port: u16,
        route: Option<Route>,
        config: &str,
    ) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("idem-nats-")
            .tempdir()
            .map_err(HarnessError::TempDir)?;
        let mut server = Self {
            name,
            binary: binary.clone(),
            port,
            route,
            child: None,
            dir,
        };
        let mut file = config.to_owned();
        if server.route.is_some() {
            // A cluster node carries the tag `node:<name>`, so that a
            // stream can be placed on it (`Placement::tags`).
            file.push_str(&format!("\nserver_tags: [\"node:{}\"]\n", server.name));
        }
        if !file.trim().is_empty() {
            std::fs::write(server.config_file(), file).map_err(HarnessError::TempDir)?;
        }
        server.launch()?;
        Ok(server)
    }

    fn config_file(&self) -> PathBuf {
        self.dir.path().join("server.conf")
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let log = self.open_log()?;
        let log_err = log.try_clone().map_err(HarnessError::TempDir)?;
        let child = Command::new(self.binary.path())
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                path: self.binary.path().to_owned(),
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--server_name".into(),
            self.name.clone(),
            "--addr".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            "--jetstream".into(),
            "--store_dir".into(),
            self.store_dir().display().to_string(),
        ];
        if self.config_file().exists() {
            args.extend(["--config".into(), self.config_file().display().to_string()]);
        }
        if let Some(route) = &self.route {
            let peers: Vec<String> = route
                .peer_ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            args.extend([
                "--cluster_name".into(),
                route.cluster_name.clone(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", route.port),
                "--routes".into(),
                peers.join(","),
            ]);
        }
        args
    }

    fn open_log(&self) -> Result<File, HarnessError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(HarnessError::TempDir)
    }

    /// The URL a client connects to, `nats://127.0.0.1:PORT`.
    pub fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client address, `127.0.0.1:PORT` (what a [`Proxy`](super::Proxy)
    /// forwards to).
    pub fn client_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, self.port))
    }

    /// Connects a plain client with async-nats' default options.
    pub async fn connect(&self) -> Result<async_nats::Client, HarnessError> {
        let url = self.client_url();
        async_nats::connect(&url)
            .await
            .map_err(|source| HarnessError::Connect { url, source })
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server name (`--server_name`), as JetStream reports it in stream
    /// and consumer cluster info.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's version.
    pub fn version(&self) -> &Version {
        self.binary.version()
    }

    /// The JetStream store directory; it survives [`restart`](Self::restart).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's log file (all its runs, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// The process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (running or paused). Reaps it if it has
    /// exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Fails with [`HarnessError::ExitedEarly`] if the process has ended.
    pub(crate) fn check_alive(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Err(self.not_running());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(HarnessError::ExitedEarly {
                    name: self.name.clone(),
                    status,
                    log: self.log_tail(),
                })
            }
            Err(source) => Err(self.process_error("reap", source)),
        }
    }

    /// SIGKILL: the server dies at once, without flushing or saying goodbye
    /// to clients. JetStream data already written survives.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Err(self.not_running());
        };
        child.kill().map_err(|e| self.process_error("SIGKILL", e))?;
        child.wait().map_err(|e| self.process_error("reap", e))?;
        Ok(())
    }

    /// SIGTERM: a graceful shutdown. Kills the process if it has not exited
    /// after 10 s.
    pub async fn stop(&mut self) -> Result<(), HarnessError> {
        // A paused process would hold SIGTERM until it is resumed.
        self.signal(Signal::SIGCONT)?;
        self.signal(Signal::SIGTERM)?;
        let exited = ready::poll_until(STOP_TIMEOUT, || !self.is_running()).await;
        if exited { Ok(()) } else { self.kill() }
    }

    /// SIGSTOP: the process freezes with its connections open; clients see
    /// neither a disconnect nor answers. Returns once the kernel reports the
    /// process stopped, so nothing sent afterwards can be answered.
    pub async fn pause(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGSTOP)?;
        self.until_stopped(true).await
    }

    /// SIGCONT: a paused process carries on. Returns once it runs again.
    pub async fn resume(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGCONT)?;
        self.until_stopped(false).await
    }

    /// Polls `/proc/<pid>/stat` until the process is (or is no longer) in
    /// the stopped state. Signals are delivered asynchronously: a request
    /// sent right after SIGSTOP could otherwise still be answered.
    async fn until_stopped(&self, stopped: bool) -> Result<(), HarnessError> {
        let Some(pid) = self.pid() else {
            return Err(self.not_running());
        };
        let stat = PathBuf::from(format!("/proc/{pid}/stat"));
        let reached = ready::poll_until(SIGNAL_TIMEOUT, || {
            // The state is the field after the parenthesised command name.
            let state = std::fs::read_to_string(&stat).ok().and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            });
            match state.as_deref() {
                Some(state) => (state == "T") == stopped,
                None => true, // no procfs here: the signal was sent, that is all we can know
            }
        })
        .await;
        if reached {
            Ok(())
        } else {
            let action = if stopped {
                "see stopped after SIGSTOP"
            } else {
                "see running after SIGCONT"
            };
            Err(self.process_error(action, std::io::Error::from(std::io::ErrorKind::TimedOut)))
        }
    }

    /// Starts the server again on the same port with the same store
    /// directory, and waits until it is ready. A server that still runs is
    /// first [`stop`](Self::stop)ped.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        if self.is_running() {
            self.stop().await?;
        }
        self.launch()?;
        ready::until_ready(self).await
    }

    fn signal(&self, sig: Signal) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_ref() else {
            return Err(self.not_running());
        };
        let pid = i32::try_from(child.id()).map_err(|e| {
            self.process_error(
                sig.as_str(),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        signal::kill(Pid::from_raw(pid), sig)
            .map_err(|errno| self.process_error(sig.as_str(), errno.into()))
    }

    fn not_running(&self) -> HarnessError {
        HarnessError::NotRunning {
            name: self.name.clone(),
        }
    }

    fn process_error(&self, action: &'static str, source: std::io::Error) -> HarnessError {
        HarnessError::Process {
            name: self.name.clone(),
            action,
            source,
        }
    }

    /// The temporary directory holding the store and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a paused process too; reap it so that no
            // zombie is left. The temporary directory is removed after this.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("name", &self.name)
            .field("url", &self.client_url())
            .field("version", &self.version().to_string())
            .field("pid", &self.pid())
            .finish()
    }
}
