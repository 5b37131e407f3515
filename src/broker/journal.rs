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
//! **Kept records.** An owner that would otherwise hold a record's bytes in memory until it
//! is done with it (a persistent session's queued message, held while its client is away)
//! appends it with [`Journal::append_kept`] under an id and reads it back with
//! [`Journal::read_kept`]. The journal holds its bytes only until the writer has written
//! them, then its place in the file (offset and length); a rewrite carries each kept record
//! over and moves its place, so the owner keeps only ids. Its snapshot names kept records
//! by id ([`Live::Kept`]); [`Journal::forget`] ends one.
//!
//! A failed write (a full disk) must not leave a torn record in the middle of the file, where
//! the next start would cut everything after it, nor a file short of changes the state holds
//! while later records go after them: the writer cuts the file back to its last good length,
//! and its next commit rewrites the journal whole from the snapshot (which holds the failed
//! batch's changes too, made before their records were sent).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

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

/// One record of the live state, for a rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    Body(Bytes),
    /// A record appended with [`Journal::append_kept`] and not forgotten: the journal has
    /// its bytes.
    Kept(u64),
}

impl From<Bytes> for Live {
    fn from(body: Bytes) -> Live {
        Live::Body(body)
    }
}

/// The live state, for a rewrite.
pub type Snapshot = Box<dyn Fn() -> Vec<Live> + Send>;

struct Job {
    record: Vec<u8>,
    done: Option<oneshot::Sender<Result<(), String>>>,
    /// The id of a kept record.
    kept: Option<u64>,
}

/// What [`read`] found.
pub struct Found {
    pub bodies: Vec<Bytes>,
    /// Where each body starts in the file, for [`Journal::keep_at`].
    pub offsets: Vec<u64>,
    good_len: u64,
}

/// Where kept records are: in memory until the writer has written them, then in the file.
#[derive(Debug)]
struct Places {
    /// The journal's current file, for reading kept records back.
    file: Arc<File>,
    pending: HashMap<u64, Bytes>,
    /// Offset of the body in `file`, and its length.
    on_disk: HashMap<u64, (u64, u32)>,
}

#[derive(Debug)]
struct Kept(Mutex<Places>);

/// Where a write put kept record `id`: its body at `offset`, `len` bytes.
#[derive(Debug, Clone, Copy)]
struct Placed {
    id: u64,
    offset: u64,
    len: u32,
}

impl Kept {
    fn lock(&self) -> MutexGuard<'_, Places> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `id`'s bytes: from memory if the writer has not written it yet, else read from
    /// the current file (outside the lock). `Ok(None)`: not kept.
    fn read(&self, id: u64) -> Result<Option<Bytes>, (u64, io::Error)> {
        let (file, offset, len) = {
            let places = self.lock();
            if let Some(body) = places.pending.get(&id) {
                return Ok(Some(body.clone()));
            }
            let Some(&(offset, len)) = places.on_disk.get(&id) else {
                return Ok(None);
            };
            (Arc::clone(&places.file), offset, len)
        };
        read_at(&file, offset, len)
            .map(Some)
            .map_err(|e| (offset, e))
    }
}

/// The writer's handle. Dropping every clone stops the writer after what was sent.
#[derive(Clone)]
pub struct Journal {
    jobs: std_mpsc::Sender<Job>,
    kept: Arc<Kept>,
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
        offsets: Vec::new(),
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
    let (mut bodies, mut offsets) = (Vec::new(), Vec::new());
    let mut at = HEADER_LEN;
    let mut bad = None;
    while at < data.len() {
        if data.len() - at < FRAME_LEN {
            bad = Some("torn record header");
            break;
        }
        let (len, crc) = frame_header(&data[at..]);
        let len = len as usize;
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
        offsets.push(start as u64);
        at = start + len;
    }
    if let Some(why) = bad {
        tracing::warn!(path = %path.display(), offset = at, why, "A journal of the broker ends in a damaged record; it is cut there.");
    }
    Ok(Found {
        bodies,
        offsets,
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
        let file = Arc::new(file);
        let kept = Arc::new(Kept(Mutex::new(Places {
            file: Arc::clone(&file),
            pending: HashMap::new(),
            on_disk: HashMap::new(),
        })));
        let (jobs, rx) = std_mpsc::channel();
        let writer = Writer {
            path: path.to_owned(),
            magic: *magic,
            file,
            file_len,
            next_check: MIN_COMPACT_BYTES,
            snapshot,
            stale: false,
            kept: Arc::clone(&kept),
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
        Ok(Journal { jobs, kept })
    }

    /// Appends `body`; resolves once it is durable.
    pub fn append(&self, body: &[u8]) -> impl Future<Output = Result<(), String>> + Send + use<> {
        self.commit_with(frame(body), None)
    }

    /// Appends `body` as kept record `id` (ids are the owner's, unique while kept): until
    /// [`Journal::forget`], [`Journal::read_kept`] returns it and a rewrite carries it over.
    /// Resolves once it is durable.
    pub fn append_kept(
        &self,
        id: u64,
        body: Bytes,
    ) -> impl Future<Output = Result<(), String>> + Send + use<> {
        let record = frame(&body);
        self.kept.lock().pending.insert(id, body);
        self.commit_with(record, Some(id))
    }

    /// Says that kept record `id` is the body [`read`] found at `offset` of this journal's
    /// file (after a restart).
    pub fn keep_at(&self, id: u64, offset: u64, len: u32) {
        self.kept.lock().on_disk.insert(id, (offset, len));
    }

    /// Kept record `id`'s bytes: from memory if the writer has not written it yet, else read
    /// from the file. `None` if it is not kept, or reading it failed (said in the log).
    pub fn read_kept(&self, id: u64) -> Option<Bytes> {
        match self.kept.read(id) {
            Ok(body) => body,
            Err((offset, e)) => {
                tracing::error!(id, offset, error = %e, "Cannot read a record back from a journal of the broker.");
                None
            }
        }
    }

    /// Ends kept record `id`: a rewrite no longer carries it over.
    pub fn forget(&self, id: u64) {
        let mut places = self.kept.lock();
        if places.pending.remove(&id).is_none() {
            places.on_disk.remove(&id);
            shrink_if_sparse(&mut places.on_disk);
        } else {
            shrink_if_sparse(&mut places.pending);
        }
    }

    /// Kept records, in memory and in the file.
    #[cfg(test)]
    pub fn kept_counts(&self) -> (usize, usize) {
        let places = self.kept.lock();
        (places.pending.len(), places.on_disk.len())
    }

    /// Room in the table of kept records' places in the file.
    #[cfg(test)]
    fn kept_capacity(&self) -> usize {
        self.kept.lock().on_disk.capacity()
    }

    /// Resolves once everything appended before is durable (an empty record: the commit it
    /// rides in is what counts).
    pub fn sync(&self) -> impl Future<Output = Result<(), String>> + Send + use<> {
        self.commit_with(Vec::new(), None)
    }

    fn commit_with(
        &self,
        record: Vec<u8>,
        kept: Option<u64>,
    ) -> impl Future<Output = Result<(), String>> + Send + use<> {
        let (done, result) = oneshot::channel();
        let sent = self
            .jobs
            .send(Job {
                record,
                done: Some(done),
                kept,
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
            kept: None,
        });
    }
}

/// Gives back most of a map of places once a backlog has been taken: a table never shrinks
/// by itself, and 100,000 held commands left 3 MB of empty table behind them. Only when it
/// is a quarter full, so the rehash happens once per fourfold drop, not per removal.
fn shrink_if_sparse<V>(map: &mut HashMap<u64, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// Reads the body of length `len` at `offset` of `file` and checks it against its frame.
fn read_at(file: &File, offset: u64, len: u32) -> io::Result<Bytes> {
    let start = offset
        .checked_sub(FRAME_LEN as u64)
        .ok_or_else(|| io::Error::other("a kept record's offset is inside the header"))?;
    let mut framed = vec![0u8; FRAME_LEN + len as usize];
    file.read_exact_at(&mut framed, start)?;
    let (stored_len, crc) = frame_header(&framed);
    let body = Bytes::from(framed).slice(FRAME_LEN..);
    if stored_len != len || crc32c::crc32c(&body) != crc {
        return Err(io::Error::other(
            "a kept record does not match its checksum",
        ));
    }
    Ok(body)
}

struct Writer {
    path: PathBuf,
    magic: [u8; 8],
    file: Arc<File>,
    file_len: u64,
    /// When the journal is next measured against what is live.
    next_check: u64,
    snapshot: Snapshot,
    /// A write failed: the file may lack records whose changes the state holds. The next
    /// commit rewrites it whole.
    stale: bool,
    kept: Arc<Kept>,
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
            // Kept records of the batch stay in memory (their places were not moved).
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
        let mut placed = Vec::new();
        for job in batch {
            if let Some(id) = job.kept {
                let offset = self.file_len + (buf.len() + FRAME_LEN) as u64;
                let len = (job.record.len() - FRAME_LEN) as u32;
                placed.push(Placed { id, offset, len });
            }
            buf.extend_from_slice(&job.record);
        }
        (&*self.file).write_all(&buf)?;
        self.file_len += buf.len() as u64;
        // The snapshot costs as much as what is live, so it is taken only after at least
        // that much more was appended: amortised, not once per commit (which made taking a
        // backlog of commands quadratic).
        if self.file_len >= self.next_check {
            let live = (self.snapshot)();
            let live_len = self.measure(&live);
            if self.file_len > 2 * live_len {
                // The rewrite places every kept record that is live, this batch's too.
                self.compact(&live)?;
                self.next_check = self.file_len + live_len.max(MIN_COMPACT_BYTES);
                return Ok(());
            }
            self.file.sync_data()?;
            self.next_check = self.file_len + live_len.max(MIN_COMPACT_BYTES);
        } else {
            self.file.sync_data()?;
        }
        // Written and durable: the kept records of the batch are read from the file now. One
        // a rewrite already placed, or the owner forgot, is left as it is.
        let mut places = self.kept.lock();
        for Placed { id, offset, len } in placed {
            if places.pending.remove(&id).is_some() {
                places.on_disk.insert(id, (offset, len));
            }
        }
        Ok(())
    }

    fn compact(&mut self, live: &[Live]) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let written = self.write_whole(&tmp, live);
        if written.is_err() {
            // A full disk: the partial copy would only take the space that is missing.
            let _ = std::fs::remove_file(&tmp);
        }
        let (len, placed) = written?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .append(true)
                .open(&self.path)?,
        );
        {
            // The file and the places of what it holds change together: a reader sees the
            // old file with the old places or the new with the new. A kept record forgotten
            // meanwhile stays forgotten; one the snapshot did not name cannot be read from
            // the new file, and is said (it would be a bug of the owner's snapshot).
            let mut places = self.kept.lock();
            let mut on_disk = HashMap::with_capacity(placed.len());
            for Placed { id, offset, len } in placed {
                let live =
                    places.on_disk.remove(&id).is_some() || places.pending.remove(&id).is_some();
                if live {
                    on_disk.insert(id, (offset, len));
                }
            }
            if !places.on_disk.is_empty() {
                tracing::error!(records = places.on_disk.len(), path = %self.path.display(), "Kept records were missing from a journal's snapshot; they cannot be read back.");
            }
            places.on_disk = on_disk;
            places.file = Arc::clone(&file);
        }
        self.file = file;
        self.file_len = len;
        tracing::debug!(path = %self.path.display(), bytes = self.file_len, records = live.len(), "Rewrote a journal of the broker.");
        Ok(())
    }

    /// How long a rewrite of `live` would be.
    fn measure(&self, live: &[Live]) -> u64 {
        let places = self.kept.lock();
        let body_len = |item: &Live| match item {
            Live::Body(body) => body.len(),
            Live::Kept(id) => places.pending.get(id).map_or_else(
                || places.on_disk.get(id).map_or(0, |(_, len)| *len as usize),
                Bytes::len,
            ),
        };
        live.iter()
            .map(|item| (body_len(item) + FRAME_LEN) as u64)
            .sum::<u64>()
            + HEADER_LEN as u64
    }

    /// A kept record's body for a rewrite: from memory, or read from the current file.
    /// `None`: forgotten since the snapshot, or unreadable (said).
    fn kept_body(&self, id: u64) -> Option<Bytes> {
        // The places' file is this writer's (they change together in `compact`).
        match self.kept.read(id) {
            Ok(body) => body,
            Err((offset, e)) => {
                tracing::error!(id, offset, error = %e, path = %self.path.display(), "Cannot read a record back for a rewrite of a journal of the broker; it is left out.");
                None
            }
        }
    }

    /// Writes the header and `live` to `tmp` and syncs it; its length, and where each kept
    /// record is in it.
    fn write_whole(&self, tmp: &Path, live: &[Live]) -> io::Result<(u64, Vec<Placed>)> {
        // Streamed: a copy of everything live in one buffer would double the rewrite's memory.
        let tmp_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE)
            .open(tmp)?;
        let mut out = io::BufWriter::new(tmp_file);
        let mut len = HEADER_LEN as u64;
        let mut placed = Vec::new();
        out.write_all(&header(&self.magic))?;
        for item in live {
            let body = match item {
                Live::Body(body) => body.clone(),
                Live::Kept(id) => {
                    let Some(body) = self.kept_body(*id) else {
                        continue;
                    };
                    placed.push(Placed {
                        id: *id,
                        offset: len + FRAME_LEN as u64,
                        len: body.len() as u32,
                    });
                    body
                }
            };
            let framed = frame(&body);
            out.write_all(&framed)?;
            len += framed.len() as u64;
        }
        let out = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        out.sync_all()?;
        Ok((len, placed))
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

/// The length and checksum a record's frame starts with; `at` holds at least [`FRAME_LEN`].
fn frame_header(at: &[u8]) -> (u32, u32) {
    let word = |i: usize| u32::from_le_bytes([at[i], at[i + 1], at[i + 2], at[i + 3]]);
    (word(0), word(4))
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
        let file = Arc::new(
            OpenOptions::new()
                .append(true)
                .open("/dev/full")
                .expect("/dev/full"),
        );
        Writer {
            path: path.to_owned(),
            magic: *MAGIC,
            file: Arc::clone(&file),
            file_len: HEADER_LEN as u64,
            next_check: MIN_COMPACT_BYTES,
            snapshot: Box::new(move || {
                live.lock()
                    .expect("live")
                    .iter()
                    .cloned()
                    .map(Live::Body)
                    .collect()
            }),
            stale: false,
            kept: Arc::new(Kept(Mutex::new(Places {
                file,
                pending: HashMap::new(),
                on_disk: HashMap::new(),
            }))),
        }
    }

    fn job(body: &[u8]) -> Job {
        Job {
            record: frame(body),
            done: None,
            kept: None,
        }
    }

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

    /// Kept records whose owner holds only their ids, and a live set that says which are
    /// not forgotten, as a persistent session's mailbox does.
    struct Owner {
        journal: Journal,
        ids: Arc<Mutex<std::collections::BTreeSet<u64>>>,
    }

    fn owner(path: &Path) -> (Owner, Found) {
        let found = read(path, MAGIC, 0).expect("read");
        let ids: Arc<Mutex<std::collections::BTreeSet<u64>>> = Arc::default();
        let live = Arc::clone(&ids);
        let snapshot: Snapshot = Box::new(move || {
            let mut out = vec![Live::Body(Bytes::from_static(b"state"))];
            out.extend(live.lock().expect("ids").iter().copied().map(Live::Kept));
            out
        });
        let journal = Journal::start(path, MAGIC, &found, snapshot).expect("start");
        (Owner { journal, ids }, found)
    }

    fn body(id: u64) -> Bytes {
        Bytes::from(format!("record {id} ").repeat(1 + (id % 7) as usize * 50))
    }

    #[tokio::test]
    async fn the_places_of_a_taken_backlog_do_not_stay_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (o, _) = owner(&dir.path().join("kept.journal"));
        let ids: Vec<u64> = (1..=3000).collect();
        let durable: Vec<_> = ids
            .iter()
            .map(|&id| {
                o.ids.lock().expect("ids").insert(id);
                o.journal.append_kept(id, body(id))
            })
            .collect();
        for d in durable {
            d.await.expect("durable");
        }
        assert_eq!(o.journal.kept_counts(), (0, 3000));
        let full = o.journal.kept_capacity();
        // The devices take their backlog: all but ten are finished.
        for id in &ids[..2990] {
            o.ids.lock().expect("ids").remove(id);
            o.journal.forget(*id);
        }
        // Down to the floor below which a table is left alone.
        assert!(
            o.journal.kept_capacity() <= 1024,
            "{} places of room for 10 records (was {full})",
            o.journal.kept_capacity()
        );
        for id in &ids[2990..] {
            assert_eq!(o.journal.read_kept(*id), Some(body(*id)), "record {id}");
        }
    }

    #[tokio::test]
    async fn kept_records_are_read_back_from_the_file_across_rewrites_and_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kept.journal");
        let (o, _) = owner(&path);
        // Enough to be rewritten several times: each record is forgotten a while after it
        // was kept, so most of the file is dead.
        let mut rewrites_seen = 0;
        let mut last_len = 0;
        for id in 1..=6000u64 {
            o.ids.lock().expect("ids").insert(id);
            o.journal.append_kept(id, body(id)).await.expect("durable");
            if id > 40 && id % 3 != 0 {
                let old = id - 40;
                if o.ids.lock().expect("ids").remove(&old) {
                    o.journal.forget(old);
                    o.journal.append_later(b"done");
                }
            }
            let len = std::fs::metadata(&path).expect("metadata").len();
            rewrites_seen += usize::from(len < last_len);
            last_len = len;
        }
        o.journal.sync().await.expect("sync");
        assert!(
            rewrites_seen >= 2,
            "the journal was rewritten {rewrites_seen} times"
        );
        let (pending, on_disk) = o.journal.kept_counts();
        let live: Vec<u64> = o.ids.lock().expect("ids").iter().copied().collect();
        assert_eq!(pending, 0, "everything durable is read from the file");
        assert_eq!(on_disk, live.len());
        for id in &live {
            assert_eq!(o.journal.read_kept(*id), Some(body(*id)), "record {id}");
        }
        assert_eq!(o.journal.read_kept(1), None, "forgotten");
        drop(o);

        // After a restart the owner learns the places from what read found.
        let (o, found) = owner(&path);
        let mut restored = Vec::new();
        for (b, offset) in found.bodies.iter().zip(&found.offsets) {
            if let Some(id) = live.iter().find(|id| body(**id) == b) {
                o.journal.keep_at(*id, *offset, b.len() as u32);
                o.ids.lock().expect("ids").insert(*id);
                restored.push(*id);
            }
        }
        restored.dedup();
        assert_eq!(restored, live, "every kept record is in the file, in order");
        for id in &live {
            assert_eq!(o.journal.read_kept(*id), Some(body(*id)), "record {id}");
        }
    }

    #[test]
    fn a_kept_record_that_does_not_match_its_checksum_is_not_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.journal");
        let mut data = header(MAGIC).to_vec();
        data.extend_from_slice(&frame(b"hello kept record"));
        std::fs::write(&path, &data).expect("write");
        let (o, found) = owner(&path);
        let (offset, len) = (found.offsets[0], found.bodies[0].len() as u32);
        o.journal.keep_at(1, offset, len);
        assert_eq!(
            o.journal.read_kept(1).as_deref(),
            Some(&b"hello kept record"[..])
        );
        // One byte changes under the journal (a bad sector, a stray write).
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(b"J", offset).expect("write");
        assert_eq!(o.journal.read_kept(1), None);
        // A length that is not the frame's is refused too.
        o.journal.keep_at(2, offset, len - 1);
        assert_eq!(o.journal.read_kept(2), None);
        o.journal.keep_at(3, 4, 10);
        assert_eq!(o.journal.read_kept(3), None, "an offset inside the header");
    }
}
