//! Running the checker over one configuration: breadth-first, exhaustively
//! (or until the first failure), and the report of what it found.

use std::fmt;
use std::time::{Duration, Instant};

use stateright::{Checker, HasDiscoveries, Model, Path};

use crate::model::{Action, Config, IdemModel};
use crate::properties::{EXAMPLES, SAFETY};
use crate::rules::Rules;
use crate::state::State;
use crate::trace;

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Every reachable state is visited (or every property has a
    /// discovery).
    Exhausted,
    /// The first safety property fails.
    FirstFailure,
    /// This safety property fails.
    FailureOf(&'static str),
}

/// A safety property that failed, with the path that breaks it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The property's name.
    pub property: &'static str,
    /// One line per action, from the initial state.
    pub trace: Vec<String>,
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct Report {
    /// Distinct states visited.
    pub unique_states: usize,
    /// States generated, repeats included.
    pub states: usize,
    /// The longest path explored.
    pub max_depth: usize,
    /// How long it took.
    pub elapsed: Duration,
    /// The safety properties that failed.
    pub failures: Vec<Failure>,
    /// The examples never reached (each should be).
    pub unreached_examples: Vec<&'static str>,
}

impl Report {
    /// The failure of `property`, if it failed.
    pub fn failure(&self, property: &str) -> Option<&Failure> {
        self.failures.iter().find(|f| f.property == property)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} distinct states ({} generated, depth {}) in {:.1?}",
            self.unique_states, self.states, self.max_depth, self.elapsed
        )?;
        if self.failures.is_empty() {
            writeln!(f, "every property holds: {}", SAFETY.join(", "))?;
        }
        for failure in &self.failures {
            writeln!(f, "FAILED {}:", failure.property)?;
            for line in &failure.trace {
                writeln!(f, "  {line}")?;
            }
        }
        for example in &self.unreached_examples {
            writeln!(f, "example never reached: {example}")?;
        }
        Ok(())
    }
}

/// Checks `config` under `rules` on `threads` threads.
pub fn check(config: Config, rules: Rules, until: Until, threads: usize) -> Report {
    let model = IdemModel::new(config, rules);
    let started = Instant::now();
    let finish = match until {
        Until::Exhausted => HasDiscoveries::All,
        Until::FirstFailure => HasDiscoveries::AnyFailures,
        Until::FailureOf(property) => HasDiscoveries::AnyOf([property].into()),
    };
    let checker = model
        .clone()
        .checker()
        .threads(threads.max(1))
        .finish_when(finish)
        .spawn_bfs()
        .join();
    let elapsed = started.elapsed();
    let discoveries = checker.discoveries();
    let mut failures: Vec<Failure> = SAFETY
        .into_iter()
        .filter_map(|property| {
            let path = discoveries.get(property)?;
            Some(Failure {
                property,
                trace: trace::render(&model, &cut(&model, property, path)),
            })
        })
        .collect();
    failures.sort_by_key(|f| f.trace.len());
    let unreached_examples = match until {
        Until::Exhausted => EXAMPLES
            .into_iter()
            .filter(|example| !discoveries.contains_key(example))
            .collect(),
        Until::FirstFailure | Until::FailureOf(_) => Vec::new(),
    };
    Report {
        unique_states: checker.unique_state_count(),
        states: checker.state_count(),
        max_depth: checker.max_depth(),
        elapsed,
        failures,
        unreached_examples,
    }
}

/// The path up to the first state that breaks `property` (the checker may
/// report a discovery one step after it).
fn cut(model: &IdemModel, property: &str, path: &Path<State, Action>) -> Path<State, Action> {
    let Some(condition) = model
        .properties()
        .into_iter()
        .find(|p| p.name == property)
        .map(|p| p.condition)
    else {
        return path.clone();
    };
    let steps = path.clone().into_vec();
    let Some(first) = steps.iter().position(|(state, _)| !condition(model, state)) else {
        return path.clone();
    };
    let actions: Vec<Action> = steps[..first]
        .iter()
        .filter_map(|(_, action)| *action)
        .collect();
    let init = steps[0].0.clone();
    Path::from_actions(model, init, actions.iter()).unwrap_or_else(|| path.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::properties::{
        DUPLICATE_BACKED, FENCED, FIRST_CLAIMER, LETTER_DELETED, NO_EFFECT_TWICE, NO_MESSAGE_LOST,
    };
    use crate::rules::Mutant;

    /// Fewer states than this means the model lost its reach.
    const FLOOR: usize = 500_000;

    /// Checks `mutant` in the first CI configuration until `expected`
    /// fails and asserts that it did, printing the traces.
    fn finds(mutant: Mutant, expected: &'static str) {
        finds_in(Config::ci(), mutant, expected);
    }

    /// [`finds`] in `config`.
    fn finds_in(config: Config, mutant: Mutant, expected: &'static str) {
        let report = check(
            config,
            Rules::mutated(mutant),
            Until::FailureOf(expected),
            1,
        );
        println!("mutant {mutant}: {report}");
        assert!(
            report.failure(expected).is_some(),
            "mutant {mutant}: expected {expected} to fail, got {:?}",
            report
                .failures
                .iter()
                .map(|f| f.property)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_real_rules_hold_every_property() {
        for config in [Config::ci(), Config::ci_freeze()] {
            let report = check(config, Rules::real(), Until::Exhausted, 1);
            println!("{config:?}: {report}");
            assert!(
                report.failures.is_empty(),
                "a property fails with the real rules:\n{report}"
            );
            assert!(
                report.unreached_examples.is_empty(),
                "the model never reaches {:?}",
                report.unreached_examples
            );
            assert!(
                report.unique_states > FLOOR,
                "only {} states: the model lost its reach",
                report.unique_states
            );
        }
    }

    #[test]
    fn a_released_key_taken_by_another_payload_is_found() {
        finds(Mutant::ReleasedAnyPayload, FIRST_CLAIMER);
    }

    #[test]
    fn a_replay_that_deletes_another_payloads_letter_is_found() {
        finds(Mutant::ReplayIgnoresFingerprint, LETTER_DELETED);
    }

    #[test]
    fn terminating_a_message_whose_claim_was_taken_over_is_found() {
        // A takeover during the dead letter needs the owner frozen.
        finds_in(Config::ci_freeze(), Mutant::TermAfterLostDeadMark, FENCED);
    }

    #[test]
    fn a_replay_racing_the_owners_dead_mark_is_found() {
        finds(Mutant::ReplayInFlight, NO_MESSAGE_LOST);
    }

    #[test]
    fn a_forgotten_key_answered_from_memory_is_found() {
        finds(Mutant::Memory, DUPLICATE_BACKED);
    }

    #[test]
    fn forgetting_a_pending_key_is_found() {
        finds(Mutant::ForgetPending, NO_EFFECT_TWICE);
    }
}
