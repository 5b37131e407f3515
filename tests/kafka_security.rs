//! The forwarder through the broker's secured listeners (`tools/kafka/kafka-ci.sh`): SASL_SSL
//! with SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN, and SSL with a client certificate (mutual
//! TLS). Every config is written as a gateway.toml and loaded the way the binary loads it, so
//! the keys, the secret sources and the path resolution are the real ones. Records are read
//! back from Kafka (over the plaintext listener, independent of the code under test) and
//! compared one by one. Refusals (wrong password, wrong CA, no client certificate) must be
//! reported and must cost nothing: the records stay in the log, none is dead-lettered, and
//! they all arrive once the config is fixed.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::forwarder::{Forwarding, open_logs};
use common::{GatewayToml, Password};
use edgegate::buffer::{Durability, Log};
use edgegate::forward::LinkState;
use edgegate::forward::config::KafkaConfig;
use edgegate::record::{Record, Source};

const GATEWAY: &str = "gw-ksec";

/// Writes `gateway.toml` into `dir` with `kafka`'s `[kafka]` part and loads it as the binary
/// does (validation included: files, modes, the librdkafka preflight).
fn load_kafka(dir: &Path, kafka: GatewayToml) -> KafkaConfig {
    let path = dir.join("gateway.toml");
    kafka
        // Notice a fixed broker (or config) quickly.
        .kafka("retry_backoff_max", "1s")
        .route("#", "unused")
        .write(&path);
    common::gateway::load_config(&path).kafka
}

fn write_secret(dir: &Path, name: &str, value: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).expect("write secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// The broker's SASL_SSL listener, its CA trusted.
fn sasl_ssl(mechanism: &str, password: Password) -> GatewayToml {
    let s = common::secured();
    GatewayToml::new()
        .kafka_brokers(&[&s.sasl_ssl])
        .kafka_tls(&s.ca, None)
        .kafka_sasl(mechanism, &s.sasl_user, password)
}

/// The broker's SSL listener, `ca` trusted, with the client certificate if `client_cert`.
fn mutual_tls(ca: &Path, client_cert: bool) -> GatewayToml {
    let s = common::secured();
    let client = client_cert.then_some((s.client_cert.as_path(), s.client_key.as_path()));
    GatewayToml::new()
        .kafka_brokers(&[&s.ssl])
        .kafka_tls(ca, client)
}

/// The log in `dir/log`, as the gateway on `dir/gateway.toml` keeps it.
async fn open(dir: &Path) -> (Log, Log) {
    open_logs(&dir.join("log"), Durability::Fsync).await
}

fn record(topic: &str, n: u64) -> Record {
    let device = format!("device-{}", n % 4);
    Record {
        source: Source::Mqtt,
        received_ms: now_ms(),
        device: device.clone(),
        origin: format!("plant/{device}/telemetry"),
        kafka_topic: topic.to_owned(),
        key: Some(Bytes::from(device)),
        headers: vec![("n".into(), Bytes::from(n.to_string()))],
        payload: Bytes::from(format!("{{\"n\":{n},\"secret-listener\":true}}")),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Appends `n` records for `topic`; returns them by sequence number once durable.
async fn append(log: &Log, topic: &str, n: u64) -> BTreeMap<u64, Record> {
    let mut sent = BTreeMap::new();
    let mut pending = Vec::new();
    for i in 0..n {
        let r = record(topic, i);
        pending.push((log.append(&r).expect("append"), r));
    }
    for (durable, r) in pending {
        sent.insert(durable.await.expect("durable"), r);
    }
    sent
}

/// The forwarder as this gateway, with a 2 s drain at shutdown.
fn start(log: &Log, dead: &Log, cfg: &KafkaConfig) -> Forwarding {
    common::forwarder::forward(log, dead, cfg, GATEWAY, Duration::from_secs(2))
}

fn seq_of(c: &common::Consumed) -> u64 {
    let id =
        std::str::from_utf8(c.header("edgegate-record-id").expect("record id")).expect("utf-8");
    let (gw, seq) = id.rsplit_once(':').expect("<gateway>:<seq>");
    assert_eq!(gw, GATEWAY);
    seq.parse().expect("numeric seq")
}

/// Every record arrived exactly once, as it was sent.
fn assert_same(got: &[common::Consumed], sent: &BTreeMap<u64, Record>) {
    assert_eq!(got.len(), sent.len(), "every record exactly once");
    for c in got {
        let r = &sent[&seq_of(c)];
        assert_eq!(c.key.as_deref(), r.key.as_deref());
        assert_eq!(c.payload.as_deref(), Some(&r.payload[..]));
        assert_eq!(c.header("n"), Some(&r.headers[0].1[..]));
        assert_eq!(c.timestamp_ms, Some(r.received_ms));
    }
}

async fn new_topic(prefix: &str) -> String {
    let topic = common::unique_topic(prefix);
    let t = topic.clone();
    tokio::task::spawn_blocking(move || common::create_topic(&t, 2))
        .await
        .expect("topic");
    topic
}

/// Forwards 200 records with `kafka` and reads them back.
async fn forwards_through(kafka: impl FnOnce(&Path) -> GatewayToml, prefix: &str) {
    let _kafka = common::shared();
    let topic = new_topic(prefix).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = load_kafka(dir.path(), kafka(dir.path()));
    let (log, dead) = open(dir.path()).await;
    let sent = append(&log, &topic, 200).await;
    let running = start(&log, &dead, &cfg);
    running
        .delivered_at_least(200, Duration::from_secs(60))
        .await;
    assert_eq!(running.progress.borrow().dead_lettered, 0);
    assert_eq!(*running.link.borrow(), LinkState::Up);
    let got = common::consume_all(&topic, 200, Duration::from_secs(60)).await;
    assert_same(&got, &sent);
    running.stop().await;
    assert!(log.stats().head_seq > *sent.keys().last().expect("records"));
    log.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_over_sasl_ssl_with_the_password_in_a_relative_file() {
    forwards_through(
        |dir| {
            write_secret(dir, "kafka.password", &common::secured().sasl_password);
            sasl_ssl("scram-sha-256", Password::File("kafka.password"))
        },
        "ksec-scram256",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_512_over_sasl_ssl_with_the_password_in_an_absolute_file() {
    forwards_through(
        |dir| {
            write_secret(dir, "pw", &common::secured().sasl_password);
            let path = dir.join("pw");
            sasl_ssl(
                "SCRAM-SHA-512",
                Password::File(path.to_str().expect("UTF-8 path")),
            )
        },
        "ksec-scram512",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_over_sasl_ssl_with_the_password_inline() {
    forwards_through(
        |_| sasl_ssl("plain", Password::Inline(&common::secured().sasl_password)),
        "ksec-plain",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_the_ssl_listener() {
    forwards_through(|_| mutual_tls(&common::secured().ca, true), "ksec-mtls").await;
}

/// A refused forwarder keeps every record in the log (none delivered, none dead-lettered,
/// the log's head unmoved); a forwarder with `fixed` on the same log then delivers them all.
async fn refused_then_fixed(
    refused: GatewayToml,
    needles: &[&str],
    fixed: GatewayToml,
    prefix: &str,
) {
    let _kafka = common::shared();
    let topic = new_topic(prefix).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = load_kafka(dir.path(), refused);
    let (log, dead) = open(dir.path()).await;
    let sent = append(&log, &topic, 50).await;
    let head = log.stats().head_seq;

    let running = start(&log, &dead, &bad);
    let error = running.refused_with(needles).await;
    eprintln!("{prefix}: reported {error:?}");
    // librdkafka keeps retrying meanwhile; give it a few rounds to do harm, if it could.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(*running.link.borrow(), LinkState::Down);
    let progress = *running.progress.borrow();
    assert_eq!(progress.delivered, 0, "{progress:?}");
    assert_eq!(
        progress.dead_lettered, 0,
        "nothing dead-lettered: {progress:?}"
    );
    running.stop().await;
    assert_eq!(
        log.stats().head_seq,
        head,
        "every record is still in the log"
    );
    log.close().await.expect("close");
    dead.close().await.expect("close dead-letter");

    // The operator fixes the config and restarts the gateway.
    let good = load_kafka(dir.path(), fixed);
    let (log, dead) = open(dir.path()).await;
    assert_eq!(log.stats().head_seq, head, "still there after the restart");
    let running = start(&log, &dead, &good);
    running
        .delivered_at_least(50, Duration::from_secs(60))
        .await;
    assert_eq!(running.progress.borrow().dead_lettered, 0);
    let got = common::consume_all(&topic, 50, Duration::from_secs(60)).await;
    assert_same(&got, &sent);
    running.stop().await;
    log.close().await.expect("close");
    dead.close().await.expect("close dead-letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_and_loses_nothing() {
    let password = &common::secured().sasl_password;
    refused_then_fixed(
        sasl_ssl("scram-sha-512", Password::Inline("not-the-password")),
        &["SASL authentication error", "Authentication failed"],
        sasl_ssl("scram-sha-512", Password::Inline(password)),
        "ksec-wrong-pw",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_tls_failure_and_loses_nothing() {
    let s = common::secured();
    refused_then_fixed(
        mutual_tls(&s.other_ca, true),
        &["certificate verify failed"],
        mutual_tls(&s.ca, true),
        "ksec-wrong-ca",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_listener_refuses_a_gateway_without_a_client_certificate() {
    let s = common::secured();
    refused_then_fixed(
        mutual_tls(&s.ca, false),
        // The broker aborts the handshake with a TLS alert: "bad certificate" (TLS 1.2 and
        // Java's TLS 1.3) or "certificate required" (RFC 8446).
        &["bad certificate", "certificate required"],
        mutual_tls(&s.ca, true),
        "ksec-no-cert",
    )
    .await;
}

/// The real binary's config for one test: MQTT, CoAP and admin on port 0, one route from
/// `plant/+device/#` to `topic` keyed by device, `kafka`'s Kafka part; librdkafka's debug
/// output on, and `env` in its environment.
fn binary(topic: &str, kafka: GatewayToml, env: &[(&str, &str)]) -> common::Builder {
    let config = kafka.id(GATEWAY).buffer_sizes("1MiB", "64MiB").route_keyed(
        "plant/+device/#",
        topic,
        "{device}",
    );
    env.iter().fold(
        common::gateway(config).rust_log("debug"),
        |builder, (key, value)| builder.env(key, value),
    )
}

/// Checks the config with `edgegate validate` (in the same environment), then starts the
/// binary and waits for its MQTT port.
fn validate_and_start(builder: common::Builder, env: &[(&str, &str)]) -> common::Process {
    let validate = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["validate", "--config"])
        .arg(builder.write_config())
        .envs(env.iter().copied())
        .output()
        .expect("run edgegate validate");
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    builder.start_process()
}

/// Publishes `lines` at QoS 1 with mosquitto_pub; each is acknowledged once durable.
fn publish(addr: SocketAddr, lines: &[String]) {
    let out = common::mosquitto_pub(addr)
        .id("ksec-pub")
        .topic("plant/dev-1/telemetry")
        .qos(1)
        .lines(lines);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One admin endpoint's body.
fn get(gateway: &common::Process, path: &str) -> String {
    common::http_get(gateway.admin_addr(), path).1
}

fn payloads(got: &[common::Consumed]) -> Vec<String> {
    got.iter()
        .map(|c| String::from_utf8_lossy(c.payload.as_deref().unwrap_or_default()).into_owned())
        .collect()
}

/// The real binary, an MQTT client, and the password only in the gateway's environment, as
/// systemd's `Environment=`/`EnvironmentFile=` would give it. With librdkafka's debug output
/// on (configuration included), the password appears nowhere in what the gateway prints.
#[test]
fn the_binary_forwards_mqtt_over_sasl_ssl_with_the_password_from_its_environment() {
    let _kafka = common::shared();
    let s = common::secured();
    let topic = common::unique_topic("ksec-binary");
    common::create_topic(&topic, 1);
    let kafka = sasl_ssl(
        "scram-sha-256",
        Password::Env("EDGEGATE_KSEC_TEST_PASSWORD"),
    )
    .kafka_property("debug", "conf,security,broker");
    let env = [("EDGEGATE_KSEC_TEST_PASSWORD", s.sasl_password.as_str())];
    let mut gateway = validate_and_start(binary(&topic, kafka, &env), &env);
    let lines: Vec<String> = (0..30).map(|n| format!("{{\"reading\":{n}}}")).collect();
    publish(gateway.mqtt_addr(), &lines);
    let got = common::consume_all_blocking(&topic, lines.len(), Duration::from_secs(60));
    let status = gateway.terminate();
    let printed = gateway.log_text();
    assert_eq!(payloads(&got), lines, "every publish, once, in order");
    assert!(got.iter().all(|c| c.key.as_deref() == Some(&b"dev-1"[..])));
    assert!(status.success(), "graceful stop: {status}");
    // librdkafka dumps its configuration (`debug = "conf"`), with the password redacted.
    assert!(
        printed.contains("sasl.password = [redacted]"),
        "librdkafka's configuration dump is in the output, so the next check means something"
    );
    assert!(
        !printed.contains(&s.sasl_password),
        "the SASL password appears in the gateway's output"
    );
}

/// A wrong password, seen from outside as an operator sees it: an ERROR line, `/readyz`
/// degraded with the reason, `edgegate status` with it as the last error, the link-up gauge
/// at 0 and the authentication error counter moving; the devices are still acknowledged.
/// After the password file is fixed and the gateway restarted, every message arrives once,
/// in order.
#[test]
fn the_binary_reports_a_wrong_password_everywhere_and_delivers_after_the_fix() {
    let _kafka = common::shared();
    let s = common::secured();
    let topic = common::unique_topic("ksec-binary-wrong-pw");
    common::create_topic(&topic, 1);
    let kafka = sasl_ssl("scram-sha-512", Password::File("kafka.password"))
        .kafka("retry_backoff_max", "1s");
    let builder = binary(&topic, kafka, &[]);
    let dir = builder.dir().to_owned();
    write_secret(&dir, "kafka.password", "not-the-password");
    let mut gateway = validate_and_start(builder, &[]);
    let lines: Vec<String> = (0..20).map(|n| format!("{{\"reading\":{n}}}")).collect();
    publish(gateway.mqtt_addr(), &lines);

    let deadline = Instant::now() + Duration::from_secs(30);
    let (readyz, metrics) = loop {
        let readyz = get(&gateway, "/readyz");
        let metrics = get(&gateway, "/metrics");
        if readyz.contains("SASL authentication error")
            && metrics.contains("edgegate_kafka_client_errors_total{kind=\"authentication\"}")
        {
            break (readyz, metrics);
        }
        assert!(
            Instant::now() < deadline,
            "no authentication error within 30 s:\n{readyz}\n{}",
            gateway.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(readyz.contains("\"degraded\""), "{readyz}");
    assert!(metrics.contains("edgegate_kafka_link_up 0"), "{metrics}");
    let status = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["status", "--admin", &gateway.admin_addr().to_string()])
        .output()
        .expect("edgegate status");
    let summary = String::from_utf8_lossy(&status.stdout);
    assert!(
        summary.contains("last error") && summary.contains("SASL authentication error"),
        "{summary}"
    );
    assert!(
        gateway
            .log_text()
            .contains("Kafka refused the gateway (TLS or SASL)")
    );
    assert!(gateway.terminate().success());
    assert!(
        common::consume_all_blocking(&topic, 1, Duration::from_secs(2)).is_empty(),
        "nothing reached Kafka with the wrong password"
    );

    write_secret(&dir, "kafka.password", &s.sasl_password);
    gateway.restart();
    let got = common::consume_all_blocking(&topic, lines.len(), Duration::from_secs(60));
    assert_eq!(
        payloads(&got),
        lines,
        "every message, once, in order, after the fix"
    );
    assert!(gateway.terminate().success());
}
