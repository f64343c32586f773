//! Ephemeral keys for Noise handshakes, from a weak but documented entropy source.
//!
//! The mps2-an385 has no hardware RNG. Each ephemeral key is
//! `SHA-256("baton ephemeral v1" ‖ identity seed ‖ boot counter ‖ key counter ‖
//! timing pool ‖ tick count ‖ SysTick value)`:
//!
//! - the **identity seed** is secret, so an observer who does not hold it cannot
//!   predict ephemeral keys;
//! - the **boot counter** (kept in flash, incremented at every boot) and the
//!   per-boot key counter make every key distinct as long as the flash counter
//!   is never rolled back;
//! - the **timing pool** mixes the SysTick down-counter at every Ethernet
//!   interrupt; in QEMU it follows host scheduling, on hardware it follows
//!   packet arrival jitter.
//!
//! Weakness: the key is a deterministic function of the seed and of values an
//! attacker may guess (counter, timings). Someone who learns the identity seed
//! can recompute ephemeral keys and so decrypt recorded sessions: there is no
//! forward secrecy against seed compromise, and a flash image restored to an
//! older boot counter may repeat keys if the timings repeat. A board with a
//! TRNG should feed it into [`Entropy::ephemeral`] instead.

use core::cell::Cell;

use critical_section::Mutex;
use sha2::{Digest as _, Sha256};

/// Timing samples mixed at interrupts (a cheap rotate-xor accumulator).
static POOL: Mutex<Cell<[u32; 4]>> = Mutex::new(Cell::new([0; 4]));

/// Mixes the current SysTick value into the pool; called from interrupt handlers.
pub fn stir() {
    let v = crate::board::cycle_count();
    critical_section::with(|cs| {
        let cell = POOL.borrow(cs);
        let mut p = cell.get();
        let i = (p[0] as usize) & 3;
        p[i] = p[i].rotate_left(7) ^ v.wrapping_mul(0x9E37_79B9);
        p[0] = p[0].wrapping_add(1);
        cell.set(p);
    });
}

/// Source of ephemeral secrets for this boot.
pub struct Entropy {
    seed: [u8; 32],
    boot: u32,
    count: u32,
}

impl Entropy {
    /// An entropy source for the device with identity `seed` in boot number `boot`.
    pub fn new(seed: [u8; 32], boot: u32) -> Self {
        Entropy {
            seed,
            boot,
            count: 0,
        }
    }

    /// 32 fresh bytes for one handshake's ephemeral key (see the module docs).
    pub fn ephemeral(&mut self) -> [u8; 32] {
        self.count = self.count.wrapping_add(1);
        let pool = critical_section::with(|cs| POOL.borrow(cs).get());
        let mut h = Sha256::new();
        h.update(b"baton ephemeral v1");
        h.update(self.seed);
        h.update(self.boot.to_le_bytes());
        h.update(self.count.to_le_bytes());
        for w in pool {
            h.update(w.to_le_bytes());
        }
        h.update(embassy_time::Instant::now().as_ticks().to_le_bytes());
        h.update(crate::board::cycle_count().to_le_bytes());
        h.finalize().into()
    }
}
