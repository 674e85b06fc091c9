//! Reserving free loopback ports for servers, routes and proxies.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

use super::HarnessError;

/// Ports this process has handed out already: the kernel may offer a port
/// again as soon as the probe socket closes, and two servers of one test must
/// not be told the same one. (Another process may still take a port between
/// the probe and the server's bind; server start-up retries on that.)
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that nothing listened on a moment ago and that this
/// process has not handed out before.
pub(crate) fn free_port() -> Result<u16, HarnessError> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..PROBES {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|probe| probe.local_addr())
            .map_err(HarnessError::Port)?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(HarnessError::Port(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("{PROBES} probes offered only ports handed out already"),
    )))
}

/// How many times to ask the kernel before giving up.
const PROBES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().expect("port")).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
