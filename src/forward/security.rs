//! How the forwarder proves itself to the brokers: `[kafka.tls]`, `[kafka.sasl]`, the
//! secrets they name, and the check at load that librdkafka accepts them.
//!
//! `security.protocol` follows from the tables present: none → `PLAINTEXT` (or whatever
//! `[kafka.properties]` says, as before), `[kafka.tls]` → `SSL`, both → `SASL_SSL`.
//! `[kafka.sasl]` without `[kafka.tls]` is refused: PLAIN would send the password in clear
//! text, and SCRAM would leave the records readable on the wire. Once either table is
//! present, raw properties that would say the same thing differently (`security.protocol`,
//! `ssl.ca.location`, `sasl.password`, ...) are refused, so one setting cannot silently win
//! over the other.
//!
//! Secrets (the SASL password, the client key's password) come from a file
//! (`password_file`), an environment variable (`password_env`) or, with a warning, the config
//! file itself (`password`); exactly one. Validation at load reads them, checks every file
//! exists and is readable PEM, and creates (without any broker) a throwaway librdkafka client
//! with the result: that is what loads the CA, checks that the key matches the certificate
//! and decrypts it, and proves the SASL mechanism is built in, before anything starts.
//!
//! Permissions of secret files (the key, password files): accessible to other users (any
//! `o` bit) is an error, as ssh does for its keys; accessible to the group is a warning
//! logged at start (0640 root:edgegate is a legitimate layout, but the operator should know
//! the group can read the key). Paths are resolved against the config file's directory.
//!
//! Secrets never reach a log line: [`Secret`] and raw properties whose names say
//! password/secret/key material print as `<redacted>` in `Debug`; librdkafka redacts its
//! own sensitive properties in its logs.

use std::fmt;
use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::producer::{BaseProducer, ProducerContext};
use serde::Deserialize;

use super::config::{KafkaConfig, librdkafka_reason};
use crate::config::problems::Problems;

/// `[kafka.tls]`: present = TLS to every broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTls {
    /// PEM bundle of the CAs that may sign the brokers' certificates. Absent: the system's
    /// CA store (librdkafka probes the usual paths; the OpenSSL inside the binary has none
    /// of its own).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM, leaf first, chain allowed), for brokers that require mutual
    /// TLS. Needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM). Must not be readable by other users.
    pub key_file: Option<PathBuf>,
    /// Password of an encrypted `key_file`: from this file...
    pub key_password_file: Option<PathBuf>,
    /// ...or this environment variable...
    pub key_password_env: Option<String>,
    /// ...or inline (warned about: the config file is not a secret store).
    pub key_password: Option<Secret>,
    /// Check that the broker's certificate names the host the gateway connects to. Turning
    /// it off lets anyone with a certificate from the same CA pose as a broker.
    pub verify_hostname: bool,
}

impl Default for KafkaTls {
    fn default() -> Self {
        KafkaTls {
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password_file: None,
            key_password_env: None,
            key_password: None,
            verify_hostname: true,
        }
    }
}

/// `[kafka.sasl]`: present = SASL authentication, over TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    /// The password: from this file (its first line)...
    pub password_file: Option<PathBuf>,
    /// ...or this environment variable...
    pub password_env: Option<String>,
    /// ...or inline (warned about: the config file is not a secret store).
    pub password: Option<Secret>,
}

/// `sasl.mechanism`. Kafka's own spelling (`SCRAM-SHA-512`) is accepted as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "scram-sha-256", alias = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "scram-sha-512", alias = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "plain", alias = "PLAIN")]
    Plain,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

/// A secret written in the config file. Never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

pub(super) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// librdkafka properties whose values are secrets (passwords, key material, OAuth secrets).
pub(super) fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "passphrase",
        "key.pem",
        "private.key",
        "jaas",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// Raw properties owned by `[kafka.tls]` / `[kafka.sasl]` once those are present, and the key
/// to use instead.
const TLS_PROPERTIES: &[(&str, &str)] = &[
    ("ssl.ca.location", "kafka.tls.ca_file"),
    ("ssl.ca.pem", "kafka.tls.ca_file"),
    ("ssl.ca.certificate.stores", "kafka.tls.ca_file"),
    ("ssl.certificate.location", "kafka.tls.cert_file"),
    ("ssl.certificate.pem", "kafka.tls.cert_file"),
    ("ssl.key.location", "kafka.tls.key_file"),
    ("ssl.key.pem", "kafka.tls.key_file"),
    ("ssl.keystore.location", "kafka.tls.cert_file and key_file"),
    ("ssl.keystore.password", "kafka.tls.key_password_file"),
    ("ssl.key.password", "kafka.tls.key_password_file"),
    (
        "ssl.endpoint.identification.algorithm",
        "kafka.tls.verify_hostname",
    ),
    (
        "enable.ssl.certificate.verification",
        "kafka.tls.ca_file (certificate verification cannot be turned off)",
    ),
];
const SASL_PROPERTIES: &[(&str, &str)] = &[
    ("sasl.mechanism", "kafka.sasl.mechanism"),
    ("sasl.mechanisms", "kafka.sasl.mechanism"),
    ("sasl.username", "kafka.sasl.username"),
    ("sasl.password", "kafka.sasl.password_file"),
];

/// Where a secret comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SecretSource<'a> {
    File(&'a Path),
    Env(&'a str),
    Inline(&'a Secret),
}

/// A secret that could not be read when the producer was configured.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is empty", path.display())]
    EmptyFile { path: PathBuf },
    #[error("environment variable {name} is not set, empty or not UTF-8")]
    Env { name: String },
    #[error("the inline {what} is empty")]
    EmptyInline { what: &'static str },
    #[error("no {what} is configured")]
    Missing { what: &'static str },
}

impl SecretSource<'_> {
    /// The secret: a file's first line (without its line ending), a variable's value, or the
    /// inline text.
    pub(crate) fn read(self, what: &'static str) -> Result<String, SecretError> {
        match self {
            SecretSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let line = text.lines().next().unwrap_or_default();
                if line.is_empty() {
                    return Err(SecretError::EmptyFile {
                        path: path.to_owned(),
                    });
                }
                Ok(line.to_owned())
            }
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(value) if !value.is_empty() => Ok(value),
                _ => Err(SecretError::Env {
                    name: name.to_owned(),
                }),
            },
            SecretSource::Inline(secret) if secret.expose().is_empty() => {
                Err(SecretError::EmptyInline { what })
            }
            SecretSource::Inline(secret) => Ok(secret.expose().to_owned()),
        }
    }
}

/// The sources set for one secret, in order of preference (a file, a variable, inline).
/// Validation insists on exactly one.
pub(crate) fn sources<'a>(
    file: Option<&'a PathBuf>,
    env: Option<&'a String>,
    inline: Option<&'a Secret>,
) -> Vec<SecretSource<'a>> {
    [
        file.map(|p| SecretSource::File(p)),
        env.map(|n| SecretSource::Env(n)),
        inline.map(SecretSource::Inline),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The one source of a secret (`None` when none is set); a problem at `at.name` when
/// several are.
pub(crate) fn one_source<'a>(
    at: &str,
    name: &str,
    sources: Vec<SecretSource<'a>>,
    problems: &mut Problems,
) -> Option<SecretSource<'a>> {
    if sources.len() > 1 {
        problems.push(
            format!("{at}.{name}"),
            format!("set only one of {name}_file, {name}_env and {name}"),
        );
    }
    sources.first().copied()
}

impl KafkaTls {
    fn key_password_sources(&self) -> Vec<SecretSource<'_>> {
        sources(
            self.key_password_file.as_ref(),
            self.key_password_env.as_ref(),
            self.key_password.as_ref(),
        )
    }
}

impl KafkaSasl {
    fn password_sources(&self) -> Vec<SecretSource<'_>> {
        sources(
            self.password_file.as_ref(),
            self.password_env.as_ref(),
            self.password.as_ref(),
        )
    }
}

/// How the group and other users may access a secret file.
enum Exposure {
    Private,
    Group(u32),
    World(u32),
}

/// A warning for secret `file` (set at `key`) when its group can read it.
pub(crate) fn group_readable(key: String, file: &Path) -> Option<(String, String)> {
    match exposure(file) {
        Ok(Exposure::Group(mode)) => Some((
            key,
            format!(
                "{} is readable by its group (mode {mode:04o}); chmod 600 unless that group is meant to read it",
                file.display()
            ),
        )),
        _ => None,
    }
}

fn exposure(path: &Path) -> std::io::Result<Exposure> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    Ok(if mode & 0o007 != 0 {
        Exposure::World(mode)
    } else if mode & 0o070 != 0 {
        Exposure::Group(mode)
    } else {
        Exposure::Private
    })
}

/// A PEM file the gateway will read: exists, is readable, holds `marker`. A secret file must
/// also not be open to other users.
pub(crate) fn check_pem(
    path: &Path,
    at: String,
    marker: &str,
    what: &str,
    secret: bool,
    problems: &mut Problems,
) {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            problems.push(at, format!("cannot read {}: {e}", path.display()));
            return;
        }
    };
    if !String::from_utf8_lossy(&text).contains(marker) {
        problems.push(
            at.clone(),
            format!("{} holds no {what} (no `{marker}` line)", path.display()),
        );
    }
    if secret {
        check_secret_mode(path, at, problems);
    }
}

fn check_secret_mode(path: &Path, at: String, problems: &mut Problems) {
    if let Ok(Exposure::World(mode)) = exposure(path) {
        problems.push(
            at,
            format!(
                "{} is accessible to every user (mode {mode:04o}): chmod 600 (or 640 with the gateway's group)",
                path.display()
            ),
        );
    }
}

/// A secret can be read now (and a secret file is not open to other users).
pub(crate) fn check_secret(
    source: SecretSource<'_>,
    what: &'static str,
    at: String,
    problems: &mut Problems,
) {
    if let Err(e) = source.read(what) {
        problems.push(at.clone(), e.to_string());
    }
    if let SecretSource::File(path) = source {
        check_secret_mode(path, at, problems);
    }
}

/// A throwaway client context that drops librdkafka's log lines: the preflight client has
/// no brokers, and librdkafka warns about exactly that.
struct Preflight;

impl ClientContext for Preflight {
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
    fn error(&self, _: rdkafka::error::KafkaError, _: &str) {}
}

impl ProducerContext for Preflight {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

impl KafkaConfig {
    /// Why raw property `key` may not be set beside `[kafka.tls]`/`[kafka.sasl]`, if it may
    /// not: it says differently what those tables say.
    pub(super) fn security_conflict(&self, key: &str) -> Option<String> {
        let owned_by = |table: &[(&str, &'static str)]| {
            table
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, instead)| *instead)
        };
        match (&self.tls, &self.sasl) {
            _ if key == "security.protocol" && (self.tls.is_some() || self.sasl.is_some()) => {
                Some("it follows from which of them are present".to_owned())
            }
            (Some(_), _) if owned_by(TLS_PROPERTIES).is_some() => {
                owned_by(TLS_PROPERTIES).map(|instead| format!("set {instead} instead"))
            }
            (_, Some(_)) if owned_by(SASL_PROPERTIES).is_some() => {
                owned_by(SASL_PROPERTIES).map(|instead| format!("set {instead} instead"))
            }
            _ => None,
        }
    }

    /// `[kafka.tls]` and `[kafka.sasl]`: every file and secret can be read, and librdkafka
    /// accepts the result (see the module docs).
    pub(super) fn validate_security(&self, path: &str, problems: &mut Problems) {
        let before = problems.0.len();
        const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";
        if let Some(tls) = &self.tls {
            let at = format!("{path}.tls");
            for (name, file) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
                ("key_password_file", &tls.key_password_file),
            ] {
                if file.as_ref().is_some_and(|f| f.to_str().is_none()) {
                    problems.push(format!("{at}.{name}"), "must be a UTF-8 path");
                }
            }
            if let Some(ca) = &tls.ca_file {
                let at = format!("{at}.ca_file");
                check_pem(ca, at, CERTIFICATE, "certificate", false, problems);
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => {
                    let cert_at = format!("{at}.cert_file");
                    check_pem(cert, cert_at, CERTIFICATE, "certificate", false, problems);
                    let key_at = format!("{at}.key_file");
                    check_pem(
                        key,
                        key_at,
                        "PRIVATE KEY-----",
                        "private key",
                        true,
                        problems,
                    );
                }
                (Some(_), None) => {
                    problems.push(format!("{at}.cert_file"), "needs key_file as well");
                }
                (None, Some(_)) => {
                    problems.push(format!("{at}.key_file"), "needs cert_file as well");
                }
                (None, None) => {}
            }
            let key_password =
                one_source(&at, "key_password", tls.key_password_sources(), problems);
            if let Some(source) = key_password {
                if tls.key_file.is_none() {
                    problems.push(
                        format!("{at}.key_password"),
                        "is only used with key_file (an encrypted client key)",
                    );
                }
                check_secret(
                    source,
                    "key_password",
                    format!("{at}.key_password"),
                    problems,
                );
            }
        }
        if let Some(sasl) = &self.sasl {
            let at = format!("{path}.sasl");
            if self.tls.is_none() {
                problems.push(
                    at.clone(),
                    "SASL needs TLS: add [kafka.tls] (an empty table trusts the system's CA \
                     store); without it PLAIN sends the password in clear text and SCRAM leaves \
                     every record readable on the wire",
                );
            }
            if sasl.username.is_empty() || sasl.username.chars().any(char::is_control) {
                problems.push(
                    format!("{at}.username"),
                    "must be non-empty, without control characters",
                );
            }
            if sasl
                .password_file
                .as_ref()
                .is_some_and(|f| f.to_str().is_none())
            {
                problems.push(format!("{at}.password_file"), "must be a UTF-8 path");
            }
            match one_source(&at, "password", sasl.password_sources(), problems) {
                Some(source) => {
                    check_secret(source, "password", format!("{at}.password"), problems)
                }
                None => problems.push(
                    at,
                    "needs a password: password_file (recommended), password_env or password",
                ),
            }
        }
        // Only a configuration that passed the checks above is worth a client: its errors
        // would repeat them less clearly.
        if problems.0.len() == before && (self.tls.is_some() || self.sasl.is_some()) {
            if let Err(why) = self.preflight() {
                let at = if self.tls.is_some() {
                    format!("{path}.tls")
                } else {
                    format!("{path}.sasl")
                };
                problems.push(
                    at,
                    format!("librdkafka refuses the TLS/SASL settings: {why}"),
                );
            }
        }
    }

    /// Creates a producer with only the security settings and no broker, and drops it:
    /// librdkafka loads the CA, the certificate and the (decrypted) key, checks that they
    /// match, and selects the SASL mechanism when a client is created, not when a property
    /// is set. No network, a few milliseconds.
    fn preflight(&self) -> Result<(), String> {
        let mut c = ClientConfig::new();
        self.apply_security(&mut c).map_err(|e| e.to_string())?;
        c.create_with_context::<_, BaseProducer<Preflight>>(Preflight)
            .map(drop)
            .map_err(|e| librdkafka_reason(&e))
    }

    /// Sets `security.protocol` and the `ssl.*` / `sasl.*` properties from `[kafka.tls]` and
    /// `[kafka.sasl]`, reading the secrets. Sets nothing when neither is present.
    pub(crate) fn apply_security(&self, c: &mut ClientConfig) -> Result<(), SecretError> {
        let protocol = match (&self.tls, &self.sasl) {
            (None, None) => return Ok(()),
            (Some(_), None) => "ssl",
            // SASL without TLS does not pass validation; should it get here, it fails closed.
            (_, Some(_)) => "sasl_ssl",
        };
        c.set("security.protocol", protocol);
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        if let Some(tls) = &self.tls {
            // "probe": the OpenSSL built into the binary knows no CA directory of its own.
            c.set(
                "ssl.ca.location",
                tls.ca_file.as_ref().map_or("probe".into(), path),
            );
            if let Some(cert) = &tls.cert_file {
                c.set("ssl.certificate.location", path(cert));
            }
            if let Some(key) = &tls.key_file {
                c.set("ssl.key.location", path(key));
            }
            if let Some(source) = tls.key_password_sources().first() {
                c.set("ssl.key.password", source.read("key_password")?);
            }
            c.set(
                "ssl.endpoint.identification.algorithm",
                if tls.verify_hostname { "https" } else { "none" },
            );
        }
        if let Some(sasl) = &self.sasl {
            let sources = sasl.password_sources();
            let source = sources
                .first()
                .ok_or(SecretError::Missing { what: "password" })?;
            c.set("sasl.mechanism", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", source.read("password")?);
        }
        Ok(())
    }

    /// What is allowed but unwise, for the forwarder to log once at start: secrets written
    /// in the config file, secret files their group can read, hostname checks turned off.
    pub fn warnings(&self, path: &str) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let mut group_readable = |key: String, file: &Path| {
            found.extend(group_readable(key, file));
        };
        if let Some(tls) = &self.tls {
            if let Some(key) = &tls.key_file {
                group_readable(format!("{path}.tls.key_file"), key);
            }
            if let Some(file) = &tls.key_password_file {
                group_readable(format!("{path}.tls.key_password_file"), file);
            }
        }
        if let Some(file) = self.sasl.as_ref().and_then(|s| s.password_file.as_ref()) {
            group_readable(format!("{path}.sasl.password_file"), file);
        }
        if let Some(tls) = &self.tls {
            if tls.key_password.is_some() {
                found.push((
                    format!("{path}.tls.key_password"),
                    "is written in the config file; prefer key_password_file or key_password_env"
                        .into(),
                ));
            }
            if !tls.verify_hostname {
                found.push((
                    format!("{path}.tls.verify_hostname"),
                    "is false: any certificate from a trusted CA is accepted for any broker".into(),
                ));
            }
        }
        if self.sasl.as_ref().is_some_and(|s| s.password.is_some()) {
            found.push((
                format!("{path}.sasl.password"),
                "is written in the config file; prefer password_file or password_env".into(),
            ));
        }
        for key in self.properties.keys().filter(|k| is_sensitive(k)) {
            found.push((
                format!("{path}.properties.\"{key}\""),
                "is a secret written in the config file; prefer [kafka.sasl] or [kafka.tls] with a password file".into(),
            ));
        }
        found
    }

    /// Makes the relative paths of `[kafka.tls]` and `[kafka.sasl]` relative to `base` (the
    /// config file's directory), as `[buffer] dir` is.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut Option<PathBuf>| {
            if let Some(p) = p.as_mut().filter(|p| p.is_relative()) {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.tls {
            resolve(&mut tls.ca_file);
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
            resolve(&mut tls.key_password_file);
        }
        if let Some(sasl) = &mut self.sasl {
            resolve(&mut sasl.password_file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::config::tests::problems_of;

    /// The unit tests' PEM files (`testdata/README.md`), copied into a temporary directory
    /// where the test sets their modes.
    struct Pems {
        dir: tempfile::TempDir,
    }

    impl Pems {
        fn new() -> Pems {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().expect("tempdir");
            let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/forward/testdata");
            for name in [
                "ca.pem",
                "client.pem",
                "client.key",
                "client-encrypted.key",
                "other.key",
            ] {
                let to = dir.path().join(name);
                std::fs::copy(from.join(name), &to).expect("copy test PEM");
                let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                    .expect("chmod");
            }
            Pems { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            use std::os::unix::fs::PermissionsExt;
            let path = self.path(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            path
        }

        fn tls(&self) -> KafkaTls {
            KafkaTls {
                ca_file: Some(self.path("ca.pem")),
                cert_file: Some(self.path("client.pem")),
                key_file: Some(self.path("client.key")),
                ..KafkaTls::default()
            }
        }
    }

    fn sasl(mechanism: SaslMechanism, password_file: PathBuf) -> KafkaSasl {
        KafkaSasl {
            mechanism,
            username: "gw-017".into(),
            password_file: Some(password_file),
            password_env: None,
            password: None,
        }
    }

    fn secured(tls: Option<KafkaTls>, sasl: Option<KafkaSasl>) -> KafkaConfig {
        KafkaConfig {
            tls,
            sasl,
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn tls_and_sasl_tables_parse_with_kafka_spellings_too() {
        let cfg: KafkaConfig = toml::from_str(
            r#"
            [tls]
            ca_file = "ca.pem"
            verify_hostname = false
            [sasl]
            mechanism = "SCRAM-SHA-512"
            username = "gw"
            password_env = "GW_KAFKA_PASSWORD"
            "#,
        )
        .expect("valid [kafka]");
        let tls = cfg.tls.expect("tls");
        assert_eq!(tls.ca_file, Some(PathBuf::from("ca.pem")));
        assert!(!tls.verify_hostname);
        let sasl = cfg.sasl.expect("sasl");
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(sasl.password_env.as_deref(), Some("GW_KAFKA_PASSWORD"));
        for mechanism in ["scram-sha-256", "plain", "PLAIN"] {
            let text = format!("mechanism = \"{mechanism}\"\nusername = \"u\"\npassword = \"p\"");
            assert!(toml::from_str::<KafkaSasl>(&text).is_ok(), "{mechanism}");
        }
        assert!(toml::from_str::<KafkaSasl>("mechanism = \"gssapi\"\nusername = \"u\"").is_err());
        assert!(
            toml::from_str::<KafkaTls>("ca = \"x\"").is_err(),
            "unknown keys"
        );
        assert!(
            toml::from_str::<KafkaTls>("")
                .expect("empty")
                .verify_hostname,
            "hostnames are checked by default"
        );
    }

    #[test]
    fn tls_alone_is_ssl_and_with_sasl_is_sasl_ssl() {
        let pems = Pems::new();
        let password = pems.write("password", "s3cret-pw\n", 0o600);

        let cfg = secured(Some(pems.tls()), None);
        assert_eq!(problems_of(&cfg), Vec::<String>::new());
        let c = cfg.client_config("gw").expect("client config");
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        let ca = pems.path("ca.pem");
        assert_eq!(c.get("ssl.ca.location"), ca.to_str());
        assert_eq!(c.get("ssl.key.location"), pems.path("client.key").to_str());
        assert_eq!(
            c.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        assert_eq!(c.get("sasl.mechanism"), None);

        for (mechanism, name) in [
            (SaslMechanism::ScramSha256, "SCRAM-SHA-256"),
            (SaslMechanism::ScramSha512, "SCRAM-SHA-512"),
            (SaslMechanism::Plain, "PLAIN"),
        ] {
            let cfg = secured(
                Some(KafkaTls::default()),
                Some(sasl(mechanism, password.clone())),
            );
            assert_eq!(problems_of(&cfg), Vec::<String>::new(), "{name}");
            let c = cfg.client_config("gw").expect("client config");
            assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
            assert_eq!(c.get("sasl.mechanism"), Some(name));
            assert_eq!(c.get("sasl.username"), Some("gw-017"));
            assert_eq!(
                c.get("sasl.password"),
                Some("s3cret-pw"),
                "line ending stripped"
            );
            // No CA file: the system's store.
            assert_eq!(c.get("ssl.ca.location"), Some("probe"));
        }
        let plain = KafkaConfig::default().client_config("gw").expect("config");
        assert_eq!(plain.get("security.protocol"), None);
    }

    #[test]
    fn sasl_without_tls_is_refused() {
        let pems = Pems::new();
        let password = pems.write("password", "pw", 0o600);
        let problems = problems_of(&secured(None, Some(sasl(SaslMechanism::Plain, password))));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("kafka.sasl: SASL needs TLS"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_password_comes_from_exactly_one_source() {
        let pems = Pems::new();
        let file = pems.write("password", "from-file", 0o600);
        let mut both = sasl(SaslMechanism::ScramSha256, file);
        both.password = Some(Secret::new("inline"));
        let problems = problems_of(&secured(Some(KafkaTls::default()), Some(both)));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("kafka.sasl.password: set only one")),
            "{problems:?}"
        );

        let none = KafkaSasl {
            password_file: None,
            ..sasl(SaslMechanism::ScramSha256, PathBuf::new())
        };
        let problems = problems_of(&secured(Some(KafkaTls::default()), Some(none)));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("kafka.sasl: needs a password")),
            "{problems:?}"
        );

        let env = KafkaSasl {
            password_file: None,
            password_env: Some("EDGEGATE_UNIT_TEST_NO_SUCH_VARIABLE".into()),
            ..sasl(SaslMechanism::ScramSha256, PathBuf::new())
        };
        let problems = problems_of(&secured(Some(KafkaTls::default()), Some(env)));
        assert!(
            problems.iter().any(|p| p.starts_with(
                "kafka.sasl.password: environment variable EDGEGATE_UNIT_TEST_NO_SUCH_VARIABLE"
            )),
            "{problems:?}"
        );

        // PATH is set in any test environment.
        let env = KafkaSasl {
            password_file: None,
            password_env: Some("PATH".into()),
            ..sasl(SaslMechanism::ScramSha256, PathBuf::new())
        };
        let cfg = secured(Some(KafkaTls::default()), Some(env));
        assert_eq!(problems_of(&cfg), Vec::<String>::new());
        let path = std::env::var("PATH").expect("PATH");
        assert_eq!(
            cfg.client_config("gw")
                .expect("config")
                .get("sasl.password"),
            Some(path.as_str())
        );

        let empty = pems.write("empty", "\n", 0o600);
        let problems = problems_of(&secured(
            Some(KafkaTls::default()),
            Some(sasl(SaslMechanism::Plain, empty)),
        ));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("kafka.sasl.password:") && p.ends_with("is empty")),
            "{problems:?}"
        );
    }

    #[test]
    fn files_must_exist_be_pem_and_keys_must_not_be_world_readable() {
        let pems = Pems::new();
        let not_pem = pems.write("not.pem", "hello", 0o644);
        let cfg = secured(
            Some(KafkaTls {
                ca_file: Some(pems.path("missing.pem")),
                cert_file: Some(not_pem),
                key_file: Some(pems.write(
                    "open.key",
                    &std::fs::read_to_string(pems.path("client.key")).expect("key"),
                    0o644,
                )),
                ..KafkaTls::default()
            }),
            None,
        );
        let problems = problems_of(&cfg);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("kafka.tls.ca_file: cannot read"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("kafka.tls.cert_file:")
                && problems[1].contains("no certificate"),
            "{problems:?}"
        );
        assert!(
            problems[2].starts_with("kafka.tls.key_file:")
                && problems[2].contains("accessible to every user (mode 0644)"),
            "{problems:?}"
        );

        let half = secured(
            Some(KafkaTls {
                cert_file: Some(pems.path("client.pem")),
                ..KafkaTls::default()
            }),
            None,
        );
        assert_eq!(
            problems_of(&half),
            ["kafka.tls.cert_file: needs key_file as well"]
        );
    }

    #[test]
    fn a_group_readable_key_or_an_inline_secret_is_a_warning() {
        let pems = Pems::new();
        let key = std::fs::read_to_string(pems.path("client.key")).expect("key");
        let mut tls = KafkaTls {
            key_file: Some(pems.write("group.key", &key, 0o640)),
            verify_hostname: false,
            ..pems.tls()
        };
        let cfg = secured(Some(tls.clone()), None);
        assert_eq!(
            problems_of(&cfg),
            Vec::<String>::new(),
            "a warning, not an error"
        );
        let warned: Vec<String> = cfg.warnings("kafka").into_iter().map(|(k, _)| k).collect();
        assert_eq!(warned, ["kafka.tls.key_file", "kafka.tls.verify_hostname"]);

        tls.verify_hostname = true;
        let mut cfg = secured(
            Some(KafkaTls {
                key_file: Some(pems.path("client.key")),
                ..tls
            }),
            Some(KafkaSasl {
                password_file: None,
                password: Some(Secret::new("inline-pw")),
                ..sasl(SaslMechanism::ScramSha512, PathBuf::new())
            }),
        );
        cfg.properties
            .insert("sasl.oauthbearer.client.secret".into(), "x".into());
        let warned: Vec<String> = cfg.warnings("kafka").into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            warned,
            [
                "kafka.sasl.password",
                "kafka.properties.\"sasl.oauthbearer.client.secret\""
            ]
        );
    }

    #[test]
    fn librdkafka_checks_the_key_against_the_certificate_and_decrypts_it() {
        let pems = Pems::new();
        let mismatched = secured(
            Some(KafkaTls {
                key_file: Some(pems.path("other.key")),
                ..pems.tls()
            }),
            None,
        );
        let problems = problems_of(&mismatched);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("kafka.tls: librdkafka refuses"),
            "{problems:?}"
        );

        let password = pems.write("key-password", "unit-test-key-password\n", 0o600);
        let encrypted = KafkaTls {
            key_file: Some(pems.path("client-encrypted.key")),
            key_password_file: Some(password),
            ..pems.tls()
        };
        let cfg = secured(Some(encrypted.clone()), None);
        assert_eq!(problems_of(&cfg), Vec::<String>::new());
        assert_eq!(
            cfg.client_config("gw")
                .expect("config")
                .get("ssl.key.password"),
            Some("unit-test-key-password")
        );
        let wrong = secured(
            Some(KafkaTls {
                key_password_file: None,
                key_password: Some(Secret::new("not-the-password")),
                ..encrypted
            }),
            None,
        );
        let problems = problems_of(&wrong);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("kafka.tls: librdkafka refuses"),
            "{problems:?}"
        );
    }

    #[test]
    fn scram_and_plain_are_built_into_librdkafka() {
        // The preflight creates a client, which is where librdkafka picks a SASL provider
        // ("No provider for SASL mechanism" when it was built without one).
        let pems = Pems::new();
        let password = pems.write("password", "pw", 0o600);
        for mechanism in [
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::Plain,
        ] {
            let cfg = secured(
                Some(KafkaTls::default()),
                Some(sasl(mechanism, password.clone())),
            );
            assert!(
                cfg.preflight().is_ok(),
                "{mechanism:?}: {:?}",
                cfg.preflight()
            );
        }
    }

    #[test]
    fn raw_properties_may_not_contradict_the_tables() {
        let pems = Pems::new();
        let mut cfg = secured(Some(pems.tls()), None);
        for key in [
            "security.protocol",
            "ssl.ca.location",
            "enable.ssl.certificate.verification",
        ] {
            cfg.properties.insert(key.into(), "x".into());
        }
        // Not owned by a table that is absent, and not a contradiction: allowed.
        cfg.properties.insert("sasl.username".into(), "u".into());
        cfg.properties.insert(
            "ssl.cipher.suites".into(),
            "ECDHE-ECDSA-AES256-GCM-SHA384".into(),
        );
        let problems = problems_of(&cfg);
        assert_eq!(problems.len(), 3, "{problems:?}");
        for p in &problems {
            assert!(p.contains("conflicts with [kafka.tls]/[kafka.sasl]"), "{p}");
        }
        assert!(
            problems
                .iter()
                .any(|p| p.contains("set kafka.tls.ca_file instead"))
        );

        let password = pems.write("password", "pw", 0o600);
        let mut cfg = secured(
            Some(KafkaTls::default()),
            Some(sasl(SaslMechanism::Plain, password)),
        );
        cfg.properties.insert("sasl.password".into(), "x".into());
        assert_eq!(
            problems_of(&cfg),
            [
                "kafka.properties.\"sasl.password\": conflicts with [kafka.tls]/[kafka.sasl]: set kafka.sasl.password_file instead"
            ]
        );
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let mut cfg = secured(
            Some(KafkaTls {
                key_password: Some(Secret::new("key-pw-123")),
                ..KafkaTls::default()
            }),
            Some(KafkaSasl {
                password_file: None,
                password: Some(Secret::new("sasl-pw-456")),
                ..sasl(SaslMechanism::Plain, PathBuf::new())
            }),
        );
        cfg.properties
            .insert("ssl.keystore.password".into(), "raw-pw-789".into());
        cfg.properties
            .insert("socket.timeout.ms".into(), "60000".into());
        let debug = format!("{cfg:?}");
        for secret in ["key-pw-123", "sasl-pw-456", "raw-pw-789"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("<redacted>"));
        assert!(
            debug.contains("60000"),
            "other values stay visible: {debug}"
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let mut cfg: KafkaConfig = toml::from_str(
            "[tls]\nca_file = \"certs/ca.pem\"\nkey_file = \"/abs/key.pem\"\n[sasl]\nmechanism = \"plain\"\nusername = \"u\"\npassword_file = \"pw\"",
        )
        .expect("valid");
        cfg.resolve_paths(Path::new("/etc/edgegate"));
        let tls = cfg.tls.expect("tls");
        assert_eq!(
            tls.ca_file,
            Some(PathBuf::from("/etc/edgegate/certs/ca.pem"))
        );
        assert_eq!(tls.key_file, Some(PathBuf::from("/abs/key.pem")));
        assert_eq!(
            cfg.sasl.expect("sasl").password_file,
            Some(PathBuf::from("/etc/edgegate/pw"))
        );
    }

    #[test]
    fn problems_in_the_tables_point_at_their_keys() {
        let pems = Pems::new();
        let dir = pems.dir.path();
        let text = "[kafka]\nbrokers = [\"k:9093\"]\n\n[kafka.tls]\nca_file = \"nope.pem\"\n\n[kafka.sasl]\nmechanism = \"plain\"\nusername = \"gw\"\n\n[[routes]]\nmatch = \"#\"\ntopic = \"t\"\n";
        let found = match crate::config::Config::parse(text, &dir.join("gw.toml")) {
            Err(crate::config::ConfigError::Invalid(found)) => found,
            other => panic!("expected problems, got {other:?}"),
        };
        let lines: Vec<String> = found
            .iter()
            .map(|l| format!("{}:{} {}", l.line, l.column, l.message))
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("5:11 kafka.tls.ca_file: cannot read"),
            "{lines:?}"
        );
        assert!(
            lines[0].contains(&dir.join("nope.pem").display().to_string()),
            "resolved against the config file's directory: {lines:?}"
        );
        assert!(
            lines[1].starts_with("7:1 kafka.sasl: needs a password"),
            "{lines:?}"
        );
    }

    /// gateway.toml shows every key of `[kafka.tls]` and `[kafka.sasl]` (commented out: they
    /// are off by default), `verify_hostname` with its default, and its example parses.
    #[test]
    fn shipped_gateway_toml_documents_the_security_tables() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
        let text = std::fs::read_to_string(path).expect("gateway.toml");
        let section = |header: &str| -> String {
            let start = text
                .find(header)
                .unwrap_or_else(|| panic!("{header} missing"));
            text[start + header.len()..]
                .lines()
                .skip(1)
                .take_while(|l| !l.trim_start_matches(['#', ' ']).starts_with('['))
                .filter_map(|l| l.strip_prefix("# "))
                .filter(|l| !l.starts_with(' ') && l.contains(" = "))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let tls_text = section("# [kafka.tls]");
        let sasl_text = section("# [kafka.sasl]");
        let tls_debug = format!("{:?}", KafkaTls::default());
        let sasl_debug = format!("{:?}", sasl(SaslMechanism::Plain, PathBuf::new()));
        for (debug, shown) in [(&tls_debug, &tls_text), (&sasl_debug, &sasl_text)] {
            for key in debug
                .split([',', '{'])
                .filter_map(|part| part.trim().split_once(": ").map(|(k, _)| k.trim()))
            {
                assert!(
                    shown.lines().any(|l| l.starts_with(&format!("{key} ="))),
                    "gateway.toml does not show `{key}`:\n{shown}"
                );
            }
        }
        assert!(tls_text.contains("verify_hostname = true"), "{tls_text}");
        // The example keys, uncommented, are a valid table (each secret source is shown, so
        // only the deserialization is checked, not "only one of").
        toml::from_str::<KafkaTls>(&tls_text).expect("the [kafka.tls] example parses");
        toml::from_str::<KafkaSasl>(&sasl_text).expect("the [kafka.sasl] example parses");
    }
}
