//! An append-only journal of small checksummed records, the broker's on-disk state (retained
//! messages, persistent sessions).
//!
//! ```text
//! header:  magic (8 bytes) | version u32 = 1 | 4 zero bytes
//! record:  len u32 | crc32c(body) u32 | body          (little-endian)
//! ```
//!
//! One writer thread appends records in the order they were sent and `fdatasync`s once per
//! batch (a group commit, as the log does); [`Journal::append`] resolves only after that.
//! When the journal is at least 1 MiB and twice the size of the live state, the writer
//! rewrites it from a snapshot of that state (temporary file, fsync, rename, directory
//! fsync). The owner keeps its state in memory, changes it *before* sending the change's
//! record, and makes replaying a record idempotent: a snapshot may then already contain a
//! change whose record is written after it.
//!
//! [`read`] returns the bodies of the good prefix; a torn or corrupt tail is cut (logged),
//! and a file whose header is not this journal's is set aside, not deleted.
//!
//! A failed write (a full disk) must not leave a torn record in the middle of the file, where
//! the next start would cut everything after it, nor a file short of changes the state holds
//! while later records go after them: the writer cuts the file back to its last good length,
//! and its next commit rewrites the journal whole from the snapshot (which holds the failed
//! batch's changes too, made before their records were sent).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;

use bytes::{BufMut, Bytes};
use tokio::sync::oneshot;

const VERSION: u32 = 1;
/// Journals hold device data (retained and queued messages): owner only, whatever the umask,
/// as the log's files.
const PRIVATE_FILE: u32 = 0o600;
const HEADER_LEN: usize = 16;
const FRAME_LEN: usize = 8;
/// Compaction waits until the journal is at least this large, however much of it is dead.
pub const MIN_COMPACT_BYTES: u64 = 1 << 20;

/// The live state as record bodies, for a rewrite.
pub type Snapshot = Box<dyn Fn() -> Vec<Bytes> + Send>;

struct Job {
    record: Vec<u8>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// What [`read`] found.
pub struct Found {
    pub bodies: Vec<Bytes>,
    good_len: u64,
}

/// The writer's handle. Dropping every clone stops the writer after what was sent.
#[derive(Clone)]
pub struct Journal {
    jobs: std_mpsc::Sender<Job>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

/// Reads the journal at `path` (none yet: no bodies).
pub fn read(path: &Path, magic: &[u8; 8], now_ms: i64) -> io::Result<Found> {
    let empty = Found {
        bodies: Vec::new(),
        good_len: 0,
    };
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(empty),
        Err(e) => return Err(e),
    }
    if data.is_empty() {
        return Ok(empty);
    }
    if data.len() < HEADER_LEN || &data[..8] != magic || data[8..12] != VERSION.to_le_bytes() {
        let aside = path.with_extension(format!("unreadable-{now_ms}"));
        std::fs::rename(path, &aside)?;
        tracing::warn!(path = %aside.display(), "A journal of the broker has an unknown header; set it aside and started a new one.");
        return Ok(empty);
    }
    let data = Bytes::from(data);
    let mut bodies = Vec::new();
    let mut at = HEADER_LEN;
    let mut bad = None;
    while at < data.len() {
        if data.len() - at < FRAME_LEN {
            bad = Some("torn record header");
            break;
        }
        let word = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        let (len, crc) = (word(at) as usize, word(at + 4));
        let start = at + FRAME_LEN;
        if data.len() - start < len {
            bad = Some("torn record");
            break;
        }
        let body = data.slice(start..start + len);
        if crc32c::crc32c(&body) != crc {
            bad = Some("checksum mismatch");
            break;
        }
        bodies.push(body);
        at = start + len;
    }
    if let Some(why) = bad {
        tracing::warn!(path = %path.display(), offset = at, why, "A journal of the broker ends in a damaged record; it is cut there.");
    }
    Ok(Found {
        bodies,
        good_len: at as u64,
    })
}

impl Journal {
    /// Opens the journal for appending after what [`read`] found good, and starts its writer.
    pub fn start(
        path: &Path,
        magic: &[u8; 8],
        found: &Found,
        snapshot: Snapshot,
    ) -> io::Result<Journal> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(PRIVATE_FILE)
            .open(path)?;
        // A journal made before files were created private becomes so.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(PRIVATE_FILE))?;
        if found.good_len == 0 {
            file.set_len(0)?;
            file.write_all(&header(magic))?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                sync_dir(dir)?;
            }
        } else {
            file.set_len(found.good_len)?;
            file.sync_all()?;
        }
        let file_len = file.metadata()?.len();
        let (jobs, rx) = std_mpsc::channel();
        let writer = Writer {
            path: path.to_owned(),
            magic: *magic,
            file,
            file_len,
            next_check: MIN_COMPACT_BYTES,
            snapshot,
            stale: false,
        };
        let name = format!(
            "edgegate-{}",
            path.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("journal")
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || writer.run(rx))?;
        Ok(Journal { jobs })
    }

    /// Appends `body`; resolves once it is durable.
    pub fn append(&self, body: &[u8]) -> impl Future<Output = Result<(), String>> + Send + use<> {
        self.commit_with(frame(body))
    }

    /// Resolves once everything appended before is durable (an empty record: the commit it
    /// rides in is what counts).
    pub fn sync(&self) -> impl Future<Output = Result<(), String>> + Send + use<> {
        self.commit_with(Vec::new())
    }

    fn commit_with(
        &self,
        record: Vec<u8>,
    ) -> impl Future<Output = Result<(), String>> + Send + use<> {
        let (done, result) = oneshot::channel();
        let sent = self
            .jobs
            .send(Job {
                record,
                done: Some(done),
            })
            .is_ok();
        async move {
            if !sent {
                return Err("the journal's writer has stopped".to_owned());
            }
            result
                .await
                .unwrap_or_else(|_| Err("the journal's writer has stopped".to_owned()))
        }
    }

    /// Appends `body` without waiting: it is durable with the next batch.
    pub fn append_later(&self, body: &[u8]) {
        let _ = self.jobs.send(Job {
            record: frame(body),
            done: None,
        });
    }
}

struct Writer {
    path: PathBuf,
    magic: [u8; 8],
    file: File,
    file_len: u64,
    /// When the journal is next measured against what is live.
    next_check: u64,
    snapshot: Snapshot,
    /// A write failed: the file may lack records whose changes the state holds. The next
    /// commit rewrites it whole.
    stale: bool,
}

impl Writer {
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            batch.extend(jobs.try_iter());
            let result = self.commit(&batch).map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(error = %e, path = %self.path.display(), "Cannot write a journal of the broker.");
            }
            for job in batch {
                if let Some(done) = job.done {
                    let _ = done.send(result.clone());
                }
            }
        }
    }

    fn commit(&mut self, batch: &[Job]) -> io::Result<()> {
        if self.stale {
            let live = (self.snapshot)();
            self.compact(&live)?;
            self.stale = false;
            self.next_check = self.file_len + self.file_len.max(MIN_COMPACT_BYTES);
            tracing::info!(path = %self.path.display(), records = live.len(), "Rewrote a journal of the broker whole after a failed write.");
            return Ok(());
        }
        let good_len = self.file_len;
        let result = self.append(batch);
        if result.is_err() {
            // No torn record may stay before the next one: cut back to the last good length
            // (best effort: the rewrite replaces the file anyway).
            let _ = self.file.set_len(good_len);
            self.file_len = good_len;
            self.stale = true;
        }
        result
    }

    fn append(&mut self, batch: &[Job]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(batch.iter().map(|j| j.record.len()).sum());
        for job in batch {
            buf.extend_from_slice(&job.record);
        }
        self.file.write_all(&buf)?;
        self.file_len += buf.len() as u64;
        // The snapshot costs as much as what is live, so it is taken only after at least
        // that much more was appended: amortised, not once per commit (which made taking a
        // backlog of commands quadratic).
        if self.file_len >= self.next_check {
            let live = (self.snapshot)();
            let live_len: u64 = live
                .iter()
                .map(|b| (b.len() + FRAME_LEN) as u64)
                .sum::<u64>()
                + HEADER_LEN as u64;
            if self.file_len > 2 * live_len {
                self.compact(&live)?;
            } else {
                self.file.sync_data()?;
            }
            self.next_check = self.file_len + live_len.max(MIN_COMPACT_BYTES);
            return Ok(());
        }
        self.file.sync_data()
    }

    fn compact(&mut self, live: &[Bytes]) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let written = self.write_whole(&tmp, live);
        if written.is_err() {
            // A full disk: the partial copy would only take the space that is missing.
            let _ = std::fs::remove_file(&tmp);
        }
        let len = written?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.file_len = len;
        tracing::debug!(path = %self.path.display(), bytes = self.file_len, records = live.len(), "Rewrote a journal of the broker.");
        Ok(())
    }

    /// Writes the header and `live` to `tmp` and syncs it; its length.
    fn write_whole(&self, tmp: &Path, live: &[Bytes]) -> io::Result<u64> {
        // Streamed: a copy of everything live in one buffer would double the rewrite's memory.
        let tmp_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE)
            .open(tmp)?;
        let mut out = io::BufWriter::new(tmp_file);
        let mut len = HEADER_LEN as u64;
        out.write_all(&header(&self.magic))?;
        for body in live {
            let framed = frame(body);
            out.write_all(&framed)?;
            len += framed.len() as u64;
        }
        let out = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        out.sync_all()?;
        Ok(len)
    }
}

/// Creates `dir` (and its parents) owner-only, as the log's directories.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn header(magic: &[u8; 8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_LEN + body.len());
    out.put_u32_le(body.len() as u32);
    out.put_u32_le(crc32c::crc32c(body));
    out.extend_from_slice(body);
    out
}

/// Length-prefixed fields of a record body, read without panicking: `None` when the body is
/// shorter than it says.
pub struct Fields(pub Bytes);

impl Fields {
    pub fn u8(&mut self) -> Option<u8> {
        use bytes::Buf;
        (self.0.remaining() >= 1).then(|| self.0.get_u8())
    }
    pub fn u16(&mut self) -> Option<u16> {
        use bytes::Buf;
        (self.0.remaining() >= 2).then(|| self.0.get_u16_le())
    }
    pub fn u32(&mut self) -> Option<u32> {
        use bytes::Buf;
        (self.0.remaining() >= 4).then(|| self.0.get_u32_le())
    }
    pub fn u64(&mut self) -> Option<u64> {
        use bytes::Buf;
        (self.0.remaining() >= 8).then(|| self.0.get_u64_le())
    }
    pub fn i64(&mut self) -> Option<i64> {
        use bytes::Buf;
        (self.0.remaining() >= 8).then(|| self.0.get_i64_le())
    }
    pub fn bytes16(&mut self) -> Option<Bytes> {
        let n = usize::from(self.u16()?);
        (self.0.len() >= n).then(|| self.0.split_to(n))
    }
    pub fn bytes32(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        (self.0.len() >= n).then(|| self.0.split_to(n))
    }
    pub fn str16(&mut self) -> Option<String> {
        String::from_utf8(self.bytes16()?.to_vec()).ok()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Writes a field [`Fields::bytes16`] reads. Fields come from MQTT packets: at most 65,535.
pub fn put16(out: &mut Vec<u8>, s: &[u8]) {
    let len = s.len().min(usize::from(u16::MAX));
    out.put_u16_le(len as u16);
    out.extend_from_slice(&s[..len]);
}

/// Writes a field [`Fields::bytes32`] reads.
pub fn put32(out: &mut Vec<u8>, s: &[u8]) {
    out.put_u32_le(s.len() as u32);
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"TESTJRNL";

    /// A writer whose file is `/dev/full` (every write fails with ENOSPC, as on a full disk)
    /// until its rewrite replaces it with the real journal at `path`.
    fn writer_on_a_full_disk(path: &Path, live: Arc<Mutex<Vec<Bytes>>>) -> Writer {
        std::fs::write(path, header(MAGIC)).expect("journal");
        Writer {
            path: path.to_owned(),
            magic: *MAGIC,
            file: OpenOptions::new()
                .append(true)
                .open("/dev/full")
                .expect("/dev/full"),
            file_len: HEADER_LEN as u64,
            next_check: MIN_COMPACT_BYTES,
            snapshot: Box::new(move || live.lock().expect("live").clone()),
            stale: false,
        }
    }

    fn job(body: &[u8]) -> Job {
        Job {
            record: frame(body),
            done: None,
        }
    }

    use std::sync::{Arc, Mutex};

    #[test]
    fn after_a_failed_write_the_next_commit_rewrites_the_whole_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.journal");
        // The owner changes its state before it sends the change's record.
        let live = Arc::new(Mutex::new(vec![Bytes::from_static(b"a")]));
        let mut writer = writer_on_a_full_disk(&path, live.clone());
        let failed = writer.commit(&[job(b"a")]);
        assert_eq!(
            failed.expect_err("the disk is full").raw_os_error(),
            Some(libc::ENOSPC)
        );
        live.lock().expect("live").push(Bytes::from_static(b"b"));
        // Space is back: the next commit writes everything the state holds, the failed
        // batch's change included, not only its own record.
        writer.commit(&[job(b"b")]).expect("rewritten");
        live.lock().expect("live").push(Bytes::from_static(b"c"));
        writer.commit(&[job(b"c")]).expect("appended");
        let found = read(&path, MAGIC, 0).expect("read");
        assert_eq!(found.bodies, [&b"a"[..], b"b", b"c"]);
        assert!(!path.with_extension("tmp").exists());
    }
}
