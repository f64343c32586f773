//! UDP sockets for segment discovery (the IO around [`crate::segment::Segment`]).
//!
//! Two sockets per agent:
//! - the **beacon socket** binds the discovery port on every address with
//!   `SO_REUSEADDR`, so several agents on one host (or loopback) share the
//!   port and each receives every broadcast beacon;
//! - the **unicast socket** binds an ephemeral port with `SO_BROADCAST`; the
//!   agent sends everything from it (beacons to the broadcast address, probes,
//!   echoes and member reports to members), so its source address names this
//!   agent alone and unicast answers come back to it.
//!
//! On one host, `--discovery-broadcast 127.255.255.255` reaches every agent
//! bound to the discovery port without root; on a LAN the default
//! `255.255.255.255` (or the subnet's broadcast address) does.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Largest datagram read (bigger ones are cut and then refused by the decoder).
const RECV_BUF: usize = baton_protocol::discovery::MAX_DATAGRAM + 1;

/// The discovery sockets of one agent.
#[derive(Clone, Debug)]
pub struct DiscoverySockets {
    /// Shared discovery port: receives broadcast beacons.
    pub beacons: Arc<UdpSocket>,
    /// Ephemeral port: sends everything, receives unicast answers.
    pub unicast: Arc<UdpSocket>,
    /// Where beacons go: the broadcast address and the discovery port.
    pub broadcast: SocketAddr,
}

fn udp(bind: SocketAddr, reuse: bool) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    if reuse {
        socket.set_reuse_address(true)?;
    }
    socket.set_broadcast(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into())?;
    UdpSocket::from_std(socket.into())
}

impl DiscoverySockets {
    /// Binds the discovery port (shared) and an ephemeral unicast port, on every IPv4 address.
    pub fn bind(port: u16, broadcast: Ipv4Addr) -> std::io::Result<DiscoverySockets> {
        let beacons = udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), true)?;
        let unicast = udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), false)?;
        Ok(DiscoverySockets {
            beacons: Arc::new(beacons),
            unicast: Arc::new(unicast),
            broadcast: SocketAddr::from((broadcast, port)),
        })
    }

    /// Spawns a reader per socket that hands `(source, bytes)` to `out` until it is closed.
    pub fn spawn_readers<T: Send + 'static>(
        &self,
        out: mpsc::Sender<T>,
        wrap: fn(SocketAddr, Vec<u8>) -> T,
        tasks: &mut tokio::task::JoinSet<()>,
    ) {
        for socket in [self.beacons.clone(), self.unicast.clone()] {
            let out = out.clone();
            tasks.spawn(async move {
                let mut buf = vec![0u8; RECV_BUF];
                loop {
                    match socket.recv_from(&mut buf).await {
                        Ok((n, from)) => {
                            if out.send(wrap(from, buf[..n].to_vec())).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::debug!("discovery receive failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
    }

    /// Sends one datagram without waiting (UDP: a full socket buffer drops it, as a network would).
    ///
    /// The send is a direct non-blocking system call: tokio's `try_send_to`
    /// refuses until the reactor has seen the socket writable.
    pub fn send(&self, to: SocketAddr, bytes: &[u8]) {
        if let Err(e) = socket2::SockRef::from(&*self.unicast).send_to(bytes, &to.into()) {
            tracing::debug!(%to, "discovery send failed: {e}");
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// Three agents on loopback share one port; a beacon to 127.255.255.255 reaches all of
    /// them, and a unicast answer reaches only the sender's own socket.
    #[tokio::test]
    async fn loopback_broadcast_reaches_every_agent_on_the_port() {
        let bcast = Ipv4Addr::new(127, 255, 255, 255);
        // The first binds an ephemeral discovery port, the others share it.
        let first = DiscoverySockets::bind(0, bcast).unwrap();
        let port = first.beacons.local_addr().unwrap().port();
        let mut agents = vec![DiscoverySockets {
            broadcast: SocketAddr::from((bcast, port)),
            ..first
        }];
        for _ in 0..2 {
            agents.push(DiscoverySockets::bind(port, bcast).unwrap());
        }
        agents[0].send(agents[0].broadcast, b"beacon");
        let sender = SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            agents[0].unicast.local_addr().unwrap().port(),
        ));
        for a in &agents {
            let mut buf = [0u8; 16];
            let (n, from) = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                a.beacons.recv_from(&mut buf),
            )
            .await
            .expect("broadcast arrives")
            .unwrap();
            assert_eq!(&buf[..n], b"beacon");
            assert_eq!(from, sender);
        }
        agents[1].send(sender, b"echo");
        let mut buf = [0u8; 16];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            agents[0].unicast.recv_from(&mut buf),
        )
        .await
        .expect("unicast arrives")
        .unwrap();
        assert_eq!(&buf[..n], b"echo");
    }
}
