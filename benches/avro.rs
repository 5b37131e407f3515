//! Figures for `format = "avro"` (`cargo bench --bench avro`): what encoding one JSON
//! payload costs on this CPU (`Registry::encode`, the call ingest makes per message, beside
//! apache-avro's own path, `avro::encode`, the reference in the same run; and what
//! `format = "json_schema"` and `format = "protobuf"` cost on the same payloads, by equivalent
//! schemas), and the bytes a record's value takes in Kafka as JSON, as Avro and as Protobuf,
//! for telemetry payloads of about
//! 100 B, 300 B and 1 KB. Prints; asserts nothing. Not the whole pipeline: see README
//! ("Load generator") for messages per second through a gateway.

use std::time::Instant;

use edgegate::format::registry::cache::{Entry, SchemaType};
use edgegate::format::registry::{Encoded, Registry, avro};

/// A schema of `n` double fields besides the device and a sequence number.
fn schema(n: usize) -> String {
    let mut fields = vec![
        r#"{"name":"device","type":"string"}"#.to_owned(),
        r#"{"name":"seq","type":"long"}"#.to_owned(),
        r#"{"name":"ts","type":"long"}"#.to_owned(),
    ];
    fields.extend((0..n).map(|i| format!(r#"{{"name":"sensor_{i:02}","type":"double"}}"#)));
    format!(
        r#"{{"type":"record","name":"Reading","namespace":"bench","fields":[{}]}}"#,
        fields.join(",")
    )
}

/// The same shape as a JSON Schema (draft 2020-12), as strict: every field required and typed.
fn json_schema(n: usize) -> String {
    let mut properties = vec![
        r#""device":{"type":"string"}"#.to_owned(),
        r#""seq":{"type":"integer"}"#.to_owned(),
        r#""ts":{"type":"integer"}"#.to_owned(),
    ];
    properties.extend((0..n).map(|i| format!(r#""sensor_{i:02}":{{"type":"number"}}"#)));
    let mut required = vec![
        r#""device""#.to_owned(),
        r#""seq""#.to_owned(),
        r#""ts""#.to_owned(),
    ];
    required.extend((0..n).map(|i| format!(r#""sensor_{i:02}""#)));
    format!(
        r#"{{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","properties":{{{}}},"required":[{}]}}"#,
        properties.join(","),
        required.join(",")
    )
}

/// The same shape as a `.proto` schema.
fn proto(n: usize) -> String {
    let fields: String = (0..n)
        .map(|i| format!("  double sensor_{i:02} = {};\n", i + 4))
        .collect();
    format!(
        "syntax = \"proto3\";\npackage bench;\nmessage Reading {{\n  string device = 1;\n  int64 seq = 2;\n  int64 ts = 3;\n{fields}}}\n"
    )
}

fn payload(n: usize, seq: u64) -> Vec<u8> {
    let mut object = serde_json::Map::new();
    object.insert("device".into(), format!("pump-{:03}", seq % 100).into());
    object.insert("seq".into(), seq.into());
    object.insert("ts".into(), (1_764_000_000_000u64 + seq).into());
    for i in 0..n {
        object.insert(
            format!("sensor_{i:02}"),
            (20.0 + (seq % 97) as f64 / 8.0 + i as f64).into(),
        );
    }
    serde_json::to_vec(&serde_json::Value::Object(object)).unwrap_or_default()
}

fn main() {
    println!(
        "json B  avro B  avro/json  encode µs/msg  apache-avro µs/msg  JSON parse µs/msg  msgs/s (one core)  json_schema µs/msg  protobuf µs/msg  protobuf B"
    );
    for fields in [3usize, 15, 55] {
        let registry = Registry::in_memory();
        let learnt = registry.learn(
            "bench-value",
            Entry {
                id: 1,
                version: 1,
                schema: schema(fields),
                schema_type: SchemaType::Avro,
            },
        );
        if let Err(e) = learnt {
            eprintln!("schema: {e}");
            return;
        }
        let Ok(parsed) = apache_avro::Schema::parse_str(&schema(fields)) else {
            return;
        };
        let payloads: Vec<Vec<u8>> = (0..1000).map(|s| payload(fields, s)).collect();
        let json_bytes: usize = payloads.iter().map(Vec::len).sum();
        let mut avro_bytes = 0usize;
        let rounds = 50;
        let n = (rounds * payloads.len()) as f64;
        let started = Instant::now();
        for _ in 0..rounds {
            avro_bytes = 0;
            for p in &payloads {
                match registry.encode("bench-value", SchemaType::Avro, p) {
                    Encoded::Done(framed) => avro_bytes += framed.len(),
                    other => {
                        eprintln!("not encoded: {other:?}");
                        return;
                    }
                }
            }
        }
        let per = started.elapsed().as_secs_f64() / n;
        // The same payloads by apache-avro's own path (the encoder before the writer).
        let started = Instant::now();
        for _ in 0..rounds {
            for p in &payloads {
                std::hint::black_box(avro::encode(&parsed, 1, p).is_ok());
            }
        }
        let reference = started.elapsed().as_secs_f64() / n;
        // What parsing the JSON alone costs, which both do.
        let started = Instant::now();
        for _ in 0..rounds {
            for p in &payloads {
                std::hint::black_box(serde_json::from_slice::<serde_json::Value>(p).is_ok());
            }
        }
        let parse = started.elapsed().as_secs_f64() / n;
        // `format = "json_schema"` on the same payloads: parse, validate, frame.
        let learnt = registry.learn(
            "bench-json-value",
            Entry {
                id: 2,
                version: 1,
                schema: json_schema(fields),
                schema_type: SchemaType::Json,
            },
        );
        if let Err(e) = learnt {
            eprintln!("JSON Schema: {e}");
            return;
        }
        let started = Instant::now();
        for _ in 0..rounds {
            for p in &payloads {
                let encoded = registry.encode("bench-json-value", SchemaType::Json, p);
                if !matches!(encoded, Encoded::Done(_)) {
                    eprintln!("not valid: {encoded:?}");
                    return;
                }
            }
        }
        let json_schema_per = started.elapsed().as_secs_f64() / n;
        // `format = "protobuf"`: parse into a message of the schema, encode, frame.
        let learnt = registry.learn(
            "bench-proto-value",
            Entry {
                id: 3,
                version: 1,
                schema: proto(fields),
                schema_type: SchemaType::Protobuf,
            },
        );
        if let Err(e) = learnt {
            eprintln!("Protobuf: {e}");
            return;
        }
        let mut protobuf_bytes = 0usize;
        let started = Instant::now();
        for _ in 0..rounds {
            protobuf_bytes = 0;
            for p in &payloads {
                match registry.encode("bench-proto-value", SchemaType::Protobuf, p) {
                    Encoded::Done(framed) => protobuf_bytes += framed.len(),
                    other => {
                        eprintln!("not encoded: {other:?}");
                        return;
                    }
                }
            }
        }
        let protobuf_per = started.elapsed().as_secs_f64() / n;
        println!(
            "{:>6}  {:>6}  {:>8.0}%  {:>13.2}  {:>18.2}  {:>17.2}  {:>17.0}  {:>18.2}  {:>15.2}  {:>10}",
            json_bytes / payloads.len(),
            avro_bytes / payloads.len(),
            100.0 * avro_bytes as f64 / json_bytes as f64,
            per * 1e6,
            reference * 1e6,
            parse * 1e6,
            1.0 / per,
            json_schema_per * 1e6,
            protobuf_per * 1e6,
            protobuf_bytes / payloads.len()
        );
    }
}
