//! Which nats-server the bench starts: the newest one found, or the one
//! asked for.

use std::path::PathBuf;

use idem::testing::{HarnessError, NatsBinary};

/// Why no server could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ServerChoiceError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error(
        "no nats-server {wanted}.x among {found}; install one (scripts/test.sh installs the current one, \
         Debian's package is 2.9) or pass --server PATH"
    )]
    NoSuchVersion { wanted: String, found: String },
}

/// The server to bench against. `wanted` is a path, or a version prefix
/// (`2.9`) to pick among the servers found; without it, the newest found.
///
/// Found: `IDEM_NATS_SERVER`, the first `nats-server` on `PATH`, and the
/// copies `scripts/test.sh` installs under `~/.cache/idem`.
pub fn choose(wanted: Option<&str>) -> Result<NatsBinary, ServerChoiceError> {
    if let Some(path) = wanted.filter(|w| w.contains('/')) {
        return Ok(NatsBinary::at(path)?);
    }
    let mut found = candidates();
    if found.is_empty() {
        // Let the harness say how to get one.
        found.push(NatsBinary::locate()?);
    }
    found.sort_by(|a, b| b.version().cmp(a.version()));
    match wanted {
        None => Ok(found.swap_remove(0)),
        Some(prefix) => {
            let matches = |b: &NatsBinary| {
                let v = b.version().to_string();
                v == prefix || v.starts_with(&format!("{prefix}."))
            };
            let listed = found
                .iter()
                .map(|b| format!("{} ({})", b.version(), b.path().display()))
                .collect::<Vec<_>>()
                .join(", ");
            found
                .into_iter()
                .find(matches)
                .ok_or_else(|| ServerChoiceError::NoSuchVersion {
                    wanted: prefix.to_owned(),
                    found: listed,
                })
        }
    }
}

fn candidates() -> Vec<NatsBinary> {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os(NatsBinary::ENV) {
        paths.push(path.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path).map(|dir| dir.join("nats-server")));
    }
    let cache = std::env::var_os("IDEM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("idem")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/idem")));
    if let Some(entries) = cache.and_then(|dir| std::fs::read_dir(dir).ok()) {
        paths.extend(entries.flatten().map(|e| e.path().join("bin/nats-server")));
    }
    let mut binaries: Vec<NatsBinary> = paths
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| NatsBinary::at(p).ok())
        .collect();
    binaries.dedup_by(|a, b| a.path() == b.path());
    binaries
}
