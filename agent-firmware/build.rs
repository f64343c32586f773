//! Writes the board's `memory.x` (QEMU's from `memory.x.in`, the NUCLEO-F429ZI's from
//! `memory-nucleo-f429zi.x`) where the linker finds it and relinks when it changes; for
//! QEMU writes the `device.x` cortex-m-rt's `device` feature includes (empty: every
//! interrupt vector is set in `src/board/mps2_an385/mod.rs`'s table), for the NUCLEO the
//! device crate's own is used.

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // BATON_FW_FLASH_KB widens FLASH for a test build that need not meet the 128 KiB budget
    // (scripts/test.sh's opt-level "s" build, run through the HIL suite as "z" is).
    // The source is not named memory.x: the linker would take a memory.x in the package
    // directory before this one.
    // One board per build (its cargo feature): the NUCLEO-F429ZI's memory map, and its
    // interrupt table from embassy-stm32's device crate; else QEMU's mps2-an385.
    let nucleo = env::var_os("CARGO_FEATURE_BOARD_NUCLEO_F429ZI").is_some();
    let source = if nucleo {
        "memory-nucleo-f429zi.x"
    } else {
        "memory.x.in"
    };
    let mut memory = fs::read_to_string(source).expect("read the board's memory map");
    if let Ok(kb) = env::var("BATON_FW_FLASH_KB") {
        let kb: u32 = kb.parse().expect("BATON_FW_FLASH_KB is a number of KiB");
        memory = memory.replace(
            "FLASH   : ORIGIN = 0x00000000, LENGTH = 128K",
            &format!("FLASH   : ORIGIN = 0x00000000, LENGTH = {kb}K"),
        );
        assert!(
            memory.contains(&format!("LENGTH = {kb}K")),
            "memory.x.in's FLASH line changed"
        );
    }
    // The A/B build (feature `ab`): the application runs from ACTIVE in the PSRAM
    // (src/board/mps2_an385/psram.rs), started by the bootloader at 0x0; right after its
    // vector table comes the image header (`.baton_image`: magic, version, flags) the
    // provisioning tool finds and patches.
    if env::var_os("CARGO_FEATURE_AB").is_some() {
        let line = memory
            .lines()
            .find(|l| l.trim_start().starts_with("FLASH"))
            .expect("memory.x.in has a FLASH line")
            .to_string();
        memory = memory.replace(
            &line,
            "  FLASH   : ORIGIN = 0x21F00000, LENGTH = 128K /* ACTIVE (A/B build) */",
        );
        memory.push_str(
            "\nSECTIONS\n{\n  .baton_image : ALIGN(4)\n  {\n    KEEP(*(.baton_image));\n  } > FLASH\n}\nINSERT AFTER .vector_table;\n_stext = ADDR(.baton_image) + SIZEOF(.baton_image);\n",
        );
    }
    fs::write(out.join("memory.x"), memory).expect("write memory.x");
    if nucleo {
        // The device crate's table (stm32-metapac's device.x) must be the one found.
        let _ = fs::remove_file(out.join("device.x"));
    } else {
        fs::write(
            out.join("device.x"),
            "/* The interrupt table is src/board/mps2_an385/mod.rs's __INTERRUPTS. */\n",
        )
        .expect("write device.x");
    }
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x.in");
    println!("cargo:rerun-if-changed=memory-nucleo-f429zi.x");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=BATON_FW_FLASH_KB");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_AB");
}
