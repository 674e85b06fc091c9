//! NATS subject rules, for the subjects handlers are configured with — the
//! same rules `#[idempotent]` checks on literals at compile time (both come
//! from the `idem-grammar` crate).
//!
//! ```
//! use idem::subject::{matches, validate_filter, validate_publish, SubjectError};
//!
//! assert!(validate_filter("payments.*.succeeded").is_ok());
//! assert!(matches!(validate_filter("payments.>.x"), Err(SubjectError::MisplacedWildcard(_))));
//! assert!(validate_publish("payments.*").is_err());
//! assert!(matches("payments.>", "payments.dead"));
//! ```

pub use idem_grammar::subject::{SubjectError, matches, validate_filter, validate_publish};
