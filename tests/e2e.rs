//! End to end, black box: the whole gateway on its config file, real MQTT clients
//! (`mosquitto_pub` and rumqttc), a real Kafka broker (the shared fixture), real faults (the
//! broker stopped, the gateway SIGKILLed). Records are read back from Kafka and checked one
//! by one. The gateway runs in process, and as the real `edgegate` binary where a test needs
//! a process: SIGKILL, SIGTERM and its exit status, SIGHUP, the binary itself.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Consumed, GatewayToml};

const GATEWAY_ID: &str = "e2e-gw";

/// The config of every test here: the test broker, connect timeout 1 s.
fn config() -> GatewayToml {
    GatewayToml::new()
        .id(GATEWAY_ID)
        .mqtt("connect_timeout", "1s")
}

/// Two routes: plant telemetry keyed by device into one topic per site, and fleet data
/// keyed by client id.
fn two_routes(prefix: &str) -> GatewayToml {
    config()
        .route_keyed(
            "plant/+site/+device/telemetry/#",
            &format!("{prefix}.{{site}}.telemetry"),
            "{device}",
        )
        .route("fleet/#", &format!("{prefix}-fleet"))
}

fn one_route(topic: &str) -> GatewayToml {
    config().route("#", topic)
}

/// Publishes `payloads` with rumqttc and returns the indexes the gateway acknowledged;
/// `properties` adds a content type and two user properties to MQTT 5 publishes.
async fn rumqttc_publish(
    addr: SocketAddr,
    client_id: &str,
    v5: bool,
    qos: u8,
    topic: &str,
    payloads: Vec<Vec<u8>>,
    properties: bool,
) -> Vec<usize> {
    let mut client = common::rumqttc(addr, client_id).v5(v5).qos(qos);
    if properties {
        client = client.properties("application/json", &[("unit", "C"), ("line", "4")]);
    }
    client.publish(topic, payloads).await
}

fn payloads(device: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{device}:{i:06}").into_bytes())
        .collect()
}

/// `device:seq` of a payload written by `payloads`.
fn parse(payload: &[u8]) -> (String, usize) {
    let text = std::str::from_utf8(payload).expect("utf8 payload");
    let (device, seq) = text.rsplit_once(':').expect("device:seq");
    (device.to_owned(), seq.parse().expect("seq"))
}

/// The sequence numbers of `records` (payloads written by `payloads`) as they arrived, after
/// [`dedup_and_check_order`].
fn seqs_in_order(records: &[Consumed]) -> Vec<usize> {
    dedup_and_check_order(records)
        .iter()
        .map(|r| parse(r.payload.as_deref().unwrap_or_default()).1)
        .collect()
}

/// Drops re-sends (same record id), keeping the first copy, and checks that what remains
/// is in publish order per device.
fn dedup_and_check_order(records: &[Consumed]) -> Vec<Consumed> {
    let mut ids = HashSet::new();
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut unique = Vec::new();
    let mut by_partition: BTreeMap<(String, i32), Vec<&Consumed>> = BTreeMap::new();
    for record in records {
        by_partition
            .entry((record.topic.clone(), record.partition))
            .or_default()
            .push(record);
    }
    for records in by_partition.values_mut() {
        records.sort_by_key(|r| r.offset);
        for record in records.iter() {
            let id = record
                .header("edgegate-record-id")
                .expect("record id header")
                .to_vec();
            if !ids.insert(id) {
                continue;
            }
            let (device, seq) = parse(record.payload.as_deref().expect("payload"));
            if let Some(previous) = last.insert(device.clone(), seq) {
                assert!(seq > previous, "{device}: {seq} arrived after {previous}");
            }
            unique.push((*record).clone());
        }
    }
    unique
}

fn header_str<'a>(record: &'a Consumed, name: &str) -> &'a str {
    std::str::from_utf8(
        record
            .header(name)
            .unwrap_or_else(|| panic!("header {name} missing")),
    )
    .expect("utf8 header")
}

/// Test 1: ten concurrent publishers of three kinds, QoS 0, 1 and 2, two routes; every
/// QoS ≥ 1 record is checked: topic, key, payload, headers, per-device order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_publishers_reach_kafka_with_keys_headers_and_order() {
    let _kafka = common::shared();
    let prefix = common::unique_topic("e2e-mixed");
    let gateway = common::gateway(two_routes(&prefix)).start();
    let addr = gateway.mqtt_addr();
    const PER_PUBLISHER: usize = 1000;

    // (name, kind, v5, qos); even publishers use the plant route, odd ones the fleet route.
    let publishers: Vec<(&str, &str, bool, u8)> = vec![
        ("p0", "mosquitto", false, 1),
        ("p1", "mosquitto", true, 2),
        ("p2", "mosquitto", true, 1),
        ("p3", "mosquitto", false, 2),
        ("p4", "rumqttc", false, 1),
        ("p5", "rumqttc", true, 1),
        ("p6", "rumqttc", true, 2),
        ("p7", "rumqttc", false, 2),
        ("p8", "rumqttc", false, 0),
        ("p9", "mosquitto", true, 0),
    ];
    let topic_of = |i: usize, name: &str| {
        if i % 2 == 0 {
            format!("plant/site{}/{name}/telemetry/temp", i % 4 / 2)
        } else {
            format!("fleet/{name}/gps")
        }
    };
    let mut tasks = Vec::new();
    for (i, (name, kind, v5, qos)) in publishers.iter().copied().enumerate() {
        let topic = topic_of(i, name);
        let client_id = format!("{name}-client");
        tasks.push(tokio::spawn(async move {
            let data = payloads(name, PER_PUBLISHER);
            if kind == "mosquitto" {
                let lines: Vec<String> = data
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                let out = tokio::task::spawn_blocking(move || {
                    common::mosquitto_pub(addr)
                        .id(&client_id)
                        .topic(&topic)
                        .qos(qos)
                        .v5(v5)
                        .lines(&lines)
                })
                .await
                .expect("join");
                assert!(
                    out.status.success(),
                    "mosquitto_pub {name}: {}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                PER_PUBLISHER
            } else {
                let acked = rumqttc_publish(addr, &client_id, v5, qos, &topic, data, v5).await;
                acked.len()
            }
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.push(task.await.expect("publisher"));
    }
    for (i, (name, _, _, qos)) in publishers.iter().enumerate() {
        if *qos > 0 {
            assert_eq!(
                acked[i], PER_PUBLISHER,
                "{name} got every QoS {qos} message acknowledged"
            );
        }
    }

    // QoS >= 1 records per Kafka topic: site0 has p0 and p4, site1 p2 and p6, fleet p1, p3,
    // p5 and p7 (QoS 0 publishers p8 and p9 add at most their own).
    let mut records = Vec::new();
    for (topic, expected) in [
        ("site0.telemetry", 2000),
        ("site1.telemetry", 2000),
        ("fleet", 4000),
    ] {
        let topic = if topic == "fleet" {
            format!("{prefix}-fleet")
        } else {
            format!("{prefix}.{topic}")
        };
        records.extend(common::consume_all(&topic, expected, Duration::from_secs(60)).await);
    }
    let records = dedup_and_check_order(&records);
    let mut per_device: HashMap<String, Vec<usize>> = HashMap::new();
    for record in &records {
        let payload = record.payload.as_deref().expect("payload");
        let (device, seq) = parse(payload);
        let i: usize = device[1..].parse().expect("publisher index");
        let (name, _, v5, qos) = publishers[i];
        let mqtt_topic = topic_of(i, name);
        let client_id = format!("{name}-client");
        // Topic and key from the route.
        if i % 2 == 0 {
            assert_eq!(
                record.topic,
                format!("{prefix}.site{}.telemetry", i % 4 / 2)
            );
            assert_eq!(
                record.key.as_deref(),
                Some(name.as_bytes()),
                "key is the {{device}} wildcard"
            );
        } else {
            assert_eq!(record.topic, format!("{prefix}-fleet"));
            assert_eq!(
                record.key.as_deref(),
                Some(client_id.as_bytes()),
                "default key is the client id"
            );
        }
        // Headers.
        let id = header_str(record, "edgegate-record-id");
        assert!(
            id.starts_with(&format!("{GATEWAY_ID}:"))
                && id[GATEWAY_ID.len() + 1..].parse::<u64>().is_ok(),
            "{id}"
        );
        assert_eq!(header_str(record, "edgegate-source"), "mqtt");
        assert_eq!(header_str(record, "edgegate-device"), client_id);
        assert_eq!(header_str(record, "edgegate-origin"), mqtt_topic);
        assert_eq!(header_str(record, "mqtt-qos"), qos.to_string());
        let received: i64 = header_str(record, "edgegate-received-ms")
            .parse()
            .expect("ms");
        assert_eq!(
            record.timestamp_ms,
            Some(received),
            "Kafka timestamp is the receive time"
        );
        if v5 && publishers[i].1 == "rumqttc" {
            assert_eq!(header_str(record, "content-type"), "application/json");
            assert_eq!(header_str(record, "unit"), "C");
            assert_eq!(header_str(record, "line"), "4");
        }
        per_device.entry(device).or_default().push(seq);
    }
    for (name, _, _, qos) in &publishers {
        let seqs = per_device.get(*name).cloned().unwrap_or_default();
        if *qos > 0 {
            assert_eq!(
                seqs,
                (0..PER_PUBLISHER).collect::<Vec<_>>(),
                "{name}: every message exactly once, in order"
            );
        } else {
            assert!(seqs.len() <= PER_PUBLISHER, "{name}: QoS 0 at most once");
        }
    }
}

/// Test 2: the broker is stopped mid-stream; publishes keep being acknowledged; after the
/// restart everything arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_outage_mid_stream_loses_nothing() {
    let kafka = common::exclusive();
    let topic = common::unique_topic("e2e-outage");
    let gateway = common::gateway(one_route(&topic)).start();
    let addr = gateway.mqtt_addr();
    let first = rumqttc_publish(
        addr,
        "dev-a",
        false,
        1,
        "a/1",
        payloads("dev-a", 1000)[..500].to_vec(),
        false,
    )
    .await;
    assert_eq!(first.len(), 500);
    kafka.stop_broker_async().await;
    let during = rumqttc_publish(
        addr,
        "dev-a",
        true,
        1,
        "a/1",
        payloads("dev-a", 1000)[500..].to_vec(),
        false,
    )
    .await;
    assert_eq!(
        during.len(),
        500,
        "the gateway keeps acknowledging while Kafka is down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.start_broker_async().await;
    let records = common::consume_all(&topic, 1000, Duration::from_secs(90)).await;
    let seqs = seqs_in_order(&records);
    assert_eq!(seqs, (0..1000).collect::<Vec<_>>());
}

/// Test 3: Kafka is absent when the gateway starts; it accepts and buffers, survives a
/// graceful restart with the backlog, and delivers everything once Kafka appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_absent_at_start_then_arrives() {
    let kafka = common::exclusive();
    // The topic exists, as in a deployment; one the brokers make when its first record
    // comes has a test of its own
    // (`a_topic_first_used_in_a_long_outage_is_created_when_kafka_returns`).
    let topic = common::unique_topic("e2e-absent");
    tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || common::create_topic(&topic, 1)
    })
    .await
    .expect("join");
    kafka.stop_broker_async().await;
    // The restarted gateway listens where the publisher connects.
    let mut gateway = common::gateway(one_route(&topic))
        .rust_log("info,edgegate=debug")
        .pin_addresses()
        .start_process();
    let addr = gateway.mqtt_addr();
    let acked = rumqttc_publish(
        addr,
        "dev-b",
        false,
        1,
        "b/1",
        payloads("dev-b", 800),
        false,
    )
    .await;
    assert_eq!(
        acked.len(),
        800,
        "accepted and buffered with no Kafka at all"
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.terminate();
        (gateway, status)
    })
    .await
    .expect("join");
    let (mut gateway, status) = status;
    assert!(
        status.success(),
        "graceful shutdown with a backlog and no Kafka exits 0: {status}"
    );
    gateway.restart();
    let more = rumqttc_publish(
        addr,
        "dev-b",
        true,
        2,
        "b/1",
        payloads("dev-b", 1000)[800..].to_vec(),
        false,
    )
    .await;
    assert_eq!(more.len(), 200);
    kafka.start_broker_async().await;
    let records = common::consume_all(&topic, 1000, Duration::from_secs(90)).await;
    let seqs = seqs_in_order(&records);
    assert_eq!(seqs, (0..1000).collect::<Vec<_>>());
}

/// A route's topic that does not exist yet, first used while Kafka is away for longer than
/// librdkafka's metadata propagation grace (`topic.metadata.propagation.max.ms`, 30 s,
/// counted from the topic's first use): when Kafka returns, the brokers' auto-creation makes
/// it, and every record goes there, in order; none goes to the dead-letter log. Before, the
/// first "unknown topic" answer after the return was final and the backlog was
/// dead-lettered (a CI run met it on 2026-12-07). Both delivery modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_first_used_in_a_long_outage_is_created_when_kafka_returns() {
    let kafka = common::exclusive();
    kafka.stop_broker_async().await;
    // One gateway per delivery mode, through the same outage.
    let mut runs = Vec::new();
    for exactly_once in [false, true] {
        let topic = common::unique_topic("e2e-autocreate");
        let mut config = one_route(&topic);
        if exactly_once {
            config = config.kafka("delivery", "exactly_once");
        }
        let gateway = common::gateway(config)
            .rust_log("info,edgegate=debug")
            .start_process();
        let acked = rumqttc_publish(
            gateway.mqtt_addr(),
            "dev-new-topic",
            false,
            1,
            "n/1",
            payloads("dev-new-topic", 300),
            false,
        )
        .await;
        assert_eq!(acked.len(), 300, "accepted and buffered with no Kafka");
        runs.push((exactly_once, topic, gateway));
    }
    // Past the 30 s grace since each forwarder first handed a record to librdkafka.
    tokio::time::sleep(Duration::from_secs(35)).await;
    kafka.start_broker_async().await;
    for (exactly_once, topic, gateway) in runs {
        let mut client = common::client_config();
        client.set("isolation.level", "read_committed");
        let records = tokio::task::spawn_blocking(move || {
            common::kafka::consume_all_from(client, &topic, 300, Duration::from_secs(90))
        })
        .await
        .expect("join");
        let dead = common::dead_letters(gateway.config_path());
        assert!(dead.is_empty(), "exactly_once={exactly_once}: {dead:?}");
        let seqs = seqs_in_order(&records);
        assert_eq!(
            seqs,
            (0..300).collect::<Vec<_>>(),
            "exactly_once={exactly_once}"
        );
    }
}

/// A route to a topic that will never exist (the gateway's producer does not ask the
/// brokers to make it): its records are sent again for the grace and go to the dead-letter
/// log with the reason only after it (per the gateway's own log: the first of them no
/// sooner than 30 s after the grace began), while the records to a topic that exists
/// arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_for_a_topic_that_never_appears_are_dead_lettered_after_the_grace() {
    let _kafka = common::shared();
    let good = common::unique_topic("e2e-good");
    let missing = common::unique_topic("e2e-never");
    tokio::task::spawn_blocking({
        let good = good.clone();
        move || common::create_topic(&good, 1)
    })
    .await
    .expect("join");
    let config = config()
        .route("never/#", &missing)
        .route("good/#", &good)
        .kafka_property("allow.auto.create.topics", "false")
        // librdkafka's own wait for a topic to appear, shortened so the test is not long.
        .kafka_property("topic.metadata.propagation.max.ms", "1000");
    let gateway = common::gateway(config)
        .rust_log("info,edgegate=debug")
        .start_process();
    let addr = gateway.mqtt_addr();
    for (device, topic, n) in [("dev-lost", "never/1", 20), ("dev-fine", "good/1", 50)] {
        let acked = rumqttc_publish(addr, device, false, 1, topic, payloads(device, n), false);
        assert_eq!(acked.await.len(), n);
    }
    let records = common::consume_all(&good, 50, Duration::from_secs(90)).await;
    let seqs = seqs_in_order(&records);
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());

    common::wait_until("the 20 dead letters", Duration::from_secs(90), || {
        common::dead_letters(gateway.config_path()).len() >= 20
    });
    let dead = common::dead_letters(gateway.config_path());
    assert_eq!(dead.len(), 20, "{dead:?}");
    for (i, d) in dead.iter().enumerate() {
        assert_eq!(d["topic"], missing.as_str());
        assert_eq!(d["payload"], format!("dev-lost:{i:06}"));
        let error = d["error"].as_str().unwrap_or_default();
        assert!(error.contains("Unknown topic"), "{error}");
    }
    // The grace is the rule, read from the log's own times (no clock of the test's): the
    // first dead-lettering comes no sooner than 30 s after the grace began, less the few
    // milliseconds between the moment it counts from and its WARN line.
    let log = gateway.log_text();
    let first = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().next())
            .and_then(common::parse_utc)
            .unwrap_or_else(|| panic!("no line with {needle:?} in the log:\n{log}"))
    };
    let began = first("Kafka does not know a route's topic");
    let dead_lettered = first("moving it to the dead-letter log");
    let waited = dead_lettered.duration_since(began).unwrap_or_default();
    assert!(
        waited >= Duration::from_secs(29),
        "dead-lettered {waited:?} after the grace began"
    );
}

/// Encryption at rest, on the real binary: with Kafka away the records sit in the log, and
/// no payload or device id can be found in any file of the log directory; when Kafka
/// returns they arrive whole and in order. The same run without encryption finds them (so
/// the search would see them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_log_holds_no_payload_in_the_clear_and_delivers_it_all() {
    let kafka = common::exclusive();
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("log.key");
    std::fs::write(&key_file, "5a".repeat(32)).expect("key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    kafka.stop_broker_async().await;
    let mut found_in_the_clear = Vec::new();
    let mut topics = Vec::new();
    for encrypted in [false, true] {
        let topic = common::unique_topic("e2e-sealed");
        let gateway = common::gateway(one_route(&topic).encryption(encrypted, &key_file))
            .rust_log("info,edgegate=debug")
            .start_process();
        let acked = rumqttc_publish(
            gateway.mqtt_addr(),
            "dev-sealed",
            false,
            1,
            "vault/1",
            payloads("secret-device", 300),
            false,
        )
        .await;
        assert_eq!(acked.len(), 300, "acknowledged while Kafka is away");
        let log_dir = gateway.dir().join("log");
        let hits: usize = files_under(&log_dir)
            .iter()
            .filter(|bytes| bytes.windows(14).any(|w| w == b"secret-device:"))
            .count();
        found_in_the_clear.push(hits);
        topics.push((topic, gateway));
    }
    assert!(
        found_in_the_clear[0] > 0,
        "without encryption the payloads are on disk"
    );
    assert_eq!(
        found_in_the_clear[1], 0,
        "with encryption no file holds a payload"
    );
    kafka.start_broker_async().await;
    for (topic, _gateway) in &topics {
        let records = common::consume_all(topic, 300, Duration::from_secs(90)).await;
        let seqs = seqs_in_order(&records);
        assert_eq!(seqs, (0..300).collect::<Vec<_>>(), "{topic}");
    }
}

/// Every file under `dir`, recursively, as bytes.
fn files_under(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(std::fs::read(&path).expect("read"));
        }
    }
    out
}

/// Test 4: the gateway is SIGKILLed mid-stream, several times; every PUBACKed message is in
/// Kafka, and a re-sent record carries the same record id as its first copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let _kafka = common::shared();
    let topic = common::unique_topic("e2e-crash");
    // Restarted on the same port: the next round's publisher connects there.
    let mut gateway = common::gateway(one_route(&topic))
        .rust_log("info,edgegate=debug")
        .pin_addresses()
        .start_process();
    let addr = gateway.mqtt_addr();
    let mut acked_payloads: Vec<Vec<u8>> = Vec::new();
    let mut next = 0usize;
    for round in 0..4 {
        let batch: Vec<Vec<u8>> = (next..next + 3000)
            .map(|i| format!("dev-c:{i:06}").into_bytes())
            .collect();
        let publish = {
            let batch = batch.clone();
            tokio::spawn(async move {
                rumqttc_publish(addr, "dev-c", round % 2 == 1, 1, "c/1", batch, false).await
            })
        };
        if round < 3 {
            tokio::time::sleep(Duration::from_millis(300 + 200 * round as u64)).await;
            gateway.kill();
        }
        let acked = publish.await.expect("publisher");
        acked_payloads.extend(acked.iter().map(|&i| batch[i].clone()));
        next += 3000;
        if round < 3 {
            gateway.restart();
        }
    }
    assert!(
        acked_payloads.len() > 3000,
        "enough was acknowledged to mean something: {}",
        acked_payloads.len()
    );
    let records = common::consume_all(&topic, acked_payloads.len(), Duration::from_secs(90)).await;
    // A payload seen twice is a re-send by the forwarder: both copies share the record id.
    let mut ids: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for record in &records {
        let payload = record.payload.clone().unwrap_or_default();
        let id = record.header("edgegate-record-id").expect("id").to_vec();
        if let Some(previous) = ids.insert(payload.clone(), id.clone()) {
            assert_eq!(
                previous,
                id,
                "a re-send of {} kept its record id",
                String::from_utf8_lossy(&payload)
            );
        }
    }
    let missing: Vec<String> = acked_payloads
        .iter()
        .filter(|p| !ids.contains_key(*p))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    if !missing.is_empty() {
        let log = gateway.log_text();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "{} acknowledged messages missing, e.g. {:?}; the gateway's last log lines:\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
    }
    dedup_and_check_order(&records);
}

/// Test 5: hostile and broken connections each end with the right answer, while a
/// well-behaved client on the same gateway gets everything through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_costs_only_the_sender() {
    let _kafka = common::shared();
    let topic = common::unique_topic("e2e-bad");
    let gateway = common::gateway(one_route(&topic).mqtt("max_packet_size", "4KiB")).start();
    let addr = gateway.mqtt_addr();
    let good = tokio::spawn(async move {
        rumqttc_publish(
            addr,
            "dev-good",
            false,
            1,
            "good/1",
            payloads("dev-good", 2000),
            false,
        )
        .await
    });
    let bad = tokio::task::spawn_blocking(move || {
        // Garbage: not even a CONNECT.
        let reply = raw_exchange(addr, &[b"\xff\xfe\xfd\xfc garbage \x00\x01".as_slice()]);
        assert!(reply.closed, "garbage closes the connection");
        // A truncated CONNECT is dropped after connect_timeout (1 s here).
        let started = Instant::now();
        let reply = raw_exchange(addr, &[&connect_v4("trunc")[..7]]);
        assert!(
            reply.closed && started.elapsed() < Duration::from_secs(5),
            "a half CONNECT does not hold the socket"
        );
        // An unknown protocol level.
        let mut level9 = connect_v4("lvl");
        level9[8] = 9;
        let reply = raw_exchange(addr, &[&level9]);
        assert!(reply.closed);
        assert!(
            reply.bytes.is_empty() || reply.bytes[..2] == [0x20, 0x02],
            "only a CONNACK may answer: {:02x?}",
            reply.bytes
        );
        // MQTT 5: a publish over max_packet_size gets DISCONNECT 0x95.
        let big = publish_v5("big/1", 1, &vec![b'x'; 8 << 10]);
        let reply = raw_exchange(addr, &[&connect_v5("big"), &big]);
        assert!(reply.closed);
        assert_eq!(
            reply.disconnect_reason(),
            Some(0x95),
            "{:02x?}",
            &reply.bytes[..reply.bytes.len().min(32)]
        );
        // A publish to a wildcard topic: 3.1.1 is closed, 5 is told why.
        let reply = raw_exchange(addr, &[&connect_v4("wild4"), &publish_v4("a/+/b", 1, b"x")]);
        assert!(
            reply.closed && !reply.has_puback(),
            "3.1.1 wildcard publish: closed, never acknowledged"
        );
        let reply = raw_exchange(addr, &[&connect_v5("wild5"), &publish_v5("a/+/b", 1, b"x")]);
        assert!(
            !reply.has_puback_success(),
            "5 wildcard publish is not acknowledged as a success"
        );
    });
    bad.await.expect("bad-input checks");
    let acked = good.await.expect("good publisher");
    assert_eq!(acked.len(), 2000, "the good client was unaffected");
    let records = common::consume_all(&topic, 2000, Duration::from_secs(60)).await;
    let unique = dedup_and_check_order(&records);
    assert_eq!(unique.len(), 2000);
    assert!(
        unique
            .iter()
            .all(|r| header_str(r, "edgegate-device") == "dev-good"),
        "nothing of the bad clients was stored"
    );
}

/// Test 6: a broken config yields every problem with file:line:col and exit code 64, for
/// both `validate` and `run`.
#[test]
fn broken_config_reports_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[buffer]\nmax_size = \"lots\"\n\n[mqtt]\nlisten = \"127.0.0.1:1883\"\nlisen = \"typo\"\n\n[[routes]]\nmatch = \"a/#/b\"\ntopic = \"ok\"\n\n[kafka]\nbrokers = []\n",
    )
    .expect("write");
    for command in ["validate", "run"] {
        let output = Command::new(env!("CARGO_BIN_EXE_edgegate"))
            .args([command, "--config"])
            .arg(&path)
            .output()
            .expect("run edgegate");
        assert_eq!(output.status.code(), Some(64), "{command}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let file = path.display().to_string();
        for expected in [format!("{file}:2:12:"), format!("{file}:6:1:")] {
            assert!(
                stderr.contains(&expected),
                "{command}: `{expected}` in\n{stderr}"
            );
        }
        assert!(stderr.contains("lisen"), "{stderr}");
    }
    // Once the parse errors are fixed, the validation problems appear, all at once.
    std::fs::write(
        &path,
        "[mqtt]\nlisten = \"nowhere\"\n\n[[routes]]\nmatch = \"a/#/b\"\ntopic = \"ok\"\n\n[kafka]\nbrokers = []\n",
    )
    .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .expect("run edgegate");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display().to_string();
    for expected in [
        format!("{file}:2:10: mqtt.listen"),
        format!("{file}:5:9: routes[0].match"),
        format!("{file}:9:11: kafka.brokers"),
    ] {
        assert!(stderr.contains(&expected), "`{expected}` in\n{stderr}");
    }
    let valid = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["validate", "--config"])
        .arg(&valid)
        .output()
        .expect("run edgegate");
    assert!(
        output.status.success(),
        "the shipped gateway.toml is valid: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What a raw connection got back.
struct Reply {
    bytes: Vec<u8>,
    closed: bool,
}

impl Reply {
    /// Packets in the reply, as (first byte, body).
    fn packets(&self) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = &self.bytes[..];
        while rest.len() >= 2 {
            let (mut len, mut shift, mut i) = (0usize, 0, 1);
            while i < rest.len() {
                len |= usize::from(rest[i] & 0x7f) << shift;
                shift += 7;
                i += 1;
                if rest[i - 1] & 0x80 == 0 {
                    break;
                }
            }
            if rest.len() < i + len {
                break;
            }
            out.push((rest[0], &rest[i..i + len]));
            rest = &rest[i + len..];
        }
        out
    }

    fn disconnect_reason(&self) -> Option<u8> {
        self.packets()
            .iter()
            .find(|(h, _)| *h == 0xe0)
            .map(|(_, b)| b.first().copied().unwrap_or(0))
    }

    fn has_puback(&self) -> bool {
        self.packets().iter().any(|(h, _)| *h == 0x40)
    }

    fn has_puback_success(&self) -> bool {
        self.packets()
            .iter()
            .any(|(h, b)| *h == 0x40 && b.get(2).copied().unwrap_or(0) == 0)
    }
}

/// Sends each chunk, then reads until the server closes (or 4 s pass).
fn raw_exchange(addr: SocketAddr, chunks: &[&[u8]]) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut bytes = Vec::new();
    for chunk in chunks {
        if stream.write_all(chunk).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => {
                return Reply {
                    bytes,
                    closed: true,
                };
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return Reply {
                    bytes,
                    closed: true,
                };
            }
        }
    }
    Reply {
        bytes,
        closed: false,
    }
}

fn connect_v4(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    common::mqtt_string(&mut body, "MQTT".as_bytes());
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    common::mqtt_string(&mut body, client_id.as_bytes());
    common::mqtt_frame(0x10, &body)
}

fn connect_v5(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    common::mqtt_string(&mut body, "MQTT".as_bytes());
    body.extend_from_slice(&[5, 0x02, 0, 60, 0]);
    common::mqtt_string(&mut body, client_id.as_bytes());
    common::mqtt_frame(0x10, &body)
}

fn publish_v4(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    common::mqtt_string(&mut body, topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    common::mqtt_frame(0x32, &body)
}

fn publish_v5(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    common::mqtt_string(&mut body, topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.push(0);
    body.extend_from_slice(payload);
    common::mqtt_frame(0x32, &body)
}

/// SIGHUP reloads the routes from the config file: a topic refused with 0x90 (no route) is
/// accepted after the route is added; a broken file on reload keeps the routes in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_routes() {
    let _kafka = common::shared();
    let topic = common::unique_topic("e2e-reload");
    let mut gateway = common::gateway(config().route("a/#", &topic))
        .rust_log("info,edgegate=debug")
        .start_process();
    let addr = gateway.mqtt_addr();
    let publish_b = move |pkid: u16| {
        raw_exchange(
            addr,
            &[
                &connect_v5(&format!("reload-{pkid}")),
                &publish_v5("b/1", pkid, b"x"),
            ],
        )
    };
    let reply = tokio::task::spawn_blocking(move || publish_b(1))
        .await
        .expect("join");
    assert_eq!(
        puback_reason(&reply),
        Some(0x90),
        "no route for b/1 yet: {:02x?}",
        reply.bytes
    );

    gateway.rewrite_config(|config| config.route("b/#", &topic));
    gateway.hup();
    let reloaded = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = publish_b(2);
            if puback_reason(&reply) == Some(0) || Instant::now() > deadline {
                return puback_reason(&reply);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .expect("join");
    assert_eq!(reloaded, Some(0), "b/1 is routed after SIGHUP");

    // A broken config on the next SIGHUP is refused and the current routes stay.
    gateway.write_config_text("[[routes]]\nmatch = \"a/#/b\"\n");
    gateway.hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reply = tokio::task::spawn_blocking(move || publish_b(3))
        .await
        .expect("join");
    assert_eq!(
        puback_reason(&reply),
        Some(0),
        "the routes in force survive a broken reload"
    );
    let records = common::consume_all(&topic, 2, Duration::from_secs(30)).await;
    assert!(
        records.len() >= 2,
        "the reloaded route delivers to Kafka: {}",
        records.len()
    );
}

/// The reason code of the first PUBACK in a reply (0 when the PUBACK has none).
fn puback_reason(reply: &Reply) -> Option<u8> {
    reply
        .packets()
        .iter()
        .find(|(h, _)| *h == 0x40)
        .map(|(_, b)| b.get(2).copied().unwrap_or(0))
}

/// Sparkplug B (issue 15): payloads encoded by Eclipse Tahu's `sparkplug-payload` (npm), not
/// by our code, become one JSON record per metric with names resolved from the births'
/// aliases, datatypes named, signed values decoded, a sequence gap and the node's death
/// reported; a payload that is not Sparkplug goes to the dead-letter log with its reason,
/// and the records after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sparkplug_b_payloads_become_json_records_per_metric() {
    use serde_json::{Value, json};
    let _kafka = common::shared();
    let topic = common::unique_topic("e2e-sparkplug");
    let gateway = common::gateway(config().raw(&format!(
        "[[routes]]\nmatch = \"spBv1.0/#\"\ntopic = \"{topic}\"\nformat = \"sparkplug_b\"\n"
    )))
    .start();
    let node = "spBv1.0/plant/{}/edge1";
    let at = |kind: &str| node.replace("{}", kind);
    let mut messages = common::drivers::sparkplug_pump_session();
    messages.extend([
        // seq 3 never arrives.
        json!({"topic": at("NDATA"), "payload": {"timestamp": 1004, "seq": 4, "metrics": [
            {"alias": 2, "type": "Int64", "value": 200},
        ]}}),
        json!({"topic": at("NDEATH"), "payload": {"timestamp": 1005, "metrics": [
            {"name": "bdSeq", "type": "UInt64", "value": 1},
        ]}}),
    ]);
    let mut encoded = common::drivers::sparkplug_encode(&json!(messages));
    // Not Sparkplug: stored, then dead-lettered; what follows is not held up by it.
    encoded.insert(
        4,
        (format!("{}/pump7", at("DDATA")), b"\x0bgarbage".to_vec()),
    );
    for (i, (t, payload)) in encoded.into_iter().enumerate() {
        let acked = common::rumqttc(gateway.mqtt_addr(), "edge1")
            .qos(1)
            .publish(&t, vec![payload])
            .await;
        assert_eq!(acked, [0], "message {i} on {t} acknowledged");
    }

    // NBIRTH: state + 2 metrics; DBIRTH: state + 4; DDATA 2; NDATA 1; NDEATH: state + 1.
    let records = common::consume_all(&topic, 13, Duration::from_secs(60)).await;
    assert_eq!(records.len(), 13);
    let values: Vec<Value> = records
        .iter()
        .map(|r| serde_json::from_slice(r.payload.as_deref().expect("value")).expect("JSON"))
        .collect();
    for r in &records {
        assert_eq!(header_str(r, "edgegate-format"), "sparkplug_b");
        assert_eq!(header_str(r, "content-type"), "application/json");
        assert_eq!(r.key.as_deref(), Some(&b"edge1"[..]));
    }
    common::drivers::assert_pump_session(&values);
    let pick = |i: usize, keys: &[&str]| -> Vec<Value> {
        keys.iter().map(|k| values[i][*k].clone()).collect()
    };
    assert_eq!(values[8]["device"], "pump7");
    assert!(values[9].get("seq_gap").is_none());
    assert_eq!(
        pick(10, &["message_type", "name", "value", "seq", "seq_gap"]),
        [
            json!("NDATA"),
            json!("uptime"),
            json!(200),
            json!(4),
            json!({"expected": 3})
        ]
    );
    assert_eq!(
        pick(11, &["message_type", "state"]),
        [json!("NDEATH"), json!("offline")]
    );
    assert!(
        values[11].get("stale").is_none(),
        "the current session's death"
    );

    // The garbage payload is in the dead-letter log, with why.
    let lines = common::dead_letters(gateway.config_path());
    assert_eq!(lines.len(), 1, "{lines:?}");
    let error = lines[0]["error"].as_str().expect("error");
    assert!(
        error.starts_with("format: not a Sparkplug B payload"),
        "{error}"
    );
    assert_eq!(lines[0]["topic"], topic.as_str());
}

/// `format = "json"`: JSON goes to Kafka untouched; a payload that is not JSON goes to the
/// dead-letter log with the reason, and the records after it still arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_routes_dead_letter_what_is_not_json() {
    let _kafka = common::shared();
    let topic = common::unique_topic("e2e-json");
    let gateway = common::gateway(config().raw(&format!(
        "[[routes]]\nmatch = \"json/#\"\ntopic = \"{topic}\"\nformat = \"json\"\n"
    )))
    .start();
    let payloads: Vec<Vec<u8>> = vec![
        br#"{"seq":0,"temp":20.5}"#.to_vec(),
        b"temp=21".to_vec(),
        br#"{"seq":2,"temp":21.5}"#.to_vec(),
        br#"{"seq":3,"#.to_vec(),
        br#"[4, {"nested": true}]"#.to_vec(),
    ];
    let acked = common::rumqttc(gateway.mqtt_addr(), "sensor-1")
        .qos(1)
        .publish("json/sensor-1", payloads.clone())
        .await;
    assert_eq!(acked, [0, 1, 2, 3, 4], "every message acknowledged");

    let records = common::consume_all(&topic, 3, Duration::from_secs(60)).await;
    let values: Vec<&[u8]> = records
        .iter()
        .map(|r| r.payload.as_deref().expect("value"))
        .collect();
    assert_eq!(
        values,
        [&payloads[0][..], &payloads[2][..], &payloads[4][..]]
    );
    assert!(
        records
            .iter()
            .all(|r| r.header("edgegate-format-error").is_none())
    );

    let lines = common::dead_letters(gateway.config_path());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["payload"], "temp=21");
    assert_eq!(lines[1]["payload"], r#"{"seq":3,"#);
    for line in &lines {
        let error = line["error"].as_str().expect("error");
        assert!(
            error.starts_with("format: the payload is not JSON: "),
            "{error}"
        );
        assert_eq!(line["topic"], topic.as_str());
    }
}

/// `{yyyy}{mm}{dd}{hh}` in a route's topic: the record lands in the topic of the hour it was
/// received (UTC).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn time_parts_in_a_route_name_the_topic_of_the_hour() {
    let _kafka = common::shared();
    let prefix = common::unique_topic("e2e-time");
    let gateway =
        common::gateway(config().route("time/#", &format!("{prefix}.{{yyyy}}{{mm}}{{dd}}.{{hh}}")))
            .start();
    let hour = || {
        let out = Command::new("date")
            .args(["-u", "+%Y%m%d.%H"])
            .output()
            .expect("date");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before = hour();
    let acked = common::rumqttc(gateway.mqtt_addr(), "clock")
        .qos(1)
        .publish("time/x", vec![b"tick".to_vec()])
        .await;
    let after = hour();
    assert_eq!(acked, [0]);
    // The hour may turn between the two readings: the record is in one of them.
    let mut found = Vec::new();
    for h in [&before, &after] {
        let records = common::consume_all(
            &format!("{prefix}.{h}"),
            1,
            Duration::from_secs(if found.is_empty() && h == &after {
                30
            } else {
                10
            }),
        )
        .await;
        found.extend(records);
        if before == after {
            break;
        }
    }
    assert_eq!(
        found.len(),
        1,
        "the record is in {prefix}.{before} or {prefix}.{after}"
    );
    assert_eq!(found[0].payload.as_deref(), Some(&b"tick"[..]));
}

/// `timestamp = "payload"` (issue 15): the Kafka timestamp is the device's time when it is in
/// the window around the gateway's clock, else the receive time with the reason in a header;
/// `edgegate-received-ms` is the receive time either way, and a daily topic is the device's
/// day.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_timestamps_in_the_window_become_the_kafka_timestamp() {
    let _kafka = common::shared();
    let topic = common::unique_topic("e2e-devtime");
    let gateway = common::gateway(config().raw(&format!(
        "[[routes]]\nmatch = \"ts/#\"\ntopic = \"{topic}\"\ntimestamp = \"payload\"\n\
         timestamp_pointer = \"/meta/ts\"\n\n\
         [[routes]]\nmatch = \"day/#\"\ntopic = \"{topic}.{{yyyy}}{{mm}}{{dd}}\"\n\
         timestamp = \"payload\"\ntimestamp_pointer = \"/t\"\ntimestamp_unit = \"s\"\n"
    )))
    .start();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as i64
    };
    let date = |secs: i64, format: &str| {
        let out = Command::new("date")
            .args(["-u", "-d", &format!("@{secs}"), format])
            .output()
            .expect("date");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before = now_ms();
    let two_days_ago = before - 2 * 86_400_000;
    let hour_ago = (before - 3_600_000) / 1000;
    let rfc3339 = format!("{}.250Z", date(hour_ago, "+%Y-%m-%dT%H:%M:%S"));
    let payloads: Vec<Vec<u8>> = [
        format!(r#"{{"meta":{{"ts":{two_days_ago}}},"v":1}}"#),
        r#"{"meta":{"ts":0},"v":2}"#.to_owned(),
        format!(r#"{{"meta":{{"ts":"{rfc3339}"}},"v":3}}"#),
        "v=4, not JSON".to_owned(),
        format!(r#"{{"meta":{{"ts":{}}},"v":5}}"#, before + 2 * 3_600_000),
        r#"{"meta":{"ts":true},"v":6}"#.to_owned(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let n = payloads.len();
    let acked = common::rumqttc(gateway.mqtt_addr(), "rtc-dev")
        .v5(true)
        .qos(1)
        .publish("ts/a", payloads.clone())
        .await;
    let three_days_ago = (before - 3 * 86_400_000) / 1000;
    let acked_day = common::rumqttc(gateway.mqtt_addr(), "rtc-day")
        .qos(1)
        .publish(
            "day/a",
            vec![format!(r#"{{"t":{three_days_ago}}}"#).into_bytes()],
        )
        .await;
    // A device cannot pass a refused time as the gateway's own header.
    let forged = br#"{"meta":{"ts":0},"v":7}"#.to_vec();
    let acked_forged = common::rumqttc(gateway.mqtt_addr(), "rtc-forger")
        .v5(true)
        .qos(1)
        .properties("application/json", &[("edgegate-device-ms", "1234")])
        .publish("ts/b", vec![forged.clone()])
        .await;
    let after = now_ms();
    assert_eq!(acked, (0..n).collect::<Vec<_>>());
    assert_eq!(acked_day, [0]);
    assert_eq!(acked_forged, [0]);

    let records = common::consume_all(&topic, n + 1, Duration::from_secs(30)).await;
    assert_eq!(records.len(), n + 1);
    let received = |r: &Consumed| -> i64 {
        let ms: i64 = header_str(r, "edgegate-received-ms").parse().expect("ms");
        assert!(
            (before..=after).contains(&ms),
            "{ms} not in {before}..={after}"
        );
        ms
    };
    let hour_ago_ms = hour_ago * 1000 + 250;
    // (device time used, or the reason it was not)
    let want: [Result<i64, &str>; 7] = [
        Ok(two_days_ago),
        Err("out_of_window"),
        Ok(hour_ago_ms),
        Err("missing"),
        Err("out_of_window"),
        Err("invalid"),
        Err("out_of_window"),
    ];
    for (payload, want) in payloads.iter().chain([&forged]).zip(want) {
        let r = records
            .iter()
            .find(|r| r.payload.as_deref() == Some(&payload[..]))
            .unwrap_or_else(|| panic!("{} not in Kafka", String::from_utf8_lossy(payload)));
        let received = received(r);
        match want {
            Ok(device) => {
                assert_eq!(r.timestamp_ms, Some(device));
                assert_eq!(header_str(r, "edgegate-device-ms"), device.to_string());
                assert_eq!(r.header("edgegate-timestamp-rejected"), None);
            }
            Err(why) => {
                assert_eq!(r.timestamp_ms, Some(received));
                assert_eq!(header_str(r, "edgegate-timestamp-rejected"), why);
                assert_eq!(r.header("edgegate-device-ms"), None);
            }
        }
    }

    let day = date(three_days_ago, "+%Y%m%d");
    let records = common::consume_all(&format!("{topic}.{day}"), 1, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 1, "in the device's day, {day}");
    assert_eq!(records[0].timestamp_ms, Some(three_days_ago * 1000));
    received(&records[0]);
}

/// `timestamp = "payload"` on a `sparkplug_b` route: each record's Kafka timestamp is its
/// metric's timestamp, else its payload's, when in the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sparkplug_records_take_the_metric_or_payload_timestamp() {
    use serde_json::{Value, json};
    let _kafka = common::shared();
    let topic = common::unique_topic("e2e-sp-time");
    let gateway = common::gateway(config().raw(&format!(
        "[[routes]]\nmatch = \"spBv1.0/#\"\ntopic = \"{topic}\"\nformat = \"sparkplug_b\"\n\
         timestamp = \"payload\"\n"
    )))
    .start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    let (hour_ago, two_hours_ago) = (now - 3_600_000, now - 7_200_000);
    let messages = json!([
        {"topic": "spBv1.0/plant/NBIRTH/edge1", "payload": {"timestamp": hour_ago, "seq": 0, "metrics": [
            {"name": "bdSeq", "type": "UInt64", "value": 1},
            {"name": "temp", "alias": 10, "type": "Double", "value": 20.5, "timestamp": two_hours_ago},
        ]}},
        // A node whose clock restarted at 1970.
        {"topic": "spBv1.0/plant/NDATA/edge1", "payload": {"timestamp": 1000, "seq": 1, "metrics": [
            {"alias": 10, "type": "Double", "value": 21.0},
        ]}},
    ]);
    for (t, payload) in common::drivers::sparkplug_encode(&messages) {
        let acked = common::rumqttc(gateway.mqtt_addr(), "edge1")
            .qos(1)
            .publish(&t, vec![payload])
            .await;
        assert_eq!(acked, [0], "{t} acknowledged");
    }
    // NBIRTH: state + 2 metrics; NDATA: 1.
    let records = common::consume_all(&topic, 4, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 4);
    let mut seen = Vec::new();
    for r in &records {
        let value: Value =
            serde_json::from_slice(r.payload.as_deref().expect("value")).expect("JSON");
        let received: i64 = header_str(r, "edgegate-received-ms").parse().expect("ms");
        assert!(received >= now, "{received} is the receive time");
        let rejected = r.header("edgegate-timestamp-rejected");
        seen.push((value["name"].clone(), value["message_type"].clone()));
        match (value["message_type"].as_str(), value["name"].as_str()) {
            (Some("NBIRTH"), Some("temp")) => assert_eq!(r.timestamp_ms, Some(two_hours_ago)),
            (Some("NBIRTH"), _) => assert_eq!(r.timestamp_ms, Some(hour_ago)),
            (Some("NDATA"), _) => {
                assert_eq!(r.timestamp_ms, Some(received));
                assert_eq!(rejected, Some(&b"out_of_window"[..]));
                continue;
            }
            other => panic!("unexpected record {other:?}"),
        }
        assert_eq!(rejected, None);
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
}
