//! `StreamReader` over arbitrary input cut at arbitrary points, compared with
//! a one-pass reference parser of the length-prefixed framing.
//!
//! Input: two bytes of reader capacity, one byte N, N bytes of piece lengths,
//! then the stream.

#![no_main]

use baton_protocol::MAX_FRAME;
use baton_protocol::frame::{FrameError, StreamReader};
use libfuzzer_sys::fuzz_target;

/// Frames the stream holds for a `cap`-byte reader, and the error that stops it.
fn reference(stream: &[u8], cap: usize) -> (Vec<&[u8]>, Option<FrameError>) {
    let max = cap.min(MAX_FRAME);
    let (mut frames, mut at) = (Vec::new(), 0);
    while at + 2 <= stream.len() {
        let len = u16::from_be_bytes([stream[at], stream[at + 1]]) as usize;
        if len == 0 {
            return (frames, Some(FrameError::Empty));
        }
        if len > max {
            return (frames, Some(FrameError::TooLarge { len, max }));
        }
        if at + 2 + len > stream.len() {
            break;
        }
        frames.push(&stream[at + 2..at + 2 + len]);
        at += 2 + len;
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let cap = u16::from_le_bytes([data[0], data[1]]) as usize % 5000;
    let n = (data[2] as usize).min(data.len() - 3);
    let (sizes, stream) = data[3..].split_at(n);

    let mut buf = vec![0u8; cap];
    let mut reader = StreamReader::new(&mut buf);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut error = None;
    let mut rest = stream;
    let mut piece = 0;
    'feed: while !rest.is_empty() {
        let size = sizes
            .get(piece % sizes.len().max(1))
            .map_or(rest.len(), |&s| s as usize + 1);
        piece += 1;
        let (mut chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        // Each push consumes at least one byte or completes a frame.
        let mut rounds = 0;
        while !chunk.is_empty() {
            rounds += 1;
            assert!(rounds <= 2 * size + 2, "reader stalled");
            match reader.push(chunk) {
                Ok((used, done)) => {
                    assert!(used <= chunk.len());
                    match done {
                        Some(len) => {
                            assert!((1..=cap).contains(&len), "frame of {len} bytes, cap {cap}");
                            frames.push(reader.frame()[..len].to_vec());
                        }
                        None => assert_eq!(used, chunk.len(), "partial frame left input"),
                    }
                    chunk = &chunk[used..];
                }
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    let (want, want_error) = reference(stream, cap);
    assert_eq!(error, want_error);
    assert_eq!(frames.len(), want.len());
    for (got, want) in frames.iter().zip(want) {
        assert_eq!(got.as_slice(), want);
    }
});
