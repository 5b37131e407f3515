//! The log on a real, small file system that fills up: appends fail cleanly, nothing stored
//! is lost, and appends succeed again once space returns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use edgegate::buffer::{AppendError, Log, LogConfig};
use edgegate::record::{Record, Source};

/// Unmounts on drop, also when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn record(i: u64) -> Record {
    Record {
        source: Source::Coap,
        received_ms: i as i64,
        device: format!("dev-{}", i % 10),
        origin: "/s".into(),
        kafka_topic: "telemetry".into(),
        key: None,
        headers: vec![],
        payload: Bytes::from(vec![(i % 253) as u8; 1000]),
    }
}

#[tokio::test]
async fn full_disk_fails_appends_cleanly_and_recovers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _fs = match Tmpfs::mount(tmp.path(), "3m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "SKIPPED full_disk_fails_appends_cleanly_and_recovers: cannot mount a tmpfs ({e}); needs root"
            );
            return;
        }
    };
    // Something to delete later, standing for space another program frees.
    let filler = tmp.path().join("filler");
    std::fs::write(&filler, vec![0u8; 1 << 20]).expect("filler");
    let cfg = LogConfig {
        segment_bytes: 256 << 10,
        max_bytes: 64 << 20,
        commit_delay: Duration::from_millis(1),
        ..LogConfig::new(tmp.path().join("log"))
    };
    let (log, _) = Log::open(cfg.clone()).expect("open");

    let mut stored = BTreeMap::new();
    let mut failed = Vec::new();
    let mut i = 0;
    while failed.len() < 200 && i < 20_000 {
        let batch: Vec<_> = (0..32)
            .map(|_| {
                i += 1;
                let r = record(i);
                let d = log.append(&r).expect("accepted: max_bytes is far away");
                async move { (d.seq(), r, d.await) }
            })
            .collect();
        for (seq, r, res) in futures::future::join_all(batch).await {
            match res {
                Ok(_) => {
                    stored.insert(seq, r);
                }
                Err(AppendError::Io(msg)) => failed.push((seq, msg)),
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
    assert!(!failed.is_empty(), "the disk never filled");
    eprintln!(
        "disk full after {} records; error: {}",
        stored.len(),
        failed[0].1
    );

    // The refused appends' sequence numbers are gaps, not records waiting for Kafka: once
    // everything stored is delivered, the backlog is empty although the last appends failed.
    assert_eq!(log.stats().records, stored.len() as u64);
    let mut reader = log.reader().expect("reader");
    let mut got = BTreeMap::new();
    while let Ok(Ok(batch)) =
        tokio::time::timeout(Duration::from_millis(200), reader.read_batch(1000, 1 << 20)).await
    {
        for r in batch {
            reader.ack(r.seq);
            got.insert(r.seq, r.record);
        }
    }
    assert_eq!(got, stored, "exactly the durable records are stored");
    let stats = log.stats();
    assert_eq!(
        stats.records,
        0,
        "nothing is left to deliver; {} appends were refused",
        failed.len()
    );
    assert_eq!(stats.oldest_age, None);

    std::fs::remove_file(&filler).expect("free space");
    let mut resumed = 0;
    for _ in 0..100 {
        i += 1;
        let r = record(i);
        let d = log.append(&r).expect("accepted");
        let seq = d.seq();
        if d.await.is_ok() {
            stored.insert(seq, r);
            resumed += 1;
        }
    }
    assert!(resumed >= 95, "appends resumed: {resumed} of 100");
    assert_eq!(log.stats().records, resumed);

    while let Ok(Ok(batch)) =
        tokio::time::timeout(Duration::from_millis(200), reader.read_batch(1000, 1 << 20)).await
    {
        for r in batch {
            got.insert(r.seq, r.record);
        }
    }
    assert_eq!(got, stored, "exactly the durable records are stored");
    log.close().await.expect("close");

    let (log, report) = Log::open(cfg).expect("reopen");
    assert_eq!(report.corrupt_records, 0);
    assert_eq!(report.torn_tail_bytes, 0);
    log.close().await.expect("close");
}
