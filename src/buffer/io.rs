//! The few file operations the log needs, behind a trait so tests can cut the power
//! (`sim.rs`) instead of trusting that the real file system behaves.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

pub(crate) trait Storage: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens for reading and writing; `create` creates a missing file.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn StorageFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creations and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes the file system holding `dir` could still take (`None` if unknown).
    fn capacity(&self, dir: &Path) -> Option<FsCapacity>;
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct FsCapacity {
    pub total: u64,
    pub available: u64,
}

pub(crate) trait StorageFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data (and its size) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
pub(crate) fn read_full_at(
    file: &dyn StorageFile,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Mode of the files the log creates: the records are the devices' data, for the gateway's
/// user alone (whatever the umask says).
pub(crate) const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` and any missing parents with mode 0700 (before the umask); an existing
/// directory keeps its mode.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The real file system.
pub(crate) struct OsStorage;

impl Storage for OsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_private_dir(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(PRIVATE_FILE)
            .open(path)?;
        Ok(Box::new(OsFile(file)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn capacity(&self, dir: &Path) -> Option<FsCapacity> {
        fs_capacity(dir)
    }
}

struct OsFile(File);

impl StorageFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

/// The real file system on a slow disk: every `sync_data` takes `delay` longer (an SD card
/// under wear levelling). For tests of what callers do while an append is not yet durable.
#[cfg(test)]
pub(crate) struct SlowSync {
    pub delay: std::time::Duration,
}

#[cfg(test)]
impl Storage for SlowSync {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        OsStorage.create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        OsStorage.list_dir(dir)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn StorageFile>> {
        let file = OsStorage.open(path, create)?;
        Ok(Box::new(SlowFile {
            file,
            delay: self.delay,
        }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        OsStorage.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OsStorage.sync_dir(dir)
    }

    fn capacity(&self, dir: &Path) -> Option<FsCapacity> {
        OsStorage.capacity(dir)
    }
}

#[cfg(test)]
struct SlowFile {
    file: Box<dyn StorageFile>,
    delay: std::time::Duration,
}

#[cfg(test)]
impl StorageFile for SlowFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
}

/// Size and free space of the file system holding `dir` (statvfs; the space an
/// unprivileged process may use, like `df`'s "Available").
fn fs_capacity(dir: &Path) -> Option<FsCapacity> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(FsCapacity {
        total: stat.f_blocks.saturating_mul(stat.f_frsize),
        available: stat.f_bavail.saturating_mul(stat.f_frsize),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_capacity_of_a_real_file_system() {
        let cap = super::fs_capacity(std::path::Path::new("/")).expect("statvfs of /");
        assert!(cap.total > 0 && cap.available <= cap.total, "{cap:?}");
    }
}
