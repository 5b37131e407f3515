//! The single reader: reads segments in order from the head, skipping damage, and keeps the
//! acknowledgement bookkeeping that moves the head.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::cursor::CursorPos;
use super::format::{FRAME_HEADER_LEN, Frame, SEGMENT_HEADER_LEN, decode_body};
use super::seal::{LogKeys, Unsealed};
use super::segment::{Walker, segment_path};
use super::shared::{InFlight, Shared, lock};
use super::{LogError, StoredRecord};
use crate::record::Record;

/// How a read counts the bytes of a batch against its limit: a record's payload bytes
/// ([`payload_len`]), or what the caller says a record costs it.
pub type Measure = fn(&Record) -> usize;

/// A record's payload bytes: what a read's byte limit counts unless told otherwise.
pub fn payload_len(record: &Record) -> usize {
    record.payload.len()
}

/// Bytes read from a segment at a time; records are sliced out of these chunks.
const READ_CHUNK: usize = 256 << 10;

pub(crate) struct ReaderCore {
    pub shared: Arc<Shared>,
    /// The open segment and its walker.
    pub walker: Option<(u64, Walker)>,
    pub visible: watch::Receiver<u64>,
}

/// Where a read stands after looking at the segment list.
enum Step {
    /// Read `seg` up to `limit`; `sealed` says a later segment exists.
    Read { limit: u64, sealed: bool },
    /// Nothing readable yet.
    Wait { closed: bool },
}

impl ReaderCore {
    pub(crate) async fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        measure: Measure,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let max_records = max_records.max(1);
        let max_bytes = max_bytes.max(1);
        loop {
            self.visible.borrow_and_update();
            let (batch, closed) = self.try_read(max_records, max_bytes, measure)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            if closed || self.visible.changed().await.is_err() {
                return Err(LogError::Closed);
            }
        }
    }

    /// Reads what is readable now; returns the batch and whether the log is closed.
    pub(crate) fn try_read(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        measure: Measure,
    ) -> Result<(Vec<StoredRecord>, bool), LogError> {
        let mut out = Vec::new();
        let mut inflight = Vec::new();
        let mut bytes = 0usize;
        let mut pos = lock(&self.shared.acks).read_pos;
        let start = pos;
        let mut closed = false;
        while out.len() < max_records && bytes < max_bytes {
            match self.locate(&mut pos) {
                Step::Wait { closed: c } => {
                    closed = c;
                    break;
                }
                Step::Read { limit, sealed } => {
                    let keys = self.shared.cfg.keys.clone();
                    let walker = match self.walker_for(pos.seg_first, limit) {
                        Ok(w) => w,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            // Dropped or deleted under us; `locate` sorts it out.
                            self.walker = None;
                            if !sealed {
                                break;
                            }
                            self.note_corrupt(
                                pos.seg_first,
                                pos.offset,
                                limit,
                                "segment file missing",
                            );
                            pos.offset = limit;
                            continue;
                        }
                        Err(source) => {
                            return Err(LogError::Io {
                                path: segment_path(&self.shared.cfg.dir, pos.seg_first),
                                source,
                            });
                        }
                    };
                    let found = read_segment(
                        walker,
                        keys.as_deref(),
                        &mut pos,
                        limit,
                        Room {
                            records: max_records - out.len(),
                            bytes: max_bytes.saturating_sub(bytes),
                            measure,
                            first: out.is_empty(),
                        },
                    );
                    let found = found.map_err(|source| LogError::Io {
                        path: segment_path(&self.shared.cfg.dir, pos.seg_first),
                        source,
                    })?;
                    bytes += found.bytes;
                    for (r, offset) in found.records {
                        inflight.push(InFlight {
                            seq: r.seq,
                            seg_first: pos.seg_first,
                            offset,
                            received_ms: r.record.received_ms,
                            acked: false,
                        });
                        out.push(r);
                    }
                    for (s, e, why) in found.corrupt {
                        self.note_corrupt(pos.seg_first, s, e, why);
                    }
                    if let Some((seq, key_id)) = found.missing_key {
                        if out.is_empty() {
                            return Err(LogError::MissingKey { seq, key_id });
                        }
                        break;
                    }
                    // Stop when the batch is full or at the durable end of the tail; at the
                    // end of a sealed segment `locate` moves on to the next one.
                    if out.len() >= max_records
                        || bytes >= max_bytes
                        || pos.offset < limit
                        || !sealed
                    {
                        break;
                    }
                }
            }
        }
        let mut acks = lock(&self.shared.acks);
        if acks.read_pos == start {
            acks.read_pos = pos;
            acks.inflight.extend(inflight);
        } else {
            // The commit thread dropped segments meanwhile: keep what is still wanted.
            let floor = acks.read_pos.head_seq;
            out.retain(|r| r.seq >= floor);
            let keep: Vec<_> = inflight.into_iter().filter(|f| f.seq >= floor).collect();
            if let Some(last) = keep.last() {
                acks.read_pos = CursorPos {
                    head_seq: last.seq + 1,
                    ..pos
                };
            }
            acks.inflight.extend(keep);
        }
        Ok((out, closed))
    }

    /// Moves `pos` onto a segment that exists and says how far it may be read.
    fn locate(&mut self, pos: &mut CursorPos) -> Step {
        let st = lock(&self.shared.state);
        loop {
            let Some(front) = st.segments.front() else {
                return Step::Wait { closed: st.closed };
            };
            if pos.seg_first < front.first_seq {
                // Our segment was dropped (drop_oldest / max_age): skip forward.
                *pos = CursorPos {
                    head_seq: pos.head_seq.max(front.first_seq),
                    seg_first: front.first_seq,
                    offset: SEGMENT_HEADER_LEN as u64,
                };
                continue;
            }
            let Some((i, seg)) = st.segment(pos.seg_first) else {
                // Not a segment start (cannot happen with a valid cursor): take the segment
                // holding the head.
                let seg = st
                    .segments
                    .iter()
                    .rev()
                    .find(|s| s.first_seq <= pos.head_seq)
                    .unwrap_or(front);
                pos.seg_first = seg.first_seq;
                pos.offset = SEGMENT_HEADER_LEN as u64;
                continue;
            };
            pos.offset = pos.offset.max(SEGMENT_HEADER_LEN as u64);
            let sealed = i + 1 < st.segments.len();
            if pos.offset < seg.len {
                return Step::Read {
                    limit: seg.len,
                    sealed,
                };
            }
            if sealed {
                let next = st.segments[i + 1].first_seq;
                *pos = CursorPos {
                    head_seq: pos.head_seq.max(next),
                    seg_first: next,
                    offset: SEGMENT_HEADER_LEN as u64,
                };
                continue;
            }
            return Step::Wait { closed: st.closed };
        }
    }

    fn walker_for(&mut self, seg_first: u64, limit: u64) -> io::Result<&mut Walker> {
        if self.walker.as_ref().is_none_or(|(f, _)| *f != seg_first) {
            self.walker = None;
            let path = segment_path(&self.shared.cfg.dir, seg_first);
            let file = self.shared.storage.open(&path, false)?;
            let w = Walker::new(file, limit, READ_CHUNK, self.shared.max_body);
            self.walker = Some((seg_first, w));
        }
        let Some((_, w)) = self.walker.as_mut() else {
            return Err(io::Error::other("no walker"));
        };
        w.limit = limit;
        Ok(w)
    }

    /// Logs and counts a damaged range, unless recovery already did.
    fn note_corrupt(&self, seg: u64, start: u64, end: u64, why: &str) {
        let known = lock(&self.shared.state)
            .known_corrupt
            .iter()
            .any(|&(s, a, _)| s == seg && a == start);
        if known {
            return;
        }
        self.shared.corrupt.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("edgegate_log_corrupt_records_total").increment(1);
        tracing::warn!(
            segment = seg,
            offset = start,
            bytes = end - start,
            why,
            "Skipped a corrupt record in the log"
        );
    }
}

struct Found {
    /// Records and the offsets they start at.
    records: Vec<(StoredRecord, u64)>,
    corrupt: Vec<(u64, u64, &'static str)>,
    /// Reading stopped at this record (sequence number, key id): sealed with a key that is
    /// not configured.
    missing_key: Option<(u64, u32)>,
    /// The records' bytes as the read's measure counted them.
    bytes: usize,
}

/// What is left of a batch for one segment's records.
struct Room {
    records: usize,
    bytes: usize,
    /// How the bytes are counted.
    measure: Measure,
    /// Nothing is in the batch yet: its first record comes even if it alone is over.
    first: bool,
}

/// Reads frames from `pos` up to `limit`, within `room`, advancing `pos`. A record that
/// would take the batch past `room.bytes` is left for the next read, unless it would be the
/// batch's first.
fn read_segment(
    walker: &mut Walker,
    keys: Option<&LogKeys>,
    pos: &mut CursorPos,
    limit: u64,
    room: Room,
) -> io::Result<Found> {
    let Room {
        records: max_records,
        bytes: max_bytes,
        measure,
        first,
    } = room;
    let mut found = Found {
        records: Vec::new(),
        corrupt: Vec::new(),
        missing_key: None,
        bytes: 0,
    };
    while pos.offset < limit && found.records.len() < max_records && found.bytes < max_bytes {
        let at = pos.offset;
        match walker.frame_at(at)? {
            Frame::Valid { seq, len } if seq >= pos.head_seq => {
                let body = walker.slice(at + FRAME_HEADER_LEN as u64, len - FRAME_HEADER_LEN)?;
                let decoded = decode_body(&body, keys);
                if let Err(Unsealed::UnknownKey(key_id)) = decoded {
                    // Not corrupt: its key is missing. Stop before it, so it is read again
                    // once the key is configured.
                    found.missing_key = Some((seq, key_id));
                    break;
                }
                if let Ok(record) = &decoded {
                    let size = measure(record);
                    if found.bytes + size > max_bytes && !(first && found.records.is_empty()) {
                        // Left for the next read: a batch stays within what it was given.
                        break;
                    }
                    found.bytes += size;
                }
                pos.offset += len as u64;
                pos.head_seq = seq + 1;
                match decoded {
                    Ok(record) => found.records.push((StoredRecord { seq, record }, at)),
                    Err(_) => found.corrupt.push((at, pos.offset, "undecodable body")),
                }
            }
            Frame::Valid { len, .. } | Frame::Padding { len } => {
                // Padding, or below the head (acknowledged before a restart).
                pos.offset += len as u64;
            }
            _ => {
                let next = walker.resync(at + 1, pos.head_seq.checked_sub(1))?;
                let end = next.unwrap_or(limit);
                found.corrupt.push((at, end, "bad checksum or length"));
                pos.offset = end;
            }
        }
    }
    Ok(found)
}
