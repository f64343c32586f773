//! Driver for the SMSC LAN9118 Ethernet controller as QEMU models it on mps2-an385.
//!
//! The chip sits at `0x4020_0000` (NVIC line 13). The driver implements
//! [`embassy_net_driver::Driver`]:
//!
//! - **Receive:** the interrupt handler masks the RX-status interrupt (`RSFL`)
//!   and wakes the receive waker; `receive` registers the waker, unmasks
//!   `RSFL` again (so frames still waiting raise it at once), pops one status
//!   word (`RX_STATUS`, length in bits 29:16 including the 4-byte CRC) and
//!   reads the frame's words from the RX data FIFO into a 1536-byte buffer.
//! - **Transmit:** command A (first | last | buffer length), command B (tag |
//!   length), then the data words. When the TX data FIFO lacks room for a
//!   full frame, [`Lan9118::transmit`] enables the "TX data available"
//!   interrupt (`TDFA`, level set in `FIFO_INT`) and registers the transmit
//!   waker, so a real chip's full FIFO applies back-pressure. TX status words
//!   are drained as they appear.
//! - `IRQ_CFG = IRQ_EN | IRQ_POL | IRQ_TYPE` (0x111): QEMU drives the line
//!   active-high push-pull only then; otherwise the interrupt storms.
//! - `MAC_CR = TXEN | RXEN | FDPX` (clears QEMU's default promiscuous mode).
//!   The MAC address is what QEMU loaded from its EEPROM (`-nic ...,mac=`).
//!
//! QEMU's model never pushes back on receive: its RX FIFO (~10.5 KB) silently
//! drops frames when full, so TCP receive windows must stay small (≤ 8 KB).

use core::task::Context;

use cortex_m::peripheral::NVIC;
use embassy_net_driver::{Capabilities, HardwareAddress, LinkState};
use embassy_sync::waitqueue::AtomicWaker;

/// Base address of the controller.
const BASE: usize = 0x4020_0000;
/// The controller's NVIC interrupt number.
pub const IRQ: u16 = 13;
/// Largest Ethernet frame handled (without CRC), bytes.
pub const MTU: usize = 1514;
const BUF: usize = 1536;

mod reg {
    pub const RX_DATA: usize = 0x00;
    pub const TX_DATA: usize = 0x20;
    pub const RX_STATUS: usize = 0x40;
    pub const TX_STATUS: usize = 0x48;
    pub const IRQ_CFG: usize = 0x54;
    pub const INT_STS: usize = 0x58;
    pub const INT_EN: usize = 0x5C;
    pub const BYTE_TEST: usize = 0x64;
    pub const FIFO_INT: usize = 0x68;
    pub const TX_CFG: usize = 0x70;
    pub const HW_CFG: usize = 0x74;
    pub const RX_FIFO_INF: usize = 0x7C;
    pub const TX_FIFO_INF: usize = 0x80;
    pub const MAC_CSR_CMD: usize = 0xA4;
    pub const MAC_CSR_DATA: usize = 0xA8;
}

mod mac {
    pub const MAC_CR: u32 = 1;
    pub const ADDRH: u32 = 2;
    pub const ADDRL: u32 = 3;
    pub const MII_ACC: u32 = 6;
    pub const MII_DATA: u32 = 7;
}

const INT_RSFL: u32 = 1 << 3;
const INT_TDFA: u32 = 1 << 9;
const IRQ_CFG_VALUE: u32 = (1 << 8) | (1 << 4) | 1;
const MAC_CR_RXEN: u32 = 1 << 2;
const MAC_CR_TXEN: u32 = 1 << 3;
const MAC_CR_FDPX: u32 = 1 << 20;
const TX_CFG_ON: u32 = 1 << 1;
const TX_CFG_SAO: u32 = 1 << 2;
const CSR_BUSY: u32 = 1 << 31;
const CSR_READ: u32 = 1 << 30;

fn rd(off: usize) -> u32 {
    // SAFETY: `off` is one of the controller's register offsets; the register
    // block is always mapped on this board and reads have no memory effects
    // beyond the device's own FIFO semantics, which this driver owns.
    unsafe { core::ptr::read_volatile((BASE + off) as *const u32) }
}

fn wr(off: usize, v: u32) {
    // SAFETY: as for `rd`; only this driver writes the controller's registers.
    unsafe { core::ptr::write_volatile((BASE + off) as *mut u32, v) }
}

static RX_WAKER: AtomicWaker = AtomicWaker::new();

static TX_WAKER: AtomicWaker = AtomicWaker::new();

/// Why the controller could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
#[non_exhaustive]
pub enum Lan9118Error {
    /// `BYTE_TEST` did not read `0x87654321`: no controller, or wrong endianness.
    NotFound,
    /// A soft reset or a MAC register access did not finish.
    Timeout,
}

/// One Ethernet frame buffer.
pub type FrameBuffer = [u8; BUF];

/// The LAN9118 with its (statically allocated) frame buffers.
pub struct Lan9118 {
    mac: [u8; 6],
    rx: &'static mut FrameBuffer,
    tx: &'static mut FrameBuffer,
    tag: u16,
}

fn wait_mac_idle() -> Result<(), Lan9118Error> {
    for _ in 0..100_000 {
        if rd(reg::MAC_CSR_CMD) & CSR_BUSY == 0 {
            return Ok(());
        }
    }
    Err(Lan9118Error::Timeout)
}

fn mac_read(index: u32) -> Result<u32, Lan9118Error> {
    wait_mac_idle()?;
    wr(reg::MAC_CSR_CMD, CSR_BUSY | CSR_READ | index);
    wait_mac_idle()?;
    Ok(rd(reg::MAC_CSR_DATA))
}

fn mac_write(index: u32, v: u32) -> Result<(), Lan9118Error> {
    wait_mac_idle()?;
    wr(reg::MAC_CSR_DATA, v);
    wr(reg::MAC_CSR_CMD, CSR_BUSY | index);
    wait_mac_idle()
}

/// Reads PHY register `r` of the internal PHY (MII address 1).
fn phy_read(r: u32) -> Result<u16, Lan9118Error> {
    for _ in 0..100_000 {
        if mac_read(mac::MII_ACC)? & 1 == 0 {
            mac_write(mac::MII_ACC, (1 << 11) | (r << 6))?;
            for _ in 0..100_000 {
                if mac_read(mac::MII_ACC)? & 1 == 0 {
                    return Ok(mac_read(mac::MII_DATA)? as u16);
                }
            }
            return Err(Lan9118Error::Timeout);
        }
    }
    Err(Lan9118Error::Timeout)
}

impl Lan9118 {
    /// Resets and configures the controller; interrupts are enabled in the NVIC.
    pub fn new(
        rx: &'static mut FrameBuffer,
        tx: &'static mut FrameBuffer,
    ) -> Result<Self, Lan9118Error> {
        if rd(reg::BYTE_TEST) != 0x8765_4321 {
            return Err(Lan9118Error::NotFound);
        }
        wr(reg::HW_CFG, rd(reg::HW_CFG) | 1);
        let mut reset = false;
        for _ in 0..100_000 {
            if rd(reg::HW_CFG) & 1 == 0 {
                reset = true;
                break;
            }
        }
        if !reset {
            return Err(Lan9118Error::Timeout);
        }
        let lo = mac_read(mac::ADDRL)?;
        let hi = mac_read(mac::ADDRH)?;
        let mac = [
            lo as u8,
            (lo >> 8) as u8,
            (lo >> 16) as u8,
            (lo >> 24) as u8,
            hi as u8,
            (hi >> 8) as u8,
        ];
        mac_write(mac::MAC_CR, MAC_CR_TXEN | MAC_CR_RXEN | MAC_CR_FDPX)?;
        wr(reg::TX_CFG, TX_CFG_ON | TX_CFG_SAO);
        // RX status level 0: interrupt as soon as one frame waits.
        // TX data available level: 0x18 × 64 bytes = 1536 bytes free.
        wr(reg::FIFO_INT, 0x18 << 24);
        wr(reg::INT_STS, 0xFFFF_FFFF);
        wr(reg::INT_EN, INT_RSFL);
        wr(reg::IRQ_CFG, IRQ_CFG_VALUE);
        // SAFETY: the handler below only touches the controller's interrupt
        // registers and the wakers, which are interrupt-safe.
        unsafe { NVIC::unmask(Irq) };
        Ok(Lan9118 {
            mac,
            rx,
            tx,
            tag: 0,
        })
    }

    /// The MAC address QEMU gave the device.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the PHY reports the link up (basic status register, bit 2).
    pub fn link_up(&self) -> bool {
        phy_read(1).is_ok_and(|bsr| bsr & (1 << 2) != 0)
    }

    fn drain_tx_status() {
        let n = (rd(reg::TX_FIFO_INF) >> 16) & 0xFF;
        for _ in 0..n {
            let _ = rd(reg::TX_STATUS);
        }
    }

    fn tx_free() -> usize {
        (rd(reg::TX_FIFO_INF) & 0xFFFF) as usize
    }

    /// Pops one received frame into the RX buffer; returns its length without CRC.
    fn pop_frame(&mut self) -> Option<usize> {
        loop {
            let waiting = (rd(reg::RX_FIFO_INF) >> 16) & 0xFF;
            if waiting == 0 {
                return None;
            }
            let status = rd(reg::RX_STATUS);
            let len = ((status >> 16) & 0x3FFF) as usize;
            let words = len.div_ceil(4);
            let error = status & (1 << 15) != 0;
            let fits = (4..=BUF).contains(&len);
            for i in 0..words {
                let w = rd(reg::RX_DATA);
                if fits && !error {
                    let at = 4 * i;
                    let n = (len - at).min(4);
                    self.rx[at..at + n].copy_from_slice(&w.to_le_bytes()[..n]);
                }
            }
            if fits && !error {
                return Some(len - 4);
            }
        }
    }

    fn can_transmit(cx: &mut Context) -> bool {
        // Room for the two command words and a full frame.
        if Self::tx_free() >= BUF + 8 {
            return true;
        }
        TX_WAKER.register(cx.waker());
        critical_section::with(|_| wr(reg::INT_EN, rd(reg::INT_EN) | INT_TDFA));
        // Re-check: the FIFO may have drained before the interrupt was enabled.
        Self::tx_free() >= BUF + 8
    }
}

#[derive(Clone, Copy)]
struct Irq;

// SAFETY: 13 is the LAN9118's interrupt line on mps2-an385.
unsafe impl cortex_m::interrupt::InterruptNumber for Irq {
    fn number(self) -> u16 {
        IRQ
    }
}

/// The Ethernet interrupt (dispatched from `DefaultHandler`): masks what fired
/// and wakes the waiting side.
pub fn on_interrupt() {
    crate::entropy::stir();
    let sts = rd(reg::INT_STS);
    let en = rd(reg::INT_EN);
    let mut mask = 0;
    if sts & INT_RSFL != 0 {
        mask |= INT_RSFL;
        RX_WAKER.wake();
    }
    if sts & INT_TDFA != 0 {
        mask |= INT_TDFA;
        TX_WAKER.wake();
    }
    wr(reg::INT_EN, en & !mask);
    wr(reg::INT_STS, sts);
}

/// A received frame, lent to the network stack.
pub struct RxToken<'a> {
    buf: &'a mut [u8],
}

/// Room for one frame to send, lent to the network stack.
pub struct TxToken<'a> {
    buf: &'a mut [u8; BUF],
    tag: &'a mut u16,
}

/// Writes `buf` as one frame into the TX FIFO (room was checked by `can_transmit`).
fn send(buf: &[u8], tag: &mut u16) {
    let len = buf.len();
    let cmd_a = (1 << 13) | (1 << 12) | len as u32;
    *tag = tag.wrapping_add(1);
    let cmd_b = ((*tag as u32) << 16) | len as u32;
    wr(reg::TX_DATA, cmd_a);
    wr(reg::TX_DATA, cmd_b);
    for chunk in buf.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        wr(reg::TX_DATA, u32::from_le_bytes(w));
    }
    Lan9118::drain_tx_status();
}

impl embassy_net_driver::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, f: F) -> R {
        f(self.buf)
    }
}

impl embassy_net_driver::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(BUF);
        let r = f(&mut self.buf[..len]);
        send(&self.buf[..len], self.tag);
        r
    }
}

impl embassy_net_driver::Driver for Lan9118 {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, cx: &mut Context) -> Option<(RxToken<'_>, TxToken<'_>)> {
        RX_WAKER.register(cx.waker());
        // Unmask the RX interrupt again (the handler masks it): it fires at
        // once while frames are waiting, so the stack is polled again even if
        // it takes only some of them now.
        critical_section::with(|_| wr(reg::INT_EN, rd(reg::INT_EN) | INT_RSFL));
        if !Self::can_transmit(cx) {
            return None;
        }
        let len = self.pop_frame()?;
        // The stack may answer at once: lend the TX buffer with the frame.
        let Lan9118 { rx, tx, tag, .. } = self;
        Some((
            RxToken {
                buf: &mut rx[..len],
            },
            TxToken { buf: tx, tag },
        ))
    }

    fn transmit(&mut self, cx: &mut Context) -> Option<TxToken<'_>> {
        if Self::can_transmit(cx) {
            Some(TxToken {
                buf: self.tx,
                tag: &mut self.tag,
            })
        } else {
            None
        }
    }

    fn link_state(&mut self, _cx: &mut Context) -> LinkState {
        // QEMU's PHY is always up (checked once at boot with `link_up`); reading
        // it through the MII on every poll of the stack would only cost time.
        LinkState::Up
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = None;
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ethernet(self.mac)
    }
}
