//! `baton keys new --out FILE`: a new Ed25519 key (a root key, a publisher key) in a file
//! only its owner may read; prints the public key, which trust documents name.

use std::path::PathBuf;

use anyhow::{Context, bail};
use baton_manager::trust::{key_hex, write_key_file};
use baton_protocol::identity::Identity;
use clap::{Args, Subcommand};

/// `baton keys …`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new Ed25519 key: its seed goes to --out (mode 0600; an existing file is never
    /// replaced), its public key (hex) to stdout.
    New(NewKeyArgs),
}

/// Flags of `baton keys new`.
#[derive(Args, Debug)]
pub struct NewKeyArgs {
    /// Where to write the key (refused if the file exists). Keep root keys offline.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Runs `baton keys …`.
pub fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::New(args) => {
            if args.out.exists() {
                bail!(
                    "{} exists; a key file is never replaced (choose another --out)",
                    args.out.display()
                );
            }
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let identity = Identity::from_seed(seed);
            write_key_file(&args.out, &identity)
                .with_context(|| format!("cannot write {}", args.out.display()))?;
            println!("{}", key_hex(&identity.public()));
            Ok(())
        }
    }
}
