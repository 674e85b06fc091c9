//! Extractors: how a handler's arguments are made from a delivery, in the
//! style of axum. `Json<T>` decodes the payload, `Bytes` takes it raw,
//! `Delivery` gives the whole message, `State<T>` hands out shared state.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::Delivery;

/// Why a handler's arguments could not be made; the message is then
/// dead-lettered, never handed to the handler.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The payload is not what the handler expects (dead letter reason
    /// `decode`).
    #[error("the payload does not decode as {target}: {source}")]
    Decode {
        /// The type it should have decoded to.
        target: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The runtime has no state of the requested type: a registration
    /// mistake, reported at start-up by the runtime.
    #[error(
        "no state of type {type_name} was registered: add it with `.state(value)` on the runtime builder"
    )]
    MissingState {
        /// The missing type.
        type_name: &'static str,
    },
}

crate::error::debug_as_report!(Rejection);

/// Shared state handed to handlers by type ([`State<T>`]).
///
/// ```
/// use idem::extract::StateMap;
///
/// #[derive(Clone)]
/// struct Cards { issued: u32 }
///
/// let mut state = StateMap::default();
/// state.insert(Cards { issued: 0 });
/// assert_eq!(state.get::<Cards>().map(|c| c.issued), Some(0));
/// assert!(state.get::<String>().is_none());
/// ```
#[derive(Clone, Default)]
pub struct StateMap(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl StateMap {
    /// Adds (or replaces) the state of type `T`.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// Whether state of the type with this id is registered.
    pub fn contains(&self, type_id: TypeId) -> bool {
        self.0.contains_key(&type_id)
    }

    /// A clone of the state of type `T`.
    pub fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.0.get(&TypeId::of::<T>())?.downcast_ref::<T>().cloned()
    }
}

impl std::fmt::Debug for StateMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateMap({} entries)", self.0.len())
    }
}

/// Makes a handler argument from a delivery.
///
/// Implemented by the extractors here and by tuples of them (a handler's
/// whole argument list).
pub trait FromDelivery: Sized + Send + 'static {
    /// Whether this extractor consumes the payload (at most one per handler).
    const READS_PAYLOAD: bool = false;

    /// Makes the value, or rejects the delivery.
    fn from_delivery(delivery: &Delivery, state: &StateMap) -> Result<Self, Rejection>;

    /// The state this extractor takes from the runtime, so that a missing
    /// one is refused at start-up rather than found at the first message.
    /// Extractors that take none (the default) add nothing.
    fn required_state(needs: &mut Vec<StateNeed>) {
        let _ = needs;
    }
}

/// A type of state an extractor takes from the runtime.
///
/// ```
/// use idem::extract::{FromDelivery, Json, State};
///
/// #[derive(Clone)]
/// struct Mailer;
///
/// let mut needs = Vec::new();
/// <(Json<u64>, State<Mailer>)>::required_state(&mut needs);
/// assert_eq!(needs.len(), 1);
/// assert!(needs[0].type_name.ends_with("Mailer"));
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StateNeed {
    /// The state's type.
    pub type_id: TypeId,
    /// Its name, for the error.
    pub type_name: &'static str,
}

impl StateNeed {
    /// The need for state of type `T`.
    pub fn of<T: 'static>() -> Self {
        Self {
            type_id: TypeId::of::<T>(),
            type_name: type_name::<T>(),
        }
    }
}

/// The payload decoded from JSON (serde_json).
///
/// ```
/// use idem::extract::{FromDelivery, Json, StateMap};
/// use idem::Delivery;
///
/// #[derive(serde::Deserialize)]
/// struct Payment { id: u64 }
///
/// let delivery = Delivery::new("payments", r#"{"id": 7}"#);
/// let Json(payment) = Json::<Payment>::from_delivery(&delivery, &StateMap::default())?;
/// assert_eq!(payment.id, 7);
/// # Ok::<(), idem::extract::Rejection>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T> std::ops::Deref for Json<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Json<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: DeserializeOwned + Send + 'static> FromDelivery for Json<T> {
    const READS_PAYLOAD: bool = true;

    fn from_delivery(delivery: &Delivery, _: &StateMap) -> Result<Self, Rejection> {
        serde_json::from_slice(delivery.payload())
            .map(Json)
            .map_err(|source| Rejection::Decode {
                target: type_name::<T>(),
                source,
            })
    }
}

/// The raw payload.
impl FromDelivery for Bytes {
    const READS_PAYLOAD: bool = true;

    fn from_delivery(delivery: &Delivery, _: &StateMap) -> Result<Self, Rejection> {
        Ok(delivery.payload().clone())
    }
}

/// The whole delivery: subject, headers, stream sequence, delivery count.
impl FromDelivery for Delivery {
    fn from_delivery(delivery: &Delivery, _: &StateMap) -> Result<Self, Rejection> {
        Ok(delivery.clone())
    }
}

/// Shared state registered on the runtime (`.state(value)`), cloned per
/// message: put an `Arc` or a pool handle in it.
///
/// ```
/// use idem::extract::{FromDelivery, State, StateMap};
/// use idem::Delivery;
///
/// let mut state = StateMap::default();
/// state.insert(String::from("db-pool"));
/// let State(pool) = State::<String>::from_delivery(&Delivery::new("s", ""), &state)?;
/// assert_eq!(pool, "db-pool");
/// # Ok::<(), idem::extract::Rejection>(())
/// ```
#[derive(Clone, Debug)]
pub struct State<T>(pub T);

impl<T> std::ops::Deref for State<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Clone + Send + Sync + 'static> FromDelivery for State<T> {
    fn from_delivery(_: &Delivery, state: &StateMap) -> Result<Self, Rejection> {
        state.get::<T>().map(State).ok_or(Rejection::MissingState {
            type_name: type_name::<T>(),
        })
    }

    fn required_state(needs: &mut Vec<StateNeed>) {
        needs.push(StateNeed::of::<T>());
    }
}

macro_rules! tuple_extractors {
    ($($name:ident),*) => {
        impl<$($name: FromDelivery),*> FromDelivery for ($($name,)*) {
            const READS_PAYLOAD: bool = false $(|| $name::READS_PAYLOAD)*;

            #[allow(unused_variables)]
            fn from_delivery(delivery: &Delivery, state: &StateMap) -> Result<Self, Rejection> {
                Ok(($($name::from_delivery(delivery, state)?,)*))
            }

            #[allow(unused_variables)]
            fn required_state(needs: &mut Vec<StateNeed>) {
                $($name::required_state(needs);)*
            }
        }
    };
}

tuple_extractors!();
tuple_extractors!(A);
tuple_extractors!(A, B);
tuple_extractors!(A, B, C);
tuple_extractors!(A, B, C, D);
tuple_extractors!(A, B, C, D, E);
tuple_extractors!(A, B, C, D, E, F);
tuple_extractors!(A, B, C, D, E, F, G);
tuple_extractors!(A, B, C, D, E, F, G, H);
