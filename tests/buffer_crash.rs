//! A real process appends to the log with group commit and is killed with SIGKILL at random
//! moments; after each kill the log must hold every record the child reported durable.
//!
//! The child is this test binary itself, re-executed with `CHILD_ENV` set.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgegate::buffer::{Log, LogConfig, LogError};
use edgegate::record::{Record, Source};

const CHILD_ENV: &str = "EDGEGATE_BUFFER_CRASH_CHILD_DIR";
const TEST_NAME: &str = "sigkill_never_loses_a_record_reported_durable";
const APPENDERS: u64 = 64;

fn config(dir: &Path) -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        ..LogConfig::new(dir)
    }
}

/// Content the parent can check without knowing what the child sent.
fn record(task: u64, n: u64) -> Record {
    let device = format!("dev-{task}");
    Record {
        source: Source::Mqtt,
        received_ms: n as i64,
        payload: payload_for(&device, n as i64),
        device,
        origin: format!("t/{task}"),
        kafka_topic: "telemetry".into(),
        key: None,
        headers: vec![],
    }
}

fn payload_for(device: &str, n: i64) -> Bytes {
    let seed = crc32c::crc32c(format!("{device}/{n}").as_bytes());
    Bytes::from(
        (0..200u32)
            .map(|i| (seed.wrapping_mul(i + 1) >> 7) as u8)
            .collect::<Vec<_>>(),
    )
}

fn child(dir: PathBuf) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let (log, _) = Log::open(config(&dir)).expect("open");
        println!("ready");
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for task in 0..APPENDERS {
            let log = log.clone();
            let out = out.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let Ok(durable) = log.append(&record(task, n)) else {
                        return;
                    };
                    if let Ok(seq) = durable.await {
                        let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = writeln!(o, "durable {seq}");
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn sigkill_never_loses_a_record_reported_durable() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(PathBuf::from(dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let exe = std::env::current_exe().expect("own binary");
    let started = Instant::now();
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut rounds = 0;
    let mut checked = 0usize;
    while rounds < 40 && started.elapsed() < Duration::from_secs(20) {
        rounds += 1;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = Command::new(&exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let collector = std::thread::spawn(move || {
            let mut durable = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.ends_with("ready") {
                    let _ = ready_tx.send(());
                } else if let Some(seq) = line.strip_prefix("durable ") {
                    if let Ok(seq) = seq.parse::<u64>() {
                        durable.push(seq);
                    }
                }
            }
            durable
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("child opened the log");
        std::thread::sleep(Duration::from_millis(20 + rng % 300));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let durable = collector.join().expect("collector");

        let rt = tokio::runtime::Runtime::new().expect("runtime");
        checked += rt.block_on(verify(&dir, &durable, rounds));
    }
    eprintln!("{rounds} SIGKILLs, {checked} durable records verified");
    assert!(rounds >= 10 && checked > 1000);
}

/// Every reported seq is present and intact; then everything is acknowledged so the next
/// round only checks its own records.
async fn verify(dir: &Path, durable: &[u64], round: u32) -> usize {
    let (log, report) = Log::open(config(dir)).expect("reopen after SIGKILL");
    assert_eq!(report.corrupt_records, 0, "round {round}: {report:?}");
    let mut reader = log.reader().expect("reader");
    let mut seen = HashSet::new();
    let mut last = None;
    loop {
        let next =
            tokio::time::timeout(Duration::from_millis(200), reader.read_batch(4096, 8 << 20));
        let batch = match next.await {
            Ok(Ok(b)) => b,
            Ok(Err(LogError::Closed)) | Err(_) => break,
            Ok(Err(e)) => panic!("round {round}: read failed: {e}"),
        };
        for r in batch {
            assert!(last.is_none_or(|l| r.seq > l), "round {round}: order");
            last = Some(r.seq);
            assert_eq!(
                r.record.payload,
                payload_for(&r.record.device, r.record.received_ms),
                "round {round}: record {} intact",
                r.seq
            );
            seen.insert(r.seq);
            reader.ack(r.seq);
        }
    }
    let missing: Vec<_> = durable
        .iter()
        .filter(|s| !seen.contains(s))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "round {round}: {} of {} durable records missing, e.g. {missing:?}",
        durable.iter().filter(|s| !seen.contains(s)).count(),
        durable.len()
    );
    log.close().await.expect("close");
    durable.len()
}
