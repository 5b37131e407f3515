//! The local broker end to end with real clients (rumqttc 3.1.1 and 5, mosquitto_sub,
//! mosquitto_pub) against a whole gateway whose Kafka is unreachable: local delivery must not
//! depend on the uplink. Each test names the normative statements it checks.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

use common::subscribe::{Subscriber, SubscriberOptions, mosquitto_sub};
use common::{GatewayToml, gateway};

const QUIET: Duration = Duration::from_secs(3);

fn config() -> GatewayToml {
    GatewayToml::new().kafka_unreachable().route("#", "local")
}

fn payloads(n: usize, prefix: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .collect()
}

/// Devices publish while Kafka is down; subscribers on overlapping filters get every
/// message once it is durable, in publish order per publisher, with the granted QoS
/// [MQTT-3.8.4-6] and wildcards per [MQTT-4.7.1-1..3].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_subscribers_get_device_data_while_kafka_is_down() {
    let gw = gateway(config()).start();
    let addr = gw.mqtt_addr();
    let mut all = Subscriber::connect(addr, SubscriberOptions::new("sub-all")).await;
    assert_eq!(all.subscribe("plant/#", 1).await, 1);
    let mut temps = Subscriber::connect(addr, SubscriberOptions::new("sub-temp").v5()).await;
    assert_eq!(temps.subscribe("plant/+/temp", 2).await, 2);
    let mut qos0 = Subscriber::connect(addr, SubscriberOptions::new("sub-q0")).await;
    assert_eq!(qos0.subscribe("plant/a/temp", 0).await, 0);

    let (a, b) = tokio::join!(
        common::rumqttc(addr, "dev-a").publish("plant/a/temp", payloads(200, "a")),
        common::rumqttc(addr, "dev-b")
            .v5(true)
            .qos(2)
            .publish("plant/b/temp", payloads(200, "b")),
    );
    assert_eq!((a.len(), b.len()), (200, 200));
    common::rumqttc(addr, "dev-c")
        .publish("plant/c/pressure", payloads(5, "c"))
        .await;

    let got = all.recv(405, QUIET).await;
    assert_eq!(got.len(), 405, "plant/# gets everything");
    let got = temps.recv(400, QUIET).await;
    assert_eq!(
        got.len(),
        400,
        "plant/+/temp gets both temps and no pressure"
    );
    for prefix in ["a", "b"] {
        let mine: Vec<String> = got
            .iter()
            .filter(|r| r.text().starts_with(prefix))
            .map(Received::text)
            .collect();
        let expected: Vec<String> = (0..200).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(mine, expected, "in publish order per publisher");
    }
    // Granted QoS: min(publish, subscription).
    assert!(
        got.iter()
            .filter(|r| r.text().starts_with('a'))
            .all(|r| r.qos == 1)
    );
    assert!(
        got.iter()
            .filter(|r| r.text().starts_with('b'))
            .all(|r| r.qos == 2)
    );
    let got = qos0.recv(200, QUIET).await;
    assert_eq!(got.len(), 200);
    assert!(got.iter().all(|r| r.qos == 0 && r.topic == "plant/a/temp"));
    // Kafka never answered: the link is down, the messages wait in the log.
    let r = gw.health().readiness();
    assert_eq!(r.log.records, 405);
}

use common::subscribe::Received;

/// `$` topics are not matched by leading wildcards [MQTT-4.7.2-1]; `#` matches the parent
/// level [MQTT-4.7.1-2]. (Invalid filters, which these clients refuse to send, are tested
/// on raw packets in tests/mqtt.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_and_dollar_topics() {
    // `#` in a route does not match `$` topics either: they need a route of their own.
    let gw = gateway(config().route("$edge/#", "local-edge")).start();
    let addr = gw.mqtt_addr();
    let mut s = Subscriber::connect(addr, SubscriberOptions::new("s")).await;
    assert_eq!(s.subscribe("#", 1).await, 1);
    let mut v5 = Subscriber::connect(addr, SubscriberOptions::new("s5").v5()).await;
    assert_eq!(v5.subscribe("sport/#", 1).await, 1);
    let mut dollar = Subscriber::connect(addr, SubscriberOptions::new("d")).await;
    assert_eq!(dollar.subscribe("$edge/#", 1).await, 1);

    common::rumqttc(addr, "dev")
        .publish("$edge/x", vec![b"d".to_vec()])
        .await;
    common::rumqttc(addr, "dev")
        .publish("sport", vec![b"s".to_vec()])
        .await;
    let got = s.recv(2, QUIET).await;
    assert_eq!(
        got.iter().map(Received::text).collect::<Vec<_>>(),
        ["s"],
        "# does not match $edge/x"
    );
    assert_eq!(dollar.recv(1, QUIET).await[0].text(), "d");
    assert_eq!(
        v5.recv(1, QUIET).await[0].text(),
        "s",
        "sport/# matches sport"
    );
}

/// Retained messages: stored on disk, sent on subscribe with RETAIN set [MQTT-3.3.1-6],
/// replaced per topic, cleared by an empty retained publish [MQTT-3.3.1-10], and they
/// survive a SIGKILL of the gateway. Live messages reach existing subscribers without
/// RETAIN [MQTT-3.3.1-9].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_sigkill() {
    let mut gw = gateway(config()).pin_addresses().start_process();
    let addr = gw.mqtt_addr();
    let publish = |topic: &str, message: &str| {
        let out = common::mosquitto_pub(addr)
            .topic(topic)
            .qos(1)
            .args(["-r"])
            .message(message);
        assert!(out.status.success(), "{out:?}");
    };
    publish("status/pump1", "old");
    publish("status/pump1", "running");
    publish("status/pump2", "stopped");
    publish("status/pump3", "gone soon");
    let clear = common::mosquitto_pub(addr)
        .topic("status/pump3")
        .qos(1)
        .args(["-r", "-n"])
        .run();
    assert!(clear.status.success(), "{clear:?}");

    let mut live = Subscriber::connect(addr, SubscriberOptions::new("live")).await;
    assert_eq!(live.subscribe("status/#", 1).await, 1);
    let got = live.recv(3, QUIET).await;
    let mut retained: Vec<(String, String, bool)> = got
        .iter()
        .map(|r| (r.topic.clone(), r.text(), r.retain))
        .collect();
    retained.sort();
    assert_eq!(
        retained,
        [
            ("status/pump1".into(), "running".into(), true),
            ("status/pump2".into(), "stopped".into(), true)
        ]
    );
    publish("status/pump2", "starting");
    let got = live.recv(1, QUIET).await;
    assert_eq!(got[0].text(), "starting");
    assert!(
        !got[0].retain,
        "a live message to an existing subscription has RETAIN 0"
    );
    live.abort();

    gw.kill();
    gw.restart();
    let mut child = mosquitto_sub(
        addr,
        &[
            "-t", "status/#", "-q", "1", "-C", "2", "-W", "10", "-F", "%t %r %p",
        ],
    );
    let status = child.wait().expect("mosquitto_sub");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert!(status.success(), "mosquitto_sub: {out}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["status/pump1 1 running", "status/pump2 1 starting"]);
}

/// A persistent session keeps its subscriptions and the QoS 1 messages published while its
/// client is away [MQTT-3.1.2-4]; they arrive in order when it returns, and session
/// present is set [MQTT-3.2.2-2]. A clean start forgets them [MQTT-3.1.2-6].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_what_was_published_while_it_was_away() {
    let gw = gateway(config()).start();
    let addr = gw.mqtt_addr();
    for v5 in [false, true] {
        let id = if v5 { "persist-5" } else { "persist-4" };
        let options = || {
            let o = SubscriberOptions::new(id).persistent(3600);
            if v5 { o.v5() } else { o }
        };
        let mut s = Subscriber::connect(addr, options()).await;
        assert!(!s.session_present);
        assert_eq!(s.subscribe(&format!("cmd/{id}/#"), 1).await, 1);
        s.disconnect().await;

        let acked = common::rumqttc(addr, "cloud")
            .publish(&format!("cmd/{id}/set"), payloads(50, "c"))
            .await;
        assert_eq!(acked.len(), 50);

        let mut s = Subscriber::connect(addr, options()).await;
        assert!(s.session_present, "[MQTT-3.2.2-2]");
        let got = s.recv(50, QUIET).await;
        assert_eq!(
            got.iter().map(Received::text).collect::<Vec<_>>(),
            (0..50).map(|i| format!("c{i}")).collect::<Vec<_>>(),
            "every queued message, in order"
        );
        s.disconnect().await;

        // Clean start: the session and its subscription are gone.
        let o = SubscriberOptions::new(id);
        let mut s = Subscriber::connect(addr, if v5 { o.v5() } else { o }).await;
        assert!(!s.session_present, "[MQTT-3.1.2-6]");
        common::rumqttc(addr, "cloud")
            .publish(&format!("cmd/{id}/set"), payloads(1, "late"))
            .await;
        assert!(s.recv(1, Duration::from_secs(1)).await.is_empty());
        s.disconnect().await;
    }
}

/// Messages sent and not acknowledged are sent again, with DUP, when the session resumes
/// [MQTT-4.4.0-1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_are_resent_with_dup() {
    let gw = gateway(config()).start();
    let addr = gw.mqtt_addr();
    let mut o = SubscriberOptions::new("lazy").persistent(3600);
    o.ack = false;
    let mut s = Subscriber::connect(addr, o).await;
    assert_eq!(s.subscribe("t", 1).await, 1);
    common::rumqttc(addr, "dev")
        .publish("t", payloads(3, "m"))
        .await;
    let first = s.recv(3, QUIET).await;
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|r| !r.dup));
    s.abort();

    let mut s = Subscriber::connect(addr, SubscriberOptions::new("lazy").persistent(3600)).await;
    assert!(s.session_present);
    let again = s.recv(3, QUIET).await;
    assert_eq!(
        again.iter().map(Received::text).collect::<Vec<_>>(),
        ["m0", "m1", "m2"]
    );
    assert!(
        again.iter().all(|r| r.dup),
        "[MQTT-4.4.0-1] resent with DUP"
    );
}

/// A shared subscription gives each message to one member of the group (MQTT 5 §4.8.2);
/// together they get every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_splits_the_messages() {
    let gw = gateway(config()).start();
    let addr = gw.mqtt_addr();
    let mut members = Vec::new();
    for i in 0..3 {
        let mut m = Subscriber::connect(addr, SubscriberOptions::new(&format!("w{i}")).v5()).await;
        assert_eq!(m.subscribe("$share/workers/jobs/#", 1).await, 1);
        members.push(m);
    }
    common::rumqttc(addr, "dev")
        .publish("jobs/x", payloads(300, "j"))
        .await;
    let mut counts = HashMap::new();
    let mut all = Vec::new();
    for (i, m) in members.iter_mut().enumerate() {
        let got = m.recv(300, Duration::from_secs(2)).await;
        counts.insert(i, got.len());
        all.extend(got.into_iter().map(|r| r.text()));
    }
    all.sort();
    let mut expected: Vec<String> = (0..300).map(|i| format!("j{i}")).collect();
    expected.sort();
    assert_eq!(all, expected, "each message exactly once over the group");
    assert!(
        counts.values().all(|&n| n > 0),
        "every member gets some: {counts:?}"
    );
}

/// MQTT 5 options: No Local [MQTT-3.8.3-3], Retain As Published [MQTT-3.3.1-12], and the
/// subscription identifiers of every matching subscription [MQTT-3.3.4-3].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_retain_as_published_and_subscription_ids() {
    let gw = gateway(config()).start();
    let addr = gw.mqtt_addr();
    let mut s = Subscriber::connect(addr, SubscriberOptions::new("opts").v5()).await;
    assert_eq!(s.subscribe_v5("room/+", 1, true, false, Some(7)).await, 1);
    assert_eq!(s.subscribe_v5("room/#", 1, false, true, Some(9)).await, 1);
    // Its own publish: only room/# (without No Local) matches it.
    s.publish("room/1", 1, true, b"own").await;
    let got = s.recv(1, QUIET).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].subscription_ids, [9]);
    assert!(got[0].retain, "Retain As Published keeps RETAIN");
    common::rumqttc(addr, "other")
        .publish("room/2", payloads(1, "x"))
        .await;
    let got = s.recv(1, QUIET).await;
    let mut ids = got[0].subscription_ids.clone();
    ids.sort();
    assert_eq!(ids, [7, 9], "one copy with both identifiers");
    assert!(
        s.recv(1, Duration::from_secs(1)).await.is_empty(),
        "exactly one copy"
    );
}

/// Subscribe rights: once rules exist a filter must be within a `subscribe` right (deny by
/// default); a refused filter gets 0x80 (3.1.1) / 0x87 (MQTT 5) and the rest still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_need_a_right_once_rules_exist() {
    let gw = gateway(config().raw(
        r##"
        [[auth.rules]]
        publish = ["#"]
        subscribe = ["devices/{client_id}/commands/#"]
        "##,
    ))
    .start();
    let addr = gw.mqtt_addr();
    let mut d = Subscriber::connect(addr, SubscriberOptions::new("pump7")).await;
    assert_eq!(d.subscribe("devices/pump7/commands/#", 1).await, 1);
    assert_eq!(d.subscribe("devices/pump8/commands/#", 1).await, 0x80);
    assert_eq!(d.subscribe("devices/+/commands/#", 1).await, 0x80);
    let mut d5 = Subscriber::connect(addr, SubscriberOptions::new("pump9").v5()).await;
    assert_eq!(d5.subscribe("#", 1).await, 0x87);
    common::rumqttc(addr, "cloud")
        .publish("devices/pump7/commands/start", payloads(1, "go"))
        .await;
    assert_eq!(d.recv(1, QUIET).await[0].text(), "go0");
}

/// A subscriber that never reads costs only itself: the devices' publishes are all
/// acknowledged at full speed, a fast subscriber gets everything, and what the slow one's
/// full queue dropped is counted.
#[test]
fn a_subscriber_that_never_reads_costs_only_itself() {
    let gw = gateway(config().mqtt("max_queued_messages", 100)).start_process();
    let addr = gw.mqtt_addr();
    let runtime = common::runtime();
    runtime.block_on(async {
        // Subscribes, then never reads again.
        let mut stuck = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stuck_subscriber(&mut stuck).await;
        let mut fast = Subscriber::connect(addr, SubscriberOptions::new("fast")).await;
        assert_eq!(fast.subscribe("load/#", 1).await, 1);
        let big = vec![b'x'; 4096];
        let msgs: Vec<Vec<u8>> = (0..3000)
            .map(|i| {
                let mut p = format!("{i}|").into_bytes();
                p.extend_from_slice(&big);
                p
            })
            .collect();
        let acked = common::rumqttc(addr, "dev").publish("load/x", msgs).await;
        assert_eq!(acked.len(), 3000, "every publish acknowledged");
        let got = fast.recv(3000, QUIET).await;
        assert_eq!(got.len(), 3000, "the fast subscriber got everything");
        drop(stuck);
    });
    let (_, metrics) = common::http_get(gw.admin_addr(), "/metrics");
    let dropped = common::metric(
        &metrics,
        "edgegate_local_dropped_total{reason=\"queue_full\"}",
    )
    .unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "the stuck subscriber's drops are counted:\n{metrics}"
    );
}

/// CONNECT + SUBSCRIBE load/# QoS 1 on a raw socket with a tiny receive buffer; reads the
/// CONNACK and SUBACK and nothing after.
async fn stuck_subscriber(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connect = Vec::new();
    common::mqtt_string(&mut connect, b"MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60]);
    common::mqtt_string(&mut connect, b"stuck");
    stream
        .write_all(&common::mqtt_frame(0x10, &connect))
        .await
        .expect("CONNECT");
    let mut subscribe = vec![0, 1];
    common::mqtt_string(&mut subscribe, b"load/#");
    subscribe.push(1);
    stream
        .write_all(&common::mqtt_frame(0x82, &subscribe))
        .await
        .expect("SUBSCRIBE");
    let mut buf = [0u8; 9];
    stream
        .read_exact(&mut buf)
        .await
        .expect("CONNACK and SUBACK");
    assert_eq!(buf[0], 0x20);
    assert_eq!(buf[4], 0x90);
}

/// paho-mqtt (Python, MQTT 5) as an independent subscriber, mosquitto_pub as an independent
/// publisher: a request's Response Topic, Correlation Data, content type and user
/// properties reach the subscriber unaltered [MQTT-3.3.2-15], [MQTT-3.3.2-16],
/// [MQTT-3.3.2-17], and with the subscription identifier it subscribed with
/// [MQTT-3.3.4-3]; a retained message arrives first with RETAIN set.
#[test]
fn paho_sees_properties_and_retained_messages_from_mosquitto_pub() {
    use std::io::BufRead;
    let gw = gateway(config()).start();
    let addr = gw.mqtt_addr();
    let out = common::mosquitto_pub(addr)
        .v5(true)
        .topic("req/pump7/state")
        .qos(1)
        .args(["-r"])
        .message("idle");
    assert!(out.status.success(), "{out:?}");

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/paho_subscribe.py"
    );
    let mut paho = std::process::Command::new("python3")
        .args([
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
            "paho-sub",
            "req/#",
            "2",
            "3",
            "20",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with paho-mqtt 2 (.ci/run installs it)");
    let mut lines = std::io::BufReader::new(paho.stdout.take().expect("stdout")).lines();
    let suback = lines.next().expect("a line").expect("read");
    assert_eq!(suback, "SUBACK 2", "granted QoS 2");
    for (topic, payload) in [("req/pump7/start", "go"), ("req/pump7/stop", "halt")] {
        let out = common::mosquitto_pub(addr)
            .v5(true)
            .topic(topic)
            .qos(2)
            .args([
                "-D",
                "publish",
                "response-topic",
                "resp/pump7",
                "-D",
                "publish",
                "correlation-data",
                "c-17",
                "-D",
                "publish",
                "content-type",
                "text/plain",
                "-D",
                "publish",
                "user-property",
                "origin",
                "cloud",
            ])
            .message(payload);
        assert!(out.status.success(), "{out:?}");
    }
    let got: Vec<serde_json::Value> = lines
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).expect("JSON line"))
        .collect();
    assert!(paho.wait().expect("paho").success(), "paho got {got:?}");
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0]["topic"], "req/pump7/state");
    assert_eq!(got[0]["retain"], true);
    for (m, payload) in got[1..].iter().zip(["go", "halt"]) {
        assert_eq!(m["payload"], payload);
        assert_eq!(m["qos"], 2);
        assert_eq!(m["retain"], false);
        assert_eq!(m["response_topic"], "resp/pump7");
        assert_eq!(m["correlation_data"], hex(b"c-17"));
        assert_eq!(m["content_type"], "text/plain");
        assert_eq!(
            m["user_properties"],
            serde_json::json!([["origin", "cloud"]])
        );
        assert_eq!(m["subscription_ids"], serde_json::json!([42]));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A persistent session's subscriptions and the QoS 1 messages published while its client
/// was away survive a SIGKILL of the gateway [MQTT-3.1.2-4]: after the restart the client
/// finds its session present and every acknowledged message, in order.
#[test]
fn persistent_sessions_survive_a_sigkill() {
    let mut gw = gateway(config()).pin_addresses().start_process();
    let addr = gw.mqtt_addr();
    let runtime = common::runtime();
    for v5 in [false, true] {
        let id = if v5 { "kill-5" } else { "kill-4" };
        let options = || {
            let o = SubscriberOptions::new(id).persistent(3600);
            if v5 { o.v5() } else { o }
        };
        runtime.block_on(async {
            let mut s = Subscriber::connect(addr, options()).await;
            assert_eq!(s.subscribe(&format!("cmd/{id}/#"), 1).await, 1);
            s.disconnect().await;
            let acked = common::rumqttc(addr, "cloud")
                .publish(&format!("cmd/{id}/set"), payloads(100, "k"))
                .await;
            assert_eq!(acked.len(), 100);
        });
        gw.kill();
        gw.restart();
        runtime.block_on(async {
            let mut s = Subscriber::connect(addr, options()).await;
            assert!(s.session_present, "the session survived the SIGKILL");
            let got = s.recv(100, QUIET).await;
            assert_eq!(
                got.iter().map(Received::text).collect::<Vec<_>>(),
                (0..100).map(|i| format!("k{i}")).collect::<Vec<_>>(),
                "every acknowledged message, in order"
            );
            // Acknowledged now: after another restart nothing comes again.
            s.disconnect().await;
        });
        gw.kill();
        gw.restart();
        runtime.block_on(async {
            let mut s = Subscriber::connect(addr, options()).await;
            assert!(s.session_present);
            assert!(
                s.recv(1, Duration::from_secs(1)).await.is_empty(),
                "delivered once"
            );
            s.disconnect().await;
        });
    }
}
