//! `[schema_registry]`, and the per-route subject naming strategy.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Duration;
use crate::config::problems::Problems;
use crate::forward::security::{
    Secret, SecretError, SecretSource, check_pem, check_secret, group_readable, one_source, sources,
};

/// `[schema_registry]`: a Confluent-compatible schema registry (its REST API: Confluent
/// Schema Registry, Karapace, Redpanda, Apicurio's `/apis/ccompat/v7`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The API's base URL, `http://` or `https://`.
    pub url: String,
    /// HTTP basic authentication: the username, and the password from exactly one of a
    /// file (its first line), an environment variable, or inline.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub password: Option<Secret>,
    /// PEM file of the CA(s) that sign an `https://` registry's certificate; the Mozilla
    /// roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM, its chain after it) and its unencrypted private key (PEM:
    /// PKCS#8, PKCS#1 or SEC1), for a registry that requires mutual TLS; both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How often the latest version of every subject in use is read again: a new version
    /// registered in the registry is used from then on, without a restart.
    pub refresh: Duration,
    /// The longest one request to the registry may take.
    pub timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: String::new(),
            username: None,
            password_file: None,
            password_env: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            refresh: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
        }
    }
}

impl RegistryConfig {
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [
            &mut self.ca_file,
            &mut self.cert_file,
            &mut self.key_file,
            &mut self.password_file,
        ]
        .into_iter()
        .flatten()
        {
            crate::config::resolve(p, base);
        }
    }

    fn password_sources(&self) -> Vec<SecretSource<'_>> {
        sources(
            self.password_file.as_ref(),
            self.password_env.as_ref(),
            self.password.as_ref(),
        )
    }

    /// The basic-authentication password, read now (a file's first line, a variable, or
    /// inline); `None` without a username.
    pub fn password(&self) -> Result<Option<String>, SecretError> {
        if self.username.is_none() {
            return Ok(None);
        }
        match self.password_sources().first() {
            Some(source) => source.read("password").map(Some),
            None => Err(SecretError::Missing { what: "password" }),
        }
    }

    /// What is allowed but unwise, said as `[kafka]`'s is: the password written in the
    /// config file, a secret file its group can read.
    pub fn warnings(&self, at: &str) -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = [
            ("password_file", &self.password_file),
            ("key_file", &self.key_file),
        ]
        .into_iter()
        .filter_map(|(key, file)| group_readable(format!("{at}.{key}"), file.as_ref()?))
        .collect();
        if self.password.is_some() {
            found.push((
                format!("{at}.password"),
                "is written in the config file; prefer password_file or password_env".into(),
            ));
        }
        found
    }

    pub fn validate(&self, at: &str, problems: &mut Problems) {
        let https = self.url.starts_with("https://");
        if !https && !self.url.starts_with("http://") {
            problems.push(
                format!("{at}.url"),
                "must be an http:// or https:// URL of the registry's API",
            );
        } else if self.url.trim_end_matches('/').ends_with(':') || self.url.contains(' ') {
            problems.push(format!("{at}.url"), "is not a valid URL");
        }
        let password = one_source(at, "password", self.password_sources(), problems);
        match (&self.username, password) {
            (Some(_), Some(source)) => {
                // At the key that names the source.
                let key = match source {
                    SecretSource::File(_) => "password_file",
                    SecretSource::Env(_) => "password_env",
                    SecretSource::Inline(_) => "password",
                };
                check_secret(source, "password", format!("{at}.{key}"), problems);
            }
            (Some(_), None) => problems.push(
                format!("{at}.username"),
                "basic authentication needs a password: password_file, password_env or password",
            ),
            (None, Some(_)) => problems.push(
                format!("{at}.password"),
                "a password needs a username (basic authentication)",
            ),
            (None, None) => {}
        }
        let tls_files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        let before = problems.0.len();
        if https && self.ca_file.is_some() {
            if let Err(e) = self.roots() {
                problems.push(format!("{at}.ca_file"), e);
            }
        }
        for (name, file) in tls_files {
            if file.is_some() && !https {
                problems.push(
                    format!("{at}.{name}"),
                    "only an https:// url uses TLS files",
                );
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let missing = if self.cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            problems.push(
                format!("{at}.{missing}"),
                "a client certificate needs both cert_file and key_file",
            );
        }
        if let Some(cert) = &self.cert_file {
            check_pem(
                cert,
                format!("{at}.cert_file"),
                "CERTIFICATE",
                "certificate",
                false,
                problems,
            );
        }
        if let Some(key) = &self.key_file {
            check_pem(
                key,
                format!("{at}.key_file"),
                "PRIVATE KEY",
                "private key",
                true,
                problems,
            );
        }
        // Built only from files that passed the checks above: one problem per file.
        if https && problems.0.len() == before {
            if let Err((name, e)) = self.tls() {
                problems.push(format!("{at}.{name}"), e);
            }
        }
        if self.refresh.get() < std::time::Duration::from_secs(1) {
            problems.push(format!("{at}.refresh"), "must be at least 1s");
        }
        if self.timeout.get() < std::time::Duration::from_millis(100) {
            problems.push(format!("{at}.timeout"), "must be at least 100ms");
        }
    }

    /// The CAs an `https://` registry's certificate must chain to: `ca_file`'s, else the
    /// Mozilla roots.
    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        let Some(ca) = &self.ca_file else {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            return Ok(roots);
        };
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{} holds no certificate", ca.display()));
        }
        Ok(roots)
    }

    /// The TLS client configuration for `ca_file` and the client certificate, `None`
    /// without either (ureq's own, with the Mozilla roots). An error names the key at fault.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ClientConfig>>, (&'static str, String)> {
        if self.ca_file.is_none() && self.cert_file.is_none() {
            return Ok(None);
        }
        let roots = self.roots().map_err(|e| ("ca_file", e))?;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ("ca_file", e.to_string()))?
        .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| ("cert_file", format!("{}: {e}", cert.display())))?;
                if chain.is_empty() {
                    return Err((
                        "cert_file",
                        format!("{} holds no certificate", cert.display()),
                    ));
                }
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    (
                        "key_file",
                        format!(
                            "{}: {e} (an unencrypted PEM key is needed: PKCS#8, PKCS#1 or SEC1)",
                            key.display()
                        ),
                    )
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| ("key_file", format!("{}: {e}", key.display())))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }
}

/// A route's `subject_strategy`: which registry subject a record's schema is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<kafka topic>-value` (Confluent's `TopicNameStrategy`).
    #[default]
    TopicName,
    /// The route's `record_name` (`RecordNameStrategy`).
    RecordName,
    /// `<kafka topic>-<record_name>` (`TopicRecordNameStrategy`).
    TopicRecordName,
}

/// How a schema route names its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub strategy: SubjectStrategy,
    /// The fully qualified record name, for the two strategies that use it.
    pub record_name: Option<String>,
    /// A `protobuf` route's message, when not the schema's first.
    pub message: Option<String>,
}

impl Naming {
    /// The subject of a record going to `kafka_topic`.
    pub fn subject(&self, kafka_topic: &str) -> String {
        let name = self.record_name.as_deref().unwrap_or_default();
        match self.strategy {
            SubjectStrategy::TopicName => format!("{kafka_topic}-value"),
            SubjectStrategy::RecordName => name.to_owned(),
            SubjectStrategy::TopicRecordName => format!("{kafka_topic}-{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_strategy() {
        let naming = |strategy, record_name: Option<&str>| Naming {
            strategy,
            record_name: record_name.map(str::to_owned),
            message: None,
        };
        assert_eq!(
            naming(SubjectStrategy::TopicName, None).subject("plant.t"),
            "plant.t-value"
        );
        assert_eq!(
            naming(SubjectStrategy::RecordName, Some("acme.Reading")).subject("plant.t"),
            "acme.Reading"
        );
        assert_eq!(
            naming(SubjectStrategy::TopicRecordName, Some("acme.Reading")).subject("plant.t"),
            "plant.t-acme.Reading"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let config = RegistryConfig {
            url: "ftp://x".into(),
            username: Some("u".into()),
            ca_file: Some("/nonexistent/ca.pem".into()),
            refresh: Duration::from_millis(10),
            timeout: Duration::from_millis(1),
            ..RegistryConfig::default()
        };
        let mut problems = Problems::default();
        config.validate("schema_registry", &mut problems);
        let paths: Vec<_> = problems.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "schema_registry.url",
                "schema_registry.username",
                "schema_registry.ca_file",
                "schema_registry.refresh",
                "schema_registry.timeout"
            ]
        );
        let https = RegistryConfig {
            url: "https://registry:8081".into(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..RegistryConfig::default()
        };
        let mut problems = Problems::default();
        https.validate("schema_registry", &mut problems);
        assert_eq!(problems.0.len(), 1);
        assert!(
            problems.0[0].message.contains("cannot read"),
            "{problems:?}"
        );
    }

    #[test]
    fn client_certificates_and_passwords_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = write("client.pem", &cert.pem(), 0o644);
        let key_file = write("client.key", &key.serialize_pem(), 0o600);
        let open_key = write("open.key", &key.serialize_pem(), 0o644);
        let password_file = write("password", "s3cret\n", 0o600);
        let problems_of = |config: RegistryConfig| {
            let mut problems = Problems::default();
            config.validate("schema_registry", &mut problems);
            problems
                .0
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect::<Vec<_>>()
        };
        let https = || RegistryConfig {
            url: "https://registry:8081".into(),
            ..RegistryConfig::default()
        };
        let good = RegistryConfig {
            cert_file: Some(cert_file.clone()),
            key_file: Some(key_file.clone()),
            username: Some("edge".into()),
            password_file: Some(password_file.clone()),
            ..https()
        };
        assert_eq!(problems_of(good.clone()), Vec::<String>::new());
        assert_eq!(good.password().unwrap().as_deref(), Some("s3cret"));
        assert!(
            good.tls().unwrap().is_some(),
            "the Mozilla roots and the client certificate"
        );

        let found = problems_of(RegistryConfig {
            cert_file: Some(cert_file.clone()),
            ca_file: Some(dir.path().join("missing-ca.pem")),
            ..https()
        });
        assert_eq!(found.len(), 2, "all at once: {found:?}");
        assert!(
            found[0].starts_with("schema_registry.ca_file: cannot read"),
            "{found:?}"
        );
        assert_eq!(
            found[1],
            "schema_registry.key_file: a client certificate needs both cert_file and key_file"
        );
        let found = problems_of(RegistryConfig {
            url: "http://registry:8081".into(),
            ..good.clone()
        });
        assert!(
            found[0].starts_with("schema_registry.cert_file: only an https:// url"),
            "{found:?}"
        );
        let found = problems_of(RegistryConfig {
            key_file: Some(open_key),
            ..good.clone()
        });
        assert!(
            found.len() == 1 && found[0].contains("accessible to every user"),
            "{found:?}"
        );
        let found = problems_of(RegistryConfig {
            key_file: Some(cert_file.clone()),
            ..good.clone()
        });
        assert!(found[0].contains("holds no private key"), "{found:?}");
        let found = problems_of(RegistryConfig {
            password: Some(Secret::new("inline")),
            ..good.clone()
        });
        assert_eq!(
            found,
            ["schema_registry.password: set only one of password_file, password_env and password"]
        );
        let found = problems_of(RegistryConfig {
            password_file: Some(dir.path().join("missing")),
            ..good.clone()
        });
        assert!(
            found[0].starts_with("schema_registry.password_file: cannot read"),
            "{found:?}"
        );
        let found = problems_of(RegistryConfig {
            username: None,
            ..good
        });
        assert_eq!(
            found,
            ["schema_registry.password: a password needs a username (basic authentication)"]
        );
    }

    /// The same unwise settings `[kafka]` warns about: a warning, not a problem.
    #[test]
    fn an_inline_password_or_a_group_readable_secret_is_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, "s3cret\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let warned = |config: RegistryConfig| {
            let mut problems = Problems::default();
            config.validate("schema_registry", &mut problems);
            assert!(problems.is_empty(), "{problems:?}");
            config
                .warnings("schema_registry")
                .into_iter()
                .map(|(key, why)| format!("{key} {why}"))
                .collect::<Vec<_>>()
        };
        let basic = RegistryConfig {
            url: "http://registry:8081".into(),
            username: Some("edge".into()),
            ..RegistryConfig::default()
        };
        assert_eq!(
            warned(RegistryConfig {
                password_file: Some(write("private", 0o600)),
                ..basic.clone()
            }),
            Vec::<String>::new()
        );
        let group = warned(RegistryConfig {
            password_file: Some(write("group", 0o640)),
            ..basic.clone()
        });
        assert!(
            group.len() == 1
                && group[0].starts_with("schema_registry.password_file ")
                && group[0].contains("readable by its group (mode 0640)"),
            "{group:?}"
        );
        assert_eq!(
            warned(RegistryConfig {
                password: Some(Secret::new("inline")),
                ..basic
            }),
            [
                "schema_registry.password is written in the config file; prefer password_file or password_env"
            ]
        );
    }
}
