//! Memory guards: a stack that faults when it overflows, code the program cannot overwrite,
//! and a fault handler that says which of the two happened.
//!
//! - **Stack below the statics** (flip-link's layout, done in `memory.x.in`): the stack region
//!   is the bottom of RAM, `.data`/`.bss` sit above it. A stack that outgrows its region
//!   runs off the bottom of RAM instead of into the statics. Its lowest 32 bytes and the
//!   256 MiB below RAM are MPU regions without access ([`enable_mpu`]), so the first push
//!   or frame store past the bottom raises a MemManage fault at the overflowing
//!   instruction, however large the frame. (The region below RAM is needed: QEMU 7.2's
//!   mps2-an385 ignores writes to the unmapped addresses below `0x2000_0000` and reads
//!   them as zero instead of raising a BusFault; checked with a write to `0x1fff_ff00`.)
//! - **MPU (PMSAv7)**: the code memory (SSRAM1 at `0x0`, 4 MiB, and its 4 MiB mirror) is
//!   read-only, RAM and the emulated flash (`0x2000_0000`, 32 MiB) are not executable, the
//!   default memory map is the background for everything else (devices, system space).
//!   A wild write to code (the vector table included) faults where it happens. In the A/B
//!   build the code is ACTIVE in the PSRAM (128 KiB): that region is read-only and
//!   executable, the rest of the PSRAM stays not executable.
//! - **Fault entry** ([`fault_entry`]): HardFault, MemManage, BusFault and UsageFault
//!   start in a few instructions of assembly that move the stack pointer back to the top
//!   of the stack region before any Rust code runs (after an overflow the old one points
//!   into the guard or below RAM, and a handler using it would fault again and lock the
//!   core up). The handler logs one line — `stack overflow: ...` when the faulting access
//!   or the stacked frame lies in the guard or below the stack, otherwise the fault's kind
//!   and the address it names (`MemManage fault at 0x…`) — and exits as a panic does.
//! - **Demonstrations** ([`demo`]): a device provisioned with a fault-demo flag overflows
//!   its stack or writes to its code on purpose after boot, so the HIL tests can show the
//!   guards work on the shipped image.

use core::arch::global_asm;

// Linker symbols from memory.x.in / cortex-m-rt's link.x; only their addresses are used.
unsafe extern "C" {
    static _stack_guard: u32;
    static _stack_end: u32;
    static _stack_start: u32;
}

/// Bytes of the no-access guard at the bottom of the stack region (PMSAv7's smallest region).
pub const GUARD_LEN: u32 = 32;
/// Base of the code memory (ZBT SSRAM1) and the length the read-only region covers
/// (4 MiB and its mirror at `0x40_0000`).
const CODE_BASE: u32 = 0x0000_0000;
const CODE_LEN_LOG2: u32 = 23;
/// RAM (SSRAM2/3, 4 MiB at `0x2000_0000`) and the PSRAM at `0x2100_0000`: 32 MiB in all.
const DATA_BASE: u32 = 0x2000_0000;
const DATA_LEN_LOG2: u32 = 25;
/// The 256 MiB below RAM (nothing is mapped there): no access, so a stack frame that
/// jumps the 32-byte guard still faults.
const BELOW_RAM_BASE: u32 = 0x1000_0000;
const BELOW_RAM_LEN_LOG2: u32 = 28;

/// ACTIVE in the PSRAM (A/B build): where the application runs, 128 KiB aligned to its size.
#[cfg(feature = "ab")]
const ACTIVE_BASE: u32 = (super::psram::PSRAM_BASE + super::psram::ACTIVE_OFFSET) as u32;
#[cfg(feature = "ab")]
const ACTIVE_LEN_LOG2: u32 = super::psram::ACTIVE_SIZE.trailing_zeros();

/// Lowest address of the guard region.
fn guard_base() -> u32 {
    &raw const _stack_guard as u32
}

/// Lowest address the stack may use (just above the guard).
pub fn stack_bottom() -> u32 {
    &raw const _stack_end as u32
}

/// The initial stack pointer: the top of the stack region.
pub fn stack_top() -> u32 {
    &raw const _stack_start as u32
}

// PMSAv7 RASR fields.
const RASR_ENABLE: u32 = 1;
const RASR_XN: u32 = 1 << 28;
/// AP = 0b000: no access.
const AP_NONE: u32 = 0b000 << 24;
/// AP = 0b011: read/write.
const AP_RW: u32 = 0b011 << 24;
/// AP = 0b110: read-only.
const AP_RO: u32 = 0b110 << 24;
/// TEX=0, C=1, B=0: normal memory, write-through (what the default map gives code memory).
const NORMAL_WT: u32 = 1 << 17;
/// TEX=0, C=1, B=1, S=1: normal memory, write-back, shareable (SRAM).
const NORMAL_WB: u32 = (1 << 17) | (1 << 16) | (1 << 18);

const fn rasr_size(log2: u32) -> u32 {
    (log2 - 1) << 1
}

/// Programs and enables the MPU: code read-only, RAM and emulated flash not executable,
/// the stack guard and everything below RAM without access, the default map as background
/// for privileged code.
///
/// The guard needs `_stack_guard` aligned to [`GUARD_LEN`] (memory.x.in puts it at the start of RAM).
pub fn enable_mpu(mpu: &mut cortex_m::peripheral::MPU, scb: &mut cortex_m::peripheral::SCB) {
    const VALID: u32 = 1 << 4;
    // Higher region numbers win where regions overlap: the guard (3) inside RAM (2).
    let regions = [
        (CODE_BASE, AP_RO | NORMAL_WT | rasr_size(CODE_LEN_LOG2)),
        (
            BELOW_RAM_BASE,
            AP_NONE | RASR_XN | rasr_size(BELOW_RAM_LEN_LOG2),
        ),
        (
            DATA_BASE,
            AP_RW | RASR_XN | NORMAL_WB | rasr_size(DATA_LEN_LOG2),
        ),
        (
            guard_base(),
            AP_NONE | RASR_XN | rasr_size(GUARD_LEN.trailing_zeros()),
        ),
        // The A/B build runs from ACTIVE in the PSRAM: executable and read-only there (the
        // bootloader's swap is the only writer); DFU and STATE stay data.
        #[cfg(feature = "ab")]
        (ACTIVE_BASE, AP_RO | NORMAL_WT | rasr_size(ACTIVE_LEN_LOG2)),
    ];
    // SAFETY: the regions only take away rights nothing legitimate uses (writes to code,
    // execution from RAM, any access to the guard); barriers below make them take effect
    // before the next instruction.
    unsafe {
        mpu.ctrl.write(0);
        for (n, (base, rasr)) in regions.into_iter().enumerate() {
            mpu.rbar.write(base | VALID | n as u32);
            mpu.rasr.write(rasr | RASR_ENABLE);
        }
        // ENABLE | PRIVDEFENA (default map as background); HFNMIENA clear, so the
        // HardFault handler runs without the MPU.
        mpu.ctrl.write(0b101);
        // MemManage, BusFault and UsageFault get their own handlers instead of
        // escalating to HardFault (SHCSR MEMFAULTENA, BUSFAULTENA, USGFAULTENA).
        scb.shcsr.modify(|v| v | (0b111 << 16));
    }
    cortex_m::asm::dsb();
    cortex_m::asm::isb();
}

// The four fault vectors share one entry: r0 = the stack pointer the fault left, r1 = the
// exception number; then the stack pointer goes back to the top of the stack region (the
// program does not return from a fault) and the Rust handler runs on a sound stack.
global_asm!(
    ".section .text.baton_fault_entry,\"ax\",%progbits",
    ".global HardFault",
    ".global MemoryManagement",
    ".global BusFault",
    ".global UsageFault",
    ".type HardFault,%function",
    ".type MemoryManagement,%function",
    ".type BusFault,%function",
    ".type UsageFault,%function",
    ".thumb_func",
    "HardFault:",
    ".thumb_func",
    "MemoryManagement:",
    ".thumb_func",
    "BusFault:",
    ".thumb_func",
    "UsageFault:",
    "    mrs r0, msp",
    "    mrs r1, ipsr",
    "    ldr r2, =_stack_start",
    "    mov sp, r2",
    "    b {handler}",
    ".ltorg",
    handler = sym fault_entry,
);

// System Control Block fault registers (ARMv7-M).
const CFSR: *const u32 = 0xE000_ED28 as *const u32;
const HFSR: *const u32 = 0xE000_ED2C as *const u32;
const MMFAR: *const u32 = 0xE000_ED34 as *const u32;
const BFAR: *const u32 = 0xE000_ED38 as *const u32;
// CFSR bits.
const MMARVALID: u32 = 1 << 7;
const MSTKERR: u32 = 1 << 4;
const BFARVALID: u32 = 1 << 15;
const STKERR: u32 = 1 << 12;

/// Where the fault handler decides what happened; `sp` is the stack pointer the fault left
/// (after the hardware stacked, or tried to stack, eight registers), `exception` the
/// exception number (3 HardFault, 4 MemManage, 5 BusFault, 6 UsageFault).
///
/// # Safety
/// Only called from the fault entry above, with the stack pointer reset.
unsafe extern "C" fn fault_entry(sp: u32, exception: u32) -> ! {
    // SAFETY: architectural registers of the System Control Block, always readable.
    let (cfsr, hfsr, mmfar, bfar) = unsafe {
        (
            CFSR.read_volatile(),
            HFSR.read_volatile(),
            MMFAR.read_volatile(),
            BFAR.read_volatile(),
        )
    };
    let fault_addr = if cfsr & MMARVALID != 0 {
        Some(mmfar)
    } else if cfsr & BFARVALID != 0 {
        Some(bfar)
    } else {
        None
    };
    let bottom = stack_bottom();
    // Below the stack's usable part: the guard, or anything under RAM a large frame reached.
    let below_stack = |a: u32| (BELOW_RAM_BASE..bottom).contains(&a);
    let overflow =
        fault_addr.is_some_and(below_stack) || sp < bottom || cfsr & (MSTKERR | STKERR) != 0;
    // The faulting instruction, when the stacked frame is readable (not after an overflow).
    let pc = if !overflow && sp >= bottom && sp + 32 <= stack_top() {
        // SAFETY: the frame lies inside the stack region, which is mapped RAM.
        Some(unsafe { ((sp + 24) as *const u32).read_volatile() })
    } else {
        None
    };
    if overflow {
        defmt::error!(
            "stack overflow: fault at {=u32:#010x}, sp={=u32:#010x}, stack {=u32:#010x}..{=u32:#010x} (exception {=u32}, cfsr={=u32:#010x})",
            fault_addr.unwrap_or(sp),
            sp,
            bottom,
            stack_top(),
            exception,
            cfsr
        );
    } else {
        let kind = match exception {
            4 => "MemManage",
            5 => "BusFault",
            6 => "UsageFault",
            _ => "HardFault",
        };
        match fault_addr {
            Some(a) => defmt::error!(
                "{=str} fault at {=u32:#010x}, pc={=u32:#010x} (cfsr={=u32:#010x})",
                kind,
                a,
                pc.unwrap_or(0),
                cfsr
            ),
            None => defmt::error!(
                "{=str} fault, pc={=u32:#010x} (cfsr={=u32:#010x}, hfsr={=u32:#010x})",
                kind,
                pc.unwrap_or(0),
                cfsr,
                hfsr
            ),
        }
    }
    crate::board::exit(false)
}

/// Deliberate faults that show the guards work (provisioning flags, see `config.rs`).
pub mod demo {
    /// Recurses until the stack overflows: must end in a `stack overflow` fault line.
    pub fn overflow_stack() -> ! {
        defmt::info!(
            "fault demo: recursing until the stack ({=u32:#010x}..{=u32:#010x}) overflows",
            super::stack_bottom(),
            super::stack_top()
        );
        let depth = recurse(0);
        defmt::error!("fault demo: recursion returned at depth {}", depth);
        crate::board::exit(false)
    }

    /// One level of a recursion that never ends on its own (each level keeps 64 bytes live).
    #[inline(never)]
    fn recurse(depth: u32) -> u32 {
        let mut frame = [depth as u8; 64];
        core::hint::black_box(&mut frame);
        if depth == u32::MAX {
            return depth;
        }
        recurse(depth + 1).wrapping_add(u32::from(frame[63]))
    }

    /// Writes to the code memory (the reset handler's first word): must end in a
    /// `MemManage fault at <that address>` line.
    pub fn write_code() -> ! {
        unsafe extern "C" {
            fn Reset() -> !;
        }
        let target = (Reset as *const () as u32) & !3;
        defmt::info!("fault demo: writing to code at {=u32:#010x}", target);
        // SAFETY: deliberately wrong; the MPU must stop this write before it lands.
        unsafe { (target as *mut u32).write_volatile(0) };
        defmt::error!(
            "fault demo: the write to code at {=u32:#010x} went through",
            target
        );
        crate::board::exit(false)
    }
}
