//! Framing: how session messages are delimited on a byte stream or a serial line.
//!
//! - **Streams (TCP):** each frame is a 2-byte big-endian length followed by that
//!   many bytes. Zero is invalid; the largest is [`MAX_FRAME`]. A reader checks the
//!   length against its own buffer before reading the body.
//! - **Serial:** each frame is COBS-encoded and ends with a `0x00` byte. A
//!   corrupt or oversized frame is dropped and the reader resynchronises at the
//!   next `0x00`.
//!
//! The frames carry Noise handshake messages and, after the handshake,
//! encrypted [`crate::Message`]s.

use crate::MAX_FRAME;

/// Bytes of the stream frame header.
pub const HEADER_LEN: usize = 2;

/// Why a frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum FrameError {
    /// A zero-length frame.
    Empty,
    /// Longer than the reader's limit.
    TooLarge {
        /// The length announced or accumulated.
        len: usize,
        /// The reader's limit.
        max: usize,
    },
    /// Not valid COBS.
    BadEncoding,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::Empty => f.write_str("empty frame"),
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
            FrameError::BadEncoding => f.write_str("frame is not valid COBS"),
        }
    }
}

impl core::error::Error for FrameError {}

/// The stream header for a frame of `len` bytes.
pub fn header(len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok((len as u16).to_be_bytes())
}

/// The body length a stream header announces, checked against `max` (at most [`MAX_FRAME`]).
pub fn parse_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u16::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let max = max.min(MAX_FRAME);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Incremental stream-frame reader over a caller-provided buffer (for drivers without `std` IO).
#[derive(Debug)]
pub struct StreamReader<'b> {
    buf: &'b mut [u8],
    /// Set once the stream was refused: every later push repeats the error.
    failed: Option<FrameError>,
    header: [u8; HEADER_LEN],
    have_header: usize,
    want: usize,
    have: usize,
}

impl<'b> StreamReader<'b> {
    /// A reader whose frames may be as large as `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        StreamReader {
            buf,
            failed: None,
            header: [0; HEADER_LEN],
            have_header: 0,
            want: 0,
            have: 0,
        }
    }

    /// Feeds bytes; returns how many were consumed and, when a frame completed, its length.
    ///
    /// The frame is then in [`StreamReader::frame`] until the next call. An error
    /// means the stream can no longer be trusted: close the connection.
    pub fn push(&mut self, mut input: &[u8]) -> Result<(usize, Option<usize>), FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let start = input.len();
        if self.want != 0 && self.have == self.want {
            // The previous frame was handed out; start a new one.
            self.want = 0;
            self.have = 0;
            self.have_header = 0;
        }
        while self.have_header < HEADER_LEN {
            let Some((&b, rest)) = input.split_first() else {
                return Ok((start, None));
            };
            self.header[self.have_header] = b;
            self.have_header += 1;
            input = rest;
            if self.have_header == HEADER_LEN {
                self.want = parse_header(self.header, self.buf.len()).inspect_err(|e| {
                    self.failed = Some(*e);
                })?;
            }
        }
        let take = (self.want - self.have).min(input.len());
        self.buf[self.have..self.have + take].copy_from_slice(&input[..take]);
        self.have += take;
        let consumed = start - (input.len() - take);
        if self.have == self.want {
            Ok((consumed, Some(self.want)))
        } else {
            Ok((consumed, None))
        }
    }

    /// The buffer holding the last completed frame at its start.
    pub fn frame(&mut self) -> &mut [u8] {
        self.buf
    }
}

/// COBS-encodes `frame` into `out` followed by the `0x00` delimiter; returns the bytes written.
pub fn cobs_encode(frame: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    if frame.is_empty() {
        return Err(FrameError::Empty);
    }
    let need = cobs::max_encoding_length(frame.len()) + 1;
    if out.len() < need {
        return Err(FrameError::TooLarge {
            len: need,
            max: out.len(),
        });
    }
    let n = cobs::encode(frame, out);
    out[n] = 0;
    Ok(n + 1)
}

/// Incremental COBS reader over a caller-provided buffer; resynchronises after bad frames.
#[derive(Debug)]
pub struct CobsReader<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
}

impl<'b> CobsReader<'b> {
    /// A reader whose encoded frames may be as large as `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        CobsReader {
            buf,
            len: 0,
            overflow: false,
        }
    }

    /// Feeds one byte. At a delimiter, returns the decoded frame's length (the frame
    /// is then at the start of [`CobsReader::frame`]) or why it was dropped.
    pub fn push(&mut self, byte: u8) -> Option<Result<usize, FrameError>> {
        if byte != 0 {
            if self.len < self.buf.len() {
                self.buf[self.len] = byte;
                self.len += 1;
            } else {
                self.overflow = true;
                self.len += 1;
            }
            return None;
        }
        let (len, overflow) = (self.len, self.overflow);
        self.len = 0;
        self.overflow = false;
        if overflow {
            return Some(Err(FrameError::TooLarge {
                len,
                max: self.buf.len(),
            }));
        }
        if len == 0 {
            // Back-to-back delimiters: an idle line, not a frame.
            return None;
        }
        Some(match cobs::decode_in_place(&mut self.buf[..len]) {
            Ok(0) => Err(FrameError::Empty),
            Ok(n) => Ok(n),
            Err(_) => Err(FrameError::BadEncoding),
        })
    }

    /// The buffer holding the last decoded frame at its start.
    pub fn frame(&self) -> &[u8] {
        self.buf
    }

    /// Mutable access to the last decoded frame (for in-place decryption).
    pub fn frame_mut(&mut self) -> &mut [u8] {
        self.buf
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn stream_reader_splits_frames_across_pushes() {
        let mut wire = [0u8; 32];
        wire[..2].copy_from_slice(&header(3).unwrap());
        wire[2..5].copy_from_slice(b"abc");
        wire[5..7].copy_from_slice(&header(2).unwrap());
        wire[7..9].copy_from_slice(b"de");
        let mut buf = [0u8; 8];
        let mut r = StreamReader::new(&mut buf);
        let mut frames: heapless::Vec<heapless::Vec<u8, 8>, 4> = heapless::Vec::new();
        // One byte at a time.
        for b in &wire[..9] {
            let (used, done) = r.push(core::slice::from_ref(b)).unwrap();
            assert_eq!(used, 1);
            if let Some(n) = done {
                frames
                    .push(heapless::Vec::from_slice(&r.frame()[..n]).unwrap())
                    .unwrap();
            }
        }
        assert_eq!(frames[0].as_slice(), b"abc");
        assert_eq!(frames[1].as_slice(), b"de");
    }

    #[test]
    fn oversized_and_empty_headers_are_refused_before_reading() {
        let mut buf = [0u8; 8];
        let mut r = StreamReader::new(&mut buf);
        assert_eq!(
            r.push(&[0, 9]),
            Err(FrameError::TooLarge { len: 9, max: 8 })
        );
        assert_eq!(parse_header([0, 0], 100), Err(FrameError::Empty));
        assert_eq!(
            header(MAX_FRAME + 1),
            Err(FrameError::TooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
    }

    #[test]
    fn cobs_round_trip_and_resync() {
        let mut enc = [0u8; 32];
        let n = cobs_encode(&[1, 0, 2, 0, 0, 3], &mut enc).unwrap();
        assert!(!enc[..n - 1].contains(&0));
        let mut buf = [0u8; 16];
        let mut r = CobsReader::new(&mut buf);
        // Garbage first, then a good frame.
        let mut results: heapless::Vec<Result<usize, FrameError>, 4> = heapless::Vec::new();
        for &b in [0x05u8, 0x01, 0x00].iter().chain(&enc[..n]) {
            if let Some(res) = r.push(b) {
                results.push(res).unwrap();
            }
        }
        assert_eq!(results[0], Err(FrameError::BadEncoding));
        assert_eq!(results[1], Ok(6));
        assert_eq!(&r.frame()[..6], &[1, 0, 2, 0, 0, 3]);
    }

    #[test]
    fn cobs_overflow_is_dropped_and_reader_recovers() {
        let mut buf = [0u8; 4];
        let mut r = CobsReader::new(&mut buf);
        for _ in 0..10 {
            assert!(r.push(7).is_none());
        }
        assert!(matches!(r.push(0), Some(Err(FrameError::TooLarge { .. }))));
        let mut enc = [0u8; 8];
        let n = cobs_encode(&[4, 5], &mut enc).unwrap();
        let mut last = None;
        for &b in &enc[..n] {
            last = r.push(b).or(last);
        }
        assert_eq!(last, Some(Ok(2)));
    }
}
