//! `format = "avro"` routes end to end: JSON published by a real MQTT client
//! (mosquitto_pub), encoded by the gateway with the schema registry's schemas, read back
//! from the run's Kafka and decoded by an independent reader (Python fastavro, which fetches
//! the writer's schema by the id in each record: `tests/clients/registry_decode.py`), field by
//! field; through the faults of issue 15: the registry down at start, stopped mid-run, a new
//! schema version mid-run, payloads that do not match, a restart without the registry.
//!
//! The fault scenarios use `common::registry`'s fixture; `a_real_registry_serves_avro_and_json_schema_routes`
//! and `a_real_registry_serves_protobuf_routes` run against a real one, Apicurio Registry
//! (see there for both).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::registry::Registry;
use common::{GatewayToml, Process};

const V1: &str = r#"{"type":"record","name":"Reading","namespace":"acme","fields":[{"name":"device","type":"string"},{"name":"temp","type":"double"},{"name":"seq","type":"long"},{"name":"unit","type":["null","string"],"default":null}]}"#;
/// V1 plus a field with a default: a compatible evolution.
const V2: &str = r#"{"type":"record","name":"Reading","namespace":"acme","fields":[{"name":"device","type":"string"},{"name":"temp","type":"double"},{"name":"seq","type":"long"},{"name":"unit","type":["null","string"],"default":null},{"name":"battery","type":"int","default":-1}]}"#;

fn config(registry: &Registry, topic: &str) -> GatewayToml {
    GatewayToml::new().raw(&format!(
        "[schema_registry]\nurl = \"{}\"\nrefresh = \"1s\"\ntimeout = \"2s\"\n\n\
         [[routes]]\nmatch = \"sensors/+device/reading\"\ntopic = \"{topic}\"\nkey = \"{{device}}\"\nformat = \"avro\"\n",
        registry.url()
    ))
}

fn reading(device: &str, seq: u64) -> String {
    json!({"device": device, "temp": 20.5 + seq as f64, "seq": seq, "unit": "C"}).to_string()
}

/// Publishes each payload at QoS 1, acknowledged (mosquitto_pub exits 0).
fn publish(gw: &Process, device: &str, payloads: &[String]) {
    let out = common::mosquitto_pub(gw.mqtt_addr())
        .id(device)
        .topic(&format!("sensors/{device}/reading"))
        .qos(1)
        .lines(payloads);
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every record's value decoded by fastavro: `{"id", "value"}` each.
fn decode(registry: &Registry, records: &[common::Consumed]) -> Vec<Value> {
    decode_from(&registry.url(), records)
}

/// Every record's value decoded independently with the schemas of the registry at `url`
/// (fastavro, Python's jsonschema): `{"id", "type", "value"}` each, or `{"error"}`.
fn decode_from(url: &str, records: &[common::Consumed]) -> Vec<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/registry_decode.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 tests/clients/registry_decode.py (pip: fastavro, jsonschema, protobuf; apt: protobuf-compiler)");
    let mut input = String::new();
    for r in records {
        let payload = r.payload.as_deref().unwrap_or_default();
        input.extend(payload.iter().map(|b| format!("{b:02x}")));
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("feed the decoder");
    drop(stdin);
    let out = child.wait_with_output().expect("the decoder's output");
    assert!(
        out.status.success(),
        "registry_decode.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A new schema version mid-run: publishes readings with a `battery` field, one at a time
/// from `seq` (`sent` records already in `topic`), until one arrives encoded with schema
/// `v2` (decoded with the registry at `url`), within 30 s; the ones before it are encoded
/// with `v1`, the extra field dropped, never an error. The newest record decoded, the next
/// seq, and the records now in `topic`.
fn publish_until_version(
    gw: &Process,
    topic: &str,
    url: &str,
    seq: u64,
    sent: usize,
    v1: u32,
    v2: u32,
) -> (Value, u64, usize) {
    let payload = |seq| json!({"device": "d1", "temp": 1.0, "seq": seq, "battery": 87});
    publish_until_version_of(gw, topic, url, (seq, sent), (v1, v2), payload)
}

/// [`publish_until_version`] with the payload `payload(seq)`.
fn publish_until_version_of(
    gw: &Process,
    topic: &str,
    url: &str,
    (mut seq, mut sent): (u64, usize),
    (v1, v2): (u32, u32),
    payload: impl Fn(u64) -> Value,
) -> (Value, u64, usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        publish(gw, "d1", &[payload(seq).to_string()]);
        seq += 1;
        sent += 1;
        let records = common::consume_all_blocking(topic, sent, Duration::from_secs(30));
        assert_eq!(records.len(), sent, "{records:?}");
        let last = decode_from(url, &records[sent - 1..]).remove(0);
        if last["id"] == v2 {
            return (last, seq, sent);
        }
        assert_eq!(last["id"], v1, "{last}");
        assert!(Instant::now() < deadline, "v2 was not picked up");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The dead-letter log, in the main log's order.
fn dead_letters(gw: &Process) -> Vec<Value> {
    common::dead_letters(gw.config_path())
}

/// The whole life of an `avro` route through the registry's faults. Nothing is lost: every
/// payload published is in Kafka (decoded, field by field) or in the dead-letter log with
/// its reason, and the order of each device's records is kept.
#[test]
fn avro_records_survive_the_registry_being_down_changing_and_gone() {
    let _kafka = common::shared();
    let topic = common::unique_topic("registry-avro");
    let subject = format!("{topic}-value");
    let mut registry = Registry::start_stopped();
    let mut gw = common::gateway(config(&registry, &topic))
        .pin_addresses()
        .start_process();

    // 1. The registry has never been reached: records wait in the log, JSON, in order.
    let first: Vec<String> = (0..5).map(|i| reading("d1", i)).collect();
    publish(&gw, "d1", &first);
    let early = common::consume_all_blocking(&topic, 1, Duration::from_secs(3));
    assert!(
        early.is_empty(),
        "sent before the schema was known: {early:?}"
    );

    // 2. The registry comes up with the schema: the waiting records go out encoded.
    let v1 = registry.register(&subject, V1);
    registry.resume();
    let records = common::consume_all_blocking(&topic, 5, Duration::from_secs(60));
    assert_eq!(records.len(), 5, "{records:?}");
    let decoded = decode(&registry, &records);
    for (i, d) in decoded.iter().enumerate() {
        assert_eq!(d["id"], v1, "{d}");
        assert_eq!(d["value"]["device"], "d1");
        assert_eq!(d["value"]["temp"], 20.5 + i as f64);
        assert_eq!(d["value"]["seq"], i as u64);
        assert_eq!(d["value"]["unit"], "C");
        assert_eq!(records[i].header("edgegate-format"), Some(&b"avro"[..]));
        assert_eq!(records[i].header("edgegate-schema-pending"), None);
        assert_eq!(records[i].key.as_deref(), Some(&b"d1"[..]));
    }

    // 3. Payloads that do not match go to the dead-letter log; the ones after them are not
    //    held up.
    let mixed = vec![
        json!({"device": "d1", "temp": "hot", "seq": 5}).to_string(),
        reading("d1", 6),
        "not json at all".to_owned(),
        json!({"device": "d1", "seq": 8}).to_string(),
        reading("d1", 9),
    ];
    publish(&gw, "d1", &mixed);
    let records = common::consume_all_blocking(&topic, 7, Duration::from_secs(60));
    assert_eq!(records.len(), 7, "{records:?}");
    let decoded = decode(&registry, &records[5..]);
    assert_eq!(decoded[0]["value"]["seq"], 6);
    assert_eq!(decoded[1]["value"]["seq"], 9);
    common::wait_until("three dead letters", Duration::from_secs(30), || {
        dead_letters(&gw).len() == 3
    });
    let dead = dead_letters(&gw);
    let errors: Vec<&str> = dead
        .iter()
        .map(|d| d["error"].as_str().unwrap_or(""))
        .collect();
    assert!(
        errors[0].starts_with(&format!("format: the payload does not match schema {v1}")),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("format: the payload is not JSON"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with(&format!("format: the payload does not match schema {v1}")),
        "{errors:?}"
    );
    assert_eq!(dead[0]["payload"], mixed[0].as_str());
    assert_eq!(dead[1]["payload"], "not json at all");
    let (_, metrics) = common::http_get(gw.admin_addr(), "/metrics");
    assert_eq!(
        common::metric(&metrics, "edgegate_format_errors_total{format=\"avro\"}"),
        Some(3.0),
        "{metrics}"
    );

    // 4. The registry stops: the cached schema keeps encoding.
    registry.stop();
    publish(&gw, "d1", &[reading("d1", 10), reading("d1", 11)]);
    let records = common::consume_all_blocking(&topic, 9, Duration::from_secs(60));
    assert_eq!(records.len(), 9, "{records:?}");

    // 5. A restart while it is still down: the schema comes from the cache on disk.
    let status = gw.terminate();
    assert!(status.success(), "{status:?}");
    gw.restart();
    publish(&gw, "d1", &[reading("d1", 12)]);
    let records = common::consume_all_blocking(&topic, 10, Duration::from_secs(60));
    assert_eq!(records.len(), 10, "{records:?}");
    // (Decoded below, once the registry is back: the decoder asks it for the schema.)

    // 6. A new version mid-run: picked up without a restart, within the refresh interval.
    let v2 = registry.register(&subject, V2);
    assert_ne!(v1, v2);
    registry.resume();
    let (newest, seq, sent) = publish_until_version(&gw, &topic, &registry.url(), 13, 10, v1, v2);
    assert_eq!(newest["value"]["battery"], 87);
    assert_eq!(newest["value"]["unit"], Value::Null);
    // Every record published is in Kafka or dead-lettered; each device's order is kept.
    let records = common::consume_all_blocking(&topic, sent, Duration::from_secs(10));
    assert_eq!(records.len(), sent);
    let decoded = decode(&registry, &records);
    let all: Vec<u64> = decoded
        .iter()
        .map(|d| d["value"]["seq"].as_u64().expect("seq"))
        .collect();
    // Encoded with v1 while the registry was down, before and after the restart.
    for d in &decoded[7..10] {
        assert_eq!(d["id"], v1, "{d}");
    }
    let mut expected: Vec<u64> = (0..seq).filter(|s| ![5, 7, 8].contains(s)).collect();
    expected.truncate(sent);
    assert_eq!(all, expected);
    assert_eq!(dead_letters(&gw).len(), 3);
}

/// `[schema_registry]` reloaded by SIGHUP: records waiting for a registry that never
/// answers go out once the config points at one that does, without a restart; a section
/// with a problem is refused with an ERROR and the one in force kept.
#[test]
fn a_reload_points_the_gateway_at_another_registry() {
    let _kafka = common::shared();
    let topic = common::unique_topic("registry-reload");
    let subject = format!("{topic}-value");
    let gone = Registry::start_stopped();
    let mut gw = common::gateway(config(&gone, &topic)).start_process();
    let readings: Vec<String> = (0..3).map(|i| reading("d1", i)).collect();
    publish(&gw, "d1", &readings);
    let early = common::consume_all_blocking(&topic, 1, Duration::from_secs(3));
    assert!(early.is_empty(), "sent without a schema: {early:?}");

    gw.rewrite_config(|c| c.set("schema_registry", "url", "ftp://registry.example"));
    gw.hup();
    let line = gw.wait_for_log(&["ERROR", "Kept the [schema_registry] in force"]);
    assert!(line.contains("schema_registry.url"), "{line}");

    let registry = Registry::start();
    let id = registry.register(&subject, V1);
    gw.rewrite_config(|c| c.set("schema_registry", "url", registry.url()));
    gw.hup();
    gw.wait_for_log(&["Reloaded [schema_registry]", &registry.url()]);
    let records = common::consume_all_blocking(&topic, 3, Duration::from_secs(30));
    assert_eq!(records.len(), 3, "{records:?}");
    for (i, d) in decode(&registry, &records).iter().enumerate() {
        assert_eq!(d["id"], id, "{d}");
        assert_eq!(d["value"]["seq"], i as u64);
    }
    assert!(registry.requests() > 0);
}

/// A registry that requires mutual TLS and basic authentication (issue 15): the gateway
/// reaches it with `cert_file`/`key_file` and a `password_file`, and encodes with its
/// schema; the records are read back and decoded independently, by the same schema under
/// the same id in a plain registry (the decoder speaks plain HTTP).
#[test]
fn a_registry_behind_mutual_tls_and_a_password_file() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let _kafka = common::shared();
    let topic = common::unique_topic("registry-mtls");
    let subject = format!("{topic}-value");
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
    };
    let leaf = |issuer: &CertifiedIssuer<'static, KeyPair>, name: &str, usage| {
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &**issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (registry_ca, gateway_ca) = (ca("registry CA"), ca("gateway CA"));
    let (server_pem, server_key) = leaf(
        &registry_ca,
        "127.0.0.1",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) = leaf(
        &gateway_ca,
        "plant-7-gw-2",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(gateway_ca.pem().as_bytes()).expect("pem"))
        .expect("root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(server_pem.as_bytes()).expect("pem")],
            PrivateKeyDer::from_pem_slice(server_key.as_bytes()).expect("key"),
        )
        .expect("server config");
    // base64("plant-7-gw-2:s3cret")
    let secured = Registry::start_secured(common::registry::Secured {
        tls: Arc::new(tls),
        authorization: Some("Basic cGxhbnQtNy1ndy0yOnMzY3JldA==".into()),
    });
    let id = secured.register(&subject, V1);
    let plain = Registry::start();
    assert_eq!(
        plain.register(&subject, V1),
        id,
        "the same id for the decoder"
    );

    let config = GatewayToml::new().raw(&format!(
        "[schema_registry]\nurl = \"{}\"\nca_file = \"registry-ca.pem\"\n\
         cert_file = \"client.pem\"\nkey_file = \"client.key\"\n\
         username = \"plant-7-gw-2\"\npassword_file = \"registry.password\"\n\
         refresh = \"1s\"\ntimeout = \"2s\"\n\n\
         [[routes]]\nmatch = \"sensors/+device/reading\"\ntopic = \"{topic}\"\nkey = \"{{device}}\"\nformat = \"avro\"\n",
        secured.url()
    ));
    let builder = common::gateway(config);
    let write = |name: &str, text: &str, mode: u32| {
        let path = builder.dir().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    write("registry-ca.pem", &registry_ca.pem(), 0o644);
    write("client.pem", &client_pem, 0o644);
    write("client.key", &client_key, 0o600);
    write("registry.password", "s3cret\n", 0o600);
    let gw = builder.start_process();
    let readings: Vec<String> = (0..5).map(|i| reading("d1", i)).collect();
    publish(&gw, "d1", &readings);
    let records = common::consume_all_blocking(&topic, 5, Duration::from_secs(30));
    assert_eq!(records.len(), 5, "{records:?}");
    for (i, d) in decode(&plain, &records).iter().enumerate() {
        assert_eq!(d["id"], id, "{d}");
        assert_eq!(d["value"]["seq"], i as u64, "{d}");
        assert_eq!(d["value"]["device"], "d1", "{d}");
    }
    assert!(
        secured.requests() > 0,
        "the gateway asked the secured registry"
    );
}

/// A JSON Schema for `meters/+device/state` payloads.
const METER_SCHEMA: &str = r#"{"$schema":"http://json-schema.org/draft-07/schema#","title":"MeterState","type":"object","properties":{"device":{"type":"string"},"kwh":{"type":"number","minimum":0},"phases":{"type":"array","items":{"type":"integer","enum":[1,2,3]}}},"required":["device","kwh"],"additionalProperties":false}"#;

/// A real registry, Apicurio Registry through its Confluent-compatible API
/// (`common::registry::apicurio`): an `avro` route and a `json_schema` route whose subjects'
/// schemas are registered there, a new Avro version registered mid-run, and payloads that do
/// not match. Every record is read back from Kafka and decoded independently (fastavro, and
/// Python's jsonschema validating against the schema fetched by the id in the frame), field
/// by field; the mismatches are in the dead-letter log with their reasons.
#[test]
fn a_real_registry_serves_avro_and_json_schema_routes() {
    let Some(apicurio) =
        common::registry::apicurio("a_real_registry_serves_avro_and_json_schema_routes")
    else {
        return;
    };
    let _kafka = common::shared();
    let avro_topic = common::unique_topic("apicurio-avro");
    let json_topic = common::unique_topic("apicurio-json");
    let v1 = apicurio.register(&format!("{avro_topic}-value"), "AVRO", V1);
    let json_id = apicurio.register(&format!("{json_topic}-value"), "JSON", METER_SCHEMA);
    let gw = common::gateway(GatewayToml::new().raw(&format!(
        "[schema_registry]\nurl = \"{}\"\nrefresh = \"1s\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nmatch = \"sensors/+device/reading\"\ntopic = \"{avro_topic}\"\nkey = \"{{device}}\"\nformat = \"avro\"\n\n\
         [[routes]]\nmatch = \"meters/+device/state\"\ntopic = \"{json_topic}\"\nkey = \"{{device}}\"\nformat = \"json_schema\"\n",
        apicurio.url()
    )))
    .start_process();

    // Avro: five readings under v1.
    let readings: Vec<String> = (0..5).map(|i| reading("d1", i)).collect();
    publish(&gw, "d1", &readings);
    // JSON Schema: valid states, with two that do not match between them.
    let states = [
        json!({"device": "m1", "kwh": 0.5}),
        json!({"device": "m1", "kwh": -1.0}),
        json!({"device": "m1", "kwh": 2.25, "phases": [1, 3]}),
        json!({"device": "m1", "kwh": 3, "phases": [4], "colour": "red"}),
        json!({"device": "m1", "kwh": 4}),
    ]
    .map(|v| v.to_string());
    let out = common::mosquitto_pub(gw.mqtt_addr())
        .id("m1")
        .topic("meters/m1/state")
        .qos(1)
        .lines(&states);
    assert!(out.status.success(), "{out:?}");

    let records = common::consume_all_blocking(&avro_topic, 5, Duration::from_secs(60));
    assert_eq!(records.len(), 5, "{records:?}");
    for (i, d) in decode_from(apicurio.url(), &records).iter().enumerate() {
        assert_eq!((&d["id"], &d["type"]), (&json!(v1), &json!("AVRO")), "{d}");
        assert_eq!(d["value"]["device"], "d1");
        assert_eq!(d["value"]["temp"], 20.5 + i as f64);
        assert_eq!(d["value"]["seq"], i as u64);
        assert_eq!(d["value"]["unit"], "C");
    }
    let meters = common::consume_all_blocking(&json_topic, 3, Duration::from_secs(60));
    assert_eq!(meters.len(), 3, "{meters:?}");
    let decoded = decode_from(apicurio.url(), &meters);
    for (record, (d, sent)) in meters
        .iter()
        .zip(decoded.iter().zip([&states[0], &states[2], &states[4]]))
    {
        assert_eq!(
            (&d["id"], &d["type"]),
            (&json!(json_id), &json!("JSON")),
            "{d}"
        );
        let sent: Value = serde_json::from_str(sent).expect("sent JSON");
        assert_eq!(d["value"], sent);
        assert_eq!(record.header("edgegate-format"), Some(&b"json_schema"[..]));
        assert_eq!(record.key.as_deref(), Some(&b"m1"[..]));
    }
    common::wait_until("two dead letters", Duration::from_secs(30), || {
        dead_letters(&gw).len() == 2
    });
    let dead = dead_letters(&gw);
    assert_eq!(dead[0]["payload"], states[1].as_str());
    assert_eq!(dead[1]["payload"], states[3].as_str());
    for d in &dead {
        let error = d["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with(&format!(
                "format: the payload does not match JSON Schema {json_id}: at /"
            )),
            "{error}"
        );
    }
    let error = dead[1]["error"].as_str().unwrap_or_default();
    assert!(error.contains("/phases/0"), "{error}");
    let (_, metrics) = common::http_get(gw.admin_addr(), "/metrics");
    assert_eq!(
        common::metric(
            &metrics,
            "edgegate_format_errors_total{format=\"json_schema\"}"
        ),
        Some(2.0),
        "{metrics}"
    );

    // A new Avro version registered in the real registry: used without a restart.
    let v2 = apicurio.register(&format!("{avro_topic}-value"), "AVRO", V2);
    assert_ne!(v1, v2);
    let (newest, seq, _) = publish_until_version(&gw, &avro_topic, apicurio.url(), 5, 5, v1, v2);
    assert_eq!(newest["value"]["battery"], 87);
    assert_eq!(newest["value"]["seq"], seq - 1);
}

/// A Protobuf schema for `sensors/+device/reading` and `alarms/+device` payloads: a nested
/// message and a well-known type, and a second top-level message for the alarms.
const PROTO_V1: &str = r#"syntax = "proto3";
package iot;
import "google/protobuf/timestamp.proto";

message Reading {
  string device = 1;
  double temp = 2;
  uint64 seq = 3;
  google.protobuf.Timestamp at = 4;
  message Battery { uint32 percent = 1; }
  Battery battery = 5;
}

message Alarm {
  string device = 1;
  string text = 2;
  Level level = 3;
  enum Level { LEVEL_UNSPECIFIED = 0; WARNING = 1; CRITICAL = 2; }
}
"#;

/// `format = "protobuf"` against the real registry: readings encoded as the schema's first
/// message and alarms as the message their route names (`message = "iot.Alarm"`), read back
/// from Kafka and decoded independently (protoc compiles the registry's `.proto` text, Google's
/// Python `protobuf` package decodes the message that the record's message indexes name),
/// field by field. The alarms are published before their subject exists: they wait in the
/// log, in order, and go once it is registered. A reading that does not fit is dead-lettered
/// with the field it fails at; a new version (a field added) is used without a restart.
#[test]
fn a_real_registry_serves_protobuf_routes() {
    let Some(apicurio) = common::registry::apicurio("a_real_registry_serves_protobuf_routes")
    else {
        return;
    };
    let _kafka = common::shared();
    let reading_topic = common::unique_topic("apicurio-proto");
    let alarm_topic = common::unique_topic("apicurio-proto-alarm");
    let v1 = apicurio.register(&format!("{reading_topic}-value"), "PROTOBUF", PROTO_V1);
    let gw = common::gateway(GatewayToml::new().raw(&format!(
        "[schema_registry]\nurl = \"{}\"\nrefresh = \"1s\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nmatch = \"sensors/+device/reading\"\ntopic = \"{reading_topic}\"\nkey = \"{{device}}\"\nformat = \"protobuf\"\n\n\
         [[routes]]\nmatch = \"alarms/+device\"\ntopic = \"{alarm_topic}\"\nkey = \"{{device}}\"\nformat = \"protobuf\"\nmessage = \"iot.Alarm\"\n",
        apicurio.url()
    )))
    .start_process();

    let readings: Vec<Value> = (0..6u64)
        .map(|i| {
            if i == 2 {
                json!({"device": "d1", "temp": "hot", "seq": i})
            } else {
                json!({"device": "d1", "temp": 20.5 + i as f64, "seq": i,
                       "at": format!("2026-12-05T10:00:0{i}Z"), "battery": {"percent": 90 - i}})
            }
        })
        .collect();
    let lines: Vec<String> = readings.iter().map(Value::to_string).collect();
    publish(&gw, "d1", &lines);
    let records = common::consume_all_blocking(&reading_topic, 5, Duration::from_secs(60));
    assert_eq!(records.len(), 5, "{records:?}");
    let decoded = decode_from(apicurio.url(), &records);
    let sent = readings.iter().enumerate().filter(|(i, _)| *i != 2);
    for ((record, d), (i, sent)) in records.iter().zip(&decoded).zip(sent) {
        assert_eq!(
            (&d["id"], &d["type"], &d["message"]),
            (&json!(v1), &json!("PROTOBUF"), &json!("iot.Reading")),
            "{d}"
        );
        // The Protobuf JSON mapping, as Google's library prints it: 64-bit integers as strings.
        // Zero is the default, which is not on the wire, nor printed.
        let mut expected = sent.clone();
        expected["seq"] = json!(i.to_string());
        if i == 0 {
            expected.as_object_mut().map(|o| o.remove("seq"));
        }
        assert_eq!(d["value"], expected, "reading {i}");
        assert_eq!(record.header("edgegate-format"), Some(&b"protobuf"[..]));
        assert_eq!(record.key.as_deref(), Some(&b"d1"[..]));
    }
    common::wait_until("one dead letter", Duration::from_secs(30), || {
        dead_letters(&gw).len() == 1
    });
    let dead = dead_letters(&gw);
    assert_eq!(dead[0]["payload"], lines[2].as_str());
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!(
            "format: the payload does not match message iot.Reading of Protobuf schema {v1}: at temp: "
        )),
        "{error}"
    );

    // Alarms, while their subject is unknown: acknowledged, stored, waiting (and, the log
    // going out in order, holding what is stored after them).
    let alarms = [
        json!({"device": "d1", "text": "door open", "level": "WARNING"}),
        json!({"device": "d1", "text": "smoke", "level": 2}),
        json!({"device": "d1", "text": "cleared"}),
    ]
    .map(|v| v.to_string());
    let out = common::mosquitto_pub(gw.mqtt_addr())
        .id("d1-alarms")
        .topic("alarms/d1")
        .qos(1)
        .lines(&alarms);
    assert!(out.status.success(), "{out:?}");

    assert!(
        common::consume_all_blocking(&alarm_topic, 1, Duration::from_secs(3)).is_empty(),
        "an alarm went before its schema was known"
    );
    // Once their subject is registered they go, in order, once.
    let alarm_id = apicurio.register(&format!("{alarm_topic}-value"), "PROTOBUF", PROTO_V1);
    let records = common::consume_all_blocking(&alarm_topic, 3, Duration::from_secs(60));
    assert_eq!(records.len(), 3, "{records:?}");
    let decoded = decode_from(apicurio.url(), &records);
    let expected = [
        json!({"device": "d1", "text": "door open", "level": "WARNING"}),
        json!({"device": "d1", "text": "smoke", "level": "CRITICAL"}),
        json!({"device": "d1", "text": "cleared"}),
    ];
    for (d, expected) in decoded.iter().zip(&expected) {
        assert_eq!(
            (&d["id"], &d["message"]),
            (&json!(alarm_id), &json!("iot.Alarm")),
            "{d}"
        );
        assert_eq!(&d["value"], expected);
    }
    let (_, metrics) = common::http_get(gw.admin_addr(), "/metrics");
    assert_eq!(
        common::metric(
            &metrics,
            "edgegate_format_errors_total{format=\"protobuf\"}"
        ),
        Some(1.0),
        "{metrics}"
    );

    // A new version with a field added: readings carrying it are encoded with v1 (the
    // field dropped) until the gateway has v2, then with v2, the field kept.
    let v2_text = PROTO_V1.replace(
        "  Battery battery = 5;\n",
        "  Battery battery = 5;\n  string unit = 6;\n",
    );
    let v2 = apicurio.register(&format!("{reading_topic}-value"), "PROTOBUF", &v2_text);
    assert_ne!(v1, v2);
    let payload = |seq| json!({"device": "d1", "temp": 1.0, "seq": seq, "unit": "C"});
    let (newest, seq, _) = publish_until_version_of(
        &gw,
        &reading_topic,
        apicurio.url(),
        (6, 5),
        (v1, v2),
        payload,
    );
    assert_eq!(newest["value"]["unit"], "C");
    assert_eq!(newest["value"]["seq"], (seq - 1).to_string());
}

/// Exactly once with records waiting for their schema: the forwarder aborts and begins
/// again until the registry answers, then every waiting record is committed once, encoded,
/// in order, with the one that does not match dead-lettered and nothing behind it held up.
#[test]
fn exactly_once_records_wait_for_their_schema_and_go_once() {
    let _kafka = common::shared();
    let topic = common::unique_topic("registry-avro-eos");
    let subject = format!("{topic}-value");
    let mut registry = Registry::start_stopped();
    let gw = common::gateway(
        config(&registry, &topic)
            .kafka("delivery", "exactly_once")
            .kafka("transaction_interval", "50ms")
            .kafka("transaction_timeout", "15s"),
    )
    .start_process();
    let committed = |expected: usize, timeout: Duration| {
        let mut config = common::client_config();
        config.set("isolation.level", "read_committed");
        common::kafka::consume_all_from(config, &topic, expected, timeout)
    };

    let mut payloads: Vec<String> = (0..20).map(|i| reading("d1", i)).collect();
    payloads[7] = json!({"device": "d1", "temp": "hot", "seq": 7}).to_string();
    publish(&gw, "d1", &payloads[..10]);
    // Several aborted attempts while the registry is away; nothing committed.
    std::thread::sleep(Duration::from_secs(3));
    let early = committed(1, Duration::from_secs(2));
    assert!(
        early.is_empty(),
        "committed before the schema was known: {early:?}"
    );

    let v1 = registry.register(&subject, V1);
    registry.resume();
    publish(&gw, "d1", &payloads[10..]);
    let records = committed(19, Duration::from_secs(60));
    // Nothing more than the 19 that match: a second copy would show here.
    let again = committed(20, Duration::from_secs(3));
    assert_eq!(again.len(), 19, "a record committed twice: {again:?}");
    let decoded = decode(&registry, &records);
    let seqs: Vec<u64> = decoded
        .iter()
        .map(|d| {
            assert_eq!(d["id"], v1, "{d}");
            d["value"]["seq"].as_u64().expect("seq")
        })
        .collect();
    let expected: Vec<u64> = (0..20).filter(|s| *s != 7).collect();
    assert_eq!(seqs, expected);
    common::wait_until("the dead letter", Duration::from_secs(30), || {
        dead_letters(&gw).len() == 1
    });
    let dead = dead_letters(&gw);
    assert_eq!(dead[0]["payload"], payloads[7].as_str());
    assert_eq!(
        dead[0]["error"].as_str(),
        Some(
            format!(
                "format: the payload does not match schema {v1}: field temp: expected a double, found \"hot\""
            )
            .as_str()
        ),
        "{dead:?}"
    );
}

/// Sparkplug B through the registry (issue 15): payloads encoded by Eclipse Tahu's
/// `sparkplug-payload` (npm) become Avro records by the schema the gateway ships
/// (`schemas/sparkplug_b.avsc`), per metric and per payload, read back and decoded by
/// fastavro field by field: names resolved from the births' aliases, values typed, the
/// sequence gap reported. A UInt64 above Avro's long goes to the dead-letter log with the
/// reason, and the records after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_records_encoded_to_avro_by_the_shipped_schema() {
    let _kafka = common::shared();
    let metrics_topic = common::unique_topic("registry-spb-metric");
    let payloads_topic = common::unique_topic("registry-spb-payload");
    let registry = Registry::start();
    let schema = include_str!("../schemas/sparkplug_b.avsc");
    let id = registry.register(&format!("{metrics_topic}-value"), schema);
    assert_eq!(
        registry.register(&format!("{payloads_topic}-value"), schema),
        id
    );
    let gw = common::gateway(GatewayToml::new().raw(&format!(
        "[schema_registry]\nurl = \"{}\"\n\n\
         [[routes]]\nmatch = \"spBv1.0/plant/#\"\ntopic = \"{metrics_topic}\"\nformat = \"sparkplug_b\"\nencoding = \"avro\"\n\n\
         [[routes]]\nmatch = \"spBv1.0/lab/#\"\ntopic = \"{payloads_topic}\"\nformat = \"sparkplug_b\"\nencoding = \"avro\"\nrecords = \"per_payload\"\n",
        registry.url()
    )))
    .start_process();

    let at = |kind: &str| format!("spBv1.0/plant/{kind}/edge1");
    let mut messages = common::drivers::sparkplug_pump_session();
    messages.extend([
        // seq 3 never arrives; a UInt64 beyond i64 does not fit Avro's long.
        json!({"topic": at("NDATA"), "payload": {"timestamp": 1004, "seq": 4, "metrics": [
            {"name": "odometer", "type": "UInt64", "value": 1u64 << 63},
            {"alias": 2, "type": "Int64", "value": 200},
        ]}}),
        json!({"topic": "spBv1.0/lab/NBIRTH/edge2", "payload": {"timestamp": 2000, "seq": 0, "metrics": [
            {"name": "bdSeq", "type": "UInt64", "value": 0},
            {"name": "x", "alias": 1, "type": "Float", "value": 1.5},
        ]}}),
    ]);
    for (i, (t, payload)) in common::drivers::sparkplug_encode(&json!(messages))
        .into_iter()
        .enumerate()
    {
        let acked = common::rumqttc(gw.mqtt_addr(), "edge1")
            .qos(1)
            .publish(&t, vec![payload])
            .await;
        assert_eq!(acked, [0], "message {i} on {t} acknowledged");
    }

    // NBIRTH: state + 2 metrics; DBIRTH: state + 4; DDATA 2; NDATA 1 (+1 dead-lettered).
    let records = common::consume_all_blocking(&metrics_topic, 11, Duration::from_secs(60));
    assert_eq!(records.len(), 11, "{records:?}");
    for r in &records {
        assert_eq!(r.header("edgegate-format"), Some(&b"avro"[..]));
        assert_eq!(r.header("content-type"), None);
    }
    let decoded = decode(&registry, &records);
    let values: Vec<Value> = decoded
        .iter()
        .map(|d| {
            assert_eq!(d["id"], id, "{d}");
            d["value"].clone()
        })
        .collect();
    common::drivers::assert_pump_session(&values);
    let pick = |i: usize, keys: &[&str]| -> Vec<Value> {
        keys.iter().map(|k| values[i][*k].clone()).collect()
    };
    // The flags at their defaults.
    assert_eq!(
        pick(8, &["birth_missing", "is_null", "seq_gap", "metrics"]),
        [json!(false), json!(false), Value::Null, Value::Null]
    );
    // The NDATA after the gap: its odometer dead-lettered, uptime here, the gap reported.
    assert_eq!(pick(10, &["name", "value"]), [json!("uptime"), json!(200)]);
    assert_eq!(values[10]["seq_gap"], json!({"expected": 3}));
    let all = common::consume_all_blocking(&metrics_topic, 12, Duration::from_secs(3));
    assert_eq!(all.len(), 11, "a record beyond the 11th");
    common::wait_until("the dead letter", Duration::from_secs(30), || {
        dead_letters(&gw).len() == 1
    });
    let dead = dead_letters(&gw);
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!(
            "format: the payload does not match schema {id}: field value:"
        )),
        "{dead:?}"
    );
    assert!(error.contains("9223372036854775808"), "{error}");

    // Per payload: one record, its metrics in `metrics`.
    let records = common::consume_all_blocking(&payloads_topic, 1, Duration::from_secs(60));
    let payload = decode(&registry, &records).remove(0);
    assert_eq!(payload["value"]["message_type"], "NBIRTH");
    assert_eq!(payload["value"]["state"], "online");
    assert_eq!(payload["value"]["name"], Value::Null);
    let metrics = payload["value"]["metrics"].as_array().expect("metrics");
    assert_eq!(metrics.len(), 2, "{payload}");
    assert_eq!(metrics[1]["name"], "x");
    assert_eq!(metrics[1]["alias"], 1);
    assert_eq!(metrics[1]["datatype"], "Float");
    assert_eq!(metrics[1]["value"], 1.5);
}
