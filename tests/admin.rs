//! The admin endpoints and `edgegate status`, black box: the real binary with real MQTT
//! clients (`mosquitto_pub`), read over plain HTTP; Kafka either unreachable (brokers at a
//! closed port: the gateway must say "degraded", not "dead") or the shared test broker.
//! Also two gateways started in-process with `edgegate::start`, which share the process's
//! one metrics recorder but each report their own readiness.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgegate::admin::Status;
use edgegate::config::Config;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn publish(port: u16, topic: &str, message: &str) {
    let status = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            message,
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub: {status}");
}

/// The binary on a config of its own (MQTT and admin on free ports, CoAP on port 0).
struct Gateway {
    child: Option<Child>,
    config: PathBuf,
    mqtt: u16,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start(brokers: &str, routes: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let mqtt = free_port();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"admin-gw\"\nshutdown_grace = \"2s\"\n\n\
                 [buffer]\ndir = \"log\"\nsegment_size = \"1MiB\"\nmax_size = \"64MiB\"\n\n\
                 [mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[coap]\nlisten = \"127.0.0.1:0\"\n\n\
                 [admin]\nlisten = \"{admin}\"\n\n[kafka]\nbrokers = [\"{brokers}\"]\n\n{routes}"
            ),
        )
        .expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_edgegate"))
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn edgegate");
        let mut gateway = Gateway {
            child: Some(child),
            config,
            mqtt,
            admin,
            _dir: dir,
        };
        wait_for("the admin listener", Duration::from_secs(30), || {
            if let Some(status) = gateway
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("edgegate exited at startup: {status}");
            }
            TcpStream::connect(admin).is_ok()
        });
        gateway
    }

    fn status(&self) -> Output {
        status_of(&self.config)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let exit = child.wait().expect("wait");
            assert!(exit.success(), "edgegate exited with {exit}");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
    let mut gw = Gateway::start("127.0.0.1:1", "[default_route]\ntopic = \"iot.unrouted\"\n");
    let (code, body) = common::http_get(gw.admin, "/healthz");
    assert_eq!((code, body.trim()), (200, "alive"));

    let (code, body) = common::http_get(gw.admin, "/readyz");
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(ready["status"], "degraded", "{body}");
    assert_eq!(ready["kafka"], "down", "{body}");
    assert_eq!(ready["log"]["open"], true, "{body}");
    assert_eq!(ready["listeners"], 2, "{body}");

    publish(gw.mqtt, "plant/a/pump7/telemetry", "hello");
    publish(gw.mqtt, "plant/a/pump7/telemetry", "world!");
    let mut text = String::new();
    wait_for("the log gauges", Duration::from_secs(5), || {
        text = common::http_get(gw.admin, "/metrics").1;
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
        let port = gw.mqtt;
        std::thread::spawn(move || {
            for i in 0..20 {
                publish(port, "plant/a/pump7/telemetry", &format!("m{i}"));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = gw.status();
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

    gw.stop();
    let out = gw.status();
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
    let gw = Gateway::start(
        &common::bootstrap(),
        &format!("[default_route]\ntopic = \"{topic}\"\n"),
    );
    publish(gw.mqtt, "x/y", "to kafka");
    let mut text = String::new();
    wait_for("a delivery", Duration::from_secs(60), || {
        text = common::http_get(gw.admin, "/metrics").1;
        common::metric(&text, "edgegate_kafka_delivered_total").is_some_and(|n| n >= 1.0)
    });
    assert!(
        common::metric(&text, "edgegate_kafka_produce_latency_seconds_count")
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    wait_for("the link gauge", Duration::from_secs(5), || {
        common::metric(
            &common::http_get(gw.admin, "/metrics").1,
            "edgegate_kafka_link_up",
        ) == Some(1.0)
    });
    let (code, body) = common::http_get(gw.admin, "/readyz");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!((code, &ready["status"]), (200, &"ready".into()), "{body}");
    assert_eq!(ready["kafka"], "up", "{body}");
    assert_eq!(ready["forwarder"]["delivered"], 1, "{body}");

    wait_for("the backlog to empty", Duration::from_secs(5), || {
        common::metric(
            &common::http_get(gw.admin, "/metrics").1,
            "edgegate_log_records",
        ) == Some(0.0)
    });
    let out = gw.status();
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
    std::fs::write(
        &config,
        "[admin]\nenabled = false\n\n[default_route]\ntopic = \"t\"\n",
    )
    .expect("config");
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

fn config_text(dir: &Path) -> String {
    format!(
        "[buffer]\ndir = \"{}\"\nsegment_size = \"1MiB\"\nmax_size = \"64MiB\"\n\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\n\n[coap]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[kafka]\nbrokers = [\"127.0.0.1:1\"]\n\n\
         [default_route]\ntopic = \"t\"\n",
        dir.display()
    )
}

/// Two gateways in one process: the recorder is installed once and both serve it; each
/// `/readyz` describes its own log; stopping one makes only that one "stopping".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_in_one_process_share_the_recorder_and_keep_their_own_health() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let start = |dir: &Path, shutdown: CancellationToken| {
        let config = Config::parse(&config_text(dir), Path::new("test.toml")).expect("config");
        async move { edgegate::start(config, shutdown).await }
    };
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let a = start(dir_a.path(), stop_a.clone())
        .await
        .expect("gateway a");
    let b = start(dir_b.path(), stop_b.clone())
        .await
        .expect("gateway b");
    let (admin_a, admin_b) = (
        a.admin_addr().expect("admin a"),
        b.admin_addr().expect("admin b"),
    );
    let mqtt_a = a.mqtt_addr().port();
    tokio::task::spawn_blocking(move || publish(mqtt_a, "x", "only a"))
        .await
        .expect("publish");

    let (ra, rb, ma, mb) = tokio::task::spawn_blocking(move || {
        (
            common::http_get(admin_a, "/readyz"),
            common::http_get(admin_b, "/readyz"),
            common::http_get(admin_a, "/metrics"),
            common::http_get(admin_b, "/metrics"),
        )
    })
    .await
    .expect("requests");
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

    stop_a.cancel();
    assert_eq!(a.health().readiness().status, Status::Stopping);
    assert_eq!(b.health().readiness().status, Status::Degraded);
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    a.wait(rx).await.expect("a stops");
    stop_b.cancel();
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    b.wait(rx).await.expect("b stops");
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
    std::fs::write(
        &config,
        "[buffer]\ndir = \"log\"\n\n[buffer.encryption]\nenabled = true\nkey_file = \"log.key\"\n\n\
         [[routes]]\nmatch = \"#\"\ntopic = \"t\"\n",
    )
    .expect("config");
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
    std::fs::write(
        &config,
        "[buffer]\ndir = \"log\"\n\n[[routes]]\nmatch = \"#\"\ntopic = \"t\"\n",
    )
    .expect("config");
    let out = dead_letters();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("which is not configured"), "{text}");
}
