//! Durations written as text: a number and a unit, `"250ms"`, `"30s"`,
//! `"1h 30m"`, `"7d"` (humantime's grammar).

use std::fmt;
use std::time::Duration;

/// A text that is not a duration.
#[derive(Clone, PartialEq, Eq)]
pub struct InvalidDuration {
    /// The text.
    pub text: String,
}

impl fmt::Display for InvalidDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a duration: write a number and a unit, e.g. \"250ms\", \"30s\", \"5m\", \"7d\"",
            self.text
        )
    }
}

/// As its message: the error has no causes.
impl fmt::Debug for InvalidDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for InvalidDuration {}

/// Parses a duration.
///
/// ```
/// use std::time::Duration;
/// use idem_grammar::duration::parse;
///
/// assert_eq!(parse("1m 30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse("5x").unwrap_err().to_string(), "\"5x\" is not a duration: write a number and a unit, e.g. \"250ms\", \"30s\", \"5m\", \"7d\"");
/// ```
pub fn parse(text: &str) -> Result<Duration, InvalidDuration> {
    humantime::parse_duration(text).map_err(|_| InvalidDuration {
        text: text.to_owned(),
    })
}
