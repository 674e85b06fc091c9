//! Keeping a held claim up while something long runs — the handler, or a
//! dead letter's PubAck: a renewal (and an in-progress ack) every third of
//! the lease, and for a fenced claim the deadline past which the handler
//! may take no further step. Time comes in from the executor; nothing here
//! reads a clock.

use std::time::Duration;

use crate::claim::Transition;

/// A point on the executor's monotonic clock: the time since an origin the
/// executor chose (a process's start, a test's zero).
///
/// ```
/// use std::time::Duration;
/// use idem::delivery_core::Time;
///
/// let t = Time::ZERO + Duration::from_secs(2);
/// assert_eq!(t.since(Time::ZERO), Duration::from_secs(2));
/// assert_eq!(Time::ZERO.since(t), Duration::ZERO);
/// ```
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub Duration);

impl Time {
    /// The origin.
    pub const ZERO: Time = Time(Duration::ZERO);

    /// How long after `earlier` this is; zero if it is not after it.
    pub fn since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for Time {
    type Output = Time;

    fn add(self, by: Duration) -> Time {
        Time(self.0.saturating_add(by))
    }
}

/// What a renewal came back with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewed {
    /// The store answered.
    Answered(Transition),
    /// The store failed, or did not answer within a renewal period.
    Failed,
}

/// What the upkeep asks for when its timer fires.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Renewal {
    /// When the renewal was sent: an applied renewal's lease counts from
    /// here (never from its answer, which may come late).
    pub sent: Time,
    /// How long its answer may take: a renewal period, whatever the
    /// store's own timeout, since the next renewal follows then.
    pub within: Duration,
}

/// The timers of a held claim while something long runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Upkeep {
    lease: Duration,
    period: Duration,
    next_renewal: Time,
    /// For a fenced (bucket) claim: when its lease ends on this worker's
    /// clock, as the renewals move it. A transaction's row is held by the
    /// transaction and has none.
    deadline: Option<Time>,
}

impl Upkeep {
    /// The upkeep of a claim of `lease` asked for at `asked` (the lease
    /// counts from the question, not the answer), starting at `now`;
    /// `fenced` for a claim another worker may take over once it runs out.
    pub fn new(lease: Duration, asked: Time, now: Time, fenced: bool) -> Self {
        Self::every(renewal_period(lease), lease, asked, now, fenced)
    }

    /// The upkeep of a claim kept up while its dead letter is stored, from
    /// `now`: not fenced (the letter is stored whatever the lease; the dead
    /// mark that follows is a CAS), renewed every third of the lease and at
    /// least every 20 ms apart — so that even a short lease is renewed
    /// before it runs out.
    pub fn keeping(lease: Duration, now: Time) -> Self {
        Self::every(
            (lease / 3).max(super::MIN_NAK_DELAY),
            lease,
            now,
            now,
            false,
        )
    }

    fn every(period: Duration, lease: Duration, asked: Time, now: Time, fenced: bool) -> Self {
        Self {
            lease,
            period,
            next_renewal: now + period,
            deadline: fenced.then_some(asked + lease),
        }
    }

    /// When the executor must call back ([`on_timer`](Self::on_timer)): the
    /// next renewal, or the deadline if that comes first — so that a handler
    /// waiting on nothing that would wake it is still stopped in time.
    pub fn timer(&self) -> Time {
        match self.deadline {
            Some(deadline) => deadline.min(self.next_renewal),
            None => self.next_renewal,
        }
    }

    /// Whether the handler may take a step at `now`: always, unless the
    /// claim is fenced and its lease ran out on this worker's clock without
    /// a confirmed renewal. Asked before every poll of the handler, so a
    /// process waking from a freeze stops its handler before it takes
    /// another step.
    pub fn allows(&self, now: Time) -> bool {
        self.deadline.is_none_or(|deadline| now < deadline)
    }

    /// The end of the lease on this worker's clock, if the claim is fenced.
    pub fn deadline(&self) -> Option<Time> {
        self.deadline
    }

    /// The timer fired at `now`: a renewal (with an in-progress ack) is due
    /// if its time has come; the next one is scheduled a period later.
    pub fn on_timer(&mut self, now: Time) -> Option<Renewal> {
        if now < self.next_renewal {
            return None;
        }
        self.next_renewal = now + self.period;
        Some(Renewal {
            sent: now,
            within: self.period,
        })
    }

    /// A renewal sent at `renewal.sent` came back: an applied one moves
    /// the deadline to a lease after it was sent — what a reader, who has
    /// watched the record since no later than that, may observe. `false`:
    /// the claim was taken over, and whatever runs must stop.
    pub fn on_renewed(&mut self, renewal: Renewal, renewed: &Renewed) -> bool {
        match renewed {
            Renewed::Answered(Transition::Applied) => {
                if let Some(deadline) = &mut self.deadline {
                    *deadline = (*deadline).max(renewal.sent + self.lease);
                }
                true
            }
            Renewed::Answered(Transition::LeaseLost { .. }) => false,
            Renewed::Failed => true,
        }
    }
}

/// A renewal every third of the lease (at least every 100 ms apart).
pub fn renewal_period(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);

    fn at(millis: u64) -> Time {
        Time(Duration::from_millis(millis))
    }

    #[test]
    fn a_fenced_claim_allows_steps_until_its_lease_from_the_question_ends() {
        let upkeep = Upkeep::new(LEASE, at(0), at(200), true);
        assert!(upkeep.allows(at(2_999)));
        assert!(!upkeep.allows(at(3_000)));
        assert_eq!(upkeep.timer(), at(1_200), "the first renewal comes first");
    }

    #[test]
    fn an_applied_renewal_extends_from_when_it_was_sent_not_answered() {
        let mut upkeep = Upkeep::new(LEASE, at(0), at(0), true);
        let renewal = upkeep.on_timer(at(1_000)).expect("due");
        assert_eq!(
            upkeep.on_timer(at(1_500)),
            None,
            "the next one is a period away"
        );
        assert!(upkeep.on_renewed(renewal, &Renewed::Answered(Transition::Applied)));
        assert_eq!(upkeep.deadline(), Some(at(4_000)));
    }

    #[test]
    fn failed_renewals_leave_the_deadline_and_a_taken_claim_stops_the_run() {
        let mut upkeep = Upkeep::new(LEASE, at(0), at(0), true);
        let renewal = upkeep.on_timer(at(1_000)).expect("due");
        assert!(upkeep.on_renewed(renewal, &Renewed::Failed));
        assert_eq!(upkeep.deadline(), Some(at(3_000)));
        let lost = Renewed::Answered(Transition::LeaseLost {
            current_owner: None,
        });
        assert!(!upkeep.on_renewed(renewal, &lost));
    }

    #[test]
    fn a_short_lease_kept_up_while_a_letter_is_stored_is_renewed_before_it_runs_out() {
        let lease = Duration::from_millis(60);
        let mut upkeep = Upkeep::keeping(lease, at(0));
        assert!(upkeep.timer() < at(60), "renewed every 20 ms at least");
        assert!(upkeep.on_timer(at(20)).is_some());
        assert!(
            upkeep.allows(at(1_000)),
            "a letter is stored whatever the lease"
        );
    }

    #[test]
    fn a_transactions_row_has_no_deadline() {
        let upkeep = Upkeep::new(LEASE, at(0), at(0), false);
        assert!(upkeep.allows(at(1_000_000)));
        assert_eq!(upkeep.timer(), at(1_000));
    }
}
