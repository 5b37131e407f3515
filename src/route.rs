//! Routing: which Kafka topic and key a message goes to, decided at ingest.
//!
//! A route matches an MQTT-style topic filter whose single-level wildcards may be named
//! (`plant/+site/+device/telemetry/#`) and renders a Kafka topic and key from templates that
//! use those names (`iot.{site}.telemetry`, `{device}`) and the built-in `{client_id}`. Routes
//! are tried in order and the first match wins; an optional default route catches the rest.
//! A message that matches nothing, or whose rendered topic is not a valid Kafka topic name,
//! is rejected before it is stored, so the device hears about it (MQTT 5 reason 0x90).
//!
//! CoAP requests are routed the same way by the topic their listener derives from the URI.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::config::Config;
use crate::config::Duration;
use crate::config::problems::{Problem, Problems};
use crate::format::Format;
use crate::format::registry::cache::SchemaType;
use crate::format::registry::config::{Naming, SubjectStrategy};
use crate::format::sparkplug::{Encoding, Records};
use crate::format::timestamp::{self, DeviceTime};
use crate::reload::Reloadable;

/// `[[routes]]` in gateway.toml.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Topic filter; `+name` captures one level, `#` (or `#name`) the rest.
    #[serde(rename = "match")]
    pub filter: String,
    /// Kafka topic template.
    pub topic: String,
    /// Kafka key template; the client id when absent.
    pub key: Option<String>,
    /// What the payload becomes: `raw` (untouched, the default), `json` (checked to be
    /// JSON), `sparkplug_b`, or by a registry's schema `avro`, `json_schema` or `protobuf`.
    #[serde(default)]
    pub format: Format,
    /// `sparkplug_b` only: `per_metric` (the default) or `per_payload` records.
    pub records: Option<Records>,
    /// `sparkplug_b` only: records as `json` (the default) or `avro` (by the registry's
    /// schema of the route's subject, as on an `avro` route).
    pub encoding: Option<Encoding>,
    /// Routes with a registry schema only: the subject of the schema, `topic_name` (the
    /// default), `record_name` or `topic_record_name`.
    pub subject_strategy: Option<SubjectStrategy>,
    /// The record's fully qualified name, for the two strategies that use it.
    pub record_name: Option<String>,
    /// `protobuf` only: the fully qualified name of the schema's message a payload is
    /// (`iot.Reading`); the record name with the strategies that use one, else the schema's
    /// first message.
    pub message: Option<String>,
    /// Where the record's timestamp comes from: `received` (the default) or `payload`.
    #[serde(default)]
    pub timestamp: timestamp::Source,
    /// `payload` on a JSON route: the RFC 6901 pointer to the device's time (`/ts`).
    pub timestamp_pointer: Option<String>,
    /// What a number at the pointer counts: `s`, `ms` (the default), `us` or `ns`.
    pub timestamp_unit: Option<timestamp::Unit>,
    /// How far ahead of the gateway's clock a device time is still believed (1h).
    pub timestamp_max_future: Option<Duration>,
    /// How far behind it a device time is still believed (7d).
    pub timestamp_max_age: Option<Duration>,
}

impl RouteConfig {
    /// The type of the registry schema its records are encoded by, if any: Avro
    /// (`format = "avro"`, or Sparkplug with `encoding = "avro"`) or JSON Schema.
    pub fn registry_schema(&self) -> Option<SchemaType> {
        match self.format {
            Format::Avro => Some(SchemaType::Avro),
            Format::JsonSchema => Some(SchemaType::Json),
            Format::Protobuf => Some(SchemaType::Protobuf),
            Format::SparkplugB if self.encoding == Some(Encoding::Avro) => Some(SchemaType::Avro),
            _ => None,
        }
    }
}

/// `[default_route]` in gateway.toml: where messages that match no route go.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DefaultRoute {
    pub topic: String,
    pub key: Option<String>,
}

/// Where one message goes, and in what form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub kafka_topic: String,
    pub key: Option<Bytes>,
    pub format: Format,
    pub records: Records,
    /// How a route that encodes Avro (`avro`, or `sparkplug_b` with `encoding = "avro"`)
    /// names its schema's subject; `None` on other routes.
    pub naming: Option<Arc<Naming>>,
    /// The route's device-time policy, `None` under `timestamp = "received"`.
    pub device_time: Option<Arc<DeviceTime>>,
    /// Whether the topic or key has a time part: a device time changes them.
    pub timed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route matches topic `{0}`")]
    NoRoute(String),
    #[error("topic `{topic}` renders Kafka topic `{rendered}`, which is not a valid topic name")]
    InvalidKafkaTopic { topic: String, rendered: String },
}

/// Routes that do not compile: every problem, by key path.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|p| format!("{}: {}", p.path, p.message)).collect::<Vec<_>>().join("; "))]
pub struct InvalidRoutes(pub Vec<Problem>);

/// The compiled routing table.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    default: Option<(Template, Option<Template>)>,
}

#[derive(Debug, Clone)]
struct Route {
    levels: Vec<Level>,
    topic: Template,
    key: Option<Template>,
    format: Format,
    records: Records,
    naming: Option<Arc<Naming>>,
    device_time: Option<Arc<DeviceTime>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+` or `+name`: one level, captured into slot `usize` when named.
    Single(Option<usize>),
    /// `#` or `#name`: every remaining level (possibly none), joined with `/`.
    Multi(Option<usize>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Capture(usize),
    ClientId,
    /// `{yyyy}`, `{mm}`, `{dd}`, `{hh}`: the record's timestamp (UTC).
    Time(TimePart),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimePart {
    Year,
    Month,
    Day,
    Hour,
}

impl TimePart {
    fn from_name(name: &str) -> Option<TimePart> {
        Some(match name {
            "yyyy" => TimePart::Year,
            "mm" => TimePart::Month,
            "dd" => TimePart::Day,
            "hh" => TimePart::Hour,
            _ => return None,
        })
    }
}

/// A UTC date and hour, for the time parts of templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
}

impl Civil {
    /// From milliseconds since the Unix epoch (H. Hinnant's `civil_from_days`, proleptic
    /// Gregorian, any year).
    fn from_ms(ms: i64) -> Civil {
        let secs = ms.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let hour = (secs.rem_euclid(86_400) / 3600) as u32;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year,
            month,
            day,
            hour,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Part>);

impl Router {
    /// Compiles the routes, reporting every problem under `routes[i].*` / `default_route.*`.
    pub fn new(
        routes: &[RouteConfig],
        default: Option<&DefaultRoute>,
        problems: &mut Problems,
    ) -> Router {
        let mut router = Router::default();
        for (i, route) in routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            let mut names = Vec::new();
            let levels = match parse_filter(&route.filter, &mut names) {
                Ok(levels) => levels,
                Err(message) => {
                    problems.push(format!("{path}.match"), message);
                    continue;
                }
            };
            let topic = compile_template(
                &route.topic,
                &names,
                true,
                &format!("{path}.topic"),
                problems,
            );
            let key = match route.key.as_deref() {
                Some(k) => {
                    compile_template(k, &names, false, &format!("{path}.key"), problems).map(Some)
                }
                None => Some(None),
            };
            if route.records.is_some() && route.format != Format::SparkplugB {
                problems.push(
                    format!("{path}.records"),
                    "only routes with format = \"sparkplug_b\" have records".to_owned(),
                );
            }
            if route.encoding.is_some() && route.format != Format::SparkplugB {
                problems.push(
                    format!("{path}.encoding"),
                    "only routes with format = \"sparkplug_b\" have an encoding (an avro route's records are Avro)".to_owned(),
                );
            }
            let naming = naming(route, &path, problems);
            let device_time = device_time(route, &path, problems);
            if let (Some(topic), Some(key)) = (topic, key) {
                router.routes.push(Route {
                    levels,
                    topic,
                    key,
                    format: route.format,
                    records: route.records.unwrap_or_default(),
                    naming,
                    device_time,
                });
            }
        }
        if let Some(default) = default {
            let topic =
                compile_template(&default.topic, &[], true, "default_route.topic", problems);
            let key = match default.key.as_deref() {
                Some(k) => compile_template(k, &[], false, "default_route.key", problems).map(Some),
                None => Some(None),
            };
            if let (Some(topic), Some(key)) = (topic, key) {
                router.default = Some((topic, key));
            }
        }
        router
    }

    /// Compiles `[[routes]]` and `[default_route]`, or says everything wrong with them.
    pub fn from_config(config: &Config) -> Result<Router, InvalidRoutes> {
        let mut problems = Problems::default();
        let router = Router::new(&config.routes, config.default_route.as_ref(), &mut problems);
        if problems.is_empty() {
            Ok(router)
        } else {
            Err(InvalidRoutes(problems.0))
        }
    }

    /// Routes one message by its topic (MQTT) or derived topic (CoAP); `timestamp_ms` is its
    /// record's timestamp, what `{yyyy}`, `{mm}`, `{dd}` and `{hh}` are taken from.
    pub fn route(
        &self,
        topic: &str,
        client_id: &str,
        timestamp_ms: i64,
    ) -> Result<Destination, RouteError> {
        let at = Civil::from_ms(timestamp_ms);
        let levels: Vec<&str> = topic.split('/').collect();
        let mut captures: Vec<&str> = Vec::new();
        for route in &self.routes {
            captures.clear();
            if matches(&route.levels, &levels, topic, &mut captures) {
                let mut dest = render(
                    &route.topic,
                    route.key.as_ref(),
                    &captures,
                    topic,
                    client_id,
                    at,
                )?;
                (dest.format, dest.records) = (route.format, route.records);
                dest.naming.clone_from(&route.naming);
                if route.device_time.is_some() {
                    dest.device_time.clone_from(&route.device_time);
                    dest.timed =
                        route.topic.timed() || route.key.as_ref().is_some_and(Template::timed);
                }
                return Ok(dest);
            }
        }
        match &self.default {
            Some((t, k)) => render(t, k.as_ref(), &[], topic, client_id, at),
            None => Err(RouteError::NoRoute(topic.to_owned())),
        }
    }
}

fn render(
    topic_t: &Template,
    key_t: Option<&Template>,
    captures: &[&str],
    topic: &str,
    client_id: &str,
    at: Civil,
) -> Result<Destination, RouteError> {
    let kafka_topic = topic_t.render(captures, client_id, at);
    if !valid_kafka_topic(&kafka_topic) {
        return Err(RouteError::InvalidKafkaTopic {
            topic: topic.to_owned(),
            rendered: kafka_topic,
        });
    }
    let key = match key_t {
        Some(t) => t.render(captures, client_id, at),
        None => client_id.to_owned(),
    };
    Ok(Destination {
        kafka_topic,
        key: Some(Bytes::from(key)),
        format: Format::Raw,
        records: Records::default(),
        naming: None,
        device_time: None,
        timed: false,
    })
}

/// A route's subject naming if it encodes by a registry's schema, checked; problems under
/// `routes[i].subject_strategy`, `routes[i].record_name` and `routes[i].message`.
fn naming(route: &RouteConfig, path: &str, problems: &mut Problems) -> Option<Arc<Naming>> {
    if route.message.is_some() && route.format != Format::Protobuf {
        problems.push(
            format!("{path}.message"),
            "only routes with format = \"protobuf\" name a message",
        );
    }
    if route.registry_schema().is_none() {
        for (set, key) in [
            (route.subject_strategy.is_some(), "subject_strategy"),
            (route.record_name.is_some(), "record_name"),
        ] {
            if set {
                problems.push(
                    format!("{path}.{key}"),
                    "only routes that encode by a registry's schema (format = \"avro\", \"json_schema\" or \"protobuf\", or \"sparkplug_b\" with encoding = \"avro\") have a schema subject",
                );
            }
        }
        return None;
    }
    let strategy = route.subject_strategy.unwrap_or_default();
    match (strategy, route.record_name.as_deref()) {
        (SubjectStrategy::TopicName, Some(_)) => problems.push(
            format!("{path}.record_name"),
            "subject_strategy = \"topic_name\" names the subject after the topic: leave record_name out, or choose record_name or topic_record_name",
        ),
        (SubjectStrategy::RecordName | SubjectStrategy::TopicRecordName, None) => problems.push(
            format!("{path}.subject_strategy"),
            "this strategy names the subject after the record: set record_name (\"com.example.Reading\")",
        ),
        (_, Some(name)) if !valid_record_name(name) => problems.push(
            format!("{path}.record_name"),
            "must be a fully qualified name: letters, digits and `_`, dot-separated, not starting with a digit",
        ),
        _ => {}
    }
    // A Protobuf record's name is its message's, as Confluent's serializers have it.
    let message = match (route.message.as_deref(), route.record_name.as_deref()) {
        (Some(message), _) if !valid_record_name(message) => {
            problems.push(
                format!("{path}.message"),
                "must be a fully qualified message name: letters, digits and `_`, dot-separated, not starting with a digit (\"iot.Reading\")",
            );
            None
        }
        (Some(message), Some(record)) if message != record => {
            problems.push(
                format!("{path}.message"),
                format!("the subject is named after record {record}, so the message is that one: leave message out"),
            );
            None
        }
        (Some(message), _) => Some(message.to_owned()),
        (None, record) if route.format == Format::Protobuf => record.map(str::to_owned),
        (None, _) => None,
    };
    Some(Arc::new(Naming {
        strategy,
        record_name: route.record_name.clone(),
        message,
    }))
}

fn valid_record_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// A route's device-time policy, checked; problems under `routes[i].timestamp*`.
fn device_time(
    route: &RouteConfig,
    path: &str,
    problems: &mut Problems,
) -> Option<Arc<DeviceTime>> {
    if route.timestamp == timestamp::Source::Received {
        for (set, key) in [
            (route.timestamp_pointer.is_some(), "timestamp_pointer"),
            (route.timestamp_unit.is_some(), "timestamp_unit"),
            (route.timestamp_max_future.is_some(), "timestamp_max_future"),
            (route.timestamp_max_age.is_some(), "timestamp_max_age"),
        ] {
            if set {
                problems.push(
                    format!("{path}.{key}"),
                    "only routes with timestamp = \"payload\" take it".to_owned(),
                );
            }
        }
        return None;
    }
    let pointers = match (route.format, route.timestamp_pointer.as_deref()) {
        (Format::SparkplugB, None) => timestamp::SPARKPLUG_POINTERS.map(str::to_owned).to_vec(),
        (Format::SparkplugB, Some(_)) => {
            problems.push(
                format!("{path}.timestamp_pointer"),
                "a sparkplug_b route takes the Sparkplug timestamp: leave timestamp_pointer out"
                    .to_owned(),
            );
            return None;
        }
        (
            Format::Raw | Format::Json | Format::Avro | Format::JsonSchema | Format::Protobuf,
            None,
        ) => {
            problems.push(
                format!("{path}.timestamp"),
                "timestamp = \"payload\" needs timestamp_pointer, the JSON pointer to the device's time (e.g. \"/ts\")".to_owned(),
            );
            return None;
        }
        (
            Format::Raw | Format::Json | Format::Avro | Format::JsonSchema | Format::Protobuf,
            Some(pointer),
        ) => {
            if let Err(message) = timestamp::valid_pointer(pointer) {
                problems.push(format!("{path}.timestamp_pointer"), message);
                return None;
            }
            vec![pointer.to_owned()]
        }
    };
    if route.format == Format::SparkplugB
        && route
            .timestamp_unit
            .is_some_and(|u| u != timestamp::Unit::Ms)
    {
        problems.push(
            format!("{path}.timestamp_unit"),
            "Sparkplug timestamps are milliseconds".to_owned(),
        );
    }
    Some(Arc::new(DeviceTime {
        pointers,
        unit: route.timestamp_unit.unwrap_or_default(),
        max_future: route
            .timestamp_max_future
            .map_or(timestamp::DEFAULT_MAX_FUTURE, Duration::get),
        max_age: route
            .timestamp_max_age
            .map_or(timestamp::DEFAULT_MAX_AGE, Duration::get),
    }))
}

impl Template {
    /// Whether it renders a time part.
    fn timed(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Part::Time(_)))
    }

    fn render(&self, captures: &[&str], client_id: &str, at: Civil) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for part in &self.0 {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Literal(s) => out.write_str(s),
                Part::Capture(i) => out.write_str(captures.get(*i).copied().unwrap_or("")),
                Part::ClientId => out.write_str(client_id),
                Part::Time(TimePart::Year) => write!(out, "{:04}", at.year),
                Part::Time(TimePart::Month) => write!(out, "{:02}", at.month),
                Part::Time(TimePart::Day) => write!(out, "{:02}", at.day),
                Part::Time(TimePart::Hour) => write!(out, "{:02}", at.hour),
            };
        }
        out
    }
}

/// MQTT matching (spec 4.7): `+` is one level, `#` the rest including none; a wildcard in
/// the first level does not match a topic starting with `$`.
fn matches<'t>(
    filter: &[Level],
    levels: &[&'t str],
    topic: &'t str,
    captures: &mut Vec<&'t str>,
) -> bool {
    if topic.starts_with('$') && !matches!(filter.first(), Some(Level::Literal(_))) {
        return false;
    }
    let mut offset = 0usize;
    for (i, level) in filter.iter().enumerate() {
        match level {
            Level::Multi(slot) => {
                if let Some(slot) = slot {
                    set_capture(captures, *slot, topic.get(offset..).unwrap_or(""));
                }
                return true;
            }
            Level::Single(slot) => {
                let Some(l) = levels.get(i) else { return false };
                if let Some(slot) = slot {
                    set_capture(captures, *slot, l);
                }
                offset += l.len() + 1;
            }
            Level::Literal(lit) => {
                let Some(l) = levels.get(i) else { return false };
                if l != lit {
                    return false;
                }
                offset += l.len() + 1;
            }
        }
    }
    filter.len() == levels.len()
}

fn set_capture<'t>(captures: &mut Vec<&'t str>, slot: usize, value: &'t str) {
    if captures.len() <= slot {
        captures.resize(slot + 1, "");
    }
    captures[slot] = value;
}

/// The routes change on reload; a message is routed by the table in force when it arrives,
/// and a stored record keeps its destination.
impl Reloadable for Router {
    const KEYS: &'static [&'static str] = &["routes", "default_route"];
    type Error = InvalidRoutes;

    fn build(config: &Config) -> Result<std::sync::Arc<Router>, InvalidRoutes> {
        Router::from_config(config).map(std::sync::Arc::new)
    }

    fn reloaded(&self, config: &Config) {
        tracing::info!(routes = config.routes.len(), "Reloaded the routes.");
    }

    fn kept(problems: &dyn std::fmt::Display) {
        tracing::error!(%problems, "Kept the old routes: the new ones are invalid.");
    }
}

fn parse_filter(filter: &str, names: &mut Vec<String>) -> Result<Vec<Level>, String> {
    if filter.is_empty() {
        return Err("the topic filter is empty".into());
    }
    let parts: Vec<&str> = filter.split('/').collect();
    let mut levels = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let mut capture = |name: &str| -> Result<Option<usize>, String> {
            if name.is_empty() {
                return Ok(None);
            }
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "wildcard name `{name}` may use only letters, digits and _"
                ));
            }
            if name == "client_id" {
                return Err("`client_id` is built in and cannot name a wildcard".into());
            }
            if names.iter().any(|n| n == name) {
                return Err(format!("wildcard name `{name}` is used twice"));
            }
            names.push(name.to_owned());
            Ok(Some(names.len() - 1))
        };
        if let Some(name) = part.strip_prefix('+') {
            levels.push(Level::Single(capture(name)?));
        } else if let Some(name) = part.strip_prefix('#') {
            if i + 1 != parts.len() {
                return Err("`#` must be the last level of the filter".into());
            }
            levels.push(Level::Multi(capture(name)?));
        } else if part.contains(['+', '#']) {
            return Err(format!(
                "level `{part}`: a wildcard must fill its whole level"
            ));
        } else {
            levels.push(Level::Literal((*part).to_owned()));
        }
    }
    Ok(levels)
}

fn compile_template(
    text: &str,
    names: &[String],
    is_topic: bool,
    path: &str,
    problems: &mut Problems,
) -> Option<Template> {
    let mut parts = Vec::new();
    let mut rest = text;
    let mut ok = true;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let Some(end) = rest.find('}') else {
                    problems.push(path, format!("`{text}` has an unclosed `{{`"));
                    return None;
                };
                let name = &rest[1..end];
                if name == "client_id" {
                    parts.push(Part::ClientId);
                } else if let Some(i) = names.iter().position(|n| n == name) {
                    parts.push(Part::Capture(i));
                } else if let Some(t) = TimePart::from_name(name) {
                    parts.push(Part::Time(t));
                } else {
                    problems.push(
                        path,
                        format!("`{{{name}}}` is neither a named wildcard of the route's `match`, `{{client_id}}` nor one of `{{yyyy}}`, `{{mm}}`, `{{dd}}`, `{{hh}}`"),
                    );
                    ok = false;
                }
                rest = &rest[end + 1..];
            }
            Some(i) => {
                parts.push(Part::Literal(rest[..i].to_owned()));
                rest = &rest[i..];
            }
            None => {
                parts.push(Part::Literal(rest.to_owned()));
                rest = "";
            }
        }
    }
    if is_topic {
        if parts.is_empty() {
            problems.push(path, "the Kafka topic is empty");
            ok = false;
        }
        for part in &parts {
            if let Part::Literal(lit) = part {
                if let Some(c) = lit.chars().find(|c| !valid_topic_char(*c)) {
                    problems.push(
                        path,
                        format!(
                            "`{c}` cannot appear in a Kafka topic name (allowed: a-z A-Z 0-9 . _ -)"
                        ),
                    );
                    ok = false;
                }
            }
        }
    }
    ok.then_some(Template(parts))
}

fn valid_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Kafka's own rule (`Topic.validate`): 1..=249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn valid_kafka_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.chars().all(valid_topic_char)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, &str, Option<&str>)], default: Option<&str>) -> Router {
        let routes: Vec<RouteConfig> = routes
            .iter()
            .map(|(m, t, k)| RouteConfig {
                filter: (*m).into(),
                topic: (*t).into(),
                key: k.map(Into::into),
                ..Default::default()
            })
            .collect();
        let default = default.map(|t| DefaultRoute {
            topic: t.into(),
            key: None,
        });
        let mut problems = Problems::default();
        let r = Router::new(&routes, default.as_ref(), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        r
    }

    fn dest(topic: &str, key: &str) -> Result<Destination, RouteError> {
        Ok(Destination {
            kafka_topic: topic.into(),
            key: Some(Bytes::from(key.to_owned())),
            format: Format::Raw,
            records: Records::default(),
            naming: None,
            device_time: None,
            timed: false,
        })
    }

    #[test]
    fn protobuf_routes_name_their_message_and_check_it() {
        let protobuf = |message: Option<&str>, record_name: Option<&str>| RouteConfig {
            filter: "plant/+line/temp".into(),
            topic: "plant.{line}".into(),
            format: Format::Protobuf,
            message: message.map(str::to_owned),
            subject_strategy: record_name.map(|_| SubjectStrategy::RecordName),
            record_name: record_name.map(str::to_owned),
            ..Default::default()
        };
        let message = |route: RouteConfig| {
            let mut problems = Problems::default();
            let r = Router::new(&[route], None, &mut problems);
            assert!(problems.is_empty(), "{problems:?}");
            let d = r.route("plant/a/temp", "c", 0).unwrap();
            assert_eq!(d.format, Format::Protobuf);
            let naming = d.naming.expect("a protobuf route has a subject");
            (naming.subject(&d.kafka_topic), naming.message.clone())
        };
        assert_eq!(
            message(protobuf(None, None)),
            ("plant.a-value".into(), None)
        );
        assert_eq!(
            message(protobuf(Some("iot.Reading"), None)),
            ("plant.a-value".into(), Some("iot.Reading".into()))
        );
        // With a record-name strategy the record is the message, as in Confluent's serializers.
        assert_eq!(
            message(protobuf(None, Some("iot.Alarm"))),
            ("iot.Alarm".into(), Some("iot.Alarm".into()))
        );
        let routes = [
            protobuf(Some("iot.9Reading"), None),
            protobuf(Some("iot.Reading"), Some("iot.Alarm")),
            RouteConfig {
                format: Format::Avro,
                ..protobuf(Some("iot.Reading"), None)
            },
        ];
        let mut problems = Problems::default();
        Router::new(&routes, None, &mut problems);
        let paths: Vec<_> = problems.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].message",
                "routes[1].message",
                "routes[2].message"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn avro_routes_name_their_subject_and_check_it() {
        let avro = |strategy, record_name: Option<&str>| RouteConfig {
            filter: "plant/+line/temp".into(),
            topic: "plant.{line}".into(),
            format: Format::Avro,
            subject_strategy: strategy,
            record_name: record_name.map(str::to_owned),
            ..Default::default()
        };
        let mut problems = Problems::default();
        let r = Router::new(&[avro(None, None)], None, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let d = r.route("plant/a/temp", "c", 0).unwrap();
        assert_eq!(d.format, Format::Avro);
        assert_eq!(
            d.naming.map(|n| n.subject(&d.kafka_topic)),
            Some("plant.a-value".to_owned())
        );
        let routes = [
            avro(Some(SubjectStrategy::RecordName), None),
            avro(Some(SubjectStrategy::TopicName), Some("acme.R")),
            avro(Some(SubjectStrategy::TopicRecordName), Some("acme.9R")),
            RouteConfig {
                filter: "x".into(),
                topic: "x".into(),
                record_name: Some("acme.R".into()),
                subject_strategy: Some(SubjectStrategy::TopicName),
                ..Default::default()
            },
        ];
        let mut problems = Problems::default();
        Router::new(&routes, None, &mut problems);
        let paths: Vec<_> = problems.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].subject_strategy",
                "routes[1].record_name",
                "routes[2].record_name",
                "routes[3].subject_strategy",
                "routes[3].record_name",
            ]
        );
        let mut problems = Problems::default();
        let r = Router::new(
            &[avro(
                Some(SubjectStrategy::TopicRecordName),
                Some("acme.Reading"),
            )],
            None,
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let d = r.route("plant/b/temp", "c", 0).unwrap();
        assert_eq!(
            d.naming.map(|n| n.subject(&d.kafka_topic)),
            Some("plant.b-acme.Reading".to_owned())
        );
    }

    #[test]
    fn named_wildcards_render_topic_and_key() {
        let r = router(
            &[(
                "plant/+site/+device/telemetry/#",
                "iot.{site}.telemetry",
                Some("{device}"),
            )],
            None,
        );
        assert_eq!(
            r.route("plant/north/pump7/telemetry/temp", "c1", 0),
            dest("iot.north.telemetry", "pump7")
        );
        assert_eq!(
            r.route("plant/north/pump7/telemetry", "c1", 0),
            dest("iot.north.telemetry", "pump7")
        );
        assert_eq!(
            r.route("plant/north/telemetry", "c1", 0),
            Err(RouteError::NoRoute("plant/north/telemetry".into()))
        );
    }

    #[test]
    fn time_parts_come_from_the_records_timestamp_in_utc() {
        let r = router(
            &[(
                "sensors/+kind/#",
                "ts.{kind}.{yyyy}-{mm}-{dd}",
                Some("{hh}/{client_id}"),
            )],
            None,
        );
        // 2026-12-04T23:59:59.999Z, then the next millisecond: a new day.
        let before = 1_796_428_799_999;
        assert_eq!(
            r.route("sensors/temp/a", "c1", before),
            dest("ts.temp.2026-12-04", "23/c1")
        );
        assert_eq!(
            r.route("sensors/temp/a", "c1", before + 1),
            dest("ts.temp.2026-12-05", "00/c1")
        );
        for (ms, want) in [
            (0, (1970, 1, 1, 0)),
            (951_782_400_000, (2000, 2, 29, 0)),
            (4_107_542_400_000, (2100, 3, 1, 0)),
            (-1, (1969, 12, 31, 23)),
            (1_709_251_199_000, (2024, 2, 29, 23)),
        ] {
            let c = Civil::from_ms(ms);
            assert_eq!((c.year, c.month, c.day, c.hour), want, "{ms}");
        }
    }

    #[test]
    fn first_match_wins_and_default_catches_the_rest() {
        let r = router(
            &[("a/+x", "first", None), ("a/#", "second", None)],
            Some("fallback"),
        );
        assert_eq!(r.route("a/b", "dev", 0), dest("first", "dev"));
        assert_eq!(r.route("a/b/c", "dev", 0), dest("second", "dev"));
        assert_eq!(r.route("z", "dev", 0), dest("fallback", "dev"));
    }

    #[test]
    fn key_defaults_to_client_id_and_client_id_is_a_placeholder() {
        let r = router(&[("d/#rest", "t.{client_id}", Some("{rest}"))], None);
        assert_eq!(r.route("d/x/y", "gw-7", 0), dest("t.gw-7", "x/y"));
    }

    #[test]
    fn rendered_topic_must_be_valid() {
        let r = router(&[("s/+site", "iot.{site}", None)], None);
        assert!(matches!(
            r.route("s/bad site", "c", 0),
            Err(RouteError::InvalidKafkaTopic { .. })
        ));
        assert!(r.route("s/", "c", 0).is_ok());
        let r = router(&[("s/+site", "{site}", None)], None);
        assert!(matches!(
            r.route("s/..", "c", 0),
            Err(RouteError::InvalidKafkaTopic { .. })
        ));
        assert!(matches!(
            r.route("s/", "c", 0),
            Err(RouteError::InvalidKafkaTopic { .. })
        ));
    }

    #[test]
    fn dollar_topics_need_a_literal_first_level() {
        let r = router(&[("#", "all", None), ("$SYS/#", "sys", None)], None);
        assert_eq!(r.route("$SYS/x", "c", 0), dest("sys", "c"));
        assert_eq!(r.route("x", "c", 0), dest("all", "c"));
    }

    #[test]
    fn config_problems_are_all_reported() {
        let routes = vec![
            RouteConfig {
                filter: "a/#/b".into(),
                topic: "t".into(),
                key: None,
                ..Default::default()
            },
            RouteConfig {
                filter: "a/+x".into(),
                topic: "t/{y}".into(),
                key: Some("{z}".into()),
                ..Default::default()
            },
            RouteConfig {
                filter: "a/+x/+x".into(),
                topic: "t".into(),
                key: None,
                ..Default::default()
            },
            RouteConfig {
                filter: "a/b+".into(),
                topic: "t".into(),
                key: None,
                ..Default::default()
            },
            RouteConfig {
                filter: "spBv1.0/#".into(),
                topic: "t".into(),
                key: None,
                records: Some(Records::PerPayload),
                ..Default::default()
            },
        ];
        let mut problems = Problems::default();
        Router::new(
            &routes,
            Some(&DefaultRoute {
                topic: "".into(),
                key: None,
            }),
            &mut problems,
        );
        let paths: Vec<&str> = problems.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].match",
                "routes[1].topic",
                "routes[1].topic",
                "routes[1].key",
                "routes[2].match",
                "routes[3].match",
                "routes[4].records",
                "default_route.topic"
            ]
        );
    }

    #[test]
    fn device_time_routes_carry_their_policy_and_whether_time_renders() {
        let routes = vec![
            RouteConfig {
                filter: "j/#".into(),
                topic: "j.{yyyy}{mm}{dd}".into(),
                timestamp: timestamp::Source::Payload,
                timestamp_pointer: Some("/ts".into()),
                timestamp_unit: Some(timestamp::Unit::S),
                timestamp_max_age: Some(Duration::from_secs(60)),
                ..Default::default()
            },
            RouteConfig {
                filter: "spBv1.0/#".into(),
                topic: "sp".into(),
                format: Format::SparkplugB,
                timestamp: timestamp::Source::Payload,
                ..Default::default()
            },
            RouteConfig {
                filter: "#".into(),
                topic: "rest.{yyyy}".into(),
                ..Default::default()
            },
        ];
        let mut problems = Problems::default();
        let r = Router::new(&routes, None, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let json = r.route("j/x", "c", 0).expect("routes");
        assert!(json.timed);
        assert_eq!(
            json.device_time.as_deref(),
            Some(&DeviceTime {
                pointers: vec!["/ts".into()],
                unit: timestamp::Unit::S,
                max_future: timestamp::DEFAULT_MAX_FUTURE,
                max_age: std::time::Duration::from_secs(60),
            })
        );
        let sp = r.route("spBv1.0/g/DDATA/n/d", "c", 0).expect("routes");
        assert!(!sp.timed);
        let sp = sp.device_time.expect("a policy");
        assert_eq!(sp.pointers, ["/metric_timestamp", "/timestamp"]);
        assert_eq!(sp.unit, timestamp::Unit::Ms);
        // The default path: no policy, and nothing to render again.
        let rest = r.route("other", "c", 0).expect("routes");
        assert_eq!((rest.device_time, rest.timed), (None, false));
    }

    #[test]
    fn device_time_problems_are_all_reported() {
        let payload = |filter: &str| RouteConfig {
            filter: filter.into(),
            topic: "t".into(),
            timestamp: timestamp::Source::Payload,
            ..Default::default()
        };
        let routes = vec![
            RouteConfig {
                timestamp_unit: Some(timestamp::Unit::Us),
                timestamp_max_future: Some(Duration::from_secs(1)),
                ..router_config("a/#")
            },
            payload("b/#"),
            RouteConfig {
                timestamp_pointer: Some("/a~2".into()),
                ..payload("c/#")
            },
            RouteConfig {
                format: Format::SparkplugB,
                timestamp_pointer: Some("/ts".into()),
                ..payload("d/#")
            },
            RouteConfig {
                format: Format::SparkplugB,
                timestamp_unit: Some(timestamp::Unit::S),
                ..payload("e/#")
            },
        ];
        let mut problems = Problems::default();
        Router::new(&routes, None, &mut problems);
        let paths: Vec<&str> = problems.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].timestamp_unit",
                "routes[0].timestamp_max_future",
                "routes[1].timestamp",
                "routes[2].timestamp_pointer",
                "routes[3].timestamp_pointer",
                "routes[4].timestamp_unit",
            ]
        );
    }

    fn router_config(filter: &str) -> RouteConfig {
        RouteConfig {
            filter: filter.into(),
            topic: "t".into(),
            ..Default::default()
        }
    }
}
