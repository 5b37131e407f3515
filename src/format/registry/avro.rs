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
    // (an object into a record, an int into a long or a double, a union's branch).
    let value = Value::from(value).resolve(schema).map_err(mismatch)?;
    let mut out = Vec::with_capacity(5 + json.len() / 2);
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    apache_avro::to_avro_datum(schema, value)
        .map(|body| {
            out.extend_from_slice(&body);
            out
        })
        .map_err(mismatch)
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

    #[test]
    fn schema_id_needs_the_magic_byte_and_four_bytes() {
        assert_eq!(schema_id(&[0, 0, 0, 0, 5]), Some(5));
        assert_eq!(schema_id(&[0, 0, 0, 5]), None);
        assert_eq!(schema_id(&[1, 0, 0, 0, 5, 9]), None);
        assert_eq!(schema_id(b"{}"), None);
    }
}
