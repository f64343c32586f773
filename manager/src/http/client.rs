//! Who is asking: the client's address as handlers see it, and comparing the
//! secrets clients present (tokens, CSRF values) in constant time.

use std::net::SocketAddr;

use subtle::ConstantTimeEq as _;

/// The client's address, as handlers get it (`ConnectInfo<ClientAddr>`, inserted per
/// connection by the server), over HTTP and HTTPS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Whether two secrets are equal, in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}
