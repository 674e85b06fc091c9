//! The claim's fencing token: what lets an effect on another system stay
//! safe even inside `dedup = kv`'s one window (a worker stopped while its
//! effect is under way, taken over by another).

use std::sync::{Arc, OnceLock};

use crate::Delivery;
use crate::extract::{FromDelivery, Rejection, StateMap, StateNeed};

/// The fencing token of the claim a delivery runs under: the claim
/// record's revision when it was granted. Whoever takes the key over later
/// holds a greater token, so a system that remembers the greatest token it
/// has accepted per key and refuses a write with a smaller one (a
/// conditional write: `UPDATE … WHERE fence < $token`) never applies a
/// stale worker's effect after its successor's.
///
/// Handlers with `dedup = kv` or `transactional` may take it as an
/// argument; the runtime refuses it at start-up for `dedup = off`.
///
/// ```ignore
/// #[idempotent(stream = "ORDERS", key = order.id)]
/// async fn ship(Json(order): Json<Order>, fence: Fence, State(db): State<Db>) -> Result<(), HandlerError> {
///     db.execute("UPDATE shipments SET state = 'sent', fence = $2 WHERE id = $1 AND fence < $2",
///                (order.id, fence.token())).await?;
///     Ok(())
/// }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<OnceLock<u64>>);

impl Fence {
    /// A token to be set once the claim is granted.
    pub(crate) fn unset() -> Self {
        Self::default()
    }

    /// Sets the token (once; later calls change nothing).
    pub(crate) fn set(&self, token: u64) {
        let _ = self.0.set(token);
    }

    /// The token: the claim's revision when it was granted (0 only before a
    /// claim, which a handler never sees).
    ///
    /// ```
    /// let fence = idem::Fence::default();
    /// assert_eq!(fence.token(), 0);
    /// ```
    pub fn token(&self) -> u64 {
        self.0.get().copied().unwrap_or(0)
    }
}

/// The runtime provides it to handlers that keep claims.
impl FromDelivery for Fence {
    fn from_delivery(_: &Delivery, state: &StateMap) -> Result<Self, Rejection> {
        state.get::<Fence>().ok_or(Rejection::MissingState {
            type_name: "idem::Fence (only handlers with dedup = kv or transactional hold a claim)",
        })
    }

    fn required_state(needs: &mut Vec<StateNeed>) {
        needs.push(StateNeed::of::<Fence>());
    }
}
