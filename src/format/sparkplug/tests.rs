use bytes::Bytes;
use serde_json::{Value as Json, json};

use super::proto::tests::{Enc, metric};
use super::*;

fn payload(seq: Option<u64>, metrics: &[Enc]) -> Bytes {
    let mut p = Enc::default();
    p.uint(1, 1_000);
    for m in metrics {
        p.bytes(2, &m.0);
    }
    if let Some(s) = seq {
        p.uint(3, s);
    }
    Bytes::from(p.0)
}

fn records(c: &Converted) -> Vec<Json> {
    c.records
        .iter()
        .map(|r| serde_json::from_slice(r).expect("json"))
        .collect()
}

fn double(name: Option<&str>, alias: Option<u64>, dt: Option<u32>, v: f64) -> Enc {
    let mut m = metric(name, alias, dt);
    m.double(13, v);
    m
}

fn bd(v: u64) -> Enc {
    let mut m = metric(Some("bdSeq"), None, Some(8));
    m.uint(11, v);
    m
}

#[test]
fn data_gets_names_and_types_from_the_births() {
    let sp = Sparkplug::default();
    let birth = payload(
        Some(0),
        &[bd(3), double(Some("temp"), Some(7), Some(10), 20.0)],
    );
    let c = sp
        .convert("spBv1.0/plant/NBIRTH/edge1", &birth, Records::PerMetric)
        .expect("birth");
    let r = records(&c);
    assert_eq!(r.len(), 3, "a state record and one per metric");
    assert_eq!(r[0]["state"], "online");
    assert_eq!(r[0]["message_type"], "NBIRTH");
    assert_eq!(r[2]["name"], "temp");
    assert_eq!(r[2]["value"], 20.0);

    let mut dbirth_metric = metric(Some("speed"), Some(8), Some(3));
    dbirth_metric.uint(10, u64::from(-12i32 as u32));
    let c = sp
        .convert(
            "spBv1.0/plant/DBIRTH/edge1/pump7",
            &payload(Some(1), &[dbirth_metric]),
            Records::PerMetric,
        )
        .expect("dbirth");
    let r = records(&c);
    assert_eq!(r[0]["device"], "pump7");
    assert_eq!(r[1]["value"], -12, "Int32 in int_value is two's complement");

    // Data by alias only.
    let mut speed = metric(None, Some(8), None);
    speed.uint(10, u64::from(-3i32 as u32));
    let c = sp
        .convert(
            "spBv1.0/plant/DDATA/edge1/pump7",
            &payload(Some(2), &[speed, double(None, Some(7), None, 21.5)]),
            Records::PerMetric,
        )
        .expect("ddata");
    assert!(c.anomalies.is_empty());
    let r = records(&c);
    assert_eq!(r.len(), 2);
    assert_eq!(
        (&r[0]["name"], &r[0]["datatype"], &r[0]["value"]),
        (&json!("speed"), &json!("Int32"), &json!(-3))
    );
    assert_eq!(r[1]["name"], "temp");
    assert_eq!(r[1]["seq"], 2);
    assert_eq!(r[1]["timestamp"], 1_000);
    assert!(r[1].get("seq_gap").is_none());
}

#[test]
fn gaps_missing_births_and_stale_deaths_are_reported() {
    let sp = Sparkplug::default();
    // Data before any birth (a restarted gateway): written, flagged.
    let c = sp
        .convert(
            "spBv1.0/g/NDATA/e",
            &payload(Some(5), &[double(None, Some(1), None, 1.0)]),
            Records::PerMetric,
        )
        .expect("data");
    assert_eq!(c.anomalies, [Anomaly::BirthMissing]);
    let r = records(&c);
    assert_eq!(r[0]["birth_missing"], true);
    assert_eq!(r[0]["name"], Json::Null);
    sp.convert(
        "spBv1.0/g/NBIRTH/e",
        &payload(Some(0), &[bd(1)]),
        Records::PerMetric,
    )
    .expect("birth");
    sp.convert(
        "spBv1.0/g/NDATA/e",
        &payload(Some(1), &[]),
        Records::PerMetric,
    )
    .expect("data");
    // seq 2 is lost.
    let c = sp
        .convert(
            "spBv1.0/g/NDATA/e",
            &payload(Some(3), &[]),
            Records::PerMetric,
        )
        .expect("data");
    assert_eq!(c.anomalies, [Anomaly::SeqGap]);
    // Wrapping is not a gap.
    let sp2 = Sparkplug::default();
    sp2.convert(
        "spBv1.0/g/NBIRTH/e",
        &payload(Some(255), &[bd(1)]),
        Records::PerMetric,
    )
    .expect("birth");
    let c = sp2
        .convert(
            "spBv1.0/g/NDATA/e",
            &payload(Some(0), &[]),
            Records::PerMetric,
        )
        .expect("data");
    assert!(c.anomalies.is_empty());
    // A death from an older session changes nothing.
    let c = sp
        .convert(
            "spBv1.0/g/NDEATH/e",
            &payload(None, &[bd(0)]),
            Records::PerMetric,
        )
        .expect("death");
    assert_eq!(c.anomalies, [Anomaly::StaleDeath]);
    assert_eq!(records(&c)[0]["stale"], true);
    let c = sp
        .convert(
            "spBv1.0/g/NDEATH/e",
            &payload(None, &[bd(1)]),
            Records::PerMetric,
        )
        .expect("death");
    assert!(c.anomalies.is_empty());
    assert_eq!(records(&c)[0]["state"], "offline");
}

#[test]
fn per_payload_keeps_the_metrics_together() {
    let sp = Sparkplug::default();
    let c = sp
        .convert(
            "spBv1.0/g/NBIRTH/e",
            &payload(
                Some(0),
                &[
                    double(Some("a"), Some(1), Some(10), 1.0),
                    double(Some("b"), Some(2), Some(10), 2.0),
                ],
            ),
            Records::PerPayload,
        )
        .expect("birth");
    let r = records(&c);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["state"], "online");
    assert_eq!(r[0]["metrics"][1]["name"], "b");
    assert_eq!(r[0]["metrics"][1]["value"], 2.0);
}

#[test]
fn values_follow_their_datatypes() {
    let cases: Vec<(u32, Value, Json)> = vec![
        (1, Value::Int(0xff), json!(-1)),
        (2, Value::Int(0xfffe), json!(-2)),
        (5, Value::Int(200), json!(200)),
        (4, Value::Long(u64::MAX), json!(-1)),
        (8, Value::Long(u64::MAX), json!(u64::MAX)),
        (
            13,
            Value::Long(1_700_000_000_000),
            json!(1_700_000_000_000u64),
        ),
        (9, Value::Float(f32::NAN), Json::Null),
        (
            17,
            Value::Bytes(Bytes::from_static(&[0xde, 0xad])),
            json!("dead"),
        ),
        (
            24,
            Value::Bytes(Bytes::from(
                [(-1i32).to_le_bytes(), 7i32.to_le_bytes()].concat(),
            )),
            json!([-1, 7]),
        ),
        (
            31,
            Value::Bytes(Bytes::from(1.5f64.to_le_bytes().to_vec())),
            json!([1.5]),
        ),
        (
            32,
            Value::Bytes(Bytes::from_static(&[3, 0, 0, 0, 0b1010_0000])),
            json!([true, false, true]),
        ),
        (
            33,
            Value::Bytes(Bytes::from_static(b"ab\0\0c\0")),
            json!(["ab", "", "c"]),
        ),
    ];
    for (dt, v, want) in cases {
        assert_eq!(value(Some(dt), &v).0, want, "datatype {dt}");
    }
    assert_eq!(
        value(Some(24), &Value::Bytes(Bytes::from_static(&[1, 2, 3]))),
        (Json::Null, Some("malformed array"))
    );
    assert_eq!(
        value(Some(16), &Value::Unsupported("DataSet")),
        (Json::Null, Some("DataSet"))
    );
}

#[test]
fn topics_and_state_messages() {
    for bad in [
        "spBv1.0/g/NDATA",
        "spBv1.0/g/NDATA/e/dev",
        "spBv1.0/g/DDATA/e",
        "spBv1.0/g/XDATA/e",
        "spAv1.0/g/NDATA/e",
        "spBv1.0//NDATA/e",
    ] {
        assert!(parse_topic(bad).is_err(), "{bad}");
    }
    let sp = Sparkplug::default();
    let c = sp
        .convert(
            "spBv1.0/STATE/scada1",
            &Bytes::from_static(br#"{"online":true,"timestamp":5}"#),
            Records::PerMetric,
        )
        .expect("state");
    assert_eq!(
        records(&c)[0],
        json!({"message_type": "STATE", "host": "scada1", "online": true, "timestamp": 5})
    );
    let c = sp
        .convert(
            "spBv1.0/STATE/old",
            &Bytes::from_static(b"OFFLINE"),
            Records::PerMetric,
        )
        .expect("2.2 state");
    assert_eq!(records(&c)[0]["online"], false);
    assert_eq!(
        sp.convert(
            "spBv1.0/STATE/x",
            &Bytes::from_static(b"?"),
            Records::PerMetric
        )
        .expect_err("bad state"),
        FormatError::State
    );
    assert!(matches!(
        sp.convert(
            "spBv1.0/g/NDATA/e",
            &Bytes::from_static(&[0x0b]),
            Records::PerMetric
        ),
        Err(FormatError::Payload(_))
    ));
}

#[tokio::test]
async fn births_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(JOURNAL);
    {
        let sp = Sparkplug::open(&path).expect("open");
        sp.convert(
            "spBv1.0/g/NBIRTH/e",
            &payload(
                Some(0),
                &[bd(4), double(Some("temp"), Some(7), Some(10), 1.0)],
            ),
            Records::PerMetric,
        )
        .expect("birth");
        let mut rpm = metric(Some("rpm"), Some(8), Some(2));
        rpm.uint(10, 1);
        sp.convert(
            "spBv1.0/g/DBIRTH/e/pump",
            &payload(Some(1), &[rpm]),
            Records::PerMetric,
        )
        .expect("dbirth");
        sp.sync().await.expect("durable");
    }
    let sp = Sparkplug::open(&path).expect("reopen");
    let mut rpm = metric(None, Some(8), None);
    rpm.uint(10, u64::from(0xfffeu32));
    let c = sp
        .convert(
            "spBv1.0/g/DDATA/e/pump",
            &payload(Some(9), &[rpm, double(None, Some(7), None, 2.0)]),
            Records::PerMetric,
        )
        .expect("data");
    assert!(c.anomalies.is_empty(), "{:?}", c.anomalies);
    let r = records(&c);
    assert_eq!(
        (&r[0]["name"], &r[0]["datatype"], &r[0]["value"]),
        (&json!("rpm"), &json!("Int16"), &json!(-2))
    );
    assert_eq!(r[1]["name"], "temp");
    // The birth's bdSeq came back too: a death of another session is stale.
    let c = sp
        .convert(
            "spBv1.0/g/NDEATH/e",
            &payload(None, &[bd(3)]),
            Records::PerMetric,
        )
        .expect("death");
    assert_eq!(c.anomalies, [Anomaly::StaleDeath]);
    // A damaged record is skipped, not fatal.
    drop(sp);
    let mut data = std::fs::read(&path).expect("read");
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&path, data).expect("write");
    Sparkplug::open(&path).expect("opens past a damaged tail");
}

/// The shipped Avro schema fits every record the converter writes: both shapes, state
/// records, gaps, missing births, stale deaths, and values of each kind (scalars, arrays,
/// nulls and unsupported ones); fastavro reading them back is `tests/schema_registry.rs`'s.
#[test]
fn the_shipped_avro_schema_fits_every_record_shape() {
    use crate::format::registry::avro::Writer;
    let schema = apache_avro::Schema::parse_str(AVRO_SCHEMA).expect("the shipped schema");
    let writer = Writer::new(schema.clone());
    let fits = |c: &Converted| {
        for r in &c.records {
            let framed = writer
                .encode(1, r)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(r)));
            apache_avro::from_avro_datum(&schema, &mut &framed[5..], None).expect("reads back");
        }
    };
    let mut ints = metric(Some("ints"), Some(20), Some(24));
    ints.bytes(16, &[(-1i32).to_le_bytes(), 7i32.to_le_bytes()].concat());
    let mut label = metric(Some("label"), Some(21), Some(12));
    label.bytes(15, b"ok");
    let mut flag = metric(Some("on"), Some(22), Some(11));
    flag.uint(14, 1);
    let mut dataset = metric(Some("table"), Some(23), Some(16));
    dataset.bytes(17, &[]);
    let mut raw = metric(Some("blob"), Some(24), Some(17));
    raw.bytes(16, &[0xde, 0xad]);
    let metrics = [
        bd(1),
        double(Some("temp"), Some(7), Some(10), 20.0),
        ints,
        label,
        flag,
        dataset,
        raw,
    ];
    for shape in [Records::PerMetric, Records::PerPayload] {
        let sp = Sparkplug::default();
        let mut steps = vec![
            (
                "spBv1.0/g/NDATA/e",
                payload(Some(9), &[double(None, Some(1), None, 1.0)]),
            ),
            ("spBv1.0/g/NBIRTH/e", payload(Some(0), &metrics)),
            ("spBv1.0/g/DBIRTH/e/d", payload(Some(1), &metrics[1..])),
            (
                "spBv1.0/g/DDATA/e/d",
                payload(Some(5), &[double(None, Some(7), None, 1.5)]),
            ),
            ("spBv1.0/g/DDEATH/e/d", payload(Some(6), &[])),
            ("spBv1.0/g/NDEATH/e", payload(None, &[bd(0)])),
            ("spBv1.0/g/NDEATH/e", payload(None, &[bd(1)])),
            (
                "spBv1.0/STATE/host1",
                Bytes::from_static(br#"{"online":true,"timestamp":5}"#),
            ),
            ("spBv1.0/STATE/host1", Bytes::from_static(b"OFFLINE")),
        ];
        for (topic, p) in steps.drain(..) {
            let c = sp.convert(topic, &p, shape).expect(topic);
            fits(&c);
            if topic == "spBv1.0/g/NBIRTH/e" && shape == Records::PerMetric {
                let values: Vec<Json> = records(&c).iter().map(|r| r["value"].clone()).collect();
                assert_eq!(
                    values[2..],
                    [
                        json!(20.0),
                        json!([-1, 7]),
                        json!("ok"),
                        json!(true),
                        Json::Null,
                        json!("dead")
                    ]
                );
            }
        }
    }
}
