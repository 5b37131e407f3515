//! JSON → Protobuf bytes in one walk over the parsed JSON and the message's descriptor.
//!
//! Every function returns `None` to give up: the payload is then read by prost-reflect
//! ([`super::read_dynamic`]), which takes the whole Protobuf JSON mapping and says why a
//! payload does not fit. So the walk only has to be right when it answers, and it answers
//! only where the mapping is plain: numbers as JSON numbers of their kind, enums by a name or
//! number the enum has, strings, booleans, nested messages, repeated fields and maps of
//! those. It gives up on strings for numbers, `bytes`, a `null` anywhere but a field's
//! value, two members for one field (`fooBar` and `foo_bar`) or one oneof; the well-known
//! types (`google.protobuf.*`, whose JSON forms are their own) are read by prost-reflect
//! for that member only. Members the message has no field for are skipped, as prost-reflect's
//! second reading drops them. Fields are written in the JSON's order (any order is valid
//! Protobuf); a field without presence at its default is not written, as prost writes none.

use prost_reflect::{DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use protox::prost::Message;
use protox::prost::encoding::{WireType, encode_key, encode_varint};
use serde_json::{Map, Value};

use crate::format::registry::members::{self, Members};

/// Writes payload `json`, an object, as message `descriptor` to `out`, reading its members
/// without building a map ([`Members`]).
pub(super) fn payload(
    descriptor: &MessageDescriptor,
    json: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    let Members(members) = serde_json::from_slice(json).ok()?;
    let mut fields = Fields::default();
    for (name, raw) in &members {
        if let Some(field) = fields.take(descriptor, name)? {
            member(&field, &members::value(raw)?, out)?;
        }
    }
    Some(())
}

/// Writes the fields of `members` as message `descriptor` to `out`.
fn message(
    descriptor: &MessageDescriptor,
    members: &Map<String, Value>,
    out: &mut Vec<u8>,
) -> Option<()> {
    let mut fields = Fields::default();
    for (name, value) in members {
        if let Some(field) = fields.take(descriptor, name)? {
            member(&field, value, out)?;
        }
    }
    Some(())
}

/// The fields one message's members have named so far: field numbers, and oneofs set (a
/// oneof is known by its first field's number); a second one is for prost-reflect to refuse.
#[derive(Default)]
struct Fields {
    written: Seen,
    oneofs: Seen,
}

impl Fields {
    /// The field member `name` is for, if the message has one; `None` to give up.
    fn take(
        &mut self,
        descriptor: &MessageDescriptor,
        name: &str,
    ) -> Option<Option<FieldDescriptor>> {
        let Some(field) = descriptor
            .get_field_by_name(name)
            .or_else(|| descriptor.get_field_by_json_name(name))
        else {
            return Some(None);
        };
        if !self.written.insert(field.number()) {
            return None;
        }
        // (A proto3 `optional` field is a oneof of its own: never a conflict.)
        if let Some(first) = field.containing_oneof().and_then(|o| o.fields().next()) {
            if !self.oneofs.insert(first.number()) {
                return None;
            }
        }
        Some(Some(field))
    }
}

/// One member's value as `field`.
fn member(field: &FieldDescriptor, value: &Value, out: &mut Vec<u8>) -> Option<()> {
    if value.is_null() {
        // A field's null is its default (not set), but for `google.protobuf.Value`, whose
        // null is a value.
        if matches!(field.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.Value")
            || matches!(field.kind(), Kind::Enum(e) if e.full_name() == "google.protobuf.NullValue")
        {
            return None;
        }
        return Some(());
    }
    self::field(field, value, out)
}

/// A set of small numbers: a bit each below 128, a list above.
#[derive(Default)]
struct Seen {
    low: u128,
    high: Vec<u32>,
}

impl Seen {
    /// Adds `n`; false when it was there.
    fn insert(&mut self, n: u32) -> bool {
        if n < 128 {
            let bit = 1u128 << n;
            let new = self.low & bit == 0;
            self.low |= bit;
            new
        } else if self.high.contains(&n) {
            false
        } else {
            self.high.push(n);
            true
        }
    }
}

fn field(field: &FieldDescriptor, value: &Value, out: &mut Vec<u8>) -> Option<()> {
    let number = field.number();
    let kind = field.kind();
    if field.is_map() {
        let Kind::Message(entry) = &kind else {
            return None;
        };
        let (key_field, value_field) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        let mut scratch = Vec::new();
        for (key, item) in value.as_object()? {
            if item.is_null() {
                return None;
            }
            scratch.clear();
            map_key(&key_field, key, &mut scratch)?;
            single(
                value_field.number(),
                &value_field.kind(),
                item,
                false,
                &mut scratch,
            )?;
            encode_key(number, WireType::LengthDelimited, out);
            encode_varint(scratch.len() as u64, out);
            out.extend_from_slice(&scratch);
        }
        return Some(());
    }
    if field.is_list() {
        let items = value.as_array()?;
        if items.is_empty() {
            return Some(());
        }
        if field.is_packed() {
            let mut packed = Vec::with_capacity(items.len() * 4);
            for item in items {
                scalar(&kind, item, &mut packed)?;
            }
            encode_key(number, WireType::LengthDelimited, out);
            encode_varint(packed.len() as u64, out);
            out.extend_from_slice(&packed);
        } else {
            for item in items {
                if item.is_null() {
                    return None;
                }
                single(number, &kind, item, false, out)?;
            }
        }
        return Some(());
    }
    single(number, &kind, value, !field.supports_presence(), out)
}

/// One value of field `number`, with its key; nothing when `skip_default` and it is the
/// default.
fn single(
    number: u32,
    kind: &Kind,
    value: &Value,
    skip_default: bool,
    out: &mut Vec<u8>,
) -> Option<()> {
    match kind {
        Kind::Message(descriptor) => {
            let mut nested = Vec::new();
            if descriptor.full_name().starts_with("google.protobuf.") {
                let message = DynamicMessage::deserialize_with_options(
                    descriptor.clone(),
                    value,
                    &DeserializeOptions::new(),
                )
                .ok()?;
                message.encode(&mut nested).ok()?;
            } else {
                message(descriptor, value.as_object()?, &mut nested)?;
            }
            encode_key(number, WireType::LengthDelimited, out);
            encode_varint(nested.len() as u64, out);
            out.extend_from_slice(&nested);
        }
        Kind::String => {
            let text = value.as_str()?;
            if skip_default && text.is_empty() {
                return Some(());
            }
            encode_key(number, WireType::LengthDelimited, out);
            encode_varint(text.len() as u64, out);
            out.extend_from_slice(text.as_bytes());
        }
        Kind::Bytes => return None,
        _ => {
            let start = out.len();
            encode_key(number, wire_type(kind), out);
            let default = scalar(kind, value, out)?;
            if skip_default && default {
                out.truncate(start);
            }
        }
    }
    Some(())
}

/// A map entry's key (field 1) from the JSON member's name.
fn map_key(field: &FieldDescriptor, key: &str, out: &mut Vec<u8>) -> Option<()> {
    let kind = field.kind();
    let value = match kind {
        Kind::String => Value::from(key),
        Kind::Bool => match key {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return None,
        },
        // Integer keys: plain decimal only; anything else is for prost-reflect.
        _ => {
            let digits = key.strip_prefix('-').unwrap_or(key);
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || (digits.len() > 1 && digits.starts_with('0'))
            {
                return None;
            }
            if key.starts_with('-') {
                Value::from(key.parse::<i64>().ok()?)
            } else {
                Value::from(key.parse::<u64>().ok()?)
            }
        }
    };
    single(field.number(), &kind, &value, false, out)
}

/// A scalar's bytes without its key; whether it is the kind's default. `None` for a value
/// that is not plainly of the kind.
fn scalar(kind: &Kind, value: &Value, out: &mut Vec<u8>) -> Option<bool> {
    let int = || value.as_i64().filter(|_| !value.is_f64());
    let uint = || value.as_u64().filter(|_| !value.is_f64());
    match kind {
        Kind::Int32 => {
            let v = i32::try_from(int()?).ok()?;
            encode_varint(i64::from(v) as u64, out);
            Some(v == 0)
        }
        Kind::Int64 => {
            let v = int()?;
            encode_varint(v as u64, out);
            Some(v == 0)
        }
        Kind::Uint32 => {
            let v = u32::try_from(uint()?).ok()?;
            encode_varint(u64::from(v), out);
            Some(v == 0)
        }
        Kind::Uint64 => {
            let v = uint()?;
            encode_varint(v, out);
            Some(v == 0)
        }
        Kind::Sint32 => {
            let v = i32::try_from(int()?).ok()?;
            encode_varint(u64::from(((v << 1) ^ (v >> 31)) as u32), out);
            Some(v == 0)
        }
        Kind::Sint64 => {
            let v = int()?;
            encode_varint(((v << 1) ^ (v >> 63)) as u64, out);
            Some(v == 0)
        }
        Kind::Fixed32 => {
            let v = u32::try_from(uint()?).ok()?;
            out.extend_from_slice(&v.to_le_bytes());
            Some(v == 0)
        }
        Kind::Fixed64 => {
            let v = uint()?;
            out.extend_from_slice(&v.to_le_bytes());
            Some(v == 0)
        }
        Kind::Sfixed32 => {
            let v = i32::try_from(int()?).ok()?;
            out.extend_from_slice(&v.to_le_bytes());
            Some(v == 0)
        }
        Kind::Sfixed64 => {
            let v = int()?;
            out.extend_from_slice(&v.to_le_bytes());
            Some(v == 0)
        }
        Kind::Double => {
            let v = value.as_f64()?;
            out.extend_from_slice(&v.to_le_bytes());
            Some(v.to_bits() == 0)
        }
        Kind::Float => {
            let wide = value.as_f64()?;
            let v = wide as f32;
            // Out of a float's range is prost-reflect's to refuse.
            if !v.is_finite() {
                return None;
            }
            out.extend_from_slice(&v.to_le_bytes());
            Some(v.to_bits() == 0)
        }
        Kind::Bool => {
            let v = value.as_bool()?;
            encode_varint(u64::from(v), out);
            Some(!v)
        }
        Kind::Enum(descriptor) => {
            if descriptor.full_name() == "google.protobuf.NullValue" {
                return None;
            }
            let number = match value {
                Value::String(name) => descriptor.get_value_by_name(name)?.number(),
                _ => {
                    let number = i32::try_from(int()?).ok()?;
                    descriptor.get_value(number)?.number()
                }
            };
            encode_varint(i64::from(number) as u64, out);
            Some(number == 0)
        }
        Kind::String | Kind::Bytes | Kind::Message(_) => None,
    }
}

fn wire_type(kind: &Kind) -> WireType {
    match kind {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => WireType::SixtyFourBit,
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => WireType::ThirtyTwoBit,
        Kind::String | Kind::Bytes | Kind::Message(_) => WireType::LengthDelimited,
        _ => WireType::Varint,
    }
}
