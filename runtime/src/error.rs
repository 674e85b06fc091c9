//! The error a handler returns: retryable (the default) or permanent.

use std::fmt;

/// Writes an error the way `main` shows it: its message, then each source
/// on a line of its own under "Caused by", as `anyhow` does. idem's public
/// errors use it for `Debug`, so that a program returning
/// `Result<(), Box<dyn Error>>` prints what went wrong and what to do —
/// not a struct dump.
pub(crate) fn write_report(
    error: &(dyn std::error::Error + 'static),
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    write!(f, "{error}")?;
    write_causes(error.source(), f)
}

fn write_causes(
    mut source: Option<&(dyn std::error::Error + 'static)>,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    if source.is_some() {
        f.write_str("\n\nCaused by:")?;
    }
    let mut n = 0;
    while let Some(cause) = source {
        write!(f, "\n    {n}: {cause}")?;
        n += 1;
        source = cause.source();
    }
    Ok(())
}

/// `Debug` as [`write_report`]: the message and its causes.
macro_rules! debug_as_report {
    ($($error:ty),* $(,)?) => {$(
        impl ::std::fmt::Debug for $error {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                $crate::error::write_report(self, f)
            }
        }
    )*};
}
pub(crate) use debug_as_report;

/// A boxed error from user code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether a failure is worth retrying.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Transient (a timeout, a lock, a 503): NAK with backoff and retry, up
    /// to the policy's attempts, then dead-letter.
    Retryable,
    /// Retrying cannot help (a validation failure, an unknown account):
    /// dead-letter at once.
    Permanent,
}

/// The error type of handlers.
///
/// `?` converts any error into a *retryable* `HandlerError`; mark the ones
/// retrying cannot fix with [`HandlerError::permanent`] or
/// [`ResultExt::permanent`].
///
/// ```
/// use idem::{HandlerError, ResultExt};
///
/// fn parse_amount(text: &str) -> Result<i64, HandlerError> {
///     let amount: i64 = text.parse().permanent()?; // bad input: no retry
///     if amount <= 0 {
///         return Err(HandlerError::permanent("amount must be positive"));
///     }
///     Ok(amount)
/// }
///
/// assert!(parse_amount("x").unwrap_err().is_permanent());
/// assert_eq!(parse_amount("12").ok(), Some(12));
/// ```
pub struct HandlerError {
    kind: ErrorKind,
    source: BoxError,
    retry_after: Option<std::time::Duration>,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        Self {
            kind: ErrorKind::Retryable,
            source: error.into(),
            retry_after: None,
        }
    }

    /// A failure retrying cannot fix: the message is dead-lettered at once.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            source: error.into(),
            retry_after: None,
        }
    }

    /// Retryable or permanent.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether it is permanent.
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }

    /// Asks that the retry wait at least `delay` — what the failed call said
    /// (an HTTP 429's or 503's `Retry-After`, a rate limiter's refill). The
    /// retry policy still decides whether there is a retry and never waits
    /// less than its own backoff; the attempt counts as usual. No effect on
    /// a permanent error.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem::HandlerError;
    ///
    /// let throttled = HandlerError::retryable("429 Too Many Requests")
    ///     .retry_after(Duration::from_secs(30));
    /// assert_eq!(throttled.retry_hint(), Some(Duration::from_secs(30)));
    /// ```
    pub fn retry_after(mut self, delay: std::time::Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The delay [`retry_after`](Self::retry_after) asked for, if any.
    pub fn retry_hint(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The error with its kind, as a standard error (its message says the
    /// kind; its source is the underlying error's source).
    pub fn into_std(self) -> BoxError {
        Box::new(Reported(self))
    }
}

/// `HandlerError` is used as an error where a `std::error::Error` is
/// expected the way `anyhow::Error` is, and for the same reason: it cannot
/// implement the trait itself and also take any error with `?` (the blanket
/// `From` below would then convert it into itself). It dereferences to the
/// underlying error, `?` turns it into a `Box<dyn Error>` (what `main`
/// returns), and [`into_std`](HandlerError::into_std) into a
/// `Box<dyn Error + Send + Sync>` (a `thiserror` source):
///
/// ```
/// use idem::HandlerError;
///
/// fn charge() -> Result<(), HandlerError> {
///     Err(HandlerError::permanent("card declined"))
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let error = (|| -> Result<(), Box<dyn std::error::Error>> { Ok(charge()?) })().unwrap_err();
///     assert_eq!(error.to_string(), "permanent: card declined");
///     let underlying: &dyn std::error::Error = &*HandlerError::retryable("timeout");
///     assert_eq!(underlying.to_string(), "timeout");
///     let boxed: idem::BoxError = HandlerError::retryable("timeout").into_std();
///     assert_eq!(boxed.to_string(), "retryable: timeout");
///     Ok(())
/// }
/// ```
impl std::ops::Deref for HandlerError {
    type Target = dyn std::error::Error + Send + Sync + 'static;

    fn deref(&self) -> &Self::Target {
        &*self.source
    }
}

impl AsRef<dyn std::error::Error + Send + Sync> for HandlerError {
    fn as_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

/// The error with its kind, as a standard error.
impl From<HandlerError> for Box<dyn std::error::Error + 'static> {
    fn from(error: HandlerError) -> Self {
        Box::new(Reported(error))
    }
}

/// A `HandlerError` as a `std::error::Error`: its message (kind included)
/// and, as its source, the underlying error's source.
struct Reported(HandlerError);

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::error::Error for Reported {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source.source()
    }
}

/// `?` on any error makes a retryable `HandlerError`.
impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::retryable(error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
        };
        write!(f, "{kind}: {}", self.source)
    }
}

/// The message and its causes, as the other errors' `Debug`.
impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        write_causes(self.source.source(), f)
    }
}

/// Marks the error of a `Result` as permanent or retryable.
pub trait ResultExt<T> {
    /// Fails permanently on `Err`.
    fn permanent(self) -> Result<T, HandlerError>;
    /// Fails retryably on `Err` (what `?` does anyway; for clarity).
    fn retryable(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }

    fn retryable(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retryable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the outer step failed")]
    struct Outer(#[source] std::io::Error);

    struct Shown(Outer);

    impl fmt::Debug for Shown {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write_report(&self.0, f)
        }
    }

    #[test]
    fn a_report_is_the_message_then_each_cause() {
        let error = Shown(Outer(std::io::Error::other("disk on fire")));
        assert_eq!(
            format!("{error:?}"),
            "the outer step failed\n\nCaused by:\n    0: disk on fire"
        );
        let handler = HandlerError::permanent("amount must be positive");
        assert_eq!(format!("{handler:?}"), "permanent: amount must be positive");
    }
}
