//! The connection machinery under [`super::postgres::PostgresStore`]: a small
//! bounded pool of `tokio-postgres` clients whose connections run on the store's
//! own thread, and a blocking facade over them.
//!
//! Why a thread of its own: the [`Store`](super::Store) trait is synchronous and
//! the manager calls it from async tasks (under the [`SharedStore`](super::SharedStore)
//! mutex, on a runtime worker). The synchronous `postgres` crate would start a
//! runtime inside that runtime and panic; `tokio::task::block_in_place` works only
//! on a multi-thread runtime. Here each connection's socket is driven by a
//! current-thread runtime on the `baton-postgres` thread, and a store call waits
//! for its answer by parking the calling thread ([`block_on`]) — the same kind of
//! short blocking a SQLite call does on disk, without entering any runtime, so it
//! works from a plain thread, a current-thread runtime and a multi-thread one.
//!
//! Bounds: at most [`POOL_SIZE`] connections; a caller waits at most
//! [`POOL_WAIT`] for one; connecting gives up after [`CONNECT_TIMEOUT`]; a
//! statement is cancelled by the server after [`STATEMENT_TIMEOUT`], and a session
//! idle inside a transaction ended after [`IDLE_IN_TRANSACTION_TIMEOUT`]; a dead peer
//! is noticed by TCP keepalives within about 25 s. A connection found closed is
//! dropped and replaced on the next call (reconnection after a server restart).

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row};

use super::{Result, StoreError};

/// Most connections one store keeps open (the manager serialises its calls, so one is
/// busy at a time; the others are spares for `baton` commands sharing the process).
pub const POOL_SIZE: usize = 4;
/// Longest a call waits for a free connection before failing.
pub const POOL_WAIT: Duration = Duration::from_secs(30);
/// Longest a new connection may take (TCP, authentication).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one statement may run before the server cancels it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a session may sit idle inside a transaction before the server ends it (and
/// its locks): half the longest lease time-to-live, so that a frozen manager holding the
/// lease row's lock does not block a takeover for long. The store's transactions run their
/// statements back to back.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits for `future` on the calling thread by parking it until woken. Never enters a
/// tokio runtime, so it may be called from inside one (see the module notes).
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// The `baton-postgres` thread: a current-thread runtime that drives every connection.
#[derive(Debug)]
struct Driver {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Driver {
    fn start() -> Result<Driver> {
        let unavailable = |e: std::io::Error| {
            StoreError::Unavailable(format!("cannot start the database thread: {e}"))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(unavailable)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("baton-postgres".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(unavailable)?;
        Ok(Driver {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A bounded pool of connections to one database.
pub(super) struct Pool {
    config: Config,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// Declared last: dropped after the clients, so their connections end first.
    driver: Driver,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the configuration: it holds the password.
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        f.debug_struct("Pool")
            .field("hosts", &hosts)
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Client>,
    open: usize,
}

impl Pool {
    /// A pool for `config` (which already carries the password, if any); opens one
    /// connection to find out now whether the database can be reached.
    pub(super) fn open(mut config: Config) -> Result<Pool> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("baton");
        }
        let pool = Pool {
            config,
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            driver: Driver::start()?,
        };
        drop(pool.get()?);
        Ok(pool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection: an idle one that is still open, a new one while fewer than
    /// [`POOL_SIZE`] are open, or the next one freed within [`POOL_WAIT`].
    pub(super) fn get(&self) -> Result<Conn<'_>> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut state = self.lock();
        loop {
            while let Some(client) = state.idle.pop() {
                if !client.is_closed() {
                    return Ok(Conn {
                        client: Some(client),
                        pool: self,
                        broken: Default::default(),
                    });
                }
                state.open -= 1;
                tracing::warn!("a database connection was closed; opening another");
            }
            if state.open < POOL_SIZE {
                state.open += 1;
                drop(state);
                return match self.connect() {
                    Ok(client) => Ok(Conn {
                        client: Some(client),
                        pool: self,
                        broken: Default::default(),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "no free database connection within {} s ({POOL_SIZE} in use)",
                    POOL_WAIT.as_secs()
                )));
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Opens a connection whose socket the driver thread runs.
    fn connect(&self) -> Result<Client> {
        let config = self.config.clone();
        let task = self.driver.handle.spawn(async move {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!("database connection ended: {e}");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        let client = block_on(task)
            .map_err(|e| StoreError::Unavailable(format!("database connect task: {e}")))??;
        block_on(client.batch_execute(&format!(
            "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}",
            STATEMENT_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        )))?;
        Ok(client)
    }
}

/// Parameters of one statement.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// One connection taken from the pool for one store call; back to the pool when dropped.
pub(super) struct Conn<'p> {
    client: Option<Client>,
    pool: &'p Pool,
    /// A call found the connection closed: it is not given back to the pool.
    broken: std::cell::Cell<bool>,
}

impl<'p> Conn<'p> {
    fn client(&self) -> &Client {
        self.client.as_ref().expect("held until drop")
    }

    /// `result`, noting a closed connection: closed on this side, or ended by the server
    /// (SQLSTATE class 57P: shut down, terminated by an administrator, crashed), which
    /// may be reported before the connection is seen closed.
    fn checked<T>(&self, result: Result<T, tokio_postgres::Error>) -> Result<T> {
        result.map_err(|e| {
            if e.is_closed() || e.code().is_some_and(|c| c.code().starts_with("57P")) {
                self.broken.set(true);
            }
            StoreError::from(e)
        })
    }

    /// Every row `sql` returns.
    pub(super) fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.checked(block_on(self.client().query(sql, params)))
    }

    /// The one row `sql` returns, if any (more than one is an error).
    pub(super) fn opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.checked(block_on(self.client().query_opt(sql, params)))
    }

    /// The one row `sql` returns.
    pub(super) fn one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        self.checked(block_on(self.client().query_one(sql, params)))
    }

    /// Prepares a statement to run many times.
    pub(super) fn prepare(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        self.checked(block_on(self.client().prepare(sql)))
    }

    /// Runs `sql` (text or prepared); how many rows it changed.
    pub(super) fn exec<S>(&self, sql: &S, params: Params<'_>) -> Result<u64>
    where
        S: tokio_postgres::ToStatement + ?Sized,
    {
        self.checked(block_on(self.client().execute(sql, params)))
    }

    /// Runs statements without parameters.
    pub(super) fn batch(&self, sql: &str) -> Result<()> {
        self.checked(block_on(self.client().batch_execute(sql)))
    }

    /// Starts a transaction, rolled back unless [`Tx::commit`] is called.
    pub(super) fn begin(&mut self) -> Result<Tx<'_, 'p>> {
        self.batch("BEGIN")?;
        Ok(Tx {
            conn: self,
            done: false,
        })
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let mut state = self.pool.lock();
            if self.broken.get() || client.is_closed() {
                state.open -= 1;
            } else {
                state.idle.push(client);
            }
            drop(state);
            self.pool.freed.notify_one();
        }
    }
}

/// An open transaction on a [`Conn`] (derefs to it); rolled back when dropped uncommitted.
pub(super) struct Tx<'c, 'p> {
    conn: &'c mut Conn<'p>,
    done: bool,
}

impl Tx<'_, '_> {
    /// Commits the transaction.
    pub(super) fn commit(mut self) -> Result<()> {
        self.done = true;
        self.conn.batch("COMMIT")
    }
}

impl<'p> std::ops::Deref for Tx<'_, 'p> {
    type Target = Conn<'p>;
    fn deref(&self) -> &Conn<'p> {
        self.conn
    }
}

impl Drop for Tx<'_, '_> {
    fn drop(&mut self) {
        if !self.done {
            // A broken connection has no transaction left to roll back.
            let _ = self.conn.batch("ROLLBACK");
        }
    }
}
