//! The operator's turn: once the faults have healed and the stream has
//! drained, with the workers still running, an operator uses the `idem`
//! tool the way the docs tell them to —
//!
//! * **a fix, then a replay:** every key dead-lettered `handler_error` (the
//!   workload's scripted permanent failures) is "fixed" (the handler now
//!   succeeds for it), and its letters are replayed by **two `idem dead
//!   replay` processes at once**;
//! * **forget, then resend:** a few completed keys of each deduplicating
//!   handler are forgotten (`idem keys forget`) and their payloads sent
//!   again under a new message id: each must run again, once.
//!
//! Then the stream drains again, and the checks hold the tools to
//! docs/guarantees.md ("What the operator's tools promise"): nothing lost
//! through a tool, a replayed letter applied once and deleted, a forgotten
//! key run exactly once more.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Output;

use idem::Publisher;
use idem::publisher::Outgoing;
use tokio::process::Command;

use crate::deploy::{Deployment, Fallible};
use crate::evidence::dead_letters;
use crate::order::{Behaviour, Level};
use crate::workload::{Copy, Workload};

/// Keys forgotten and resent, per deduplicating handler.
const FORGOTTEN_PER_HANDLER: usize = 10;

/// A key of one handler.
pub type Key = (Level, String);

/// What the operator did, for the checks.
#[derive(Debug, Default)]
pub struct Operations {
    /// Keys whose permanent failure was fixed, with the value of the letter
    /// replayed for each.
    pub fixed: BTreeMap<Key, u64>,
    /// How each of the two concurrent replays ended: its outcomes by name
    /// (`republished`, `replayed_elsewhere`, `in_flight`, `already_done`,
    /// …), or why it failed.
    pub replays: Vec<Result<BTreeMap<String, usize>, String>>,
    /// Keys forgotten and resent, with their executions before.
    pub forgotten: BTreeMap<Key, usize>,
    /// A forget the tool refused or failed.
    pub forget_failures: Vec<String>,
    /// Messages the operator's actions added to the stream: one copy per
    /// replayed letter, one resend per forgotten key.
    pub published: usize,
}

impl Operations {
    /// How many times `key` may run: once, twice when it was forgotten.
    pub fn allowed_runs(&self, key: &Key) -> usize {
        1 + usize::from(self.forgotten.contains_key(key))
    }
}

/// The `idem` operator binary, built next to this one (`cargo build -p
/// idem-cli`).
fn tool() -> Fallible<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("idem");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "the operator's tool is not built at {}: run `cargo build -p idem-cli` first",
            path.display()
        )
        .into())
    }
}

/// The tool with the deployment's connection settings.
fn idem(deployment: &Deployment, tool: &PathBuf) -> Command {
    let mut command = Command::new(tool);
    command
        .arg("--server")
        .arg(deployment.server_url())
        .arg("--postgres")
        .arg(deployment.database.url())
        .arg("--schema")
        .arg(deployment.database.schema())
        .kill_on_drop(true);
    command
}

/// What a tool's run said, as an error if it failed.
fn succeeded(what: &str, output: std::io::Result<Output>) -> Result<Vec<u8>, String> {
    match output {
        Ok(output) if output.status.success() => Ok(output.stdout),
        Ok(output) => Err(format!(
            "{what}: {} — {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Takes the operator's turn (see the module's doc).
pub async fn act(deployment: &Deployment, workload: &Workload) -> Fallible<Operations> {
    let tool = tool()?;
    let mut operations = Operations::default();

    // The fix: every permanently failing key of a deduplicating handler.
    for letter in dead_letters(deployment).await? {
        if letter.reason == "handler_error" && letter.level != Level::Off {
            deployment
                .ledger
                .fix(deployment.database.pool(), letter.level, &letter.order.key)
                .await?;
            operations
                .fixed
                .insert((letter.level, letter.order.key), letter.order.value);
        }
    }
    // Two operators replay them at the same time.
    let replay = |deployment: &Deployment| {
        let mut command = idem(deployment, &tool);
        command.args([
            "--json",
            "dead",
            "replay",
            "--reason",
            "handler_error",
            "--yes",
        ]);
        command.output()
    };
    let (first, second) = tokio::join!(replay(deployment), replay(deployment));
    for output in [first, second] {
        let tallied = succeeded("idem dead replay", output).and_then(|stdout| tally(&stdout));
        // Each letter is reported `republished` by the replay whose copy
        // the broker stored (under the letter's one replay id), and
        // `replayed_elsewhere` or `in_flight` by the other.
        if let Ok(outcomes) = &tallied {
            operations.published += outcomes.get("republished").copied().unwrap_or(0);
        }
        operations.replays.push(tallied);
    }

    // Forget a few completed keys, then send each again.
    let executions = deployment.ledger.read(deployment.database.pool()).await?;
    let mut runs: BTreeMap<Key, usize> = BTreeMap::new();
    for e in &executions {
        *runs.entry((e.level, e.key.clone())).or_default() += 1;
    }
    let mut copies: BTreeMap<Key, BTreeSet<Copy>> = BTreeMap::new();
    for p in &workload.messages {
        copies
            .entry((p.level, p.order.key.clone()))
            .or_default()
            .insert(p.copy);
    }
    let publisher = Publisher::new(deployment.producer.clone());
    for level in [Level::Kv, Level::Transactional] {
        let chosen = workload
            .messages
            .iter()
            .filter(|p| p.level == level && p.order.behaviour == Behaviour::Succeed)
            .filter(|p| {
                let key = (p.level, p.order.key.clone());
                copies[&key].len() == 1 && runs.get(&key) == Some(&1)
            })
            .take(FORGOTTEN_PER_HANDLER);
        for planned in chosen {
            let mut command = idem(deployment, &tool);
            command.args([
                "keys",
                "forget",
                level.handler(),
                &planned.order.key,
                "--yes",
            ]);
            if level == Level::Transactional {
                command.arg("--transactional");
            }
            let what = format!("idem keys forget {} {}", level.handler(), planned.order.key);
            if let Err(e) = succeeded(&what, command.output().await) {
                operations.forget_failures.push(e);
                continue;
            }
            let key = (level, planned.order.key.clone());
            operations.forgotten.insert(key.clone(), runs[&key]);
            let message = Outgoing::json(level.subject(), &planned.order)?
                .with_id(format!("{}~f", planned.order.key));
            publisher.send(message).await?;
            operations.published += 1;
        }
    }
    Ok(operations)
}

/// A replay's JSON report, counted by outcome.
fn tally(stdout: &[u8]) -> Result<BTreeMap<String, usize>, String> {
    let report: Vec<serde_json::Value> = serde_json::from_slice(stdout)
        .map_err(|e| format!("idem dead replay printed no JSON report: {e}"))?;
    let mut outcomes = BTreeMap::new();
    for entry in report {
        let outcome = entry["outcome"].as_str().unwrap_or("(none)").to_owned();
        *outcomes.entry(outcome).or_default() += 1;
    }
    Ok(outcomes)
}
