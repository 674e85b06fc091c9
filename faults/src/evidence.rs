//! What a run leaves behind, gathered once the stream has drained and the
//! workers have stopped: the ledger, the dead letters with the claim record
//! of each, the runtime's `reclaimed`/`lease_lost` events and any panic from
//! the workers' logs, and what the broker stored.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use idem::claim::ClaimState;
use idem::consumer::{DEAD_LETTER_STREAM, headers};
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::{DedupStore, KvStore, KvStoreConfig, PgStore};

use crate::deploy::{Deployment, Exit, Fallible};
use crate::ledger::Execution;
use crate::order::{Level, Order, SHORT_BUCKET, SHORT_RETENTION};

/// One dead letter and the claim record of its key.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The handler that gave up.
    pub level: Level,
    /// `Idem-Reason`.
    pub reason: String,
    /// The original payload.
    pub order: Order,
    /// The state of the key's claim record (`None`: no record).
    pub record: Option<ClaimState>,
}

/// A runtime event that explains a repeated `kv` effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEvent {
    /// `reclaimed` or `lease_lost`.
    pub kind: String,
    /// The handler.
    pub level: Level,
    /// The key.
    pub key: String,
}

/// Everything the checks look at.
#[derive(Debug)]
pub struct Evidence {
    /// Every execution of every effect.
    pub executions: Vec<Execution>,
    /// Every dead letter.
    pub dead_letters: Vec<DeadLetter>,
    /// `reclaimed` and `lease_lost` events, from every worker's log.
    pub events: Vec<LeaseEvent>,
    /// Log lines that report a panic.
    pub panics: Vec<String>,
    /// How every worker process ended.
    pub exits: Vec<Exit>,
    /// Messages the broker stored in the stream.
    pub stored: u64,
    /// Whether the consumers drained.
    pub drained: bool,
}

/// Reads the evidence of a finished run.
pub async fn gather(
    deployment: &Deployment,
    exits: Vec<Exit>,
    drained: bool,
) -> Fallible<Evidence> {
    let executions = deployment.ledger.read(deployment.database.pool()).await?;
    let dead_letters = dead_letters(deployment).await?;
    let mut events = Vec::new();
    let mut panics = Vec::new();
    for log in deployment.logs() {
        read_log(log, &mut events, &mut panics)?;
    }
    Ok(Evidence {
        executions,
        dead_letters,
        events,
        panics,
        exits,
        stored: deployment.stored().await?,
        drained,
    })
}

/// Every dead letter in the dead-letter stream, with its key's record.
pub async fn dead_letters(deployment: &Deployment) -> Fallible<Vec<DeadLetter>> {
    let js = &deployment.admin;
    let Ok(mut stream) = js.get_stream(DEAD_LETTER_STREAM).await else {
        return Ok(Vec::new());
    };
    let state = stream.info().await?.state.clone();
    let kv = KvStore::open(
        js,
        KvStoreConfig::default().replicas(deployment.servers.replicas()),
    )
    .await?;
    let short = KvStore::open(
        js,
        KvStoreConfig::default()
            .bucket(SHORT_BUCKET)
            .retention(SHORT_RETENTION)
            .replicas(deployment.servers.replicas()),
    )
    .await?;
    let pg = PgStore::open(
        deployment.database.pool().clone(),
        deployment.database.schema(),
        Duration::from_secs(86_400),
    )
    .await?;
    let mut letters = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        // A replayed letter was deleted: its sequence is a gap.
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
            Err(e) => return Err(e.into()),
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let handler = header(headers::HANDLER);
        let level = Level::of_handler(&handler)
            .ok_or_else(|| format!("a dead letter from an unknown handler {handler:?}"))?;
        let order: Order = serde_json::from_slice(&message.payload)?;
        let key = RecordKey::new(
            &HandlerName::new(&handler)?,
            &IdempotencyKey::new(order.key.as_str())?,
        );
        let record = match level {
            Level::Kv | Level::Twin => kv.inspect(&key).await?,
            Level::Short => short.inspect(&key).await?,
            Level::Transactional => pg.inspect(&key).await?,
            Level::Off => None,
        };
        letters.push(DeadLetter {
            level,
            reason: header(headers::REASON),
            order,
            record: record.map(|r| r.record.state),
        });
    }
    Ok(letters)
}

/// Collects lease events and panics from one worker's log (JSON lines from
/// the runtime; a panic message is plain text).
fn read_log(path: &Path, events: &mut Vec<LeaseEvent>, panics: &mut Vec<String>) -> Fallible<()> {
    let text = std::fs::read_to_string(path)?;
    for line in text.lines() {
        if line.contains("panicked at") {
            // The workload's scripted panics are the handler's own (caught
            // by the runtime, dead-lettered `panic`); any other escaped.
            if !line.contains(crate::worker::SCRIPTED_PANIC_AT) {
                panics.push(format!("{}: {line}", path.display()));
            }
            continue;
        }
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(kind) = value["fields"]["event"].as_str() else {
            continue;
        };
        let level = value["span"]["handler"]
            .as_str()
            .and_then(Level::of_handler);
        let key = value["span"]["key"].as_str().and_then(debug_key);
        if let (Some(level), Some(key)) = (level, key) {
            events.push(LeaseEvent {
                kind: kind.to_owned(),
                level,
                key,
            });
        } else {
            return Err(format!(
                "a lease event without handler or key in {}: {line}",
                path.display()
            )
            .into());
        }
    }
    Ok(())
}

/// `IdempotencyKey("k-1")` → `k-1`.
fn debug_key(text: &str) -> Option<String> {
    let inner = text.strip_prefix("IdempotencyKey(")?.strip_suffix(')')?;
    serde_json::from_str(inner).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_back_from_their_debug_form() {
        let key = IdempotencyKey::new("k-12").expect("key");
        assert_eq!(debug_key(&format!("{key:?}")).as_deref(), Some("k-12"));
        assert_eq!(debug_key("k-12"), None);
    }
}
