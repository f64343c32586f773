//! UART0 of the mps2-an385 (ARM CMSDK APB UART at `0x4000_4000`): the serial link to the manager.
//!
//! The CMSDK UART has a one-byte receive buffer and a one-byte transmit
//! buffer, no FIFO:
//!
//! - **Receive:** the RX interrupt (NVIC line 0) moves each byte into a
//!   256-byte ring, so bytes keep arriving while the node task verifies and
//!   stores a chunk. The task is woken only when a frame delimiter (`0x00`)
//!   arrived or the ring is three quarters full, not once per byte. A full
//!   ring masks the RX interrupt and leaves the byte in the UART; [`pop`]
//!   unmasks it again and takes that byte itself (the UART raises its
//!   interrupt on arrival only, not while a byte waits). QEMU holds further
//!   bytes back while the buffer is full, so nothing is lost there; a real
//!   board relies on the ring being drained in time.
//! - **Transmit:** [`tx_ready`] / [`write`] put one byte at a time; when the
//!   buffer is full, [`poll_tx`] enables the TX interrupt (line 1), which
//!   wakes the task once the byte has gone.
//!
//! Registers: DATA 0x00, STATE 0x04 (bit 0 TX full, bit 1 RX full), CTRL 0x08
//! (TX enable, RX enable, TX IRQ enable, RX IRQ enable), INTSTATUS 0x0C
//! (write 1 to clear), BAUDDIV 0x10 (QEMU does not model the baud rate).

use core::cell::RefCell;
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::Context;

use cortex_m::peripheral::NVIC;
use critical_section::Mutex;
use embassy_sync::waitqueue::AtomicWaker;
use heapless::Deque;

const BASE: usize = 0x4000_4000;
const DATA: usize = 0x00;
const STATE: usize = 0x04;
const CTRL: usize = 0x08;
const INTSTATUS: usize = 0x0C;
const BAUDDIV: usize = 0x10;

const STATE_TXFULL: u32 = 1;
const STATE_RXFULL: u32 = 1 << 1;
const CTRL_TX_EN: u32 = 1;
const CTRL_RX_EN: u32 = 1 << 1;
const CTRL_TX_IE: u32 = 1 << 2;
const CTRL_RX_IE: u32 = 1 << 3;

/// NVIC line of the UART0 receive interrupt.
pub const IRQ_RX: u16 = 0;
/// NVIC line of the UART0 transmit interrupt.
pub const IRQ_TX: u16 = 1;
/// Bytes the receive ring holds.
pub const RING: usize = 256;

static RX: Mutex<RefCell<Deque<u8, RING>>> = Mutex::new(RefCell::new(Deque::new()));
static RX_WAKER: AtomicWaker = AtomicWaker::new();
static TX_WAKER: AtomicWaker = AtomicWaker::new();
/// Set when the receive side has something for the task (a delimiter, a nearly full ring).
static RX_READY: AtomicBool = AtomicBool::new(false);

fn rd(off: usize) -> u32 {
    // SAFETY: `off` is one of UART0's register offsets; the block is always
    // mapped on this board and only this module touches it.
    unsafe { core::ptr::read_volatile((BASE + off) as *const u32) }
}

fn wr(off: usize, v: u32) {
    // SAFETY: as for `rd`.
    unsafe { core::ptr::write_volatile((BASE + off) as *mut u32, v) }
}

/// Sets or clears bits of CTRL (read-modify-write under a critical section).
fn ctrl(set: u32, clear: u32) {
    critical_section::with(|_| wr(CTRL, (rd(CTRL) | set) & !clear));
}

/// A NVIC line number as the `cortex-m` crate wants it.
#[derive(Clone, Copy)]
struct Line(u16);

// SAFETY: the numbers are the board's UART0 interrupt lines.
unsafe impl cortex_m::interrupt::InterruptNumber for Line {
    fn number(self) -> u16 {
        self.0
    }
}

/// Enables UART0 (transmit, receive, receive interrupt) and its NVIC lines.
pub fn init() {
    wr(BAUDDIV, 16);
    wr(INTSTATUS, 0xF);
    wr(CTRL, CTRL_TX_EN | CTRL_RX_EN | CTRL_RX_IE);
    // SAFETY: the handlers for these lines (see `board::DefaultHandler`) only
    // touch this module's state, under critical sections.
    unsafe {
        NVIC::unmask(Line(IRQ_RX));
        NVIC::unmask(Line(IRQ_TX));
    }
}

/// Moves waiting bytes into the ring; returns whether the task should look.
fn fill(q: &mut Deque<u8, RING>) -> bool {
    let mut wake = false;
    while rd(STATE) & STATE_RXFULL != 0 {
        if q.is_full() {
            // Leave the byte in the UART; `pop` takes it once there is room.
            wr(CTRL, rd(CTRL) & !CTRL_RX_IE);
            return true;
        }
        let b = rd(DATA) as u8;
        let _ = q.push_back(b);
        wake |= b == 0 || q.len() >= RING * 3 / 4;
    }
    wake
}

/// The UART0 interrupt handler (RX and TX lines).
pub fn on_interrupt() {
    crate::entropy::stir();
    let status = rd(INTSTATUS);
    // Clear before reading DATA: a byte that arrives meanwhile raises it again.
    wr(INTSTATUS, status);
    let wake = critical_section::with(|cs| fill(&mut RX.borrow_ref_mut(cs)));
    if wake {
        RX_READY.store(true, Ordering::Release);
        RX_WAKER.wake();
    }
    if status & 1 != 0 {
        ctrl(0, CTRL_TX_IE);
        TX_WAKER.wake();
    }
}

/// Takes the next received byte, if any.
pub fn pop() -> Option<u8> {
    critical_section::with(|cs| {
        let mut q = RX.borrow_ref_mut(cs);
        let b = q.pop_front();
        if rd(CTRL) & CTRL_RX_IE == 0 {
            // The ring was full: take the byte left in the UART and listen again.
            wr(CTRL, rd(CTRL) | CTRL_RX_IE);
            fill(&mut q);
        }
        b
    })
}

/// Bytes waiting in the ring.
pub fn rx_queued() -> usize {
    critical_section::with(|cs| RX.borrow_ref(cs).len())
}

/// Registers the waker for received data; true if there is something to read now.
pub fn poll_rx(cx: &mut Context<'_>) -> bool {
    RX_WAKER.register(cx.waker());
    RX_READY.swap(false, Ordering::AcqRel)
}

/// Whether the transmitter takes a byte now.
pub fn tx_ready() -> bool {
    rd(STATE) & STATE_TXFULL == 0
}

/// Transmits one byte (call only when [`tx_ready`]).
pub fn write(b: u8) {
    wr(DATA, b as u32);
}

/// Registers the waker for room to transmit; true if there is room now.
pub fn poll_tx(cx: &mut Context<'_>) -> bool {
    TX_WAKER.register(cx.waker());
    if tx_ready() {
        return true;
    }
    ctrl(CTRL_TX_IE, 0);
    // The byte may have gone between the check and enabling the interrupt.
    tx_ready()
}
