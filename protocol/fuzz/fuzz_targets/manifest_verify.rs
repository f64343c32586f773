//! A `Manifest` decoded from arbitrary bytes: signature and limit checks never
//! panic, a manifest that passes them has consistent chunk arithmetic, and a
//! signature verifies only if it is exactly the publisher's (no malleability).
//!
//! Input: eight bytes of "now" (Unix seconds), then the manifest.

#![no_main]

use baton_protocol::identity::Identity;
use baton_protocol::manifest::ManifestError;
use baton_protocol::{MAX_CHUNK_SIZE, MAX_CONTENT_LEN, MIN_CHUNK_SIZE, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let now = u64::from_le_bytes(data[..8].try_into().unwrap());
    let Ok((m, _)) = postcard::take_from_bytes::<Manifest>(&data[8..]) else {
        return;
    };
    let publisher = Identity::from_seed([4; 32]);
    let stranger = Identity::from_seed([5; 32]);

    match m.verify_signature(&publisher.public()) {
        Ok(()) => {
            // Ed25519 is deterministic: the only valid signature is the publisher's own.
            let resigned = Manifest::sign(
                &publisher,
                m.name.clone(),
                m.version,
                m.expires,
                m.length,
                m.chunk_size,
                m.root,
            );
            assert_eq!(resigned, m, "a different signature verified");
        }
        Err(ManifestError::UntrustedSigner | ManifestError::BadSignature) => {}
        Err(e) => panic!("verify_signature gave {e:?}"),
    }
    assert!(m.verify_signature(&stranger.public()).is_err());

    // Signing any decodable fields works and verifies (the signed bytes fit their buffer).
    let signed = Manifest::sign(
        &publisher,
        m.name.clone(),
        m.version,
        m.expires,
        m.length,
        m.chunk_size,
        m.root,
    );
    signed
        .verify_signature(&publisher.public())
        .expect("fresh signature verifies");
    let bytes = postcard::to_allocvec(&signed).unwrap();
    assert_eq!(postcard::from_bytes::<Manifest>(&bytes).unwrap(), signed);

    match m.check_limits(Some(now)) {
        Ok(()) => {
            assert!((1..=MAX_CONTENT_LEN).contains(&m.length));
            assert!((MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&m.chunk_size));
            assert!(m.expires == 0 || now < m.expires);
            let chunks = m.chunks();
            assert!(chunks >= 1);
            let last = chunks - 1;
            assert!((1..=m.chunk_size).contains(&m.chunk_len(last)));
            assert_eq!(m.chunk_len(0), m.chunk_size.min(m.length as u32));
            assert_eq!(m.chunk_len(chunks), 0);
            assert_eq!(m.chunk_offset(last) + m.chunk_len(last) as u64, m.length);
        }
        Err(ManifestError::BadLength | ManifestError::BadChunkSize | ManifestError::Expired) => {}
        Err(e) => panic!("check_limits gave {e:?}"),
    }
    assert!(m.check_limits(None).is_ok() || m.check_limits(Some(now)).is_err());
});
