//! The test harness: what every integration test uses to run a gateway, feed it and read back
//! what it forwarded. New tests use these and nothing of their own for the same jobs.
//!
//! - [`config`]: `gateway.toml` for one test, [`GatewayToml`], with defaults for tests (every
//!   listener on `127.0.0.1:0`, the run's test broker as Kafka, a small buffer beside it).
//! - [`gateway`]: one gateway on that config, in a fresh directory, started in this process
//!   or as the real binary; the addresses its listeners got come back from it.
//! - [`mqtt`]: publishing with real clients ([`mosquitto_pub`], [`rumqttc`]) and raw packets.
//! - [`drivers`]: scenarios played by independent clients (Eclipse Paho Go, MQTT.js), for
//!   the conformance tests.
//! - [`load`]: steady QoS 1 load from many rumqttc devices that reconnect through faults.
//! - [`forwarder`]: the forwarder alone over a log the test fills, for tests of the Kafka side
//!   that look at the log themselves.
//! - [`kafka`]: the one Kafka broker of the test run, the guards for tests that stop it, and
//!   reading topics back ([`consume_all`]).
//! - [`cluster`]: a three-broker Kafka cluster for the failover tests, started on first use.
//! - [`http`]: the admin endpoint (`/metrics`, `/readyz`) over plain HTTP.
//! - [`registry`]: a schema registry (Confluent's REST API) for the `avro` routes' tests.
//!
//! # Starting a gateway
//!
//! ```ignore
//! let gw = common::gateway(GatewayToml::new().id("my-gw").route("#", &topic)).start();
//! let acked = common::rumqttc(gw.mqtt_addr(), "dev-1").publish("a/1", payloads).await;
//! ```
//!
//! [`Builder::start`] runs it **in process** (`edgegate::start` on a runtime of its own, in a
//! thread of its own) and returns once the listeners are bound; `mqtt_addr()`, `coap_addr()`,
//! `mqtts_addr()` and `admin_addr()` are the addresses they got. Use it by default: it
//! starts fast and works the same from `#[test]` and `#[tokio::test]`.
//!
//! [`Builder::start_process`] runs **the real binary** (`edgegate run`) and reads the same
//! addresses from its startup log lines. Use it only where the test needs what only a process
//! has:
//!
//! - signals (SIGHUP reload, SIGTERM and the exit status), SIGKILL and restarts on the same
//!   log ([`Process::kill`], [`Process::restart`]; [`Builder::pin_addresses`] keeps the ports
//!   across restarts, for clients that reconnect, and for `edgegate status --config`);
//! - systemd's environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`) or any variable of its own
//!   ([`Builder::env`]);
//! - the gateway's log output ([`Process::wait_for_log`]): in process, logs go to the test's
//!   tracing subscriber, shared by every test in the binary;
//! - metrics that only this gateway moved: in process, every gateway of the test binary
//!   shares the one Prometheus recorder.
//!
//! Both are stopped when dropped (in process: shut down and waited for; the binary: SIGKILL)
//! and their directory is deleted.
//!
//! # Kafka
//!
//! A test that needs the broker up holds [`shared()`] for its whole body, one that stops it
//! holds [`exclusive()`]; see [`kafka`].

// Each test binary uses a different part of this module (and of what it re-exports).
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod config;
pub mod drivers;
pub mod forwarder;
pub mod gateway;
pub mod http;
pub mod kafka;
pub mod load;
pub mod mqtt;
pub mod registry;
pub mod subscribe;

pub use config::{GatewayToml, Password};
pub use gateway::{Builder, InProcess, Process, gateway};
pub use http::{http_get, metric};
pub use kafka::{
    Consumed, Exclusive, bootstrap, by_partition, client_config, consume_all, consume_all_blocking,
    create_topic, exclusive, secured, shared, unique_topic,
};
pub use mqtt::{mosquitto_pub, mqtt_frame, mqtt_string, rumqttc};

/// A runtime of two workers for clients a synchronous `#[test]` drives (rumqttc devices).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The gateway's dead-letter log as `edgegate dead-letters --config <config>` prints it, one
/// JSON object a record, in the main log's order (`failed_seq`: each record is written by a
/// task of its own, so the dead-letter log's own order is not always the main log's).
#[allow(dead_code)]
pub fn dead_letters(config: &std::path::Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["dead-letters", "--config"])
        .arg(config)
        .output()
        .expect("run edgegate dead-letters");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dead: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    dead.sort_by_key(|d| {
        d["failed_seq"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    dead
}

/// `2026-12-04T01:30:47.729697Z` (how the gateway's log lines begin) as a time.
pub fn parse_utc(text: &str) -> Option<std::time::SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (h, min, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + min * 60 + sec).ok()?;
    Some(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

/// Waits until `done`, looking every 200 ms, at most `timeout` (then fails, naming `what`).
pub fn wait_until(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
