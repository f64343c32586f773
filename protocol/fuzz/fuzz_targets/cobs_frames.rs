//! `CobsReader` over arbitrary bytes: never panics, reports one result per
//! non-empty delimited segment, and resynchronises afterwards.
//!
//! Input: two bytes of reader capacity, then the line.

#![no_main]

use baton_protocol::frame::{CobsReader, FrameError, cobs_encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cap = u16::from_le_bytes([data[0], data[1]]) as usize % 3000;
    let line = &data[2..];
    let mut buf = vec![0u8; cap];
    let mut reader = CobsReader::new(&mut buf);

    let mut segments = line.split(|&b| b == 0).filter(|s| !s.is_empty());
    let complete = line.iter().rposition(|&b| b == 0).map_or(0, |end| end + 1);
    let mut results = 0;
    for (k, &b) in line.iter().enumerate() {
        let Some(result) = reader.push(b) else {
            continue;
        };
        assert_eq!(b, 0, "a result only at a delimiter");
        assert!(k < complete);
        results += 1;
        let segment = segments.next().expect("one result per non-empty segment");
        match result {
            Ok(n) => {
                assert!(segment.len() <= cap);
                assert!(
                    n >= 1 && n <= segment.len(),
                    "decoded {n} from {}",
                    segment.len()
                );
                // The decoded frame encodes and decodes back to itself.
                let frame = reader.frame()[..n].to_vec();
                let mut enc = vec![0u8; n + n / 254 + 2];
                let m = cobs_encode(&frame, &mut enc).expect("room for the encoding");
                let mut again = vec![0u8; m];
                let mut check = CobsReader::new(&mut again);
                let out: Vec<_> = enc[..m].iter().filter_map(|&b| check.push(b)).collect();
                assert_eq!(out, vec![Ok(n)]);
                assert_eq!(&check.frame()[..n], &frame[..]);
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (segment.len(), cap));
            }
            Err(FrameError::BadEncoding | FrameError::Empty) => assert!(segment.len() <= cap),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // Every complete non-empty segment gave exactly one result.
    let whole = line[..complete]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .count();
    assert_eq!(results, whole);

    // A clean frame after a delimiter always gets through.
    if cap >= 4 {
        let mut enc = [0u8; 8];
        let m = cobs_encode(b"ok!", &mut enc).unwrap();
        let out: Vec<_> = core::iter::once(&0u8)
            .chain(&enc[..m])
            .filter_map(|&b| reader.push(b))
            .collect();
        assert_eq!(out.last(), Some(&Ok(3)));
        assert_eq!(&reader.frame()[..3], b"ok!");
    }
});
