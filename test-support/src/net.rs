//! Loopback ports that are free right now (another process may take one before the test
//! binds it; the tests accept that small race).

use std::net::{TcpListener, UdpSocket};

/// A TCP port on 127.0.0.1 nobody listens on right now.
pub fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback TCP port");
    listener.local_addr().expect("bound address").port()
}

/// A UDP port nobody on this host uses right now (bound on every address to check).
pub fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP port");
    socket.local_addr().expect("bound address").port()
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
}
