//! The server's own answer inside a client error: async-nats wraps the
//! JetStream API error (`err_code`) at different depths on different paths,
//! so decisions that depend on it look through the whole chain of causes.

use std::error::Error;

use async_nats::jetstream::{self, ErrorCode};

/// The JetStream API error codes anywhere among `error`'s causes (itself
/// included), outermost first. None means the server never answered with
/// one: a timeout, no responders, a broken connection.
pub(crate) fn codes<'a>(error: &'a (dyn Error + 'static)) -> impl Iterator<Item = ErrorCode> + 'a {
    std::iter::successors(Some(error), |&e| e.source()).filter_map(|e| {
        e.downcast_ref::<jetstream::Error>()
            .map(jetstream::Error::error_code)
    })
}
