//! An in-memory file system that can lose power: data not yet `sync_data`'d is lost,
//! creations and removals not yet `sync_dir`'d are undone, and the last unsynced write may
//! survive torn at an arbitrary byte. It can also run out of space or freeze after a number
//! of mutating operations (the moment the power goes).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::io::{FsCapacity, Storage, StorageFile};

#[derive(Default)]
struct FileData {
    /// What a reader sees now.
    data: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// The most recent write since the last sync, for tearing.
    last_write: Option<(u64, Vec<u8>)>,
}

type FileRef = Arc<Mutex<FileData>>;

#[derive(Default)]
struct FsState {
    files: HashMap<PathBuf, FileRef>,
    /// The directory as it was at the last `sync_dir`.
    durable_names: HashMap<PathBuf, FileRef>,
    /// The file that saw the most recent unsynced write.
    last_written: Option<FileRef>,
    /// Once set, every operation fails and nothing changes: the power is off.
    frozen: bool,
    /// Mutating operations left before the power goes.
    ops_left: Option<u64>,
    /// Total bytes all files may hold.
    capacity: Option<u64>,
}

#[derive(Clone, Default)]
pub(crate) struct MemFs {
    state: Arc<Mutex<FsState>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn powered_off() -> io::Error {
    io::Error::other("simulated power cut")
}

impl MemFs {
    pub(crate) fn new() -> MemFs {
        MemFs::default()
    }

    /// The power goes after `ops` more mutating operations.
    pub(crate) fn freeze_after(&self, ops: u64) {
        let mut st = lock(&self.state);
        st.ops_left = Some(ops);
        if ops == 0 {
            st.frozen = true;
        }
    }

    pub(crate) fn set_capacity(&self, bytes: Option<u64>) {
        lock(&self.state).capacity = bytes;
    }

    /// The disk as the next boot finds it. `tear` picks how much of the last unsynced write
    /// survives (taken modulo its length + 1); `None` keeps none of it.
    pub(crate) fn after_power_cut(&self, tear: Option<usize>) -> MemFs {
        let mut st = lock(&self.state);
        st.frozen = true;
        let mut files = HashMap::new();
        for (name, file) in &st.durable_names {
            let f = lock(file);
            let mut data = f.durable.clone();
            let torn_here = st
                .last_written
                .as_ref()
                .is_some_and(|lw| Arc::ptr_eq(lw, file));
            if let (Some(cut), true, Some((off, bytes))) = (tear, torn_here, &f.last_write) {
                let keep = &bytes[..cut % (bytes.len() + 1)];
                let off = *off as usize;
                if data.len() < off + keep.len() {
                    data.resize(off + keep.len(), 0);
                }
                data[off..off + keep.len()].copy_from_slice(keep);
            }
            files.insert(
                name.clone(),
                Arc::new(Mutex::new(FileData {
                    durable: data.clone(),
                    data,
                    last_write: None,
                })),
            );
        }
        MemFs {
            state: Arc::new(Mutex::new(FsState {
                durable_names: files.clone(),
                files,
                ..FsState::default()
            })),
        }
    }

    /// Direct access for corruption tests.
    pub(crate) fn with_file<R>(&self, path: &Path, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let st = lock(&self.state);
        let file = st.files.get(path).expect("file exists");
        let mut d = lock(file);
        let r = f(&mut d.data);
        d.durable = d.data.clone();
        r
    }

    pub(crate) fn file_names(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = lock(&self.state).files.keys().cloned().collect();
        v.sort();
        v
    }

    /// Counts a mutating operation; fails once the power is off.
    fn op(st: &mut FsState) -> io::Result<()> {
        if st.frozen {
            return Err(powered_off());
        }
        if let Some(n) = st.ops_left.as_mut() {
            if *n == 0 {
                st.frozen = true;
                return Err(powered_off());
            }
            *n -= 1;
        }
        Ok(())
    }

    fn used(st: &FsState) -> u64 {
        st.files.values().map(|f| lock(f).data.len() as u64).sum()
    }
}

impl Storage for MemFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = lock(&self.state);
        if st.frozen {
            return Err(powered_off());
        }
        Ok(st
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn StorageFile>> {
        let mut st = lock(&self.state);
        if st.frozen {
            return Err(powered_off());
        }
        let file = match st.files.get(path) {
            Some(f) => f.clone(),
            None if create => {
                MemFs::op(&mut st)?;
                let f = FileRef::default();
                st.files.insert(path.to_owned(), f.clone());
                f
            }
            None => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        Ok(Box::new(MemFile {
            fs: self.state.clone(),
            file,
        }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        MemFs::op(&mut st)?;
        st.files.remove(path);
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        MemFs::op(&mut st)?;
        st.durable_names = st.files.clone();
        Ok(())
    }

    fn capacity(&self, _dir: &Path) -> Option<FsCapacity> {
        let st = lock(&self.state);
        let total = st.capacity?;
        Some(FsCapacity {
            total,
            available: total.saturating_sub(MemFs::used(&st)),
        })
    }
}

struct MemFile {
    fs: Arc<Mutex<FsState>>,
    file: FileRef,
}

impl StorageFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if lock(&self.fs).frozen {
            return Err(powered_off());
        }
        let f = lock(&self.file);
        let start = (offset as usize).min(f.data.len());
        let n = buf.len().min(f.data.len() - start);
        buf[..n].copy_from_slice(&f.data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = lock(&self.fs);
        MemFs::op(&mut st)?;
        let used = MemFs::used(&st);
        let mut f = lock(&self.file);
        let off = offset as usize;
        let grow = (off + buf.len()).saturating_sub(f.data.len()) as u64;
        let (n, full) = match st.capacity {
            Some(cap) if used + grow > cap => {
                let room = cap.saturating_sub(used) as usize;
                let n = (f.data.len() + room).saturating_sub(off).min(buf.len());
                (n, true)
            }
            _ => (buf.len(), false),
        };
        if f.data.len() < off + n {
            f.data.resize(off + n, 0);
        }
        f.data[off..off + n].copy_from_slice(&buf[..n]);
        f.last_write = Some((offset, buf[..n].to_vec()));
        drop(f);
        st.last_written = Some(self.file.clone());
        if full {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = lock(&self.fs);
        MemFs::op(&mut st)?;
        lock(&self.file).data.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = lock(&self.fs);
        MemFs::op(&mut st)?;
        let mut f = lock(&self.file);
        f.durable = f.data.clone();
        f.last_write = None;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        if lock(&self.fs).frozen {
            return Err(powered_off());
        }
        Ok(lock(&self.file).data.len() as u64)
    }
}
