//! A NOR flash over a file, so the Linux agent uses the same store as devices.
//!
//! [`FileFlash`] keeps every byte inverted on disk: erased flash (`0xFF`) is a
//! zero byte, so a fresh partition is a sparse file that costs nothing until
//! written, and erasing the whole file is a truncate. Writes go straight to
//! the file (a write unit may be rewritten: it is a [`MultiwriteNorFlash`]).
//! A full disk or an exhausted quota surfaces as
//! [`NorFlashErrorKind::OutOfBounds`], which the store reports as
//! [`crate::store::StoreError::Full`]; other IO errors as `Other`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use embedded_storage::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
    check_erase, check_read, check_write,
};

/// Erase block of a file-backed flash (bytes).
pub const FILE_ERASE_SIZE: usize = 4096;

/// An error of a [`FileFlash`]: the flash error kind and the IO error behind it.
#[derive(Debug)]
pub struct FileFlashError {
    /// What the store sees.
    pub kind: NorFlashErrorKind,
    /// The underlying IO error, if any.
    pub io: Option<io::Error>,
}

impl NorFlashError for FileFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        self.kind
    }
}

impl From<NorFlashErrorKind> for FileFlashError {
    fn from(kind: NorFlashErrorKind) -> Self {
        FileFlashError { kind, io: None }
    }
}

impl From<io::Error> for FileFlashError {
    fn from(e: io::Error) -> Self {
        let full = matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
        );
        FileFlashError {
            kind: if full {
                NorFlashErrorKind::OutOfBounds
            } else {
                NorFlashErrorKind::Other
            },
            io: Some(e),
        }
    }
}

/// A NOR flash of fixed capacity stored (inverted) in a file.
#[derive(Debug)]
pub struct FileFlash {
    file: File,
    capacity: usize,
}

impl FileFlash {
    /// Creates (or truncates) `path` as an erased flash of `capacity` bytes (a sparse file,
    /// mode 0600 when created).
    pub fn create(path: &Path, capacity: usize) -> io::Result<Self> {
        let file = super::datadir::open_private(
            File::options().read(true).write(true).create(true),
            path,
            super::datadir::Existing::Empty,
        )?;
        file.set_len(capacity as u64)?;
        Ok(FileFlash { file, capacity })
    }

    /// Opens an existing flash file; its capacity is its length.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        let capacity = file.metadata()?.len() as usize;
        Ok(FileFlash { file, capacity })
    }

    /// Opens an existing flash file read-only (writes and erases fail).
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let capacity = file.metadata()?.len() as usize;
        Ok(FileFlash { file, capacity })
    }

    /// Forces written data to the disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl ErrorType for FileFlash {
    type Error = FileFlashError;
}

impl ReadNorFlash for FileFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        check_read(self, offset, bytes.len())?;
        self.file.read_exact_at(bytes, offset as u64)?;
        for b in bytes.iter_mut() {
            *b = !*b;
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl NorFlash for FileFlash {
    const WRITE_SIZE: usize = 1;
    const ERASE_SIZE: usize = FILE_ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        if from == 0 && to as usize == self.capacity {
            // The whole partition: drop every block and make it sparse again.
            self.file.set_len(0)?;
            self.file.set_len(self.capacity as u64)?;
            return Ok(());
        }
        let zeros = vec![0u8; 64 * 1024];
        let mut at = from as u64;
        while at < to as u64 {
            let n = zeros.len().min((to as u64 - at) as usize);
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, bytes.len())?;
        let mut buf = [0u8; 8192];
        let mut done = 0;
        while done < bytes.len() {
            let n = buf.len().min(bytes.len() - done);
            for (d, s) in buf[..n].iter_mut().zip(&bytes[done..done + n]) {
                *d = !*s;
            }
            self.file
                .write_all_at(&buf[..n], offset as u64 + done as u64)?;
            done += n;
        }
        Ok(())
    }
}

impl MultiwriteNorFlash for FileFlash {}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn behaves_like_erased_flash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let mut f = FileFlash::create(&path, 8192).unwrap();
        let mut buf = [0u8; 16];
        f.read(100, &mut buf).unwrap();
        assert_eq!(buf, [0xFF; 16]);
        f.write(100, b"hello").unwrap();
        f.read(100, &mut buf[..5]).unwrap();
        assert_eq!(&buf[..5], b"hello");
        drop(f);
        let mut f = FileFlash::open(&path).unwrap();
        assert_eq!(f.capacity(), 8192);
        f.read(100, &mut buf[..5]).unwrap();
        assert_eq!(&buf[..5], b"hello");
        f.erase(0, 4096).unwrap();
        f.read(100, &mut buf[..5]).unwrap();
        assert_eq!(buf[..5], [0xFF; 5]);
        f.write(5000, b"x").unwrap();
        f.erase(0, 8192).unwrap();
        f.read(5000, &mut buf[..1]).unwrap();
        assert_eq!(buf[0], 0xFF);
        assert_eq!(
            f.write(8190, b"abc").unwrap_err().kind(),
            NorFlashErrorKind::OutOfBounds
        );
        assert_eq!(
            f.erase(1, 4096).unwrap_err().kind(),
            NorFlashErrorKind::NotAligned
        );
    }

    #[test]
    fn disk_full_is_out_of_bounds() {
        let e = FileFlashError::from(io::Error::from(io::ErrorKind::StorageFull));
        assert_eq!(e.kind(), NorFlashErrorKind::OutOfBounds);
        let e = FileFlashError::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(e.kind(), NorFlashErrorKind::Other);
    }

    #[test]
    fn read_only_flash_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        FileFlash::create(&path, 4096).unwrap();
        let mut f = FileFlash::open_read_only(&path).unwrap();
        assert_eq!(
            f.write(0, b"x").unwrap_err().kind(),
            NorFlashErrorKind::Other
        );
    }
}
