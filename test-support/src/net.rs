//! Loopback ports that are free right now, for servers a test starts on a fixed address.
//!
//! Ports are drawn below the kernel's ephemeral range (32768 and up on Linux), so no
//! socket bound to port 0 and no outgoing connection can take one between the check and
//! the test's own bind; each process starts at its own offset and never hands out a port
//! twice, so parallel tests and test binaries do not collide either.

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// First port of the range handed out (above the well-known and registered services
/// tests could meet on a developer machine).
const RANGE_START: u32 = 20_000;
/// Number of ports in the range; it ends below the ephemeral range's default start.
const RANGE_LEN: u32 = 12_000;

/// How many ports this process has drawn so far.
static DRAWN: AtomicU32 = AtomicU32::new(0);

/// The next candidate port: this process's offset plus the draw count, wrapped in the range.
fn next_candidate() -> u16 {
    let offset = std::process::id().wrapping_mul(7919);
    let n = DRAWN.fetch_add(1, Ordering::Relaxed);
    (RANGE_START + offset.wrapping_add(n) % RANGE_LEN) as u16
}

/// The first candidate port `usable` accepts; panics when the whole range is taken.
fn draw_port(usable: impl Fn(u16) -> bool) -> u16 {
    (0..RANGE_LEN)
        .map(|_| next_candidate())
        .find(|&port| usable(port))
        .expect("a free port in 20000..32000 (all taken)")
}

/// A TCP port on 127.0.0.1 nobody listens on right now.
pub fn free_tcp_port() -> u16 {
    draw_port(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// A UDP port nobody on this host uses right now (checked on every address).
pub fn free_udp_port() -> u16 {
    draw_port(|port| UdpSocket::bind(("0.0.0.0", port)).is_ok())
}

/// `127.0.0.1:<port>` with a TCP port free now, for a server that must keep its address
/// across a restart.
pub fn free_loopback_addr() -> String {
    format!("127.0.0.1:{}", free_tcp_port())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn free_ports_can_be_bound() {
        TcpListener::bind(free_loopback_addr()).unwrap();
        UdpSocket::bind(("0.0.0.0", free_udp_port())).unwrap();
        assert_ne!(free_tcp_port(), 0);
    }

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_repeat_in_a_process() {
        let ports: Vec<u16> = (0..200).map(|_| free_tcp_port()).collect();
        assert!(ports.iter().all(|&p| (20_000..32_000).contains(&p)));
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }
}
