//! A NATS server for examples: the one already running, or a throw-away one.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{HarnessError, NatsServer};

/// Where examples look for NATS when `NATS_URL` is unset.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The server an example talks to: `NATS_URL` (or [`DEFAULT_URL`]) if
/// something listens there, else a throw-away `nats-server` that lives as long
/// as this value.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::testing::LocalNats;
///
/// let nats = LocalNats::from_env_or_spawn().await?;
/// println!("{}", nats.describe()); // says whether it started a server
/// let client = async_nats::connect(nats.url()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LocalNats {
    url: String,
    spawned: Option<NatsServer>,
}

impl LocalNats {
    /// Uses `NATS_URL` or [`DEFAULT_URL`] when a server listens there;
    /// otherwise starts one with the binary [`NatsBinary::locate`] finds.
    ///
    /// [`NatsBinary::locate`]: super::NatsBinary::locate
    pub async fn from_env_or_spawn() -> Result<Self, HarnessError> {
        let url = std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        if listens(&url).await {
            return Ok(Self { url, spawned: None });
        }
        let server = NatsServer::start().await?;
        Ok(Self {
            url: server.client_url(),
            spawned: Some(server),
        })
    }

    /// The one line an example spends on finding a server: a client of
    /// `NATS_URL` (or [`DEFAULT_URL`]) if something listens there, else of
    /// a throw-away server kept alive by the returned value; says which on
    /// standard error.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// // Dev helper: $NATS_URL, or a throw-away nats-server for this run.
    /// let (client, _nats) = idem::testing::LocalNats::connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect() -> Result<(async_nats::Client, Self), HarnessError> {
        let nats = Self::from_env_or_spawn().await?;
        eprintln!("{}", nats.describe());
        let client =
            async_nats::connect(nats.url())
                .await
                .map_err(|source| HarnessError::Connect {
                    url: nats.url.clone(),
                    source,
                })?;
        Ok((client, nats))
    }

    /// The URL to connect to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server this value started, if it started one.
    pub fn spawned(&self) -> Option<&NatsServer> {
        self.spawned.as_ref()
    }

    /// One line for the user: which server, and whether it is throw-away.
    pub fn describe(&self) -> String {
        match &self.spawned {
            None => format!("using the NATS server at {}", self.url),
            Some(server) => format!(
                "nothing listened on $NATS_URL or {DEFAULT_URL}: started a throw-away nats-server {} \
                 at {} (removed on exit)",
                server.version(),
                self.url
            ),
        }
    }
}

/// Whether a TCP connection to the URL's host and port succeeds quickly.
async fn listens(url: &str) -> bool {
    let authority = url.split("://").last().unwrap_or(url);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = host_port.split(',').next().unwrap_or(host_port);
    matches!(
        timeout(Duration::from_secs(1), TcpStream::connect(host_port)).await,
        Ok(Ok(_))
    )
}
