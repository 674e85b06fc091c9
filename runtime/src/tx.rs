//! `Tx`: the database transaction a `dedup = transactional` handler runs in
//! (feature `postgres`).
//!
//! The runtime begins the transaction, writes the claim row in it, hands it
//! to the handler, and commits it after the handler returns `Ok` — so the
//! effect and its record commit together or not at all.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::Delivery;
use crate::extract::{FromDelivery, Rejection, StateMap, StateNeed};

/// Where a transaction is kept while it is open: one per transaction,
/// shared by every message of a group commit.
pub(crate) type Slot = Arc<Mutex<Option<Transaction<'static, Postgres>>>>;

/// The handler's transaction. Run queries on `&mut *tx.conn().await?`.
///
/// ```ignore
/// #[idempotent(stream = "LEDGER", key = transfer.id, dedup = transactional)]
/// async fn apply(Json(transfer): Json<Transfer>, tx: Tx) -> Result<(), HandlerError> {
///     sqlx::query("UPDATE accounts SET balance = balance - $1 WHERE id = $2")
///         .bind(transfer.amount)
///         .bind(transfer.from)
///         .execute(&mut *tx.conn().await?)
///         .await?;
///     Ok(())
/// }
/// ```
///
/// Under group commit (`batch > 1`) the transaction may also hold other
/// messages' claim rows and effects; see the `batch` option.
#[derive(Clone)]
pub struct Tx(Arc<OnceLock<Slot>>);

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

/// Why the transaction is not available.
#[derive(thiserror::Error)]
#[error(
    "the handler's transaction is no longer open (it was committed or rolled back by the runtime)"
)]
pub struct TxClosed;
crate::error::debug_as_report!(TxClosed);

/// A locked connection of the handler's transaction.
pub struct TxConn<'a>(MappedMutexGuard<'a, Transaction<'static, Postgres>>);

impl Deref for TxConn<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl DerefMut for TxConn<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

impl Tx {
    /// Wraps a transaction the runtime began.
    pub(crate) fn new(tx: Transaction<'static, Postgres>) -> Self {
        Self::bound_to(Arc::new(Mutex::new(Some(tx))))
    }

    /// A handle on `slot`, the transaction of a group commit.
    pub(crate) fn bound_to(slot: Slot) -> Self {
        Tx(Arc::new(OnceLock::from(slot)))
    }

    /// A handle not yet bound to a transaction: extractors take it before
    /// the runtime knows which group commit the message joins.
    pub(crate) fn unbound() -> Self {
        Tx(Arc::new(OnceLock::new()))
    }

    /// Binds this handle (and its clones) to `slot`; `false` if it was bound
    /// already.
    pub(crate) fn bind(&self, slot: &Slot) -> bool {
        self.0.set(slot.clone()).is_ok()
    }

    /// The transaction's connection, for queries.
    pub async fn conn(&self) -> Result<TxConn<'_>, TxClosed> {
        let slot = self.0.get().ok_or(TxClosed)?;
        MutexGuard::try_map(slot.lock().await, Option::as_mut)
            .map(TxConn)
            .map_err(|_| TxClosed)
    }

    /// The connection if nobody holds it right now (the runtime's keepalive
    /// while the handler runs).
    pub(crate) fn try_conn(&self) -> Option<TxConn<'_>> {
        let guard = self.0.get()?.try_lock().ok()?;
        MutexGuard::try_map(guard, Option::as_mut).ok().map(TxConn)
    }

    /// Takes the transaction back (the runtime, to commit or roll back).
    pub(crate) async fn take(&self) -> Option<Transaction<'static, Postgres>> {
        self.0.get()?.lock().await.take()
    }
}

/// The runtime puts the message's transaction in the state it hands to
/// extractors; a handler without `dedup = transactional` has none.
impl FromDelivery for Tx {
    fn from_delivery(_: &Delivery, state: &StateMap) -> Result<Self, Rejection> {
        state.get::<Tx>().ok_or(Rejection::MissingState {
            type_name: "idem::Tx (only handlers with dedup = transactional get a transaction)",
        })
    }

    /// The runtime provides it to `dedup = transactional` handlers only.
    fn required_state(needs: &mut Vec<StateNeed>) {
        needs.push(StateNeed::of::<Tx>());
    }
}
