//! NATS subject rules, for the subjects handlers are configured with.

/// What is wrong with a subject.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// Nothing there.
    #[error("the subject is empty")]
    Empty,
    /// Spaces, tabs or line breaks.
    #[error("subject {0:?} contains whitespace")]
    Whitespace(String),
    /// `a..b`, a leading or a trailing dot.
    #[error("subject {0:?} has an empty token (a leading, trailing or double dot)")]
    EmptyToken(String),
    /// `>` before the last token, or `*`/`>` inside a token.
    #[error(
        "subject {0:?} misplaces a wildcard: `*` must be a whole token, `>` a whole last token"
    )]
    MisplacedWildcard(String),
    /// A wildcard where a concrete subject is needed (a publish target).
    #[error("subject {0:?} has a wildcard, but messages are published to it")]
    Wildcard(String),
}

crate::error::debug_as_report!(SubjectError);

/// Checks a subject that may contain wildcards (a filter).
///
/// ```
/// use idem::subject::{validate_filter, SubjectError};
///
/// assert!(validate_filter("payments.*.succeeded").is_ok());
/// assert!(validate_filter("payments.>").is_ok());
/// assert!(matches!(validate_filter("payments.>.x"), Err(SubjectError::MisplacedWildcard(_))));
/// assert!(matches!(validate_filter("a..b"), Err(SubjectError::EmptyToken(_))));
/// ```
pub fn validate_filter(subject: &str) -> Result<(), SubjectError> {
    let owned = || subject.to_owned();
    if subject.is_empty() {
        return Err(SubjectError::Empty);
    }
    if subject.chars().any(char::is_whitespace) {
        return Err(SubjectError::Whitespace(owned()));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err(SubjectError::EmptyToken(owned()));
    }
    let last = tokens.len() - 1;
    for (i, token) in tokens.iter().enumerate() {
        let misplaced = (token.contains('>') && (*token != ">" || i != last))
            || (token.contains('*') && *token != "*");
        if misplaced {
            return Err(SubjectError::MisplacedWildcard(owned()));
        }
    }
    Ok(())
}

/// Checks a subject messages are published to: no wildcards.
///
/// ```
/// use idem::subject::validate_publish;
///
/// assert!(validate_publish("payments.dead").is_ok());
/// assert!(validate_publish("payments.*").is_err());
/// ```
pub fn validate_publish(subject: &str) -> Result<(), SubjectError> {
    validate_filter(subject)?;
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err(SubjectError::Wildcard(subject.to_owned()));
    }
    Ok(())
}

/// Whether the filter `filter` (wildcards allowed) matches the concrete
/// subject `subject`.
///
/// ```
/// use idem::subject::matches;
///
/// assert!(matches("payments.>", "payments.dead"));
/// assert!(matches("payments.*.dead", "payments.eu.dead"));
/// assert!(!matches("payments.*", "payments.eu.dead"));
/// assert!(!matches("payments.>", "payments"));
/// ```
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut wanted = filter.split('.');
    let mut given = subject.split('.');
    loop {
        match (wanted.next(), given.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(w), Some(g)) if w == g => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}
