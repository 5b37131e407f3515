//! MQTT over TLS: `[mqtt.tls]`, the rustls server configuration built from PEM files (a
//! reloadable setting), the watch on those files, and the device identity read from a client
//! certificate.
//!
//! The crypto provider is `ring` (docs/ARCHITECTURE.md: aws-lc does not cross-build for
//! armv7); TLS 1.2 and 1.3. PEM is parsed with `rustls-pki-types`. Client certificates are
//! verified by rustls' `WebPkiClientVerifier` against `client_ca`, wrapped so that a refused
//! certificate's subject can be logged as the identity it claimed.
//!
//! Rotation: the `ServerConfig` is published through [`crate::reload`] and read once per
//! handshake. A reload (SIGHUP, or [`watch_files`] seeing the files change) builds a complete
//! new configuration first and publishes it only if every file parsed and the key matches the
//! certificate; a connection keeps the configuration it shook hands with, so nothing
//! established is dropped.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_util::sync::CancellationToken;

use crate::auth::CertClaim;
use crate::config::problems::Problems;
use crate::config::{Config, Duration, Loaded, resolve};
use crate::reload::{Reloadable, Settings};

/// `[mqtt.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Serve MQTT over TLS on `listen`.
    pub enabled: bool,
    /// Address of the TLS listener.
    pub listen: String,
    /// The server's certificate chain (PEM, leaf first).
    pub cert: Option<PathBuf>,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Whether devices present a certificate: "none", "optional" or "required".
    pub client_certs: ClientCerts,
    /// Oldest TLS version accepted: "1.2" or "1.3".
    pub min_version: TlsVersion,
    /// A TLS handshake (from accept) must complete within this time.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; more wait (within `handshake_timeout`).
    pub max_handshakes: usize,
    /// How often the certificate, key and client CA files are checked for a change (size,
    /// modification time, inode); a change reloads them as SIGHUP does. "0s": only SIGHUP.
    pub watch_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientCerts {
    None,
    Optional,
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: false,
            listen: "0.0.0.0:8883".into(),
            cert: None,
            key: None,
            client_ca: None,
            client_certs: ClientCerts::None,
            min_version: TlsVersion::Tls12,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 64,
            watch_interval: Duration::from_secs(5),
        }
    }
}

impl TlsConfig {
    /// What the watch compares: per file (certificate, key, client CA) its size, modification
    /// time and inode, or `None` when it cannot be read. Certificate tools replace files by
    /// renaming a new one over them, which changes the inode even within one second.
    pub fn files_state(&self) -> Vec<Option<(u64, std::time::SystemTime, u64)>> {
        use std::os::unix::fs::MetadataExt;
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .flatten()
            .map(|file| {
                let meta = std::fs::metadata(file).ok()?;
                Some((meta.len(), meta.modified().ok()?, meta.ino()))
            })
            .collect()
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        for file in [&mut self.cert, &mut self.key, &mut self.client_ca]
            .into_iter()
            .flatten()
        {
            resolve(file, base);
        }
    }

    /// Builds the server configuration from the files (when enabled and both the certificate
    /// and the key are named: `validate` reports a missing one), each problem at the key
    /// naming the file at fault.
    pub(crate) fn load_files(
        &self,
        path: &str,
        problems: &mut Problems,
    ) -> Option<Loaded<ServerConfig>> {
        if !self.enabled || self.cert.is_none() || self.key.is_none() {
            return None;
        }
        server_config(self)
            .map_err(|e| problems.push(format!("{path}.{}", e.key(self)), e.to_string()))
            .ok()
            .map(Loaded::new)
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if !self.enabled {
            return;
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(
                format!("{path}.listen"),
                format!(
                    "`{}` is not an address such as \"0.0.0.0:8883\"",
                    self.listen
                ),
            );
        }
        if self.cert.is_none() {
            problems.push(format!("{path}.cert"), "is required when TLS is enabled");
        }
        if self.key.is_none() {
            problems.push(format!("{path}.key"), "is required when TLS is enabled");
        }
        match (self.client_certs, &self.client_ca) {
            (ClientCerts::None, Some(_)) => problems.push(
                format!("{path}.client_ca"),
                "is set but client_certs = \"none\": set client_certs to \"optional\" or \"required\"",
            ),
            (ClientCerts::Optional | ClientCerts::Required, None) => problems.push(
                format!("{path}.client_ca"),
                "is required to verify client certificates",
            ),
            _ => {}
        }
        if self.handshake_timeout.get().is_zero() {
            problems.push(
                format!("{path}.handshake_timeout"),
                "must be greater than zero",
            );
        }
        if self.max_handshakes == 0 {
            problems.push(format!("{path}.max_handshakes"), "must be at least 1");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{what} is not configured")]
    Missing { what: &'static str },
    #[error("the client CA bundle {path} is unusable: {source}")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the certificate and key are unusable together ({cert}, {key}): {source}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("the certificate and key were not read (load the config from its file)")]
    NotLoaded,
}

impl TlsError {
    /// The `[mqtt.tls]` key naming the file at fault.
    fn key(&self, config: &TlsConfig) -> &'static str {
        let named = |path: &PathBuf| {
            if config.key.as_ref() == Some(path) {
                "key"
            } else if config.client_ca.as_ref() == Some(path) {
                "client_ca"
            } else {
                "cert"
            }
        };
        match self {
            TlsError::Read { path, .. } | TlsError::NoCertificate { path } => named(path),
            TlsError::ClientCa { .. } => "client_ca",
            TlsError::Key { .. } => "key",
            TlsError::Missing { what } if what.ends_with("key") => "key",
            // A CA certificate the root store refuses, or (never seen) the protocol versions.
            TlsError::Rustls(_) if config.client_ca.is_some() => "client_ca",
            TlsError::Missing { .. } | TlsError::Rustls(_) | TlsError::NotLoaded => "cert",
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Builds the server configuration from the files `config` names (paths resolved at load).
/// Everything is checked here (files parse, the key matches the certificate, the CA bundle
/// holds usable roots), so a bad set fails before it is used.
pub fn server_config(config: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let cert_path = config.cert.clone().ok_or(TlsError::Missing {
        what: "[mqtt.tls] cert",
    })?;
    let key_path = config.key.clone().ok_or(TlsError::Missing {
        what: "[mqtt.tls] key",
    })?;
    let chain = certificates(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| TlsError::Read {
        path: key_path.clone(),
        source,
    })?;
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match (&config.client_ca, config.client_certs) {
        (Some(ca), ClientCerts::Optional | ClientCerts::Required) => {
            let ca_path = ca.clone();
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(&ca_path)? {
                roots.add(cert)?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if config.client_certs == ClientCerts::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|source| TlsError::ClientCa {
                path: ca_path.clone(),
                source,
            })?;
            builder.with_client_cert_verifier(Arc::new(Recording { inner: verifier }))
        }
        _ => builder.with_no_client_auth(),
    };
    // No ALPN: rustls would refuse clients offering other protocol ids (some MQTT clients
    // send vendor-specific ones), and MQTT needs no negotiation on its own port.
    let server = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Key {
            cert: cert_path,
            key: key_path,
            source,
        })?;
    Ok(server)
}

/// The certificate, key and client CA change on reload; each handshake uses the set in force
/// when it starts, and a connection keeps the set it shook hands with.
impl Reloadable for ServerConfig {
    const KEYS: &'static [&'static str] = &["mqtt.tls"];
    type Error = TlsError;

    fn build(config: &Config) -> Result<Arc<ServerConfig>, TlsError> {
        let loaded = config.files.mqtt_tls.as_ref();
        loaded.map(|l| l.get().clone()).ok_or(TlsError::NotLoaded)
    }

    fn reloaded(&self, config: &Config) {
        tracing::info!(
            cert = ?config.mqtt.tls.cert,
            client_ca = ?config.mqtt.tls.client_ca,
            "Reloaded the MQTT TLS certificate, key and client CA."
        );
    }

    fn kept(error: &dyn std::fmt::Display) {
        tracing::error!(%error, "Kept the MQTT TLS certificate in force: the new set is unusable.");
    }
}

/// Rebuilds the TLS setting whenever the certificate, key or client CA named by the latest
/// config change on disk, every `[mqtt.tls] watch_interval` ("0s": never), until `shutdown`.
/// A set that does not load (a key written before its certificate) is logged and the old one
/// stays; the next change is tried again, an unchanged bad set is not. `loaded` is the
/// files' state taken before the set in force was read ([`TlsConfig::files_state`]).
pub async fn watch_files(
    settings: Arc<Settings>,
    loaded: Vec<Option<(u64, std::time::SystemTime, u64)>>,
    shutdown: CancellationToken,
) {
    let mut configs = settings.config();
    let every = configs.borrow().mqtt.tls.watch_interval.get();
    if every.is_zero() {
        return;
    }
    let state = |config: &Config| config.mqtt.tls.files_state();
    // The state of the files when they were last loaded.
    let mut loaded = loaded;
    configs.borrow_and_update();
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            // A reload loaded the files (maybe others) itself.
            changed = configs.changed() => match changed {
                Ok(()) => loaded = state(&configs.borrow_and_update()),
                Err(_) => return,
            },
            _ = tick.tick() => {
                let tls = configs.borrow().mqtt.tls.clone();
                let now = tls.files_state();
                if now != loaded {
                    tracing::info!("The MQTT TLS certificate files changed on disk; reloading them.");
                    settings.replace(server_config(&tls).map(Arc::new));
                    loaded = now;
                }
            }
        }
    }
}

tokio::task_local! {
    /// The subject of a client certificate the verifier refused during this task's handshake,
    /// so the failure's log line can name the identity it claimed. The verifier runs inside
    /// the handshake future's poll, in the connection's own task.
    pub(super) static REFUSED_SUBJECT: RefCell<Option<String>>;
}

/// Delegates to webpki's verifier; remembers what a refused certificate claimed to be.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for Recording {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|_| {
                let subject = cert_claim(end_entity).and_then(|c| c.cn);
                let _ = REFUSED_SUBJECT.try_with(|s| *s.borrow_mut() = subject);
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Reads the subject CN and the SANs of a client certificate; `None` if it does not parse
/// (rustls has verified an accepted one, so that does not happen then).
pub fn cert_claim(der: &CertificateDer<'_>) -> Option<CertClaim> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let mut claim = CertClaim {
        cn,
        ..CertClaim::default()
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) => claim.san_dns.push((*s).to_owned()),
                GeneralName::RFC822Name(s) => claim.san_email.push((*s).to_owned()),
                GeneralName::URI(s) => claim.san_uri.push((*s).to_owned()),
                _ => {}
            }
        }
    }
    Some(claim)
}

/// Handshake failures as bounded label values, and whether the client's certificate was
/// the problem (an authentication failure) rather than the connection.
pub(super) fn classify(error: &std::io::Error) -> (&'static str, bool) {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return ("io", false);
    };
    match tls {
        rustls::Error::NoCertificatesPresented => ("no_client_certificate", true),
        rustls::Error::InvalidCertificate(e) => {
            use rustls::CertificateError as C;
            let reason = match e {
                C::Expired | C::ExpiredContext { .. } => "certificate_expired",
                C::UnknownIssuer => "certificate_unknown_issuer",
                C::NotValidYet | C::NotValidYetContext { .. } => "certificate_not_yet_valid",
                C::Revoked => "certificate_revoked",
                _ => "certificate_invalid",
            };
            (reason, true)
        }
        rustls::Error::AlertReceived(_) => ("alert_received", false),
        rustls::Error::PeerIncompatible(_) => ("incompatible", false),
        _ => ("protocol", false),
    }
}
