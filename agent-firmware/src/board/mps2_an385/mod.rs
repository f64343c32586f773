//! The QEMU `mps2-an385` board (Cortex-M3, LAN9118 Ethernet, CMSDK UART, PSRAM as flash).
//!
//! - [`run_executor`]: a thread-mode embassy executor that sleeps with `WFI`.
//!   embassy's stock Cortex-M executor sleeps with `WFE`, which QEMU runs as a
//!   busy loop; `WFI` lets QEMU's vCPU thread block until an interrupt.
//! - The embassy time driver: SysTick at 1 kHz (25 MHz system clock, reload
//!   24 999), a 64-bit tick count kept under a critical section, and embassy's
//!   timer queue, serviced from the SysTick handler when the earliest deadline passes.
//! - A panic handler that logs the panic over defmt and makes QEMU exit with code 1
//!   (faults: see [`guard`]).
//! - [`ram_layout`]: the sizes of the statics and the stack region.
//! - [`bring_up`]: memory guards, time, boot counter, provisioning block, Ethernet and
//!   the flash store, handed to the shared firmware as [`super::Parts`].
//! - Its parts: [`lan9118`] (Ethernet), [`psram`] (the emulated flash), [`uart`] (the
//!   serial link, as [`serial`]), [`guard`] (stack guard and MPU regions), and in the A/B
//!   build `ab` (image header, embassy-boot's state, install record, DFU, watchdog).

#[cfg(feature = "ab")]
pub mod ab;
pub mod guard;
pub mod lan9118;
pub mod psram;
pub mod uart;

pub use guard::{stack_bottom, stack_top};
pub use uart as serial;

use baton_agent_core::flash::FlashStore;
use defmt_semihosting as _;

use crate::config::CONFIG_LEN;
use psram::NorPartition;

use core::cell::{Cell, RefCell};
use core::sync::atomic::{AtomicBool, Ordering};

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use critical_section::Mutex;
use embassy_executor::{Spawner, raw};
use embassy_time_queue_utils::Queue;
use static_cell::StaticCell;

/// System clock of the mps2-an385 FPGA image (and of QEMU's model), in Hz.
pub const SYSCLK_HZ: u32 = 25_000_000;
/// SysTick rate, matching embassy-time's `tick-hz-1_000`.
const TICK_HZ: u32 = 1_000;

/// Set by the pender when a task was woken; cleared before each poll.
static PENDING: AtomicBool = AtomicBool::new(true);

/// Called by embassy when a task is woken (from any context, including interrupts).
#[unsafe(export_name = "__pender")]
fn pender(_context: *mut ()) {
    PENDING.store(true, Ordering::Release);
}

static EXECUTOR: StaticCell<raw::Executor> = StaticCell::new();

/// Runs the executor forever; `init` spawns the first tasks.
///
/// Between polls the core sleeps in `WFI` with interrupts masked, so a wake-up
/// that races with going to sleep is not lost: a pending interrupt ends `WFI`
/// even while masked, and runs as soon as interrupts are enabled again.
pub fn run_executor(init: impl FnOnce(Spawner)) -> ! {
    let executor: &'static raw::Executor = EXECUTOR.init(raw::Executor::new(core::ptr::null_mut()));
    init(executor.spawner());
    loop {
        PENDING.store(false, Ordering::Release);
        // SAFETY: `poll` is only ever called here, in thread mode, never re-entrantly
        // (the pender only sets a flag).
        unsafe { executor.poll() };
        cortex_m::interrupt::disable();
        if !PENDING.load(Ordering::Acquire) {
            cortex_m::asm::wfi();
        }
        // SAFETY: interrupts were enabled before `disable` above; nothing here
        // relies on them staying masked (no critical section spans this point).
        unsafe { cortex_m::interrupt::enable() };
    }
}

/// The SysTick time driver: tick count and timer queue.
struct SysTickDriver {
    ticks: Mutex<Cell<u64>>,
    next: Mutex<Cell<u64>>,
    queue: Mutex<RefCell<Queue>>,
}

embassy_time_driver::time_driver_impl!(static DRIVER: SysTickDriver = SysTickDriver {
    ticks: Mutex::new(Cell::new(0)),
    next: Mutex::new(Cell::new(u64::MAX)),
    queue: Mutex::new(RefCell::new(Queue::new())),
});

impl embassy_time_driver::Driver for SysTickDriver {
    fn now(&self) -> u64 {
        critical_section::with(|cs| self.ticks.borrow(cs).get())
    }

    fn schedule_wake(&self, at: u64, waker: &core::task::Waker) {
        critical_section::with(|cs| {
            let mut queue = self.queue.borrow(cs).borrow_mut();
            if queue.schedule_wake(at, waker) {
                let now = self.ticks.borrow(cs).get();
                self.next.borrow(cs).set(queue.next_expiration(now));
            }
        })
    }
}

impl SysTickDriver {
    fn tick(&self) {
        critical_section::with(|cs| {
            let now = self.ticks.borrow(cs).get() + 1;
            self.ticks.borrow(cs).set(now);
            if now >= self.next.borrow(cs).get() {
                let next = self.queue.borrow(cs).borrow_mut().next_expiration(now);
                self.next.borrow(cs).set(next);
            }
        })
    }
}

#[exception]
fn SysTick() {
    DRIVER.tick();
}

/// Starts SysTick at 1 kHz from the processor clock.
pub fn start_systick(mut syst: SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(SYSCLK_HZ / TICK_HZ - 1);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

/// The current value of the SysTick down-counter (sub-millisecond timing jitter).
pub fn systick_value() -> u32 {
    SYST::get_current()
}

/// Exits QEMU through semihosting with success (`true`) or failure.
///
/// In the A/B build a failure resets the board instead (SYSRESETREQ): the bootloader then
/// reverts an update that never confirmed, as it would after a watchdog reset.
pub fn exit(success: bool) -> ! {
    #[cfg(feature = "ab")]
    if !success {
        defmt::error!("resetting the board");
        cortex_m::peripheral::SCB::sys_reset();
    }
    use cortex_m_semihosting::debug;
    debug::exit(if success {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    loop {
        cortex_m::asm::wfi();
    }
}

/// External interrupt lines of the mps2-an385 (CMSDK: UARTs 0..=1, 12; Ethernet 13; ...).
const IRQ_LINES: usize = 32;

unsafe extern "C" {
    // cortex-m-rt's entry for `DefaultHandler` below (it passes the IRQ number).
    fn DefaultHandler();
}

/// The device part of the vector table: the board's 32 lines, all to [`DefaultHandler`]
/// (cortex-m-rt's `device` feature; its default table has 240 entries, 832 bytes more flash).
#[unsafe(link_section = ".vector_table.interrupts")]
#[unsafe(no_mangle)]
#[used]
static __INTERRUPTS: [unsafe extern "C" fn(); IRQ_LINES] = [DefaultHandler; IRQ_LINES];

/// Every device interrupt lands here (no device crate, so cortex-m-rt's
/// default vector table); `irqn` is the NVIC line. (cortex-m-rt requires the
/// `unsafe fn` signature for this handler and for `HardFault`.)
#[exception]
unsafe fn DefaultHandler(irqn: i16) {
    if irqn == lan9118::IRQ as i16 {
        lan9118::on_interrupt();
    } else if irqn == uart::IRQ_RX as i16 || irqn == uart::IRQ_TX as i16 {
        uart::on_interrupt();
    } else if cfg!(feature = "ab") && irqn == -14 {
        // NMI: the watchdog's first expiry (A/B build); the reset follows.
        defmt::error!("watchdog expired");
        exit(false);
    } else {
        defmt::error!("unexpected interrupt {}", irqn);
        exit(false);
    }
}

/// Logs the panic and makes QEMU exit with code 1 (the A/B build resets the board).
///
/// The message and location are not read: touching `PanicInfo` keeps every
/// panic site's formatting machinery and file names in flash (~25 KB). Build
/// with the `panic-location` feature to log the location while debugging.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // A panic inside the logger (or while logging this one) must not recurse.
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::AcqRel) {
        exit(false);
    }
    #[cfg(feature = "panic-location")]
    if let Some(l) = _info.location() {
        defmt::error!("panic at {=str}:{=u32}", l.file(), l.line());
    }
    defmt::error!("panic");
    exit(false)
}

/// Sizes of the static RAM sections and the stack region, in bytes.
pub fn ram_layout() -> super::RamLayout {
    // Linker symbols bounding .data and .bss; only their addresses are used.
    unsafe extern "C" {
        static __sdata: u32;
        static __edata: u32;
        static __sbss: u32;
        static __ebss: u32;
    }
    let a = |s: *const u32| s as usize;
    super::RamLayout {
        data: a(&raw const __edata) - a(&raw const __sdata),
        bss: a(&raw const __ebss) - a(&raw const __sbss),
        stack: (guard::stack_top() - guard::stack_bottom()) as usize,
    }
}

/// The board's Ethernet driver, for embassy-net.
pub type Eth = lan9118::Lan9118;
/// The content partition and record area as agent-core's store (the PSRAM allows bitmap flags).
pub type Store = FlashStore<NorPartition>;

/// A counter that runs fast and differs between boots at the same point (entropy stirring).
pub fn cycle_count() -> u32 {
    systick_value()
}

static ETH_RX: StaticCell<lan9118::FrameBuffer> = StaticCell::new();
static ETH_TX: StaticCell<lan9118::FrameBuffer> = StaticCell::new();

/// Brings the board up: memory guards, SysTick, the boot counter, the provisioning block,
/// the LAN9118 and the flash store (the A/B build: the watchdog first). If the Ethernet
/// cannot start it exits (QEMU status 1); the A/B build resets the board instead ([`exit`]).
#[inline(never)]
pub fn bring_up() -> super::Parts {
    let Some(mut p) = cortex_m::Peripherals::take() else {
        exit(false);
    };
    guard::enable_mpu(&mut p.MPU, &mut p.SCB);
    #[cfg(feature = "ab")]
    {
        ab::watchdog_start();
        defmt::info!(
            "image v{} ({}) flags={}",
            ab::version(),
            ab::boot(),
            ab::flags()
        );
    }
    start_systick(p.SYST);
    let boot = psram::next_boot_count();
    let mut config_block = [0u8; CONFIG_LEN];
    psram::read_bytes(psram::CONFIG_OFFSET, &mut config_block);
    let eth = match lan9118::Lan9118::new(ETH_RX.init([0; 1536]), ETH_TX.init([0; 1536])) {
        Ok(e) => e,
        Err(e) => {
            defmt::error!("ethernet: {}", e);
            exit(false);
        }
    };
    let mac = eth.mac();
    if !eth.link_up() {
        defmt::warn!("ethernet link is down");
    }
    let store =
        FlashStore::new_multiwrite(NorPartition::content()).with_records(NorPartition::records());
    super::Parts {
        eth,
        mac,
        config_block,
        boot,
        store,
    }
}

/// Runs the fault demonstrations the provisioning block asks for (test switches that
/// show the memory guards on the image under test, see [`guard::demo`]).
pub fn fault_demos(flags: u8) {
    if flags & crate::config::FLAG_DEMO_STACK_OVERFLOW != 0 {
        guard::demo::overflow_stack();
    }
    if flags & crate::config::FLAG_DEMO_CODE_WRITE != 0 {
        guard::demo::write_code();
    }
}
