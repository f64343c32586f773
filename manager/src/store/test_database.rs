//! Throwaway PostgreSQL databases for tests: one new database per test (so tests
//! run in parallel), dropped when the [`TestDatabase`] is.
//!
//! The server is named by [`URL_VAR`] (`postgresql://user@host:port/db`; the
//! database part is replaced per test) and its password, if any, by the file
//! [`PASSWORD_FILE_VAR`] names; `scripts/pg-test-cluster.sh` (run by
//! `scripts/test.sh`) starts a throwaway cluster and sets both. Without them a
//! test that needs PostgreSQL fails when `CI` is set, and otherwise says loudly
//! that it was skipped — it never passes silently.

use std::str::FromStr;

use super::PostgresStore;
use super::pg::Pool;

/// The environment variable naming the test server's URL.
pub const URL_VAR: &str = "BATON_TEST_POSTGRES_URL";
/// The environment variable naming a file with the test server's password.
pub const PASSWORD_FILE_VAR: &str = "BATON_TEST_POSTGRES_PASSWORD_FILE";
/// The environment variable naming the directory of the test server's unix socket.
pub const SOCKET_DIR_VAR: &str = "BATON_TEST_POSTGRES_SOCKET_DIR";
/// The environment variable naming the test server's port (part of the socket's name).
pub const PORT_VAR: &str = "BATON_TEST_POSTGRES_PORT";

/// One database made for one test on the test server; dropped with it.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    server_url: String,
    password: Option<String>,
    password_file: Option<std::path::PathBuf>,
}

/// The test server's URL, or `None` after saying loudly that `test` is skipped
/// (a failure instead when the `CI` environment variable is set).
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!(
            "{test}: no PostgreSQL in CI: {URL_VAR} is unset (scripts/test.sh starts a cluster)"
        ),
        _ => {
            say_skipped(&format!(
                "{test}: no PostgreSQL (set {URL_VAR} or run scripts/test.sh)"
            ));
            None
        }
    }
}

/// Prints `SKIPPED: why` on standard error past the test harness's capture (which
/// hides what a passing test prints), so a skipped test is seen in every run.
pub fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

impl TestDatabase {
    /// Makes a new empty database for `test` (see [`server_url`] when there is no server).
    pub fn create(test: &str) -> Option<TestDatabase> {
        let server_url = server_url(test)?;
        let password_file = std::env::var_os(PASSWORD_FILE_VAR).map(std::path::PathBuf::from);
        let password = password_file.as_ref().map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("{PASSWORD_FILE_VAR} {}: {e}", path.display()))
                .trim_end_matches(['\r', '\n'])
                .to_string()
        });
        let label: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        // Random, so that parallel tests and processes never pick the same name.
        let mut name = format!("bt_{:016x}_{label}", rand::random::<u64>());
        name.truncate(63);
        let db = TestDatabase {
            url: with_dbname(&server_url, &name),
            name,
            server_url,
            password,
            password_file,
        };
        db.admin()
            .batch(&format!("CREATE DATABASE \"{}\"", db.name))
            .unwrap_or_else(|e| panic!("creating test database {}: {e}", db.name));
        Some(db)
    }

    /// A pool on the server's own database, for creating and dropping test databases.
    fn admin(&self) -> AdminConn {
        let mut config = tokio_postgres::Config::from_str(&self.server_url)
            .unwrap_or_else(|e| panic!("{URL_VAR}: {e}"));
        if let Some(p) = &self.password {
            config.password(p.as_str());
        }
        AdminConn(Pool::open(config).unwrap_or_else(|e| panic!("test server: {e}")))
    }

    /// The database's URL (no password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's password, if it has one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The file holding the server's password, if it has one (for `--db-password-file`).
    pub fn password_file(&self) -> Option<&std::path::Path> {
        self.password_file.as_deref()
    }

    /// A store on this database (migrated on the first open).
    pub fn open(&self) -> PostgresStore {
        PostgresStore::connect(&self.url, self.password())
            .unwrap_or_else(|e| panic!("test database {}: {e}", self.name))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = self.admin().batch(&sql) {
            eprintln!("dropping test database {}: {e}", self.name);
        }
    }
}

/// A connection pool on the test server's own database.
struct AdminConn(Pool);

impl AdminConn {
    fn batch(&self, sql: &str) -> super::Result<()> {
        self.0.get()?.batch(sql)
    }
}

/// `url` (`scheme://user@host:port/db?params`) naming database `name` instead.
pub fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    format!("{}/{name}{query}", &base[..host_end])
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_test_url_names_another_database() {
        assert_eq!(
            super::with_dbname("postgresql://baton@127.0.0.1:5433/postgres", "t1"),
            "postgresql://baton@127.0.0.1:5433/t1"
        );
        assert_eq!(
            super::with_dbname("postgresql://baton@h:1?sslmode=disable", "t2"),
            "postgresql://baton@h:1/t2?sslmode=disable"
        );
        assert_eq!(
            super::with_dbname("postgresql://baton@%2Ftmp%2Fpg/postgres", "t3"),
            "postgresql://baton@%2Ftmp%2Fpg/t3"
        );
    }
}
