//! The Sparkplug B payload (Eclipse Sparkplug 3.0, `sparkplug_b.proto`), decoded by hand:
//! the schema is small and fixed, and a decoder that reads only what it needs, bounds every
//! length and never panics is easier to trust on hostile input than generated code.
//!
//! ```text
//! Payload: 1 timestamp uint64 | 2 metrics Metric* | 3 seq uint64 | 4 uuid string | 5 body bytes
//! Metric:  1 name string | 2 alias uint64 | 3 timestamp uint64 | 4 datatype uint32
//!          | 5 is_historical bool | 6 is_transient bool | 7 is_null bool
//!          | 8 metadata | 9 properties            (skipped)
//!          | value, one of: 10 int_value uint32 | 11 long_value uint64 | 12 float_value float
//!            | 13 double_value double | 14 boolean_value bool | 15 string_value string
//!            | 16 bytes_value bytes | 17 dataset | 18 template | 19 extension (kept as unsupported)
//! ```
//!
//! Unknown fields are skipped, as protobuf requires; a truncated field, a length past the end,
//! a bad wire type or a string that is not UTF-8 is an error naming the field.

use bytes::Bytes;

/// A decoded Sparkplug B payload.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Payload {
    pub timestamp: Option<u64>,
    pub metrics: Vec<Metric>,
    pub seq: Option<u64>,
    pub uuid: Option<String>,
}

/// One metric as it travels: in a birth with its name, datatype and alias; in data often with
/// only its alias.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metric {
    pub name: Option<String>,
    pub alias: Option<u64>,
    pub timestamp: Option<u64>,
    pub datatype: Option<u32>,
    pub is_historical: bool,
    pub is_transient: bool,
    pub is_null: bool,
    pub value: Value,
}

/// The `value` oneof, as on the wire: what it means depends on the datatype.
#[derive(Debug, Default, Clone, PartialEq)]
pub enum Value {
    #[default]
    None,
    Int(u32),
    Long(u64),
    Float(f32),
    Double(f64),
    Bool(bool),
    String(String),
    Bytes(Bytes),
    /// A DataSet, Template or extension value: decoded no further.
    Unsupported(&'static str),
}

/// Why a payload is not Sparkplug B.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Sparkplug B payload: {0}")]
pub struct DecodeError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

/// A cursor over protobuf wire data.
struct Wire {
    data: Bytes,
    at: usize,
}

/// A field's value by wire type.
enum Field {
    Varint(u64),
    Fixed64(u64),
    Len(Bytes),
    Fixed32(u32),
}

impl Wire {
    fn new(data: Bytes) -> Wire {
        Wire { data, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.data.get(self.at) else {
                return err("truncated varint");
            };
            self.at += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        err("varint longer than 10 bytes")
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let Some(bytes) = self.data.get(self.at..self.at + N) else {
            return err("truncated fixed-width field");
        };
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// The next field number and its value.
    fn field(&mut self) -> Result<(u64, Field), DecodeError> {
        let key = self.varint()?;
        let (number, wire_type) = (key >> 3, key & 7);
        let field = match wire_type {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(self.fixed::<8>()?)),
            2 => {
                let len = self.varint()?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| self.at.checked_add(l))
                    .filter(|end| *end <= self.data.len());
                let Some(end) = end else {
                    return err(format!("field {number}: length {len} past the end"));
                };
                let value = self.data.slice(self.at..end);
                self.at = end;
                Field::Len(value)
            }
            5 => Field::Fixed32(u32::from_le_bytes(self.fixed::<4>()?)),
            other => return err(format!("field {number}: wire type {other}")),
        };
        Ok((number, field))
    }
}

fn varint(number: u64, field: Field) -> Result<u64, DecodeError> {
    match field {
        Field::Varint(v) => Ok(v),
        _ => err(format!("field {number}: expected a varint")),
    }
}

fn text(number: u64, field: Field) -> Result<String, DecodeError> {
    match field {
        Field::Len(b) => match String::from_utf8(b.to_vec()) {
            Ok(s) => Ok(s),
            Err(_) => err(format!("field {number}: not UTF-8")),
        },
        _ => err(format!("field {number}: expected a string")),
    }
}

/// Decodes a Sparkplug B payload.
pub fn decode(data: Bytes) -> Result<Payload, DecodeError> {
    let mut wire = Wire::new(data);
    let mut payload = Payload::default();
    while !wire.done() {
        let (number, field) = wire.field()?;
        match number {
            1 => payload.timestamp = Some(varint(number, field)?),
            2 => match field {
                Field::Len(b) => payload.metrics.push(metric(b).map_err(|e| {
                    DecodeError(format!("metric {}: {}", payload.metrics.len(), e.0))
                })?),
                _ => return err("field 2: expected a metric"),
            },
            3 => payload.seq = Some(varint(number, field)?),
            4 => payload.uuid = Some(text(number, field)?),
            _ => {}
        }
    }
    Ok(payload)
}

fn metric(data: Bytes) -> Result<Metric, DecodeError> {
    let mut wire = Wire::new(data);
    let mut m = Metric::default();
    while !wire.done() {
        let (number, field) = wire.field()?;
        match (number, field) {
            (1, f) => m.name = Some(text(1, f)?),
            (2, f) => m.alias = Some(varint(2, f)?),
            (3, f) => m.timestamp = Some(varint(3, f)?),
            (4, f) => {
                m.datatype = Some(u32::try_from(varint(4, f)?).unwrap_or(u32::MAX));
            }
            (5, f) => m.is_historical = varint(5, f)? != 0,
            (6, f) => m.is_transient = varint(6, f)? != 0,
            (7, f) => m.is_null = varint(7, f)? != 0,
            (10, Field::Varint(v)) => m.value = Value::Int(v as u32),
            (11, Field::Varint(v)) => m.value = Value::Long(v),
            (12, Field::Fixed32(v)) => m.value = Value::Float(f32::from_bits(v)),
            (13, Field::Fixed64(v)) => m.value = Value::Double(f64::from_bits(v)),
            (14, Field::Varint(v)) => m.value = Value::Bool(v != 0),
            (15, f) => m.value = Value::String(text(15, f)?),
            (16, Field::Len(b)) => m.value = Value::Bytes(b),
            (17, Field::Len(_)) => m.value = Value::Unsupported("DataSet"),
            (18, Field::Len(_)) => m.value = Value::Unsupported("Template"),
            (19, Field::Len(_)) => m.value = Value::Unsupported("Extension"),
            (10..=19, _) => return err(format!("field {number}: wrong wire type for a value")),
            _ => {}
        }
    }
    Ok(m)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal protobuf writer for test payloads (the integration tests use an independent
    /// encoder, Eclipse Tahu's `sparkplug-payload` from npm).
    #[derive(Default)]
    pub struct Enc(pub Vec<u8>);

    impl Enc {
        pub fn varint(&mut self, mut v: u64) -> &mut Self {
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    self.0.push(b);
                    return self;
                }
                self.0.push(b | 0x80);
            }
        }
        pub fn key(&mut self, number: u64, wire_type: u64) -> &mut Self {
            self.varint(number << 3 | wire_type)
        }
        pub fn uint(&mut self, number: u64, v: u64) -> &mut Self {
            self.key(number, 0).varint(v)
        }
        pub fn bytes(&mut self, number: u64, b: &[u8]) -> &mut Self {
            self.key(number, 2).varint(b.len() as u64);
            self.0.extend_from_slice(b);
            self
        }
        pub fn double(&mut self, number: u64, v: f64) -> &mut Self {
            self.key(number, 1);
            self.0.extend_from_slice(&v.to_bits().to_le_bytes());
            self
        }
        pub fn float(&mut self, number: u64, v: f32) -> &mut Self {
            self.key(number, 5);
            self.0.extend_from_slice(&v.to_bits().to_le_bytes());
            self
        }
    }

    pub fn metric(name: Option<&str>, alias: Option<u64>, datatype: Option<u32>) -> Enc {
        let mut m = Enc::default();
        if let Some(n) = name {
            m.bytes(1, n.as_bytes());
        }
        if let Some(a) = alias {
            m.uint(2, a);
        }
        if let Some(d) = datatype {
            m.uint(4, u64::from(d));
        }
        m
    }

    #[test]
    fn a_payload_with_every_scalar_decodes() {
        let mut p = Enc::default();
        p.uint(1, 1_700_000_000_000);
        let mut m = metric(Some("temp"), Some(1), Some(10));
        m.uint(3, 1_700_000_000_001).double(13, 21.5);
        p.bytes(2, &m.0);
        let mut m = metric(Some("count"), None, Some(3));
        m.uint(10, u64::from(-5i32 as u32));
        p.bytes(2, &m.0);
        let mut m = metric(None, Some(2), None);
        m.float(12, 1.25).uint(5, 1);
        p.bytes(2, &m.0);
        let mut m = metric(Some("on"), None, Some(11));
        m.uint(14, 1).uint(7, 0);
        p.bytes(2, &m.0);
        let mut m = metric(Some("label"), None, Some(12));
        m.bytes(15, "héllo".as_bytes());
        p.bytes(2, &m.0);
        let mut m = metric(Some("blob"), None, Some(17));
        m.bytes(16, &[1, 2, 3]).bytes(17, &[8, 1]);
        p.bytes(2, &m.0);
        p.uint(3, 7)
            .bytes(4, b"uuid-1")
            .bytes(5, b"body")
            .uint(99, 5);
        let got = decode(Bytes::from(p.0)).expect("decodes");
        assert_eq!(got.timestamp, Some(1_700_000_000_000));
        assert_eq!(got.seq, Some(7));
        assert_eq!(got.uuid.as_deref(), Some("uuid-1"));
        let m = &got.metrics;
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].name.as_deref(), Some("temp"));
        assert_eq!((m[0].alias, m[0].datatype), (Some(1), Some(10)));
        assert_eq!(m[0].timestamp, Some(1_700_000_000_001));
        assert_eq!(m[0].value, Value::Double(21.5));
        assert_eq!(m[1].value, Value::Int(-5i32 as u32));
        assert_eq!(m[2].value, Value::Float(1.25));
        assert!(m[2].is_historical && m[2].name.is_none());
        assert_eq!(m[3].value, Value::Bool(true));
        assert_eq!(m[4].value, Value::String("héllo".into()));
        assert_eq!(
            m[5].value,
            Value::Unsupported("DataSet"),
            "the last value wins"
        );
    }

    #[test]
    fn damaged_payloads_are_errors_not_panics() {
        let mut m = metric(Some("x"), Some(1), Some(10));
        m.double(13, 1.0);
        let mut p = Enc::default();
        p.uint(1, 5).bytes(2, &m.0).uint(3, 1);
        let good = p.0.clone();
        assert!(decode(Bytes::from(good.clone())).is_ok());
        // Every truncation is either a clean error or a shorter valid payload.
        for cut in 0..good.len() {
            let _ = decode(Bytes::copy_from_slice(&good[..cut]));
        }
        for bad in [
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f][..], // metric longer than the data
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ], // 11-byte varint
            &[0x0b],                                   // wire type 3 (groups)
            &[0x12, 0x02, 0x0a, 0x05],                 // metric name past its metric
            &[0x12, 0x03, 0x0a, 0x01, 0xff],           // name not UTF-8
            &[0x12, 0x02, 0x68, 0x01],                 // double_value as a varint
        ] {
            let e = decode(Bytes::copy_from_slice(bad)).expect_err("refused");
            assert!(!e.0.is_empty());
        }
        // Arbitrary bytes never panic.
        let mut x = 0x1234_5678u32;
        for len in 0..2000 {
            let data: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode(Bytes::from(data));
        }
    }
}
