//! State shared by appenders, the commit thread and the reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

use tokio::sync::watch;

use super::cursor::CursorPos;
use super::format::SEGMENT_HEADER_LEN;
use super::io::Storage;
use super::segment::SegMeta;
use super::{AppendError, LogConfig, Pressure};

/// Poisoning only means another thread panicked mid-update; the data is still the best
/// we have, and a panicking log must not take every listener down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Shared {
    /// The configuration in force (segment size possibly clamped on open).
    pub cfg: LogConfig,
    /// Largest record body a segment can hold.
    pub max_body: usize,
    pub storage: Arc<dyn Storage>,
    /// The append path and the segment list; held for a few hundred nanoseconds at a time.
    pub state: Mutex<State>,
    /// Wakes the commit thread: first pending record, byte threshold, maintenance, close.
    pub wake_writer: Condvar,
    /// Every sequence number below this has its final outcome (durable or failed).
    pub resolved: AtomicU64,
    /// Appenders waiting for `resolved` to pass their record.
    pub waiters: Mutex<Vec<Waker>>,
    /// Sequence ranges whose commit failed, newest last (bounded).
    pub failures: Mutex<VecDeque<Failure>>,
    /// Sequence ranges `[start, end)` whose commit failed and that the head has not passed,
    /// oldest first, adjacent ranges merged. No record carries these numbers, so the backlog
    /// (`LogStats::records`) must not count them. Pruned as the head passes them: one entry
    /// per run of failed commits still ahead of the head (a disk that stays full is one).
    pub gaps: Mutex<VecDeque<(u64, u64)>>,
    /// Bumped whenever the reader may find something new (a commit, a drop, close).
    pub visible: watch::Sender<u64>,
    pub pressure: watch::Sender<Pressure>,
    /// The reader's position and the in-flight (read, not yet acknowledged) records.
    pub acks: Mutex<Acks>,
    pub reader_taken: AtomicBool,
    /// Set by the commit thread as it exits.
    pub stopped: watch::Sender<bool>,
    pub dropped: AtomicU64,
    /// Appends whose commit failed (a write or fsync error) since open.
    pub failed: AtomicU64,
    pub corrupt: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Bumped on every turn of the commit thread's loop (at least every `CURSOR_INTERVAL`,
    /// idle or not): the systemd watchdog pings only while it moves.
    pub commit_loops: AtomicU64,
    /// Segments holding a record at or above this sequence number are not removed once
    /// acknowledged (only `drop_oldest` and `max_age` still drop them): the receipts in them
    /// are not yet in the receipt store (`ingest::receipts`). `u64::MAX`: no pin.
    pub pin: AtomicU64,
    /// `high_watermark * max_bytes` and `low_watermark * max_bytes`.
    pub high_bytes: u64,
    pub low_bytes: u64,
}

pub(crate) struct State {
    /// Encoded frames waiting for the next commit.
    pub pending: Vec<u8>,
    pub pending_first: u64,
    pub pending_records: u64,
    pub first_pending_at: Option<Instant>,
    pub next_seq: u64,
    /// Segment bytes on disk plus pending bytes: what `max_bytes` limits.
    pub used_bytes: u64,
    /// Oldest first; the last one is the tail being written.
    pub segments: VecDeque<SegMeta>,
    pub closing: bool,
    /// The commit thread has finished: nothing more will become readable.
    pub closed: bool,
    /// Pressure is `High` (hysteresis between the watermarks).
    pub high: bool,
    /// The commit thread has housekeeping to do now (head crossed a segment, over capacity).
    pub maintenance: bool,
    /// Corrupt ranges `(segment, start, end)` recovery already counted.
    pub known_corrupt: Vec<(u64, u64, u64)>,
}

impl State {
    pub(crate) fn segment_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    pub(crate) fn recount(&mut self) {
        self.used_bytes = self.segment_bytes() + self.pending.len() as u64;
    }

    pub(crate) fn segment(&self, first_seq: u64) -> Option<(usize, &SegMeta)> {
        let i = self
            .segments
            .binary_search_by_key(&first_seq, |s| s.first_seq)
            .ok()?;
        Some((i, &self.segments[i]))
    }
}

/// A record the reader handed out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlight {
    pub seq: u64,
    pub seg_first: u64,
    pub offset: u64,
    pub received_ms: i64,
    pub acked: bool,
}

pub(crate) struct Acks {
    /// Read but not yet acknowledged, in sequence order (acked ones linger until the prefix
    /// before them is acknowledged too).
    pub inflight: VecDeque<InFlight>,
    /// Where the next read starts; `head_seq` is the lowest sequence number it may return.
    pub read_pos: CursorPos,
}

impl Acks {
    /// The head: the oldest record not yet acknowledged (or the read position).
    pub(crate) fn head(&self) -> CursorPos {
        match self.inflight.front() {
            Some(f) => CursorPos {
                head_seq: f.seq,
                seg_first: f.seg_first,
                offset: f.offset,
            },
            None => self.read_pos,
        }
    }

    /// Records below `first_seq` were dropped: forget them and move the reader past them.
    pub(crate) fn skip_to(&mut self, first_seq: u64) {
        while self.inflight.front().is_some_and(|f| f.seq < first_seq) {
            self.inflight.pop_front();
        }
        if self.read_pos.head_seq < first_seq || self.read_pos.seg_first < first_seq {
            self.read_pos = CursorPos {
                head_seq: self.read_pos.head_seq.max(first_seq),
                seg_first: first_seq,
                offset: SEGMENT_HEADER_LEN as u64,
            };
        }
    }
}

pub(crate) struct Failure {
    pub start: u64,
    pub end: u64,
    pub error: Arc<str>,
}

const MAX_FAILURES: usize = 1024;

impl Shared {
    /// Records `[start, end)` failed with `error`.
    pub(crate) fn fail(&self, start: u64, end: u64, error: &Arc<str>) {
        if start >= end {
            return;
        }
        self.failed.fetch_add(end - start, Ordering::Relaxed);
        {
            let mut gaps = lock(&self.gaps);
            match gaps.back_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => gaps.push_back((start, end)),
            }
        }
        let mut f = lock(&self.failures);
        if let Some(last) = f.back_mut() {
            if last.end == start && last.error == *error {
                last.end = end;
                return;
            }
        }
        if f.len() == MAX_FAILURES {
            f.pop_front();
        }
        f.push_back(Failure {
            start,
            end,
            error: error.clone(),
        });
    }

    /// How many sequence numbers from `head` on belong to failed commits; forgets the gaps
    /// the head has passed.
    pub(crate) fn gap_records(&self, head: u64) -> u64 {
        let mut gaps = lock(&self.gaps);
        while gaps.front().is_some_and(|&(_, end)| end <= head) {
            gaps.pop_front();
        }
        gaps.iter().map(|&(start, end)| end - start.max(head)).sum()
    }

    /// Everything below `upto` has its outcome: wake the appenders waiting for it.
    pub(crate) fn resolve(&self, upto: u64) {
        self.resolved.fetch_max(upto, Ordering::AcqRel);
        let waiters = std::mem::take(&mut *lock(&self.waiters));
        for w in waiters {
            w.wake();
        }
        self.visible.send_modify(|v| *v += 1);
    }

    pub(crate) fn outcome(&self, seq: u64) -> Result<u64, AppendError> {
        let f = lock(&self.failures);
        for fail in f.iter().rev() {
            if fail.end <= seq {
                break;
            }
            if fail.start <= seq {
                return Err(AppendError::Io(fail.error.to_string()));
            }
        }
        Ok(seq)
    }

    /// Updates the pressure watch after `used_bytes` changed (state lock held).
    pub(crate) fn update_pressure(&self, st: &mut State) {
        if !st.high && st.used_bytes > self.high_bytes {
            st.high = true;
            self.pressure.send_replace(Pressure::High);
        } else if st.high && st.used_bytes < self.low_bytes {
            st.high = false;
            self.pressure.send_replace(Pressure::Normal);
        }
    }
}
