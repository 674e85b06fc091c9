//! Durations written as text (`"200ms"`, `"30s"`, `"7d"`), as in handler
//! attributes and retry policies.
//!
//! The `#[idempotent]` attribute checks literals at compile time; values
//! built at run time are checked when the runtime starts, so a bad string
//! is a start-up error, never a panic.

use std::time::Duration;

/// A duration, or the text that failed to parse as one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurationSpec {
    /// A valid duration.
    Valid(Duration),
    /// Text that is not a duration.
    Invalid(String),
}

/// Something that names a duration: a [`Duration`], or text such as
/// `"250ms"`, `"30s"`, `"1h 30m"`, `"7d"`.
///
/// ```
/// use std::time::Duration;
/// use idem::duration::{DurationSpec, IntoDuration};
///
/// assert_eq!("1m 30s".into_duration(), DurationSpec::Valid(Duration::from_secs(90)));
/// assert!(matches!("5x".into_duration(), DurationSpec::Invalid(_)));
/// ```
pub trait IntoDuration {
    /// The duration, or the text that failed.
    fn into_duration(self) -> DurationSpec;
}

impl IntoDuration for Duration {
    fn into_duration(self) -> DurationSpec {
        DurationSpec::Valid(self)
    }
}

impl IntoDuration for &str {
    fn into_duration(self) -> DurationSpec {
        match idem_grammar::duration::parse(self) {
            Ok(d) => DurationSpec::Valid(d),
            Err(invalid) => DurationSpec::Invalid(invalid.text),
        }
    }
}

impl IntoDuration for String {
    fn into_duration(self) -> DurationSpec {
        self.as_str().into_duration()
    }
}

/// A text that is not a duration (the grammar `#[idempotent]` checks
/// literals with, from the `idem-grammar` crate).
pub use idem_grammar::duration::InvalidDuration;

impl DurationSpec {
    /// The duration, or the error naming the text.
    pub fn get(&self) -> Result<Duration, InvalidDuration> {
        match self {
            DurationSpec::Valid(d) => Ok(*d),
            DurationSpec::Invalid(text) => Err(InvalidDuration { text: text.clone() }),
        }
    }
}
