//! The admin endpoints and `edgegate status`, black box: the real binary with real MQTT
//! clients (`mosquitto_pub`), read over plain HTTP; Kafka either unreachable (brokers at a
//! closed port: the gateway must say "degraded", not "dead") or the shared test broker.
//! Also two gateways started in-process with `edgegate::start`, which share the process's
//! one metrics recorder but each report their own readiness.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::GatewayToml;
use edgegate::admin::Status;

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn publish(addr: SocketAddr, topic: &str, message: &str) {
    let out = common::mosquitto_pub(addr)
        .qos(1)
        .topic(topic)
        .message(message);
    assert!(
        out.status.success(),
        "mosquitto_pub: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binary on a config of its own, for `edgegate status --config` (which finds the admin
/// endpoint through the pinned config) and counters no other gateway moves.
fn start(brokers: &str, routes: impl FnOnce(GatewayToml) -> GatewayToml) -> common::Process {
    let config = GatewayToml::new()
        .id("admin-gw")
        .shutdown_grace("2s")
        .buffer_sizes("1MiB", "64MiB")
        .kafka_brokers(&[brokers]);
    common::gateway(routes(config))
        .pin_addresses()
        .start_process()
}

fn status_of(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["status", "--config"])
        .arg(config)
        .output()
        .expect("edgegate status")
}

#[test]
fn kafka_unreachable_is_degraded_and_every_publish_is_counted() {
    let mut gw = start(common::config::UNREACHABLE_KAFKA, |c| {
        c.default_route("iot.unrouted")
    });
    let (code, body) = common::http_get(gw.admin_addr(), "/healthz");
    assert_eq!((code, body.trim()), (200, "alive"));

    let (code, body) = common::http_get(gw.admin_addr(), "/readyz");
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(ready["status"], "degraded", "{body}");
    assert_eq!(ready["kafka"], "down", "{body}");
    assert_eq!(ready["log"]["open"], true, "{body}");
    assert_eq!(ready["listeners"], 2, "{body}");

    publish(gw.mqtt_addr(), "plant/a/pump7/telemetry", "hello");
    publish(gw.mqtt_addr(), "plant/a/pump7/telemetry", "world!");
    let mut text = String::new();
    wait_for("the log gauges", Duration::from_secs(5), || {
        text = common::http_get(gw.admin_addr(), "/metrics").1;
        common::metric(&text, "edgegate_log_records") == Some(2.0)
    });
    let mqtt_qos1 = "{protocol=\"mqtt\",qos=\"1\"}";
    assert_eq!(
        common::metric(
            &text,
            &format!("edgegate_messages_received_total{mqtt_qos1}")
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        common::metric(&text, &format!("edgegate_received_bytes_total{mqtt_qos1}")),
        Some(11.0),
        "{text}"
    );
    assert_eq!(common::metric(&text, "edgegate_kafka_link_up"), Some(0.0));
    assert_eq!(
        common::metric(&text, "edgegate_mqtt_acks_total{packet=\"puback\"}"),
        Some(2.0),
        "both QoS 1 publishes were acknowledged once durable: {text}"
    );
    assert_eq!(
        common::metric(&text, "edgegate_mqtt_connections_total"),
        Some(2.0)
    );
    assert_eq!(
        common::metric(&text, "edgegate_backlog_drain_seconds"),
        Some(f64::INFINITY),
        "the backlog cannot drain without Kafka: {text}"
    );
    assert!(
        common::metric(&text, "edgegate_log_oldest_record_age_seconds").is_some_and(|a| a > 0.0)
    );
    assert!(common::metric(&text, "edgegate_log_fsync_seconds_count").is_some_and(|n| n >= 2.0));
    for series in [
        "edgegate_log_bytes",
        "edgegate_log_dropped_records_total",
        "edgegate_log_corrupt_records_total",
        "edgegate_kafka_delivered_total",
        "edgegate_kafka_dead_letter_total",
        "edgegate_kafka_in_flight_records",
        "edgegate_kafka_window_records",
        "edgegate_mqtt_connections",
        "edgegate_dead_letter_records",
        "edgegate_start_time_seconds",
    ] {
        assert!(
            common::metric(&text, series).is_some(),
            "no {series} in {text}"
        );
    }
    assert!(
        text.contains("edgegate_kafka_client_errors_total{kind="),
        "{text}"
    );

    // `edgegate status` while messages arrive: degraded is still healthy (exit 0).
    let publisher = {
        let addr = gw.mqtt_addr();
        std::thread::spawn(move || {
            for i in 0..20 {
                publish(addr, "plant/a/pump7/telemetry", &format!("m{i}"));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = status_of(gw.config_path());
    publisher.join().expect("publisher");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(": degraded"), "{stdout}");
    assert!(stdout.contains("kafka        down"), "{stdout}");
    assert!(stdout.contains("not draining"), "{stdout}");
    assert!(stdout.contains("last error"), "{stdout}");
    let rate_in: f64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("messages/s   in "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("a messages/s line");
    assert!(rate_in > 0.0, "{stdout}");

    let exit = gw.terminate();
    assert!(exit.success(), "edgegate exited with {exit}");
    let out = status_of(gw.config_path());
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("UNREACHABLE"));
}

#[test]
fn kafka_reachable_is_ready_and_deliveries_are_counted() {
    let _kafka = common::shared();
    let topic = common::unique_topic("admin");
    common::create_topic(&topic, 1);
    let gw = start(&common::bootstrap(), |c| c.default_route(&topic));
    publish(gw.mqtt_addr(), "x/y", "to kafka");
    let mut text = String::new();
    wait_for("a delivery", Duration::from_secs(60), || {
        text = common::http_get(gw.admin_addr(), "/metrics").1;
        common::metric(&text, "edgegate_kafka_delivered_total").is_some_and(|n| n >= 1.0)
    });
    assert!(
        common::metric(&text, "edgegate_kafka_produce_latency_seconds_count")
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    wait_for("the link gauge", Duration::from_secs(5), || {
        common::metric(
            &common::http_get(gw.admin_addr(), "/metrics").1,
            "edgegate_kafka_link_up",
        ) == Some(1.0)
    });
    let (code, body) = common::http_get(gw.admin_addr(), "/readyz");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!((code, &ready["status"]), (200, &"ready".into()), "{body}");
    assert_eq!(ready["kafka"], "up", "{body}");
    assert_eq!(ready["forwarder"]["delivered"], 1, "{body}");

    wait_for("the backlog to empty", Duration::from_secs(5), || {
        common::metric(
            &common::http_get(gw.admin_addr(), "/metrics").1,
            "edgegate_log_records",
        ) == Some(0.0)
    });
    let out = status_of(gw.config_path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(": ready"), "{stdout}");
    assert!(stdout.contains("kafka        up"), "{stdout}");
    assert!(stdout.contains("backlog      0 records"), "{stdout}");
}

/// `edgegate status` against something that is not an edgegate admin endpoint, and with
/// the admin listener disabled: exit 2, with a reason.
#[test]
fn status_fails_clearly_without_an_admin_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    GatewayToml::new()
        .without_admin()
        .kafka_unreachable()
        .default_route("t")
        .write(&config);
    let out = status_of(&config);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("disabled"));

    // An HTTP server that answers 404 to everything.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let out = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["status", "--admin", &addr.to_string()])
        .output()
        .expect("edgegate status");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/metrics"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two gateways in one process: the recorder is installed once and both serve it; each
/// `/readyz` describes its own log; stopping one makes only that one "stopping".
#[test]
fn gateways_in_one_process_share_the_recorder_and_keep_their_own_health() {
    let config = || {
        GatewayToml::new()
            .unset("gateway", "shutdown_grace")
            .buffer_sizes("1MiB", "64MiB")
            .kafka_unreachable()
            .default_route("t")
    };
    let a = common::gateway(config()).start();
    let b = common::gateway(config()).start();
    let (admin_a, admin_b) = (a.admin_addr(), b.admin_addr());
    publish(a.mqtt_addr(), "x", "only a");

    let (ra, rb, ma, mb) = (
        common::http_get(admin_a, "/readyz"),
        common::http_get(admin_b, "/readyz"),
        common::http_get(admin_a, "/metrics"),
        common::http_get(admin_b, "/metrics"),
    );
    assert_eq!((ma.0, mb.0), (200, 200));
    assert!(
        ma.1.contains("edgegate_messages_received_total"),
        "{}",
        ma.1
    );
    let records = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body).expect("JSON")["log"]["records"].clone()
    };
    assert_eq!(records(&ra.1), 1, "{}", ra.1);
    assert_eq!(records(&rb.1), 0, "{}", rb.1);

    a.cancel();
    assert_eq!(a.health().readiness().status, Status::Stopping);
    assert_eq!(b.health().readiness().status, Status::Degraded);
    a.stop().expect("a stops");
    b.stop().expect("b stops");
}

/// `edgegate dead-letters` prints the dead-letter log as JSON lines (error, topic, key,
/// device, headers, payload as text or hex, a sealed record opened with the configured key)
/// while a live log holds the directory's lock, and says when there is none.
#[tokio::test]
async fn dead_letters_are_printed_as_json_lines_beside_a_running_log() {
    use edgegate::buffer::seal::{Cipher, LogKeys};
    use edgegate::buffer::{Log, LogConfig};
    use edgegate::record::{Record, Source};
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("log.key"), "3c".repeat(32)).expect("key");
    std::fs::set_permissions(
        dir.path().join("log.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let config = dir.path().join("gateway.toml");
    // The log's own sizes, as the log below is opened with.
    let dead_letter_config = GatewayToml::new()
        .unset("buffer", "segment_size")
        .unset("buffer", "max_size")
        .kafka_unreachable()
        .route("#", "t");
    dead_letter_config
        .clone()
        .encryption(true, Path::new("log.key"))
        .write(&config);
    let dead_letters = || {
        Command::new(env!("CARGO_BIN_EXE_edgegate"))
            .args(["dead-letters", "--config"])
            .arg(&config)
            .output()
            .expect("run edgegate dead-letters")
    };
    let none = dead_letters();
    assert!(none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no dead-letter log"));

    // The dead-letter log as the forwarder writes it: the record plus the error headers.
    let keys = LogKeys::new(Cipher::Chacha20Poly1305, &[0x3c; 32], &[]);
    let (log, _) = Log::open(LogConfig {
        keys: Some(std::sync::Arc::new(keys)),
        ..LogConfig::new(dir.path().join("log/dead-letter"))
    })
    .expect("open");
    let refused = |payload: &'static [u8], error: &str| Record {
        source: Source::Mqtt,
        received_ms: 1_764_000_000_000,
        device: "pump-7".into(),
        origin: "plant/a/pump-7/telemetry".into(),
        kafka_topic: "iot.a.telemetry".into(),
        key: Some(bytes::Bytes::from_static(b"pump-7")),
        headers: vec![
            (
                "edgegate-error".into(),
                bytes::Bytes::from(error.to_owned()),
            ),
            (
                "edgegate-failed-seq".into(),
                bytes::Bytes::from_static(b"41"),
            ),
        ],
        payload: bytes::Bytes::from_static(payload),
    };
    for record in [
        refused(b"{\"t\":21.5}", "Broker: Message size too large"),
        refused(&[0xff, 0x00, 0x10], "Broker: Topic authorization failed"),
    ] {
        log.append(&record).expect("append").await.expect("durable");
    }
    // The log stays open (and locked) while the command reads it.
    let out = dead_letters();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["error"], "Broker: Message size too large");
    assert_eq!(lines[0]["topic"], "iot.a.telemetry");
    assert_eq!(lines[0]["key"], "pump-7");
    assert_eq!(lines[0]["device"], "pump-7");
    assert_eq!(lines[0]["failed_seq"], "41");
    assert_eq!(lines[0]["payload"], "{\"t\":21.5}");
    assert_eq!(lines[1]["payload_hex"], "ff0010");
    assert_eq!(lines[1]["seq"], 1);
    log.close().await.expect("close");

    // Without the key the records are not readable, and the command says why.
    dead_letter_config.write(&config);
    let out = dead_letters();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("which is not configured"), "{text}");
}
