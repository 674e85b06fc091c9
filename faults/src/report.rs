//! The printed report of a run: what was sent, which faults hit, what the
//! ledger shows per dedup level, and the invariants as a table.

use std::collections::BTreeMap;

use crate::order::Level;
use crate::run::Outcome;
use crate::workload::Copy;

/// Writes the report as markdown to stdout.
pub fn print(outcome: &Outcome) {
    let s = &outcome.settings;
    let w = &outcome.workload;
    println!("## idem fault suite — seed {}", s.seed);
    println!();
    println!(
        "Replay: `cargo run -p idem-faults -- --seed {} --messages {} --faults {} --window {} {}`",
        s.seed,
        s.messages,
        s.faults,
        s.window.as_secs(),
        if s.cluster { "--cluster" } else { "--single" }
    );
    println!();
    println!(
        "nats-server {} ({}), {} worker processes, elapsed {:.1} s",
        outcome.server,
        if s.cluster {
            "3-node cluster, R3"
        } else {
            "single node"
        },
        s.workers,
        outcome.elapsed.as_secs_f64()
    );
    println!();
    println!(
        "Workload: {} keys, {} sends: {} republished with a new id, {} resent with the same id, {} reused with another payload",
        w.count(Copy::Original),
        w.messages.len(),
        w.count(Copy::Republished),
        w.count(Copy::Resent),
        w.count(Copy::Conflict),
    );
    let mut behaviours: BTreeMap<&str, usize> = BTreeMap::new();
    for p in w.messages.iter().filter(|p| p.copy == Copy::Original) {
        *behaviours.entry(p.order.behaviour.name()).or_default() += 1;
    }
    println!(
        "Handlers as scripted (keys): {}; workers' wall clocks off by 0 s, +300 s, -300 s",
        behaviours
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("| fault | count |");
    println!("|---|---:|");
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (fault, _) in &outcome.faults {
        *kinds.entry(fault.kind.name()).or_default() += 1;
    }
    for (kind, count) in kinds {
        println!("| {kind} | {count} |");
    }
    println!();
    println!("| dedup | keys | executions | keys run twice | lease events | dead letters |");
    println!("|---|---:|---:|---:|---:|---:|");
    for level in Level::ALL {
        let keys = w
            .messages
            .iter()
            .filter(|p| p.level == level && p.copy == Copy::Original)
            .count();
        let mut runs: BTreeMap<&str, usize> = BTreeMap::new();
        for e in outcome
            .evidence
            .executions
            .iter()
            .filter(|e| e.level == level)
        {
            *runs.entry(e.key.as_str()).or_default() += 1;
        }
        let executions: usize = runs.values().sum();
        let twice = runs.values().filter(|n| **n > 1).count();
        let events = outcome
            .evidence
            .events
            .iter()
            .filter(|e| e.level == level)
            .count();
        let dead = outcome
            .evidence
            .dead_letters
            .iter()
            .filter(|d| d.level == level)
            .count();
        println!(
            "| {} | {keys} | {executions} | {twice} | {events} | {dead} |",
            level.name()
        );
    }
    if let Some(ops) = &outcome.operations {
        println!();
        println!(
            "Operator, once drained: {} permanently failing keys fixed and their letters replayed by two `idem dead replay` at once; {} completed keys forgotten (`idem keys forget`) and sent again",
            ops.fixed.len(),
            ops.forgotten.len()
        );
    }
    println!();
    println!("| invariant | result | detail |");
    println!("|---|---|---|");
    for v in &outcome.verdicts {
        println!(
            "| {} | {} | {} |",
            v.name,
            if v.passed { "ok" } else { "**FAILED**" },
            v.detail
        );
    }
    for (fault, result) in &outcome.faults {
        if let Err(e) = result {
            println!("| fault injected: {fault} | **FAILED** | {e} |");
        }
    }
    println!();
    println!(
        "Result: {}",
        if outcome.passed() { "PASSED" } else { "FAILED" }
    );
}
