//! An in-process store with the same semantics as the KV store, for unit
//! tests and for users' own tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use super::{CasStore, Create, RevisionedMap, StoreError, Write};
use crate::clock::{Clock, SystemClock, UnixMillis};

/// The in-process [`RevisionedMap`]: a map behind a mutex, with revisions
/// drawn from one counter (like a stream's sequence) and retention measured
/// on its clock. Clones share the map.
#[derive(Clone, Debug)]
pub struct MemoryMap {
    entries: Arc<Mutex<Entries>>,
    retention: Duration,
    clock: Arc<dyn Clock>,
}

#[derive(Debug, Default)]
struct Entries {
    slots: HashMap<String, Slot>,
    last_revision: u64,
    writes_since_sweep: usize,
}

/// Expired slots are swept out after this many writes (reads skip them
/// anyway), so that memory stays bounded without a timer task.
const SWEEP_EVERY: usize = 1024;

#[derive(Debug)]
struct Slot {
    value: Bytes,
    revision: u64,
    written_at: UnixMillis,
}

/// The dedup store kept in this process's memory: everything the KV store
/// does, nothing survives the process.
///
/// ```
/// use std::time::Duration;
/// use idem::clock::ManualClock;
/// use idem::store::MemoryStore;
///
/// let clock = ManualClock::starting_now();
/// let store = MemoryStore::with_clock(Duration::from_secs(60), clock.clone());
/// clock.advance(Duration::from_secs(61)); // leases and retention run out at once
/// ```
pub type MemoryStore = CasStore<MemoryMap>;

impl MemoryStore {
    /// An empty store whose records live `retention` after their last write.
    pub fn new(retention: Duration) -> Self {
        Self::with_clock(retention, SystemClock)
    }

    /// An empty store on `clock`: leases and retention both follow it.
    pub fn with_clock(retention: Duration, clock: impl Clock + Clone) -> Self {
        let map = MemoryMap {
            entries: Arc::default(),
            retention,
            clock: Arc::new(clock.clone()),
        };
        CasStore::over(map).using_clock(clock)
    }
}

impl MemoryMap {
    fn with_entries<T>(&self, f: impl FnOnce(&mut Entries, UnixMillis) -> T) -> T {
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.writes_since_sweep >= SWEEP_EVERY {
            let retention = self.retention;
            entries
                .slots
                .retain(|_, slot| now < slot.written_at + retention);
            entries.writes_since_sweep = 0;
        }
        f(&mut entries, now)
    }

    fn live<'a>(&self, entries: &'a Entries, key: &str, now: UnixMillis) -> Option<&'a Slot> {
        entries
            .slots
            .get(key)
            .filter(|slot| now < slot.written_at + self.retention)
    }
}

impl Entries {
    fn write(&mut self, key: &str, value: Bytes, now: UnixMillis) -> u64 {
        self.last_revision += 1;
        self.writes_since_sweep += 1;
        let slot = Slot {
            value,
            revision: self.last_revision,
            written_at: now,
        };
        self.slots.insert(key.to_owned(), slot);
        self.last_revision
    }
}

impl RevisionedMap for MemoryMap {
    async fn create(&self, key: &str, value: Bytes) -> Result<Create, StoreError> {
        Ok(self.with_entries(|entries, now| {
            if let Some(slot) = self.live(entries, key, now) {
                Create::Exists(Some((slot.value.clone(), slot.revision)))
            } else {
                Create::Created(entries.write(key, value, now))
            }
        }))
    }

    async fn read(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        Ok(self.with_entries(|entries, now| {
            self.live(entries, key, now)
                .map(|s| (s.value.clone(), s.revision))
        }))
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<Write, StoreError> {
        Ok(
            self.with_entries(|entries, now| match self.live(entries, key, now) {
                Some(slot) if slot.revision == revision => {
                    Write::Written(entries.write(key, value, now))
                }
                _ => Write::Conflict,
            }),
        )
    }

    async fn delete_at(&self, key: &str, revision: u64) -> Result<Write, StoreError> {
        Ok(
            self.with_entries(|entries, now| match self.live(entries, key, now) {
                Some(slot) if slot.revision == revision => {
                    entries.slots.remove(key);
                    Write::Written(revision)
                }
                _ => Write::Conflict,
            }),
        )
    }

    fn retention(&self) -> Duration {
        self.retention
    }
}
