//! QEMU 7.2 mps2-an385 facts for A/B boot: what survives a reset, where code runs,
//! whether SYSRESETREQ and the CMSDK watchdog reset the board.
#![no_std]
#![no_main]
use cortex_m_rt::{entry, exception};
use cortex_m_semihosting::{debug, hprintln};

const PSRAM: u32 = 0x2100_0000;
const COUNT: *mut u32 = (PSRAM + 0x00F0_0000) as *mut u32; // boot count in PSRAM
const RAMW: *mut u32 = 0x2000_4000 as *mut u32; // SRAM word outside .data/.bss
const CODEW: *mut u32 = 0x0030_0000 as *mut u32; // code SSRAM word outside the ELF
static ROW: u32 = 0x1111_1111; // in .rodata, loaded from the ELF

const WDOG: u32 = 0x4000_8000;

#[entry]
fn main() -> ! {
    unsafe {
        let n = COUNT.read_volatile();
        let n = if n == 0xFFFF_FFFF { 0 } else { n } + 1;
        COUNT.write_volatile(n);
        let row = &ROW as *const u32 as *mut u32;
        hprintln!(
            "boot {} ram_word={:#x} code_word={:#x} rodata={:#x} vtor={:#x}",
            n,
            RAMW.read_volatile(),
            CODEW.read_volatile(),
            row.read_volatile(),
            (0xE000_ED08 as *const u32).read_volatile()
        );
        RAMW.write_volatile(0xABCD_0000 | n);
        CODEW.write_volatile(0xC0DE_0000 | n);
        row.write_volatile(0x2222_2222);
        // Code in PSRAM: movs r0,#42 ; bx lr
        let f = (PSRAM + 0x00F1_0000) as *mut u16;
        f.write_volatile(0x202A);
        f.add(1).write_volatile(0x4770);
        cortex_m::asm::dsb();
        cortex_m::asm::isb();
        let func: extern "C" fn() -> u32 = core::mem::transmute((f as u32) | 1);
        hprintln!("psram code returned {}", func());
        match n % 3 {
            1 => {
                hprintln!("requesting SYSRESETREQ");
                cortex_m::peripheral::SCB::sys_reset();
            }
            2 => {
                hprintln!("starting the watchdog (0.2 s, INTEN|RESEN), spinning");
                let w = |o: u32, v: u32| ((WDOG + o) as *mut u32).write_volatile(v);
                w(0xC00, 0x1ACC_E551); // unlock
                w(0x000, 25_000_000 / 5); // LOAD
                w(0x008, 0b11); // CONTROL: INTEN | RESEN
                w(0xC00, 0); // lock
                loop {
                    cortex_m::asm::nop();
                }
            }
            _ => {
                hprintln!("done");
                debug::exit(debug::EXIT_SUCCESS);
                loop {
                    cortex_m::asm::wfi();
                }
            }
        }
    }
}

/// The watchdog's interrupt line is wired to NMI: its first expiry lands here.
#[exception]
unsafe fn NonMaskableInt() {
    hprintln!("NMI (watchdog first expiry)");
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
