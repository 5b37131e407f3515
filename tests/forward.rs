//! The forwarder against a real Kafka broker and the real log: a drain read back record by
//! record, a record too large for its topic, a broker outage mid-drain, a forwarder killed
//! mid-drain. Plus the 1,000,000-record drain benchmark (`--ignored`, prints figures).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::forwarder::{Forwarding, open_logs};
use edgegate::buffer::{Durability, Log};
use edgegate::forward::LinkState;
use edgegate::forward::config::KafkaConfig;
use edgegate::record::{Record, Source};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

const GATEWAY: &str = "gw-test";
const KEYS: u64 = 10;

fn kafka_config() -> KafkaConfig {
    KafkaConfig {
        brokers: vec![common::bootstrap()],
        // The outage test restarts the broker within seconds; do not wait 10 s to notice.
        retry_backoff_max: edgegate::config::Duration::from_millis(1000),
        ..KafkaConfig::default()
    }
}

fn record(topic: &str, n: u64, payload_len: usize) -> Record {
    let device = format!("device-{}", n % KEYS);
    let mut payload = format!("{n}:").into_bytes();
    if payload_len > 1000 {
        // Incompressible, or lz4 would make it fit the topic's limit after all.
        payload.extend((payload.len()..payload_len).map(|_| rand::random::<u8>()));
    } else {
        payload.resize(payload_len.max(payload.len()), b'x');
    }
    Record {
        source: if n % 2 == 0 {
            Source::Mqtt
        } else {
            Source::Coap
        },
        // Recent: Kafka deletes records older than the topic's retention soon after they
        // arrive (retention goes by record timestamp), which would look like loss here.
        received_ms: now_ms() + n as i64,
        device: device.clone(),
        origin: format!("plant/a/{device}/telemetry"),
        kafka_topic: topic.to_owned(),
        key: Some(Bytes::from(device)),
        headers: vec![
            ("mqtt-qos".into(), Bytes::from_static(b"1")),
            ("n".into(), Bytes::from(n.to_string())),
        ],
        payload: Bytes::from(payload),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Appends `records`, waits until all are durable, returns their sequence numbers.
async fn append_all(log: &Log, records: impl IntoIterator<Item = Record>) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut pending = Vec::new();
    for r in records {
        pending.push(log.append(&r).expect("append"));
        if pending.len() == 10_000 {
            for s in futures::future::join_all(pending.drain(..)).await {
                seqs.push(s.expect("durable"));
            }
        }
    }
    for s in futures::future::join_all(pending).await {
        seqs.push(s.expect("durable"));
    }
    seqs
}

/// The forwarder as this gateway, with a 10 s drain at shutdown.
fn start(log: &Log, dead: &Log, cfg: &KafkaConfig) -> Forwarding {
    common::forwarder::forward(log, dead, cfg, GATEWAY, Duration::from_secs(10))
}

/// Creates a topic with per-topic settings (the fixture's `create_topic` has none).
async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> =
        common::client_config().create().expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
    // Wait for leaders, as the fixture does.
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || common::create_topic(&name, partitions))
        .await
        .expect("wait for leaders");
}

fn header<'a>(c: &'a common::Consumed, key: &str) -> &'a str {
    std::str::from_utf8(
        c.header(key)
            .unwrap_or_else(|| panic!("header {key} missing: {c:?}")),
    )
    .expect("utf-8 header")
}

/// The sequence number in `edgegate-record-id`.
fn seq_of(c: &common::Consumed) -> u64 {
    let id = header(c, "edgegate-record-id");
    let (gw, seq) = id.rsplit_once(':').expect("<gateway>:<seq>");
    assert_eq!(gw, GATEWAY);
    seq.parse().expect("numeric seq")
}

/// Per key, the first copy of every record must come in sequence order (re-sends after a
/// crash may repeat records; a consumer drops those by record id).
fn assert_per_key_order(records: &[common::Consumed]) {
    let mut last: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (_, partition) in common::by_partition(records) {
        for c in partition {
            let seq = seq_of(c);
            if !seen.insert(seq) {
                continue;
            }
            let key = c.key.clone().expect("key");
            if let Some(prev) = last.insert(key.clone(), seq) {
                assert!(
                    prev < seq,
                    "key {:?}: seq {seq} after {prev}",
                    String::from_utf8_lossy(&key)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_10k_records_with_headers_keys_and_order() {
    let _kafka = common::shared();
    let topic = common::unique_topic("fwd-drain");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || common::create_topic(&t, 3))
        .await
        .expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, dead) = open_logs(dir.path(), Durability::Fsync).await;
    let sent: Vec<Record> = (0..10_000).map(|n| record(&topic, n, 100)).collect();
    let seqs = append_all(&log, sent.clone()).await;
    let by_seq: BTreeMap<u64, &Record> = seqs.iter().copied().zip(sent.iter()).collect();

    let running = start(&log, &dead, &kafka_config());
    running
        .delivered_at_least(10_000, Duration::from_secs(120))
        .await;
    let got = common::consume_all(&topic, 10_000, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 10_000, "every record exactly once");
    for c in &got {
        let seq = seq_of(c);
        let r = by_seq[&seq];
        assert_eq!(c.key.as_deref(), r.key.as_deref());
        assert_eq!(c.payload.as_deref(), Some(&r.payload[..]));
        assert_eq!(c.timestamp_ms, Some(r.received_ms));
        let names: Vec<&str> = c.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "edgegate-record-id",
                "edgegate-source",
                "edgegate-device",
                "edgegate-origin",
                "edgegate-received-ms",
                "mqtt-qos",
                "n"
            ]
        );
        assert_eq!(
            header(c, "edgegate-source"),
            if r.source == Source::Mqtt {
                "mqtt"
            } else {
                "coap"
            }
        );
        assert_eq!(header(c, "edgegate-device"), r.device);
        assert_eq!(header(c, "edgegate-origin"), r.origin);
        assert_eq!(header(c, "edgegate-received-ms"), r.received_ms.to_string());
        assert_eq!(c.header("n"), Some(&r.headers[1].1[..]));
    }
    assert_per_key_order(&got);
    assert_eq!(*running.link.borrow(), LinkState::Up);
    running.stop().await;
    let last = *seqs.last().expect("records");
    assert!(
        log.stats().head_seq > last,
        "every delivered record was acknowledged in the log"
    );
    log.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_topic_goes_to_the_dead_letter_log() {
    let _kafka = common::shared();
    let topic = common::unique_topic("fwd-large");
    create_topic_with(&topic, 1, &[("max.message.bytes", "4096")]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, dead) = open_logs(dir.path(), Durability::Fsync).await;
    let mut records: Vec<Record> = (0..300).map(|n| record(&topic, n, 100)).collect();
    records[150] = record(&topic, 150, 20_000);
    let seqs = append_all(&log, records).await;
    let big_seq = seqs[150];

    // Batches stay under the topic's limit, as the config documentation asks.
    let cfg = KafkaConfig {
        batch_max_bytes: edgegate::config::ByteSize(4096),
        ..kafka_config()
    };
    let running = start(&log, &dead, &cfg);
    running
        .delivered_at_least(300, Duration::from_secs(120))
        .await;
    assert_eq!(running.progress.borrow().dead_lettered, 1);
    let got = common::consume_all(&topic, 299, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 299);
    assert!(got.iter().all(|c| seq_of(c) != big_seq));
    assert_per_key_order(&got);
    running.stop().await;
    assert!(
        log.stats().head_seq > *seqs.last().expect("records"),
        "the dead-lettered record left the main log too"
    );

    let mut dead_reader = dead.reader().expect("dead-letter reader");
    let dl = tokio::time::timeout(Duration::from_secs(5), dead_reader.read_batch(10, 1 << 20))
        .await
        .expect("a dead-letter record")
        .expect("read the dead-letter log");
    assert_eq!(dl.len(), 1);
    let r = &dl[0].record;
    assert_eq!(r.payload.len(), 20_000);
    assert_eq!(r.kafka_topic, topic);
    let headers: HashMap<&str, &Bytes> = r.headers.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(
        headers["edgegate-failed-seq"],
        &Bytes::from(big_seq.to_string())
    );
    let error = String::from_utf8_lossy(headers["edgegate-error"]);
    assert!(error.to_lowercase().contains("too large"), "{error}");
    log.close().await.expect("close");
    dead.close().await.expect("close dead-letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_mid_drain_loses_nothing_and_keeps_order() {
    let kafka = common::exclusive();
    let topic = common::unique_topic("fwd-outage");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || common::create_topic(&t, 3))
        .await
        .expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, dead) = open_logs(dir.path(), Durability::Fsync).await;
    let total = 30_000;
    let mut seqs = append_all(&log, (0..20_000).map(|n| record(&topic, n, 100))).await;

    let mut running = start(&log, &dead, &kafka_config());
    running.delivered_at_least(1, Duration::from_secs(60)).await;
    kafka.stop_broker_async().await;
    // Still accepting while Kafka is away.
    seqs.extend(append_all(&log, (20_000..total).map(|n| record(&topic, n, 100))).await);
    tokio::time::timeout(
        Duration::from_secs(60),
        running.link.wait_for(|s| *s == LinkState::Down),
    )
    .await
    .expect("link reported down")
    .expect("link watch");
    // Nothing is delivered while the broker is down, so the head must not move.
    let head = log.stats().head_seq;
    let delivered = running.progress.borrow().delivered;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(running.progress.borrow().delivered, delivered);
    assert_eq!(log.stats().head_seq, head, "the head moved without Kafka");
    assert!(delivered < total);

    kafka.start_broker_async().await;
    running
        .delivered_at_least(total, Duration::from_secs(180))
        .await;
    tokio::time::timeout(
        Duration::from_secs(30),
        running.link.wait_for(|s| *s == LinkState::Up),
    )
    .await
    .expect("link reported up")
    .expect("link watch");
    let got = common::consume_all(&topic, total as usize, Duration::from_secs(120)).await;
    let distinct: std::collections::BTreeSet<u64> = got.iter().map(seq_of).collect();
    let missing: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| !distinct.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {total} records missing in {topic} (first {:?}, last {:?}); progress {:?}",
        missing.len(),
        missing.first(),
        missing.last(),
        *running.progress.borrow()
    );
    assert_per_key_order(&got);
    eprintln!(
        "outage: {} records read back, {} distinct",
        got.len(),
        distinct.len()
    );
    running.stop().await;
    log.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_killed_mid_drain_resends_with_the_same_record_ids() {
    let _kafka = common::shared();
    let topic = common::unique_topic("fwd-restart");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || common::create_topic(&t, 3))
        .await
        .expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let total = 50_000u64;
    let (log, dead) = open_logs(dir.path(), Durability::Fsync).await;
    let sent: Vec<Record> = (0..total).map(|n| record(&topic, n, 100)).collect();
    let seqs = append_all(&log, sent.clone()).await;
    let by_seq: BTreeMap<u64, &Record> = seqs.iter().copied().zip(sent.iter()).collect();

    // Slowed down (long linger, small window) so the kill lands mid-drain.
    let slow = KafkaConfig {
        linger: edgegate::config::Duration::from_millis(200),
        max_in_flight_records: 500,
        ..kafka_config()
    };
    let first = start(&log, &dead, &slow);
    first
        .delivered_at_least(5_000, Duration::from_secs(60))
        .await;
    // No graceful close: the task is dropped where it stands, in-flight records and all.
    first.task.abort();
    let _ = first.task.await;
    let head = log.stats().head_seq;
    log.close().await.expect("close");
    dead.close().await.expect("close dead-letter");
    assert!(
        head < seqs[seqs.len() - 1],
        "killed before the end of the drain"
    );

    let (log, dead) = open_logs(dir.path(), Durability::Fsync).await;
    let second = start(&log, &dead, &kafka_config());
    let remaining = total - (head - seqs[0]);
    second
        .delivered_at_least(remaining, Duration::from_secs(120))
        .await;
    let got = common::consume_all(&topic, total as usize, Duration::from_secs(120)).await;
    let mut copies: BTreeMap<u64, Vec<&common::Consumed>> = BTreeMap::new();
    for c in &got {
        copies.entry(seq_of(c)).or_default().push(c);
    }
    assert_eq!(copies.len(), total as usize, "every record arrived");
    for (seq, cs) in &copies {
        for c in cs {
            assert_eq!(
                c.payload.as_deref(),
                Some(&by_seq[seq].payload[..]),
                "a re-send is the same record"
            );
        }
    }
    assert_per_key_order(&got);
    eprintln!(
        "restart: {} records read back for {total}, {} re-sent with the same record id",
        got.len(),
        got.len() - copies.len()
    );
    second.stop().await;
    log.close().await.expect("close");
}

/// `cargo test --release --test forward -- --ignored --nocapture drain_benchmark`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints the drain rate of a 1,000,000-record backlog"]
async fn drain_benchmark() {
    let _kafka = common::shared();
    let n: u64 = std::env::var("EDGEGATE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let topic = common::unique_topic("fwd-bench");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || common::create_topic(&t, 3))
        .await
        .expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, dead) = open_logs(dir.path(), Durability::Fsync).await;
    let started = Instant::now();
    append_all(&log, (0..n).map(|i| record(&topic, i, 100))).await;
    eprintln!("backlog of {n} records written in {:?}", started.elapsed());

    // Peak RSS from here on is the drain's (Linux: "5" resets VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss("VmRSS:");
    let started = Instant::now();
    let mut cfg = kafka_config();
    if let Some(window) = std::env::var("EDGEGATE_BENCH_WINDOW")
        .ok()
        .and_then(|v| edgegate::config::parse_size(&v).ok())
    {
        cfg.max_in_flight_bytes = edgegate::config::ByteSize(window);
    }
    if let Some(batch) = std::env::var("EDGEGATE_BENCH_BATCH")
        .ok()
        .and_then(|v| edgegate::config::parse_size(&v).ok())
    {
        cfg.batch_max_bytes = edgegate::config::ByteSize(batch);
    }
    let running = start(&log, &dead, &cfg);
    running
        .delivered_at_least(n, Duration::from_secs(1800))
        .await;
    let took = started.elapsed();
    eprintln!(
        "drained {n} records (100-byte payloads) in {took:?}: {:.0} records/s; RSS {before} before the drain, peak {} during it",
        n as f64 / took.as_secs_f64(),
        rss("VmHWM:")
    );
    running.stop().await;
    log.close().await.expect("close");
}

fn rss(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .map(|l| l.trim_start_matches(field).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
