//! The downlink end to end: commands produced to a real Kafka with kcat, a real device
//! (rumqttc, persistent session) that is offline while they arrive, the gateway SIGKILLed
//! and restarted and Kafka stopped in between. Every unexpired command arrives exactly
//! once, in order; what became of each is read back from the status topic.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::subscribe::{Received, Subscriber, SubscriberOptions};
use common::{GatewayToml, gateway};

const GATEWAY: &str = "gw-downlink";

/// Produces `lines` to `topic` with kcat, keyed `key`, with `headers`.
fn produce(topic: &str, key: &str, headers: &[(&str, &str)], lines: &[String]) {
    let mut args = vec![
        "-P".to_owned(),
        "-b".to_owned(),
        common::bootstrap(),
        "-t".to_owned(),
        topic.to_owned(),
        "-k".to_owned(),
        key.to_owned(),
    ];
    for (k, v) in headers {
        args.push("-H".to_owned());
        args.push(format!("{k}={v}"));
    }
    let mut kcat = Command::new("kcat")
        .args(&args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat (Debian: kcat)");
    let mut stdin = kcat.stdin.take().expect("stdin");
    for line in lines {
        writeln!(stdin, "{line}").expect("write");
    }
    drop(stdin);
    assert!(kcat.wait().expect("kcat").success());
}

/// A `[[downlink]]` table: commands from `commands` to `mqtt_topic`, outcomes to `status`
/// (none if empty), then `extra` lines.
fn downlink(commands: &str, mqtt_topic: &str, status: &str, extra: &str) -> String {
    let status = if status.is_empty() {
        String::new()
    } else {
        format!("status_topic = \"{status}\"")
    };
    format!(
        "\n[[downlink]]\ntopic = \"{commands}\"\nmqtt_topic = \"{mqtt_topic}\"\n{status}\n{extra}\n"
    )
}

fn readiness(admin: std::net::SocketAddr) -> serde_json::Value {
    let (_, body) = common::http_get(admin, "/readyz");
    serde_json::from_str(&body).expect("/readyz")
}

#[test]
fn commands_wait_at_the_edge_across_a_sigkill_and_a_kafka_outage() {
    let kafka = common::exclusive();
    let commands = common::unique_topic("commands");
    let status = common::unique_topic("command-status");
    let telemetry = common::unique_topic("dl-telemetry");
    for t in [&commands, &status, &telemetry] {
        common::create_topic(t, 1);
    }
    let mut gw = gateway(
        GatewayToml::new()
            .id(GATEWAY)
            .route("#", &telemetry)
            .raw(&downlink(&commands, "devices/{key}/commands", &status, "")),
    )
    .pin_addresses()
    .start_process();
    let addr = gw.mqtt_addr();
    let runtime = common::runtime();
    let device = || SubscriberOptions::new("pump7").v5().persistent(3600);
    runtime.block_on(async {
        let mut d = Subscriber::connect(addr, device()).await;
        assert_eq!(d.subscribe("devices/pump7/commands", 1).await, 1);
        d.disconnect().await;
    });

    // While the device is away: 50 commands for it, 5 for another gateway (skipped), one
    // that expires in a second, one for a device with no session.
    let ours = [("edgegate-gateway", GATEWAY)];
    let lines: Vec<String> = (0..50).map(|i| format!("cmd-{i}")).collect();
    produce(&commands, "pump7", &ours, &lines);
    produce(
        &commands,
        "pump7",
        &[("edgegate-gateway", "gw-other")],
        &(0..5).map(|i| format!("other-{i}")).collect::<Vec<_>>(),
    );
    produce(
        &commands,
        "pump7",
        &[("edgegate-gateway", GATEWAY), ("edgegate-expiry", "1")],
        &["stale".to_owned()],
    );
    let stale_at = Instant::now();
    produce(&commands, "nobody", &ours, &["lost".to_owned()]);
    // "lost" was produced last: once it is reported, everything before it was taken. The
    // stale one may have expired before the gateway read it (reported at once) or wait in
    // the queue until the device comes (reported then).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = common::http_get(gw.admin_addr(), "/metrics");
        let no_session = common::metric(
            &metrics,
            "edgegate_downlink_outcomes_total{outcome=\"no_session\"}",
        );
        let queued = readiness(gw.admin_addr())["broker"]["queued_messages"]
            .as_u64()
            .unwrap_or(0);
        if no_session == Some(1.0) && queued >= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the commands never arrived: {queued} queued, {no_session:?} reported"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What is held, how old the oldest is, and how far the consumer is behind: nothing,
    // once its statistics (every 5 s) report.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = common::http_get(gw.admin_addr(), "/metrics");
        let held = common::metric(&metrics, "edgegate_downlink_commands_held");
        let age = common::metric(&metrics, "edgegate_downlink_oldest_command_age_seconds");
        let lag = common::metric(&metrics, "edgegate_downlink_consumer_lag");
        assert!(
            matches!(held, Some(h) if h == 50.0 || h == 51.0),
            "{held:?}"
        );
        assert!(matches!(age, Some(a) if a > 0.0 && a < 120.0), "{age:?}");
        if lag == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "consumer lag {lag:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Let the journal take the last mark (its group commit takes milliseconds): killed
    // before it, the gateway would take those records again and report them twice, which
    // outcomes allow (at least once, identified by topic, partition and offset).
    std::thread::sleep(Duration::from_secs(1));
    gw.kill();
    kafka.stop_broker();
    gw.restart();
    // Held on the gateway's disk, with their age, while Kafka is away.
    let broker = &readiness(gw.admin_addr())["broker"];
    assert!(
        matches!(broker["commands_held"].as_u64(), Some(50 | 51)),
        "{broker}"
    );
    assert!(broker["oldest_command_ms"].as_i64().is_some(), "{broker}");
    // The stale command's second has passed by the time the device is back.
    std::thread::sleep(
        (stale_at + Duration::from_secs(2)).saturating_duration_since(Instant::now()),
    );
    runtime.block_on(async {
        let mut d = Subscriber::connect(addr, device()).await;
        assert!(d.session_present);
        let got = d.recv(60, Duration::from_secs(3)).await;
        assert_eq!(
            got.iter().map(Received::text).collect::<Vec<_>>(),
            lines,
            "every unexpired command exactly once, in order, with Kafka down"
        );
        d.disconnect().await;
    });
    kafka.start_broker();
    // Nothing is taken twice once Kafka is back (its offsets may be behind the journal).
    std::thread::sleep(Duration::from_secs(5));
    runtime.block_on(async {
        let mut d = Subscriber::connect(addr, device()).await;
        assert!(
            d.recv(1, Duration::from_secs(3)).await.is_empty(),
            "no command twice"
        );
        d.disconnect().await;
    });

    let outcomes = common::consume_all_blocking(&status, 52, Duration::from_secs(60));
    let mut kinds = std::collections::HashMap::new();
    for o in &outcomes {
        let v: serde_json::Value =
            serde_json::from_slice(o.payload.as_deref().unwrap_or_default()).expect("JSON");
        *kinds
            .entry(v["outcome"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
        assert_eq!(v["topic"], commands.as_str());
    }
    assert_eq!(kinds.get("delivered"), Some(&50), "{kinds:?}");
    assert_eq!(kinds.get("expired"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("no_session"), Some(&1), "{kinds:?}");
    assert_eq!(outcomes.len(), 52, "one outcome per command: {kinds:?}");
}

/// Request/response through the gateway: a command's `mqtt-response-topic` and
/// `mqtt-correlation-data` headers reach an MQTT 5 device as Response Topic and Correlation
/// Data [MQTT-3.3.2-15], and its reply reaches Kafka with the same correlation as a header.
#[test]
fn a_command_and_its_reply_carry_the_correlation_both_ways() {
    let _kafka = common::shared();
    let commands = common::unique_topic("rr-commands");
    let replies = common::unique_topic("rr-replies");
    for t in [&commands, &replies] {
        common::create_topic(t, 1);
    }
    let gw = gateway(
        GatewayToml::new()
            .id("gw-rr")
            .route("plant/+/+/replies", &replies)
            .raw(&downlink(
                &commands,
                "plant/north/{key}/commands",
                "",
                r#"address = "all""#,
            )),
    )
    .start();
    let addr = gw.mqtt_addr();
    let runtime = common::runtime();
    runtime.block_on(async {
        let mut d = Subscriber::connect(addr, SubscriberOptions::new("pump7").v5()).await;
        assert_eq!(d.subscribe("plant/north/pump7/commands", 1).await, 1);
        produce(
            &commands,
            "pump7",
            &[
                ("mqtt-response-topic", "plant/north/pump7/replies"),
                ("mqtt-correlation-data", "req-42"),
            ],
            &["get-rpm".to_owned()],
        );
        let got = d.recv(1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "the command arrived");
        let command = &got[0];
        assert_eq!(command.text(), "get-rpm");
        assert_eq!(command.correlation_data.as_deref(), Some(&b"req-42"[..]));
        let response_topic = command.response_topic.clone().expect("Response Topic");
        assert_eq!(response_topic, "plant/north/pump7/replies");
        d.publish_correlated(&response_topic, b"rpm=1450", b"req-42")
            .await;
        let records = common::consume_all(&replies, 1, Duration::from_secs(60)).await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].payload.as_deref(), Some(&b"rpm=1450"[..]));
        assert_eq!(
            records[0].header("mqtt-correlation-data"),
            Some(&b"req-42"[..])
        );
        d.disconnect().await;
    });
}

/// A command held for a session that ends without it is reported, not forgotten: here a
/// device's persistent session holds two commands and the device comes back with a clean
/// start [MQTT-3.1.2-4], which discards that session; the status topic says `session_ended`
/// for each, with the client id. (Expiry and `max_offline_sessions` take the same path.)
#[test]
fn commands_of_a_session_that_ends_are_reported_session_ended() {
    let _kafka = common::shared();
    let commands = common::unique_topic("se-commands");
    let status = common::unique_topic("se-status");
    for t in [&commands, &status] {
        common::create_topic(t, 1);
    }
    let gw = gateway(
        GatewayToml::new()
            .id("gw-se")
            .route("#", &status)
            .raw(&downlink(
                &commands,
                "devices/{key}/commands",
                &status,
                r#"address = "all""#,
            )),
    )
    .start();
    let addr = gw.mqtt_addr();
    let runtime = common::runtime();
    runtime.block_on(async {
        let mut d =
            Subscriber::connect(addr, SubscriberOptions::new("valve3").v5().persistent(3600)).await;
        assert_eq!(d.subscribe("devices/valve3/commands", 1).await, 1);
        d.disconnect().await;
    });
    produce(
        &commands,
        "valve3",
        &[("correlation-id", "c-1")],
        &["open".to_owned(), "close".to_owned()],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while readiness(gw.admin_addr())["broker"]["commands_held"].as_u64() != Some(2) {
        assert!(Instant::now() < deadline, "the commands were never held");
        std::thread::sleep(Duration::from_millis(200));
    }
    runtime.block_on(async {
        let mut d = Subscriber::connect(addr, SubscriberOptions::new("valve3").v5()).await;
        assert!(!d.session_present);
        assert!(
            d.recv(1, Duration::from_secs(1)).await.is_empty(),
            "a clean start gets nothing of the old session"
        );
        d.disconnect().await;
    });
    let outcomes = common::consume_all_blocking(&status, 2, Duration::from_secs(60));
    assert_eq!(outcomes.len(), 2);
    for (o, offset) in outcomes.iter().zip([0, 1]) {
        let v: serde_json::Value =
            serde_json::from_slice(o.payload.as_deref().unwrap_or_default()).expect("JSON");
        assert_eq!(v["outcome"], "session_ended", "{v}");
        assert_eq!(v["client_id"], "valve3", "{v}");
        assert_eq!(v["offset"], offset, "{v}");
        assert_eq!(o.header("edgegate-correlation"), Some(&b"c-1"[..]));
    }
}
