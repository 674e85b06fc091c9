//! Fault injection for tests and demonstrations (feature `testing`): lose
//! acknowledgements on purpose, to force the redeliveries the dedup store
//! must answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which faults to inject; none by default.
#[derive(Clone, Debug, Default)]
pub(crate) struct Faults {
    drop_ack_every: Option<u64>,
    successes: Arc<AtomicU64>,
}

impl Faults {
    /// Loses the acknowledgement of every `n`th successfully handled message.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn drop_acks(every: u64) -> Self {
        Self {
            drop_ack_every: Some(every.max(1)),
            successes: Arc::default(),
        }
    }

    /// Whether this success's ack is to be lost.
    pub(crate) fn drop_this_ack(&self) -> bool {
        let Some(every) = self.drop_ack_every else {
            return false;
        };
        let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_multiple_of(every)
    }
}
