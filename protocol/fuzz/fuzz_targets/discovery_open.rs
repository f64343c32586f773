//! `discovery::open` on arbitrary bytes and on altered genuine datagrams.
//!
//! Input byte 0 picks the mode:
//! - even: the rest is a datagram as received: opening never panics, and a
//!   datagram that opens carries a certificate of the pinned manager whose
//!   key signed it (only agent seed `[2; 32]` is certified by the fuzzer's
//!   seeds, so in practice nothing forged opens);
//! - odd: the rest is `seq` (8 bytes), then an `Announcement` (postcard);
//!   it is sealed by a certified agent, then every following 2-byte pair
//!   `(offset, xor)` alters the datagram. It must open to exactly what was
//!   sealed when nothing changed, and be refused when anything did.

#![no_main]

use baton_protocol::discovery::{self, Announcement, MAX_DATAGRAM};
use baton_protocol::identity::{AgentCert, Identity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let manager = Identity::from_seed([1; 32]);
    if mode & 1 == 0 {
        if let Ok(dg) = discovery::open(rest, &manager.public()) {
            dg.sender
                .verify(&manager.public())
                .expect("an opened datagram's certificate verifies");
            assert!(rest.len() <= MAX_DATAGRAM);
        }
        return;
    }
    if rest.len() < 8 {
        return;
    }
    let seq = u64::from_le_bytes(rest[..8].try_into().unwrap());
    let Ok((body, edits)) = postcard::take_from_bytes::<Announcement>(&rest[8..]) else {
        return;
    };
    let agent = Identity::from_seed([2; 32]);
    let cert = AgentCert::issue(
        &manager,
        baton_protocol::AgentId::try_from("edge-1").unwrap(),
        agent.public(),
    );
    let mut buf = [0u8; MAX_DATAGRAM];
    let Ok(n) = discovery::seal(&agent, &cert, seq, seq / 3, &body, &mut buf) else {
        return;
    };
    let original = buf[..n].to_vec();
    let mut changed = false;
    for pair in edits.chunks_exact(2) {
        let at = pair[0] as usize * n / 256;
        buf[at] ^= pair[1];
        changed |= pair[1] != 0;
    }
    changed = changed && buf[..n] != original[..];
    match discovery::open(&buf[..n], &manager.public()) {
        Ok(dg) => {
            assert!(!changed, "an altered datagram opened");
            assert_eq!(dg.sender, cert);
            assert_eq!(dg.seq, seq);
            assert_eq!(dg.body, body);
        }
        Err(e) => assert!(changed, "a genuine datagram was refused: {e}"),
    }
});
