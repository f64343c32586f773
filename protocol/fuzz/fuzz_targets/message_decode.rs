//! `Message::decode` on arbitrary bytes: never panics, and whatever decodes
//! survives a re-encoding.
//!
//! postcard accepts non-minimal varints (`80 00` for 0), so the re-encoding
//! may be shorter than the input; the canonical encoding is a fixed point.

#![no_main]

use baton_protocol::Message;
use baton_protocol::message::CodecError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let msg = match Message::decode(data) {
        Ok(msg) => msg,
        Err(CodecError::Malformed | CodecError::TrailingBytes) => return,
        Err(e) => panic!("decode gave {e:?}"),
    };
    let _ = msg.kind();
    let again = msg.to_vec();
    assert!(again.len() <= data.len(), "canonical form is never longer");
    let back = Message::decode(&again).expect("a re-encoded message decodes");
    assert_eq!(back, msg);
    assert_eq!(back.to_vec(), again, "canonical encoding is a fixed point");
    // encode into an exact buffer agrees with to_vec; one byte less is refused.
    let mut buf = vec![0u8; again.len()];
    assert_eq!(msg.encode(&mut buf).map(|b| b.to_vec()), Ok(again.clone()));
    assert_eq!(
        msg.encode(&mut buf[..again.len() - 1]).map(|b| b.len()),
        Err(CodecError::BufferFull)
    );
});
