//! Mutually authenticated sessions: a Noise XX handshake, then encrypted frames.
//!
//! Pattern `Noise_XX_25519_ChaChaPoly_SHA256`, with each side's static key
//! derived from its Ed25519 identity (see [`crate::identity`]):
//!
//! ```text
//! initiator → responder   e                          (msg 1, empty payload)
//! responder → initiator   e, ee, s, es  + Hello      (msg 2, payload encrypted)
//! initiator → responder   s, se         + Hello      (msg 3, payload encrypted)
//! ```
//!
//! The initiator always knows whose key to expect (the pinned manager key, or
//! the peer key from the manager's instruction) and refuses any other after
//! message 2. The responder learns the initiator's key in message 3 and
//! decides (the manager: is this key enrolled for this id; an agent: does the
//! [`Hello::cert`] carry the manager's signature over this key).
//!
//! Both sides contribute fresh ephemeral keys, so a recorded handshake cannot
//! be replayed into a session. Afterwards every frame is ChaCha20-Poly1305
//! under a per-direction key with a counter nonce: a replayed, reordered,
//! forged or altered frame fails to decrypt and the session must be closed.
//!
//! The state machine takes the ephemeral secret from the caller (no RNG here).

use clatter::bytearray::ByteArray;
use clatter::cipherstate::CipherState;
use clatter::crypto::cipher::ChaChaPoly;
use clatter::crypto::dh::X25519;
use clatter::crypto::hash::Sha256;
use clatter::traits::{Dh as _, Handshaker as _};
use clatter::transportstate::TransportState;
use clatter::{KeyPair, NqHandshakeCore};
use serde::{Deserialize, Serialize};

use crate::identity::{AgentCert, Identity, x25519_of};
use crate::types::{AgentId, PublicKey};
use crate::{MAX_FRAME, PROTOCOL_VERSION};

/// Noise prologue: binds the handshake to this protocol family.
const PROLOGUE: &[u8] = b"baton";
/// Bytes of Noise AEAD tag on every encrypted message.
pub const TAG_LEN: usize = 16;
/// Largest handshake message Baton produces or accepts.
pub const MAX_HANDSHAKE_MSG: usize = 1024;

/// What a side is, announced in its [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Role {
    /// The distribution manager.
    Manager,
    /// An agent (device or server).
    Agent,
}

/// The handshake payload: who a side says it is and what it speaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hello {
    /// Protocol version the side speaks ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Capability bits ([`crate::caps`]).
    pub caps: u32,
    /// Manager or agent.
    pub role: Role,
    /// The side's id (an agent id, or the manager's name).
    pub id: AgentId,
    /// For agents talking to agents: the manager's certificate for this agent.
    pub cert: Option<AgentCert>,
    /// For an agent's first contact with the manager: a one-time enrolment token
    /// that lets the manager enrol the key this handshake proves under `id`.
    pub token: Option<heapless::String<MAX_TOKEN_LEN>>,
}

/// Longest enrolment token, in bytes.
pub const MAX_TOKEN_LEN: usize = 64;

impl Hello {
    /// A hello of this build's version and capabilities.
    pub fn new(role: Role, id: AgentId, caps: u32, cert: Option<AgentCert>) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            caps,
            role,
            id,
            cert,
            token: None,
        }
    }

    /// The same hello carrying a one-time enrolment token.
    pub fn with_token(mut self, token: heapless::String<MAX_TOKEN_LEN>) -> Self {
        self.token = Some(token);
        self
    }
}

/// Why a handshake or an encrypted frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SessionError {
    /// The handshake message failed to decrypt or parse: tampered, replayed or not Noise.
    BadHandshake,
    /// A message arrived out of turn, or the handshake is not finished.
    OutOfOrder,
    /// The other side's static key is not the expected one.
    WrongPeerKey,
    /// The other side's hello is malformed.
    BadHello,
    /// The other side speaks an incompatible protocol version.
    VersionMismatch,
    /// The other side's certificate is missing, forged, or for another key or id.
    BadCertificate,
    /// A frame failed to decrypt: tampered, forged, replayed or reordered.
    BadFrame,
    /// A frame or buffer is larger than [`MAX_FRAME`] or too small for the result.
    Size,
    /// An expected key is not a valid Ed25519 public key.
    BadKey,
}

impl core::fmt::Display for SessionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SessionError::BadHandshake => {
                "handshake message refused (tampered, replayed or not a Baton peer)"
            }
            SessionError::OutOfOrder => "handshake message out of order",
            SessionError::WrongPeerKey => "peer presented an unexpected key",
            SessionError::BadHello => "peer's hello is malformed",
            SessionError::VersionMismatch => "peer speaks an incompatible protocol version",
            SessionError::BadCertificate => "peer's certificate is missing or invalid",
            SessionError::BadFrame => "frame failed authentication (tampered, forged or replayed)",
            SessionError::Size => "frame too large or buffer too small",
            SessionError::BadKey => "not a valid Ed25519 public key",
        })
    }
}

impl core::error::Error for SessionError {}

/// An RNG that is never called: ephemeral keys are supplied by the caller.
#[derive(Clone, Default)]
struct NoRng;

impl rand_core::RngCore for NoRng {
    fn next_u32(&mut self) -> u32 {
        unreachable!("Baton supplies the ephemeral key; the handshake never draws randomness")
    }
    fn next_u64(&mut self) -> u64 {
        unreachable!("Baton supplies the ephemeral key; the handshake never draws randomness")
    }
    fn fill_bytes(&mut self, _: &mut [u8]) {
        unreachable!("Baton supplies the ephemeral key; the handshake never draws randomness")
    }
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), rand_core::Error> {
        unreachable!("Baton supplies the ephemeral key; the handshake never draws randomness")
    }
}

impl rand_core::CryptoRng for NoRng {}

type Core = NqHandshakeCore<X25519, ChaChaPoly, Sha256, NoRng>;
type X25519Pair =
    KeyPair<<X25519 as clatter::traits::Dh>::PubKey, <X25519 as clatter::traits::Dh>::PrivateKey>;

fn keypair(secret: [u8; 32]) -> X25519Pair {
    let secret = <X25519 as clatter::traits::Dh>::PrivateKey::from_slice(&secret);
    let public = X25519::pubkey(&secret);
    KeyPair::new(public, secret)
}

/// A handshake in progress. Drive it with [`Handshake::write_message`] and
/// [`Handshake::read_message`] while [`Handshake::is_my_turn`] says whose turn
/// it is, until [`Handshake::is_finished`]; then [`Handshake::finish`].
pub struct Handshake {
    core: Core,
    hello: Hello,
    initiator: bool,
    /// X25519 form of the key the initiator expects from the responder.
    expected: Option<[u8; 32]>,
    remote_hello: Option<Hello>,
    sent: u8,
    received: u8,
    /// The first error; once set, every later step repeats it (the handshake is poisoned).
    failed: Option<SessionError>,
}

impl core::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Handshake")
            .field("initiator", &self.initiator)
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake as the connecting side, expecting the responder's Ed25519 key `expected`.
    ///
    /// `ephemeral` must be 32 fresh random bytes.
    pub fn initiator(
        me: &Identity,
        ephemeral: [u8; 32],
        expected: &PublicKey,
        hello: Hello,
    ) -> Result<Self, SessionError> {
        let expected = x25519_of(expected).map_err(|_| SessionError::BadKey)?;
        Self::new(me, ephemeral, hello, true, Some(expected))
    }

    /// Starts a handshake as the accepting side. `ephemeral` must be 32 fresh random bytes.
    pub fn responder(
        me: &Identity,
        ephemeral: [u8; 32],
        hello: Hello,
    ) -> Result<Self, SessionError> {
        Self::new(me, ephemeral, hello, false, None)
    }

    fn new(
        me: &Identity,
        ephemeral: [u8; 32],
        hello: Hello,
        initiator: bool,
        expected: Option<[u8; 32]>,
    ) -> Result<Self, SessionError> {
        let core = Core::new(
            clatter::handshakepattern::noise_xx(),
            PROLOGUE,
            initiator,
            Some(keypair(me.x25519_secret())),
            Some(keypair(ephemeral)),
            None,
            None,
        )
        .map_err(|_| SessionError::BadHandshake)?;
        Ok(Handshake {
            core,
            hello,
            initiator,
            expected,
            remote_hello: None,
            sent: 0,
            received: 0,
            failed: None,
        })
    }

    /// Whether the next step is ours to write.
    pub fn is_my_turn(&self) -> bool {
        !self.core.is_finished() && self.core.is_write_turn()
    }

    /// Whether all three messages have passed.
    pub fn is_finished(&self) -> bool {
        self.core.is_finished()
    }

    /// Writes our next handshake message into `out`, returning its length.
    ///
    /// After any error the handshake is poisoned: every later step fails.
    pub fn write_message(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let result = self.write_step(out);
        self.poison_on(result)
    }

    /// Reads the other side's next handshake message.
    ///
    /// After any error the handshake is poisoned: every later step fails.
    pub fn read_message(&mut self, msg: &[u8]) -> Result<(), SessionError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let result = self.read_step(msg);
        self.poison_on(result)
    }

    fn poison_on<T>(&mut self, result: Result<T, SessionError>) -> Result<T, SessionError> {
        if let Err(e) = &result {
            self.failed = Some(*e);
        }
        result
    }

    fn write_step(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        if !self.is_my_turn() {
            return Err(SessionError::OutOfOrder);
        }
        let mut payload = [0u8; 512];
        // Message 1 (initiator's first) carries no payload: it would travel in clear.
        let payload: &[u8] = if self.initiator && self.sent == 0 {
            &[]
        } else {
            postcard::to_slice(&self.hello, &mut payload).map_err(|_| SessionError::Size)?
        };
        let n = self
            .core
            .write_message(payload, out)
            .map_err(|_| SessionError::Size)?;
        self.sent += 1;
        Ok(n)
    }

    fn read_step(&mut self, msg: &[u8]) -> Result<(), SessionError> {
        if self.core.is_finished() || self.core.is_write_turn() {
            return Err(SessionError::OutOfOrder);
        }
        if msg.len() > MAX_HANDSHAKE_MSG {
            return Err(SessionError::Size);
        }
        let mut payload = [0u8; MAX_HANDSHAKE_MSG];
        let n = self
            .core
            .read_message(msg, &mut payload)
            .map_err(|_| SessionError::BadHandshake)?;
        self.received += 1;
        let carries_hello = self.initiator || self.received != 1;
        if carries_hello {
            let (hello, rest) = postcard::take_from_bytes::<Hello>(&payload[..n])
                .map_err(|_| SessionError::BadHello)?;
            if !rest.is_empty() {
                return Err(SessionError::BadHello);
            }
            if hello.version != PROTOCOL_VERSION {
                return Err(SessionError::VersionMismatch);
            }
            self.remote_hello = Some(hello);
        } else if n != 0 {
            return Err(SessionError::BadHello);
        }
        if let (Some(expected), Some(remote)) = (self.expected, self.core.get_remote_static())
            && remote.as_slice() != expected
        {
            return Err(SessionError::WrongPeerKey);
        }
        Ok(())
    }

    /// The other side's hello, once received.
    pub fn remote_hello(&self) -> Option<&Hello> {
        self.remote_hello.as_ref()
    }

    /// The other side's X25519 static key, once received.
    pub fn remote_static(&self) -> Option<[u8; 32]> {
        self.core.get_remote_static().map(|k| {
            let mut out = [0; 32];
            out.copy_from_slice(k.as_slice());
            out
        })
    }

    /// Checks that the other side's static key belongs to the Ed25519 key `key`.
    pub fn remote_is(&self, key: &PublicKey) -> Result<(), SessionError> {
        let want = x25519_of(key).map_err(|_| SessionError::BadKey)?;
        match self.remote_static() {
            Some(have) if have == want => Ok(()),
            Some(_) => Err(SessionError::WrongPeerKey),
            None => Err(SessionError::OutOfOrder),
        }
    }

    /// Checks that the other side's hello carries a certificate from `manager`
    /// for its own id and for the key it proved in the handshake. Returns that key.
    pub fn verify_peer_cert(&self, manager: &PublicKey) -> Result<PublicKey, SessionError> {
        let hello = self.remote_hello.as_ref().ok_or(SessionError::OutOfOrder)?;
        let cert = hello.cert.as_ref().ok_or(SessionError::BadCertificate)?;
        if cert.id != hello.id || cert.verify(manager).is_err() {
            return Err(SessionError::BadCertificate);
        }
        self.remote_is(&cert.key)
            .map_err(|_| SessionError::BadCertificate)?;
        Ok(cert.key)
    }

    /// Turns the finished handshake into a transport.
    pub fn finish(self) -> Result<Transport, SessionError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if !self.core.is_finished() || self.remote_hello.is_none() {
            return Err(SessionError::OutOfOrder);
        }
        let initiator = self.initiator;
        let state = self
            .core
            .finalize()
            .map_err(|_| SessionError::BadHandshake)?;
        Ok(Transport::from_state(state, initiator))
    }
}

/// An established session: encrypts outgoing and decrypts incoming frames.
///
/// [`Transport::split`] gives independent halves for a reader and a writer task.
#[derive(Debug)]
pub struct Transport {
    seal: Sealer,
    open: Opener,
}

/// The sending half of a session: encrypts frames in order.
pub struct Sealer {
    state: CipherState<ChaChaPoly>,
}

/// The receiving half of a session: decrypts frames in order.
pub struct Opener {
    state: CipherState<ChaChaPoly>,
}

impl core::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sealer")
            .field("sent", &self.state.get_nonce())
            .finish()
    }
}

impl core::fmt::Debug for Opener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Opener")
            .field("received", &self.state.get_nonce())
            .finish()
    }
}

impl Sealer {
    /// Encrypts the first `len` bytes of `buf` in place; returns the ciphertext length (`len + TAG_LEN`).
    pub fn encrypt(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SessionError> {
        if len > MAX_FRAME - TAG_LEN || len > buf.len().saturating_sub(TAG_LEN) {
            return Err(SessionError::Size);
        }
        self.state
            .encrypt_with_ad_in_place(&[], buf, len)
            .map_err(|_| SessionError::Size)
    }
}

impl Opener {
    /// Decrypts the first `len` bytes of `buf` in place; returns the plaintext length.
    ///
    /// After an error the session is no longer usable: close it.
    pub fn decrypt(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SessionError> {
        if len > MAX_FRAME || len > buf.len() {
            return Err(SessionError::Size);
        }
        if len < TAG_LEN {
            return Err(SessionError::BadFrame);
        }
        self.state
            .decrypt_with_ad_in_place(&[], buf, len)
            .map_err(|_| SessionError::BadFrame)
    }
}

impl Transport {
    fn from_state(state: TransportState<ChaChaPoly, Sha256>, initiator: bool) -> Self {
        let states = state.take();
        let (send, recv) = if initiator {
            (states.initiator_to_responder, states.responder_to_initiator)
        } else {
            (states.responder_to_initiator, states.initiator_to_responder)
        };
        Transport {
            seal: Sealer { state: send },
            open: Opener { state: recv },
        }
    }

    /// Encrypts the first `len` bytes of `buf` in place; returns the ciphertext length (`len + TAG_LEN`).
    pub fn encrypt(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SessionError> {
        self.seal.encrypt(buf, len)
    }

    /// Decrypts the first `len` bytes of `buf` in place; returns the plaintext length.
    ///
    /// After an error the session is no longer usable: close it.
    pub fn decrypt(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SessionError> {
        self.open.decrypt(buf, len)
    }

    /// Splits into a sending and a receiving half.
    pub fn split(self) -> (Sealer, Opener) {
        (self.seal, self.open)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    struct Pair {
        manager: Identity,
        agent: Identity,
    }

    fn pair() -> Pair {
        Pair {
            manager: Identity::from_seed([1; 32]),
            agent: Identity::from_seed([2; 32]),
        }
    }

    /// Runs a whole handshake; returns both sides' transports.
    fn run(i: &mut Handshake, r: &mut Handshake) -> Result<(), SessionError> {
        let mut buf = [0u8; MAX_HANDSHAKE_MSG];
        let n = i.write_message(&mut buf)?;
        r.read_message(&buf[..n])?;
        let n = r.write_message(&mut buf)?;
        i.read_message(&buf[..n])?;
        let n = i.write_message(&mut buf)?;
        r.read_message(&buf[..n])?;
        Ok(())
    }

    fn sides(p: &Pair, expected: &PublicKey) -> (Handshake, Handshake) {
        let i = Handshake::initiator(
            &p.agent,
            [10; 32],
            expected,
            Hello::new(Role::Agent, id("edge-1"), crate::caps::ALL, None),
        )
        .unwrap();
        let r = Handshake::responder(
            &p.manager,
            [11; 32],
            Hello::new(Role::Manager, id("manager"), crate::caps::ALL, None),
        )
        .unwrap();
        (i, r)
    }

    #[test]
    fn handshake_then_frames_both_ways() {
        let p = pair();
        let (mut i, mut r) = sides(&p, &p.manager.public());
        run(&mut i, &mut r).unwrap();
        assert_eq!(r.remote_hello().unwrap().id, id("edge-1"));
        r.remote_is(&p.agent.public()).unwrap();
        let mut ti = i.finish().unwrap();
        let mut tr = r.finish().unwrap();
        let mut buf = [0u8; 64];
        buf[..5].copy_from_slice(b"hello");
        let n = ti.encrypt(&mut buf, 5).unwrap();
        let m = tr.decrypt(&mut buf, n).unwrap();
        assert_eq!(&buf[..m], b"hello");
        buf[..3].copy_from_slice(b"ack");
        let n = tr.encrypt(&mut buf, 3).unwrap();
        assert_eq!(ti.decrypt(&mut buf, n).unwrap(), 3);
    }

    #[test]
    fn wrong_responder_key_is_refused() {
        let p = pair();
        let impostor = Identity::from_seed([9; 32]);
        let (mut i, mut r) = sides(&p, &impostor.public());
        assert_eq!(run(&mut i, &mut r), Err(SessionError::WrongPeerKey));
    }

    #[test]
    fn tampered_replayed_and_forged_frames_are_refused() {
        let p = pair();
        let (mut i, mut r) = sides(&p, &p.manager.public());
        run(&mut i, &mut r).unwrap();
        let (mut ti, mut tr) = (i.finish().unwrap(), r.finish().unwrap());
        let mut frame = [0u8; 64];
        frame[..4].copy_from_slice(b"data");
        let n = ti.encrypt(&mut frame, 4).unwrap();
        let original = frame;
        // Tampered.
        let mut bad = original;
        bad[1] ^= 0x40;
        assert_eq!(tr.decrypt(&mut bad, n), Err(SessionError::BadFrame));
        // The genuine frame still decrypts (the nonce did not move).
        let mut good = original;
        tr.decrypt(&mut good, n).unwrap();
        // Replayed.
        let mut replay = original;
        assert_eq!(tr.decrypt(&mut replay, n), Err(SessionError::BadFrame));
        // Forged by a stranger with its own session.
        let mut short = [0u8; 8];
        assert_eq!(tr.decrypt(&mut short, 8), Err(SessionError::BadFrame));
    }

    #[test]
    fn replayed_handshake_message_is_refused() {
        let p = pair();
        let (mut i, mut r) = sides(&p, &p.manager.public());
        let mut m1 = [0u8; MAX_HANDSHAKE_MSG];
        let n1 = i.write_message(&mut m1).unwrap();
        r.read_message(&m1[..n1]).unwrap();
        let mut m2 = [0u8; MAX_HANDSHAKE_MSG];
        let n2 = r.write_message(&mut m2).unwrap();
        i.read_message(&m2[..n2]).unwrap();
        let mut m3 = [0u8; MAX_HANDSHAKE_MSG];
        let n3 = i.write_message(&mut m3).unwrap();
        r.read_message(&m3[..n3]).unwrap();
        // A recorded message 3 replayed into a fresh responder session fails:
        // the fresh responder's ephemeral key differs.
        let (_, mut r2) = sides(&p, &p.manager.public());
        let mut i2 = Handshake::initiator(
            &p.agent,
            [12; 32],
            &p.manager.public(),
            Hello::new(Role::Agent, id("edge-1"), 0, None),
        )
        .unwrap();
        let mut buf = [0u8; MAX_HANDSHAKE_MSG];
        let n = i2.write_message(&mut buf).unwrap();
        r2.read_message(&buf[..n]).unwrap();
        let _ = r2.write_message(&mut buf).unwrap();
        assert_eq!(r2.read_message(&m3[..n3]), Err(SessionError::BadHandshake));
    }

    #[test]
    fn peer_certificate_is_checked() {
        let manager = Identity::from_seed([1; 32]);
        let a = Identity::from_seed([2; 32]);
        let b = Identity::from_seed([3; 32]);
        let cert_a = AgentCert::issue(&manager, id("a"), a.public());
        let run_with = |cert: Option<AgentCert>, hello_id: &str| {
            let mut i = Handshake::initiator(
                &a,
                [20; 32],
                &b.public(),
                Hello::new(Role::Agent, id(hello_id), 0, cert),
            )
            .unwrap();
            let mut r =
                Handshake::responder(&b, [21; 32], Hello::new(Role::Agent, id("b"), 0, None))
                    .unwrap();
            run(&mut i, &mut r).unwrap();
            r.verify_peer_cert(&manager.public())
        };
        assert_eq!(run_with(Some(cert_a.clone()), "a"), Ok(a.public()));
        assert_eq!(run_with(None, "a"), Err(SessionError::BadCertificate));
        assert_eq!(
            run_with(Some(cert_a.clone()), "c"),
            Err(SessionError::BadCertificate)
        );
        // A certificate for another agent's key does not fit this session.
        let cert_b = AgentCert::issue(&manager, id("a"), b.public());
        assert_eq!(
            run_with(Some(cert_b), "a"),
            Err(SessionError::BadCertificate)
        );
    }
}
