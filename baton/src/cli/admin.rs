//! `baton admin`: administrators of the web UI and named API tokens, written
//! straight into the manager's database file through its store (SQLite in WAL
//! mode, so this works beside a running manager, which sees them at once).
//!
//! - `baton admin add NAME` reads the password from `--password-file`, or else
//!   from standard input (prompted twice, without echo, on a terminal);
//!   adding an existing name changes its password.
//! - `baton admin token NAME` creates (or replaces) an API token for scripts and
//!   prints it once; `baton admin revoke-token NAME` deletes it.
//! - `--role read|operate|admin` on both says what the administrator or token may do
//!   (see `baton_manager::roles`); default `admin` for a new one, and an existing
//!   administrator keeps its role unless `--role` is given.
//!
//! Each change (and each one refused) is recorded in the audit log with `via` = `cli`,
//! the user running the command, and the address `local`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use baton_manager::audit;
use baton_manager::http::web::users;
use baton_manager::registry::unix_now;
use baton_manager::roles::Role;
use baton_manager::store::postgres::read_password as read_db_password;
use baton_manager::store::{AdminSet, PostgresStore, SqliteStore, Store, is_postgres_url};
use clap::{Args, Subcommand};

/// Where the manager's database is.
#[derive(Args, Debug, Clone)]
pub struct DbOpts {
    /// The manager's data directory (the database is `<data-dir>/baton.db` unless --db).
    #[arg(long, env = "BATON_DATA_DIR", default_value = "baton-data")]
    pub data_dir: PathBuf,
    /// The database, as given to `baton serve --db` (a file or a PostgreSQL URL).
    #[arg(long, value_name = "FILE|URL")]
    pub db: Option<PathBuf>,
    /// File whose first line is the PostgreSQL password (else `BATON_DB_PASSWORD`, `PGPASSWORD`).
    #[arg(long, value_name = "FILE")]
    pub db_password_file: Option<PathBuf>,
}

impl DbOpts {
    fn open(&self) -> anyhow::Result<Box<dyn Store>> {
        let path = self
            .db
            .clone()
            .unwrap_or_else(|| self.data_dir.join("baton.db"));
        if let Some(url) = path.to_str().filter(|p| is_postgres_url(p)) {
            let password = read_db_password(self.db_password_file.as_deref())?;
            let store = PostgresStore::connect(url, password.as_deref())
                .context("the PostgreSQL database")?;
            return Ok(Box::new(store));
        }
        // Created owner-only if missing, as `baton serve` would create it; an existing
        // directory is left as it is (with --db it may be any directory).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(baton_agent_core::linux::datadir::PRIVATE_DIR_MODE)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let store =
            SqliteStore::open(&path).with_context(|| format!("database {}", path.display()))?;
        Ok(Box::new(store))
    }
}

/// `baton admin` subcommands.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Add an administrator of the web UI (or change its password).
    Add {
        /// The administrator's login name.
        name: String,
        /// Read the password from this file (first line) instead of standard input.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// What the administrator may do: read (views), operate (also publish, push,
        /// groups, policies, cancel) or admin (also enrolment and placement). Default: admin
        /// when added, unchanged when the password is changed.
        #[arg(long)]
        role: Option<Role>,
        #[command(flatten)]
        db: DbOpts,
    },
    /// Create (or replace) a named API token for scripts; prints it once.
    Token {
        /// The token's name.
        name: String,
        /// What the token may do: read (views, metrics), operate (also publish, push,
        /// groups, policies, cancel) or admin (also enrolment and placement).
        #[arg(long, default_value = "admin")]
        role: Role,
        #[command(flatten)]
        db: DbOpts,
    },
    /// Delete a named API token.
    RevokeToken {
        /// The token's name.
        name: String,
        #[command(flatten)]
        db: DbOpts,
    },
    /// List administrators.
    List {
        #[command(flatten)]
        db: DbOpts,
    },
}

/// Reads a line from the terminal with echo off (restored afterwards).
fn read_hidden(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    let hidden = stty("-echo");
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if hidden {
        stty("echo");
    }
    eprintln!();
    read.context("cannot read the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_password(file: Option<&PathBuf>) -> anyhow::Result<String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_string());
    }
    if std::io::stdin().is_terminal() {
        let first = read_hidden("Password: ")?;
        let again = read_hidden("Again: ")?;
        if first != again {
            bail!("the passwords differ");
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Runs `baton admin ...`; each change is recorded in the audit log as `cli`.
pub fn run(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Add {
            name,
            password_file,
            role,
            db,
        } => {
            let password = read_password(password_file.as_ref())?;
            let mut store = db.open()?;
            let done = users::set_admin(store.as_mut(), &name, &password, role, unix_now());
            let action = match &done {
                Ok(AdminSet::PasswordChanged) => "admin.password",
                _ => "admin.add",
            };
            record(store.as_mut(), action, &name, &done);
            match done? {
                AdminSet::Added => println!("administrator {name} added"),
                AdminSet::PasswordChanged => println!("password of administrator {name} changed"),
            }
        }
        AdminCommand::Token { name, role, db } => {
            let mut store = db.open()?;
            let done = users::new_api_token(store.as_mut(), &name, role, unix_now());
            record(store.as_mut(), "api-token.create", &name, &done);
            let token = done?;
            eprintln!(
                "API token {name}, role {role} (shown once; send it as `Authorization: Bearer <token>`):"
            );
            println!("{token}");
        }
        AdminCommand::RevokeToken { name, db } => {
            let mut store = db.open()?;
            let done = match store.revoke_api_token(&name) {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::anyhow!("no API token named {name:?}")),
                Err(e) => Err(e.into()),
            };
            record(store.as_mut(), "api-token.revoke", &name, &done);
            done?;
            println!("API token {name} revoked");
        }
        AdminCommand::List { db } => {
            let store = db.open()?;
            for name in store.admins()? {
                let role = store.admin_role(&name)?.unwrap_or(Role::Read);
                println!("{name}\t{role}");
            }
        }
    }
    Ok(())
}

/// Records a change this command made (or tried) in the audit log, as `cli`.
fn record<T, E: std::fmt::Display>(
    store: &mut dyn Store,
    action: &str,
    target: &str,
    done: &Result<T, E>,
) {
    let outcome = done.as_ref().map(|_| ()).map_err(|e| e.to_string());
    audit::record(store, audit::cli_entry(action, target, outcome));
}
