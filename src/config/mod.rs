//! gateway.toml: the model, its defaults, and validation that reports every problem at once
//! with `file:line:col`.
//!
//! Each stage owns its section's struct (`[mqtt]` in `ingest::mqtt::config`, `[kafka]` in
//! `forward::config`, `[admin]` in `admin::config`); this module owns `[gateway]` and
//! `[buffer]`, and the loader. Loading
//! parses the document keeping spans, deserializes every section on its own (so a mistake in
//! one section does not hide mistakes in another), resolves every path the config names
//! against the config file's directory, runs every section's `validate`, reads the files the
//! sections name (TLS certificates and keys, the password file, encryption keys, Kafka's CA
//! and secrets), and turns each problem's key path back into a position in the file.
//!
//! That is the only place a config is checked: `edgegate validate` is a load, and the
//! gateway starts from a loaded [`Config`], which carries what those files held
//! ([`Loaded`]), so nothing is read or checked twice.

pub mod problems;
mod units;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::admin::config::AdminConfig;
use crate::auth::Credentials;
use crate::auth::config::AuthConfig;
use crate::buffer::seal::{Cipher, KeyFileError, LogKeys, read_key_file};
use crate::buffer::{Durability, LogConfig, Overflow};
use crate::forward::config::KafkaConfig;
use crate::ingest::coap::config::CoapConfig;
use crate::ingest::mqtt::config::MqttConfig;
use crate::route::{DefaultRoute, RouteConfig};
pub use problems::{Problem, Problems};
use tokio_rustls::rustls::ServerConfig;
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
    /// `[schema_registry]`: where `avro` routes find their schemas.
    pub schema_registry: Option<crate::format::registry::config::RegistryConfig>,
    /// `[[downlink]]`: Kafka topics whose records go to devices.
    pub downlink: Vec<crate::downlink::config::DownlinkConfig>,
    /// What the files the config names held when it was loaded.
    pub files: Files,
}

/// What the files named by the config held when it was loaded; empty for a config that was
/// not loaded from a file (and then [`Config::log_config`] and the settings that need a file
/// refuse to start rather than run without it).
#[derive(Debug, Clone, Default)]
pub struct Files {
    /// `[buffer.encryption]` key files.
    pub log_keys: Option<Loaded<LogKeys>>,
    /// `[mqtt.tls]`: the server configuration built from the certificate, key and client CA.
    pub mqtt_tls: Option<Loaded<ServerConfig>>,
    /// `[auth] password_file`.
    pub passwords: Option<Loaded<Credentials>>,
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

/// What a file named by the config held when the config was loaded. `Debug` shows only that
/// it is there: it may be key material.
pub struct Loaded<T>(Arc<T>);

impl<T> Clone for Loaded<T> {
    fn clone(&self) -> Self {
        Loaded(self.0.clone())
    }
}

impl<T> Loaded<T> {
    pub fn new(value: T) -> Loaded<T> {
        Loaded(Arc::new(value))
    }

    pub fn get(&self) -> &Arc<T> {
        &self.0
    }
}

impl<T> fmt::Debug for Loaded<T> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("<loaded>")
    }
}

/// A relative path made relative to `base`, the config file's directory.
pub fn resolve(path: &mut PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
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
    /// Reads the key files; `None` when disabled. Each error comes with the key path of the
    /// file at fault.
    fn read_keys(&self) -> Result<Option<LogKeys>, Vec<(String, KeyFileError)>> {
        if !self.enabled {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let current = match &self.key_file {
            Some(path) => read_key_file(path)
                .map_err(|e| errors.push(("buffer.encryption.key_file".to_owned(), e)))
                .ok(),
            None => None,
        };
        let mut previous = Vec::new();
        for (i, path) in self.previous_key_files.iter().enumerate() {
            match read_key_file(path) {
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

impl Config {
    /// The log's own config, with the keys read at load. Fails only for a config that was
    /// not loaded from its file (encryption on, keys never read): records must never be
    /// written in the clear by mistake.
    pub fn log_config(&self) -> Result<LogConfig, String> {
        let keys = match (&self.files.log_keys, self.buffer.encryption.enabled) {
            (Some(keys), true) => Some(keys.get().clone()),
            (None, true) => {
                return Err(
                    "buffer.encryption: the key files were not read (load the config from its file)"
                        .into(),
                );
            }
            (_, false) => None,
        };
        Ok(self.buffer.log_config(keys))
    }
}

impl BufferConfig {
    fn log_config(&self, keys: Option<Arc<LogKeys>>) -> LogConfig {
        LogConfig {
            dir: self.dir.clone(),
            segment_bytes: self.segment_size.get(),
            max_bytes: self.max_size.get(),
            max_age: self.max_age.map(Duration::get),
            overflow: self.overflow,
            durability: self.durability,
            commit_delay: self.commit_delay.get(),
            commit_bytes: usize::try_from(self.commit_size.get()).unwrap_or(usize::MAX),
            high_watermark: self.high_watermark,
            low_watermark: self.low_watermark,
            keys,
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.dir, base);
        if let Some(key_file) = &mut self.encryption.key_file {
            resolve(key_file, base);
        }
        for key_file in &mut self.encryption.previous_key_files {
            resolve(key_file, base);
        }
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

    /// Reads the key files the section names, or says what is wrong with each.
    fn load_files(&self, problems: &mut Problems) -> Option<Loaded<LogKeys>> {
        self.encryption.key_file.as_ref()?;
        match self.encryption.read_keys() {
            Ok(keys) => keys.map(Loaded::new),
            Err(errors) => {
                for (key, e) in errors {
                    problems.push(key, e.to_string());
                }
                None
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
    /// The key path at fault (`mqtt.tls.key`); `None` for a syntax error.
    pub key: Option<String>,
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

/// A config read for a reload: every section that parsed, and the problems found in it. A
/// reload applies it setting by setting (see [`crate::reload`]).
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    /// Each with its key path.
    pub problems: Vec<Located>,
}

impl Config {
    /// Reads, parses and checks `path`, and reads the files it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_checked(path)?.into_result()
    }

    /// [`Config::load`] for a reload: the problems found once every section parsed come back
    /// beside the config rather than in place of it. `Err` when the file cannot be read or a
    /// section does not parse.
    pub fn load_checked(path: &Path) -> Result<Checked, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::check(&text, path)
    }

    /// Parses and checks `text` as if it were the file at `path`: problems are labelled with
    /// `path`, and relative paths in it are relative to `path`'s directory.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::check(text, path)?.into_result()
    }

    fn check(text: &str, path: &Path) -> Result<Checked, ConfigError> {
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
                "schema_registry" => config.schema_registry = section_of(value, &mut errors),
                "downlink" => match value.get_ref().as_array() {
                    Some(items) => config.downlink.extend(items.iter().filter_map(|item| section_of(item, &mut errors))),
                    None => found.push(at(value.span(), "`downlink` must be an array of tables: write each as [[downlink]]".into())),
                },
                "routes" => match value.get_ref().as_array() {
                    // Each route on its own, so one bad route does not hide the next.
                    Some(items) => config.routes.extend(items.iter().filter_map(|item| section_of(item, &mut errors))),
                    None => found.push(at(value.span(), "`routes` must be an array of tables: write each as [[routes]]".into())),
                },
                other => found.push(at(
                    key.span(),
                    format!("unknown section `{other}` (expected gateway, buffer, mqtt, coap, kafka, admin, auth, routes, default_route, schema_registry or downlink)"),
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
        config.resolve_paths(base);
        let mut problems = config.validate();
        config.load_files(&mut problems);
        let problems = problems
            .0
            .into_iter()
            .map(|p| {
                let span = span_of(document.get_ref(), &p.path).unwrap_or(0..0);
                Located {
                    key: Some(p.path.clone()),
                    ..at(span, format!("{}: {}", p.path, p.message))
                }
            })
            .collect();
        Ok(Checked { config, problems })
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.buffer.resolve_paths(base);
        self.mqtt.tls.resolve_paths(base);
        self.auth.resolve_paths(base);
        self.kafka.resolve_paths(base);
        if let Some(registry) = &mut self.schema_registry {
            registry.resolve_paths(base);
        }
    }

    /// Reads what the files named by the config hold, each problem at the key naming the file.
    /// (`[kafka]`'s files are read by its `validate`, which builds a throwaway client.)
    fn load_files(&mut self, problems: &mut Problems) {
        self.files = Files {
            log_keys: self.buffer.load_files(problems),
            mqtt_tls: self.mqtt.tls.load_files("mqtt.tls", problems),
            passwords: self.auth.load_files("auth", problems),
        };
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
        match &self.schema_registry {
            Some(registry) => registry.validate("schema_registry", &mut problems),
            None => {
                for (i, route) in self.routes.iter().enumerate() {
                    if route.registry_schema().is_some() {
                        // The key that asked for a registry's schema.
                        let (key, value) = match route.format {
                            crate::format::Format::SparkplugB => ("encoding", "avro"),
                            format => ("format", format.name()),
                        };
                        problems.push(
                            format!("routes[{i}].{key}"),
                            format!("{key} = \"{value}\" takes its schemas from a registry: add [schema_registry] with its url"),
                        );
                    }
                }
            }
        }
        for (i, d) in self.downlink.iter().enumerate() {
            d.validate(&format!("downlink[{i}]"), &mut problems);
        }
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

impl Checked {
    /// The config, or every problem.
    pub fn into_result(self) -> Result<Config, ConfigError> {
        if self.problems.is_empty() {
            Ok(self.config)
        } else {
            Err(ConfigError::Invalid(self.problems))
        }
    }
}

fn locate(text: &str, path: &Path, span: Range<usize>, message: String) -> Located {
    let (line, column) = line_col(text, span.start);
    Located {
        file: path.to_owned(),
        line,
        column,
        message,
        key: None,
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
