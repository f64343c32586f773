//! Data directories: owner-only permissions, key files checked on load, one
//! process per directory. The Linux agent and the manager (`baton serve`) both
//! keep their state this way.
//!
//! - [`DataDir::open`] creates the directory (mode 0700) or, if group or
//!   others may reach an existing one, takes their permissions away and logs
//!   a warning (a directory it cannot change, or a shared one such as `/tmp`
//!   with its sticky bit, is refused). It then takes an exclusive lock on
//!   `<dir>/lock` ([`LOCK_FILE`]) that lasts as long as the [`DataDir`]: a
//!   second process on the same directory gets [`DataDirError::InUse`]. The
//!   lock is `flock(2)` through std's [`File::try_lock`], so the kernel drops
//!   it when the holder exits, also when it is killed.
//! - [`ensure_private_dir`] does the same for the directories created under
//!   it (the agent's content slots, the manager's uploads), without a lock.
//! - [`read_secret`] reads a key or token file and refuses one that group or
//!   others may read or write, with the `chmod 600` that fixes it.
//! - Files holding secrets or content are opened with [`open_private`]: created
//!   with [`PRIVATE_FILE_MODE`], never through a symbolic link (`O_NOFOLLOW`),
//!   refused unless a regular file with a single link (a hard link planted to a
//!   file elsewhere is not written through), and made private on the open file
//!   if an older one was not (`fchmod`, no path race). [`tighten`] takes group and
//!   other permissions off a path that exists and leaves symbolic links alone.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

/// Mode of the directories Baton creates: owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of the files holding secrets or content: owner read and write.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Name of the lock file inside a data directory.
pub const LOCK_FILE: &str = "lock";

/// Permission bits of group and others.
const GROUP_OTHER: u32 = 0o077;
/// The sticky bit: a directory shared by many users (`/tmp`).
const STICKY: u32 = 0o1000;

/// Why a data directory, or a file in it, cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {} is in use by another baton process ({}lock file {} held)",
        dir.display(),
        holder.map(|pid| format!("pid {pid}; ")).unwrap_or_default(),
        lock.display()
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// The process id the holder wrote into the lock file, if readable.
        holder: Option<u32>,
    },
    /// A key file that group or others may read or write.
    #[error(
        "{} can be read or written by group or others (mode {mode:03o}); a key file must be private to its owner: run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory or file open to group or others whose permissions cannot be changed.
    #[error(
        "{} is open to group or others (mode {mode:03o}) and cannot be made private: {source}; run `chmod go-rwx {}` as its owner",
        path.display(),
        path.display()
    )]
    Loose {
        /// The directory or file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// What the OS said to `chmod`.
        source: io::Error,
    },
    /// A shared directory (sticky bit, like `/tmp`) given as a data directory.
    #[error(
        "{} is a shared directory (sticky bit set, mode {mode:04o}); give baton a directory of its own, such as {}",
        path.display(),
        path.join("baton").display()
    )]
    Shared {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes group and other permissions off `path` if it has any, logging a warning; a path
/// that does not exist, or is a symbolic link (its target is not ours to change), is left
/// alone. Returns whether it changed anything.
pub fn tighten(path: &Path) -> Result<bool, DataDirError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path)(e)),
    };
    if meta.file_type().is_symlink() {
        return Ok(false);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() && mode & STICKY != 0 {
        return Err(DataDirError::Shared {
            path: path.to_path_buf(),
            mode,
        });
    }
    if mode & GROUP_OTHER == 0 {
        return Ok(false);
    }
    let private = mode & !GROUP_OTHER;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(private)).map_err(|source| {
        DataDirError::Loose {
            path: path.to_path_buf(),
            mode,
            source,
        }
    })?;
    tracing::warn!(
        "{} was open to group or others (mode {mode:03o}); changed it to {private:03o}",
        path.display()
    );
    Ok(true)
}

/// Creates directory `path` (and missing parents) with [`PRIVATE_DIR_MODE`], or takes group
/// and other permissions off an existing one ([`tighten`]).
pub fn ensure_private_dir(path: &Path) -> Result<(), DataDirError> {
    match std::fs::metadata(path) {
        // A data directory given as a symbolic link is the directory it names.
        Ok(m) if m.is_dir() => {
            tighten(&std::fs::canonicalize(path).map_err(io_err(path))?).map(drop)
        }
        Ok(_) => Err(DataDirError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(path)
            .map_err(io_err(path)),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads the key or token file `path` as text; `None` if it does not exist. A file group or
/// others may read or write is refused ([`DataDirError::Exposed`]) before it is read.
pub fn read_secret(path: &Path) -> Result<Option<String>, DataDirError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mode = file.metadata().map_err(io_err(path))?.permissions().mode() & 0o777;
    if mode & GROUP_OTHER != 0 {
        return Err(DataDirError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_err(path))?;
    Ok(Some(text))
}

/// Opens `path` with `options` the way files holding secrets or content are opened: created
/// with [`PRIVATE_FILE_MODE`], never through a symbolic link, refused unless it is a regular
/// file with one link, and made private (on the open file) if group or others had access.
/// An existing file is emptied only after those checks if `existing` says so (`options`'
/// own truncation is turned off: a planted file must not be emptied before it is checked),
/// and the open does not block (a planted FIFO is refused, not waited on).
pub fn open_private(options: &OpenOptions, path: &Path, existing: Existing) -> io::Result<File> {
    let mut options = options.clone();
    options
        .truncate(false)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32);
    let file = options.open(path).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a symbolic link; baton does not write through links in its data directory",
            )
        } else {
            e
        }
    })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.nlink() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "has {} hard links; baton writes only files of its own (remove the extra links)",
                meta.nlink()
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & GROUP_OTHER != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & !GROUP_OTHER))?;
        tracing::warn!(
            "{} was open to group or others (mode {mode:03o}); made it private",
            path.display()
        );
    }
    if existing == Existing::Empty {
        file.set_len(0)?;
    }
    Ok(file)
}

/// What [`open_private`] does with a file that exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Keeps its contents.
    Keep,
    /// Empties it (once it is known to be a private regular file of ours).
    Empty,
}

/// A data directory this process holds: private, and locked until dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Holds the lock; closing it (drop, exit, kill) releases it.
    _lock: File,
}

impl DataDir {
    /// Creates `path` owner-only (or makes an existing one so, with a warning) and takes its
    /// exclusive lock; [`DataDirError::InUse`] if another process holds it.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        ensure_private_dir(path)?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = open_private(
            OpenOptions::new().read(true).write(true).create(true),
            &lock_path,
            Existing::Keep,
        )
        .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = lock.read_to_string(&mut text);
                return Err(DataDirError::InUse {
                    dir: path.to_path_buf(),
                    lock: lock_path,
                    holder: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        // For the message a second process prints; the lock itself is the flock.
        lock.set_len(0).map_err(io_err(&lock_path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err(&lock_path))?;
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_new_data_directory_and_its_parents_are_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        let d = DataDir::open(&dir).unwrap();
        assert_eq!(d.path(), dir);
        for p in [tmp.path().join("a"), tmp.path().join("a/b"), dir.clone()] {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
        }
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
    }

    #[test]
    fn planted_links_are_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        chmod(&victim, 0o644);
        // A symbolic link where the lock goes: refused, the target untouched.
        std::os::unix::fs::symlink(&victim, dir.join(LOCK_FILE)).unwrap();
        let err = DataDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        // A hard link: refused too, and not emptied before it is refused.
        std::fs::hard_link(&victim, dir.join(LOCK_FILE)).unwrap();
        let err = DataDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("hard links"), "{err}");
        let tmp_link = dir.join("identity.tmp");
        std::fs::hard_link(&victim, &tmp_link).unwrap();
        let options = OpenOptions::new().write(true).create(true).clone();
        assert!(open_private(&options, &tmp_link, Existing::Empty).is_err());
        // A FIFO is refused without waiting for a reader.
        let fifo = dir.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert!(open_private(&options, &fifo, Existing::Empty).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(mode(&victim), 0o644);
        // tighten leaves a link alone: its target is not ours.
        let link = dir.join("db-wal");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(!tighten(&link).unwrap());
        assert_eq!(mode(&victim), 0o644);
    }

    #[test]
    fn a_loose_file_reopened_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("identity.tmp");
        std::fs::write(&path, "old").unwrap();
        chmod(&path, 0o644);
        let f = open_private(OpenOptions::new().write(true), &path, Existing::Empty).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_data_directory_given_as_a_link_is_the_directory_it_names() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        chmod(&real, 0o755);
        let link = tmp.path().join("data");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let _d = DataDir::open(&link).unwrap();
        assert_eq!(mode(&real), 0o700);
    }

    #[test]
    fn an_open_data_directory_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let _d = DataDir::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let sub = dir.join("content");
        std::fs::create_dir(&sub).unwrap();
        chmod(&sub, 0o775);
        ensure_private_dir(&sub).unwrap();
        assert_eq!(mode(&sub), 0o700);
        // Already private: nothing to do.
        assert!(!tighten(&sub).unwrap());
        assert!(!tighten(&dir.join("absent")).unwrap());
    }

    #[test]
    fn a_shared_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o1777);
        let e = DataDir::open(&dir).unwrap_err();
        assert!(matches!(e, DataDirError::Shared { .. }), "{e}");
        assert!(e.to_string().contains("sticky"), "{e}");
        assert_eq!(mode(&dir), 0o1777, "left as it was");
    }

    #[test]
    fn a_file_is_not_a_data_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(DataDir::open(&file), Err(DataDirError::Io { .. })));
    }

    #[test]
    fn a_key_file_open_to_others_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("identity.key");
        assert!(read_secret(&key).unwrap().is_none());
        let mut f = open_private(
            OpenOptions::new().write(true).create_new(true),
            &key,
            Existing::Keep,
        )
        .unwrap();
        f.write_all(b"secret\n").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(read_secret(&key).unwrap().as_deref(), Some("secret\n"));
        for loose in [0o644, 0o640, 0o604, 0o620, 0o602] {
            chmod(&key, loose);
            let e = read_secret(&key).unwrap_err();
            assert!(
                matches!(e, DataDirError::Exposed { mode, .. } if mode == loose),
                "{e}"
            );
            let text = e.to_string();
            assert!(
                text.contains(&format!("chmod 600 {}", key.display())),
                "{text}"
            );
            assert!(text.contains(&format!("{loose:03o}")), "{text}");
        }
        // Owner-only read is fine.
        chmod(&key, 0o400);
        assert!(read_secret(&key).unwrap().is_some());
    }

    #[test]
    fn tighten_keeps_the_owner_bits() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("baton.db");
        std::fs::write(&db, b"").unwrap();
        chmod(&db, 0o664);
        assert!(tighten(&db).unwrap());
        assert_eq!(mode(&db), 0o600);
    }

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = DataDir::open(&dir).unwrap();
        // flock belongs to the open file, so a second open in this process conflicts too.
        let e = DataDir::open(&dir).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(&e, DataDirError::InUse { holder: Some(pid), .. } if *pid == std::process::id()),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "data directory {} is in use by another baton process",
                dir.display()
            )),
            "{text}"
        );
        assert!(
            text.contains(&dir.join(LOCK_FILE).display().to_string()),
            "{text}"
        );
        drop(first);
        let again = DataDir::open(&dir).unwrap();
        drop(again);
    }

    /// Set for the child process of [`a_killed_holder_releases_the_lock`]: the directory it locks.
    const HOLDER_ENV: &str = "BATON_TEST_LOCK_HOLDER";

    /// The child of [`a_killed_holder_releases_the_lock`] (this test binary run again): takes
    /// the lock and holds it until killed. Does nothing in a normal run.
    #[test]
    #[ignore = "the child process of a_killed_holder_releases_the_lock"]
    fn lock_holder_child() {
        let Some(dir) = std::env::var_os(HOLDER_ENV) else {
            return;
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let _held = loop {
            match DataDir::open(Path::new(&dir)) {
                Ok(d) => break d,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        std::thread::sleep(std::time::Duration::from_secs(60));
    }

    #[test]
    fn a_killed_holder_releases_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "linux::datadir::test::lock_holder_child"])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env(HOLDER_ENV, &dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match DataDir::open(&dir) {
                // Locked, its holder's pid not written yet (the child is between the two).
                Err(DataDirError::InUse { holder: None, .. }) => {}
                Err(DataDirError::InUse { holder, .. }) => {
                    assert_eq!(holder, Some(child.id()));
                    break;
                }
                Ok(d) => drop(d),
                Err(e) => panic!("{e}"),
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the lock holder exited early: {status}");
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the child never took the lock and named itself");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // SIGKILL gave it no chance to unlock: the kernel released the lock at its exit.
        let d = DataDir::open(&dir).unwrap();
        drop(d);
    }
}
