//! Reserving free loopback ports for servers, routes and proxies.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

use super::HarnessError;

/// Ports this process has handed out already: two servers of one test must
/// not be told the same one. (Another process may still take a port between
/// the probe and the server's bind; server start-up retries on that.)
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that nothing listened on a moment ago and that this
/// process has not handed out before.
///
/// Ports are drawn *below* the kernel's ephemeral range: a port from that
/// range (what binding port 0 gives) can be taken as the local end of any
/// outgoing connection — a client's, a route's reconnect attempt — while
/// its server is down, and the restart would then fail to bind.
pub(crate) fn free_port() -> Result<u16, HarnessError> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let below = ephemeral_start();
    for _ in 0..PROBES {
        let candidate = fastrand::u16(FIRST_PORT..below);
        if handed_out.contains(&candidate) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, candidate)).is_ok() {
            handed_out.insert(candidate);
            return Ok(candidate);
        }
    }
    Err(HarnessError::Port(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("{PROBES} probes offered only ports handed out already"),
    )))
}

/// How many candidates to try before giving up.
const PROBES: usize = 1024;
/// The lowest port handed out (well above the registered services people
/// run on development machines).
const FIRST_PORT: u16 = 20_000;

/// The first port of the kernel's ephemeral range (Linux default: 32768).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|start| *start > FIRST_PORT + 1_000)
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_stay_below_the_ephemeral_range() {
        let port = free_port().expect("port");
        assert!((FIRST_PORT..ephemeral_start()).contains(&port), "{port}");
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().expect("port")).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
