//! Figures for the durable log (`cargo bench --bench buffer`): 256-byte payloads, the
//! default configuration unless said otherwise, a temporary directory under $TMPDIR (or
//! `EDGEGATE_BENCH_DIR`). Prints; asserts nothing.
//!
//! Runs that need a clean process (SIGKILL, peak RSS) re-execute this binary with
//! `CHILD_ENV` set.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgegate::buffer::seal::{Cipher, LogKeys};
use edgegate::buffer::{Durability, Log, LogConfig};
use edgegate::record::{Record, Source};

const CHILD_ENV: &str = "EDGEGATE_BUFFER_BENCH_CHILD";
const PAYLOAD: usize = 256;

fn record(i: u64) -> Record {
    Record {
        source: Source::Mqtt,
        received_ms: 1_764_000_000_000 + i as i64,
        device: format!("dev-{:04}", i % 1000),
        origin: format!("dev-{:04}/up", i % 1000),
        kafka_topic: "telemetry".into(),
        key: None,
        headers: vec![],
        payload: Bytes::from(vec![(i % 251) as u8; PAYLOAD]),
    }
}

fn base_dir() -> PathBuf {
    std::env::var_os("EDGEGATE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn proc_io_write_bytes() -> u64 {
    proc_field("/proc/self/io", "write_bytes:")
}

fn vm_hwm_kib() -> u64 {
    proc_field("/proc/self/status", "VmHWM:")
}

fn vm_rss_kib() -> u64 {
    proc_field("/proc/self/status", "VmRSS:")
}

fn proc_field(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `appenders` tasks append and await in a loop for `secs`.
fn group_commit(appenders: u64, secs: u64) {
    let tmp = tempfile::tempdir_in(base_dir()).expect("tempdir");
    let (log, _) = Log::open(LogConfig::new(tmp.path())).expect("open");
    let rt = runtime();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let fsyncs0 = log.stats().fsyncs;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..appenders {
            let (log, done, stop) = (log.clone(), done.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    log.append(&record(i))
                        .expect("append")
                        .await
                        .expect("durable");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += appenders;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("task");
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let fsyncs = log.stats().fsyncs - fsyncs0;
    println!(
        "group commit, {appenders:>4} appenders: {:>9.0} appends/s, {:>6.0} fsyncs/s, {:>6.1} records/fsync",
        n as f64 / secs,
        fsyncs as f64 / secs,
        n as f64 / fsyncs.max(1) as f64
    );
    rt.block_on(log.close()).expect("close");
}

/// Appends as fast as the log accepts them: `tasks` appenders, each keeping `window`
/// appends outstanding.
async fn pipelined(log: &Log, tasks: u64, window: usize, total: u64) {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut pending = VecDeque::with_capacity(window);
            let mut i = t;
            while i < total {
                pending.push_back(log.append(&record(i)).expect("append"));
                if pending.len() >= window {
                    if let Some(d) = pending.pop_front() {
                        d.await.expect("written");
                    }
                }
                i += tasks;
            }
            for d in pending {
                d.await.expect("written");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
}

fn no_fsync() {
    let tmp = tempfile::tempdir_in(base_dir()).expect("tempdir");
    let cfg = LogConfig {
        durability: Durability::None,
        ..LogConfig::new(tmp.path())
    };
    let (log, _) = Log::open(cfg).expect("open");
    let rt = runtime();
    let total = 3_000_000;
    let start = Instant::now();
    rt.block_on(pipelined(&log, 4, 1024, total));
    let secs = start.elapsed().as_secs_f64();
    println!(
        "durability none, 4 appenders x 1024 in flight: {:>9.0} appends/s ({total} records, {:.0} MB/s of payload)",
        total as f64 / secs,
        (total as usize * PAYLOAD) as f64 / secs / 1e6
    );

    // Drain what was just written.
    let mut reader = log.reader().expect("reader");
    let start = Instant::now();
    let mut n = 0u64;
    rt.block_on(async {
        while n < total {
            let batch = reader.read_batch(4096, 4 << 20).await.expect("read");
            if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
                reader.ack_range(first.seq, last.seq + 1);
            }
            n += batch.len() as u64;
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "drain (read_batch 4096 + ack_range), {n} records: {:>9.0} records/s",
        n as f64 / secs
    );
    rt.block_on(log.close()).expect("close");
}

/// Write amplification with `appenders` sharing each fsync (100 gives ~100 records/fsync).
fn write_amplification(appenders: u64) {
    let tmp = tempfile::tempdir_in(base_dir()).expect("tempdir");
    let (log, _) = Log::open(LogConfig::new(tmp.path())).expect("open");
    let rt = runtime();
    let per_task = 300_000 / appenders;
    let fsyncs0 = log.stats().fsyncs;
    let w0 = proc_io_write_bytes();
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..appenders {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..per_task {
                    let i = t + k * appenders;
                    log.append(&record(i))
                        .expect("append")
                        .await
                        .expect("durable");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let written = proc_io_write_bytes() - w0;
    let n = appenders * per_task;
    let fsyncs = log.stats().fsyncs - fsyncs0;
    let payload = n * PAYLOAD as u64;
    let framed = log.stats().bytes;
    println!(
        "write amplification at {:.0} records/fsync ({n} records, {:.0} appends/s): {:.3} (write_bytes {written} / payload {payload}); on disk {:.3} x payload ({} B per record incl. framing and padding, {} B logical)",
        n as f64 / fsyncs.max(1) as f64,
        n as f64 / secs,
        written as f64 / payload as f64,
        framed as f64 / payload as f64,
        framed / n,
        logical_len(&record(0)),
    );
    rt.block_on(log.close()).expect("close");
}

/// The bytes a caller hands over: payload plus metadata strings.
fn logical_len(r: &Record) -> usize {
    r.payload.len() + r.device.len() + r.origin.len() + r.kafka_topic.len() + 8 + 1
}

/// Fills `dir` to `bytes` and reports peak RSS; then waits to be killed.
fn child_fill(dir: &Path, bytes: u64) {
    let cfg = LogConfig {
        max_bytes: 4 << 30,
        durability: Durability::None,
        ..LogConfig::new(dir)
    };
    let (log, _) = Log::open(cfg).expect("open");
    let rt = runtime();
    let per_record = 16 + 2 + 6 + 3 + 8 + 11 + 9 + PAYLOAD as u64;
    let total = bytes / per_record;
    let start = Instant::now();
    rt.block_on(pipelined(&log, 4, 1024, total));
    let stats = log.stats();
    println!(
        "filled {} MiB ({} records, {} segments) in {:.1} s; VmHWM {} KiB, VmRSS {} KiB",
        stats.bytes >> 20,
        stats.records,
        stats.segments,
        start.elapsed().as_secs_f64(),
        vm_hwm_kib(),
        vm_rss_kib()
    );
    println!("filled");
    std::thread::sleep(Duration::from_secs(600));
}

/// Opens (timed), then optionally drains everything; reports peak RSS.
fn child_open(dir: &Path, drain: bool) {
    let cfg = LogConfig {
        max_bytes: 4 << 30,
        ..LogConfig::new(dir)
    };
    let start = Instant::now();
    let (log, report) = Log::open(cfg).expect("open");
    let open = start.elapsed();
    println!(
        "open: {:.1} ms ({} segments, {} records, torn tail {} B)",
        open.as_secs_f64() * 1e3,
        report.segments,
        report.records,
        report.torn_tail_bytes
    );
    if drain {
        let rt = runtime();
        let mut reader = log.reader().expect("reader");
        let total = report.records;
        let start = Instant::now();
        let mut n = 0;
        rt.block_on(async {
            while n < total {
                let batch = reader.read_batch(4096, 4 << 20).await.expect("read");
                if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
                    reader.ack_range(first.seq, last.seq + 1);
                }
                n += batch.len() as u64;
            }
        });
        let secs = start.elapsed().as_secs_f64();
        println!(
            "drain from disk: {n} records in {secs:.2} s = {:.0} records/s; VmHWM {} KiB",
            n as f64 / secs,
            vm_hwm_kib()
        );
        rt.block_on(log.close()).expect("close");
    }
}

fn child_main(spec: &str) {
    let mut parts = spec.splitn(3, ':');
    let mode = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    let dir = PathBuf::from(parts.next().unwrap_or(""));
    match mode {
        "fill" => child_fill(&dir, arg.parse().expect("bytes")),
        "open" => child_open(&dir, arg == "drain"),
        _ => panic!("unknown child mode {mode}"),
    }
}

/// Runs a child; returns its output lines (after `until` appears, the child is SIGKILLed).
fn run_child(spec: String, kill_after: Option<&str>) -> Vec<String> {
    let exe = std::env::current_exe().expect("own binary");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, spec)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if kill_after == Some(line.as_str()) {
            child.kill().expect("SIGKILL");
            break;
        }
        println!("  {line}");
        lines.push(line);
    }
    child.wait().expect("reap");
    lines
}

fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn big_backlog() {
    for (label, bytes) in [
        ("64 MiB", 64u64 << 20),
        ("1 GiB", (1u64 << 30) + (60 << 20)),
    ] {
        let tmp = tempfile::tempdir_in(base_dir()).expect("tempdir");
        let dir = tmp.path().display().to_string();
        println!("backlog {label} (tail segment kept nearly full: the worst case for open):");
        run_child(format!("fill:{bytes}:{dir}"), Some("filled"));
        println!(" after SIGKILL, page cache warm:");
        run_child(format!("open:only:{dir}"), None);
        if drop_caches() {
            println!(" after dropping the page cache (cold disk):");
            run_child(format!("open:only:{dir}"), None);
        }
        println!(" reopen and drain everything:");
        run_child(format!("open:drain:{dir}"), None);
    }
}

/// The cost of `[buffer.encryption]`: appends without fsync (so the CPU is what is
/// measured) and a full read back, plain and with each cipher, in one run.
fn sealing() {
    let total = 1_000_000u64;
    let mut plain_rates = None;
    for cipher in [
        None,
        Some(Cipher::Chacha20Poly1305),
        Some(Cipher::Aes256Gcm),
    ] {
        let tmp = tempfile::tempdir_in(base_dir()).expect("tempdir");
        let cfg = LogConfig {
            durability: Durability::None,
            keys: cipher.map(|c| Arc::new(LogKeys::new(c, &[7; 32], &[]))),
            ..LogConfig::new(tmp.path())
        };
        let (log, _) = Log::open(cfg).expect("open");
        let rt = runtime();
        let start = Instant::now();
        rt.block_on(pipelined(&log, 4, 1024, total));
        let append = total as f64 / start.elapsed().as_secs_f64();
        let bytes = log.stats().bytes;
        let mut reader = log.reader().expect("reader");
        let start = Instant::now();
        let mut read = 0u64;
        rt.block_on(async {
            while read < total {
                let batch = reader.read_batch(10_000, 16 << 20).await.expect("read");
                read += batch.len() as u64;
                if let Some(last) = batch.last() {
                    reader.ack_range(batch[0].seq, last.seq + 1);
                }
            }
        });
        let drain = total as f64 / start.elapsed().as_secs_f64();
        let (base_append, base_drain) = *plain_rates.get_or_insert((append, drain));
        println!(
            "sealing {:<18} appends {:>9.0}/s ({:>3.0}%), reads {:>9.0}/s ({:>3.0}%), {:>5.1} B/record on disk",
            cipher.map_or("off".to_owned(), |c| format!("{c:?}")),
            append,
            100.0 * append / base_append,
            drain,
            100.0 * drain / base_drain,
            bytes as f64 / total as f64,
        );
        rt.block_on(log.close()).expect("close");
    }
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_main(&spec);
        return;
    }
    // `cargo test --all-targets` builds and runs this too (without `--bench`): building is
    // the check there; the figures take minutes and belong to `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("edgegate buffer bench: built; run it with `cargo bench --bench buffer`");
        return;
    }
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    println!(
        "edgegate buffer bench: {PAYLOAD} B payloads, {} B logical records, {} cores, dir {}",
        logical_len(&record(0)),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base_dir().display()
    );
    if run("group") {
        group_commit(1, 3);
        group_commit(64, 3);
        group_commit(1024, 5);
    }
    if run("nofsync") {
        no_fsync();
    }
    if run("sealing") {
        sealing();
    }
    if run("wa") {
        write_amplification(100);
        write_amplification(1000);
    }
    if run("backlog") {
        big_backlog();
    }
}
