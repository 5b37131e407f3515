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
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgegate::buffer::{Durability, Log, LogConfig};
use edgegate::config::Config;
use edgegate::forward::config::KafkaConfig;
use edgegate::forward::{Forwarder, LastError, LinkState, Progress};
use edgegate::record::{Record, Source};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const GATEWAY: &str = "gw-ksec";

/// Writes `gateway.toml` into `dir` with `kafka` as its `[kafka]` part and loads it as the
/// binary does (validation included: files, modes, the librdkafka preflight).
fn load_kafka(dir: &Path, kafka: &str) -> KafkaConfig {
    let path = dir.join("gateway.toml");
    // Notice a fixed broker (or config) quickly.
    let kafka = kafka.replacen("[kafka]\n", "[kafka]\nretry_backoff_max = \"1s\"\n", 1);
    let text = format!("{kafka}\n[[routes]]\nmatch = \"#\"\ntopic = \"unused\"\n");
    std::fs::write(&path, &text).expect("write gateway.toml");
    match Config::load(&path) {
        Ok(config) => config.kafka,
        Err(e) => panic!("{e}\n--- {}:\n{text}", path.display()),
    }
}

fn write_secret(dir: &Path, name: &str, value: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).expect("write secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn sasl_ssl(mechanism: &str, password: &str) -> String {
    let s = common::secured();
    format!(
        "[kafka]\nbrokers = [\"{}\"]\n\n[kafka.tls]\nca_file = \"{}\"\n\n\
         [kafka.sasl]\nmechanism = \"{mechanism}\"\nusername = \"{}\"\n{password}\n",
        s.sasl_ssl,
        s.ca.display(),
        s.sasl_user
    )
}

fn mutual_tls(ca: &Path, client_cert: bool) -> String {
    let s = common::secured();
    let cert = if client_cert {
        format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            s.client_cert.display(),
            s.client_key.display()
        )
    } else {
        String::new()
    };
    format!(
        "[kafka]\nbrokers = [\"{}\"]\n\n[kafka.tls]\nca_file = \"{}\"\n{cert}",
        s.ssl,
        ca.display()
    )
}

async fn open(dir: &Path) -> (Log, Log) {
    let main = LogConfig {
        durability: Durability::Fsync,
        ..LogConfig::new(dir.join("log"))
    };
    let dead = LogConfig::new(dir.join("log/dead-letter"));
    tokio::task::spawn_blocking(move || {
        let (log, _) = Log::open(main).expect("open the log");
        let (dead, _) = Log::open(dead).expect("open the dead-letter log");
        (log, dead)
    })
    .await
    .expect("open task")
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

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), edgegate::forward::ForwardError>>,
    progress: watch::Receiver<Progress>,
    link: watch::Receiver<LinkState>,
    last_error: LastError,
}

fn start(log: &Log, dead: &Log, cfg: &KafkaConfig) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let forwarder = Forwarder::new(cfg, GATEWAY, log.reader().expect("reader"), dead.clone())
        .expect("forwarder")
        .with_shutdown_grace(Duration::from_secs(2));
    let shutdown = CancellationToken::new();
    Running {
        progress: forwarder.progress(),
        link: forwarder.link_state(),
        last_error: forwarder.last_error(),
        shutdown: shutdown.clone(),
        task: tokio::spawn(forwarder.run(shutdown)),
    }
}

impl Running {
    async fn delivered(&self, n: u64) {
        let mut progress = self.progress.clone();
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            progress.wait_for(|p| p.delivered + p.dead_lettered >= n),
        )
        .await
        .map(|r| r.map(drop));
        assert!(
            matches!(waited, Ok(Ok(()))),
            "fewer than {n} records finished within 60 s: {:?}; last error {:?}",
            *self.progress.borrow(),
            self.last_error.get()
        );
    }

    /// Waits until the last error contains one of `needles`; returns it.
    async fn refused_with(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(error) = self.last_error.get() {
                if needles.iter().any(|n| error.contains(n)) {
                    return error;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no error containing {needles:?} within 30 s; last error {:?}",
                self.last_error.get()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("forwarder stops within its grace period")
            .expect("forwarder task")
            .expect("forwarder result");
    }
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
async fn forwards_through(kafka: impl FnOnce(&Path) -> String, prefix: &str) {
    let _kafka = common::shared();
    let topic = new_topic(prefix).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = load_kafka(dir.path(), &kafka(dir.path()));
    let (log, dead) = open(dir.path()).await;
    let sent = append(&log, &topic, 200).await;
    let running = start(&log, &dead, &cfg);
    running.delivered(200).await;
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
            sasl_ssl("scram-sha-256", "password_file = \"kafka.password\"")
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
                &format!("password_file = \"{}\"", path.display()),
            )
        },
        "ksec-scram512",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_over_sasl_ssl_with_the_password_inline() {
    forwards_through(
        |_| {
            sasl_ssl(
                "plain",
                &format!("password = \"{}\"", common::secured().sasl_password),
            )
        },
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
async fn refused_then_fixed(refused: &str, needles: &[&str], fixed: &str, prefix: &str) {
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
    running.delivered(50).await;
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
        &sasl_ssl("scram-sha-512", "password = \"not-the-password\""),
        &["SASL authentication error", "Authentication failed"],
        &sasl_ssl("scram-sha-512", &format!("password = \"{password}\"")),
        "ksec-wrong-pw",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_tls_failure_and_loses_nothing() {
    let s = common::secured();
    refused_then_fixed(
        &mutual_tls(&s.other_ca, true),
        &["certificate verify failed"],
        &mutual_tls(&s.ca, true),
        "ksec-wrong-ca",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_listener_refuses_a_gateway_without_a_client_certificate() {
    let s = common::secured();
    refused_then_fixed(
        &mutual_tls(&s.ca, false),
        // The broker aborts the handshake with a TLS alert: "bad certificate" (TLS 1.2 and
        // Java's TLS 1.3) or "certificate required" (RFC 8446).
        &["bad certificate", "certificate required"],
        &mutual_tls(&s.ca, true),
        "ksec-no-cert",
    )
    .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The real `edgegate` binary on a config written for one test, its stderr in a file.
struct Binary {
    child: Option<std::process::Child>,
    config: std::path::PathBuf,
    stderr: std::path::PathBuf,
    mqtt_port: u16,
    admin_port: u16,
    env: Vec<(String, String)>,
}

impl Binary {
    /// Writes gateway.toml into `dir` (MQTT, CoAP and admin on free ports, one route from
    /// `plant/+device/#` to `topic` keyed by device, `kafka` as the Kafka part) and checks
    /// it with `edgegate validate`.
    fn new(dir: &Path, topic: &str, kafka: &str, env: &[(&str, &str)]) -> Binary {
        let (mqtt_port, admin_port) = (free_port(), free_port());
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"{GATEWAY}\"\nshutdown_grace = \"5s\"\n\n\
                 [buffer]\ndir = \"log\"\nsegment_size = \"1MiB\"\nmax_size = \"64MiB\"\n\n\
                 [coap]\nlisten = \"127.0.0.1:0\"\n\n\
                 [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
                 [mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\n\n{kafka}\n\
                 [[routes]]\nmatch = \"plant/+device/#\"\ntopic = \"{topic}\"\nkey = \"{{device}}\"\n"
            ),
        )
        .expect("write config");
        let binary = Binary {
            child: None,
            config,
            stderr: dir.join("stderr.log"),
            mqtt_port,
            admin_port,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let validate = Command::new(env!("CARGO_BIN_EXE_edgegate"))
            .args(["validate", "--config"])
            .arg(&binary.config)
            .envs(binary.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run edgegate validate");
        assert!(
            validate.status.success(),
            "{}",
            String::from_utf8_lossy(&validate.stderr)
        );
        binary
    }

    /// Starts the binary (again) and waits for its MQTT port.
    fn start(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_edgegate"))
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn edgegate");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.mqtt_port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("edgegate exited at startup: {status}\n{}", self.printed());
            }
            assert!(
                Instant::now() < deadline,
                "edgegate did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Publishes `lines` at QoS 1 with mosquitto_pub; each is acknowledged once durable.
    fn publish(&self, lines: &[String]) {
        let mut publisher = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args([
                "-i",
                "ksec-pub",
                "-t",
                "plant/dev-1/telemetry",
                "-q",
                "1",
                "-l",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub");
        let mut stdin = publisher.stdin.take().expect("stdin");
        for line in lines {
            writeln!(stdin, "{line}").expect("publish");
        }
        drop(stdin);
        assert!(publisher.wait().expect("mosquitto_pub").success());
    }

    /// SIGTERM and the exit status of the graceful stop.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().expect("wait")
    }

    /// One admin endpoint's body.
    fn get(&self, path: &str) -> String {
        use std::io::Read;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)) else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    }

    fn printed(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
    let dir = tempfile::tempdir().expect("tempdir");
    let kafka = format!(
        "[kafka]\nbrokers = [\"{}\"]\n\n[kafka.tls]\nca_file = \"{}\"\n\n\
         [kafka.sasl]\nmechanism = \"scram-sha-256\"\nusername = \"{}\"\n\
         password_env = \"EDGEGATE_KSEC_TEST_PASSWORD\"\n\n\
         [kafka.properties]\ndebug = \"conf,security,broker\"\n",
        s.sasl_ssl,
        s.ca.display(),
        s.sasl_user
    );
    let env = [("EDGEGATE_KSEC_TEST_PASSWORD", s.sasl_password.as_str())];
    let mut gateway = Binary::new(dir.path(), &topic, &kafka, &env);
    gateway.start();
    let lines: Vec<String> = (0..30).map(|n| format!("{{\"reading\":{n}}}")).collect();
    gateway.publish(&lines);
    let got = common::consume_all_blocking(&topic, lines.len(), Duration::from_secs(60));
    let status = gateway.stop();
    let printed = gateway.printed();
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
    let dir = tempfile::tempdir().expect("tempdir");
    write_secret(dir.path(), "kafka.password", "not-the-password");
    let kafka = format!(
        "[kafka]\nbrokers = [\"{}\"]\nretry_backoff_max = \"1s\"\n\n\
         [kafka.tls]\nca_file = \"{}\"\n\n\
         [kafka.sasl]\nmechanism = \"scram-sha-512\"\nusername = \"{}\"\n\
         password_file = \"kafka.password\"\n",
        s.sasl_ssl,
        s.ca.display(),
        s.sasl_user
    );
    let mut gateway = Binary::new(dir.path(), &topic, &kafka, &[]);
    gateway.start();
    let lines: Vec<String> = (0..20).map(|n| format!("{{\"reading\":{n}}}")).collect();
    gateway.publish(&lines);

    let deadline = Instant::now() + Duration::from_secs(30);
    let (readyz, metrics) = loop {
        let readyz = gateway.get("/readyz");
        let metrics = gateway.get("/metrics");
        if readyz.contains("SASL authentication error")
            && metrics.contains("edgegate_kafka_client_errors_total{kind=\"authentication\"}")
        {
            break (readyz, metrics);
        }
        assert!(
            Instant::now() < deadline,
            "no authentication error within 30 s:\n{readyz}\n{}",
            gateway.printed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(readyz.contains("\"degraded\""), "{readyz}");
    assert!(metrics.contains("edgegate_kafka_link_up 0"), "{metrics}");
    let status = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args([
            "status",
            "--admin",
            &format!("127.0.0.1:{}", gateway.admin_port),
        ])
        .output()
        .expect("edgegate status");
    let summary = String::from_utf8_lossy(&status.stdout);
    assert!(
        summary.contains("last error") && summary.contains("SASL authentication error"),
        "{summary}"
    );
    assert!(
        gateway
            .printed()
            .contains("Kafka refused the gateway (TLS or SASL)")
    );
    assert!(gateway.stop().success());
    assert!(
        common::consume_all_blocking(&topic, 1, Duration::from_secs(2)).is_empty(),
        "nothing reached Kafka with the wrong password"
    );

    write_secret(dir.path(), "kafka.password", &s.sasl_password);
    gateway.start();
    let got = common::consume_all_blocking(&topic, lines.len(), Duration::from_secs(60));
    assert_eq!(
        payloads(&got),
        lines,
        "every message, once, in order, after the fix"
    );
    assert!(gateway.stop().success());
}
