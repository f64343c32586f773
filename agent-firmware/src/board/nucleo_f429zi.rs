//! ST's NUCLEO-F429ZI (STM32F429ZI: Cortex-M4F at 168 MHz, 2 MiB flash, on-chip Ethernet
//! MAC with a LAN8742A PHY in RMII, ST-LINK/V2-1 on board), through `embassy-stm32`.
//!
//! - Clocks: the ST-LINK's 8 MHz MCO as HSE (bypass), PLL to 168 MHz (the Ethernet MAC
//!   needs at least 25 MHz on AHB); embassy-stm32's time driver (a general-purpose timer).
//! - Ethernet: the MAC's RMII pins as the board wires them (PA1, PA2, PA7, PC1, PC4, PC5,
//!   PG11, PG13, PB13), the PHY at address 0; one transmit and two receive DMA
//!   descriptors, their buffers outside Baton's 64 KiB (`.board_ram`).
//! - Flash (embassy-stm32's blocking regions of the on-chip flash; no unit is written
//!   twice, so agent-core's store keeps one write unit per chunk flag, with spare slots):
//!
//!   ```text
//!   0x0800_0000  128 KiB  the application (sectors 0–4; the budget is 128 KiB as on QEMU)
//!   0x0802_0000  896 KiB  content partition (bank 1 region 3: 7 sectors of 128 KiB)
//!   0x0810_0000   64 KiB  the agent's records (bank 2 region 1: 4 sectors of 16 KiB)
//!   0x0811_0000   64 KiB  provisioning block at its start (bank 2 region 2)
//!   0x0812_0000  128 KiB  boot counter: one 32-bit word per boot (bank 2 region 3's
//!                         first sector, erased when full)
//!   ```
//!
//! - Entropy: the seed, the boot number and cycle-counter jitter, as on QEMU.
//! - Logs: defmt over RTT (the probe reads them: `probe-rs run` prints them).
//! - `exit` and panics log and reset the chip (a board in the field comes back).
//!
//! Not wired on this board yet: the serial manager link (`serial` reports it and a device
//! provisioned for it never connects; provision it for TCP) and the MPU guards of the QEMU
//! board (the stack still sits below the statics, as `memory-nucleo-f429zi.x` lays out).

use core::mem::MaybeUninit;
use core::task::Context;

use baton_agent_core::flash::FlashStore;
use embassy_executor::Spawner;
use embassy_stm32::bind_interrupts;
use embassy_stm32::eth::{self, Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::flash::{Bank1Region3, Bank2Region1, Bank2Region3, Blocking, Flash};
use embassy_stm32::peripherals::{ETH, ETH_SMA};
use embassy_stm32::time::Hertz;
use embedded_storage::nor_flash::{NorFlash as _, ReadNorFlash as _};
use static_cell::StaticCell;

use crate::config::CONFIG_LEN;
use defmt_rtt as _;

bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
});

/// The board's Ethernet driver, for embassy-net.
pub type Eth = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;
/// The content partition and record area as agent-core's store.
pub type Store = FlashStore<Bank1Region3<'static, Blocking>, Bank2Region1<'static, Blocking>>;

/// The MAC's DMA descriptors and packet buffers (4.6 KB: the driver needs two receive
/// descriptors). They live in `.board_ram` (SRAM above Baton's 64 KiB, see
/// `memory-nucleo-f429zi.x`), written once by [`bring_up`].
#[unsafe(link_section = ".board_ram")]
static mut PACKETS: MaybeUninit<PacketQueue<1, 2>> = MaybeUninit::uninit();
static EXECUTOR: StaticCell<embassy_executor::Executor> = StaticCell::new();

/// The 168 MHz clock tree from the ST-LINK's 8 MHz clock.
fn clocks() -> embassy_stm32::Config {
    use embassy_stm32::rcc::*;
    let mut config = embassy_stm32::Config::default();
    config.rcc.hse = Some(Hse {
        freq: Hertz(8_000_000),
        mode: HseMode::Bypass,
    });
    config.rcc.pll_src = PllSource::HSE;
    config.rcc.pll = Some(Pll {
        prediv: PllPreDiv::DIV4,
        mul: PllMul::MUL168,
        divp: Some(PllPDiv::DIV2),
        divq: Some(PllQDiv::DIV7),
        divr: None,
    });
    config.rcc.ahb_pre = AHBPrescaler::DIV1;
    config.rcc.apb1_pre = APBPrescaler::DIV4;
    config.rcc.apb2_pre = APBPrescaler::DIV2;
    config.rcc.sys = Sysclk::PLL1_P;
    config
}

/// Brings the board up: clocks, the RNG's boot nonce, the flash regions (provisioning
/// block, records, content) and the Ethernet MAC with its PHY.
#[inline(never)]
pub fn bring_up() -> super::Parts {
    let p = embassy_stm32::init(clocks());
    if let Some(mut core) = cortex_m::Peripherals::take() {
        core.DCB.enable_trace();
        core.DWT.enable_cycle_counter();
    }
    let regions = Flash::new_blocking(p.FLASH).into_blocking_regions();
    let mut boot_log = regions.bank2_region3;
    let boot = next_boot_count(&mut boot_log);
    crate::entropy::stir();
    let mut provisioning = regions.bank2_region2;
    let mut config_block = [0u8; CONFIG_LEN];
    if provisioning.read(0, &mut config_block).is_err() {
        defmt::error!("cannot read the provisioning block");
    }
    // A locally administered MAC derived from the chip's unique id.
    let uid = embassy_stm32::uid::uid();
    let mac = [
        0x02,
        0x42,
        uid[0],
        uid[1],
        uid[2] ^ uid[8],
        uid[3] ^ uid[11],
    ];
    // SAFETY: `bring_up` runs once (`embassy_stm32::init` above panics on a second call),
    // so this is the only reference to PACKETS ever made.
    let slot: *mut MaybeUninit<PacketQueue<1, 2>> = &raw mut PACKETS;
    let packets = unsafe { (*slot).write(PacketQueue::new()) };
    // The LAN8742A answers at address 0 (its PHYAD strap on the NUCLEO-144 boards).
    let phy = GenericPhy::new(Sma::new(p.ETH_SMA, p.PA2, p.PC1), 0);
    let eth = Ethernet::new_with_phy(
        packets, p.ETH, Irqs, p.PA1, p.PA7, p.PC4, p.PC5, p.PG13, p.PB13, p.PG11, mac, phy,
    );
    let store = FlashStore::new(regions.bank1_region3).with_records(regions.bank2_region1);
    super::Parts {
        eth,
        mac,
        config_block,
        boot,
        store,
    }
}

/// Words of the boot counter log (the first 128 KiB sector of bank 2 region 3).
const BOOT_LOG_WORDS: u32 = 128 * 1024 / 4;

/// Counts this boot in the log of boot numbers (one word each, a new word per boot, the
/// sector erased when full) and returns its number; 0 if the flash cannot be used.
fn next_boot_count(log: &mut Bank2Region3<'static, Blocking>) -> u32 {
    let mut last: u32 = 0;
    let mut word = [0u8; 4];
    for i in 0..BOOT_LOG_WORDS {
        if log.read(i * 4, &mut word).is_err() {
            return 0;
        }
        let value = u32::from_le_bytes(word);
        if value == u32::MAX {
            let next = last.wrapping_add(1);
            return match log.write(i * 4, &next.to_le_bytes()) {
                Ok(()) => next,
                Err(_) => 0,
            };
        }
        last = value;
    }
    // Full: start the log again after the last number.
    let next = last.wrapping_add(1);
    if log.erase(0, BOOT_LOG_WORDS * 4).is_err() || log.write(0, &next.to_le_bytes()).is_err() {
        return 0;
    }
    next
}

/// Runs embassy's thread-mode executor forever; `init` spawns the first tasks.
pub fn run_executor(init: impl FnOnce(Spawner)) -> ! {
    EXECUTOR.init(embassy_executor::Executor::new()).run(init)
}

/// A fast counter for entropy stirring: the core's cycle counter.
pub fn cycle_count() -> u32 {
    cortex_m::peripheral::DWT::cycle_count()
}

/// Ends the program: logs and resets the chip (a device in the field boots again).
pub fn exit(success: bool) -> ! {
    defmt::error!("exit (success: {=bool}): resetting", success);
    cortex_m::peripheral::SCB::sys_reset()
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    defmt::error!("panic");
    exit(false)
}

/// The fault demonstrations need the QEMU board's guards; here they are refused loudly.
pub fn fault_demos(flags: u8) {
    let demos = crate::config::FLAG_DEMO_STACK_OVERFLOW | crate::config::FLAG_DEMO_CODE_WRITE;
    if flags & demos != 0 {
        defmt::warn!(
            "fault demos are not built for this board (flags {=u8:#x} ignored)",
            flags
        );
    }
}

// Linker symbols from memory-nucleo-f429zi.x and cortex-m-rt's link.x; only addresses used.
unsafe extern "C" {
    static _stack_end: u32;
    static _stack_start: u32;
    static __sdata: u32;
    static __edata: u32;
    static __sbss: u32;
    static __ebss: u32;
}

/// Lowest address the stack may use.
pub fn stack_bottom() -> u32 {
    &raw const _stack_end as u32
}

/// The initial stack pointer: the top of the stack region.
pub fn stack_top() -> u32 {
    &raw const _stack_start as u32
}

/// Sizes of the static RAM sections and the stack region, in bytes.
pub fn ram_layout() -> super::RamLayout {
    let a = |s: *const u32| s as usize;
    super::RamLayout {
        data: a(&raw const __edata) - a(&raw const __sdata),
        bss: a(&raw const __ebss) - a(&raw const __sbss),
        stack: (stack_top() - stack_bottom()) as usize,
    }
}

/// The serial manager link: not wired on this board yet (see the module docs). A device
/// provisioned for it logs so once and never connects.
pub mod serial {
    use core::sync::atomic::{AtomicBool, Ordering};

    use super::Context;

    static SAID: AtomicBool = AtomicBool::new(false);

    /// Says that the serial link is not available on this board.
    pub fn init() {
        if !SAID.swap(true, Ordering::Relaxed) {
            defmt::error!(
                "the serial manager link is not wired on this board: provision the device for TCP"
            );
        }
    }

    /// No byte ever arrives.
    pub fn pop() -> Option<u8> {
        None
    }

    /// Bytes received and not yet taken: none.
    pub fn rx_queued() -> usize {
        0
    }

    /// Never ready to read.
    pub fn poll_rx(_cx: &mut Context<'_>) -> bool {
        false
    }

    /// Never ready to send.
    pub fn tx_ready() -> bool {
        false
    }

    /// Drops the byte (never called: [`tx_ready`] is false).
    pub fn write(_b: u8) {}

    /// Never ready to send.
    pub fn poll_tx(_cx: &mut Context<'_>) -> bool {
        false
    }
}
