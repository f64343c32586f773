//! A responder `Handshake` fed arbitrary message 1 and message 3 never panics.
//!
//! Input: a mode byte, two bytes choosing where to split the rest into A and B.
//! - even mode: A and B are raw messages 1 and 3;
//! - odd mode: a genuine Noise initiator (clatter, the agent's static key)
//!   sends A as the payload of message 1 and B as the payload of message 3,
//!   so B reaches the responder's `Hello` parser authenticated.

#![no_main]

use baton_protocol::identity::Identity;
use baton_protocol::session::{Handshake, Hello, MAX_HANDSHAKE_MSG, Role, SessionError};
use baton_protocol::{AgentId, caps};
use clatter::bytearray::ByteArray;
use clatter::crypto::cipher::ChaChaPoly;
use clatter::crypto::dh::X25519;
use clatter::crypto::hash::Sha256;
use clatter::traits::{Dh as _, Handshaker as _};
use clatter::{KeyPair, NqHandshakeCore};
use libfuzzer_sys::fuzz_target;

/// The initiator's ephemeral key is given, so no randomness is ever drawn.
#[derive(Clone, Default)]
struct NoRng;

impl rand_core::RngCore for NoRng {
    fn next_u32(&mut self) -> u32 {
        unreachable!("no randomness drawn")
    }
    fn next_u64(&mut self) -> u64 {
        unreachable!("no randomness drawn")
    }
    fn fill_bytes(&mut self, _: &mut [u8]) {
        unreachable!("no randomness drawn")
    }
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), rand_core::Error> {
        unreachable!("no randomness drawn")
    }
}

impl rand_core::CryptoRng for NoRng {}

type Core = NqHandshakeCore<X25519, ChaChaPoly, Sha256, NoRng>;

fn keypair(
    secret: [u8; 32],
) -> KeyPair<<X25519 as clatter::traits::Dh>::PubKey, <X25519 as clatter::traits::Dh>::PrivateKey> {
    let secret = <X25519 as clatter::traits::Dh>::PrivateKey::from_slice(&secret);
    KeyPair::new(X25519::pubkey(&secret), secret)
}

/// After an error, the caller ignores it and keeps going: still no panic.
fn misuse(r: &mut Handshake, next: &[u8]) {
    let mut buf = [0u8; MAX_HANDSHAKE_MSG];
    let _ = r.is_my_turn();
    let _ = r.write_message(&mut buf);
    let _ = r.read_message(next);
    let _ = r.remote_hello();
    let _ = r.remote_static();
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mode = data[0];
    let split = u16::from_le_bytes([data[1], data[2]]) as usize;
    let rest = &data[3..];
    let (a, b) = rest.split_at(split % (rest.len() + 1));

    let manager = Identity::from_seed([1; 32]);
    let agent = Identity::from_seed([2; 32]);
    let mut r = Handshake::responder(
        &manager,
        [11; 32],
        Hello::new(
            Role::Manager,
            AgentId::try_from("mgr").unwrap(),
            caps::ALL,
            None,
        ),
    )
    .unwrap();
    let mut buf = [0u8; 2 * MAX_HANDSHAKE_MSG];

    if mode & 1 == 0 {
        let first = r.read_message(a);
        assert_eq!(
            first.is_ok(),
            a.len() == 32,
            "message 1 is exactly a key: {first:?}"
        );
        if first.is_err() {
            misuse(&mut r, b);
            return;
        }
        if r.write_message(&mut buf).is_err() {
            misuse(&mut r, b);
            return;
        }
        assert!(
            r.read_message(b).is_err(),
            "an unauthenticated message 3 was accepted"
        );
        misuse(&mut r, b);
        assert!(r.finish().is_err());
        return;
    }

    let mut i = Core::new(
        clatter::handshakepattern::noise_xx(),
        b"baton",
        true,
        Some(keypair(agent.x25519_secret())),
        Some(keypair([10; 32])),
        None,
        None,
    )
    .unwrap();
    let Ok(n) = i.write_message(a, &mut buf) else {
        return;
    };
    let first = r.read_message(&buf[..n]);
    if !a.is_empty() {
        let want = if n > MAX_HANDSHAKE_MSG {
            SessionError::Size
        } else {
            SessionError::BadHello
        };
        assert_eq!(first, Err(want));
        misuse(&mut r, b);
        return;
    }
    first.expect("a genuine message 1");
    let n = r.write_message(&mut buf).expect("message 2");
    let mut payload = [0u8; 2 * MAX_HANDSHAKE_MSG];
    i.read_message(&buf[..n], &mut payload)
        .expect("a genuine message 2");
    let Ok(n) = i.write_message(b, &mut buf) else {
        return;
    };
    match r.read_message(&buf[..n]) {
        Ok(()) => {
            let hello = r.remote_hello().expect("hello after message 3").clone();
            assert_eq!(hello.version, baton_protocol::PROTOCOL_VERSION);
            let (parsed, tail) = postcard::take_from_bytes::<Hello>(b).expect("payload is a hello");
            assert!(tail.is_empty());
            assert_eq!(parsed, hello);
            r.remote_is(&agent.public())
                .expect("the key proven is the agent's");
            let _ = r.verify_peer_cert(&manager.public());
            r.finish().expect("a finished handshake gives a transport");
        }
        Err(SessionError::BadHello | SessionError::VersionMismatch) => {
            assert!(n <= MAX_HANDSHAKE_MSG);
            misuse(&mut r, b);
        }
        Err(SessionError::Size) => assert!(n > MAX_HANDSHAKE_MSG),
        Err(e) => panic!("authentic message 3 refused with {e:?}"),
    }
});
