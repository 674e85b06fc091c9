//! NATS subject rules, checked on literals at compile time. The runtime's
//! `idem::subject` applies the same rules to values computed at run time;
//! change both together.

pub fn validate_filter(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        return Err("the subject is empty");
    }
    if subject.chars().any(char::is_whitespace) {
        return Err("subjects cannot contain whitespace");
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err("empty token (a leading, trailing or double dot)");
    }
    let last = tokens.len() - 1;
    for (i, token) in tokens.iter().enumerate() {
        if token.contains('>') && (*token != ">" || i != last) {
            return Err("`>` must be the whole last token");
        }
        if token.contains('*') && *token != "*" {
            return Err("`*` must be a whole token");
        }
    }
    Ok(())
}

pub fn validate_publish(subject: &str) -> Result<(), &'static str> {
    validate_filter(subject)?;
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err("messages are published to it, so it cannot contain wildcards");
    }
    Ok(())
}
