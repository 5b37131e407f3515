//! The MQTT listener end to end, without Kafka: the real server on 127.0.0.1:0 over a real
//! log in a temporary directory, driven by real clients (`mosquitto_pub` 3.1.1 and 5,
//! rumqttc v4 and v5) and by a raw socket for what well-behaved clients never send. Records
//! are read back from the log.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use edgegate::buffer::{Log, LogConfig, LogReader, Overflow, Pressure, StoredRecord};
use edgegate::config::Problems;
use edgegate::ingest::Pipeline;
use edgegate::ingest::mqtt::config::MqttConfig;
use edgegate::route::{RouteConfig, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Long enough for anything that should happen; tests fail rather than hang.
const PATIENCE: Duration = Duration::from_secs(10);

/// The MQTT listener alone over a log, no forwarder: the test reads the log itself, which a
/// whole gateway (`common::gateway`) would not let it do.
struct Listener {
    addr: SocketAddr,
    log: Log,
    reader: LogReader,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The log's next sequence number at start, to count what was appended since.
    first_seq: u64,
    _dir: tempfile::TempDir,
}

/// Starts the listener with one route, `dev/#` → Kafka topic `telemetry`; anything else has
/// no route.
async fn start(mqtt: MqttConfig, tune: impl FnOnce(&mut LogConfig)) -> Listener {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log_config = LogConfig::new(dir.path().join("log"));
    log_config.commit_delay = Duration::from_millis(1);
    tune(&mut log_config);
    let (log, _) = tokio::task::spawn_blocking(move || Log::open(log_config))
        .await
        .expect("join")
        .expect("open the log");
    let mut problems = Problems::default();
    let routes = [RouteConfig {
        filter: "dev/#".into(),
        topic: "telemetry".into(),
        key: None,
        ..Default::default()
    }];
    let router = Router::new(&routes, None, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let pipeline = Pipeline::new(log.clone(), router);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(edgegate::ingest::mqtt::serve(
        listener,
        Arc::new(mqtt),
        pipeline,
        shutdown.clone(),
    ));
    let reader = log.reader().expect("the reader");
    let first_seq = log.stats().next_seq;
    Listener {
        first_seq,
        addr,
        log,
        reader,
        shutdown,
        served,
        _dir: dir,
    }
}

async fn start_default() -> Listener {
    start(MqttConfig::default(), |_| {}).await
}

impl Listener {
    /// Reads exactly `n` records, failing after `PATIENCE`.
    async fn records(&mut self, n: usize) -> Vec<StoredRecord> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch =
                tokio::time::timeout(PATIENCE, self.reader.read_batch(n - out.len(), 1 << 30))
                    .await
                    .unwrap_or_else(|_| panic!("only {} of {n} records arrived", out.len()))
                    .expect("read the log");
            for r in &batch {
                self.reader.ack(r.seq);
            }
            out.extend(batch);
        }
        out
    }

    /// Records appended so far (durable or not).
    fn appended(&self) -> u64 {
        self.log.stats().next_seq - self.first_seq
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.served)
            .await
            .expect("serve drains in time")
            .expect("join")
            .expect("serve");
        self.log.close().await.expect("close the log");
    }
}

fn header<'a>(record: &'a StoredRecord, name: &str) -> Option<&'a [u8]> {
    record
        .record
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_ref())
}

fn payloads(records: &[StoredRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.record.payload).into_owned())
        .collect()
}

// ---- raw MQTT, for what well-behaved clients never send ---------------------------------

/// A CONNECT: `level` 4 or 5, clean start, optional will (topic, payload, QoS 1).
fn connect(level: u8, client_id: &str, keep_alive: u16, will: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = Vec::new();
    common::mqtt_string(&mut body, b"MQTT");
    body.push(level);
    body.push(0x02 | if will.is_some() { 0x04 | 0x08 } else { 0 });
    body.put_u16(keep_alive);
    if level == 5 {
        body.push(0);
    }
    common::mqtt_string(&mut body, client_id.as_bytes());
    if let Some((topic, payload)) = will {
        if level == 5 {
            body.push(0);
        }
        common::mqtt_string(&mut body, topic.as_bytes());
        common::mqtt_string(&mut body, payload.as_bytes());
    }
    common::mqtt_frame(0x10, &body)
}

fn publish(level: u8, qos: u8, dup: bool, pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    common::mqtt_string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.put_u16(pkid);
    }
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    common::mqtt_frame(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &body)
}

struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn open(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    /// Connects and checks the CONNACK says success.
    async fn connected(addr: SocketAddr, level: u8, client_id: &str) -> Raw {
        let mut raw = Raw::open(addr).await;
        raw.send(&connect(level, client_id, 60, None)).await;
        let (byte1, body) = raw.recv().await.expect("CONNACK");
        assert_eq!(byte1, 0x20);
        assert_eq!(body.get(1), Some(&0), "CONNACK code");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next packet as (first byte, body), or `None` once the server closed.
    async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(PATIENCE, self.recv_inner())
            .await
            .expect("the server answers or closes in time")
    }

    async fn recv_inner(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let mut len = 0usize;
                let mut i = 1;
                let complete = loop {
                    let Some(&b) = self.buf.get(i) else {
                        break None;
                    };
                    len |= usize::from(b & 0x7f) << (7 * (i - 1));
                    i += 1;
                    if b & 0x80 == 0 {
                        break Some((i, len));
                    }
                };
                if let Some((header, len)) = complete {
                    if self.buf.len() >= header + len {
                        let packet = self.buf.split_to(header + len);
                        return Some((packet[0], packet[header..].to_vec()));
                    }
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Packets until the server closes the connection.
    async fn until_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut packets = Vec::new();
        while let Some(p) = self.recv().await {
            packets.push(p);
        }
        packets
    }
}

// ---- real clients (common::mosquitto_pub, common::rumqttc) -------------------------------

/// What one client publishes: `<prefix>-0` ... `<prefix>-<n - 1>`.
fn lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

// ---- tests --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_and_qos_is_stored_exactly_once_with_its_headers() {
    let mut gw = start_default().await;
    let mut expected: HashMap<String, (u8, &str)> = HashMap::new();
    let mut jobs = Vec::new();
    for qos in 0..=2u8 {
        for (client, version) in [("mosq311", "mqttv311"), ("mosq5", "mqttv5")] {
            let batch = lines(&format!("{client}-q{qos}"), 20);
            for l in &batch {
                expected.insert(l.clone(), (qos, client));
            }
            let extra: &[&str] = if version == "mqttv5" {
                &[
                    "-D",
                    "publish",
                    "content-type",
                    "text/plain",
                    "-D",
                    "publish",
                    "user-property",
                    "site",
                    "north",
                ]
            } else {
                &[]
            };
            let addr = gw.addr;
            let id = format!("{client}-q{qos}");
            jobs.push(tokio::task::spawn_blocking(move || {
                let out = common::mosquitto_pub(addr)
                    .v5(version == "mqttv5")
                    .qos(qos)
                    .id(&id)
                    .topic(&format!("dev/{id}"))
                    .args(extra)
                    .timeout(PATIENCE)
                    .lines(&batch);
                assert!(
                    out.status.success(),
                    "mosquitto_pub: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }));
        }
        for client in ["rumq4", "rumq5"] {
            let batch = lines(&format!("{client}-q{qos}"), 20);
            for l in &batch {
                expected.insert(l.clone(), (qos, client));
            }
            let addr = gw.addr;
            let id = format!("{client}-q{qos}");
            jobs.push(tokio::spawn(async move {
                let n = batch.len();
                let payloads = batch.into_iter().map(String::into_bytes).collect();
                // The properties (a content type, two user properties) go with MQTT 5 only.
                let acked = common::rumqttc(addr, &id)
                    .v5(client == "rumq5")
                    .qos(qos)
                    .properties("text/plain", &[("site", "north"), ("line", "7")])
                    .publish(&format!("dev/{id}"), payloads)
                    .await;
                assert_eq!(acked.len(), n, "{client}: every publish acknowledged");
            }));
        }
    }
    for job in jobs {
        job.await.expect("client");
    }
    let records = gw.records(expected.len()).await;
    let mut seen = HashMap::new();
    for record in &records {
        let payload = String::from_utf8_lossy(&record.record.payload).into_owned();
        let (qos, client) = *expected
            .get(&payload)
            .unwrap_or_else(|| panic!("unexpected record {payload}"));
        assert!(
            seen.insert(payload.clone(), record.seq).is_none(),
            "{payload} stored twice"
        );
        let r = &record.record;
        assert_eq!(r.kafka_topic, "telemetry");
        assert_eq!(r.device, format!("{client}-q{qos}"));
        assert_eq!(r.origin, format!("dev/{client}-q{qos}"));
        assert_eq!(
            header(record, "mqtt-qos"),
            Some(qos.to_string().as_bytes()),
            "{payload}"
        );
        assert_eq!(header(record, "edgegate-will"), None);
        match client {
            "mosq5" => {
                assert_eq!(header(record, "content-type"), Some(&b"text/plain"[..]));
                assert_eq!(header(record, "site"), Some(&b"north"[..]));
            }
            "rumq5" => {
                let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(names, ["mqtt-qos", "content-type", "site", "line"]);
            }
            _ => assert_eq!(r.headers.len(), 1, "{:?}", r.headers),
        }
    }
    // Nothing beyond what was sent.
    assert_eq!(gw.appended(), expected.len() as u64);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_and_pubrec_come_after_an_fsync() {
    // The log commits as soon as appends pause, so timing cannot show the order; the fsync
    // counter can: it must have moved, and the record must be readable (the reader sees only
    // durable records), by the time the ack arrives.
    let mut gw = start_default().await;
    for (level, qos, ack) in [(4, 1, 0x40), (5, 1, 0x40), (4, 2, 0x50), (5, 2, 0x50)] {
        let mut raw = Raw::connected(gw.addr, level, &format!("durable-{level}")).await;
        let fsyncs = gw.log.stats().fsyncs;
        raw.send(&publish(level, qos, false, 1, "dev/durable", b"durable"))
            .await;
        let (byte1, body) = raw.recv().await.expect("ack");
        assert_eq!((byte1, &body[..2]), (ack, &[0, 1][..]));
        assert!(gw.log.stats().fsyncs > fsyncs, "acked before any fsync");
        let records = gw.records(1).await;
        assert_eq!(payloads(&records), ["durable"]);
    }
    gw.stop().await;
}

/// A rumqttc client that keeps publishing QoS 1 while bad clients come and go, counting its
/// acknowledged publishes in `acked`; it panics if its connection ends.
fn bystander(
    addr: SocketAddr,
    stop: CancellationToken,
    acked: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    tokio::spawn(async move {
        let (client, mut events) =
            AsyncClient::new(MqttOptions::new("bystander", "127.0.0.1", addr.port()), 10);
        // Connected before anything else can cancel a poll: rumqttc's poll is not cancel-safe
        // while it connects (a dropped connect's CONNECT can reach the gateway after the next
        // poll's, and take the session over from the live connection).
        match events.poll().await.expect("the bystander connects") {
            Event::Incoming(Packet::ConnAck(_)) => {}
            other => panic!("the bystander's first event is {other:?}"),
        }
        let mut sent = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                event = events.poll() => {
                    let event = event.expect("the bystander is never disconnected");
                    if let Event::Incoming(Packet::PubAck(_)) = event {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(5)), if sent - acked.load(Ordering::Relaxed) < 5 => {
                    client.publish("dev/bystander", QoS::AtLeastOnce, false, format!("b{sent}")).await.expect("publish");
                    sent += 1;
                }
            }
        }
    })
}

/// Waits until `acked` has grown by `more` (a live connection does within seconds even on a
/// loaded machine).
async fn more_acks(acked: &AtomicUsize, more: usize) {
    let from = acked.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < from + more {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bystander's publishes stopped being acknowledged at {}",
            acked.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_ends_only_its_own_connection() {
    let config = MqttConfig {
        connect_timeout: edgegate::config::Duration::from_millis(300),
        max_packet_size: edgegate::config::ByteSize::kib(4),
        ..MqttConfig::default()
    };
    let gw = start(config, |_| {}).await;
    let stop = CancellationToken::new();
    let acked = Arc::new(AtomicUsize::new(0));
    let bystander = bystander(gw.addr, stop.clone(), acked.clone());
    // Served before the bad clients come, and after they went.
    more_acks(&acked, 5).await;

    // Garbage bytes: closed without a word.
    let mut raw = Raw::open(gw.addr).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(raw.until_closed().await.is_empty());

    // A truncated CONNECT: closed after the connect timeout.
    let mut raw = Raw::open(gw.addr).await;
    let started = tokio::time::Instant::now();
    raw.send(&connect(4, "half", 60, None)[..8]).await;
    assert!(raw.until_closed().await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Oversize publish: MQTT 5 hears 0x95; 3.1.1 is just closed.
    let mut raw = Raw::connected(gw.addr, 5, "big5").await;
    raw.send(&publish(5, 1, false, 1, "dev/big", &[0u8; 8192]))
        .await;
    assert_eq!(raw.until_closed().await, [(0xe0, vec![0x95, 0])]);
    let mut raw = Raw::connected(gw.addr, 4, "big4").await;
    raw.send(&publish(4, 1, false, 1, "dev/big", &[0u8; 8192]))
        .await;
    assert!(raw.until_closed().await.is_empty());

    // A wildcard publish topic: MQTT 5 hears 0x90 (Topic Name invalid).
    let mut raw = Raw::connected(gw.addr, 5, "wild5").await;
    raw.send(&publish(5, 1, false, 1, "a/+/b", b"x")).await;
    assert_eq!(raw.until_closed().await, [(0xe0, vec![0x90, 0])]);
    let mut raw = Raw::connected(gw.addr, 4, "wild4").await;
    raw.send(&publish(4, 0, false, 0, "a/#", b"x")).await;
    assert!(raw.until_closed().await.is_empty());

    // Unknown protocol levels, and MQTT 3.1: a 3.1.1-format CONNACK 0x01 (as mosquitto).
    let mut raw = Raw::open(gw.addr).await;
    raw.send(&connect(7, "future", 60, None)).await;
    assert_eq!(raw.until_closed().await, [(0x20, vec![0, 0x01])]);
    let mut raw = Raw::open(gw.addr).await;
    let mut body = Vec::new();
    common::mqtt_string(&mut body, b"MQIsdp");
    body.extend_from_slice(&[3, 0x02, 0, 60]);
    common::mqtt_string(&mut body, b"old");
    raw.send(&common::mqtt_frame(0x10, &body)).await;
    assert_eq!(raw.until_closed().await, [(0x20, vec![0, 0x01])]);

    // A malformed packet after CONNECT: MQTT 5 hears 0x81.
    let mut raw = Raw::connected(gw.addr, 5, "mal5").await;
    raw.send(&common::mqtt_frame(0x62, &[0, 1, 0x00, 9, 1]))
        .await; // PUBREL with an overrunning property
    assert_eq!(raw.until_closed().await, [(0xe0, vec![0x81, 0])]);

    more_acks(&acked, 10).await;
    stop.cancel();
    bystander.await.expect("the bystander kept its connection");
    gw.stop().await;
}

#[tokio::test]
async fn takeover_second_connect_and_keepalive() {
    let gw = start_default().await;
    // Takeover: the first connection hears 0x8E.
    let mut first = Raw::connected(gw.addr, 5, "same").await;
    let mut second = Raw::connected(gw.addr, 5, "same").await;
    assert_eq!(first.until_closed().await, [(0xe0, vec![0x8e, 0])]);
    // 3.1.1 takeover: just closed.
    let mut first4 = Raw::connected(gw.addr, 4, "same4").await;
    let _second4 = Raw::connected(gw.addr, 4, "same4").await;
    assert!(first4.until_closed().await.is_empty());
    // A second CONNECT on one connection: protocol error.
    second.send(&connect(5, "same", 60, None)).await;
    assert_eq!(second.until_closed().await, [(0xe0, vec![0x82, 0])]);
    // Keepalive of 1 s: closed with 0x8D after 1.5 s of silence, not before.
    let mut idle = Raw::open(gw.addr).await;
    idle.send(&connect(5, "idle", 1, None)).await;
    assert_eq!(idle.recv().await.map(|p| p.0), Some(0x20));
    let started = tokio::time::Instant::now();
    // PINGREQ keeps it alive for a while.
    tokio::time::sleep(Duration::from_millis(800)).await;
    idle.send(&[0xc0, 0x00]).await;
    assert_eq!(idle.recv().await, Some((0xd0, vec![])));
    assert_eq!(idle.until_closed().await, [(0xe0, vec![0x8d, 0])]);
    assert!(
        started.elapsed() >= Duration::from_millis(2200),
        "{:?}",
        started.elapsed()
    );
    gw.stop().await;
}

#[tokio::test]
async fn will_is_stored_when_a_connection_dies_without_disconnect() {
    let mut gw = start_default().await;
    // Dies abruptly: the will is stored.
    let mut raw = Raw::open(gw.addr).await;
    raw.send(&connect(
        4,
        "mortal",
        60,
        Some(("dev/mortal/status", "gone")),
    ))
    .await;
    assert_eq!(raw.recv().await.map(|p| p.0), Some(0x20));
    drop(raw);
    let records = gw.records(1).await;
    let will = &records[0];
    assert_eq!(payloads(&records), ["gone"]);
    assert_eq!(will.record.origin, "dev/mortal/status");
    assert_eq!(will.record.device, "mortal");
    assert_eq!(header(will, "edgegate-will"), Some(&b"true"[..]));
    assert_eq!(header(will, "mqtt-qos"), Some(&b"1"[..]));
    // A normal DISCONNECT discards it; MQTT 5's 0x04 asks for it.
    for (level, disconnect, stored) in [
        (4, vec![0xe0, 0], false),
        (5, vec![0xe0, 0], false),
        (5, vec![0xe0, 1, 0x04], true),
    ] {
        let mut raw = Raw::open(gw.addr).await;
        raw.send(&connect(level, "polite", 60, Some(("dev/polite", "will"))))
            .await;
        assert_eq!(raw.recv().await.map(|p| p.0), Some(0x20));
        raw.send(&publish(level, 1, false, 1, "dev/polite", b"last"))
            .await;
        assert_eq!(raw.recv().await.map(|p| p.0), Some(0x40));
        raw.send(&disconnect).await;
        assert!(raw.until_closed().await.is_empty());
        // A marker after it, so "no will" is not just "not yet".
        let mut marker = Raw::connected(gw.addr, 4, "marker").await;
        marker
            .send(&publish(4, 1, false, 1, "dev/marker", b"marker"))
            .await;
        assert_eq!(marker.recv().await.map(|p| p.0), Some(0x40));
        let got = payloads(&gw.records(if stored { 3 } else { 2 }).await);
        let mut want = vec!["last", "marker"];
        if stored {
            want.insert(1, "will");
        }
        let mut got_sorted = got.clone();
        got_sorted.sort();
        want.sort();
        assert_eq!(got_sorted, want, "level {level}, {disconnect:?}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn qos2_retransmission_is_stored_once() {
    let mut gw = start_default().await;
    for level in [4, 5] {
        let mut raw = Raw::connected(gw.addr, level, &format!("exactly-{level}")).await;
        raw.send(&publish(level, 2, false, 7, "dev/once", b"once"))
            .await;
        assert_eq!(
            raw.recv().await.map(|p| (p.0, p.1[..2].to_vec())),
            Some((0x50, vec![0, 7]))
        );
        // The PUBREC was "lost": the client resends with DUP.
        raw.send(&publish(level, 2, true, 7, "dev/once", b"once"))
            .await;
        assert_eq!(
            raw.recv().await.map(|p| (p.0, p.1[..2].to_vec())),
            Some((0x50, vec![0, 7]))
        );
        raw.send(&[0x62, 0x02, 0, 7]).await;
        assert_eq!(
            raw.recv().await.map(|p| (p.0, p.1[..2].to_vec())),
            Some((0x70, vec![0, 7]))
        );
        assert_eq!(payloads(&gw.records(1).await), ["once"]);
    }
    assert_eq!(gw.appended(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn unroutable_topic_gets_0x90_on_v5_and_a_disconnect_on_311() {
    let mut gw = start_default().await;
    let mut raw = Raw::connected(gw.addr, 5, "lost5").await;
    raw.send(&publish(5, 1, false, 3, "nowhere/x", b"x")).await;
    assert_eq!(raw.recv().await, Some((0x40, vec![0, 3, 0x90, 0])));
    // The connection stays usable.
    raw.send(&publish(5, 1, false, 4, "dev/x", b"fine")).await;
    assert_eq!(raw.recv().await, Some((0x40, vec![0, 4])));
    let mut raw4 = Raw::connected(gw.addr, 4, "lost4").await;
    raw4.send(&publish(4, 1, false, 3, "nowhere/x", b"x")).await;
    assert!(raw4.until_closed().await.is_empty());
    assert_eq!(payloads(&gw.records(1).await), ["fine"]);
    gw.stop().await;
}

#[tokio::test]
async fn log_full_gets_0x97_on_v5_and_a_disconnect_on_311() {
    let mut gw = start(MqttConfig::default(), |c| {
        // Default watermarks: above the high one the connection is throttled, not frozen,
        // so a device that keeps publishing still reaches "full" and hears why.
        c.overflow = Overflow::RejectNew;
        c.segment_bytes = 64 * 1024;
        c.max_bytes = 128 * 1024;
    })
    .await;
    let payload = vec![b'x'; 4000];
    let mut raw = Raw::connected(gw.addr, 5, "filler").await;
    let mut stored = 0;
    let mut full = false;
    for pkid in 1..=200u16 {
        raw.send(&publish(5, 1, false, pkid, "dev/fill", &payload))
            .await;
        let (byte1, body) = raw.recv().await.expect("PUBACK");
        assert_eq!(byte1, 0x40);
        match body.get(2) {
            None | Some(0) => stored += 1,
            Some(0x97) => {
                full = true;
                break;
            }
            Some(other) => panic!("unexpected reason {other:#x}"),
        }
    }
    assert!(full, "the log never filled ({stored} stored)");
    let mut raw4 = Raw::connected(gw.addr, 4, "filler4").await;
    raw4.send(&publish(4, 1, false, 1, "dev/fill", &payload))
        .await;
    assert!(raw4.until_closed().await.is_empty());
    assert_eq!(gw.records(stored).await.len(), stored);
    gw.stop().await;
}

#[tokio::test]
async fn limits_max_connections_and_receive_maximum() {
    let config = MqttConfig {
        max_connections: 2,
        receive_maximum: 2,
        ..MqttConfig::default()
    };
    let gw = start(config, |_| {}).await;
    let _a = Raw::connected(gw.addr, 4, "a").await;
    let mut b = Raw::connected(gw.addr, 5, "b").await;
    let mut c = Raw::open(gw.addr).await;
    c.send(&connect(5, "c", 60, None)).await;
    assert_eq!(c.until_closed().await, [(0x20, vec![0, 0x89, 0])]);
    let mut d = Raw::open(gw.addr).await;
    d.send(&connect(4, "d", 60, None)).await;
    assert_eq!(d.until_closed().await, [(0x20, vec![0, 0x03])]);
    // Three QoS 1 publishes in one segment: the third arrives while the first two are still
    // being stored (a commit takes at least an fsync) and exceeds receive maximum 2.
    let burst: Vec<u8> = (1..=3)
        .flat_map(|pkid| publish(5, 1, false, pkid, "dev/b", b"x"))
        .collect();
    b.send(&burst).await;
    let packets = b.until_closed().await;
    assert_eq!(packets.last(), Some(&(0xe0, vec![0x93, 0])), "{packets:?}");
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_acks_pending_appends_then_says_goodbye() {
    let gw = start_default().await;
    let mut raw = Raw::connected(gw.addr, 5, "leaving").await;
    raw.send(&publish(5, 1, false, 1, "dev/leaving", b"x"))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.shutdown.cancel();
    let packets = raw.until_closed().await;
    assert_eq!(packets, [(0x40, vec![0, 1]), (0xe0, vec![0x8b, 0])]);
    gw.stop().await;
}

#[tokio::test]
async fn client_ids_are_assigned_or_refused_per_spec() {
    let gw = start_default().await;
    let mut raw = Raw::open(gw.addr).await;
    raw.send(&connect(5, "", 60, None)).await;
    let (byte1, body) = raw.recv().await.expect("CONNACK");
    assert_eq!((byte1, body[1]), (0x20, 0));
    // Assigned Client Identifier (0x12) is among the properties.
    let needle = b"edgegate-";
    assert!(body.windows(needle.len()).any(|w| w == needle), "{body:?}");
    let mut raw = Raw::open(gw.addr).await;
    let mut bytes = connect(4, "", 60, None);
    bytes[9] = 0x00; // clear clean session
    raw.send(&bytes).await;
    assert_eq!(raw.until_closed().await, [(0x20, vec![0, 0x02])]);
    // Over max_client_id_len (128): 0x85, or 0x02 on 3.1.1.
    let long = "x".repeat(200);
    for (level, answer) in [(5, vec![0, 0x85, 0]), (4, vec![0, 0x02])] {
        let mut raw = Raw::open(gw.addr).await;
        raw.send(&connect(level, &long, 60, None)).await;
        assert_eq!(raw.until_closed().await, [(0x20, answer)]);
    }
    // Enhanced authentication is not offered: 0x8C.
    let mut body = Vec::new();
    common::mqtt_string(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 60]);
    body.push(8);
    body.push(0x15);
    common::mqtt_string(&mut body, b"SCRAM");
    common::mqtt_string(&mut body, b"authn");
    let mut raw = Raw::open(gw.addr).await;
    raw.send(&common::mqtt_frame(0x10, &body)).await;
    assert_eq!(raw.until_closed().await, [(0x20, vec![0, 0x8c, 0])]);
    gw.stop().await;
}

#[tokio::test]
async fn v311_password_without_user_name_is_closed_without_connack_mqtt_3_1_2_22() {
    // 3.1.1 [MQTT-3.1.2-22]: the password flag needs the user name flag. Such a CONNECT used
    // to reach authentication and hear 0x04; it is malformed, so it is closed unanswered.
    let gw = start_default().await;
    let password_only = |level: u8| {
        let mut body = Vec::new();
        common::mqtt_string(&mut body, b"MQTT");
        body.extend_from_slice(&[level, 0x42, 0, 60]);
        if level == 5 {
            body.push(0);
        }
        common::mqtt_string(&mut body, b"pw-only");
        common::mqtt_string(&mut body, b"secret");
        common::mqtt_frame(0x10, &body)
    };
    let mut raw = Raw::open(gw.addr).await;
    raw.send(&password_only(4)).await;
    assert_eq!(raw.until_closed().await, []);
    // MQTT 5 allows a password alone (3.1.2.9): it reaches authentication, which refuses it.
    let mut raw = Raw::open(gw.addr).await;
    raw.send(&password_only(5)).await;
    assert_eq!(raw.until_closed().await, [(0x20, vec![0, 0x86, 0])]);
    gw.stop().await;
}

/// SUBSCRIBE and UNSUBSCRIBE on raw packets: the MQTT 5 CONNACK offers what the broker
/// supports (3.2.2.3), SUBACK carries one code per filter in order [MQTT-3.8.4-6] (0x8F /
/// 0x80 for an invalid one, the rest still granted [MQTT-3.9.3-1]), UNSUBACK says which
/// subscriptions existed (MQTT 5 3.11.3), and an ack for nothing in flight is ignored.
#[tokio::test]
async fn subscribe_and_unsubscribe_answer_per_filter() {
    use rumqttc::v5::mqttbytes::v5 as c5;
    let gw = start_default().await;
    let subscribe = |level: u8| {
        let mut body = vec![0, 7];
        if level == 5 {
            body.push(0);
        }
        for (filter, qos) in [(&b"a/#"[..], 1), (b"b", 2), (b"c/#/d", 1)] {
            common::mqtt_string(&mut body, filter);
            body.push(qos);
        }
        common::mqtt_frame(0x82, &body)
    };
    let unsubscribe = |level: u8| {
        let mut body = vec![0, 8];
        if level == 5 {
            body.push(0);
        }
        common::mqtt_string(&mut body, b"a/#");
        common::mqtt_string(&mut body, b"b");
        common::mqtt_frame(0xa2, &body)
    };

    let mut raw = Raw::open(gw.addr).await;
    raw.send(&connect(5, "sub5", 60, None)).await;
    let (byte1, body) = raw.recv().await.expect("CONNACK");
    let mut framed = BytesMut::from(&common::mqtt_frame(byte1, &body)[..]);
    match c5::Packet::read(&mut framed, None) {
        Ok(c5::Packet::ConnAck(c)) => {
            assert_eq!(c.code, c5::ConnectReturnCode::Success);
            let p = c.properties.expect("properties");
            assert_eq!(p.wildcard_subscription_available, Some(1));
            assert_eq!(p.shared_subscription_available, Some(1));
            assert_eq!(p.subscription_identifiers_available, Some(1));
            assert_eq!(p.retain_available, Some(1));
        }
        other => panic!("{other:?}"),
    }
    raw.send(&subscribe(5)).await;
    assert_eq!(raw.recv().await, Some((0x90, vec![0, 7, 0, 1, 2, 0x8f])));
    raw.send(&unsubscribe(5)).await;
    assert_eq!(raw.recv().await, Some((0xb0, vec![0, 8, 0, 0x00, 0x00])));
    raw.send(&unsubscribe(5)).await;
    assert_eq!(raw.recv().await, Some((0xb0, vec![0, 8, 0, 0x11, 0x11])));
    // A PUBACK for nothing in flight (a resumed session's client may send one): ignored.
    raw.send(&[0x40, 2, 0, 1]).await;
    raw.send(&[0xc0, 0]).await;
    assert_eq!(raw.recv().await, Some((0xd0, vec![])));

    // 3.1.1: granted QoS, 0x80 for the invalid filter, UNSUBACK without codes.
    let mut raw = Raw::connected(gw.addr, 4, "sub4").await;
    raw.send(&subscribe(4)).await;
    assert_eq!(raw.recv().await, Some((0x90, vec![0, 7, 1, 2, 0x80])));
    raw.send(&unsubscribe(4)).await;
    assert_eq!(raw.recv().await, Some((0xb0, vec![0, 8])));
    raw.send(&[0x50, 2, 0, 1]).await;
    raw.send(&[0xc0, 0]).await;
    assert_eq!(raw.recv().await, Some((0xd0, vec![])));
    gw.stop().await;
}

/// A hostile subscriber: one SUBSCRIBE with 1,000 filters (within the packet limit) gets
/// its first 256 (`max_subscriptions_per_session`) granted and the rest 0x97 Quota exceeded,
/// in order [MQTT-3.8.4-6]; the connection stays usable.
#[tokio::test]
async fn a_huge_filter_list_is_bounded_per_session() {
    let gw = start_default().await;
    let mut raw = Raw::connected(gw.addr, 5, "greedy").await;
    let mut body = vec![0, 9, 0];
    for i in 0..1000 {
        common::mqtt_string(&mut body, format!("f/{i}").as_bytes());
        body.push(1);
    }
    raw.send(&common::mqtt_frame(0x82, &body)).await;
    let (byte1, ack) = raw.recv().await.expect("SUBACK");
    assert_eq!(byte1, 0x90);
    let codes = &ack[3..];
    assert_eq!(codes.len(), 1000);
    assert!(codes[..256].iter().all(|&c| c == 1));
    assert!(codes[256..].iter().all(|&c| c == 0x97));
    raw.send(&[0xc0, 0]).await;
    assert_eq!(raw.recv().await, Some((0xd0, vec![])));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_high_watermark_reads_are_throttled_until_the_log_drains() {
    let mut gw = start(MqttConfig::default(), |c| {
        c.segment_bytes = 32 * 1024;
        c.max_bytes = 1 << 20;
        // High above ~100 KiB, normal again below ~50 KiB.
        c.high_watermark = 0.1;
        c.low_watermark = 0.05;
    })
    .await;
    let mut raw = Raw::connected(gw.addr, 5, "pressed").await;
    let payload = vec![b'p'; 4000];
    let mut acked = 0u16;
    let send = async |raw: &mut Raw, pkid: u16| {
        let sent = std::time::Instant::now();
        raw.send(&publish(5, 1, false, pkid, "dev/pressed", &payload))
            .await;
        let (byte1, body) = raw.recv().await.expect("PUBACK");
        assert_eq!((byte1, body), (0x40, pkid.to_be_bytes().to_vec()));
        sent.elapsed()
    };
    // Below the watermark every publish is read at once; above it, one read per interval.
    let mut slow = 0;
    while slow < 3 {
        acked += 1;
        let took = send(&mut raw, acked).await;
        slow = if took >= Duration::from_millis(150) {
            slow + 1
        } else {
            0
        };
        assert!(acked < 100, "the listener never throttled");
    }
    assert!(acked >= 20, "throttled after only {acked} publishes");
    assert_eq!(*gw.log.pressure().borrow(), Pressure::High);
    // Draining the log (the forwarder's job) deletes acknowledged segments; pressure falls
    // and the connection is read freely again.
    assert_eq!(
        gw.records(usize::from(acked)).await.len(),
        usize::from(acked)
    );
    let mut pressure = gw.log.pressure();
    tokio::time::timeout(PATIENCE, pressure.wait_for(|p| *p == Pressure::Normal))
        .await
        .expect("pressure falls once the log drains")
        .expect("log open");
    send(&mut raw, acked + 1).await;
    gw.stop().await;
}

/// A CONNECT without clean start: 3.1.1 keeps the session until a clean one; MQTT 5 asks
/// for a 60 s session expiry.
fn connect_persistent(level: u8, client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    common::mqtt_string(&mut body, b"MQTT");
    body.extend_from_slice(&[level, 0x00, 0, 60]);
    if level == 5 {
        body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]);
    }
    common::mqtt_string(&mut body, client_id.as_bytes());
    common::mqtt_frame(0x10, &body)
}

#[tokio::test]
async fn qos2_state_survives_a_reconnect_and_a_takeover() {
    let mut gw = start_default().await;
    for level in [4, 5] {
        let id = format!("persistent-{level}");
        let mut first = Raw::open(gw.addr).await;
        first.send(&connect_persistent(level, &id)).await;
        let (byte1, body) = first.recv().await.expect("CONNACK");
        assert_eq!((byte1, body[0], body[1]), (0x20, 0, 0), "no session yet");
        first
            .send(&publish(level, 2, false, 5, "dev/p", b"kept"))
            .await;
        assert_eq!(first.recv().await.map(|p| p.0), Some(0x50));
        // The connection dies before PUBREL; the client reconnects and resends.
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = Raw::open(gw.addr).await;
        second.send(&connect_persistent(level, &id)).await;
        let (_, body) = second.recv().await.expect("CONNACK");
        assert_eq!((body[0], body[1]), (1, 0), "session present");
        second
            .send(&publish(level, 2, true, 5, "dev/p", b"kept"))
            .await;
        assert_eq!(second.recv().await.map(|p| p.0), Some(0x50));
        // A third connection takes over the live second one and resends again.
        let mut third = Raw::open(gw.addr).await;
        third.send(&connect_persistent(level, &id)).await;
        let (_, body) = third.recv().await.expect("CONNACK");
        assert_eq!((body[0], body[1]), (1, 0), "session present after takeover");
        third
            .send(&publish(level, 2, true, 5, "dev/p", b"kept"))
            .await;
        assert_eq!(third.recv().await.map(|p| p.0), Some(0x50));
        third.send(&[0x62, 0x02, 0, 5]).await;
        assert_eq!(third.recv().await, Some((0x70, vec![0, 5])));
        assert_eq!(payloads(&gw.records(1).await), ["kept"]);
        // A clean start forgets the session.
        let mut clean = Raw::open(gw.addr).await;
        clean.send(&connect(level, &id, 60, None)).await;
        let (_, body) = clean.recv().await.expect("CONNACK");
        assert_eq!((body[0], body[1]), (0, 0), "clean start: no session");
    }
    assert_eq!(gw.appended(), 2);
    gw.stop().await;
}

/// Acks go out in the order the publishes arrived (MQTT 4.6), even when many are stored by
/// one group commit: clients such as rumqttc lose track of QoS 2 flows otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_follow_the_order_of_the_publishes() {
    let mut gw = start_default().await;
    for (level, qos, ack) in [(4, 1, 0x40), (5, 1, 0x40), (4, 2, 0x50), (5, 2, 0x50)] {
        let mut raw = Raw::connected(gw.addr, level, &format!("ordered-{level}-{qos}")).await;
        let burst: Vec<u8> = (1..=100u16)
            .flat_map(|pkid| publish(level, qos, false, pkid, "dev/ordered", b"x"))
            .collect();
        raw.send(&burst).await;
        let mut order = Vec::new();
        while order.len() < 100 {
            let (byte1, body) = raw.recv().await.expect("an ack");
            assert_eq!(byte1, ack);
            order.push(u16::from_be_bytes([body[0], body[1]]));
        }
        assert_eq!(
            order,
            (1..=100).collect::<Vec<_>>(),
            "MQTT {level} QoS {qos}"
        );
        gw.records(100).await;
    }
    gw.stop().await;
}

/// A message too large for its client is dropped as if sent, and the session goes on to the
/// next even while the read-back budget (1 MiB for all sessions) is spent by a subscriber
/// that does not acknowledge: the dropped one was the one message an idle connection may
/// read back over the budget, and nothing else would call it back [MQTT-3.1.2-25].
#[tokio::test]
async fn a_message_too_large_for_its_client_does_not_hold_up_the_next_one() {
    let gw = start_default().await;
    let subscribe = |level: u8, filter: &str| {
        let mut body = vec![0, 9];
        if level == 5 {
            body.push(0);
        }
        common::mqtt_string(&mut body, filter.as_bytes());
        body.push(1);
        common::mqtt_frame(0x82, &body)
    };
    // A persistent MQTT 5 session whose client takes packets of 1 KiB at most.
    let small_client = || {
        let mut body = Vec::new();
        common::mqtt_string(&mut body, b"MQTT");
        body.extend_from_slice(&[5, 0x00, 0, 60]);
        body.extend_from_slice(&[10, 0x11, 0, 0, 0, 60, 0x27, 0, 0, 4, 0]);
        common::mqtt_string(&mut body, b"small");
        common::mqtt_frame(0x10, &body)
    };
    let mut small = Raw::open(gw.addr).await;
    small.send(&small_client()).await;
    assert_eq!(small.recv().await.map(|p| p.0), Some(0x20));
    small.send(&subscribe(5, "dev/small/#")).await;
    assert_eq!(small.recv().await.map(|p| p.0), Some(0x90));
    drop(small);

    // A subscriber that never acknowledges takes 1 MiB of read-back messages and holds them.
    let mut hog = Raw::open(gw.addr).await;
    hog.send(&connect_persistent(4, "hog")).await;
    assert_eq!(hog.recv().await.map(|p| p.0), Some(0x20));
    hog.send(&subscribe(4, "dev/big")).await;
    assert_eq!(hog.recv().await.map(|p| p.0), Some(0x90));
    let mut publisher = Raw::connected(gw.addr, 4, "publisher").await;
    let big = vec![b'x'; 10_000];
    let mut pkid = 0;
    let mut send = async |topic: &str, payload: &[u8]| {
        pkid += 1;
        publisher
            .send(&publish(4, 1, false, pkid, topic, payload))
            .await;
        assert_eq!(publisher.recv().await.map(|p| p.0), Some(0x40), "PUBACK");
    };
    for _ in 0..110 {
        send("dev/big", &big).await;
    }
    // Five too large for the small client, then one it can take.
    for _ in 0..5 {
        send("dev/small/x", &big).await;
    }
    send("dev/small/x", b"tail").await;

    let mut small = Raw::open(gw.addr).await;
    small.send(&small_client()).await;
    let (byte1, body) = small.recv().await.expect("CONNACK");
    assert_eq!((byte1, body[0]), (0x20, 1), "session present");
    let (byte1, body) = small.recv().await.expect("the message that fits");
    assert_eq!(byte1 & 0xf0, 0x30);
    assert!(body.ends_with(b"tail"), "{body:?}");
    drop(hog);
    gw.stop().await;
}
