//! The properties checked in every reachable state, by name, and the
//! examples that show the model is not vacuous (each must be reachable).

use stateright::Property;

use crate::model::IdemModel;
use crate::state::{Payload, State};

/// For each payload, applications ≤ 1 + counted takeovers + its `done`
/// records that were forgotten or expired (after which it runs again by
/// design: `idem keys forget`, or a redelivery beyond retention).
pub const NO_EFFECT_TWICE: &str = "no_effect_twice_without_counted_takeover";
/// A payload other than the first to claim the key (since the key was last
/// absent) is never applied.
pub const FIRST_CLAIMER: &str = "first_claimer_owns_the_key";
/// Once every message is acknowledged or terminated, every published
/// message's payload was applied or has a live dead letter.
pub const NO_MESSAGE_LOST: &str = "no_message_lost";
/// A dead letter is deleted only if its payload was applied or a copy of it
/// was republished.
pub const LETTER_DELETED: &str = "letter_deleted_only_when_applied";
/// A worker whose claim another worker took over applies no effect and no
/// store write of it succeeds.
pub const FENCED: &str = "fenced_worker_takes_no_step";
/// A duplicate answer (ack without running) is given only while the store
/// holds a `done` or `dead` record of that payload.
pub const DUPLICATE_BACKED: &str = "duplicate_answer_backed_by_store";

/// Examples (`sometimes`): a takeover is counted.
pub const EXAMPLE_TAKEOVER: &str = "example_a_takeover_is_counted";
/// Examples: a dead letter is replayed and its copy applied.
pub const EXAMPLE_REPLAY_APPLIED: &str = "example_a_replayed_copy_is_applied";
/// Examples: both payloads settle, one applied, the other dead-lettered.
pub const EXAMPLE_CONFLICT: &str = "example_a_reused_key_is_dead_lettered";

/// The safety properties, by name.
pub const SAFETY: [&str; 6] = [
    NO_EFFECT_TWICE,
    FIRST_CLAIMER,
    NO_MESSAGE_LOST,
    LETTER_DELETED,
    FENCED,
    DUPLICATE_BACKED,
];

/// The examples, by name.
pub const EXAMPLES: [&str; 3] = [EXAMPLE_TAKEOVER, EXAMPLE_REPLAY_APPLIED, EXAMPLE_CONFLICT];

/// Every property of the model.
pub fn all() -> Vec<Property<IdemModel>> {
    vec![
        Property::always(NO_EFFECT_TWICE, |_, s: &State| no_effect_twice(s)),
        Property::always(FIRST_CLAIMER, |_, s: &State| !s.ghost.foreign_applied),
        Property::always(NO_MESSAGE_LOST, |_, s: &State| no_message_lost(s)),
        Property::always(LETTER_DELETED, |_, s: &State| {
            !s.ghost.letter_deleted_unapplied
        }),
        Property::always(FENCED, |_, s: &State| !s.ghost.fenced_violation),
        Property::always(DUPLICATE_BACKED, |_, s: &State| !s.ghost.unbacked_duplicate),
        Property::sometimes(EXAMPLE_TAKEOVER, |_, s: &State| {
            s.ghost.takeovers.iter().any(|&n| n > 0)
        }),
        Property::sometimes(EXAMPLE_REPLAY_APPLIED, |_, s: &State| {
            s.messages
                .iter()
                .any(|m| m.copy && m.settled && s.applied(m.payload))
                && s.settled()
        }),
        Property::sometimes(EXAMPLE_CONFLICT, |_, s: &State| {
            s.settled()
                && s.applied(Payload::X)
                && s.has_live_letter(Payload::Y)
                && !s.applied(Payload::Y)
        }),
    ]
}

fn no_effect_twice(s: &State) -> bool {
    Payload::ALL.into_iter().all(|p| {
        let i = p.index();
        u16::from(s.ghost.applications[i])
            <= 1 + u16::from(s.ghost.takeovers[i]) + u16::from(s.ghost.forgotten_done[i])
    })
}

fn no_message_lost(s: &State) -> bool {
    !s.settled()
        || s.messages
            .iter()
            .all(|m| s.applied(m.payload) || s.has_live_letter(m.payload))
}
