//! What can go wrong, each with the exit code scripts rely on.

use idem::store::StoreError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server cannot be reached.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The server.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The credentials file cannot be read.
    #[error("cannot read the credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command that needs the PostgreSQL inbox, without one configured.
    #[error(
        "no PostgreSQL inbox configured: pass --postgres URL (or set DATABASE_URL) and --schema"
    )]
    NoPostgres,
    /// The database cannot be reached.
    #[error("cannot connect to PostgreSQL: {0}")]
    Postgres(#[source] sqlx::Error),
    /// The dedup store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A JetStream request failed.
    #[error("{what}: {source}")]
    JetStream {
        /// What was asked.
        what: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A key, handler name, time or reason that is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The operator did not confirm.
    #[error("not confirmed; nothing changed")]
    NotConfirmed,
    /// Refused: carried out, the command could break idem's promise (the
    /// message says how, and which flag overrides it).
    #[error("{0}")]
    Refused(String),
    /// The record changed between the read and the write: nothing changed.
    #[error("{0}")]
    Moved(String),
    /// The terminal could not be read or written.
    /// `provision --check` found settings that weaken the guarantees.
    #[error(
        "{0} setting(s) weaken idem's guarantees (see above, and docs/guarantees.md: what idem assumes of NATS)"
    )]
    Weakened(usize),

    #[error("terminal: {0}")]
    Terminal(#[source] std::io::Error),
    /// A replay could not republish a dead letter.
    #[error("replaying dead letter {sequence}: {source}")]
    Replay {
        /// The dead letter's sequence.
        sequence: u64,
        /// Why.
        #[source]
        source: idem::publisher::PublishError,
    },
}

impl CliError {
    /// The process's exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotFound(_) => 3,
            CliError::NotConfirmed => 4,
            CliError::Refused(_) => 5,
            CliError::Weakened(_) => 6,
            CliError::Invalid(_) => 2,
            _ => 1,
        }
    }

    /// A JetStream failure, saying what was asked.
    pub fn jetstream(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> Self {
        let what = what.into();
        move |source| CliError::JetStream { what, source }
    }
}
