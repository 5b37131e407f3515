//! gateway.toml: the model, its defaults, and validation that reports every problem at once
//! with `file:line:col`.
//!
//! Each stage owns its section's struct (`[mqtt]` in `ingest::mqtt::config`, `[kafka]` in
//! `forward::config`, `[admin]` in `admin::config`); this module owns `[gateway]` and
//! `[buffer]`, and the loader. Loading
//! parses the document keeping spans, deserializes every section on its own (so a mistake in
//! one section does not hide mistakes in another), runs every section's `validate`, and
//! turns each problem's key path back into a position in the file.

pub mod problems;
mod units;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::admin::config::AdminConfig;
use crate::auth::config::AuthConfig;
use crate::buffer::seal::{Cipher, KeyFileError, LogKeys, read_key_file};
use crate::buffer::{Durability, LogConfig, Overflow};
use crate::forward::config::KafkaConfig;
use crate::ingest::coap::config::CoapConfig;
use crate::ingest::mqtt::config::MqttConfig;
use crate::route::{DefaultRoute, RouteConfig};
pub use problems::{Problem, Problems};
pub use units::{ByteSize, Duration, parse_duration, parse_size};

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub buffer: BufferConfig,
    pub mqtt: MqttConfig,
    pub coap: CoapConfig,
    pub kafka: KafkaConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub routes: Vec<RouteConfig>,
    pub default_route: Option<DefaultRoute>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Names this gateway in every record id (`<id>:<sequence>`); the host name by default.
    pub id: Option<String>,
    /// How long shutdown may take to finish in-flight appends and deliveries.
    pub shutdown_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl GatewayConfig {
    /// The configured id, else the host name, else "edgegate".
    pub fn id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "edgegate".into())
        })
    }

    fn validate(&self, problems: &mut Problems) {
        if let Some(id) = &self.id {
            if id.is_empty()
                || id.len() > 128
                || id.contains(':')
                || id.chars().any(char::is_control)
            {
                problems.push(
                    "gateway.id",
                    "must be 1 to 128 characters, without `:` or control characters",
                );
            }
        }
    }
}

/// `[buffer]`: the durable log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Directory of the log's segment and cursor files.
    pub dir: PathBuf,
    pub segment_size: ByteSize,
    /// The most the log may hold before the overflow policy applies.
    pub max_size: ByteSize,
    /// Records older than this are dropped (counted and logged). Unlimited when absent.
    pub max_age: Option<Duration>,
    pub overflow: Overflow,
    pub durability: Durability,
    /// Group commit: the longest a record waits for its fsync.
    pub commit_delay: Duration,
    /// Group commit: pending bytes that trigger an fsync at once.
    pub commit_size: ByteSize,
    /// Fraction of `max_size` above which listeners stop reading sockets...
    pub high_watermark: f64,
    /// ...until the log falls below this fraction again.
    pub low_watermark: f64,
    /// `[buffer.encryption]`: records sealed at rest.
    pub encryption: EncryptionConfig,
}

/// `[buffer.encryption]`: seal every record written to the log (and the dead-letter log)
/// with an AEAD, so a stolen SD card or disk image does not give away the telemetry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    pub enabled: bool,
    pub cipher: Cipher,
    /// The key new records are sealed with: 64 hex digits, mode 0600 or stricter.
    pub key_file: Option<PathBuf>,
    /// Keys of records still buffered from before a rotation; they only open records.
    pub previous_key_files: Vec<PathBuf>,
}

impl EncryptionConfig {
    /// Reads the key files (relative paths against `base`); `None` when disabled. Each error
    /// comes with the key path of the file at fault.
    pub fn load(&self, base: &Path) -> Result<Option<LogKeys>, Vec<(String, KeyFileError)>> {
        if !self.enabled {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let current = match &self.key_file {
            Some(path) => read_key_file(&base.join(path))
                .map_err(|e| errors.push(("buffer.encryption.key_file".to_owned(), e)))
                .ok(),
            None => None,
        };
        let mut previous = Vec::new();
        for (i, path) in self.previous_key_files.iter().enumerate() {
            match read_key_file(&base.join(path)) {
                Ok(key) => previous.push(key),
                Err(e) => errors.push((format!("buffer.encryption.previous_key_files[{i}]"), e)),
            }
        }
        match current {
            Some(current) if errors.is_empty() => {
                Ok(Some(LogKeys::new(self.cipher, &current, &previous)))
            }
            _ => Err(errors),
        }
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        let log = LogConfig::new("/var/lib/edgegate/log");
        BufferConfig {
            dir: log.dir,
            segment_size: ByteSize(log.segment_bytes),
            max_size: ByteSize(log.max_bytes),
            max_age: None,
            overflow: log.overflow,
            durability: log.durability,
            commit_delay: Duration(log.commit_delay),
            commit_size: ByteSize(log.commit_bytes as u64),
            high_watermark: log.high_watermark,
            low_watermark: log.low_watermark,
            encryption: EncryptionConfig::default(),
        }
    }
}

impl BufferConfig {
    /// The log's own config, with `dir` and key files resolved against the config file's
    /// directory. Fails when a key file cannot be used (checked at load already; this is
    /// the file changing in between).
    pub fn log_config(&self, base: &Path) -> Result<LogConfig, String> {
        let keys = self.encryption.load(base).map_err(|errors| {
            errors
                .iter()
                .map(|(key, e)| format!("{key}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(LogConfig {
            dir: base.join(&self.dir),
            segment_bytes: self.segment_size.get(),
            max_bytes: self.max_size.get(),
            max_age: self.max_age.map(Duration::get),
            overflow: self.overflow,
            durability: self.durability,
            commit_delay: self.commit_delay.get(),
            commit_bytes: usize::try_from(self.commit_size.get()).unwrap_or(usize::MAX),
            high_watermark: self.high_watermark,
            low_watermark: self.low_watermark,
            keys: keys.map(std::sync::Arc::new),
        })
    }

    fn validate(&self, problems: &mut Problems) {
        if self.dir.as_os_str().is_empty() {
            problems.push("buffer.dir", "must not be empty");
        }
        if self.segment_size.get() < 64 << 10 {
            problems.push("buffer.segment_size", "must be at least 64KiB");
        }
        if self.max_size.get() < self.segment_size.get().saturating_mul(2) {
            problems.push(
                "buffer.max_size",
                "must hold at least two segments (2 × segment_size)",
            );
        }
        if self.commit_delay.get() > std::time::Duration::from_secs(1) {
            problems.push(
                "buffer.commit_delay",
                "must be at most 1s: every acknowledgement waits for it",
            );
        }
        if !(0.0..=1.0).contains(&self.high_watermark) {
            problems.push(
                "buffer.high_watermark",
                "must be a fraction between 0 and 1",
            );
        }
        if !(0.0..=1.0).contains(&self.low_watermark) || self.low_watermark > self.high_watermark {
            problems.push(
                "buffer.low_watermark",
                "must be a fraction between 0 and high_watermark",
            );
        }
        if self.encryption.enabled && self.encryption.key_file.is_none() {
            problems.push(
                "buffer.encryption.key_file",
                "must name the key file when encryption is enabled (64 hex digits, from `openssl rand -hex 32`, mode 0600)",
            );
        }
    }

    /// Problems with files the section names (key files), relative paths against `base`.
    fn check_files(&self, base: &Path, problems: &mut Problems) {
        if self.encryption.key_file.is_none() {
            return;
        }
        if let Err(errors) = self.encryption.load(base) {
            for (key, e) in errors {
                problems.push(key, e.to_string());
            }
        }
    }
}

/// A problem placed in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Located>),
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only labels the problems.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at = |span: Range<usize>, message: String| locate(text, path, span, message);
        let (document, syntax) = DeTable::parse_recoverable(text);
        let mut found: Vec<Located> = syntax
            .into_iter()
            .map(|e| at(e.span().unwrap_or(0..0), e.message().to_owned()))
            .collect();
        let mut config = Config::default();
        for (key, value) in document.get_ref().iter() {
            let name: &str = key.get_ref();
            let mut errors = Vec::new();
            match name {
                "gateway" => config.gateway = section_of(value, &mut errors).unwrap_or_default(),
                "buffer" => config.buffer = section_of(value, &mut errors).unwrap_or_default(),
                "mqtt" => config.mqtt = section_of(value, &mut errors).unwrap_or_default(),
                "coap" => config.coap = section_of(value, &mut errors).unwrap_or_default(),
                "kafka" => config.kafka = section_of(value, &mut errors).unwrap_or_default(),
                "admin" => config.admin = section_of(value, &mut errors).unwrap_or_default(),
                "auth" => config.auth = section_of(value, &mut errors).unwrap_or_default(),
                "default_route" => config.default_route = section_of(value, &mut errors),
                "routes" => match value.get_ref().as_array() {
                    // Each route on its own, so one bad route does not hide the next.
                    Some(items) => config.routes.extend(items.iter().filter_map(|item| section_of(item, &mut errors))),
                    None => found.push(at(value.span(), "`routes` must be an array of tables: write each as [[routes]]".into())),
                },
                other => found.push(at(
                    key.span(),
                    format!("unknown section `{other}` (expected gateway, buffer, mqtt, coap, kafka, admin, auth, routes or default_route)"),
                )),
            }
            found.extend(errors.into_iter().map(|e| {
                at(
                    e.span().unwrap_or(key.span()),
                    format!("[{name}] {}", e.message()),
                )
            }));
        }
        found.sort_by_key(|l| (l.line, l.column));
        if !found.is_empty() {
            // A section that failed to parse would be validated as its defaults: report only
            // what is really wrong.
            return Err(ConfigError::Invalid(found));
        }
        // Files named in the config are relative to it, wherever the gateway is started.
        let base = path.parent().unwrap_or(Path::new("."));
        config.kafka.resolve_paths(base);
        let mut problems = config.validate();
        config.buffer.check_files(base, &mut problems);
        found.extend(problems.0.into_iter().map(|p| {
            let span = span_of(document.get_ref(), &p.path).unwrap_or(0..0);
            at(span, format!("{}: {}", p.path, p.message))
        }));
        if found.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(found))
        }
    }

    /// Every problem in every section.
    pub fn validate(&self) -> Problems {
        let mut problems = Problems::default();
        self.gateway.validate(&mut problems);
        self.buffer.validate(&mut problems);
        self.mqtt.validate("mqtt", &mut problems);
        self.coap.validate("coap", &mut problems);
        self.kafka.validate("kafka", &mut problems);
        self.admin.validate("admin", &mut problems);
        self.auth.validate("auth", &mut problems);
        crate::route::Router::new(&self.routes, self.default_route.as_ref(), &mut problems);
        if self.routes.is_empty() && self.default_route.is_none() {
            problems.push(
                "routes",
                "no [[routes]] and no [default_route]: every message would be rejected",
            );
        }
        problems
    }
}

fn section_of<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    errors: &mut Vec<toml::de::Error>,
) -> Option<T> {
    T::deserialize(ValueDeserializer::from(value.clone()))
        .map_err(|e| errors.push(e))
        .ok()
}

fn locate(text: &str, path: &Path, span: Range<usize>, message: String) -> Located {
    let (line, column) = line_col(text, span.start);
    Located {
        file: path.to_owned(),
        line,
        column,
        message,
    }
}

/// The span of the value at `path` (`kafka.brokers`, `routes[2].topic`); the nearest
/// existing parent when the key itself is absent (a missing key defaulted badly).
fn span_of(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut best = None;
    let mut current: Option<&Spanned<DeValue<'_>>> = None;
    for (name, index) in path_parts(path) {
        let table = match current {
            None => Some(table),
            Some(v) => v.get_ref().as_table(),
        };
        let Some(next) =
            table.and_then(|t| t.iter().find(|(k, _)| k.get_ref() == name).map(|(_, v)| v))
        else {
            break;
        };
        current = Some(next);
        best = Some(next.span());
        if let Some(i) = index {
            match next.get_ref().as_array().and_then(|a| a.get(i)) {
                Some(item) => {
                    current = Some(item);
                    best = Some(item.span());
                }
                None => break,
            }
        }
    }
    best
}

/// The parts of a key path with their array indexes: `routes[2].topic` → `routes` [2],
/// `topic`; a quoted part may hold dots, as raw librdkafka property names do:
/// `kafka.properties."sasl.password"` → `kafka`, `properties`, `sasl.password`.
fn path_parts(path: &str) -> Vec<(&str, Option<usize>)> {
    let mut parts = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            parts.push((&quoted[..end], None));
            rest = quoted.get(end + 1..).unwrap_or_default();
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            let part = &rest[..end];
            parts.push(match part.split_once('[') {
                Some((name, index)) => (name, index.trim_end_matches(']').parse().ok()),
                None => (part, None),
            });
            rest = &rest[end..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    parts
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before
        .get(line_start..)
        .map_or(1, |l| l.chars().count() + 1);
    (line, column)
}

#[cfg(test)]
mod tests;
