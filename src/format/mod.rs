//! Payload formats per route: what a message's payload becomes before it is stored.
//!
//! `raw` (the default) stores the payload untouched. `sparkplug_b` decodes Sparkplug B
//! payloads into JSON records ([`sparkplug`]). Conversion happens at ingest, before the
//! record is stored and the device acknowledged: the log then holds what goes to Kafka, and
//! the Sparkplug session state (births, aliases, sequence numbers) is applied in arrival
//! order. A payload that cannot be converted is not refused (Sparkplug data is QoS 0, and a
//! refusal would cost the device its message): it is stored as it came with an
//! `edgegate-format-error` header, and the forwarder moves it to the dead-letter log with
//! that reason instead of sending it, counted in `edgegate_format_errors_total`.
//!
//! `json` only checks that a payload is JSON (it is stored untouched); `avro` and `protobuf`
//! encode JSON payloads with a schema from a schema registry ([`registry`]), and
//! `json_schema` validates them with one and frames them with its id, at
//! ingest when the schema is known, else when the forwarder sends the record; a payload
//! that does not match is treated like a Sparkplug payload that does not convert.
//!
//! [`timestamp`] is the other per-route transform at ingest: a record's timestamp taken from
//! its payload (`timestamp = "payload"`), JSON or converted Sparkplug alike.

pub mod registry;
pub mod sparkplug;
pub mod timestamp;

use serde::Deserialize;

/// A route's `format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Raw,
    SparkplugB,
    /// JSON encoded to Avro by the subject's schema in `[schema_registry]` ([`registry`]).
    Avro,
    /// JSON, validated and stored untouched: a payload that is not JSON is dead-lettered.
    Json,
    /// JSON validated by the subject's JSON Schema in `[schema_registry]` and framed with
    /// its id ([`registry`]).
    JsonSchema,
    /// JSON encoded to Protobuf by the subject's `.proto` schema in `[schema_registry]`
    /// ([`registry::protobuf`]).
    Protobuf,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::SparkplugB => "sparkplug_b",
            Format::Avro => "avro",
            Format::Json => "json",
            Format::JsonSchema => "json_schema",
            Format::Protobuf => "protobuf",
        }
    }
}

/// The header that marks a record whose payload could not be converted, with the reason.
pub const ERROR_HEADER: &str = "edgegate-format-error";
/// The header naming the format a record was converted from.
pub const FORMAT_HEADER: &str = "edgegate-format";
