//! The few file operations the log needs, behind a trait so tests can cut the power
//! (`sim.rs`) instead of trusting that the real file system behaves.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
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

/// The real file system.
pub(crate) struct OsStorage;

impl Storage for OsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
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
        df_capacity(dir)
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

/// Free space of the file system holding `dir`, from POSIX `df -P -k` (busybox has it too).
/// The standard library has no statvfs and the crate forbids `unsafe`; this runs once at
/// startup, so a child process is cheap enough.
fn df_capacity(dir: &Path) -> Option<FsCapacity> {
    let out = std::process::Command::new("df")
        .args(["-P", "-k"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_df(&String::from_utf8_lossy(&out.stdout))
}

/// `Filesystem 1024-blocks Used Available Capacity Mounted-on`, one data line (a long
/// device name may wrap it onto the next line, hence the split on all whitespace).
fn parse_df(text: &str) -> Option<FsCapacity> {
    let mut lines = text.lines();
    lines.next()?;
    let rest: Vec<&str> = lines.flat_map(str::split_whitespace).collect();
    let total: u64 = rest.get(1)?.parse().ok()?;
    let available: u64 = rest.get(3)?.parse().ok()?;
    Some(FsCapacity {
        total: total.saturating_mul(1024),
        available: available.saturating_mul(1024),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_df_output() {
        let text = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                    /dev/vda         264212084 15212956  80288308      16% /\n";
        let cap = super::parse_df(text).expect("parses");
        assert_eq!(cap.total, 264212084 * 1024);
        assert_eq!(cap.available, 80288308 * 1024);
        assert!(super::df_capacity(std::path::Path::new("/")).is_some());
    }
}
