//! Defects found in `baton-protocol` while writing its tests, each pinned by a
//! test of the behaviour we want.
//!
//! Each test failed against the code it was written for and now guards the
//! fix it names.

use baton_protocol::frame::{self, FrameError, StreamReader};
use baton_protocol::identity::Identity;
use baton_protocol::session::{Handshake, Hello, MAX_HANDSHAKE_MSG, Role, SessionError};
use baton_protocol::{AgentId, Manifest};

fn hello(role: Role, id: &str) -> Hello {
    Hello::new(role, AgentId::try_from(id).unwrap(), 0, None)
}

/// After refusing a header, `StreamReader::push` reports a zero-length frame
/// on every later call (`Ok((0, Some(0)))`, consuming nothing): a driver that
/// logs the error and keeps reading spins forever on empty frames, which the
/// framing says cannot exist.
///
/// Fix: make the error sticky (remember it and return it from every later
/// `push`), or reset `have_header` to 0 before returning the error.
#[test]
fn stream_reader_never_yields_an_empty_frame_after_an_error() {
    let mut buf = [0u8; 8];
    let mut reader = StreamReader::new(&mut buf);
    assert_eq!(
        reader.push(&[0, 9]),
        Err(FrameError::TooLarge { len: 9, max: 8 })
    );
    let mut wire = frame::header(1).unwrap().to_vec();
    wire.push(b'x');
    let after = reader.push(&wire);
    assert!(
        !matches!(after, Ok((_, Some(0)))),
        "reader produced an empty frame: {after:?}"
    );
}

/// `Manifest::chunks` divides by `chunk_size`: on a manifest decoded from the
/// wire and not yet checked, a zero chunk size panics (and a tiny one
/// truncates the count to `u32`). Callers must remember to run
/// `check_limits` first; nothing enforces it.
///
/// Fix: `self.length.checked_div(self.chunk_size as u64).map_or(0, …)` with
/// the rounding kept, saturating to `u32::MAX`, and a doc line saying the
/// value is meaningful only after `check_limits`.
#[test]
fn chunks_of_an_unchecked_manifest_does_not_panic() {
    let mut m = Manifest::sign(
        &Identity::from_seed([4; 32]),
        heapless::String::try_from("fw").unwrap(),
        1,
        0,
        10_000,
        4096,
        [0; 32],
    );
    m.chunk_size = 0;
    assert!(m.check_limits(None).is_err());
    let chunks = std::panic::catch_unwind(|| m.chunks());
    assert!(chunks.is_ok(), "Manifest::chunks panicked on chunk_size 0");
}

/// `Sealer::encrypt` (and `Transport::encrypt`) computes `len + TAG_LEN`
/// unchecked: a length near `usize::MAX` overflows (a panic in debug builds;
/// in release the sum wraps, passes the size check and the cipher then
/// slices out of bounds).
///
/// Fix: `if len > MAX_FRAME - TAG_LEN || len > buf.len().saturating_sub(TAG_LEN)`.
#[test]
fn encrypt_refuses_a_huge_length_without_panicking() {
    let (mut t, _) = established();
    let mut buf = [0u8; 64];
    let result = std::panic::catch_unwind(move || t.encrypt(&mut buf, usize::MAX));
    assert!(
        matches!(result, Ok(Err(SessionError::Size))),
        "encrypt(usize::MAX) should be refused with Size"
    );
}

/// After `read_message` refuses message 2 with `WrongPeerKey`, the initiator
/// can still write message 3 and `finish()` into a working transport with the
/// impostor: only a caller that honours the error is safe. The same holds
/// for a responder after `BadHello` on message 1. Noise itself (clatter)
/// poisons its state after an error; `Handshake` should too.
///
/// Fix: a `failed: bool` set on every error of `read_message`/`write_message`,
/// checked first in `write_message`, `read_message` and `finish` (returning
/// the error kind `OutOfOrder` or a new `Failed`).
#[test]
fn a_refused_handshake_cannot_be_finished() {
    let agent = Identity::from_seed([2; 32]);
    let manager = Identity::from_seed([1; 32]);
    let impostor = Identity::from_seed([9; 32]);
    let mut i = Handshake::initiator(
        &agent,
        [10; 32],
        &manager.public(),
        hello(Role::Agent, "edge-1"),
    )
    .unwrap();
    let mut r = Handshake::responder(&impostor, [11; 32], hello(Role::Manager, "mgr")).unwrap();
    let mut buf = [0u8; MAX_HANDSHAKE_MSG];
    let n = i.write_message(&mut buf).unwrap();
    r.read_message(&buf[..n]).unwrap();
    let n = r.write_message(&mut buf).unwrap();
    assert_eq!(i.read_message(&buf[..n]), Err(SessionError::WrongPeerKey));
    // The caller ignores the error and carries on.
    let n = i.write_message(&mut buf).unwrap_or(0);
    let _ = r.read_message(&buf[..n]);
    assert!(
        i.finish().is_err(),
        "a handshake refused for the wrong key gave a transport"
    );
}

fn established() -> (
    baton_protocol::session::Transport,
    baton_protocol::session::Transport,
) {
    let agent = Identity::from_seed([2; 32]);
    let manager = Identity::from_seed([1; 32]);
    let mut i = Handshake::initiator(
        &agent,
        [10; 32],
        &manager.public(),
        hello(Role::Agent, "edge-1"),
    )
    .unwrap();
    let mut r = Handshake::responder(&manager, [11; 32], hello(Role::Manager, "mgr")).unwrap();
    let mut buf = [0u8; MAX_HANDSHAKE_MSG];
    let n = i.write_message(&mut buf).unwrap();
    r.read_message(&buf[..n]).unwrap();
    let n = r.write_message(&mut buf).unwrap();
    i.read_message(&buf[..n]).unwrap();
    let n = i.write_message(&mut buf).unwrap();
    r.read_message(&buf[..n]).unwrap();
    (i.finish().unwrap(), r.finish().unwrap())
}
