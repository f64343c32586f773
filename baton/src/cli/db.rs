//! `baton db copy --from sqlite:PATH --to postgres://…`: moves an installation
//! from its SQLite file to an empty PostgreSQL database (then `baton serve --db
//! postgres://…` runs on it). Every table is copied in one transaction and its
//! row count checked; a target with data is refused. Stop the manager first: what
//! it writes to the file after the copy is not in PostgreSQL.

use std::path::PathBuf;

use anyhow::{Context, bail};
use baton_manager::store::postgres::read_password;
use baton_manager::store::{PostgresStore, copy, is_postgres_url};
use clap::{Args, Subcommand};

/// `baton db …`.
#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Copy an installation's SQLite database into an empty PostgreSQL database (stop the manager first).
    Copy(CopyArgs),
}

/// Flags of `baton db copy`.
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The source: `sqlite:PATH`, the manager's database file (`<data-dir>/baton.db`).
    #[arg(long, value_name = "sqlite:PATH")]
    pub from: String,
    /// The target, an empty PostgreSQL database, as `baton serve --db` takes it:
    /// `postgres://USER@HOST:PORT/DBNAME` (no password in it).
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// File whose first line is the PostgreSQL password; without it `BATON_DB_PASSWORD`,
    /// or else `PGPASSWORD`, from the environment.
    #[arg(long, value_name = "FILE")]
    pub db_password_file: Option<PathBuf>,
}

/// Runs a `baton db` command.
pub fn run(cmd: DbCommand) -> anyhow::Result<()> {
    match cmd {
        DbCommand::Copy(args) => copy_database(&args),
    }
}

fn copy_database(args: &CopyArgs) -> anyhow::Result<()> {
    let Some(from) = args.from.strip_prefix("sqlite:") else {
        bail!("--from takes sqlite:PATH (the manager's baton.db)");
    };
    if !is_postgres_url(&args.to) {
        bail!("--to takes a PostgreSQL URL (postgres://USER@HOST:PORT/DBNAME)");
    }
    let password = read_password(args.db_password_file.as_deref())?;
    let target = PostgresStore::connect(&args.to, password.as_deref())
        .context("the target PostgreSQL database")?;
    let counts = copy::sqlite_to_postgres(std::path::Path::new(from), &target)
        .with_context(|| format!("copying {from}"))?;
    let rows: u64 = counts.iter().map(|(_, n)| n).sum();
    for (table, n) in &counts {
        println!("{table:<18} {n:>10}");
    }
    println!(
        "copied {rows} rows in {} tables from {from}; start the manager with --db and the same URL",
        counts.len()
    );
    Ok(())
}
