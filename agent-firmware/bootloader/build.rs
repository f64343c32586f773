//! Puts `memory.x` (16 KiB at 0x0) where the linker finds it, and an empty `defmt.x`:
//! agent-firmware/.cargo/config.toml's rustflags name it for every crate below
//! agent-firmware/, and the bootloader does not use defmt.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    fs::write(out.join("defmt.x"), "/* no defmt in the bootloader */\n").expect("write defmt.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
}
