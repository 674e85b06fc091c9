//! The invariants, evaluated on the evidence of a run. Each is named for
//! what it proves; a failed one names the keys that broke it.

use std::collections::{BTreeMap, BTreeSet};

use idem::claim::ClaimState;

use crate::evidence::Evidence;
use crate::ledger::Execution;
use crate::operator::Operations;
use crate::order::{Behaviour, Level, SHORT_RETENTION};
use crate::schedule::Fault;
use crate::workload::{Copy, Workload};

/// What the producer was told.
#[derive(Clone, Debug, Default)]
pub struct Publishing {
    /// Messages the broker confirmed.
    pub confirmed: usize,
    /// Confirmations that said "stored before" (resends, lost PubAcks).
    pub duplicates: usize,
    /// Messages whose publish failed for good, with the error.
    pub failed: Vec<String>,
}

/// One invariant's verdict.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// What it proves.
    pub name: &'static str,
    /// Whether it held.
    pub passed: bool,
    /// The figures behind it, or the keys that broke it.
    pub detail: String,
}

type Key = (Level, String);

/// Evaluates every invariant.
pub fn check(
    workload: &Workload,
    faults: &[Fault],
    publishing: &Publishing,
    operations: Option<&Operations>,
    evidence: &Evidence,
) -> Vec<Verdict> {
    let none = Operations::default();
    let operations = operations.unwrap_or(&none);
    let mut planned: BTreeMap<Key, BTreeSet<u64>> = BTreeMap::new();
    let mut conflicted: BTreeSet<Key> = BTreeSet::new();
    let mut behaviour: BTreeMap<Key, Behaviour> = BTreeMap::new();
    for p in &workload.messages {
        let key = (p.level, p.order.key.clone());
        if p.copy == Copy::Conflict {
            conflicted.insert(key.clone());
        }
        behaviour.insert(key.clone(), p.order.behaviour);
        planned.entry(key).or_default().insert(p.order.value);
    }
    let mut runs: BTreeMap<Key, Vec<&Execution>> = BTreeMap::new();
    for e in &evidence.executions {
        runs.entry((e.level, e.key.clone())).or_default().push(e);
    }
    let mut letters: BTreeMap<Key, Vec<(&str, u64)>> = BTreeMap::new();
    for d in &evidence.dead_letters {
        letters
            .entry((d.level, d.order.key.clone()))
            .or_default()
            .push((d.reason.as_str(), d.order.value));
    }
    let mut explained: BTreeMap<Key, usize> = BTreeMap::new();
    for e in &evidence.events {
        *explained.entry((e.level, e.key.clone())).or_default() += 1;
    }
    // Runs beyond those allowed (a forgotten key runs once more).
    let repeats = |level: Level| -> Vec<(&Key, usize)> {
        runs.iter()
            .filter(|(k, r)| k.0 == level && r.len() > operations.allowed_runs(k))
            .map(|(k, r)| (k, r.len() + 1 - operations.allowed_runs(k)))
            .collect()
    };
    let mut verdicts = Vec::new();

    verdicts.push(Verdict {
        name: "every publish confirmed by the broker",
        passed: publishing.failed.is_empty() && publishing.confirmed == workload.messages.len(),
        detail: format!(
            "{} of {} sends confirmed, {} as already stored; failed: {}",
            publishing.confirmed,
            workload.messages.len(),
            publishing.duplicates,
            sample(publishing.failed.iter())
        ),
    });

    let distinct = (workload.distinct_ids() + operations.published) as u64;
    verdicts.push(Verdict {
        name: "the broker stored each message id once",
        passed: evidence.stored == distinct,
        detail: format!(
            "{} stored for {distinct} distinct ids ({} of them the operator's copies and resends)",
            evidence.stored, operations.published
        ),
    });

    let lost: Vec<String> = planned
        .iter()
        .filter_map(|(key, values)| {
            let mut seen: BTreeSet<u64> = runs
                .get(key)
                .into_iter()
                .flatten()
                .map(|e| e.value)
                .collect();
            seen.extend(letters.get(key).into_iter().flatten().map(|(_, v)| *v));
            (!values.is_subset(&seen)).then(|| format!("{} {}", key.0.name(), key.1))
        })
        .collect();
    verdicts.push(Verdict {
        name: "nothing lost: every payload ran or was dead-lettered",
        passed: lost.is_empty(),
        detail: format!("{} keys; lost: {}", planned.len(), sample(lost.iter())),
    });

    let tx_twice = repeats(Level::Transactional);
    verdicts.push(Verdict {
        name: "transactional: no effect ran twice",
        passed: tx_twice.is_empty(),
        detail: format!(
            "{} keys ran more than once: {}",
            tx_twice.len(),
            sample(tx_twice.iter().map(|(k, n)| format!("{} ×{n}", k.1)))
        ),
    });

    let kv_twice: Vec<(&Key, usize)> = Level::ALL
        .into_iter()
        .filter(|l| l.claims_in_kv() && !l.expires())
        .flat_map(repeats)
        .collect();
    let unexplained: Vec<String> = kv_twice
        .iter()
        .filter(|(k, n)| explained.get(*k).copied().unwrap_or(0) < n - 1)
        .map(|(k, n)| format!("{} ×{n}", k.1))
        .collect();
    verdicts.push(Verdict {
        name: "kv: every repeated effect explained by a lease event (clock skew and deploys included)",
        passed: unexplained.is_empty(),
        detail: format!(
            "{} keys ran twice, {} unexplained: {}",
            kv_twice.len(),
            unexplained.len(),
            sample(unexplained.iter())
        ),
    });

    let threats = faults
        .iter()
        .filter(|f| f.kind.can_cost_a_lease(f.hold))
        .count();
    verdicts.push(Verdict {
        name: "kv: no repeated effect unless a fault could cost a lease",
        passed: threats > 0 || kv_twice.is_empty(),
        detail: format!(
            "{threats} faults could cost a lease; {} keys ran twice",
            kv_twice.len()
        ),
    });

    verdicts.push(expiry_verdict(&runs, &explained));

    let mut conflict_failures = Vec::new();
    // Where records expire, a payload reusing a key after the first one's
    // record expired owns it afresh: the expiry verdict covers those keys.
    for key in conflicted.iter().filter(|(level, _)| !level.expires()) {
        let applied: BTreeSet<u64> = runs
            .get(key)
            .into_iter()
            .flatten()
            .map(|e| e.value)
            .collect();
        let lettered = |wanted: &str| -> BTreeSet<u64> {
            letters
                .get(key)
                .into_iter()
                .flatten()
                .filter(|(reason, _)| *reason == wanted)
                .map(|(_, v)| *v)
                .collect()
        };
        let refused = lettered("key_conflict");
        // The first payload to claim the key owns it: applied, or — if the
        // key's handler fails or panics — dead-lettered for that.
        let failed = behaviour[key]
            .dead_letter_reason()
            .map(lettered)
            .unwrap_or_default();
        let owners: BTreeSet<u64> = applied.union(&failed).copied().collect();
        let all = &planned[key];
        let ok = owners.len() == 1
            && owners.is_disjoint(&refused)
            && all
                .iter()
                .all(|v| owners.contains(v) || refused.contains(v));
        if !ok {
            conflict_failures.push(format!(
                "{} applied {applied:?} failed {failed:?} refused {refused:?}",
                key.1
            ));
        }
    }
    verdicts.push(Verdict {
        name: "reused keys: the first payload owns the key, the other is dead-lettered key_conflict",
        passed: conflict_failures.is_empty(),
        detail: format!(
            "{} reused keys; wrong: {}",
            conflicted.len(),
            sample(conflict_failures.iter())
        ),
    });

    let overlapping: Vec<String> = runs
        .iter()
        .filter(|((level, _), _)| *level != Level::Off)
        .filter(|(key, r)| {
            let overlap = r
                .iter()
                .enumerate()
                .any(|(i, a)| r[i + 1..].iter().any(|b| a.overlaps(b)));
            overlap && explained.get(*key).copied().unwrap_or(0) == 0
        })
        .map(|(key, _)| format!("{} {}", key.0.name(), key.1))
        .collect();
    verdicts.push(Verdict {
        name: "no two executions of a key overlapped without a lease event",
        passed: overlapping.is_empty(),
        detail: format!("overlapping: {}", sample(overlapping.iter())),
    });

    let unrecorded: Vec<String> = evidence
        .dead_letters
        .iter()
        .filter(|d| d.level != Level::Off)
        .filter(|d| {
            // A record that expires may be gone by the end of the run.
            let expired = d.level.expires() && d.record.is_none();
            !expired
                && !matches!(
                    (d.reason.as_str(), d.record),
                    ("key_conflict", Some(ClaimState::Done)) | (_, Some(ClaimState::Dead))
                )
        })
        .map(|d| {
            format!(
                "{} {} ({}, record {:?})",
                d.level.name(),
                d.order.key,
                d.reason,
                d.record
            )
        })
        .collect();
    verdicts.push(Verdict {
        name: "every dead letter has its claim record",
        passed: unrecorded.is_empty(),
        detail: format!(
            "{} dead letters; without record: {}",
            evidence.dead_letters.len(),
            sample(unrecorded.iter())
        ),
    });

    let misreasoned: Vec<String> = evidence
        .dead_letters
        .iter()
        .filter(|d| {
            let key = (d.level, d.order.key.clone());
            let scripted = behaviour.get(&key).and_then(|b| b.dead_letter_reason());
            let reused = conflicted.contains(&key) && d.reason == "key_conflict";
            !(reused || scripted == Some(d.reason.as_str()))
        })
        .map(|d| format!("{} {} ({})", d.level.name(), d.order.key, d.reason))
        .collect();
    let by_reason =
        evidence
            .dead_letters
            .iter()
            .fold(BTreeMap::<&str, usize>::new(), |mut counts, d| {
                *counts.entry(d.reason.as_str()).or_default() += 1;
                counts
            });
    verdicts.push(Verdict {
        name: "every dead letter has the reason its key's scripted behaviour calls for",
        passed: misreasoned.is_empty(),
        detail: format!(
            "{by_reason:?}; wrong reason: {}",
            sample(misreasoned.iter())
        ),
    });

    verdicts.extend(operator_verdicts(operations, &runs, &explained, evidence));

    verdicts.push(Verdict {
        name: "stream and consumers drained",
        passed: evidence.drained,
        detail: if evidence.drained {
            "nothing pending, nothing unacknowledged".to_owned()
        } else {
            "messages still outstanding at the deadline".to_owned()
        },
    });

    verdicts.push(Verdict {
        name: "no panic escaped a worker (handler panics are caught and dead-lettered)",
        passed: evidence.panics.is_empty(),
        detail: sample(evidence.panics.iter()),
    });

    let unclean: Vec<String> = evidence
        .exits
        .iter()
        .filter(|e| !e.killed_by_fault && !e.status.as_ref().is_ok_and(|s| s.success()))
        .map(|e| format!("{}: {:?}", e.worker, e.status))
        .collect();
    verdicts.push(Verdict {
        name: "every surviving worker stopped cleanly on SIGTERM",
        passed: unclean.is_empty(),
        detail: format!(
            "{} worker processes; unclean: {}",
            evidence.exits.len(),
            sample(unclean.iter())
        ),
    });
    verdicts
}

/// Where records expire ([`SHORT_RETENTION`]), a key is deduplicated for
/// the retention after its last write: it may run again only once its
/// record could have expired — the next run starting at least a retention
/// after the previous one ended (its completion is written after) — or
/// with a lease event (a claim that expired while its worker was frozen).
fn expiry_verdict(
    runs: &BTreeMap<Key, Vec<&Execution>>,
    explained: &BTreeMap<Key, usize>,
) -> Verdict {
    /// The effect's end is noted just before its completion is written.
    const SLACK_US: i64 = 100_000;
    let retention_us = i64::try_from(SHORT_RETENTION.as_micros()).unwrap_or(i64::MAX);
    let mut again = 0;
    let mut early: Vec<String> = Vec::new();
    let mut keys = 0;
    for (key, executions) in runs.iter().filter(|((level, _), _)| level.expires()) {
        keys += 1;
        let mut sorted = executions.clone();
        sorted.sort_by_key(|e| e.started_us);
        let too_soon = sorted
            .windows(2)
            .filter(|pair| pair[1].started_us + SLACK_US < pair[0].ended_us + retention_us)
            .count();
        again += sorted.len().saturating_sub(1);
        if too_soon > explained.get(key).copied().unwrap_or(0) {
            early.push(format!("{} ×{} ({too_soon} too soon)", key.1, sorted.len()));
        }
    }
    Verdict {
        name: "kv, 3 s retention: a key runs again only after its record expired, or with a lease event",
        passed: early.is_empty(),
        detail: format!(
            "{keys} keys ran, {again} runs after an expiry; too soon: {}",
            sample(early.iter())
        ),
    }
}

/// What the operator's tools promise (docs/guarantees.md).
fn operator_verdicts(
    operations: &Operations,
    runs: &BTreeMap<Key, Vec<&Execution>>,
    explained: &BTreeMap<Key, usize>,
    evidence: &Evidence,
) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    let failed: Vec<&String> = operations
        .replays
        .iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    let outcomes: Vec<String> = operations
        .replays
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|outcomes| format!("{outcomes:?}"))
        .collect();
    let left: Vec<String> = evidence
        .dead_letters
        .iter()
        .filter(|d| d.reason == "handler_error")
        .filter(|d| {
            operations
                .fixed
                .contains_key(&(d.level, d.order.key.clone()))
        })
        .map(|d| format!("{} {} ({})", d.level.name(), d.order.key, d.reason))
        .collect();
    verdicts.push(Verdict {
        name: "operator: two replays at once both succeed, and no fixed key's handler_error letter is left",
        passed: operations.replays.len() == 2 && failed.is_empty() && left.is_empty(),
        detail: format!(
            "{} keys fixed; replays: {}; failed: {}; letters left: {}",
            operations.fixed.len(),
            sample(outcomes.iter()),
            sample(failed.iter()),
            sample(left.iter())
        ),
    });

    let wrong: Vec<String> = operations
        .fixed
        .iter()
        .filter_map(|(key, value)| {
            let applied = runs
                .get(key)
                .into_iter()
                .flatten()
                .filter(|e| e.value == *value)
                .count();
            let excused = if key.0.claims_in_kv() {
                explained.get(key).copied().unwrap_or(0)
            } else {
                0
            };
            (applied == 0 || applied > 1 + excused)
                .then(|| format!("{} {} applied {applied}×", key.0.name(), key.1))
        })
        .collect();
    verdicts.push(Verdict {
        name: "operator: every replayed letter's payload applied once",
        passed: wrong.is_empty(),
        detail: format!(
            "{} replayed keys; wrong: {}",
            operations.fixed.len(),
            sample(wrong.iter())
        ),
    });

    let not_again: Vec<String> = operations
        .forgotten
        .iter()
        .filter_map(|(key, before)| {
            let now = runs.get(key).map_or(0, Vec::len);
            (now != before + 1).then(|| format!("{} {}: {before} → {now}", key.0.name(), key.1))
        })
        .collect();
    verdicts.push(Verdict {
        name: "operator: a forgotten key sent again runs once more",
        passed: not_again.is_empty() && operations.forget_failures.is_empty(),
        detail: format!(
            "{} keys forgotten; wrong: {}; forgets failed: {}",
            operations.forgotten.len(),
            sample(not_again.iter()),
            sample(operations.forget_failures.iter())
        ),
    });
    verdicts
}

/// The first few items, for a detail column.
fn sample<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let items: Vec<String> = items.map(|i| i.to_string()).collect();
    match items.len() {
        0 => "none".to_owned(),
        n if n <= 5 => items.join(", "),
        n => format!("{} … ({n} in all)", items[..5].join(", ")),
    }
}
