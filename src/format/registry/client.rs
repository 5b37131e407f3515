//! The registry's REST API, the one call the gateway needs: a subject's latest version
//! (`GET /subjects/{subject}/versions/latest`). Blocking (ureq): it runs on tokio's blocking
//! pool, a few requests a minute.

use std::sync::Arc;

use base64::Engine;

use super::cache::{Entry, SchemaType};
use super::config::RegistryConfig;

/// Why a subject's latest version could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The registry answered that the subject has no version (yet): records wait.
    #[error("the registry has no subject `{0}`")]
    NoSubject(String),
    /// The registry could not be reached or answered an error: records wait.
    #[error("the registry is unreachable or failed: {0}")]
    Unreachable(String),
    /// It answered something that is not a schema version.
    #[error("the registry's answer is not a schema version: {0}")]
    Invalid(String),
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: Arc<str>,
    authorization: Option<Arc<str>>,
}

#[derive(serde::Deserialize)]
struct Version {
    id: u32,
    version: i32,
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
}

impl Client {
    pub fn new(config: &RegistryConfig) -> Result<Client, String> {
        let mut agent = ureq::AgentBuilder::new()
            .timeout(config.timeout.get())
            .user_agent(concat!("edgegate/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = config.tls().map_err(|(_, e)| e)? {
            agent = agent.tls_config(tls);
        }
        let password = config.password().map_err(|e| e.to_string())?;
        let authorization = match (&config.username, password) {
            (Some(u), Some(p)) => Some(
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
                .into(),
            ),
            _ => None,
        };
        Ok(Client {
            agent: agent.build(),
            base: config.url.trim_end_matches('/').into(),
            authorization,
        })
    }

    /// The latest version of `subject`.
    pub fn latest(&self, subject: &str) -> Result<Entry, FetchError> {
        let url = format!(
            "{}/subjects/{}/versions/latest",
            self.base,
            percent_encode(subject)
        );
        let mut request = self
            .agent
            .get(&url)
            .set("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some(auth) = &self.authorization {
            request = request.set("Authorization", auth);
        }
        let body = match request.call() {
            Ok(response) => response
                .into_string()
                .map_err(|e| FetchError::Unreachable(e.to_string()))?,
            Err(ureq::Error::Status(404, _)) => {
                return Err(FetchError::NoSubject(subject.to_owned()));
            }
            Err(ureq::Error::Status(code, response)) => {
                let text = response.into_string().unwrap_or_default();
                return Err(FetchError::Unreachable(format!(
                    "HTTP {code}: {}",
                    text.chars().take(200).collect::<String>()
                )));
            }
            Err(e) => return Err(FetchError::Unreachable(e.to_string())),
        };
        parse_version(&body)
    }
}

/// `[schema_registry]` as a running gateway uses it: the client, or none, and how often
/// subjects are read again. Changes on reload (SIGHUP): a new URL, credentials or CA are used
/// from the next request on, and a registry added or removed changes whether unknown
/// subjects wait ([`super::Registry::run`]).
pub struct Upstream {
    pub client: Option<Client>,
    pub refresh: std::time::Duration,
}

impl Upstream {
    pub fn new(config: Option<&RegistryConfig>) -> Result<Upstream, String> {
        Ok(Upstream {
            client: config.map(Client::new).transpose()?,
            refresh: config.map_or(std::time::Duration::from_secs(60), |c| c.refresh.get()),
        })
    }
}

impl crate::reload::Reloadable for Upstream {
    const KEYS: &'static [&'static str] = &["schema_registry"];
    type Error = String;

    fn build(config: &crate::config::Config) -> Result<Arc<Upstream>, String> {
        let upstream = Upstream::new(config.schema_registry.as_ref())?;
        let warnings = config
            .schema_registry
            .as_ref()
            .map(|r| r.warnings("schema_registry"));
        for (key, warning) in warnings.unwrap_or_default() {
            tracing::warn!(setting = %key, "Unwise schema registry setting: {key} {warning}.");
        }
        Ok(Arc::new(upstream))
    }

    fn reloaded(&self, config: &crate::config::Config) {
        match &config.schema_registry {
            Some(registry) => tracing::info!(
                url = %registry.url,
                refresh = ?registry.refresh.get(),
                "Reloaded [schema_registry]."
            ),
            // Most gateways have none: not a line per SIGHUP.
            None => tracing::debug!(
                "Reloaded: no [schema_registry]; subjects the cache does not know cannot be learnt."
            ),
        }
    }

    fn kept(why: &dyn std::fmt::Display) {
        tracing::error!(error = %why, "Kept the [schema_registry] in force: the new one is unusable.");
    }
}

/// A `GET .../versions/latest` answer, if it is an Avro, a JSON Schema or a Protobuf version.
pub fn parse_version(body: &str) -> Result<Entry, FetchError> {
    let v: Version = serde_json::from_str(body).map_err(|e| FetchError::Invalid(e.to_string()))?;
    let Some(schema_type) = SchemaType::from_name(v.schema_type.as_deref()) else {
        return Err(FetchError::Invalid(format!(
            "schema {} is {}; the gateway encodes AVRO, JSON and PROTOBUF",
            v.id,
            v.schema_type.as_deref().unwrap_or_default()
        )));
    };
    Ok(Entry {
        id: v.id,
        version: v.version,
        schema: v.schema,
        schema_type,
    })
}

/// A subject as one path segment: everything but unreserved characters escaped.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_answer_parses() {
        let body = r#"{"subject":"t-value","version":3,"id":21,"schema":"\"string\""}"#;
        assert_eq!(
            parse_version(body).unwrap(),
            Entry {
                id: 21,
                version: 3,
                schema: r#""string""#.into(),
                schema_type: SchemaType::Avro,
            }
        );
        let json = r#"{"subject":"t-value","version":2,"id":4,"schemaType":"JSON","schema":"{\"type\":\"object\"}"}"#;
        assert_eq!(parse_version(json).unwrap().schema_type, SchemaType::Json);
        let protobuf = r#"{"subject":"t-value","version":1,"id":2,"schemaType":"PROTOBUF","schema":"syntax = \"proto3\";"}"#;
        assert_eq!(
            parse_version(protobuf).unwrap().schema_type,
            SchemaType::Protobuf
        );
        let other =
            r#"{"subject":"t-value","version":1,"id":2,"schemaType":"XSD","schema":"<x/>"}"#;
        assert!(matches!(parse_version(other), Err(FetchError::Invalid(_))));
        assert!(matches!(
            parse_version(r#"{"error_code":40401}"#),
            Err(FetchError::Invalid(_))
        ));
    }

    #[test]
    fn subjects_are_one_path_segment() {
        assert_eq!(percent_encode("plant/a b-value"), "plant%2Fa%20b-value");
        assert_eq!(percent_encode("acme.Reading"), "acme.Reading");
    }

    /// One request to a registry that answers `answer` on a local socket.
    fn against(answer: &'static str) -> (Result<Entry, FetchError>, String) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer.as_bytes()).unwrap();
            String::from_utf8_lossy(&request).into_owned()
        });
        let client = Client::new(&RegistryConfig {
            url: format!("http://{addr}/"),
            username: Some("edge".into()),
            password: Some(crate::forward::security::Secret::new("s3cret")),
            ..RegistryConfig::default()
        })
        .unwrap();
        let result = client.latest("plant.t-value");
        (result, server.join().unwrap())
    }

    #[test]
    fn the_client_asks_for_the_latest_version_with_basic_auth() {
        let body = r#"{"subject":"plant.t-value","version":1,"id":7,"schema":"\"long\""}"#;
        let answer: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (result, request) = against(answer);
        assert_eq!(result.unwrap().id, 7);
        assert!(
            request.starts_with("GET /subjects/plant.t-value/versions/latest HTTP/1.1"),
            "{request}"
        );
        // base64("edge:s3cret")
        assert!(request.contains("Basic ZWRnZTpzM2NyZXQ="), "{request}");
        let (result, _) = against("HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(result, Err(FetchError::NoSubject("plant.t-value".into())));
        let (result, _) = against("HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(result, Err(FetchError::Unreachable(_))));
    }

    /// A registry behind mutual TLS: the server's CA and certificate, and a client
    /// certificate from another CA that the server requires.
    struct MutualTls {
        dir: tempfile::TempDir,
        server: Arc<rustls::ServerConfig>,
    }

    use tokio_rustls::rustls;

    impl MutualTls {
        fn new() -> MutualTls {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let dir = tempfile::tempdir().unwrap();
            let ca = |name: &str| {
                let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, name);
                let key = rcgen::KeyPair::generate().unwrap();
                rcgen::CertifiedIssuer::self_signed(params, key).unwrap()
            };
            let (server_ca, client_ca) = (ca("registry CA"), ca("gateway CA"));
            let leaf = |issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
                        name: &str,
                        usage: rcgen::ExtendedKeyUsagePurpose| {
                let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
                params.extended_key_usages = vec![usage];
                let key = rcgen::KeyPair::generate().unwrap();
                let cert = params.signed_by(&key, &**issuer).unwrap();
                (cert.pem(), key.serialize_pem())
            };
            let (server_pem, server_key) = leaf(
                &server_ca,
                "127.0.0.1",
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            );
            let (client_pem, client_key) = leaf(
                &client_ca,
                "plant-7-gw-2",
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            );
            let (server_ca_pem, client_ca_pem) = (server_ca.pem(), client_ca.pem());
            let write =
                |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
            write("registry-ca.pem", &server_ca_pem);
            write("client.pem", &client_pem);
            write("client.key", &client_key);
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(client_ca_pem.as_bytes()).unwrap())
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .unwrap();
            let server = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![CertificateDer::from_pem_slice(server_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap(),
                )
                .unwrap();
            MutualTls {
                dir,
                server: Arc::new(server),
            }
        }

        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }

        /// One request from a client configured by `config` (its url filled in); what it
        /// got, and the request the server read (empty when the handshake failed).
        fn ask(&self, config: RegistryConfig) -> (Result<Entry, FetchError>, String) {
            use std::io::{Read, Write};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = self.server.clone();
            let thread = std::thread::spawn(move || {
                let (socket, _) = listener.accept().unwrap();
                let connection = rustls::ServerConnection::new(server).unwrap();
                let mut tls = rustls::StreamOwned::new(connection, socket);
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return String::new(),
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let body = r#"{"subject":"t-value","version":1,"id":9,"schema":"\"long\""}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
                String::from_utf8_lossy(&request).into_owned()
            });
            let client = Client::new(&RegistryConfig {
                url: format!("https://127.0.0.1:{}", addr.port()),
                ..config
            })
            .unwrap();
            let result = client.latest("t-value");
            (result, thread.join().unwrap())
        }
    }

    #[test]
    fn a_client_certificate_and_a_password_file_reach_a_mutual_tls_registry() {
        let pki = MutualTls::new();
        std::fs::write(pki.path("password"), "s3cret\nignored second line\n").unwrap();
        let (result, request) = pki.ask(RegistryConfig {
            ca_file: Some(pki.path("registry-ca.pem")),
            cert_file: Some(pki.path("client.pem")),
            key_file: Some(pki.path("client.key")),
            username: Some("edge".into()),
            password_file: Some(pki.path("password")),
            ..RegistryConfig::default()
        });
        assert_eq!(result.unwrap().id, 9);
        // base64("edge:s3cret"): the file's first line.
        assert!(request.contains("Basic ZWRnZTpzM2NyZXQ="), "{request}");

        // Without the client certificate the registry refuses the handshake.
        let (result, request) = pki.ask(RegistryConfig {
            ca_file: Some(pki.path("registry-ca.pem")),
            ..RegistryConfig::default()
        });
        assert!(
            matches!(result, Err(FetchError::Unreachable(_))),
            "{result:?}"
        );
        assert_eq!(request, "", "no request without a client certificate");
    }
}
