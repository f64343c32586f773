//! Where `POST /api/v1/jobs` may publish a file from: the manager's upload directory and
//! the directories the administrator lists (`baton serve --content-dir DIR`, repeatable),
//! never its data directory (keys, admin token, database) nor its other secrets (the
//! database file given with `--db` and its WAL files, the TLS key, the ready file, which
//! holds the admin token), even inside a listed directory.
//!
//! Paths are compared after resolving symlinks and `..` (`canonicalize`), so a link in
//! a content directory pointing at `manager.key` is refused like the key itself. The
//! file is then published from the resolved path. Someone who can write in a content
//! directory can still swap a file between the check and the read; listing a directory
//! says its writers are trusted with what the manager publishes.

use std::io;
use std::path::{Path, PathBuf};

use crate::service::ApiError;

/// The directories files may be published from, resolved once at start.
#[derive(Clone, Debug)]
pub struct ContentDirs {
    /// The upload directory (inside the data directory, allowed nonetheless).
    uploads: PathBuf,
    /// The directories the administrator listed.
    listed: Vec<PathBuf>,
    /// Never published from: the data directory and the manager's other secret files.
    refused: Vec<PathBuf>,
}

impl ContentDirs {
    /// Resolves the directories: `data_dir` must exist; each listed directory must exist
    /// and lie outside the data directory; `secrets` are further files never published
    /// (also those the manager writes later, such as the ready file, which holds the
    /// admin token: a missing one is resolved through its directory).
    pub fn new(
        data_dir: &Path,
        upload_dir: &Path,
        listed: &[PathBuf],
        secrets: &[PathBuf],
    ) -> io::Result<Self> {
        let data = data_dir.canonicalize().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("data directory {}: {e}", data_dir.display()),
            )
        })?;
        let uploads = resolve_maybe_missing(upload_dir)?;
        let mut resolved = Vec::new();
        for dir in listed {
            let canon = dir.canonicalize().map_err(|e| {
                io::Error::new(e.kind(), format!("--content-dir {}: {e}", dir.display()))
            })?;
            if !canon.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("--content-dir {}: not a directory", dir.display()),
                ));
            }
            if canon.starts_with(&data) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "--content-dir {}: inside the data directory {}, which is never published from",
                        dir.display(),
                        data.display()
                    ),
                ));
            }
            resolved.push(canon);
        }
        let mut refused = vec![data];
        refused.extend(secrets.iter().filter_map(|s| resolve_maybe_missing(s).ok()));
        Ok(ContentDirs {
            uploads,
            listed: resolved,
            refused,
        })
    }

    /// The resolved path of `path` if the manager may publish it: `400` if it is not
    /// absolute or cannot be read, `403` if it lies outside the allowed directories or
    /// in the data directory (uploads aside).
    pub fn check(&self, path: &Path) -> Result<PathBuf, ApiError> {
        if !path.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "{}: give an absolute path (the manager may run in another directory)",
                path.display()
            )));
        }
        let canon = path
            .canonicalize()
            .map_err(|e| ApiError::BadRequest(format!("cannot read {}: {e}", path.display())))?;
        if canon.starts_with(&self.uploads) {
            return Ok(canon);
        }
        if let Some(secret) = self.refused.iter().find(|r| canon.starts_with(r)) {
            return Err(ApiError::Forbidden(format!(
                "{} is the manager's own data ({}), which is never published",
                path.display(),
                secret.display()
            )));
        }
        if self.listed.iter().any(|d| canon.starts_with(d)) {
            return Ok(canon);
        }
        let allowed: Vec<String> = std::iter::once(&self.uploads)
            .chain(&self.listed)
            .map(|d| d.display().to_string())
            .collect();
        Err(ApiError::Forbidden(format!(
            "{} is outside the directories the manager publishes from ({}): upload the file \
             (POST /api/v1/uploads) or start the manager with --content-dir DIR",
            path.display(),
            allowed.join(", ")
        )))
    }
}

/// `path` with symlinks and `..` resolved; a path that does not exist yet (a file the
/// manager will write) by its directory, which must.
fn resolve_maybe_missing(path: &Path) -> io::Result<PathBuf> {
    match path.canonicalize() {
        Ok(p) => Ok(p),
        Err(e) => match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => Ok(parent.canonicalize().map_err(|_| e)?.join(name)),
            _ => Err(e),
        },
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn only_uploads_and_listed_directories_are_published_never_the_data_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let uploads = data.join("uploads");
        let content = tmp.path().join("content");
        let elsewhere = tmp.path().join("elsewhere");
        for d in [&uploads, &content, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(data.join("manager.key"), b"secret").unwrap();
        std::fs::write(uploads.join("fw.bin"), b"up").unwrap();
        std::fs::write(content.join("fw.bin"), b"fw").unwrap();
        std::fs::write(elsewhere.join("fw.bin"), b"x").unwrap();
        let tls_key = elsewhere.join("tls.key");
        std::fs::write(&tls_key, b"k").unwrap();
        // The ready file holds the admin token; written after the check is set up.
        let ready = content.join("ready.json");
        // A symlink in the content directory to the key, and to a parent of it.
        std::os::unix::fs::symlink(data.join("manager.key"), content.join("key-link")).unwrap();
        std::os::unix::fs::symlink(&data, content.join("data-link")).unwrap();
        std::os::unix::fs::symlink(&tls_key, content.join("tls-link")).unwrap();

        let dirs = ContentDirs::new(
            &data,
            &uploads,
            std::slice::from_ref(&content),
            &[tls_key.clone(), ready.clone()],
        )
        .unwrap();
        std::fs::write(&ready, b"{}").unwrap();
        let canon = |p: &Path| p.canonicalize().unwrap();
        assert_eq!(
            dirs.check(&content.join("fw.bin")).unwrap(),
            canon(&content.join("fw.bin"))
        );
        assert_eq!(
            dirs.check(&uploads.join("fw.bin")).unwrap(),
            canon(&uploads.join("fw.bin"))
        );
        for refused in [
            data.join("manager.key"),
            content.join("key-link"),
            content.join("data-link/manager.key"),
            content.join("../data/manager.key"),
            content.join("tls-link"),
            ready.clone(),
            elsewhere.join("fw.bin"),
        ] {
            assert!(
                matches!(dirs.check(&refused), Err(ApiError::Forbidden(_))),
                "{} was accepted",
                refused.display()
            );
        }
        assert!(matches!(
            dirs.check(Path::new("relative/fw.bin")),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            dirs.check(&content.join("missing")),
            Err(ApiError::BadRequest(_))
        ));
        // No listed directory: uploads only.
        let only_uploads = ContentDirs::new(&data, &uploads, &[], &[]).unwrap();
        assert!(only_uploads.check(&uploads.join("fw.bin")).is_ok());
        assert!(matches!(
            only_uploads.check(&content.join("fw.bin")),
            Err(ApiError::Forbidden(_))
        ));
        // A content directory inside the data directory is refused at start.
        let err = ContentDirs::new(&data, &uploads, std::slice::from_ref(&uploads), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the data directory"), "{err}");
        // A content directory that holds the data directory: the data stays refused.
        let wide = ContentDirs::new(&data, &uploads, &[tmp.path().to_path_buf()], &[]).unwrap();
        assert!(wide.check(&elsewhere.join("fw.bin")).is_ok());
        assert!(matches!(
            wide.check(&data.join("manager.key")),
            Err(ApiError::Forbidden(_))
        ));
        assert!(wide.check(&uploads.join("fw.bin")).is_ok());
    }
}
