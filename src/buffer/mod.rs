//! The durable log: every record a device was told "accepted" is here until Kafka has
//! acknowledged it.
//!
//! # API contract (fixed; the rest of the gateway is written against it)
//!
//! * `Log::open(LogConfig)` recovers the directory and returns the log plus a report.
//! * `Log::append(&Record)` assigns the next sequence number and returns at once:
//!   `Err(AppendError::Full)` fails fast under `reject_new`; otherwise a [`Durable`] future
//!   that resolves to the record's sequence number once it is fsync'd (group commit).
//! * `Log::reader()` hands out the single reader (the forwarder). It reads in sequence order
//!   from the oldest unacknowledged record; `LogReader::ack` may be called out of order.
//! * `Log::pressure()` is a watch of the high/low watermark state for listeners.
//! * `Log::stats()` is a snapshot for metrics and status.
//! * `Log::close()` flushes, persists the cursor and stops the background thread.
//!
//! # On-disk format (all integers little-endian)
//!
//! The directory holds segment files `<first_seq, 20 digits>.seg` and one `cursor` file.
//!
//! ```text
//! segment  = header(32) (frame | padding)*
//! header   = magic "EGLOGSEG"(8) version:u16 (=1) reserved:u16 crc32c:u32
//!            first_seq:u64 created_ms:i64      crc over bytes 0..12 and 16..32
//! frame    = len:u32 crc32c:u32 seq:u64 body[len]   crc over len, seq and body
//! padding  = zero bytes up to the next 4096-byte file offset, starting with a zero len;
//!            written after commits of 16 KiB or more so the next fsync'd commit starts
//!            on a fresh page (the partly filled page is not rewritten: less wear)
//! body     = plain | sealed                               told apart by flags & 0x10
//! plain    = version:u8 (=1) flags:u8 received_ms:zigzag-varint
//!            device origin kafka_topic (varint length + UTF-8 each)
//!            [key: varint length + bytes]                 if flags & 0x04
//!            [headers: varint count, (name, value)*]      if flags & 0x08
//!            [receipt: varint length + bytes]             if flags & 0x20
//!            payload (the rest of the body)
//!            flags & 0x03 = source (1 MQTT, 2 CoAP); 0x10 is clear
//! sealed   = version:u8 (=1) flags:u8 (=0x10, nothing else) cipher:u8 key_id:u32
//!            nonce[12] ciphertext tag[16]
//!            written instead of `plain` under `[buffer.encryption]` (see `seal.rs`):
//!            ciphertext is a whole `plain` body sealed with the AEAD `cipher` names
//!            (1 ChaCha20-Poly1305, 2 AES-256-GCM) under the key whose id is `key_id` (the
//!            first four bytes of SHA-256 over a label and the key); the first 19 bytes are
//!            the associated data; nonce = a random 4-byte prefix per open + a u64 counter.
//!            35 bytes more than the plain body. The frame's CRC covers it as any body.
//! cursor   = two 44-byte slots at offsets 0 and 512, written alternately and synced:
//!            magic "EGLOGCUR"(8) generation:u64 head_seq:u64 head_segment:u64
//!            head_offset:u64 crc32c:u32; the valid slot with the higher generation wins.
//! ```
//!
//! The receipt (flag 0x20, added for issue 14) is opaque to the log: a listener's proof
//! that this message is stored (`ingest::receipts`: an MQTT QoS 2 packet id, a CoAP
//! message id), in the same frame and so the same fsync as the record. Bodies written
//! before it have the bit clear and read as before; a build older than the receipt counts a
//! body with it as corrupt, so a downgrade skips such records. The body's flag bits 0x40
//! and 0x80 are reserved for later fields, and a new layout gets a new version byte: old
//! segments stay readable, a body this code cannot read is skipped and counted as corrupt. A sealed body whose key is not configured is not skipped:
//! reading stops there with [`LogError::MissingKey`] until its key file is listed again.
//!
//! # Guarantees
//!
//! * A [`Durable`] resolves `Ok(seq)` only after the record's bytes were `sync_data`'d (and,
//!   if it opened a new segment, the directory fsync'd). Many appenders share one fsync: the
//!   commit thread syncs when `commit_delay` has passed since the first pending record, when
//!   `commit_bytes` are pending, or as soon as appends stop arriving for a moment (≤ 200 µs),
//!   whichever is first. `Durability::None` resolves after the write, without fsync.
//! * Sequence numbers increase strictly and are never reused for a record that became
//!   durable (or was read), also across restarts: the tail segment is never deleted, so its
//!   name and records (or the cursor's head) always give the next number. Failed appends
//!   leave gaps; the number of an append that failed or never resolved before a crash may
//!   be given out again (no record ever carried it). `LogStats::records` is computed from
//!   sequence numbers less the gaps of failed commits still ahead of the head, so refused
//!   appends never show as a backlog.
//! * The reader sees only durable records (written ones under `Durability::None`), in
//!   sequence order. Acks may arrive in any order; the head is the oldest record read but
//!   not acknowledged. It is persisted at most every 500 ms, at once when it enters another
//!   segment, and on close; after a crash the records between the persisted and the real
//!   head are delivered again (at least once), nothing behind the persisted head is.
//! * A segment is synced before its successor is created, so only the tail can be torn.
//!   Recovery reads only the tail: it truncates a torn last record, skips and counts corrupt
//!   records (resynchronising on the next valid frame), logs one line describing the repair
//!   and never refuses to start because of damaged data. Earlier segments are trusted by name
//!   and size; damage inside them is skipped and counted when the reader reaches it. Open
//!   time therefore grows with the number of segments, not with the backlog.
//! * Segments wholly behind the persisted head and the receipt pin ([`Log::set_pin`], the
//!   receipt store's checkpoint: the receipts from there on are only in the log) are
//!   deleted. `max_bytes` counts segment files
//!   plus pending bytes: `reject_new` fails appends with [`AppendError::Full`],
//!   `drop_oldest` deletes the oldest segment and counts its unacknowledged records as
//!   dropped (one WARN line with the sequence range). `max_age` works per segment: a
//!   segment goes once its successor was started more than `max_age` ago, and the tail is
//!   rolled every `max_age / 2`, so a record lives between `max_age` and about 1.5 ×
//!   `max_age` after it was appended.
//! * A failed write or fsync fails the records of that commit with [`AppendError::Io`], cuts
//!   the tail back to its last synced length and leaves everything stored intact; the next
//!   commit simply tries again, so writing resumes when space returns.
//! * Under `Durability::None` a power cut loses unsynced records, and their sequence
//!   numbers may be handed out again (a kill -9 loses nothing: the page cache survives).
//!
//! Memory is bounded by the pending buffer (about `commit_bytes`, twice), the reader's
//! 256 KiB chunks still referenced by records in flight, 40 bytes per record read and not
//! yet acknowledged (the forwarder's window bounds that), and a few words per segment; not
//! by the backlog. The reader reads files synchronously in 256 KiB chunks (normally from
//! the page cache) inside `read_batch`.

mod cursor;
mod format;
mod io;
mod reader;
mod recovery;
pub mod seal;
mod segment;
mod shared;
mod writer;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use self::format::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use self::io::{OsStorage, Storage};
use self::seal::LogKeys;
use std::os::unix::fs::OpenOptionsExt;

pub use self::reader::Measure;
use self::reader::ReaderCore;
use self::shared::{Acks, Shared, State, lock};
use self::writer::Writer;
use crate::record::Record;

/// A record read back from the log, with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub record: Record,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    RejectNew,
    DropOldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// fsync (sync_data) before an append resolves. The default.
    Fsync,
    /// No fsync: appends resolve once written to the OS. Loses data on power cut.
    None,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub max_bytes: u64,
    pub max_age: Option<Duration>,
    pub overflow: Overflow,
    pub durability: Durability,
    /// Group commit: longest wait before an fsync once a record is pending.
    pub commit_delay: Duration,
    /// Group commit: pending bytes that trigger an fsync at once.
    pub commit_bytes: usize,
    /// Fractions of `max_bytes`: above `high_watermark` listeners pause reading; they resume
    /// below `low_watermark`.
    pub high_watermark: f64,
    pub low_watermark: f64,
    /// Seal every new record with these keys (and open sealed records with them); plain
    /// records are written when `None`. See `seal.rs`.
    pub keys: Option<Arc<LogKeys>>,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            max_age: None,
            overflow: Overflow::RejectNew,
            durability: Durability::Fsync,
            commit_delay: Duration::from_millis(2),
            commit_bytes: 1 << 20,
            high_watermark: 0.9,
            low_watermark: 0.8,
            keys: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the log is closed")]
    Closed,
    #[error("could not start the log's commit thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the log in {path} is in use by another process (or another open Log)")]
    Locked { path: PathBuf },
    /// A record was sealed with a key that is not configured. It is not skipped: reading
    /// resumes from it once its key file is listed again.
    #[error(
        "record {seq} is encrypted with key {key_id:08x}, which is not configured: add its key file to buffer.encryption.previous_key_files"
    )]
    MissingKey { seq: u64, key_id: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The log holds `max_bytes` and the policy is `reject_new`: tell the device "busy".
    #[error("the log is full")]
    Full,
    /// The record alone is larger than a segment can hold.
    #[error("record of {0} bytes is too large for the log")]
    TooLarge(usize),
    /// Writing or syncing failed (disk full, I/O error); nothing already stored is lost.
    #[error("log write failed: {0}")]
    Io(String),
    #[error("the log is closed")]
    Closed,
}

/// Whether listeners should stop reading from their sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    Normal,
    /// Above the high watermark (until it falls below the low one).
    High,
}

/// Damage found and repaired on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub torn_tail_bytes: u64,
    pub corrupt_records: u64,
    pub cursor_repaired: bool,
}

#[derive(Debug, Clone, Default)]
pub struct LogStats {
    pub records: u64,
    pub bytes: u64,
    pub oldest_age: Option<Duration>,
    pub segments: usize,
    pub next_seq: u64,
    pub head_seq: u64,
    pub dropped_records: u64,
    /// Appends refused because their commit failed (disk full, I/O error) since open. Their
    /// sequence numbers are gaps: `records` does not count them.
    pub failed_appends: u64,
    pub corrupt_records: u64,
    pub fsyncs: u64,
    /// Turns of the commit thread's loop since open: it moves at least twice a second while
    /// the thread is alive and not stuck in a write or fsync.
    pub commit_loops: u64,
}

/// The durable log. Cheap to clone; all clones share one log.
#[derive(Clone)]
pub struct Log {
    handle: Arc<Handle>,
}

/// Dropping the last `Log` clone shuts the commit thread down (committing what is pending),
/// like `close` without waiting.
struct Handle {
    shared: Arc<Shared>,
    /// An exclusive lock on `<dir>/lock`, held while the log is open, so a second gateway
    /// (or a second `Log::open`) on the same directory fails instead of interleaving
    /// writes. Released by `close` once the commit thread has stopped, and by the kernel
    /// when the process dies, however it dies.
    dir_lock: Mutex<Option<std::fs::File>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake_writer.notify_one();
    }
}

/// Resolves to the record's sequence number once the record is durable.
pub struct Durable {
    shared: Arc<Shared>,
    seq: u64,
}

impl Durable {
    /// The sequence number the record was given (known before it is durable).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The outcome if the append has resolved, without registering a waker: for a caller
    /// that holds many `Durable`s in sequence order and polls only the oldest (appends
    /// resolve in sequence order, so once one is pending every later one is too).
    pub fn try_result(&self) -> Option<Result<u64, AppendError>> {
        (self.seq < self.shared.resolved.load(Ordering::Acquire))
            .then(|| self.shared.outcome(self.seq))
    }
}

impl std::future::Future for Durable {
    type Output = Result<u64, AppendError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = &self.shared;
        if self.seq < shared.resolved.load(Ordering::Acquire) {
            return Poll::Ready(shared.outcome(self.seq));
        }
        lock(&shared.waiters).push(cx.waker().clone());
        // Re-check: the commit thread may have resolved between the load and the push.
        if self.seq < shared.resolved.load(Ordering::Acquire) {
            return Poll::Ready(shared.outcome(self.seq));
        }
        Poll::Pending
    }
}

/// The single reader (the forwarder's handle).
pub struct LogReader {
    core: ReaderCore,
}

/// Takes the directory's lock file, creating the directory if needed, and checks that new
/// files can be made in it (the lock file may be left from a run with other permissions).
fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File, LogError> {
    let dir_error = |source| LogError::Dir {
        path: dir.to_owned(),
        source,
    };
    io::create_private_dir(dir).map_err(dir_error)?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(dir_error)?;
    let _ = std::fs::remove_file(&probe);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(io::PRIVATE_FILE)
        .open(dir.join("lock"))
        .map_err(dir_error)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LogError::Locked {
            path: dir.to_owned(),
        }),
        Err(errno) => Err(dir_error(errno.into())),
    }
}

impl Log {
    /// Opens (creating if needed) and recovers the log in `config.dir`. Blocking I/O: call it
    /// at startup or from `spawn_blocking`.
    pub fn open(config: LogConfig) -> Result<(Log, RecoveryReport), LogError> {
        Log::open_pinned(config, u64::MAX)
    }

    /// [`Log::open`] with the receipt pin at `pin` from the first moment (see
    /// [`Log::set_pin`]): the gateway passes its receipt store's checkpoint, so no segment it
    /// still has to scan is removed before it has.
    pub fn open_pinned(config: LogConfig, pin: u64) -> Result<(Log, RecoveryReport), LogError> {
        let lock = lock_dir(&config.dir)?;
        let (mut log, report) = Log::open_with(config, Arc::new(OsStorage), pin)?;
        if let Some(handle) = Arc::get_mut(&mut log.handle) {
            handle.dir_lock = Mutex::new(Some(lock));
        }
        Ok((log, report))
    }

    /// [`Log::open`] on the blocking pool, for a caller on the runtime (the gateway's start).
    pub async fn open_async(config: LogConfig) -> Result<(Log, RecoveryReport), LogError> {
        Log::open_pinned_async(config, u64::MAX).await
    }

    /// [`Log::open_pinned`] on the blocking pool.
    pub async fn open_pinned_async(
        config: LogConfig,
        pin: u64,
    ) -> Result<(Log, RecoveryReport), LogError> {
        match tokio::task::spawn_blocking(move || Log::open_pinned(config, pin)).await {
            Ok(opened) => opened,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only when the runtime is shutting down.
            Err(_) => Err(LogError::Closed),
        }
    }

    /// Opens on a disk whose every fsync takes `delay` longer ([`io::SlowSync`]).
    #[cfg(test)]
    pub(crate) fn open_slow(
        config: LogConfig,
        delay: Duration,
    ) -> Result<(Log, RecoveryReport), LogError> {
        Log::open_with(config, Arc::new(io::SlowSync { delay }), u64::MAX)
    }

    pub(crate) fn open_with(
        config: LogConfig,
        storage: Arc<dyn Storage>,
        pin: u64,
    ) -> Result<(Log, RecoveryReport), LogError> {
        let started = Instant::now();
        let cfg = effective_config(config);
        let max_body = (cfg.segment_bytes as usize - SEGMENT_HEADER_LEN - FRAME_HEADER_LEN)
            .min(u32::MAX as usize);
        let sync = cfg.durability == Durability::Fsync;
        let rec = recovery::recover(storage.as_ref(), &cfg.dir, max_body, sync)?;
        let report = rec.report.clone();
        check_capacity(
            storage.as_ref(),
            &cfg,
            rec.segments.iter().map(|s| s.len).sum(),
        );

        let tail_len = rec
            .segments
            .back()
            .map_or(SEGMENT_HEADER_LEN as u64, |s| s.len);
        let mut state = State {
            pending: Vec::with_capacity(cfg.commit_bytes.min(1 << 20)),
            pending_first: rec.next_seq,
            pending_records: 0,
            first_pending_at: None,
            next_seq: rec.next_seq,
            used_bytes: 0,
            segments: rec.segments,
            closing: false,
            closed: false,
            high: false,
            maintenance: false,
            known_corrupt: rec.known_corrupt,
        };
        state.recount();
        let high_bytes = (cfg.max_bytes as f64 * cfg.high_watermark) as u64;
        let low_bytes = (cfg.max_bytes as f64 * cfg.low_watermark) as u64;
        let (pressure, _) = watch::channel(Pressure::Normal);
        let shared = Arc::new(Shared {
            max_body,
            storage,
            state: Mutex::new(state),
            wake_writer: Condvar::new(),
            resolved: AtomicU64::new(rec.next_seq),
            waiters: Mutex::new(Vec::new()),
            failures: Mutex::new(VecDeque::new()),
            gaps: Mutex::new(VecDeque::new()),
            visible: watch::channel(0).0,
            pressure,
            acks: Mutex::new(Acks {
                inflight: VecDeque::new(),
                read_pos: rec.head,
            }),
            reader_taken: AtomicBool::new(false),
            stopped: watch::channel(false).0,
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            corrupt: AtomicU64::new(report.corrupt_records),
            fsyncs: AtomicU64::new(0),
            commit_loops: AtomicU64::new(0),
            pin: AtomicU64::new(pin),
            high_bytes,
            low_bytes,
            cfg,
        });
        {
            let mut st = lock(&shared.state);
            shared.update_pressure(&mut st);
        }
        if report.corrupt_records > 0 {
            metrics::counter!("edgegate_log_corrupt_records_total")
                .increment(report.corrupt_records);
        }
        let writer = Writer {
            shared: shared.clone(),
            tail: rec.tail,
            tail_len,
            good_len: tail_len,
            cursor: rec.cursor,
            persisted: rec.head,
            last_persist: Instant::now(),
            last_maintain: Instant::now(),
            spare: Vec::new(),
            failing_since: None,
            last_failure_log: None,
        };
        std::thread::Builder::new()
            .name("edgegate-log".into())
            .spawn(move || writer.run())
            .map_err(LogError::Spawn)?;

        let dir = shared.cfg.dir.display().to_string();
        let elapsed = started.elapsed();
        if rec.repairs.is_empty() {
            tracing::info!(
                dir,
                segments = report.segments,
                records = report.records,
                next_seq = rec.next_seq,
                ?elapsed,
                "Opened the log"
            );
        } else {
            tracing::warn!(
                dir,
                segments = report.segments,
                records = report.records,
                next_seq = rec.next_seq,
                torn_tail_bytes = report.torn_tail_bytes,
                corrupt_records = report.corrupt_records,
                cursor_repaired = report.cursor_repaired,
                repairs = %rec.repairs.join("; "),
                ?elapsed,
                "Opened the log after repairing damage"
            );
        }
        Ok((
            Log {
                handle: Arc::new(Handle {
                    shared,
                    dir_lock: Mutex::new(None),
                }),
            },
            report,
        ))
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &std::path::Path {
        &self.shared().cfg.dir
    }

    /// Assigns the next sequence number and queues the record for the next group commit.
    /// Fails fast with `Full` under `reject_new`.
    pub fn append(&self, record: &Record) -> Result<Durable, AppendError> {
        self.append_with_receipt(record, &[])
    }

    /// [`Log::append`] with a receipt in the same frame (empty: none), so the record and the
    /// listener's "this message is stored" become durable in one fsync or not at all.
    /// [`scan_receipts`] reads them back.
    pub fn append_with_receipt(
        &self,
        record: &Record,
        receipt: &[u8],
    ) -> Result<Durable, AppendError> {
        let shared = self.shared();
        let mut body_len = format::body_len(record, receipt);
        // Sealing happens before the lock, so appenders seal in parallel.
        let sealed = shared.cfg.keys.as_ref().map(|keys| {
            let sealed = keys.seal(&format::encode_body(record, receipt, body_len));
            body_len = sealed.len();
            sealed
        });
        if body_len > shared.max_body {
            return Err(AppendError::TooLarge(body_len + FRAME_HEADER_LEN));
        }
        let frame_len = (FRAME_HEADER_LEN + body_len) as u64;
        let mut st = lock(&shared.state);
        if st.closing {
            return Err(AppendError::Closed);
        }
        let mut wake = false;
        if st.used_bytes + frame_len > shared.cfg.max_bytes {
            match shared.cfg.overflow {
                // Counted by the listener that hears it (`ingest::refused`), as `log_full`.
                Overflow::RejectNew => return Err(AppendError::Full),
                Overflow::DropOldest => {
                    wake |= !st.maintenance;
                    st.maintenance = true;
                }
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        if st.pending_records == 0 {
            st.pending_first = seq;
            st.first_pending_at = Some(Instant::now());
            wake = true;
        }
        let before = st.pending.len();
        match &sealed {
            Some(body) => format::encode_frame_of(&mut st.pending, seq, body),
            None => format::encode_frame(&mut st.pending, seq, record, receipt, body_len),
        }
        st.pending_records += 1;
        st.used_bytes += frame_len;
        let threshold = shared.cfg.commit_bytes;
        wake |= before < threshold && st.pending.len() >= threshold;
        if !st.high && st.used_bytes > shared.high_bytes {
            shared.update_pressure(&mut st);
        }
        drop(st);
        if wake {
            shared.wake_writer.notify_one();
        }
        Ok(Durable {
            shared: shared.clone(),
            seq,
        })
    }

    /// The sequence number the next append will get. Every record appended before this
    /// call has a lower one.
    pub fn next_seq(&self) -> u64 {
        lock(&self.shared().state).next_seq
    }

    /// The outcome of the append that got `seq`, once it has one (appends resolve in
    /// sequence order). For a caller that kept only the number.
    pub fn outcome(&self, seq: u64) -> Option<Result<u64, AppendError>> {
        let shared = self.shared();
        (seq < shared.resolved.load(Ordering::Acquire)).then(|| shared.outcome(seq))
    }

    /// Keeps every segment holding a record at or above `seq` after it was acknowledged
    /// (`u64::MAX`: no pin). `drop_oldest` and `max_age` are the operator's choice to lose
    /// records and still drop such segments. A segment the pin lets go is removed at the
    /// commit thread's next housekeeping (within `CURSOR_INTERVAL`): moving the pin does not
    /// wake it.
    pub fn set_pin(&self, seq: u64) {
        self.shared().pin.store(seq, Ordering::Release);
    }

    /// The single reader; `None` if it was already taken.
    pub fn reader(&self) -> Option<LogReader> {
        let shared = self.shared();
        if shared.reader_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(LogReader {
            core: ReaderCore {
                shared: shared.clone(),
                walker: None,
                visible: shared.visible.subscribe(),
            },
        })
    }

    pub fn pressure(&self) -> watch::Receiver<Pressure> {
        self.shared().pressure.subscribe()
    }

    pub fn stats(&self) -> LogStats {
        let shared = self.shared();
        let (bytes, segments, next_seq, head_segment_ms) = {
            let st = lock(&shared.state);
            (
                st.used_bytes,
                st.segments.len(),
                st.next_seq,
                st.segments.front().map(|s| s.created_ms),
            )
        };
        let (head, oldest_ms) = {
            let acks = lock(&shared.acks);
            let head = acks.head();
            (head, acks.inflight.front().map(|f| f.received_ms))
        };
        let records = next_seq
            .saturating_sub(head.head_seq)
            .saturating_sub(shared.gap_records(head.head_seq));
        let now = recovery::now_ms();
        // The oldest unacknowledged record's receive time if it is in flight, else (at
        // segment granularity) when its segment was started.
        let oldest_age = if records == 0 {
            None
        } else {
            oldest_ms
                .or(head_segment_ms)
                .map(|ms| Duration::from_millis(now.saturating_sub(ms).max(0) as u64))
        };
        LogStats {
            records,
            bytes,
            oldest_age,
            segments,
            next_seq,
            head_seq: head.head_seq,
            dropped_records: shared.dropped.load(Ordering::Relaxed),
            failed_appends: shared.failed.load(Ordering::Relaxed),
            corrupt_records: shared.corrupt.load(Ordering::Relaxed),
            fsyncs: shared.fsyncs.load(Ordering::Relaxed),
            commit_loops: shared.commit_loops.load(Ordering::Relaxed),
        }
    }

    /// The log accepts appends: not closing, and the commit thread has not stopped.
    pub fn is_open(&self) -> bool {
        let st = lock(&self.shared().state);
        !st.closing && !st.closed
    }

    /// Commits everything pending, persists the cursor, stops the background thread.
    pub async fn close(&self) -> Result<(), LogError> {
        let shared = self.shared();
        lock(&shared.state).closing = true;
        shared.wake_writer.notify_one();
        let mut stopped = shared.stopped.subscribe();
        // The sender lives in `shared`, which we hold: this only ends when the thread stops.
        let _ = stopped.wait_for(|s| *s).await;
        lock(&self.handle.dir_lock).take();
        Ok(())
    }
}

impl LogReader {
    /// Waits until at least one unread record is durable, then returns up to `max_records`
    /// records / `max_bytes` payload bytes (always at least one record) in sequence order.
    /// Returns `Err(LogError::Closed)` once the log is closed and everything was read.
    pub async fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.read_batch_by(max_records, max_bytes, reader::payload_len)
            .await
    }

    /// [`LogReader::read_batch`], with `max_bytes` counted by `measure` (what a record will
    /// cost the caller once read) instead of payload bytes. A batch stays within it, unless
    /// its one record alone is over.
    pub async fn read_batch_by(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        measure: Measure,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.core.read_batch(max_records, max_bytes, measure).await
    }

    /// Marks one record as delivered. Acks may come in any order; the head advances over
    /// the contiguous acknowledged prefix and is persisted in the cursor file.
    pub fn ack(&self, seq: u64) {
        self.ack_range(seq, seq + 1);
    }

    /// Marks every record read so far with `start <= seq < end` as delivered (one Kafka
    /// batch at once).
    pub fn ack_range(&self, start: u64, end: u64) {
        let shared = &self.core.shared;
        let crossed = {
            let mut acks = lock(&shared.acks);
            let before = acks.head().seg_first;
            let from = acks.inflight.partition_point(|f| f.seq < start);
            for f in acks.inflight.range_mut(from..) {
                if f.seq >= end {
                    break;
                }
                f.acked = true;
            }
            while acks.inflight.front().is_some_and(|f| f.acked) {
                acks.inflight.pop_front();
            }
            acks.head().seg_first != before
        };
        if crossed {
            lock(&shared.state).maintenance = true;
            shared.wake_writer.notify_one();
        }
    }
}

/// Clamps settings that cannot work together, with a warning.
fn effective_config(mut cfg: LogConfig) -> LogConfig {
    // drop_oldest, max_age and acknowledged-segment removal work on whole segments and the
    // tail is never deleted, so max_bytes must span at least two segments.
    let limit = (cfg.max_bytes / 2).max(MIN_SEGMENT_BYTES);
    let wanted = cfg.segment_bytes.max(MIN_SEGMENT_BYTES);
    let segment_bytes = wanted.min(limit).min(u64::from(u32::MAX));
    if segment_bytes != cfg.segment_bytes {
        tracing::warn!(
            configured = cfg.segment_bytes,
            used = segment_bytes,
            max_bytes = cfg.max_bytes,
            "Adjusted the log segment size to half of max_bytes or less"
        );
        cfg.segment_bytes = segment_bytes;
    }
    let (low, high) = (cfg.low_watermark, cfg.high_watermark);
    if !(low.is_finite() && high.is_finite() && low <= high) {
        tracing::warn!(low, high, "Unusable log watermarks, using 0.8 and 0.9");
        cfg.low_watermark = 0.8;
        cfg.high_watermark = 0.9;
    }
    cfg
}

const MIN_SEGMENT_BYTES: u64 = 4096;

/// HELP text of the counters the log bumps itself (its gauges come from [`Log::stats`] and
/// are set by `admin::metrics`).
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_histogram!(
        "edgegate_log_fsync_seconds",
        "Duration of the log's fsyncs."
    );
    describe_counter!(
        "edgegate_log_dropped_records_total",
        "Records dropped by the overflow or age policy."
    );
    describe_counter!(
        "edgegate_log_corrupt_records_total",
        "Corrupt records skipped in the log."
    );
    describe_counter!(
        "edgegate_log_append_errors_total",
        "Records whose write or fsync failed (disk full, I/O error); the devices were told."
    );
}

/// STYLE.md 8: say at startup if the file system cannot hold `max_bytes`.
fn check_capacity(storage: &dyn Storage, cfg: &LogConfig, used: u64) {
    let Some(cap) = storage.capacity(&cfg.dir) else {
        return;
    };
    let room = cap.available.saturating_add(used);
    if room < cfg.max_bytes {
        tracing::warn!(
            dir = %cfg.dir.display(),
            max_bytes = cfg.max_bytes,
            available_bytes = room,
            filesystem_bytes = cap.total,
            "The log's file system cannot hold max_bytes; appends will fail when the disk fills"
        );
    }
}

/// For the cargo-fuzz target `log_records`: walks `data` as the reader walks a segment
/// (frame checks, padding, resynchronisation) and decodes every checksummed body, plain and
/// with a fixed key. Returns how many bodies decoded. Never panics. Built for the fuzz crate
/// only (feature `fuzz`).
#[cfg(feature = "fuzz")]
pub fn fuzz_frames(data: &[u8]) -> usize {
    use std::sync::OnceLock;
    static KEYS: OnceLock<LogKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| LogKeys::new(seal::Cipher::Chacha20Poly1305, &[9; 32], &[]));
    let data = bytes::Bytes::copy_from_slice(data);
    let mut decoded = 0;
    walk_frames(&data, 0, 1 << 20, |_, body| {
        decoded += usize::from(format::decode_body(&body, None).is_ok());
        decoded += usize::from(format::decode_body(&body, Some(keys)).is_ok());
        true
    });
    decoded
}

/// Steps over the frames of `data` from `at` as the reader checks them: every checksummed
/// frame's sequence number and body to `each` (which returns `false` to stop), padding
/// skipped, damage passed byte by byte, a torn tail the end. Returns whether it ran to the end.
fn walk_frames(
    data: &bytes::Bytes,
    mut at: usize,
    max_body: usize,
    mut each: impl FnMut(u64, bytes::Bytes) -> bool,
) -> bool {
    while at < data.len() {
        match format::check_frame(&data[at..], max_body) {
            format::Frame::Valid { seq, len } => {
                if !each(seq, data.slice(at + FRAME_HEADER_LEN..at + len)) {
                    return false;
                }
                at += len;
            }
            format::Frame::Padding { len } => at += len.max(1),
            format::Frame::Invalid => at += 1,
            format::Frame::Incomplete { .. } => break,
        }
    }
    true
}

/// For the cargo-fuzz target `log_recovery`: makes `dir` a log directory holding `segment`
/// as its only segment file and `cursor` as its cursor file (either may be garbage), opens
/// it as the gateway does after a crash, reads every record it yields and appends one more.
/// Returns the records read. Errors are fine; a panic or a hang is a bug. Built for the fuzz
/// crate only.
#[cfg(feature = "fuzz")]
pub fn fuzz_recovery(
    dir: &std::path::Path,
    segment: &[u8],
    cursor: &[u8],
) -> Result<usize, LogError> {
    let io_error = |source| LogError::Dir {
        path: dir.to_owned(),
        source,
    };
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io_error)?;
    std::fs::write(segment::segment_path(dir, 0), segment).map_err(io_error)?;
    std::fs::write(dir.join(cursor::CURSOR_FILE), cursor).map_err(io_error)?;
    let config = LogConfig {
        segment_bytes: 64 << 10,
        durability: Durability::None,
        ..LogConfig::new(dir)
    };
    let (log, _) = Log::open(config)?;
    let mut reader = log.reader().expect("the first reader");
    let mut read = 0;
    loop {
        let (batch, _) = reader.core.try_read(1000, 1 << 20, reader::payload_len)?;
        if batch.is_empty() {
            break;
        }
        read += batch.len();
        if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
            reader.ack_range(first.seq, last.seq + 1);
        }
    }
    let record = Record {
        source: crate::record::Source::Mqtt,
        received_ms: 0,
        device: "fuzz".into(),
        origin: "fuzz".into(),
        kafka_topic: "fuzz".into(),
        key: None,
        headers: Vec::new(),
        payload: bytes::Bytes::from_static(b"after recovery"),
    };
    let _ = log.append(&record);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_error)?;
    runtime.block_on(log.close())?;
    Ok(read)
}

/// Reads the receipts ([`Log::append_with_receipt`]) of the records from sequence number
/// `from` on, in sequence order, skipping segments wholly before it. For the gateway's start,
/// between opening the log and the first append: the files are read as [`inspect`] reads
/// them. A record whose body cannot be read (damage, a missing key) is skipped: its receipt,
/// if it had one, is lost, which can cost one duplicate, never a lost message.
pub fn scan_receipts(
    dir: &std::path::Path,
    keys: Option<&LogKeys>,
    from: u64,
    mut each: impl FnMut(u64, bytes::Bytes),
) -> Result<(), LogError> {
    let dir_error = |source| LogError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)
        .map_err(dir_error)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| segment::parse_segment_name(&name))
        .collect();
    firsts.sort_unstable();
    // The segments from the last one starting at or before `from`.
    let start = firsts.iter().rposition(|&f| f <= from).unwrap_or(0);
    for &first in &firsts[start..] {
        let path = segment::segment_path(dir, first);
        let data = match std::fs::read(&path) {
            Ok(data) => bytes::Bytes::from(data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LogError::Io { path, source }),
        };
        walk_frames(&data, SEGMENT_HEADER_LEN, data.len(), |seq, body| {
            if seq >= from {
                if let Ok((_, Some(receipt))) = format::decode_with_receipt(&body, keys) {
                    each(seq, receipt);
                }
            }
            true
        });
    }
    Ok(())
}

/// Reads every record in a log directory without opening it as a log: no lock taken and
/// nothing written, so it works beside the running gateway (`edgegate dead-letters`).
/// Segments are read in order, frames checked as the reader checks them; `each` gets every
/// record's sequence number and the record, or why its body cannot be read (a missing key,
/// damage), and returns `false` to stop. A torn tail (a commit in progress) ends a segment.
pub fn inspect(
    dir: &std::path::Path,
    keys: Option<&LogKeys>,
    mut each: impl FnMut(u64, Result<Record, String>) -> bool,
) -> Result<(), LogError> {
    let dir_error = |source| LogError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)
        .map_err(dir_error)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| segment::parse_segment_name(&name))
        .collect();
    firsts.sort_unstable();
    for first in firsts {
        let path = segment::segment_path(dir, first);
        let data = match std::fs::read(&path) {
            Ok(data) => bytes::Bytes::from(data),
            // Dropped by the running gateway meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LogError::Io { path, source }),
        };
        let finished = walk_frames(&data, SEGMENT_HEADER_LEN, data.len(), |seq, body| {
            let record = format::decode_body(&body, keys).map_err(|e| match e {
                seal::Unsealed::UnknownKey(id) => {
                    format!("encrypted with key {id:08x}, which is not configured")
                }
                seal::Unsealed::Corrupt => "undecodable body".to_owned(),
            });
            each(seq, record)
        });
        if !finished {
            return Ok(());
        }
    }
    Ok(())
}
