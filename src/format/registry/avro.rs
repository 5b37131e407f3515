//! JSON → Avro in the Confluent wire format: magic byte 0, the schema id as 4 bytes big
//! endian, then the Avro binary encoding of the value (no container header).

use apache_avro::Schema;
use apache_avro::types::Value;

/// The Confluent wire format's first byte.
pub const MAGIC: u8 = 0;

/// Why a payload does not encode: shown in the dead-letter log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the payload is not JSON: {0}")]
    NotJson(String),
    #[error("the payload does not match schema {id}: {reason}")]
    Mismatch { id: u32, reason: String },
}

/// `json` encoded by `schema` (registered as `id`), framed for Kafka.
pub fn encode(schema: &Schema, id: u32, json: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| EncodeError::NotJson(e.to_string()))?;
    let mismatch = |e: apache_avro::Error| EncodeError::Mismatch {
        id,
        reason: e.to_string(),
    };
    // `resolve` checks the value against the schema and converts what JSON cannot say
    // (an object into a record, an int into a long or a double, a union's branch). A device
    // chooses the value: should the library panic on one, that payload is refused, not the
    // gateway stopped.
    let body = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let value = Value::from(value).resolve(schema)?;
        apache_avro::to_avro_datum(schema, value)
    }))
    .map_err(|_| EncodeError::Mismatch {
        id,
        reason: "the Avro encoder failed on this payload".into(),
    })?
    .map_err(mismatch)?;
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The schema id of a Confluent-framed payload, if it is one.
pub fn schema_id(framed: &[u8]) -> Option<u32> {
    match framed {
        [MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READING: &str = r#"{"type":"record","name":"Reading","namespace":"acme",
        "fields":[{"name":"device","type":"string"},{"name":"temp","type":"double"},
        {"name":"seq","type":"long"},{"name":"unit","type":["null","string"],"default":null}]}"#;

    #[test]
    fn a_matching_payload_is_framed_and_reads_back() {
        let schema = Schema::parse_str(READING).unwrap();
        let framed = encode(
            &schema,
            258,
            br#"{"device":"d1","temp":21,"seq":7,"unit":"C"}"#,
        )
        .unwrap();
        assert_eq!(&framed[..5], &[0, 0, 0, 1, 2]);
        assert_eq!(schema_id(&framed), Some(258));
        let back = apache_avro::from_avro_datum(&schema, &mut &framed[5..], None).unwrap();
        let Value::Record(fields) = back else {
            panic!("not a record: {back:?}")
        };
        assert_eq!(fields[0], ("device".into(), Value::String("d1".into())));
        assert_eq!(fields[1], ("temp".into(), Value::Double(21.0)));
        assert_eq!(fields[2], ("seq".into(), Value::Long(7)));
        assert_eq!(
            fields[3],
            (
                "unit".into(),
                Value::Union(1, Box::new(Value::String("C".into())))
            )
        );
    }

    #[test]
    fn an_optional_field_may_be_left_out() {
        let schema = Schema::parse_str(READING).unwrap();
        let framed = encode(&schema, 1, br#"{"device":"d1","temp":1.5,"seq":1}"#).unwrap();
        // device "d1" (len 2 zigzag = 4), temp 8 bytes, seq 1 (zigzag 2), union branch 0.
        assert_eq!(framed.len(), 5 + 3 + 8 + 1 + 1);
    }

    #[test]
    fn fields_the_schema_does_not_name_are_dropped() {
        let schema = Schema::parse_str(READING).unwrap();
        let plain = encode(&schema, 1, br#"{"device":"d","temp":1,"seq":2}"#).unwrap();
        let extra = encode(
            &schema,
            1,
            br#"{"device":"d","temp":1,"seq":2,"battery":87,"meta":{"fw":"1.2"}}"#,
        )
        .unwrap();
        assert_eq!(plain, extra);
    }

    #[test]
    fn payloads_that_cannot_match_say_why() {
        let schema = Schema::parse_str(READING).unwrap();
        for bad in [
            &br#"{"device":"d1","temp":"hot","seq":1}"#[..],
            br#"{"temp":1.0,"seq":1}"#,
            br#"[1,2,3]"#,
            br#"{"device":"d1","temp":1.0,"seq":1.5}"#,
        ] {
            match encode(&schema, 9, bad) {
                Err(EncodeError::Mismatch { id: 9, reason }) => assert!(!reason.is_empty()),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
        assert!(matches!(
            encode(&schema, 9, b"\xff not json"),
            Err(EncodeError::NotJson(_))
        ));
    }

    /// Whatever JSON a device sends, against a schema with every kind of type: encoded or
    /// refused with a reason, and what is encoded reads back.
    #[test]
    fn any_json_is_encoded_or_refused_never_a_panic() {
        use proptest::prelude::*;
        const RICH: &str = r#"{"type":"record","name":"All","fields":[
            {"name":"i","type":"int"},{"name":"l","type":["null","long"],"default":null},
            {"name":"f","type":"float","default":0},{"name":"s","type":"string","default":""},
            {"name":"b","type":"boolean","default":false},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["A","B"]},"default":"A"},
            {"name":"a","type":{"type":"array","items":"double"},"default":[]},
            {"name":"m","type":{"type":"map","values":["null","string","long"]},"default":{}},
            {"name":"r","type":["null",{"type":"record","name":"Inner","fields":
                [{"name":"x","type":"int"}]}],"default":null},
            {"name":"by","type":"bytes","default":""},
            {"name":"fx","type":{"type":"fixed","name":"F","size":2},"default":"ab"},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"},"default":0},
            {"name":"u","type":["null",{"type":"string","logicalType":"uuid"}],"default":null}]}"#;
        let schema = Schema::parse_str(RICH).unwrap();
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            "[a-zA-Z0-9]{0,3}".prop_map(serde_json::Value::from),
        ];
        let names = prop_oneof![
            Just("i"),
            Just("l"),
            Just("f"),
            Just("s"),
            Just("b"),
            Just("e"),
            Just("a"),
            Just("m"),
            Just("r"),
            Just("by"),
            Just("fx"),
            Just("ts"),
            Just("u"),
            Just("x"),
            Just("zz")
        ];
        let json = leaf.prop_recursive(3, 24, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(names.clone(), inner, 0..8).prop_map(|m| {
                    serde_json::Value::Object(
                        m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                    )
                }),
            ]
        });
        proptest!(ProptestConfig::with_cases(2000), |(value in json)| {
            let bytes = serde_json::to_vec(&value).unwrap();
            if let Ok(framed) = encode(&schema, 1, &bytes) {
                prop_assert_eq!(schema_id(&framed), Some(1));
                let back = apache_avro::from_avro_datum(&schema, &mut &framed[5..], None);
                prop_assert!(back.is_ok(), "{:?}", back);
            }
        });
    }

    #[test]
    fn schema_id_needs_the_magic_byte_and_four_bytes() {
        assert_eq!(schema_id(&[0, 0, 0, 0, 5]), Some(5));
        assert_eq!(schema_id(&[0, 0, 0, 5]), None);
        assert_eq!(schema_id(&[1, 0, 0, 0, 5, 9]), None);
        assert_eq!(schema_id(b"{}"), None);
    }
}
