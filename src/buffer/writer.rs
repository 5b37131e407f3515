//! The commit thread: the only code that writes, syncs, creates or removes files.
//!
//! Appenders encode their frames into `State::pending` under the state lock and wait on
//! `Shared::resolved`. This thread takes the whole pending buffer at once, writes it (rolling
//! to a new segment where the current one is full), syncs once, and resolves everything it
//! took: one fsync for however many appenders piled up meanwhile. Between commits it
//! persists the cursor, removes acknowledged segments and enforces `max_bytes`/`max_age`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::cursor::{CursorFile, CursorPos};
use super::format::{FRAME_HEADER_LEN, PAGE, SEGMENT_HEADER_LEN, SegmentHeader};
use super::io::StorageFile;
use super::recovery::now_ms;
use super::segment::{SegMeta, segment_path};
use super::shared::{Shared, lock};
use super::{Durability, Overflow};

/// How often a moving head is written to the cursor file. Each write dirties a page (wear
/// on SD cards); a crash replays at most this much acknowledged traffic, which Kafka
/// consumers see as duplicates. A head crossing into another segment is written at once so
/// the segment behind it can go.
pub(crate) const CURSOR_INTERVAL: Duration = Duration::from_millis(500);

/// While a commit is pending and appends have stopped arriving for this long, commit
/// without waiting out `commit_delay`: nobody else is coming to share the fsync.
const MAX_QUIET: Duration = Duration::from_micros(200);

/// A commit that wrote at least this much is padded with zeros to the next page boundary
/// (`Frame::Padding`). Without it every fsync rewrites the partly filled last page along
/// with the new data (one extra 4 KiB page per commit: +13 % device writes at ~100 records
/// of 300 B per fsync); with it a commit dirties only fresh pages, for a space cost of half
/// a page per commit on average. Small commits (low rates) are not padded: there the space
/// would matter and every commit rewrites a page either way.
pub(crate) const PAD_MIN_COMMIT: u64 = 16 << 10;

/// Zeros for padding.
const ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];

/// One failure message per this interval while writes keep failing (disk full).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the commit thread owns besides the shared state.
pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub tail: Box<dyn StorageFile>,
    /// Bytes written to the tail.
    pub tail_len: u64,
    /// Bytes of the tail known to be safe: synced (or written, without fsync).
    pub good_len: u64,
    pub cursor: CursorFile,
    pub persisted: CursorPos,
    pub last_persist: Instant,
    /// When housekeeping last ran (it runs at least every `CURSOR_INTERVAL`).
    pub last_maintain: Instant,
    /// Spare buffer swapped with `State::pending` so neither side allocates per commit.
    pub spare: Vec<u8>,
    /// Failed commits since the last success, for log throttling.
    pub failing_since: Option<(Instant, u64)>,
    pub last_failure_log: Option<Instant>,
}

struct Batch {
    data: Vec<u8>,
    first_seq: u64,
    /// One past the last sequence number in the batch.
    end_seq: u64,
}

impl Writer {
    fn fsync(&self) -> bool {
        self.shared.cfg.durability == Durability::Fsync
    }

    pub(crate) fn run(mut self) {
        let quiet = (self.shared.cfg.commit_delay / 4).min(MAX_QUIET);
        loop {
            self.shared.commit_loops.fetch_add(1, Ordering::Relaxed);
            let (batch, closing, housekeeping) = self.wait_for_work(quiet);
            if let Some(batch) = batch {
                self.commit(batch);
            }
            if closing || housekeeping || self.last_maintain.elapsed() >= CURSOR_INTERVAL {
                self.maintain(closing);
            }
            if closing {
                let mut st = lock(&self.shared.state);
                if st.pending_records == 0 {
                    st.closed = true;
                    drop(st);
                    self.shared.resolve(0);
                    self.shared.stopped.send_replace(true);
                    tracing::debug!("Log commit thread stopped");
                    return;
                }
            }
        }
    }

    /// Sleeps until there is a batch worth committing or housekeeping to do.
    /// Returns the batch (if any), whether the log is closing, and whether housekeeping
    /// was requested.
    fn wait_for_work(&mut self, quiet: Duration) -> (Option<Batch>, bool, bool) {
        let cfg = &self.shared.cfg;
        let fsync = self.fsync();
        let mut st = lock(&self.shared.state);
        let mut seen = (st.pending_records, Instant::now());
        loop {
            let now = Instant::now();
            if st.pending_records > 0 {
                let due = st.first_pending_at.map_or(now, |t| t + cfg.commit_delay);
                if st.pending_records != seen.0 {
                    seen = (st.pending_records, now);
                }
                let commit_now = !fsync
                    || st.closing
                    || st.pending.len() >= cfg.commit_bytes
                    || now >= due
                    || now.duration_since(seen.1) >= quiet;
                if commit_now {
                    std::mem::swap(&mut st.pending, &mut self.spare);
                    let batch = Batch {
                        data: std::mem::take(&mut self.spare),
                        first_seq: st.pending_first,
                        end_seq: st.next_seq,
                    };
                    st.pending_records = 0;
                    st.first_pending_at = None;
                    let housekeeping = std::mem::take(&mut st.maintenance);
                    return (Some(batch), st.closing, housekeeping);
                }
                let wait = due.saturating_duration_since(now).min(quiet);
                st = self
                    .shared
                    .wake_writer
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let next_maintenance = self.last_maintain + CURSOR_INTERVAL;
            if st.closing || st.maintenance || now >= next_maintenance {
                st.maintenance = false;
                return (None, st.closing, true);
            }
            st = self
                .shared
                .wake_writer
                .wait_timeout(st, next_maintenance - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            seen = (st.pending_records, Instant::now());
        }
    }

    fn commit(&mut self, batch: Batch) {
        let result = self.write_batch(&batch);
        let data_len = batch.data.len();
        let mut data = batch.data;
        data.clear();
        if data.capacity() > 4 * self.shared.cfg.commit_bytes.max(1 << 16) {
            data.shrink_to(self.shared.cfg.commit_bytes);
        }
        self.spare = data;
        match result {
            Ok(()) => {
                if let Some((since, failed)) = self.failing_since.take() {
                    tracing::info!(
                        failed_records = failed,
                        after = ?since.elapsed(),
                        "Log writes resumed"
                    );
                }
            }
            Err((durable_upto, e)) => {
                let msg: Arc<str> = Arc::from(e.to_string());
                self.shared.fail(durable_upto, batch.end_seq, &msg);
                self.note_write_failure(batch.end_seq - durable_upto, data_len, &e);
            }
        }
        {
            let mut st = lock(&self.shared.state);
            if let Some(back) = st.segments.back_mut() {
                back.len = self.good_len;
            }
            st.recount();
            self.shared.update_pressure(&mut st);
        }
        self.shared.resolve(batch.end_seq);
    }

    /// Logs (throttled) and counts records that could not be written.
    fn note_write_failure(&mut self, records: u64, bytes: usize, e: &io::Error) {
        metrics::counter!("edgegate_log_append_errors_total").increment(records);
        let failing = self.failing_since.get_or_insert((Instant::now(), 0));
        failing.1 += records;
        let log_now = self
            .last_failure_log
            .is_none_or(|t| t.elapsed() >= FAILURE_LOG_INTERVAL);
        if log_now {
            self.last_failure_log = Some(Instant::now());
            tracing::warn!(
                error = %e,
                records,
                bytes,
                "Log write failed; appends fail until it succeeds again, stored records are kept"
            );
        }
    }

    /// Writes and syncs a batch. On failure returns how far it got (every record below is
    /// durable) after cutting the tail back to its last safe length.
    fn write_batch(&mut self, batch: &Batch) -> Result<(), (u64, io::Error)> {
        let seg_bytes = self.shared.cfg.segment_bytes;
        let data = &batch.data;
        let mut pos = 0usize;
        let mut durable_upto = batch.first_seq;
        // Where this commit started writing in the current tail.
        let mut start_len = self.tail_len;
        while pos < data.len() {
            let room = seg_bytes.saturating_sub(self.tail_len) as usize;
            let end = fitting_prefix(&data[pos..], room) + pos;
            if end > pos {
                if let Err(e) = self.tail.write_all_at(&data[pos..end], self.tail_len) {
                    return Err(self.cut_back(durable_upto, e));
                }
                self.tail_len += (end - pos) as u64;
                if !self.fsync() {
                    self.good_len = self.tail_len;
                }
                pos = end;
            }
            if pos < data.len() {
                // The rest goes to a new segment; this one must be whole on disk first.
                if self.fsync() {
                    if let Err(e) = self.sync_tail() {
                        return Err(self.cut_back(durable_upto, e));
                    }
                }
                durable_upto = frame_seq(&data[pos..]);
                if let Err(e) = self.roll(durable_upto) {
                    return Err((durable_upto, e));
                }
                start_len = self.tail_len;
            }
        }
        if self.fsync() && self.tail_len - start_len >= PAD_MIN_COMMIT {
            self.pad_to_page();
        }
        if self.fsync() {
            if let Err(e) = self.sync_tail() {
                return Err(self.cut_back(durable_upto, e));
            }
        }
        Ok(())
    }

    /// Best effort: without room or on error the commit simply stays unpadded.
    fn pad_to_page(&mut self) {
        let pad = (PAGE - self.tail_len % PAGE) % PAGE;
        if pad < 4 || self.tail_len + pad > self.shared.cfg.segment_bytes {
            return;
        }
        match self
            .tail
            .write_all_at(&ZEROS[..pad as usize], self.tail_len)
        {
            Ok(()) => self.tail_len += pad,
            Err(_) => {
                // Whatever part was written is zeros the next commit overwrites.
                let _ = self.tail.set_len(self.tail_len);
            }
        }
    }

    fn sync_tail(&mut self) -> io::Result<()> {
        let start = Instant::now();
        self.tail.sync_data()?;
        let secs = start.elapsed().as_secs_f64();
        metrics::histogram!("edgegate_log_fsync_seconds").record(secs);
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.good_len = self.tail_len;
        Ok(())
    }

    /// After a failed write or sync nothing past `good_len` can be trusted (a failed fsync
    /// may have dropped dirty pages): cut it off so it is never read or recovered.
    fn cut_back(&mut self, durable_upto: u64, e: io::Error) -> (u64, io::Error) {
        if let Err(te) = self.tail.set_len(self.good_len) {
            tracing::debug!(error = %te, "Could not truncate the tail after a failed write");
        }
        self.tail_len = self.good_len;
        (durable_upto, e)
    }

    /// Starts a new tail segment whose first record is `first_seq`.
    fn roll(&mut self, first_seq: u64) -> io::Result<()> {
        let shared = self.shared.clone();
        let dir = &shared.cfg.dir;
        let path = segment_path(dir, first_seq);
        let created_ms = now_ms();
        let header = SegmentHeader {
            first_seq,
            created_ms,
        }
        .encode();
        let made = shared.storage.open(&path, true).and_then(|f| {
            f.set_len(0)?;
            f.write_all_at(&header, 0)?;
            if self.fsync() {
                f.sync_data()?;
                shared.storage.sync_dir(dir)?;
            }
            Ok(f)
        });
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                if let Err(re) = shared.storage.remove(&path) {
                    tracing::debug!(error = %re, "Could not remove a half-created segment");
                }
                return Err(e);
            }
        };
        self.tail = file;
        self.tail_len = SEGMENT_HEADER_LEN as u64;
        let mut st = lock(&shared.state);
        if let Some(sealed) = st.segments.back_mut() {
            sealed.len = self.good_len;
        }
        self.good_len = self.tail_len;
        st.segments.push_back(SegMeta {
            first_seq,
            len: SEGMENT_HEADER_LEN as u64,
            created_ms,
        });
        st.recount();
        Ok(())
    }

    /// Cursor, removal of acknowledged segments, `max_bytes` under drop_oldest, `max_age`.
    fn maintain(&mut self, closing: bool) {
        let cfg = self.shared.cfg.clone();
        if cfg.overflow == Overflow::DropOldest {
            loop {
                let over = {
                    let st = lock(&self.shared.state);
                    st.used_bytes > cfg.max_bytes && st.segments.len() > 1
                };
                if !over || !self.drop_oldest("the log reached max_bytes") {
                    break;
                }
            }
        }
        if let Some(max_age) = cfg.max_age {
            let limit = now_ms() - max_age.as_millis() as i64;
            loop {
                let expired = {
                    let st = lock(&self.shared.state);
                    st.segments.len() > 1 && st.segments[1].created_ms <= limit
                };
                if !expired || !self.drop_oldest("records exceeded max_age") {
                    break;
                }
            }
            // The tail only expires once it has a successor: start one in time.
            let roll_at = now_ms() - (max_age.as_millis() / 2) as i64;
            let tail_old = {
                let st = lock(&self.shared.state);
                let old = st
                    .segments
                    .back()
                    .is_some_and(|s| s.created_ms <= roll_at && s.len > SEGMENT_HEADER_LEN as u64);
                // Pending records (lower sequence numbers) must not land in the new one.
                (old && st.pending_records == 0).then_some(st.next_seq)
            };
            if let Some(first) = tail_old {
                if let Err(e) = self.roll(first) {
                    tracing::warn!(error = %e, "Could not start a new segment for max_age");
                }
            }
        }

        let head = lock(&self.shared.acks).head();
        let due = head != self.persisted
            && (closing
                || head.seg_first != self.persisted.seg_first
                || self.last_persist.elapsed() >= CURSOR_INTERVAL);
        if due {
            match self.cursor.store(head) {
                Ok(()) => {
                    self.persisted = head;
                    self.last_persist = Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "Could not persist the log cursor"),
            }
        }
        self.last_maintain = Instant::now();
        self.remove_acknowledged();
    }

    /// Removes segments wholly behind the persisted head and the receipt pin (never the
    /// tail).
    fn remove_acknowledged(&mut self) {
        let mut removed = false;
        loop {
            let behind = self
                .persisted
                .head_seq
                .min(self.shared.pin.load(Ordering::Acquire));
            let front = {
                let st = lock(&self.shared.state);
                match (st.segments.front(), st.segments.get(1)) {
                    (Some(f), Some(n)) if n.first_seq <= behind => f.first_seq,
                    _ => break,
                }
            };
            let path = segment_path(&self.shared.cfg.dir, front);
            if let Err(e) = self.shared.storage.remove(&path) {
                tracing::warn!(error = %e, path = %path.display(), "Could not remove an acknowledged segment");
                break;
            }
            let mut st = lock(&self.shared.state);
            st.segments.pop_front();
            st.recount();
            self.shared.update_pressure(&mut st);
            removed = true;
        }
        if removed {
            self.sync_dir();
        }
    }

    /// Deletes the oldest segment although records in it may be unacknowledged (the
    /// operator chose drop_oldest or max_age). Logs and counts the loss. Returns false if
    /// the segment could not be removed.
    fn drop_oldest(&mut self, reason: &str) -> bool {
        let (first, next_first) = {
            let st = lock(&self.shared.state);
            match (st.segments.front(), st.segments.get(1)) {
                (Some(f), Some(n)) => (f.first_seq, n.first_seq),
                _ => return false,
            }
        };
        let path = segment_path(&self.shared.cfg.dir, first);
        if let Err(e) = self.shared.storage.remove(&path) {
            tracing::warn!(error = %e, path = %path.display(), "Could not drop the oldest segment");
            return false;
        }
        self.sync_dir();
        {
            let mut st = lock(&self.shared.state);
            st.segments.pop_front();
            st.recount();
            self.shared.update_pressure(&mut st);
        }
        let lost_from = {
            let mut acks = lock(&self.shared.acks);
            let from = acks.head().head_seq.max(first);
            acks.skip_to(next_first);
            from
        };
        if lost_from < next_first {
            let n = next_first - lost_from;
            self.shared.dropped.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("edgegate_log_dropped_records_total").increment(n);
            tracing::warn!(
                records = n,
                first_seq = lost_from,
                last_seq = next_first - 1,
                reason,
                "Dropped unacknowledged records from the log"
            );
        }
        self.shared.visible.send_modify(|v| *v += 1);
        true
    }

    fn sync_dir(&self) {
        if let Err(e) = self.shared.storage.sync_dir(&self.shared.cfg.dir) {
            tracing::warn!(error = %e, "Could not sync the log directory");
        }
    }
}

/// Length of the longest run of whole frames at the start of `data` that fits in `room`.
fn fitting_prefix(data: &[u8], room: usize) -> usize {
    if data.len() <= room {
        return data.len();
    }
    let mut pos = 0;
    while pos + FRAME_HEADER_LEN <= data.len() {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]])
            as usize
            + FRAME_HEADER_LEN;
        if pos + len > room {
            break;
        }
        pos += len;
    }
    pos
}

/// Sequence number of the frame at the start of `data` (frames we encoded ourselves).
fn frame_seq(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[8..16]);
    u64::from_le_bytes(b)
}
