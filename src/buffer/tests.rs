//! Tests of the log on the simulated file system: round trips, acks, capacity, power cuts
//! at arbitrary points, damaged files, a full disk, and a model-based property test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::cursor::CURSOR_FILE;
use super::sim::MemFs;
use super::*;
use crate::record::Source;

const DIR: &str = "/log";

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        commit_delay: Duration::from_millis(1),
        ..LogConfig::new(DIR)
    }
}

fn record(i: u64, payload_len: usize) -> Record {
    Record {
        source: if i % 2 == 0 {
            Source::Mqtt
        } else {
            Source::Coap
        },
        received_ms: 1_764_000_000_000 + i as i64,
        device: format!("dev-{}", i % 7),
        origin: format!("t/{i}"),
        kafka_topic: "telemetry".into(),
        key: (i % 3 == 0).then(|| Bytes::from(format!("k{i}"))),
        headers: if i % 5 == 0 {
            vec![("qos".into(), Bytes::from_static(b"1"))]
        } else {
            vec![]
        },
        payload: Bytes::from(vec![(i % 251) as u8; payload_len]),
    }
}

fn open(fs: &MemFs, cfg: LogConfig) -> (Log, RecoveryReport) {
    Log::open_with(cfg, Arc::new(fs.clone()), u64::MAX).expect("open")
}

/// Appends concurrently; returns (seq, record, outcome) in append order.
async fn append_many(
    log: &Log,
    records: impl IntoIterator<Item = Record>,
) -> Vec<(u64, Record, Result<u64, AppendError>)> {
    let mut futs = Vec::new();
    for r in records {
        let d = log.append(&r).expect("append accepted");
        futs.push(async move {
            let seq = d.seq();
            (seq, r, d.await)
        });
    }
    futures::future::join_all(futs).await
}

/// Reads everything readable now. Every test drains after its appends are durable or after
/// a reopen, so there is nothing to wait for; a wait with a timeout ("until nothing comes for
/// 60 ms") could end early on a loaded machine.
fn drain(reader: &mut LogReader) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    while let Ok((batch, _closed)) = reader
        .core
        .try_read(50, 1 << 20, super::reader::payload_len)
    {
        if batch.is_empty() {
            break;
        }
        out.extend(batch);
    }
    out
}

fn seg_files(fs: &MemFs) -> Vec<PathBuf> {
    fs.file_names()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect()
}

#[tokio::test]
async fn round_trip_acks_and_restart() {
    let fs = MemFs::new();
    let (log, report) = open(&fs, config());
    assert_eq!(
        report,
        RecoveryReport {
            segments: 1,
            ..RecoveryReport::default()
        }
    );
    let appended = append_many(&log, (0..200).map(|i| record(i, 100))).await;
    for (i, (seq, _, r)) in appended.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        assert_eq!(r.as_ref().ok(), Some(seq));
    }
    let mut reader = log.reader().expect("reader");
    assert!(log.reader().is_none());
    let got = drain(&mut reader);
    assert_eq!(got.len(), 200);
    for (g, (seq, r, _)) in got.iter().zip(&appended) {
        assert_eq!((g.seq, &g.record), (*seq, r));
    }
    let spanned = log.stats().segments;
    assert!(spanned > 3, "200 records span several segments: {spanned}");
    // Out-of-order acks: the head only moves over the contiguous prefix.
    reader.ack(1);
    reader.ack(2);
    assert_eq!(log.stats().head_seq, 0);
    reader.ack(0);
    assert_eq!(log.stats().head_seq, 3);
    reader.ack_range(3, 150);
    assert_eq!(log.stats().head_seq, 150);
    // The segments behind the head are removed by the commit thread in its own time (a count
    // taken here raced it); the reopen below sees that they went.
    log.close().await.expect("close");
    assert!(matches!(
        log.append(&record(0, 1)),
        Err(AppendError::Closed)
    ));
    assert!(matches!(
        reader.read_batch(1, 1).await,
        Err(LogError::Closed)
    ));
    drop((log, reader));

    let (log, report) = open(&fs, config());
    assert_eq!(report.records, 50);
    assert!(!report.cursor_repaired);
    let mut reader = log.reader().expect("reader");
    let got = drain(&mut reader);
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (150..200).collect::<Vec<_>>()
    );
    // Segments behind the head were removed.
    let first_kept = seg_files(&fs).first().cloned().expect("a segment");
    let name = first_kept
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    assert!(segment::parse_segment_name(name).is_some_and(|f| f > 0 && f <= 150));
    log.close().await.expect("close");
}

#[tokio::test]
async fn sequence_numbers_survive_a_fully_drained_log() {
    let fs = MemFs::new();
    let mut next = 0;
    for _ in 0..3 {
        let (log, _) = open(&fs, config());
        let appended = append_many(&log, (0..60).map(|i| record(i, 200))).await;
        assert_eq!(appended[0].0, next);
        next = appended[59].0 + 1;
        let mut reader = log.reader().expect("reader");
        for r in drain(&mut reader) {
            reader.ack(r.seq);
        }
        log.close().await.expect("close");
        assert_eq!(seg_files(&fs).len(), 1, "only the tail is kept");
    }
}

#[tokio::test]
async fn reject_new_fails_fast_and_pressure_follows_watermarks() {
    let fs = MemFs::new();
    let cfg = LogConfig {
        max_bytes: 64 << 10,
        segment_bytes: 8 << 10,
        ..config()
    };
    let (log, _) = open(&fs, cfg);
    let mut pressure = log.pressure();
    assert_eq!(*pressure.borrow_and_update(), Pressure::Normal);
    let mut accepted = Vec::new();
    let full = loop {
        match log.append(&record(accepted.len() as u64, 500)) {
            Ok(d) => accepted.push(d),
            Err(e) => break e,
        }
    };
    assert!(matches!(full, AppendError::Full), "{full:?}");
    assert_eq!(*pressure.borrow_and_update(), Pressure::High);
    for d in futures::future::join_all(accepted).await {
        d.expect("accepted records become durable");
    }
    let mut reader = log.reader().expect("reader");
    let got = drain(&mut reader);
    for r in &got {
        reader.ack(r.seq);
    }
    // The head crossing segments removes them; the watermark drops.
    tokio::time::timeout(
        Duration::from_secs(5),
        pressure.wait_for(|p| *p == Pressure::Normal),
    )
    .await
    .expect("pressure falls")
    .expect("watch open");
    log.append(&record(0, 500))
        .expect("room again")
        .await
        .expect("durable");
    log.close().await.expect("close");
}

#[tokio::test]
async fn drop_oldest_counts_and_reader_skips_forward() {
    let fs = MemFs::new();
    let cfg = LogConfig {
        max_bytes: 32 << 10,
        segment_bytes: 4 << 10,
        overflow: Overflow::DropOldest,
        ..config()
    };
    let (log, _) = open(&fs, cfg);
    let mut reader = log.reader().expect("reader");
    let first = reader.read_batch(1, 1 << 20);
    let appended = append_many(&log, (0..30).map(|i| record(i, 300))).await;
    assert_eq!(first.await.expect("read")[0].seq, 0);
    for i in 30..300 {
        log.append(&record(i, 300))
            .expect("never full")
            .await
            .expect("durable");
    }
    let stats = log.stats();
    assert!(stats.dropped_records > 0);
    assert!(stats.bytes <= 40 << 10, "{stats:?}");
    let got = drain(&mut reader);
    assert!(got[0].seq > 1, "skipped the dropped records");
    assert_eq!(got.last().map(|r| r.seq), Some(299));
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    drop(appended);
    log.close().await.expect("close");
}

#[tokio::test]
async fn max_age_drops_old_segments() {
    let fs = MemFs::new();
    let cfg = LogConfig {
        max_age: Some(Duration::from_millis(300)),
        ..config()
    };
    let (log, _) = open(&fs, cfg);
    append_many(&log, (0..40).map(|i| record(i, 300))).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    append_many(&log, (40..41).map(|i| record(i, 300))).await;
    let stats = log.stats();
    assert!(stats.dropped_records >= 39, "{stats:?}");
    let mut reader = log.reader().expect("reader");
    let got = drain(&mut reader);
    assert_eq!(got.first().map(|r| r.seq), Some(40));
    log.close().await.expect("close");
}

#[tokio::test]
async fn durability_none_needs_no_fsync() {
    let fs = MemFs::new();
    let cfg = LogConfig {
        durability: Durability::None,
        ..config()
    };
    let (log, _) = open(&fs, cfg);
    let appended = append_many(&log, (0..500).map(|i| record(i, 50))).await;
    assert!(appended.iter().all(|a| a.2.is_ok()));
    assert_eq!(log.stats().fsyncs, 0);
    let mut reader = log.reader().expect("reader");
    assert_eq!(drain(&mut reader).len(), 500);
    log.close().await.expect("close");
}

#[tokio::test]
async fn large_commits_are_padded_to_a_page_and_read_back() {
    let fs = MemFs::new();
    let cfg = LogConfig {
        segment_bytes: 1 << 20,
        commit_delay: Duration::from_millis(20),
        ..config()
    };
    let (log, _) = open(&fs, cfg.clone());
    let mut all = Vec::new();
    for round in 0..5 {
        let appended = append_many(&log, (0..200).map(|i| record(round * 200 + i, 300))).await;
        all.extend(appended.into_iter().map(|(s, r, res)| {
            res.expect("durable");
            (s, r)
        }));
    }
    let fsyncs = log.stats().fsyncs;
    log.close().await.expect("close");
    let tail = seg_files(&fs).pop().expect("tail");
    let len = fs.with_file(&tail, |d| d.len() as u64);
    assert_eq!(
        len % format::PAGE,
        0,
        "the last commit ended on a page ({fsyncs} fsyncs)"
    );
    let (log, report) = open(&fs, cfg);
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(report.corrupt_records, 0);
    let mut reader = log.reader().expect("reader");
    let got = drain(&mut reader);
    assert_subset(&got, &all, 0);
    assert_eq!(log.stats().corrupt_records, 0);
    log.close().await.expect("close");

    // A zeroed length field inside a frame is not padding: the damage is counted.
    let fs2 = MemFs::new();
    let all = filled_log(&fs2, 60).await;
    let tail = seg_files(&fs2).pop().expect("tail");
    fs2.with_file(&tail, |d| d[32..36].copy_from_slice(&[0; 4]));
    let (got, report, _) = read_all(&fs2).await;
    assert_eq!(report.corrupt_records, 1);
    assert_subset(&got, &all, 1);
}

#[tokio::test]
async fn too_large_records_are_refused() {
    let fs = MemFs::new();
    let (log, _) = open(&fs, config());
    assert!(matches!(
        log.append(&record(0, 5000)),
        Err(AppendError::TooLarge(_))
    ));
    log.close().await.expect("close");
}

#[tokio::test]
async fn disk_full_fails_cleanly_and_resumes() {
    let fs = MemFs::new();
    let (log, _) = open(&fs, config());
    let before = append_many(&log, (0..20).map(|i| record(i, 200))).await;
    assert!(before.iter().all(|a| a.2.is_ok()));
    let used: u64 = fs.capacity(Path::new(DIR)).map_or(0, |c| c.total);
    assert_eq!(used, 0, "no capacity set yet");
    fs.set_capacity(Some(
        fs.file_names()
            .iter()
            .map(|p| fs.with_file(p, |d| d.len() as u64))
            .sum::<u64>()
            + 1000,
    ));
    let during = append_many(&log, (20..60).map(|i| record(i, 200))).await;
    let failed: Vec<_> = during.iter().filter(|a| a.2.is_err()).collect();
    assert!(!failed.is_empty());
    assert!(
        failed
            .iter()
            .all(|a| matches!(a.2, Err(AppendError::Io(_))))
    );
    fs.set_capacity(None);
    let after = append_many(&log, (60..80).map(|i| record(i, 200))).await;
    assert!(after.iter().all(|a| a.2.is_ok()));
    let mut reader = log.reader().expect("reader");
    let got: BTreeMap<u64, Record> = drain(&mut reader)
        .into_iter()
        .map(|r| (r.seq, r.record))
        .collect();
    for (seq, rec, res) in before.iter().chain(&during).chain(&after) {
        match res {
            Ok(_) => assert_eq!(got.get(seq), Some(rec), "durable {seq} is kept"),
            Err(_) => assert!(!got.contains_key(seq), "failed {seq} is not served"),
        }
    }
    log.close().await.expect("close");
    let (_log, report) = open(&fs, config());
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(report.corrupt_records, 0);
}

/// Power cut at a random moment while many appenders are in flight, the last write torn at
/// a random byte: every resolved record survives intact and in order, nothing behind the
/// persisted head returns.
#[tokio::test]
async fn power_cuts_lose_nothing_acknowledged() {
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..150 {
        // Odd rounds: segments big enough for padded commits.
        let config = || LogConfig {
            segment_bytes: if round % 2 == 0 { 4096 } else { 256 << 10 },
            ..config()
        };
        let fs = MemFs::new();
        let (log, _) = open(&fs, config());
        // A settled prefix, partly acknowledged, closed cleanly: head is exact.
        let settled = append_many(&log, (0..next() % 40).map(|i| record(i, 120))).await;
        let mut reader = log.reader().expect("reader");
        let read = drain(&mut reader);
        let acked = (next() as usize) % (read.len() + 1);
        for r in &read[..acked] {
            reader.ack(r.seq);
        }
        log.close().await.expect("close");
        drop((log, reader));
        let head = read.get(acked).map_or(settled.len() as u64, |r| r.seq);

        let (log, _) = open(&fs, config());
        fs.freeze_after(next() % 80);
        let n = 1 + next() % if round % 2 == 0 { 120 } else { 1200 };
        let mut results = Vec::new();
        for _ in 0..4 {
            let chunk = append_many(
                &log,
                (0..n / 4 + 1).map(|i| record(i + 1000, (next() % 300) as usize)),
            )
            .await;
            results.extend(chunk);
        }
        drop(log);
        let crashed = fs.after_power_cut(Some(next() as usize));
        let (log, report) = open(&crashed, config());
        let mut reader = log.reader().expect("reader");
        let got = drain(&mut reader);
        assert!(
            got.windows(2).all(|w| w[0].seq < w[1].seq),
            "round {round}: order"
        );
        assert!(
            got.iter().all(|r| r.seq >= head),
            "round {round}: nothing behind the head"
        );
        let by_seq: BTreeMap<u64, &Record> = got.iter().map(|r| (r.seq, &r.record)).collect();
        let all: BTreeMap<u64, &Record> = settled
            .iter()
            .chain(&results)
            .map(|(s, r, _)| (*s, r))
            .collect();
        for (seq, r) in &by_seq {
            assert_eq!(all.get(seq), Some(r), "round {round}: record {seq} intact");
        }
        for (seq, rec, res) in settled.iter().chain(&results) {
            if res.is_ok() && *seq >= head {
                assert_eq!(
                    by_seq.get(seq),
                    Some(&rec),
                    "round {round}: durable {seq} kept ({report:?})"
                );
            }
        }
        // Appending after the crash never reuses a number that was reported durable.
        let max_durable = results.iter().filter(|r| r.2.is_ok()).map(|r| r.0).max();
        let d = log.append(&record(0, 10)).expect("append");
        assert!(max_durable.is_none_or(|m| d.seq() > m));
        d.await.expect("durable");
        log.close().await.expect("close");
    }
}

async fn filled_log(fs: &MemFs, n: u64) -> Vec<(u64, Record)> {
    let (log, _) = open(fs, config());
    let out = append_many(&log, (0..n).map(|i| record(i, 150)))
        .await
        .into_iter()
        .map(|(s, r, res)| {
            res.expect("durable");
            (s, r)
        })
        .collect();
    log.close().await.expect("close");
    out
}

async fn read_all(fs: &MemFs) -> (Vec<StoredRecord>, RecoveryReport, LogStats) {
    let (log, report) = open(fs, config());
    let mut reader = log.reader().expect("reader");
    let got = drain(&mut reader);
    let stats = log.stats();
    log.close().await.expect("close");
    (got, report, stats)
}

fn assert_subset(got: &[StoredRecord], all: &[(u64, Record)], missing_at_most: usize) {
    let map: BTreeMap<u64, &Record> = all.iter().map(|(s, r)| (*s, r)).collect();
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    for r in got {
        assert_eq!(map.get(&r.seq), Some(&&r.record), "record {} intact", r.seq);
    }
    assert!(
        got.len() + missing_at_most >= all.len(),
        "kept {} of {}",
        got.len(),
        all.len()
    );
}

#[tokio::test]
async fn corrupt_record_in_the_tail_is_skipped_and_reported() {
    let fs = MemFs::new();
    let all = filled_log(&fs, 60).await;
    let tail = seg_files(&fs).pop().expect("tail");
    let len = fs.with_file(&tail, |d| d.len());
    fs.with_file(&tail, |d| d[len / 2] ^= 0x5a);
    let (got, report, stats) = read_all(&fs).await;
    assert_eq!(report.corrupt_records, 1);
    assert_eq!(
        stats.corrupt_records, 1,
        "counted once, not again by the reader"
    );
    assert_subset(&got, &all, 1);
}

#[tokio::test]
async fn corrupt_record_in_a_sealed_segment_is_skipped_by_the_reader() {
    let fs = MemFs::new();
    let all = filled_log(&fs, 60).await;
    let first = seg_files(&fs)[0].clone();
    fs.with_file(&first, |d| {
        let mid = d.len() / 2;
        d[mid] ^= 0xff;
        d[mid + 1] ^= 0xff;
    });
    let (got, report, stats) = read_all(&fs).await;
    assert_eq!(
        report.corrupt_records, 0,
        "sealed segments are not scanned on open"
    );
    assert_eq!(stats.corrupt_records, 1);
    assert_subset(&got, &all, 1);
}

#[tokio::test]
async fn torn_tail_is_truncated() {
    let fs = MemFs::new();
    let all = filled_log(&fs, 60).await;
    let tail = seg_files(&fs).pop().expect("tail");
    fs.with_file(&tail, |d| {
        let n = d.len();
        d.truncate(n - 7);
    });
    let (got, report, _) = read_all(&fs).await;
    assert!(report.torn_tail_bytes > 0);
    assert_subset(&got, &all, 1);
    // Flipping the tail's last byte is a damaged last record: also cut off.
    let fs = MemFs::new();
    let all = filled_log(&fs, 60).await;
    let tail = seg_files(&fs).pop().expect("tail");
    fs.with_file(&tail, |d| {
        let n = d.len();
        d[n - 1] ^= 1;
    });
    let (got, report, _) = read_all(&fs).await;
    assert!(report.torn_tail_bytes > 0);
    assert_subset(&got, &all, 1);
}

#[tokio::test]
async fn truncated_sealed_segment_keeps_the_rest() {
    let fs = MemFs::new();
    let all = filled_log(&fs, 80).await;
    let first = seg_files(&fs)[0].clone();
    let lost = fs.with_file(&first, |d| {
        let n = d.len();
        d.truncate(n / 2);
        n / 2 / 180 + 2
    });
    let (got, _, stats) = read_all(&fs).await;
    assert_eq!(stats.corrupt_records, 1);
    assert_subset(&got, &all, lost);
}

#[tokio::test]
async fn lost_or_damaged_cursor_falls_back() {
    // Deleted: read from the oldest segment.
    let fs = MemFs::new();
    let all = filled_log(&fs, 60).await;
    Storage::remove(&fs, &Path::new(DIR).join(CURSOR_FILE)).expect("remove");
    let (got, report, _) = read_all(&fs).await;
    assert!(report.cursor_repaired);
    assert_subset(&got, &all, 0);

    // One slot damaged: the other one is used.
    let fs = MemFs::new();
    let all = filled_log(&fs, 60).await;
    let cursor = Path::new(DIR).join(CURSOR_FILE);
    fs.with_file(&cursor, |d| {
        for b in d.iter_mut() {
            *b ^= 0x33;
        }
    });
    let (got, report, _) = read_all(&fs).await;
    assert!(report.cursor_repaired);
    assert_subset(&got, &all, 0);
}

#[tokio::test]
async fn damaged_segment_header_is_rewritten() {
    let fs = MemFs::new();
    let all = filled_log(&fs, 60).await;
    for seg in seg_files(&fs) {
        fs.with_file(&seg, |d| d[3] ^= 0xff);
    }
    let (got, _, _) = read_all(&fs).await;
    assert_subset(&got, &all, 0);
}

// ---- the model test ----

#[derive(Debug, Clone)]
enum Action {
    Append(Vec<u16>),
    Read(usize),
    Ack(usize),
    Restart,
    /// Power cut after `ops` more file operations, while `n` appends are in flight.
    Crash {
        n: u8,
        ops: u8,
        tear: Option<usize>,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => prop::collection::vec(0u16..600, 1..20).prop_map(Action::Append),
        3 => (1usize..30).prop_map(Action::Read),
        3 => any::<usize>().prop_map(Action::Ack),
        1 => Just(Action::Restart),
        1 => (0u8..20, 0u8..30, any::<Option<usize>>())
            .prop_map(|(n, ops, tear)| Action::Crash { n, ops, tear }),
    ]
}

/// What the log must hold, kept the simple way.
#[derive(Default)]
struct Model {
    /// Every record that may be stored at or after the persisted head, and whether it must
    /// be there (its append resolved Ok) or may be (it failed or was cut off).
    records: BTreeMap<u64, (Record, bool)>,
    /// Records from here on have not been read.
    next_unread: u64,
    /// Read, in order, with whether they were acknowledged.
    inflight: Vec<(u64, bool)>,
    /// The persisted head is at least this (exact after a clean close).
    head_floor: u64,
    /// Largest sequence number of a record that was stored (durable or read back).
    max_seq: Option<u64>,
}

impl Model {
    fn head(&self) -> u64 {
        self.inflight
            .iter()
            .find(|(_, acked)| !acked)
            .map_or(self.next_unread, |(s, _)| *s)
    }

    fn unread(&self) -> Vec<u64> {
        self.records
            .range(self.next_unread..)
            .filter(|(_, (_, must))| *must)
            .map(|(s, _)| *s)
            .collect()
    }
}

fn run_model(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    rt.block_on(async move {
        let mut fs = MemFs::new();
        let (mut log, _) = open(&fs, config());
        let mut reader = log.reader().expect("reader");
        let mut m = Model::default();
        let mut i = 0u64;
        for action in actions {
            match action {
                Action::Append(sizes) => {
                    let recs: Vec<_> = sizes
                        .iter()
                        .map(|&n| {
                            i += 1;
                            record(i, n as usize)
                        })
                        .collect();
                    for (seq, r, res) in append_many(&log, recs).await {
                        prop_assert!(res.is_ok());
                        prop_assert!(
                            m.max_seq.is_none_or(|x| seq > x),
                            "sequence of a stored record reused"
                        );
                        m.max_seq = Some(seq);
                        m.records.insert(seq, (r, true));
                    }
                }
                Action::Read(max) => {
                    let unread = m.unread();
                    if unread.is_empty() {
                        continue;
                    }
                    let batch = tokio::time::timeout(
                        Duration::from_secs(5),
                        reader.read_batch(max, 1 << 20),
                    )
                    .await
                    .map_err(|_| TestCaseError::fail("read_batch hung"))?
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(!batch.is_empty() && batch.len() <= max);
                    for got in &batch {
                        let want = m.records.get(&got.seq);
                        prop_assert!(
                            want.is_some_and(|(r, _)| *r == got.record),
                            "unexpected {}",
                            got.seq
                        );
                        m.inflight.push((got.seq, false));
                    }
                    // Nothing that must be there was skipped.
                    let last = batch[batch.len() - 1].seq;
                    let expected: Vec<u64> =
                        unread.iter().copied().take_while(|s| *s <= last).collect();
                    let got: Vec<u64> = batch.iter().map(|r| r.seq).collect();
                    prop_assert!(
                        expected.iter().all(|s| got.contains(s)),
                        "skipped records: {expected:?} vs {got:?}"
                    );
                    m.next_unread = last + 1;
                }
                Action::Ack(k) => {
                    if m.inflight.is_empty() {
                        continue;
                    }
                    let idx = k % m.inflight.len();
                    m.inflight[idx].1 = true;
                    reader.ack(m.inflight[idx].0);
                    prop_assert_eq!(log.stats().head_seq, m.head());
                }
                Action::Restart => {
                    log.close()
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    drop((log, reader));
                    let head = m.head();
                    m.records = m.records.split_off(&head);
                    m.inflight.clear();
                    m.next_unread = head;
                    m.head_floor = head;
                    let (l, report) = open(&fs, config());
                    prop_assert_eq!(report.corrupt_records, 0);
                    prop_assert_eq!(report.torn_tail_bytes, 0);
                    log = l;
                    reader = log.reader().expect("reader");
                }
                Action::Crash { n, ops, tear } => {
                    fs.freeze_after(u64::from(ops));
                    let recs: Vec<_> = (0..n)
                        .map(|_| {
                            i += 1;
                            record(i, 100)
                        })
                        .collect();
                    for (seq, r, res) in append_many(&log, recs).await {
                        prop_assert!(
                            m.max_seq.is_none_or(|x| seq > x),
                            "sequence of a stored record reused"
                        );
                        if res.is_ok() {
                            m.max_seq = Some(seq);
                        }
                        // A failed append may still be on disk (a torn write kept it whole).
                        m.records.insert(seq, (r, res.is_ok()));
                    }
                    drop((log, reader));
                    fs = fs.after_power_cut(tear);
                    let (l, _) = open(&fs, config());
                    log = l;
                    reader = log.reader().expect("reader");
                    let got = drain(&mut reader);
                    let true_head = m.head();
                    prop_assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
                    let seen: BTreeMap<u64, &Record> =
                        got.iter().map(|r| (r.seq, &r.record)).collect();
                    for r in &got {
                        prop_assert!(
                            r.seq >= m.head_floor,
                            "{} behind the persisted head {}",
                            r.seq,
                            m.head_floor
                        );
                        prop_assert!(
                            m.records.get(&r.seq).is_some_and(|(x, _)| *x == r.record),
                            "record {} damaged",
                            r.seq
                        );
                    }
                    for (seq, (rec, must)) in m.records.range(true_head..) {
                        if *must {
                            prop_assert_eq!(seen.get(seq), Some(&rec), "durable {} lost", seq);
                        }
                    }
                    // The model now holds exactly what came back, all of it in flight.
                    m.records = got
                        .iter()
                        .map(|r| (r.seq, (r.record.clone(), true)))
                        .collect();
                    m.inflight = got.iter().map(|r| (r.seq, false)).collect();
                    m.next_unread = got
                        .last()
                        .map_or(m.max_seq.map_or(0, |s| s + 1), |r| r.seq + 1);
                }
            }
        }
        log.close()
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_the_model(actions in prop::collection::vec(action(), 1..40)) {
        run_model(actions)?;
    }
}

/// A second open of the same directory (another gateway, or a stale unit) fails with
/// `Locked` instead of interleaving writes; the lock goes with the first log.
#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = Log::open(LogConfig::new(dir.path())).expect("first open");
    match Log::open(LogConfig::new(dir.path())) {
        Err(LogError::Locked { path }) => assert_eq!(path, dir.path()),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a second open of a locked log succeeded"),
    }
    drop(log);
    Log::open(LogConfig::new(dir.path())).expect("open again once the first log is gone");
}

/// Every file under `dir`, recursively, as one byte string per file.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).expect("read")));
        }
    }
    out
}

fn secret_record(i: u64) -> Record {
    Record {
        payload: Bytes::from(format!("SECRET-PAYLOAD-{i:04}-temperature=21.5")),
        device: "pump-SECRET-DEVICE".into(),
        ..record(i, 0)
    }
}

fn keys(current: u8, previous: &[u8]) -> Option<Arc<LogKeys>> {
    let previous: Vec<[u8; 32]> = previous.iter().map(|b| [*b; 32]).collect();
    Some(Arc::new(LogKeys::new(
        seal::Cipher::Chacha20Poly1305,
        &[current; 32],
        &previous,
    )))
}

/// With encryption on, no payload or device id is anywhere on the disk; the records read
/// back whole; a log reopened without the key stops at the first sealed record (an error
/// naming the key) instead of skipping it; after a rotation old and new records both read.
#[tokio::test]
async fn sealed_records_are_unreadable_on_disk_and_wait_for_their_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let config = |keys| LogConfig {
        commit_delay: Duration::from_millis(1),
        keys,
        ..LogConfig::new(&dir)
    };
    let old_key = keys(1, &[]);
    let old_id = old_key.as_ref().map(|k| k.current_id()).expect("keys");
    let (log, _) = Log::open(config(old_key)).expect("open");
    let first: Vec<Record> = (0..50).map(secret_record).collect();
    for (_, _, outcome) in append_many(&log, first.clone()).await {
        outcome.expect("durable");
    }
    log.close().await.expect("close");
    drop(log);
    let files = files_under(&dir);
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        for needle in [&b"SECRET-PAYLOAD"[..], b"SECRET-DEVICE", b"temperature"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds {:?} in the clear",
                path.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }

    // No key configured: reading stops with an error naming the key; nothing is skipped.
    let (log, _) = Log::open(config(None)).expect("open without keys");
    let mut reader = log.reader().expect("reader");
    match reader.read_batch(100, 1 << 20).await {
        Err(LogError::MissingKey { seq: 0, key_id }) => assert_eq!(key_id, old_id),
        other => panic!("expected MissingKey for record 0, got {other:?}"),
    }
    assert_eq!(log.stats().corrupt_records, 0);
    log.close().await.expect("close");
    drop((reader, log));

    // Rotated: a new key for new records, the old one kept to read the backlog.
    let (log, _) = Log::open(config(keys(2, &[1]))).expect("open rotated");
    let second: Vec<Record> = (50..60).map(secret_record).collect();
    for (_, _, outcome) in append_many(&log, second.clone()).await {
        outcome.expect("durable");
    }
    let mut reader = log.reader().expect("reader");
    let read: Vec<Record> = drain(&mut reader).into_iter().map(|r| r.record).collect();
    let expected: Vec<Record> = first.into_iter().chain(second).collect();
    assert_eq!(read, expected);
    assert_eq!(log.stats().corrupt_records, 0);
    log.close().await.expect("close");
}

/// The log's directory is the gateway user's alone, and so is every file in it, whatever
/// the umask.
#[tokio::test]
async fn the_log_directory_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state").join("log");
    let (log, _) = Log::open(LogConfig {
        commit_delay: Duration::from_millis(1),
        ..LogConfig::new(&dir)
    })
    .expect("open");
    append_many(&log, (0..3).map(|i| record(i, 10))).await;
    log.close().await.expect("close");
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(mode(dir.parent().expect("parent")), 0o700);
    let files = files_under(&dir);
    assert!(
        files.len() >= 3,
        "segment, cursor and lock files: {files:?}"
    );
    for (path, _) in files {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

/// Acknowledged segments behind the receipt pin stay until the pin moves past them; the
/// receipts of the records in them read back from the pinned sequence number on, sealed or
/// not, and records without one are passed over.
#[tokio::test]
async fn the_receipt_pin_keeps_acknowledged_segments_and_their_receipts_read_back() {
    for sealed in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("log");
        let config = || LogConfig {
            segment_bytes: 4096,
            commit_delay: Duration::from_millis(1),
            keys: if sealed { keys(3, &[]) } else { None },
            ..LogConfig::new(&dir)
        };
        let (log, _) = Log::open_pinned(config(), 40).expect("open");
        let mut durable = Vec::new();
        for i in 0..120u64 {
            let receipt = format!("r{i}");
            let receipt = if i % 3 == 0 {
                receipt.as_bytes()
            } else {
                &[][..]
            };
            durable.push(
                log.append_with_receipt(&record(i, 100), receipt)
                    .expect("append"),
            );
        }
        for d in durable {
            d.await.expect("durable");
        }
        assert_eq!(log.next_seq(), 120);
        let mut reader = log.reader().expect("reader");
        let got = drain(&mut reader);
        assert_eq!(got.len(), 120, "the forwarder's reader skips receipts");
        assert_eq!(got[3].record, record(3, 100));
        reader.ack_range(0, 120);
        log.close().await.expect("close");
        drop((reader, log));
        let firsts = || {
            let mut f: Vec<u64> = std::fs::read_dir(&dir)
                .expect("read_dir")
                .filter_map(|e| segment::parse_segment_name(e.ok()?.file_name().to_str()?))
                .collect();
            f.sort_unstable();
            f
        };
        let kept = firsts();
        assert!(kept.len() > 3, "{kept:?}");
        assert!(
            kept[0] <= 40 && kept[1] > 40,
            "segments from the pin on stay: {kept:?}"
        );

        let mut seen = Vec::new();
        scan_receipts(&dir, config().keys.as_deref(), 40, |seq, r| {
            seen.push((seq, r));
        })
        .expect("scan");
        let expected: Vec<(u64, Bytes)> = (40..120)
            .filter(|i| i % 3 == 0)
            .map(|i| (i, Bytes::from(format!("r{i}"))))
            .collect();
        assert_eq!(seen, expected);

        // The store caught up: the pin moves and the segments go.
        let (log, _) = Log::open_pinned(config(), 40).expect("reopen");
        log.set_pin(u64::MAX);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while firsts().len() > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(firsts().len(), 1, "only the tail is kept once unpinned");
        log.close().await.expect("close");
    }
}

/// A read counted by a measure other than payload bytes (the forwarder's record weight)
/// stays within its limit: a record that would take the batch over is left for the next
/// read, not skipped, and one record alone heavier than the limit still comes, alone.
#[tokio::test]
async fn a_read_by_a_measure_stays_within_its_limit_and_skips_nothing() {
    let fs = MemFs::new();
    let (log, _) = open(&fs, config());
    let mut reader = log.reader().expect("reader");
    // Small payloads, each counted as 100 + payload: payload bytes alone would let far more
    // into a batch than the measure allows.
    fn measure(r: &Record) -> usize {
        100 + r.payload.len()
    }
    let appended = append_many(&log, (0..40).map(|i| record(i, 10 + (i as usize % 3) * 20))).await;
    assert!(appended.iter().all(|(_, _, r)| r.is_ok()));
    let mut got = Vec::new();
    while got.len() < 40 {
        let batch = reader
            .read_batch_by(1000, 500, measure)
            .await
            .expect("read");
        let counted: usize = batch.iter().map(|r| measure(&r.record)).sum();
        assert!(
            counted <= 500,
            "a batch of {} counted {counted}",
            batch.len()
        );
        assert!(!batch.is_empty());
        got.extend(batch.into_iter().map(|r| r.seq));
    }
    assert_eq!(
        got,
        (0..40).collect::<Vec<u64>>(),
        "every record once, in order"
    );
    // Heavier than the whole limit: it comes alone.
    let heavy = log.append(&record(40, 2000)).expect("append");
    heavy.await.expect("durable");
    log.append(&record(41, 10))
        .expect("append")
        .await
        .expect("durable");
    let alone = reader
        .read_batch_by(1000, 500, measure)
        .await
        .expect("read");
    assert_eq!(alone.iter().map(|r| r.seq).collect::<Vec<_>>(), [40]);
    let next = reader
        .read_batch_by(1000, 500, measure)
        .await
        .expect("read");
    assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), [41]);
}
