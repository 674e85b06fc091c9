//! What the driver publishes, derived from the seed alone: unique business
//! keys spread over the three handlers, plus the duplicates a real system
//! sees — republished with a new message id, resent with the same id inside
//! the duplicate window, and keys reused with another payload.

use std::collections::BTreeSet;

use crate::order::{Behaviour, Level, Order};

/// Why a message is in the workload.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Copy {
    /// The first message of its key.
    Original,
    /// The same key and payload under a new message id: the broker stores
    /// it, the handler must answer it as a duplicate.
    Republished,
    /// The same message id again: the broker's duplicate window drops it.
    Resent,
    /// The same key with another payload: `key_conflict`, never applied —
    /// half of them sent while the first payload runs or waits out a
    /// retry's backoff.
    Conflict,
}

/// One publish.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Whose subject.
    pub level: Level,
    /// The payload.
    pub order: Order,
    /// `Nats-Msg-Id`.
    pub message_id: String,
    /// Why it is sent.
    pub copy: Copy,
}

/// The messages in publish order.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Everything to publish, in order.
    pub messages: Vec<Planned>,
}

impl Workload {
    /// `unique` keys and their copies, from `seed`.
    pub fn generate(seed: u64, unique: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut placed: Vec<(f64, Planned)> = Vec::with_capacity(unique + unique / 5);
        for i in 0..unique {
            let level = match rng.u8(0..100) {
                0..40 => Level::Kv,
                40..45 => Level::Short,
                45..90 => Level::Transactional,
                _ => Level::Off,
            };
            // Mostly quick effects; one in ten takes long enough that a
            // fault is likely to land inside it.
            let work_ms = if rng.u8(0..10) == 0 {
                rng.u64(20..=300)
            } else {
                rng.u64(0..=5)
            };
            // Most handlers succeed; the rest walk the failure paths.
            let behaviour = match rng.u8(0..100) {
                0..6 => Behaviour::FailTimes(rng.u32(1..=2)),
                6..9 => Behaviour::FailPermanently,
                9..12 => Behaviour::Panic,
                12..16 if level == Level::Transactional => Behaviour::SwallowFailedStatement,
                _ => Behaviour::Succeed,
            };
            let order = Order {
                key: format!("k-{i}"),
                value: rng.u64(1..1_000_000),
                work_ms,
                behaviour,
            };
            let at = i as f64;
            let original = Planned {
                level,
                message_id: order.key.clone(),
                order: order.clone(),
                copy: Copy::Original,
            };
            placed.push((at, original.clone()));
            if rng.u8(0..100) < 10 {
                placed.push((
                    at + rng.f64() * 500.0,
                    Planned {
                        message_id: format!("{}~r", order.key),
                        copy: Copy::Republished,
                        ..original.clone()
                    },
                ));
            }
            if rng.u8(0..100) < 5 {
                placed.push((
                    at + rng.f64() * 20.0,
                    Planned {
                        copy: Copy::Resent,
                        ..original.clone()
                    },
                ));
            }
            // The same key (and payload) to the handler whose function has
            // the same name in another module: each handler applies it.
            if level == Level::Kv && rng.u8(0..100) < 10 {
                placed.push((
                    at + rng.f64() * 50.0,
                    Planned {
                        level: Level::Twin,
                        message_id: format!("{}~t", order.key),
                        copy: Copy::Original,
                        ..original.clone()
                    },
                ));
            }
            if level != Level::Off && rng.u8(0..100) < 2 {
                // Half of them soon after the first payload: while it runs,
                // or waits out a retry's backoff (its key released).
                let after = if rng.bool() { 20.0 } else { 500.0 };
                placed.push((
                    at + 1.0 + rng.f64() * after,
                    Planned {
                        message_id: format!("{}~c", order.key),
                        order: Order {
                            value: order.value + 1,
                            ..order.clone()
                        },
                        copy: Copy::Conflict,
                        ..original.clone()
                    },
                ));
            }
        }
        placed.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self {
            messages: placed.into_iter().map(|(_, p)| p).collect(),
        }
    }

    /// How many messages the broker must store: one per message id.
    pub fn distinct_ids(&self) -> usize {
        self.messages
            .iter()
            .map(|p| p.message_id.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// How many messages are of `copy`.
    pub fn count(&self, copy: Copy) -> usize {
        self.messages.iter().filter(|p| p.copy == copy).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let a = Workload::generate(7, 2_000);
        let b = Workload::generate(7, 2_000);
        let ids = |w: &Workload| {
            w.messages
                .iter()
                .map(|p| (p.message_id.clone(), p.order.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&Workload::generate(8, 2_000)));
    }

    #[test]
    fn copies_come_in_the_asked_proportions() {
        let w = Workload::generate(1, 10_000);
        let twins = w.messages.iter().filter(|p| p.level == Level::Twin).count();
        assert!((300..600).contains(&twins), "{twins}");
        assert_eq!(w.count(Copy::Original), 10_000 + twins);
        let republished = w.count(Copy::Republished);
        let resent = w.count(Copy::Resent);
        let conflicts = w.count(Copy::Conflict);
        assert!((800..1_200).contains(&republished), "{republished}");
        assert!((350..650).contains(&resent), "{resent}");
        assert!((100..300).contains(&conflicts), "{conflicts}");
        assert_eq!(w.distinct_ids(), 10_000 + twins + republished + conflicts);
        let misbehaving = w
            .messages
            .iter()
            .filter(|p| p.copy == Copy::Original && p.order.behaviour != Behaviour::Succeed)
            .count();
        assert!((1_200..2_000).contains(&misbehaving), "{misbehaving}");
    }
}
