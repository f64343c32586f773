//! A resumable COBS encoder that needs no output buffer.
//!
//! The serial link frames each encrypted message with COBS and a `0x00`
//! delimiter (SPEC §1, `baton_protocol::frame::cobs_encode`). On the device the
//! sealed frame already sits in the one frame buffer, and the UART takes one
//! byte at a time, so [`CobsWriter`] produces the encoding byte by byte from
//! that buffer and can stop and resume whenever the transmitter is full: no
//! second copy of the frame. The output is byte for byte what
//! `baton_protocol::frame::cobs_encode` writes (the host tool's tests check it
//! against that encoder and decode it with `CobsReader`). This file depends only on `core`
//! (it is shared with the host tool through `#[path]`).

/// Where the encoder stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Next comes a block's code byte.
    Code,
    /// Next come the block's data bytes (`left` of them).
    Data,
    /// Everything, the delimiter included, was produced.
    Done,
}

/// Encodes one frame as COBS followed by the `0x00` delimiter, one byte per call.
#[derive(Clone, Copy, Debug)]
pub struct CobsWriter {
    phase: Phase,
    /// Next index into the frame (the frame is followed by an implicit zero).
    pos: usize,
    /// Data bytes left in the current block.
    left: usize,
    /// The current block ends at a (real or implicit) zero, which is skipped.
    ends_at_zero: bool,
}

impl Default for CobsWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CobsWriter {
    /// An encoder at the start of a frame.
    pub const fn new() -> Self {
        CobsWriter {
            phase: Phase::Code,
            pos: 0,
            left: 0,
            ends_at_zero: false,
        }
    }

    /// The next byte of the encoding of `frame` (pass the same frame every
    /// time), ending with the `0x00` delimiter; `None` once all is out.
    pub fn next_byte(&mut self, frame: &[u8]) -> Option<u8> {
        // Two rounds at most: the end of one block and the code of the next.
        for _ in 0..2 {
            match self.phase {
                Phase::Done => return None,
                Phase::Code => {
                    let mut n = 0;
                    while n < 254 && self.pos + n < frame.len() && frame[self.pos + n] != 0 {
                        n += 1;
                    }
                    self.left = n;
                    self.ends_at_zero = n < 254;
                    self.phase = Phase::Data;
                    return Some(n as u8 + 1);
                }
                Phase::Data if self.left > 0 => {
                    let b = frame[self.pos];
                    self.pos += 1;
                    self.left -= 1;
                    return Some(b);
                }
                Phase::Data => {
                    if self.ends_at_zero {
                        self.pos += 1;
                    }
                    // Past the implicit zero after the frame, or a full block
                    // ended exactly at the frame's end: the delimiter.
                    if self.pos > frame.len() || (!self.ends_at_zero && self.pos == frame.len()) {
                        self.phase = Phase::Done;
                        return Some(0);
                    }
                    self.phase = Phase::Code;
                }
            }
        }
        None
    }
}
