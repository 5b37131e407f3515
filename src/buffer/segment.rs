//! Segment files: naming, what the log remembers about each, and a walker that steps over
//! the frames of one segment, resynchronising past damage.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::format::{FRAME_HEADER_LEN, Frame, MIN_BODY_LEN, PAGE, SEGMENT_HEADER_LEN, check_frame};
use super::io::{StorageFile, read_full_at};

const SUFFIX: &str = ".seg";

/// `00000000000000001234.seg`: the first sequence number the segment may hold, zero-padded
/// so names sort in sequence order.
pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SUFFIX}")
}

pub(crate) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(segment_name(first_seq))
}

pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What the log keeps in memory per segment: a few words, whatever the backlog.
#[derive(Debug, Clone)]
pub(crate) struct SegMeta {
    /// From the file name; every record in it has `seq >= first_seq` and `seq` below the
    /// next segment's `first_seq`.
    pub first_seq: u64,
    /// Bytes the reader may read: everything durable (or written, under `Durability::None`).
    pub len: u64,
    /// When the segment was created (header), for `max_age` and the oldest-record age.
    pub created_ms: i64,
}

/// Steps over frames of one segment up to `limit`, reading through a chunk buffer that
/// records are sliced from (so payloads are not copied again).
pub(crate) struct Walker {
    file: Box<dyn StorageFile>,
    buf: Bytes,
    buf_start: u64,
    /// Bytes beyond this are not (yet) part of the segment as far as the walker knows.
    pub limit: u64,
    chunk: usize,
    max_body: usize,
}

impl Walker {
    pub(crate) fn new(
        file: Box<dyn StorageFile>,
        limit: u64,
        chunk: usize,
        max_body: usize,
    ) -> Self {
        Walker {
            file,
            buf: Bytes::new(),
            buf_start: 0,
            limit,
            chunk,
            max_body,
        }
    }

    /// The bytes `[pos, pos + need)` clipped to `limit`, reading if they are not buffered.
    fn window(&mut self, pos: u64, need: usize) -> io::Result<&[u8]> {
        let end = (pos + need as u64).min(self.limit);
        let buf_end = self.buf_start + self.buf.len() as u64;
        if pos < self.buf_start || end > buf_end {
            let want = (self.limit.saturating_sub(pos)).min(need.max(self.chunk) as u64) as usize;
            let mut v = vec![0u8; want];
            let n = read_full_at(self.file.as_ref(), &mut v, pos)?;
            v.truncate(n);
            self.buf = Bytes::from(v);
            self.buf_start = pos;
        }
        let from = (pos - self.buf_start) as usize;
        let to = ((end - self.buf_start) as usize).clamp(from, self.buf.len());
        Ok(&self.buf[from..to])
    }

    /// The frame at `pos`. A frame reaching past `limit` is `Invalid`: the writer only ever
    /// makes whole frames visible, so it can only be damage (or a torn tail on recovery).
    pub(crate) fn frame_at(&mut self, pos: u64) -> io::Result<Frame> {
        let max_body = self.max_body;
        let to_page = (PAGE - pos % PAGE) as usize;
        if to_page >= 4 && pos + to_page as u64 <= self.limit {
            let w = self.window(pos, to_page)?;
            if w[..4] == [0; 4] {
                // Padding only if every byte of it is zero: a zeroed length field alone
                // must not hide the records after it.
                return Ok(if w.len() == to_page && w.iter().all(|b| *b == 0) {
                    Frame::Padding { len: to_page }
                } else {
                    Frame::Invalid
                });
            }
        }
        let mut need = FRAME_HEADER_LEN;
        loop {
            let w = self.window(pos, need)?;
            match check_frame(w, max_body) {
                Frame::Incomplete { needed } if needed > need => need = needed,
                Frame::Incomplete { .. } => return Ok(Frame::Invalid),
                other => return Ok(other),
            }
        }
    }

    /// A zero-copy slice of bytes already checked by `frame_at`.
    pub(crate) fn slice(&mut self, pos: u64, len: usize) -> io::Result<Bytes> {
        self.window(pos, len)?;
        let from = (pos - self.buf_start) as usize;
        Ok(self.buf.slice(from..from + len))
    }

    /// The next position at or after `from` holding a valid frame with a sequence number
    /// above `after` (`None` if there is none before `limit`).
    pub(crate) fn resync(&mut self, from: u64, after: Option<u64>) -> io::Result<Option<u64>> {
        let mut pos = from;
        while pos + (FRAME_HEADER_LEN + MIN_BODY_LEN) as u64 <= self.limit {
            let w = self.window(pos, FRAME_HEADER_LEN)?;
            let len = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize;
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&w[8..16]);
            let seq = u64::from_le_bytes(seq);
            // Cheap filters before the checksum, so that skipping a long stretch of garbage
            // does not checksum megabytes at every byte: a plausible length, and a sequence
            // number a little above the last good one.
            let plausible_seq = after.is_none_or(|a| seq > a && seq - a < 1 << 32);
            if plausible_seq
                && (MIN_BODY_LEN..=self.max_body).contains(&len)
                && pos + (FRAME_HEADER_LEN + len) as u64 <= self.limit
            {
                if let Frame::Valid { seq, .. } = self.frame_at(pos)? {
                    if after.is_none_or(|a| seq > a) {
                        return Ok(Some(pos));
                    }
                }
            }
            pos += 1;
        }
        Ok(None)
    }

    pub(crate) fn into_file(self) -> Box<dyn StorageFile> {
        self.file
    }
}

/// What a full walk of one segment found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// End of the last valid frame: everything after it is a torn tail.
    pub valid_end: u64,
    pub records: u64,
    pub last_seq: Option<u64>,
    /// Byte ranges skipped as corrupt, each counted as one corrupt record.
    pub corrupt: Vec<(u64, u64)>,
}

/// Walks every frame of a segment (used for the tail on recovery).
pub(crate) fn scan(walker: &mut Walker, first_seq: u64) -> io::Result<Scan> {
    let mut s = Scan {
        valid_end: SEGMENT_HEADER_LEN as u64,
        ..Scan::default()
    };
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let floor = first_seq.checked_sub(1);
    while pos < walker.limit {
        let after = s.last_seq.or(floor);
        match walker.frame_at(pos)? {
            Frame::Valid { seq, len } if after.is_none_or(|a| seq > a) => {
                s.records += 1;
                s.last_seq = Some(seq);
                pos += len as u64;
                s.valid_end = pos;
            }
            Frame::Padding { len } => {
                pos += len as u64;
                s.valid_end = pos;
            }
            _ => match walker.resync(pos + 1, after)? {
                Some(next) => {
                    s.corrupt.push((pos, next));
                    pos = next;
                }
                None => break,
            },
        }
    }
    Ok(s)
}
