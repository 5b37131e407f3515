//! `[schema_registry]`, and the per-route subject naming strategy.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::config::Duration;
use crate::config::problems::Problems;

/// `[schema_registry]`: a Confluent-compatible schema registry (its REST API: Confluent
/// Schema Registry, Karapace, Redpanda, Apicurio's `/apis/ccompat/v7`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The API's base URL, `http://` or `https://`.
    pub url: String,
    /// HTTP basic authentication; both or neither.
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of the CA(s) that sign an `https://` registry's certificate; the Mozilla
    /// roots when absent.
    pub ca_file: Option<PathBuf>,
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
            password: None,
            ca_file: None,
            refresh: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
        }
    }
}

impl RegistryConfig {
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(p) = &mut self.ca_file {
            crate::config::resolve(p, base);
        }
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
        if self.username.is_some() != self.password.is_some() {
            problems.push(
                format!("{at}.username"),
                "basic authentication needs both username and password",
            );
        }
        if self.ca_file.is_some() && !https {
            problems.push(
                format!("{at}.ca_file"),
                "only an https:// url uses a CA file",
            );
        } else if let Err(e) = self.tls() {
            problems.push(format!("{at}.ca_file"), e);
        }
        if self.refresh.get() < std::time::Duration::from_secs(1) {
            problems.push(format!("{at}.refresh"), "must be at least 1s");
        }
        if self.timeout.get() < std::time::Duration::from_millis(100) {
            problems.push(format!("{at}.timeout"), "must be at least 100ms");
        }
    }

    /// The TLS client configuration for `ca_file`, `None` without one.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        let Some(ca) = &self.ca_file else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
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
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
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
}
