//! Independent MQTT clients playing a scenario: the Eclipse Paho Go clients ([`Driver::Go`]:
//! paho.golang for MQTT 5, paho.mqtt.golang for 3.1.1; `tests/clients/go`) and MQTT.js
//! ([`Driver::Js`], both versions; `tests/clients/js`). [`play`] hands a driver the scenario
//! as JSON and returns what its clients observed, one JSON object per event; the test judges
//! it. The drivers are built on first use (`tests/clients/build`, into `target/clients/`),
//! from the Go module proxy and npm at the versions `go.sum` and `package-lock.json` pin.
//!
//! # Steps
//!
//! Each step names the client (`"client"`, the driver's own label; the MQTT Client
//! Identifier is the same string unless `"id"` says otherwise) it acts for. The builders
//! below write them:
//!
//! | step | does | prints |
//! |---|---|---|
//! | [`connect`] | CONNECT (`version` 4 or 5, `clean`, `expiry`: Session Expiry Interval, `will`: [`will`]) | `connack`: `session_present`, `reason` |
//! | [`subscribe`] | one SUBSCRIBE with every filter of `subs` ([`sub`]), `sub_id` | `suback`: `codes`, in the order of `subs` |
//! | [`unsubscribe`] | one UNSUBSCRIBE | `unsuback`: `codes` (empty in 3.1.1) |
//! | [`publish`] | PUBLISH, waiting for its acknowledgement (`expiry`, `alias` in MQTT 5) | nothing; a refusal fails the driver |
//! | [`publish_many`] | `count` PUBLISHes with payloads `0`, `1`, ... sent back to back, then waits for every ack | nothing |
//! | [`receive`] | waits until `count` messages came or `timeout_ms` passed | `message` for each: `topic`, `payload`, `qos`, `retain`, `dup`, `sub_ids`, `expiry`; `disconnect` ([`disconnected`]) where the server ended the connection |
//! | [`disconnect`] / [`drop_connection`] | DISCONNECT / closes the socket without it | nothing |
//! | [`sleep`] | waits `ms` | nothing |
//!
//! Messages wait in the client's inbox from their arrival until a `receive` takes them; so
//! does the end of a connection the client did not ask for (the server's DISCONNECT, or a
//! closed socket), which is no error of the driver's.
//! paho.golang keeps one Subscription Identifier per PUBLISH, so several are checked with
//! MQTT.js; paho.mqtt.golang hands SUBACK codes back by filter, so the order of codes on the
//! wire is checked with the other two.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// Eclipse Paho Go: paho.golang (MQTT 5) and paho.mqtt.golang (3.1.1).
    Go,
    /// MQTT.js (npm `mqtt`), MQTT 5 and 3.1.1.
    Js,
}

/// `target/clients`, beside the test binaries' own target directory.
fn out_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_edgegate"));
    let target = exe
        .parent()
        .and_then(|profile| profile.parent())
        .expect("the edgegate binary is in target/<profile>/");
    target.join("clients")
}

/// Builds both drivers once per test binary; the tests of a binary share the result.
fn built() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = out_dir();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/build");
        let status = Command::new("bash")
            .arg(script)
            .arg(&out)
            .status()
            .expect("run tests/clients/build");
        assert!(
            status.success(),
            "tests/clients/build failed ({status}): it needs Go 1.24+ and Node.js 20+ with npm"
        );
        out
    })
}

/// Runs `steps` with `driver` against the MQTT server at `addr`; returns the events it printed.
/// Panics with the driver's stderr when it fails (a client error, a timeout).
pub fn play(driver: Driver, addr: SocketAddr, steps: &[Value]) -> Vec<Value> {
    let out = built();
    let broker = addr.to_string();
    let mut command = match driver {
        Driver::Go => Command::new(out.join("go/driver")),
        Driver::Js => {
            let mut c = Command::new("node");
            c.arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/js/driver.js"
            ))
            .env("NODE_PATH", out.join("js/node_modules"));
            c
        }
    };
    let mut child = command
        .args(["--broker", &broker])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the driver");
    let scenario = serde_json::to_vec(steps).expect("scenario as JSON");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&scenario)
        .expect("write the scenario");
    let output = child.wait_with_output().expect("driver output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{driver:?} driver failed ({}): {}\nit printed:\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON event"))
        .collect()
}

/// The start of a Sparkplug session of node `spBv1.0/plant/.../edge1` and its device
/// `pump7`, as Tahu payload objects for [`sparkplug_encode`]: NBIRTH (seq 0, `bdSeq` 1,
/// `uptime` alias 2), DBIRTH (seq 1: `temp` 10, `rpm` 11 an Int16, `label` 12, `on` 13) and a
/// DDATA by alias only (seq 2: temp 21.25, rpm -41), as a device sends data after its birth.
pub fn sparkplug_pump_session() -> Vec<Value> {
    let at = |kind: &str| format!("spBv1.0/plant/{kind}/edge1");
    vec![
        json!({"topic": at("NBIRTH"), "payload": {"timestamp": 1000, "seq": 0, "metrics": [
            {"name": "bdSeq", "type": "UInt64", "value": 1},
            {"name": "uptime", "alias": 2, "type": "Int64", "value": -100},
        ]}}),
        json!({"topic": format!("{}/pump7", at("DBIRTH")), "payload": {"timestamp": 1001, "seq": 1, "metrics": [
            {"name": "temp", "alias": 10, "type": "Double", "value": 20.5},
            {"name": "rpm", "alias": 11, "type": "Int16", "value": -40},
            {"name": "label", "alias": 12, "type": "String", "value": "ok"},
            {"name": "on", "alias": 13, "type": "Boolean", "value": true},
        ]}}),
        json!({"topic": format!("{}/pump7", at("DDATA")), "payload": {"timestamp": 1002, "seq": 2, "metrics": [
            {"alias": 10, "type": "Double", "value": 21.25},
            {"alias": 11, "type": "Int16", "value": -41},
        ]}}),
    ]
}

/// The first ten records a route writes for [`sparkplug_pump_session`] per metric, as JSON
/// values (read from Kafka, or decoded from Avro): the NBIRTH's state record and its two
/// metrics, the DBIRTH's state record and its four, and the DDATA's two, named from the
/// births' aliases.
pub fn assert_pump_session(values: &[Value]) {
    let pick = |i: usize, keys: &[&str]| -> Vec<Value> {
        keys.iter().map(|k| values[i][*k].clone()).collect()
    };
    let head = [
        "message_type",
        "group",
        "edge_node",
        "device",
        "seq",
        "state",
    ];
    assert_eq!(
        pick(0, &head),
        [
            json!("NBIRTH"),
            json!("plant"),
            json!("edge1"),
            Value::Null,
            json!(0),
            json!("online")
        ]
    );
    let metric = ["name", "alias", "datatype", "value", "timestamp"];
    assert_eq!(
        pick(2, &metric),
        [
            json!("uptime"),
            json!(2),
            json!("Int64"),
            json!(-100),
            json!(1000)
        ]
    );
    assert_eq!(
        pick(3, &head),
        [
            json!("DBIRTH"),
            json!("plant"),
            json!("edge1"),
            json!("pump7"),
            json!(1),
            json!("online")
        ]
    );
    assert_eq!(
        pick(5, &metric),
        [
            json!("rpm"),
            json!(11),
            json!("Int16"),
            json!(-40),
            json!(1001)
        ]
    );
    assert_eq!(pick(6, &["name", "value"]), [json!("label"), json!("ok")]);
    assert_eq!(pick(7, &["name", "value"]), [json!("on"), json!(true)]);
    // Names from the births' aliases.
    assert_eq!(
        pick(8, &metric),
        [
            json!("temp"),
            json!(10),
            json!("Double"),
            json!(21.25),
            json!(1002)
        ]
    );
    assert_eq!(
        pick(9, &metric),
        [
            json!("rpm"),
            json!(11),
            json!("Int16"),
            json!(-41),
            json!(1002)
        ]
    );
}

/// Encodes Sparkplug B payloads with Eclipse Tahu's `sparkplug-payload` (npm): `messages` is
/// `[{"topic": ..., "payload": <Tahu payload object>}]`; returns `(topic, payload bytes)`.
pub fn sparkplug_encode(messages: &Value) -> Vec<(String, Vec<u8>)> {
    let out = built();
    let mut child = Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/js/sparkplug.js"
        ))
        .env("NODE_PATH", out.join("js/node_modules"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(messages.to_string().as_bytes())
        .expect("write the messages");
    let output = child.wait_with_output().expect("node output");
    assert!(
        output.status.success(),
        "sparkplug.js failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let encoded: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON");
    encoded
        .iter()
        .map(|m| {
            let hex = m["hex"].as_str().expect("hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
                .collect();
            (m["topic"].as_str().expect("topic").to_owned(), bytes)
        })
        .collect()
}

/// A clean connection (clean session / clean start) with MQTT `version` 4 or 5.
pub fn connect(client: &str, version: u8) -> Value {
    json!({"op": "connect", "client": client, "id": client, "version": version})
}

/// A connection that resumes or creates a persistent session (Clean Session / Clean Start 0;
/// MQTT 5 with Session Expiry Interval `expiry` seconds).
pub fn connect_persistent(client: &str, version: u8, expiry: u32) -> Value {
    json!({"op": "connect", "client": client, "id": client, "version": version,
           "clean": false, "expiry": expiry})
}

/// A Will Message for [`connect`]'s `will`; MQTT 5's Will Delay Interval is its `delay`.
pub fn will(topic: &str, payload: &str, qos: u8, retain: bool) -> Value {
    json!({"topic": topic, "payload": payload, "qos": qos, "retain": retain})
}

/// One filter of a SUBSCRIBE at `qos`, default options; set `nl`, `rap` or `rh` with [`with`].
pub fn sub(filter: &str, qos: u8) -> Value {
    json!({"filter": filter, "qos": qos})
}

pub fn subscribe(client: &str, subs: &[Value]) -> Value {
    json!({"op": "subscribe", "client": client, "subs": subs})
}

/// MQTT 5: a SUBSCRIBE with a Subscription Identifier.
pub fn subscribe_id(client: &str, subs: &[Value], id: u32) -> Value {
    json!({"op": "subscribe", "client": client, "subs": subs, "sub_id": id})
}

pub fn unsubscribe(client: &str, filters: &[&str]) -> Value {
    json!({"op": "unsubscribe", "client": client, "filters": filters})
}

pub fn publish(client: &str, topic: &str, payload: &str, qos: u8, retain: bool) -> Value {
    json!({"op": "publish", "client": client, "topic": topic, "payload": payload,
           "qos": qos, "retain": retain})
}

pub fn publish_many(client: &str, topic: &str, count: usize, qos: u8) -> Value {
    json!({"op": "publish_many", "client": client, "topic": topic, "count": count, "qos": qos})
}

pub fn receive(client: &str, count: usize, timeout_ms: u64) -> Value {
    json!({"op": "receive", "client": client, "count": count, "timeout_ms": timeout_ms})
}

pub fn disconnect(client: &str) -> Value {
    json!({"op": "disconnect", "client": client})
}

pub fn drop_connection(client: &str) -> Value {
    json!({"op": "drop", "client": client})
}

pub fn sleep(ms: u64) -> Value {
    json!({"op": "sleep", "ms": ms})
}

/// `value` with `key` set: a step's or an expected event's optional field.
pub fn with(mut value: Value, key: &str, field: impl Into<Value>) -> Value {
    value[key] = field.into();
    value
}

/// The `connack` event a driver prints for an accepted connection.
pub fn connack(client: &str, session_present: bool) -> Value {
    json!({"event": "connack", "client": client, "session_present": session_present, "reason": 0})
}

pub fn suback(client: &str, codes: &[u8]) -> Value {
    json!({"event": "suback", "client": client, "codes": codes})
}

pub fn unsuback(client: &str, codes: &[u8]) -> Value {
    json!({"event": "unsuback", "client": client, "codes": codes})
}

/// The `disconnect` event: the server's DISCONNECT with its Reason Code (MQTT 5), or the
/// socket closed without one (`None`).
pub fn disconnected(client: &str, reason: Option<u8>) -> Value {
    json!({"event": "disconnect", "client": client, "reason": reason})
}

/// The `message` event for a PUBLISH without DUP, Subscription Identifiers or expiry; set
/// those with [`with`].
pub fn message(client: &str, topic: &str, payload: &str, qos: u8, retain: bool) -> Value {
    json!({"event": "message", "client": client, "topic": topic, "payload": payload,
           "qos": qos, "retain": retain, "dup": false, "sub_ids": [], "expiry": null})
}
