//! Which nats-server releases the KV store trusts with claims.
//!
//! Fencing is only as good as the server's compare-and-set. Releases with a
//! known CAS defect are refused when the store opens, with the reason and
//! the fix, rather than allowed to let two workers win one claim.

use semver::Version;

use super::StoreError;

/// A server release (range) whose compare-and-set cannot be trusted.
struct Defect {
    /// Whether the release is affected with this many replicas.
    affects: fn(&Version, usize) -> bool,
    /// What goes wrong, and where it was reported.
    reason: &'static str,
}

const DEFECTS: &[Defect] = &[
    Defect {
        affects: |v, _| *v < Version::new(2, 9, 0),
        reason: "idem needs nats-server 2.9 or newer (direct get, KV CAS semantics)",
    },
    Defect {
        affects: |v, replicas| replicas > 1 && *v < Version::new(2, 9, 21),
        reason: "before 2.9.21, concurrent writes with the same expected last subject sequence can all \
                 succeed on a replicated stream (nats-server#4320), so two workers could win one claim; \
                 use 2.9.21 or newer, or one replica",
    },
    Defect {
        affects: |v, _| (v.major, v.minor, v.patch) == (2, 10, 19),
        reason: "2.10.19 broke KV compare-and-set (fixed in 2.10.20)",
    },
];

/// Refuses a server version with a known CAS defect for `replicas`.
pub(super) fn check(reported: &str, replicas: usize) -> Result<(), StoreError> {
    let unsupported = |reason: &'static str| StoreError::UnsupportedServer {
        version: reported.to_owned(),
        reason,
    };
    let version = Version::parse(reported.trim_start_matches('v'))
        .map_err(|_| unsupported("the server did not report a version idem can read"))?;
    match DEFECTS.iter().find(|d| (d.affects)(&version, replicas)) {
        Some(defect) => Err(unsupported(defect.reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(version: &str, replicas: usize) -> bool {
        check(version, replicas).is_err()
    }

    #[test]
    fn known_cas_defects_are_refused_and_everything_else_is_accepted() {
        // nats-server#4320: replicated streams before 2.9.21.
        assert!(refused("2.9.10", 3));
        assert!(refused("2.9.20", 3));
        assert!(!refused("2.9.10", 1));
        assert!(!refused("2.9.21", 3));
        // 2.10.19's KV CAS regression, at any replica count.
        assert!(refused("2.10.19", 1));
        assert!(!refused("2.10.20", 3));
        assert!(!refused("2.15.1", 3));
        // Too old, or unreadable: fail closed.
        assert!(refused("2.8.4", 1));
        assert!(refused("", 1));
        assert!(refused("banana", 1));
        assert!(!refused("v2.11.0-RC.1", 1));
    }

    #[test]
    fn the_refusal_says_why_and_what_to_do() {
        let message = check("2.9.10", 3).expect_err("refused").to_string();
        assert!(
            message.contains("2.9.10") && message.contains("#4320") && message.contains("2.9.21"),
            "{message}"
        );
    }
}
