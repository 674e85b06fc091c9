//! Which faults hit when, derived from the seed alone: the same seed gives
//! the same schedule (what the machine makes of it may still differ by a
//! few milliseconds).

use std::fmt;
use std::time::Duration;

use crate::order::LEASE;

/// One kind of fault.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL a worker (likely inside a handler), start a new one after
    /// the hold.
    KillWorker,
    /// SIGSTOP a worker for longer than the lease, then SIGCONT: a zombie
    /// that wakes up after its claims were taken over.
    FreezeWorker,
    /// SIGKILL a NATS server, restart it on the same port and store after
    /// the hold.
    KillServer,
    /// SIGSTOP a NATS server for the hold, then SIGCONT.
    PauseServer,
    /// Cut a worker's connections and refuse new ones for the hold.
    CutLink,
    /// Stall a worker's connections both ways for the hold.
    StallLink,
    /// Hold back the server's replies to the producer (PubAcks) for the
    /// hold, then cut: the messages are stored, their PubAcks are lost.
    LoseAcks,
    /// SIGKILL the node leading the stream or the claim bucket of an R3
    /// deployment; restart it after the hold.
    KillLeader,
    /// A rolling deploy: SIGTERM a worker with a slow handler in flight
    /// (its short shutdown grace cuts the handler off), start its
    /// replacement at once.
    RollingRestart,
    /// The dead-letter stream refuses writes for the hold (full, discard
    /// new): dead letters wait, their messages are kept.
    DeadLetterOutage,
}

impl FaultKind {
    /// Every kind, in report order.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::KillWorker,
        FaultKind::FreezeWorker,
        FaultKind::RollingRestart,
        FaultKind::DeadLetterOutage,
        FaultKind::KillServer,
        FaultKind::PauseServer,
        FaultKind::CutLink,
        FaultKind::StallLink,
        FaultKind::LoseAcks,
        FaultKind::KillLeader,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillWorker => "worker SIGKILL",
            FaultKind::FreezeWorker => "worker SIGSTOP > lease",
            FaultKind::KillServer => "server SIGKILL + restart",
            FaultKind::PauseServer => "server SIGSTOP/SIGCONT",
            FaultKind::CutLink => "worker TCP cut",
            FaultKind::StallLink => "worker TCP stall",
            FaultKind::LoseAcks => "producer PubAcks lost",
            FaultKind::KillLeader => "R3 leader SIGKILL",
            FaultKind::RollingRestart => "rolling restart (SIGTERM)",
            FaultKind::DeadLetterOutage => "dead-letter stream full",
        }
    }

    /// Kinds every schedule has, whatever its length: the paths the
    /// guarantees are most at stake on.
    pub const ALWAYS: [FaultKind; 4] = [
        FaultKind::KillWorker,
        FaultKind::FreezeWorker,
        FaultKind::RollingRestart,
        FaultKind::DeadLetterOutage,
    ];

    /// Whether it can cost a `kv` claim its lease while the effect runs —
    /// the only way `kv` may run an effect twice.
    pub fn can_cost_a_lease(self, hold: Duration) -> bool {
        match self {
            FaultKind::KillWorker | FaultKind::FreezeWorker | FaultKind::RollingRestart => true,
            FaultKind::LoseAcks | FaultKind::DeadLetterOutage => false,
            _ => hold >= LEASE / 2,
        }
    }
}

/// One scheduled fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// When, after the workload starts.
    pub at: Duration,
    /// What.
    pub kind: FaultKind,
    /// Which worker slot or server node.
    pub target: usize,
    /// How long the fault lasts.
    pub hold: Duration,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match self.kind {
            FaultKind::KillWorker
            | FaultKind::FreezeWorker
            | FaultKind::RollingRestart
            | FaultKind::CutLink
            | FaultKind::StallLink => format!("worker {}", self.target),
            FaultKind::KillServer | FaultKind::PauseServer => format!("node {}", self.target),
            FaultKind::LoseAcks => "producer".to_owned(),
            FaultKind::DeadLetterOutage => "dead-letter stream".to_owned(),
            FaultKind::KillLeader if self.target == 0 => "stream leader".to_owned(),
            FaultKind::KillLeader => "claim bucket leader".to_owned(),
        };
        write!(
            f,
            "t+{:>6.1}s  {:<26} {:<20} for {:.1}s",
            self.at.as_secs_f64(),
            self.kind.name(),
            target,
            self.hold.as_secs_f64()
        )
    }
}

/// `count` faults over `window`, against `workers` worker slots and
/// `nodes` servers (leader kills only with 3 nodes). Every kind appears
/// before any repeats; the [`FaultKind::ALWAYS`] kinds are always among
/// them.
pub fn schedule(
    seed: u64,
    count: usize,
    window: Duration,
    workers: usize,
    nodes: usize,
) -> Vec<Fault> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_fa17);
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| nodes >= 3 || *k != FaultKind::KillLeader)
        .collect();
    let mut rest: Vec<FaultKind> = kinds
        .iter()
        .copied()
        .filter(|k| !FaultKind::ALWAYS.contains(k))
        .collect();
    rng.shuffle(&mut rest);
    let mut chosen = FaultKind::ALWAYS.to_vec();
    chosen.extend(rest);
    while chosen.len() < count {
        chosen.push(kinds[rng.usize(..kinds.len())]);
    }
    chosen.truncate(count);
    rng.shuffle(&mut chosen);

    let slot = window.as_secs_f64() / count.max(1) as f64;
    chosen
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let mut ms = |lo: u64, hi: u64| Duration::from_millis(rng.u64(lo..=hi));
            let hold = match kind {
                FaultKind::KillWorker => ms(200, 1_500),
                FaultKind::FreezeWorker => LEASE + ms(500, 2_500),
                FaultKind::KillServer | FaultKind::PauseServer => ms(500, 3_000),
                FaultKind::CutLink => ms(0, 2_000),
                FaultKind::StallLink => ms(1_000, 4_000),
                FaultKind::LoseAcks => ms(500, 2_000),
                FaultKind::KillLeader => ms(1_000, 4_000),
                FaultKind::RollingRestart => Duration::ZERO,
                FaultKind::DeadLetterOutage => ms(1_000, 4_000),
            };
            let target = match kind {
                FaultKind::KillWorker
                | FaultKind::FreezeWorker
                | FaultKind::RollingRestart
                | FaultKind::CutLink
                | FaultKind::StallLink => rng.usize(..workers),
                FaultKind::KillServer | FaultKind::PauseServer => rng.usize(..nodes),
                FaultKind::LoseAcks | FaultKind::DeadLetterOutage => 0,
                FaultKind::KillLeader => rng.usize(..2),
            };
            let at = Duration::from_secs_f64(slot * (i as f64 + 0.2 + 0.6 * rng.f64()));
            Fault {
                at,
                kind,
                target,
                hold,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let window = Duration::from_secs(40);
        assert_eq!(schedule(42, 5, window, 3, 1), schedule(42, 5, window, 3, 1));
        assert_ne!(schedule(42, 5, window, 3, 1), schedule(43, 5, window, 3, 1));
    }

    #[test]
    fn a_quick_schedule_always_kills_freezes_redeploys_and_fills_the_dead_letters() {
        for seed in 0..50 {
            let faults = schedule(seed, 5, Duration::from_secs(40), 3, 1);
            let kinds: std::collections::BTreeSet<_> = faults.iter().map(|f| f.kind).collect();
            assert_eq!(kinds.len(), 5, "five different kinds: {faults:?}");
            for always in FaultKind::ALWAYS {
                assert!(kinds.contains(&always), "{always:?} in {faults:?}");
            }
            assert!(
                !kinds.contains(&FaultKind::KillLeader),
                "no leader on one node"
            );
            assert!(
                faults.windows(2).all(|w| w[0].at < w[1].at),
                "in time order"
            );
        }
    }

    #[test]
    fn a_long_schedule_on_a_cluster_has_every_kind() {
        let faults = schedule(9, 50, Duration::from_secs(300), 3, 3);
        let kinds: std::collections::BTreeSet<_> = faults.iter().map(|f| f.kind).collect();
        assert_eq!(kinds.len(), FaultKind::ALL.len());
    }
}
