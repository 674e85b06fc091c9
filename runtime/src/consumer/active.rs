//! Keys this process is working on right now: a duplicate arriving while
//! its original runs here waits for it instead of claiming the key from
//! ourselves.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use crate::key::RecordKey;

/// The keys in progress, each with a channel that closes when its work ends.
#[derive(Default)]
pub(crate) struct ActiveKeys(Mutex<HashMap<RecordKey, watch::Receiver<()>>>);

/// Marks a key as worked on by this process for as long as it lives.
pub(crate) struct ActiveKey<'a> {
    active: &'a ActiveKeys,
    key: RecordKey,
    /// Dropped last: whoever waits on the key wakes once it is free.
    _working: watch::Sender<()>,
}

impl ActiveKeys {
    /// Marks `key`, or, if another delivery here is working on it, hands
    /// back a receiver whose `changed()` returns once that work has ended.
    pub(crate) fn enter(&self, key: &RecordKey) -> Result<ActiveKey<'_>, watch::Receiver<()>> {
        let mut keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(busy) = keys.get(key) {
            return Err(busy.clone());
        }
        let (working, finished) = watch::channel(());
        keys.insert(key.clone(), finished);
        Ok(ActiveKey {
            active: self,
            key: key.clone(),
            _working: working,
        })
    }
}

impl Drop for ActiveKey<'_> {
    fn drop(&mut self) {
        self.active
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}
