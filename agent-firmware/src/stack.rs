//! Stack depth per task, measured by painting.
//!
//! cortex-m-rt's `paint-stack` fills the stack region with [`PAINT`] at reset. Boot, the
//! network task and the node task all run on that one stack (embassy's tasks keep their
//! state in static memory and are polled one after another from `main`), so the deepest
//! point each reaches is found by scanning for the lowest overwritten word after it ran
//! ([`measure`]) and painting what it used again before the next one runs. Each task's
//! future is wrapped in [`Measured`], which does that after every poll; boot is measured
//! once, before the executor starts. Interrupt handlers run on the same stack and count
//! towards the task they interrupted (or the next one measured, when they hit the idle loop).
//!
//! Cost: one scan from the bottom of the stack up to the deepest word used (at most the
//! region, 5 K words) and repainting what the poll used, per poll.

use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicU32, Ordering};
use core::task::{Context, Poll};

use crate::board::{stack_bottom, stack_top};

/// The value cortex-m-rt paints the stack with at reset (its `paint-stack` feature).
pub const PAINT: u32 = 0xCCCC_CCCC;

/// What a stack measurement belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `main` up to starting the executor.
    Boot = 0,
    /// embassy-net's runner (the LAN9118 driver and smoltcp).
    Net = 1,
    /// The node: the agent, sessions, handshakes, flash.
    Node = 2,
}

static PEAKS: [AtomicU32; 3] = [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)];

/// The lowest stack address written since it was last painted.
fn lowest_used() -> u32 {
    let mut p = stack_bottom();
    let top = stack_top();
    while p < top {
        // SAFETY: `p` is word-aligned and inside the stack region above its guard, which is
        // mapped and readable.
        if unsafe { (p as *const u32).read_volatile() } != PAINT {
            break;
        }
        p += 4;
    }
    p
}

/// Paints the stack from `from` up to just below the current stack pointer (all of it dead).
#[inline(never)]
fn repaint(from: u32) {
    let sp: u32;
    // SAFETY: reads the stack pointer; no memory access.
    unsafe {
        core::arch::asm!("mov {}, sp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    // Keep clear of the word at the stack pointer (alignment slack).
    let end = (sp & !3).saturating_sub(8);
    let mut p = from & !3;
    while p < end {
        // SAFETY: below the stack pointer, inside the stack region: no live data is there
        // (an interrupt taken meanwhile pushes below the stack pointer and pops before
        // this loop resumes; its frame is dead by then).
        unsafe { (p as *mut u32).write_volatile(PAINT) };
        p += 4;
    }
}

/// Records how deep the stack went since the last measurement as `part`'s, then paints
/// the used part again.
pub fn measure(part: Part) {
    let low = lowest_used();
    PEAKS[part as usize].fetch_max(stack_top() - low, Ordering::Relaxed);
    repaint(low);
}

/// The deepest stack use of each part so far, in bytes: boot, net, node.
pub fn peaks() -> [u32; 3] {
    [
        PEAKS[0].load(Ordering::Relaxed),
        PEAKS[1].load(Ordering::Relaxed),
        PEAKS[2].load(Ordering::Relaxed),
    ]
}

/// A task's future that measures the stack after each poll (see the module docs).
pub struct Measured<F> {
    part: Part,
    future: F,
}

impl<F> Measured<F> {
    /// Wraps `future`, whose stack use counts as `part`'s.
    pub fn new(part: Part, future: F) -> Self {
        Measured { part, future }
    }
}

impl<F: Future> Future for Measured<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `future` is structurally pinned: it is never moved out of `self`.
        let this = unsafe { self.get_unchecked_mut() };
        let part = this.part;
        // SAFETY: as above.
        let out = unsafe { Pin::new_unchecked(&mut this.future) }.poll(cx);
        measure(part);
        out
    }
}
