//! `idem provision --check`: what idem assumes of the broker, checked where
//! it can be seen — the claim bucket's, the dead-letter stream's and the
//! handlers' streams' storage and replicas, and each server's JetStream
//! sync setting (over a system-account connection). Each finding names the
//! setting that would remove it (docs/guarantees.md, "What idem assumes of
//! NATS and PostgreSQL").

use std::time::Duration;

use async_nats::jetstream::stream::{self, StorageType};
use futures::StreamExt;
use serde::Serialize;

/// A setting that weakens a guarantee.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked: `stream KV_idem_claims`, `server n1`.
    pub subject: String,
    /// The setting, as the server names it.
    pub setting: String,
    /// What it costs, and what to set.
    pub says: String,
}

/// What a stream holds, for the findings' words.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Holds {
    /// Claim records.
    Claims,
    /// Dead letters.
    Letters,
    /// A handler's messages.
    Messages,
}

impl Holds {
    fn what(self) -> &'static str {
        match self {
            Holds::Claims => "claim records",
            Holds::Letters => "dead letters",
            Holds::Messages => "messages",
        }
    }
}

/// The findings about a stream's configuration.
pub fn stream_findings(name: &str, holds: Holds, config: &stream::Config) -> Vec<Finding> {
    let subject = format!("stream {name}");
    let mut found = Vec::new();
    if config.storage == StorageType::Memory {
        found.push(Finding {
            subject: subject.clone(),
            setting: "storage: memory".into(),
            says: format!(
                "a server restart loses every one of its {}; use storage: file",
                holds.what()
            ),
        });
    }
    if config.num_replicas < 3 {
        found.push(Finding {
            subject,
            setting: format!("replicas: {}", config.num_replicas.max(1)),
            says: format!(
                "the loss, corruption or lost tail of one node loses {} it acknowledged; use 3 replicas on a cluster",
                holds.what()
            ),
        });
    }
    found
}

/// The finding about one server's `/varz` (its `jetstream.config`), if any.
pub fn sync_finding(varz: &serde_json::Value) -> Option<Finding> {
    let server = varz
        .get("server_name")
        .and_then(|name| name.as_str())
        .unwrap_or("?");
    let config = varz.get("jetstream")?.get("config")?;
    if config
        .get("sync_always")
        .and_then(serde_json::Value::as_bool)
        == Some(true)
    {
        return None;
    }
    let interval = config
        .get("sync_interval")
        .and_then(serde_json::Value::as_u64)
        .map(Duration::from_nanos);
    let every = interval.map_or_else(
        || "on the server's default interval".to_owned(),
        |d| format!("every {}", humantime::format_duration(d)),
    );
    Some(Finding {
        subject: format!("server {server}"),
        setting: interval.map_or_else(
            || "sync_interval: default".to_owned(),
            |d| format!("sync_interval: {}", humantime::format_duration(d)),
        ),
        says: format!(
            "JetStream writes reach the disk {every}, after they were acknowledged: a power loss or OS crash loses what was acknowledged since (claims, messages, dead letters); set jetstream {{ sync_interval: always }}"
        ),
    })
}

/// Every server's `/varz`, asked over a system-account connection
/// (`$SYS.REQ.SERVER.PING.VARZ`; each server answers once), gathered for
/// `wait`.
pub async fn varz_of_every_server(
    system: &async_nats::Client,
    wait: Duration,
) -> Result<Vec<serde_json::Value>, async_nats::Error> {
    let inbox = system.new_inbox();
    let mut answers = system.subscribe(inbox.clone()).await?;
    system
        .publish_with_reply("$SYS.REQ.SERVER.PING.VARZ", inbox, "".into())
        .await?;
    system.flush().await?;
    let mut found = Vec::new();
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            answer = answers.next() => match answer {
                // A status (no responders: not the system account) carries
                // no payload.
                Some(message) if message.payload.is_empty() => {}
                Some(message) => {
                    let parsed: serde_json::Value = serde_json::from_slice(&message.payload)?;
                    // The answer wraps the server's `/varz` in `data`.
                    if let Some(varz) = parsed.get("data") {
                        found.push(varz.clone());
                    }
                }
                None => break,
            },
            () = &mut deadline => break,
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_replica_in_memory_is_two_findings_a_file_r3_stream_none() {
        let weak = stream::Config {
            storage: StorageType::Memory,
            num_replicas: 1,
            ..Default::default()
        };
        let found = stream_findings("KV_idem_claims", Holds::Claims, &weak);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].setting, "storage: memory");
        assert_eq!(found[1].setting, "replicas: 1");
        assert!(found[1].says.contains("claim records"));
        let strong = stream::Config {
            storage: StorageType::File,
            num_replicas: 3,
            ..Default::default()
        };
        assert!(stream_findings("ORDERS", Holds::Messages, &strong).is_empty());
    }

    #[test]
    fn a_server_that_syncs_every_two_minutes_is_a_finding_one_that_always_syncs_is_not() {
        let lazy = serde_json::json!({
            "server_name": "n1",
            "jetstream": { "config": { "sync_interval": 120_000_000_000u64 } }
        });
        let found = sync_finding(&lazy).expect("a finding");
        assert_eq!(found.subject, "server n1");
        assert_eq!(found.setting, "sync_interval: 2m");
        assert!(
            found.says.contains("sync_interval: always"),
            "{}",
            found.says
        );
        let always = serde_json::json!({
            "server_name": "n1",
            "jetstream": { "config": { "sync_interval": 120_000_000_000u64, "sync_always": true } }
        });
        assert_eq!(sync_finding(&always), None);
    }
}
