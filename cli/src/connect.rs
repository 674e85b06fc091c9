//! Where the servers are: the same settings a runtime uses, from flags or
//! the environment.

use idem::store::{KvStore, PgStore};

use crate::error::CliError;

/// The connection settings every command shares.
#[derive(clap::Args)]
pub struct Connection {
    /// The NATS server.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub server: String,
    /// A credentials file (user JWT and seed).
    #[arg(long, env = "NATS_CREDS", global = true)]
    pub creds: Option<String>,
    /// The claim bucket (`dedup = kv`).
    #[arg(
        long,
        env = "IDEM_BUCKET",
        default_value = "idem_claims",
        global = true
    )]
    pub bucket: String,
    /// The stream that stores dead letters.
    #[arg(long, env = "IDEM_DEAD_STREAM", default_value = idem::consumer::DEAD_LETTER_STREAM, global = true)]
    pub dead_stream: String,
    /// The PostgreSQL database of the inbox (`dedup = transactional`).
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub postgres: Option<String>,
    /// The inbox's schema.
    #[arg(long, env = "IDEM_SCHEMA", default_value = "idem", global = true)]
    pub schema: String,
}

impl Connection {
    /// A connected NATS client.
    pub async fn client(&self) -> Result<async_nats::Client, CliError> {
        let mut options = async_nats::ConnectOptions::new().name("idem-cli");
        if let Some(path) = &self.creds {
            options =
                options
                    .credentials_file(path)
                    .await
                    .map_err(|source| CliError::Credentials {
                        path: path.clone(),
                        source,
                    })?;
        }
        options
            .connect(&self.server)
            .await
            .map_err(|source| CliError::Connect {
                url: self.server.clone(),
                source,
            })
    }

    /// JetStream on a connected client.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context, CliError> {
        Ok(async_nats::jetstream::new(self.client().await?))
    }

    /// The claim bucket `bucket` as it is (none: it does not exist).
    pub async fn bucket(
        &self,
        js: &async_nats::jetstream::Context,
        bucket: &str,
    ) -> Result<KvStore, CliError> {
        KvStore::open_existing(js, bucket).await?.ok_or_else(|| {
            CliError::NotFound(format!("no claim bucket `{bucket}` on {}", self.server))
        })
    }

    /// A pool on the inbox's database, if one is configured.
    pub async fn pool(&self) -> Result<Option<sqlx::PgPool>, CliError> {
        let Some(url) = &self.postgres else {
            return Ok(None);
        };
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .map(Some)
            .map_err(CliError::Postgres)
    }

    /// The PostgreSQL inbox in `schema`, every row as it is: no retention
    /// of the CLI's own hides a row a handler still answers from (a handler
    /// may keep its keys longer than any default).
    pub async fn inbox(&self, schema: &str) -> Result<PgStore, CliError> {
        let pool = self.pool().await?.ok_or(CliError::NoPostgres)?;
        Ok(PgStore::open(pool, schema, std::time::Duration::MAX).await?)
    }
}
