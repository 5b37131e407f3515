//! Sparkplug B (Eclipse Sparkplug 3.0) into Kafka records a consumer can read without the
//! Sparkplug schema or session state: one JSON record per metric (or per payload), with the
//! metric's name resolved from its alias, its datatype named and its value typed.
//!
//! Topics: `spBv1.0/{group}/{NBIRTH|NDATA|NDEATH|NCMD}/{edge node}`,
//! `spBv1.0/{group}/{DBIRTH|DDATA|DDEATH|DCMD}/{edge node}/{device}` and
//! `spBv1.0/STATE/{host}` (a JSON payload in 3.0, `ONLINE`/`OFFLINE` text before).
//!
//! State kept per edge node, as a Sparkplug host application keeps it:
//! - aliases: NBIRTH starts a new session (every alias of the node and its devices is
//!   forgotten), NBIRTH and DBIRTH declare `alias -> (name, datatype)`; data messages that
//!   carry only an alias get their name and datatype from there. Data whose alias no birth
//!   declared is still written, with `"birth_missing": true` and no name.
//! - sequence numbers: NBIRTH, NDATA, DBIRTH, DDATA and DDEATH carry `seq`, 0 to 255 and
//!   wrapping, one counter per edge node. A message whose `seq` is not the one after the
//!   previous is written with `"seq_gap": {"expected": n}`, logged and counted
//!   (`edgegate_sparkplug_anomalies_total{kind="seq_gap"}`): the spec's sign that messages
//!   were lost or reordered and a rebirth is due.
//! - online/offline: births and deaths become records with `"state"`, so a consumer can tell
//!   a stale device. An NDEATH whose `bdSeq` is not the current NBIRTH's belongs to an older
//!   session and is written with `"stale": true`, changing nothing.
//!
//! What the births declared (aliases, datatypes, the node's `bdSeq`) is kept on disk in a
//! journal (`{buffer.dir}/broker/sparkplug.journal`, the broker's format), one record per
//! node rewritten after each of its births:
//!
//! ```text
//! node: 1 | group str16 | edge node str16 | bdSeq u64 (u64::MAX: none)
//!       | n u32 × (alias u64 | name str16 | datatype u32 (u32::MAX: none))
//!       | m u32 × (device u8 (0: the node) [device str16] | name str16 | datatype u32)
//! ```
//!
//! so data sent by alias after a gateway restart still gets its names. Sequence numbers are
//! not kept (they change with every message): the first message after a restart is never
//! called a gap.

pub mod proto;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes};

use crate::broker::journal::{self, Fields, Journal, put16};
use serde_json::{Map, Value as Json, json};

use proto::{Metric, Payload, Value};

/// Sparkplug's topic namespace.
pub const NAMESPACE: &str = "spBv1.0";

/// One Kafka record per metric or one per payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Records {
    #[default]
    PerMetric,
    PerPayload,
}

/// What a Sparkplug route's records are in Kafka (`encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// JSON, as converted.
    #[default]
    Json,
    /// Avro by the registry's schema of the route's subject, the converted JSON encoded as
    /// an `avro` route's payload is: [`AVRO_SCHEMA`] fits both record shapes.
    Avro,
}

/// The Avro schema of Sparkplug records (`schemas/sparkplug_b.avsc`): what to register
/// under the subject of a route with `encoding = "avro"`.
pub const AVRO_SCHEMA: &str = include_str!("../../../schemas/sparkplug_b.avsc");

/// Why a message on a Sparkplug route could not be turned into records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("`{0}` is not a Sparkplug B topic (spBv1.0/group/type/edge_node[/device])")]
    Topic(String),
    #[error(transparent)]
    Payload(#[from] proto::DecodeError),
    #[error("STATE payload is neither JSON nor ONLINE/OFFLINE")]
    State,
}

/// A parsed Sparkplug topic.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Topic<'t> {
    Node {
        group: &'t str,
        kind: &'t str,
        edge: &'t str,
        device: Option<&'t str>,
    },
    State {
        host: &'t str,
    },
}

const KINDS: [&str; 8] = [
    "NBIRTH", "NDEATH", "NDATA", "NCMD", "DBIRTH", "DDEATH", "DDATA", "DCMD",
];

fn parse_topic(topic: &str) -> Result<Topic<'_>, FormatError> {
    let bad = || FormatError::Topic(topic.to_owned());
    let mut levels = topic.split('/');
    if levels.next() != Some(NAMESPACE) {
        return Err(bad());
    }
    let levels: Vec<&str> = levels.collect();
    match levels[..] {
        ["STATE", host] if !host.is_empty() => Ok(Topic::State { host }),
        [group, kind, edge] | [group, kind, edge, _]
            if KINDS.contains(&kind) && !group.is_empty() && !edge.is_empty() =>
        {
            let device = levels.get(3).copied();
            // N* messages name no device; D* messages must.
            if kind.starts_with('D') != device.is_some_and(|d| !d.is_empty()) {
                return Err(bad());
            }
            Ok(Topic::Node {
                group,
                kind,
                edge,
                device,
            })
        }
        _ => Err(bad()),
    }
}

/// What a birth declared about a metric.
#[derive(Debug, Clone)]
struct Declared {
    name: String,
    datatype: Option<u32>,
}

/// One edge node's session as its births and data told it.
#[derive(Debug, Default)]
struct Node {
    /// Declared by the current NBIRTH and the DBIRTHs after it; aliases are unique per node.
    aliases: HashMap<u64, Declared>,
    /// Datatypes by metric name (data may name a metric without its datatype).
    datatypes: HashMap<(Option<String>, String), u32>,
    last_seq: Option<u8>,
    online: bool,
    /// The bdSeq of the current NBIRTH: an NDEATH with another one is stale.
    bd_seq: Option<u64>,
}

type Nodes = HashMap<(String, String), Node>;

/// The state of every edge node seen on Sparkplug routes.
#[derive(Debug, Default)]
pub struct Sparkplug {
    nodes: Arc<Mutex<Nodes>>,
    /// Where births are kept across restarts (`None`: in memory only).
    journal: Option<Journal>,
}

/// The journal's file name, in the broker's directory.
pub const JOURNAL: &str = "sparkplug.journal";
const MAGIC: &[u8; 8] = b"EGSPARKB";
const NODE: u8 = 1;

/// An anomaly worth a counter and a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anomaly {
    SeqGap,
    BirthMissing,
    StaleDeath,
}

impl Anomaly {
    pub fn label(self) -> &'static str {
        match self {
            Anomaly::SeqGap => "seq_gap",
            Anomaly::BirthMissing => "birth_missing",
            Anomaly::StaleDeath => "stale_death",
        }
    }
}

/// What one message became.
#[derive(Debug, Default)]
pub struct Converted {
    /// JSON record values, in order.
    pub records: Vec<Bytes>,
    pub anomalies: Vec<Anomaly>,
}

impl Sparkplug {
    /// The state kept in the journal at `path`, which keeps what births declare from now on.
    pub fn open(path: &Path) -> io::Result<Sparkplug> {
        let found = journal::read(path, MAGIC, crate::ingest::now_ms())?;
        let mut nodes = Nodes::new();
        let mut bad = 0;
        for body in &found.bodies {
            match decode_node(body.clone()) {
                Some((key, node)) => {
                    nodes.insert(key, node);
                }
                None => bad += 1,
            }
        }
        if bad > 0 {
            tracing::warn!(records = bad, path = %path.display(), "Skipped Sparkplug B birth records that do not decode.");
        }
        let nodes = Arc::new(Mutex::new(nodes));
        let live = Arc::clone(&nodes);
        let snapshot: journal::Snapshot = Box::new(move || {
            let nodes = live.lock().unwrap_or_else(|p| p.into_inner());
            nodes
                .iter()
                .map(|(key, node)| journal::Live::Body(Bytes::from(encode_node(key, node))))
                .collect()
        });
        let journal = Journal::start(path, MAGIC, &found, snapshot)?;
        Ok(Sparkplug {
            nodes,
            journal: Some(journal),
        })
    }

    /// Resolves once the births converted so far are on disk.
    pub async fn sync(&self) -> Result<(), String> {
        match &self.journal {
            Some(j) => j.sync().await,
            None => Ok(()),
        }
    }

    /// Turns one message on a Sparkplug route into records, updating the node's state.
    pub fn convert(
        &self,
        topic: &str,
        payload: &Bytes,
        shape: Records,
    ) -> Result<Converted, FormatError> {
        match parse_topic(topic)? {
            Topic::State { host } => Ok(Converted {
                records: vec![state_record(host, payload)?],
                anomalies: Vec::new(),
            }),
            Topic::Node {
                group,
                kind,
                edge,
                device,
            } => {
                let decoded = proto::decode(payload.clone())?;
                let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
                let key = (group.to_owned(), edge.to_owned());
                let node = nodes.entry(key.clone()).or_default();
                let converted = node.convert(group, kind, edge, device, &decoded, shape);
                if let (Some(journal), "NBIRTH" | "DBIRTH") = (&self.journal, kind) {
                    // Durable with the next batch: a crash before it costs the names of
                    // data sent by alias until the next birth, never a record.
                    journal.append_later(&encode_node(&key, node));
                }
                Ok(converted)
            }
        }
    }
}

impl Node {
    fn convert(
        &mut self,
        group: &str,
        kind: &str,
        edge: &str,
        device: Option<&str>,
        payload: &Payload,
        shape: Records,
    ) -> Converted {
        let mut out = Converted::default();
        let mut head = Map::new();
        head.insert("group".into(), json!(group));
        head.insert("edge_node".into(), json!(edge));
        head.insert("device".into(), json!(device));
        head.insert("message_type".into(), json!(kind));
        if let Some(seq) = payload.seq {
            head.insert("seq".into(), json!(seq));
        }
        if let Some(ts) = payload.timestamp {
            head.insert("timestamp".into(), json!(ts));
        }

        if kind == "NBIRTH" {
            // A new session of the node: nothing of the previous one holds.
            *self = Node::default();
            self.bd_seq = bd_seq(payload);
        }
        if matches!(kind, "NBIRTH" | "NDATA" | "DBIRTH" | "DDATA" | "DDEATH") {
            if let Some(seq) = payload.seq.map(|s| (s % 256) as u8) {
                let expected = self.last_seq.map(|l| l.wrapping_add(1));
                if kind != "NBIRTH" && expected.is_some_and(|e| e != seq) {
                    head.insert("seq_gap".into(), json!({ "expected": expected }));
                    out.anomalies.push(Anomaly::SeqGap);
                }
                self.last_seq = Some(seq);
            }
        }
        if matches!(kind, "NBIRTH" | "DBIRTH") {
            for m in &payload.metrics {
                self.declare(device, m);
            }
        }

        // Births and deaths also say who is online.
        let state = match kind {
            "NBIRTH" => {
                self.online = true;
                Some("online")
            }
            "DBIRTH" => Some("online"),
            "DDEATH" => Some("offline"),
            "NDEATH" => {
                let stale = self.bd_seq.is_some() && bd_seq(payload) != self.bd_seq;
                if stale {
                    head.insert("stale".into(), json!(true));
                    out.anomalies.push(Anomaly::StaleDeath);
                } else {
                    self.online = false;
                    self.last_seq = None;
                }
                Some("offline")
            }
            _ => None,
        };

        let metrics: Vec<Map<String, Json>> = payload
            .metrics
            .iter()
            .map(|m| {
                let (fields, missing) = self.metric(device, m);
                if missing {
                    out.anomalies.push(Anomaly::BirthMissing);
                }
                fields
            })
            .collect();

        match shape {
            Records::PerPayload => {
                let mut record = head;
                if let Some(state) = state {
                    record.insert("state".into(), json!(state));
                }
                record.insert(
                    "metrics".into(),
                    Json::Array(metrics.into_iter().map(Json::Object).collect()),
                );
                out.records.push(to_bytes(&record));
            }
            Records::PerMetric => {
                if let Some(state) = state {
                    let mut record = head.clone();
                    record.insert("state".into(), json!(state));
                    out.records.push(to_bytes(&record));
                }
                for fields in metrics {
                    let mut record = head.clone();
                    record.extend(fields);
                    out.records.push(to_bytes(&record));
                }
            }
        }
        out
    }

    fn declare(&mut self, device: Option<&str>, m: &Metric) {
        let Some(name) = &m.name else {
            return;
        };
        if let Some(dt) = m.datatype {
            self.datatypes
                .insert((device.map(str::to_owned), name.clone()), dt);
        }
        if let Some(alias) = m.alias {
            self.aliases.insert(
                alias,
                Declared {
                    name: name.clone(),
                    datatype: m.datatype,
                },
            );
        }
    }

    /// A metric's fields, and whether its name had to come from a birth that never came.
    fn metric(&self, device: Option<&str>, m: &Metric) -> (Map<String, Json>, bool) {
        let declared = m.alias.and_then(|a| self.aliases.get(&a));
        let name = m.name.as_deref().or(declared.map(|d| d.name.as_str()));
        let datatype = m
            .datatype
            .or(declared.and_then(|d| d.datatype))
            .or_else(|| {
                let name = name?;
                self.datatypes
                    .get(&(device.map(str::to_owned), name.to_owned()))
                    .copied()
            });
        let mut f = Map::new();
        f.insert("name".into(), json!(name));
        if let Some(alias) = m.alias {
            f.insert("alias".into(), json!(alias));
        }
        f.insert("datatype".into(), json!(datatype.map(datatype_name)));
        if let Some(ts) = m.timestamp {
            f.insert("metric_timestamp".into(), json!(ts));
        }
        let (value, unsupported) = if m.is_null {
            (Json::Null, None)
        } else {
            value(datatype, &m.value)
        };
        f.insert("value".into(), value);
        if let Some(what) = unsupported {
            f.insert("unsupported".into(), json!(what));
        }
        for (flag, set) in [
            ("is_null", m.is_null),
            ("is_historical", m.is_historical),
            ("is_transient", m.is_transient),
        ] {
            if set {
                f.insert(flag.into(), json!(true));
            }
        }
        let missing = name.is_none();
        if missing {
            f.insert("birth_missing".into(), json!(true));
        }
        (f, missing)
    }
}

fn encode_node((group, edge): &(String, String), node: &Node) -> Vec<u8> {
    let mut b = vec![NODE];
    put16(&mut b, group.as_bytes());
    put16(&mut b, edge.as_bytes());
    b.put_u64_le(node.bd_seq.unwrap_or(u64::MAX));
    b.put_u32_le(node.aliases.len() as u32);
    for (alias, d) in &node.aliases {
        b.put_u64_le(*alias);
        put16(&mut b, d.name.as_bytes());
        b.put_u32_le(d.datatype.unwrap_or(u32::MAX));
    }
    b.put_u32_le(node.datatypes.len() as u32);
    for ((device, name), datatype) in &node.datatypes {
        match device {
            None => b.push(0),
            Some(d) => {
                b.push(1);
                put16(&mut b, d.as_bytes());
            }
        }
        put16(&mut b, name.as_bytes());
        b.put_u32_le(*datatype);
    }
    b
}

fn decode_node(body: Bytes) -> Option<((String, String), Node)> {
    let mut f = Fields(body);
    if f.u8()? != NODE {
        return None;
    }
    let key = (f.str16()?, f.str16()?);
    let bd_seq = Some(f.u64()?).filter(|v| *v != u64::MAX);
    let mut node = Node {
        bd_seq,
        ..Node::default()
    };
    for _ in 0..f.u32()? {
        let alias = f.u64()?;
        let name = f.str16()?;
        let datatype = Some(f.u32()?).filter(|d| *d != u32::MAX);
        node.aliases.insert(alias, Declared { name, datatype });
    }
    for _ in 0..f.u32()? {
        let device = match f.u8()? {
            0 => None,
            _ => Some(f.str16()?),
        };
        let name = f.str16()?;
        node.datatypes.insert((device, name), f.u32()?);
    }
    f.is_empty().then_some((key, node))
}

/// The `bdSeq` metric of an NBIRTH or NDEATH.
fn bd_seq(payload: &Payload) -> Option<u64> {
    payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Value::Long(v) => Some(v),
            Value::Int(v) => Some(u64::from(v)),
            _ => None,
        })
}

fn to_bytes(record: &Map<String, Json>) -> Bytes {
    // Serialising a map of JSON values cannot fail.
    Bytes::from(serde_json::to_vec(record).unwrap_or_default())
}

fn state_record(host: &str, payload: &Bytes) -> Result<Bytes, FormatError> {
    let mut record = Map::new();
    record.insert("message_type".into(), json!("STATE"));
    record.insert("host".into(), json!(host));
    match serde_json::from_slice::<Json>(payload) {
        Ok(Json::Object(body)) => {
            record.insert(
                "online".into(),
                body.get("online").cloned().unwrap_or(Json::Null),
            );
            if let Some(ts) = body.get("timestamp") {
                record.insert("timestamp".into(), ts.clone());
            }
        }
        _ => match &payload[..] {
            b"ONLINE" => {
                record.insert("online".into(), json!(true));
            }
            b"OFFLINE" => {
                record.insert("online".into(), json!(false));
            }
            _ => return Err(FormatError::State),
        },
    }
    Ok(to_bytes(&record))
}

/// Sparkplug 3.0 datatype names (§6.4.16).
pub fn datatype_name(datatype: u32) -> &'static str {
    const NAMES: [&str; 35] = [
        "Unknown",
        "Int8",
        "Int16",
        "Int32",
        "Int64",
        "UInt8",
        "UInt16",
        "UInt32",
        "UInt64",
        "Float",
        "Double",
        "Boolean",
        "String",
        "DateTime",
        "Text",
        "UUID",
        "DataSet",
        "Bytes",
        "File",
        "Template",
        "PropertySet",
        "PropertySetList",
        "Int8Array",
        "Int16Array",
        "Int32Array",
        "Int64Array",
        "UInt8Array",
        "UInt16Array",
        "UInt32Array",
        "UInt64Array",
        "FloatArray",
        "DoubleArray",
        "BooleanArray",
        "StringArray",
        "DateTimeArray",
    ];
    NAMES.get(datatype as usize).copied().unwrap_or("Unknown")
}

/// A value as JSON by its datatype, and what could not be decoded.
fn value(datatype: Option<u32>, v: &Value) -> (Json, Option<&'static str>) {
    let number = |f: f64| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number);
    let json = match (datatype, v) {
        (_, Value::None) => Json::Null,
        (Some(1), Value::Int(i)) => json!(*i as u8 as i8),
        (Some(2), Value::Int(i)) => json!(*i as u16 as i16),
        (Some(3), Value::Int(i)) => json!(*i as i32),
        (_, Value::Int(i)) => json!(i),
        (Some(4), Value::Long(l)) => json!(*l as i64),
        (_, Value::Long(l)) => json!(l),
        (_, Value::Float(f)) => number(f64::from(*f)),
        (_, Value::Double(d)) => number(*d),
        (_, Value::Bool(b)) => json!(b),
        (_, Value::String(s)) => json!(s),
        (Some(dt @ 22..=34), Value::Bytes(b)) => match array(dt, b) {
            Some(a) => a,
            None => return (Json::Null, Some("malformed array")),
        },
        (_, Value::Bytes(b)) => json!(hex(b)),
        (_, Value::Unsupported(what)) => return (Json::Null, Some(what)),
    };
    (json, None)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Sparkplug 3.0 arrays, packed little-endian in `bytes_value` (§6.4.17).
fn array(datatype: u32, b: &[u8]) -> Option<Json> {
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> Json) -> Option<Json> {
        if b.len() % N != 0 {
            return None;
        }
        Some(Json::Array(
            b.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect(),
        ))
    }
    let float = |f: f64| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number);
    match datatype {
        22 => each::<1>(b, |a| json!(a[0] as i8)),
        23 => each::<2>(b, |a| json!(i16::from_le_bytes(a))),
        24 => each::<4>(b, |a| json!(i32::from_le_bytes(a))),
        25 => each::<8>(b, |a| json!(i64::from_le_bytes(a))),
        26 => each::<1>(b, |a| json!(a[0])),
        27 => each::<2>(b, |a| json!(u16::from_le_bytes(a))),
        28 => each::<4>(b, |a| json!(u32::from_le_bytes(a))),
        29 | 34 => each::<8>(b, |a| json!(u64::from_le_bytes(a))),
        30 => each::<4>(b, |a| float(f64::from(f32::from_le_bytes(a)))),
        31 => each::<8>(b, |a| float(f64::from_le_bytes(a))),
        32 => {
            // A u32 count, then the booleans packed most significant bit first.
            let count = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
            let bits = &b[4..];
            if bits.len() != count.div_ceil(8) {
                return None;
            }
            Some(Json::Array(
                (0..count)
                    .map(|i| json!(bits[i / 8] >> (7 - i % 8) & 1 == 1))
                    .collect(),
            ))
        }
        33 => {
            // Null-terminated UTF-8 strings.
            let body = b.strip_suffix(&[0])?;
            body.split(|c| *c == 0)
                .map(|s| std::str::from_utf8(s).ok().map(|s| json!(s)))
                .collect::<Option<Vec<_>>>()
                .map(Json::Array)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
