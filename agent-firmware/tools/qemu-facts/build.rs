//! Puts `memory.x` (code memory at 0x0, 32 KiB of SRAM) where the linker finds it, and an
//! empty `defmt.x`: agent-firmware/.cargo/config.toml's rustflags name it for every crate
//! below agent-firmware/, and this program does not use defmt.
fn main() {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    std::fs::write(out.join("defmt.x"), "/* no defmt in this program */\n").expect("write defmt.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
}
