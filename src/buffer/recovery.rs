//! Opening a log directory: find the segments, load the cursor, repair the tail.
//!
//! Only the tail segment is read through: it is the only one a crash can leave torn, because
//! a segment is synced before its successor is created. Earlier segments are trusted by
//! name and size (damage inside them is found, skipped and counted by the reader), so open
//! time grows with the number of segments, not with the backlog.

use std::collections::VecDeque;
use std::io;
use std::path::Path;

use super::LogError;
use super::RecoveryReport;
use super::cursor::{CursorFile, CursorPos};
use super::format::{SEGMENT_HEADER_LEN, SegmentHeader};
use super::io::{Storage, StorageFile, read_full_at};
use super::segment::{SegMeta, Walker, parse_segment_name, scan, segment_path};

/// Recovery reads the tail in chunks this big.
const SCAN_CHUNK: usize = 1 << 20;

pub(crate) struct Recovered {
    pub segments: VecDeque<SegMeta>,
    pub tail: Box<dyn StorageFile>,
    pub next_seq: u64,
    pub cursor: CursorFile,
    pub head: CursorPos,
    pub report: RecoveryReport,
    /// Corrupt ranges in the tail, already counted in the report.
    pub known_corrupt: Vec<(u64, u64, u64)>,
    /// Human-readable repairs, for the one log line.
    pub repairs: Vec<String>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    max_body: usize,
    sync: bool,
) -> Result<Recovered, LogError> {
    let dir_err = |source: io::Error| LogError::Dir {
        path: dir.to_owned(),
        source,
    };
    storage.create_dir_all(dir).map_err(dir_err)?;
    let mut firsts: Vec<u64> = storage
        .list_dir(dir)
        .map_err(dir_err)?
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .collect();
    firsts.sort_unstable();

    let loaded = CursorFile::load(storage, dir).map_err(dir_err)?;
    let mut report = RecoveryReport::default();
    let mut repairs = Vec::new();
    let mut dir_dirty = loaded.created;
    let mut cursor = loaded.cursor;
    let oldest = firsts.first().copied().unwrap_or(0);
    let mut head = match loaded.pos {
        Some(p) => p,
        None => {
            if !loaded.created || !firsts.is_empty() {
                repairs.push("no valid cursor, reading from the oldest segment".to_owned());
            }
            CursorPos {
                head_seq: oldest,
                seg_first: oldest,
                offset: SEGMENT_HEADER_LEN as u64,
            }
        }
    };
    if loaded.damaged && loaded.pos.is_some() {
        repairs.push("one cursor slot damaged, used the other".to_owned());
    }
    report.cursor_repaired = loaded.damaged || (loaded.pos.is_none() && !firsts.is_empty());

    // Segments wholly behind the head were acknowledged; a crash interrupted their removal.
    let mut removed = 0;
    while firsts.len() > 1 && firsts[1] <= head.head_seq {
        let path = segment_path(dir, firsts[0]);
        storage
            .remove(&path)
            .map_err(|source| LogError::Io { path, source })?;
        firsts.remove(0);
        removed += 1;
        dir_dirty = true;
    }
    if removed > 0 {
        tracing::debug!(removed, "Removed acknowledged segments left by a crash");
    }

    let mut segments = VecDeque::with_capacity(firsts.len() + 1);
    for (i, &first) in firsts.iter().enumerate() {
        if i + 1 == firsts.len() {
            break;
        }
        let path = segment_path(dir, first);
        let file = storage
            .open(&path, false)
            .map_err(|source| LogError::Io { path, source })?;
        segments.push_back(sealed_meta(file.as_ref(), first));
    }

    let tail_first = match firsts.last() {
        Some(&f) => f,
        None => head.head_seq,
    };
    let tail_path = segment_path(dir, tail_first);
    let io_err = |source: io::Error| LogError::Io {
        path: tail_path.clone(),
        source,
    };
    let tail = storage.open(&tail_path, true).map_err(io_err)?;
    let len = tail.len().map_err(io_err)?;
    let mut header_buf = [0u8; SEGMENT_HEADER_LEN];
    let n = read_full_at(tail.as_ref(), &mut header_buf, 0).map_err(io_err)?;
    let header = SegmentHeader::decode(&header_buf[..n]);
    let created_ms = header.map_or_else(now_ms, |h| h.created_ms);
    if header.is_none_or(|h| h.first_seq != tail_first) {
        if firsts.last().is_some() {
            repairs.push(format!("rewrote the header of segment {tail_first}"));
        }
        if len < SEGMENT_HEADER_LEN as u64 {
            tail.set_len(0).map_err(io_err)?;
        }
        let h = SegmentHeader {
            first_seq: tail_first,
            created_ms,
        };
        tail.write_all_at(&h.encode(), 0).map_err(io_err)?;
        tail.sync_data().map_err(io_err)?;
        dir_dirty = true;
    }
    let len = len.max(SEGMENT_HEADER_LEN as u64);

    let mut walker = Walker::new(tail, len, SCAN_CHUNK, max_body);
    let found = scan(&mut walker, tail_first).map_err(io_err)?;
    let tail = walker.into_file();
    if found.valid_end < len {
        tail.set_len(found.valid_end).map_err(io_err)?;
        tail.sync_data().map_err(io_err)?;
        report.torn_tail_bytes = len - found.valid_end;
        repairs.push(format!(
            "truncated a torn tail of {} bytes in segment {tail_first}",
            report.torn_tail_bytes
        ));
    }
    if !found.corrupt.is_empty() {
        repairs.push(format!(
            "skipped {} corrupt record(s) in segment {tail_first}",
            found.corrupt.len()
        ));
    }
    report.corrupt_records = found.corrupt.len() as u64;
    let known_corrupt = found
        .corrupt
        .iter()
        .map(|&(s, e)| (tail_first, s, e))
        .collect();
    segments.push_back(SegMeta {
        first_seq: tail_first,
        len: found.valid_end,
        created_ms,
    });

    let next_seq = found
        .last_seq
        .map_or(tail_first, |s| s + 1)
        .max(tail_first)
        .max(head.head_seq);

    // The cursor may point at a segment that is gone (dropped, or damaged away) or past
    // the end of one that was truncated: start at the segment holding the head instead.
    let valid_pos = segments
        .iter()
        .find(|s| s.first_seq == head.seg_first)
        .is_some_and(|s| head.offset >= SEGMENT_HEADER_LEN as u64 && head.offset <= s.len);
    if !valid_pos {
        let seg = segments
            .iter()
            .rev()
            .find(|s| s.first_seq <= head.head_seq)
            .or(segments.front())
            .map_or(tail_first, |s| s.first_seq);
        head = CursorPos {
            head_seq: head.head_seq,
            seg_first: seg,
            offset: SEGMENT_HEADER_LEN as u64,
        };
    }
    if loaded.pos.is_none() || !valid_pos {
        cursor.store(head).map_err(dir_err)?;
    }
    if dir_dirty && sync {
        storage.sync_dir(dir).map_err(dir_err)?;
    }

    report.segments = segments.len();
    report.records = next_seq.saturating_sub(head.head_seq);
    Ok(Recovered {
        segments,
        tail,
        next_seq,
        cursor,
        head,
        report,
        known_corrupt,
        repairs,
    })
}

/// A sealed segment is trusted by its name and size; only its header is read.
fn sealed_meta(file: &dyn StorageFile, first_seq: u64) -> SegMeta {
    let len = file.len().unwrap_or(0);
    let mut buf = [0u8; SEGMENT_HEADER_LEN];
    let header = read_full_at(file, &mut buf, 0)
        .ok()
        .and_then(|n| SegmentHeader::decode(&buf[..n]));
    SegMeta {
        first_seq,
        len,
        created_ms: header.map_or_else(now_ms, |h| h.created_ms),
    }
}
