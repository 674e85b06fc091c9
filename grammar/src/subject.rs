//! NATS subject rules, for the subjects handlers are configured with.

use std::fmt;

/// What is wrong with a subject.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubjectError {
    /// Nothing there.
    Empty,
    /// Spaces, tabs or line breaks.
    Whitespace(String),
    /// `a..b`, a leading or a trailing dot.
    EmptyToken(String),
    /// `>` before the last token, or `*`/`>` inside a token.
    MisplacedWildcard(String),
    /// A wildcard where a concrete subject is needed (a publish target).
    Wildcard(String),
}

impl fmt::Display for SubjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectError::Empty => write!(f, "the subject is empty"),
            SubjectError::Whitespace(s) => write!(f, "subject {s:?} contains whitespace"),
            SubjectError::EmptyToken(s) => write!(
                f,
                "subject {s:?} has an empty token (a leading, trailing or double dot)"
            ),
            SubjectError::MisplacedWildcard(s) => write!(
                f,
                "subject {s:?} misplaces a wildcard: `*` must be a whole token, `>` a whole last token"
            ),
            SubjectError::Wildcard(s) => write!(
                f,
                "subject {s:?} has a wildcard, but messages are published to it"
            ),
        }
    }
}

/// As its message: the error has no causes.
impl fmt::Debug for SubjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for SubjectError {}

/// Checks a subject that may contain wildcards (a filter).
///
/// ```
/// use idem_grammar::subject::{validate_filter, SubjectError};
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
/// use idem_grammar::subject::validate_publish;
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
/// use idem_grammar::subject::matches;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_names_its_problem() {
        let cases = [
            ("", "the subject is empty"),
            ("a b", "contains whitespace"),
            ("a..b", "empty token"),
            (".a", "empty token"),
            ("a.>.b", "misplaces a wildcard"),
            ("a.b*", "misplaces a wildcard"),
        ];
        for (subject, problem) in cases {
            let error = validate_filter(subject).expect_err(subject);
            assert!(error.to_string().contains(problem), "{subject:?}: {error}");
        }
        assert!(
            validate_publish("a.*")
                .expect_err("wildcard")
                .to_string()
                .contains("published")
        );
        assert_eq!(validate_publish("idem.dead.issue_card"), Ok(()));
    }
}
