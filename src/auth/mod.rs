//! Device authentication and topic rights (`[auth]`).
//!
//! A device proves who it is with a client certificate (verified by TLS against
//! `[mqtt.tls] client_ca`) or a username and password (argon2id hashes in `password_file`,
//! written by `edgegate passwd`); a client with neither is anonymous, accepted only as
//! `anonymous` allows. `[[auth.rules]]` then say where it may publish (deny by default once
//! any rule exists).
//!
//! Every refusal goes through [`failed`]: one WARN line with the peer address and the identity
//! the client claimed (never the secret), and `edgegate_auth_failures_total{reason}`, whose
//! reasons are the fixed strings of [`Failure::reason`].

pub mod config;
pub mod passwd;
pub mod rules;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::problems::Problems;
use crate::config::{Config, Loaded};
use crate::reload::Reloadable;
use config::{Anonymous, AuthConfig, CertField, ClientIdPolicy};
pub use passwd::{Credentials, PasswdError};
use rules::Rules;

/// How a connection proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Anonymous,
    Password,
    Certificate,
}

/// Who a connection is, for rights and for the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: Kind,
    /// The MQTT client id in force (replaced by the certificate identity when configured).
    pub client_id: String,
    /// A verified username.
    pub username: Option<String>,
    /// The verified client certificate's subject CN.
    pub cert_cn: Option<String>,
}

/// What a verified client certificate offers as identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertClaim {
    pub cn: Option<String>,
    pub san_dns: Vec<String>,
    pub san_email: Vec<String>,
    pub san_uri: Vec<String>,
}

/// What a CONNECT claims.
pub struct Claim<'a> {
    pub peer: SocketAddr,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub cert: Option<&'a CertClaim>,
}

/// Why a client was refused. `reason` values are the metric's label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad username or password (MQTT 5 0x86, 3.1.1 0x04).
    Credentials(&'static str),
    /// Identified, or not, but not allowed (MQTT 5 0x87, 3.1.1 0x05).
    NotAuthorized(&'static str),
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Credentials(r) | Failure::NotAuthorized(r) => r,
        }
    }
}

/// The one place an authentication or authorization failure is logged and counted.
/// `claimed` is the identity the client claimed (client id, username, certificate subject).
pub fn failed(peer: SocketAddr, claimed: &str, reason: &'static str) {
    metrics::counter!("edgegate_auth_failures_total", "reason" => reason).increment(1);
    tracing::warn!(%peer, claimed, reason, "Refused a device: authentication or authorization failed.");
}

/// Anonymous access reachable from the network is worth a line at every start: a WARN when
/// `anonymous = "always"` and a listener is not on loopback, an INFO saying who is refused
/// under `"loopback"`.
pub fn announce_anonymous(anonymous: Anonymous, listeners: impl IntoIterator<Item = SocketAddr>) {
    let exposed = listeners
        .into_iter()
        .filter(|a| !a.ip().is_loopback())
        .map(|a| a.to_string())
        .collect::<Vec<_>>();
    match anonymous {
        Anonymous::Always if !exposed.is_empty() => tracing::warn!(
            listeners = ?exposed,
            "Anonymous MQTT and CoAP clients are accepted on a non-loopback address ([auth] anonymous = \"always\"): any host that can reach it may publish."
        ),
        Anonymous::Loopback if !exposed.is_empty() => tracing::info!(
            listeners = ?exposed,
            "Anonymous MQTT and CoAP clients are accepted from loopback only; MQTT devices on the network need a certificate or a password, and CoAP devices on the network are refused 4.01."
        ),
        _ => {}
    }
}

/// HELP text of [`failed`]'s counter.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "edgegate_auth_failures_total",
        "Devices refused for authentication or authorization, by reason (bad password, certificate, topic rights...)."
    );
}

/// The rules and credentials in force; a reload replaces them whole (see [`crate::reload`]).
pub struct Auth {
    config: AuthConfig,
    rules: Rules,
    credentials: Option<Arc<Credentials>>,
    /// Bounds concurrent argon2 verifications (each takes ~19 MiB and tens of ms of CPU).
    checks: Arc<Semaphore>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("[auth] rules are invalid: {0:?}")]
    Rules(Vec<crate::config::Problem>),
    #[error("[auth] password_file was not read (load the config from its file)")]
    NotLoaded,
}

impl Default for Auth {
    /// `[auth]`'s defaults: anonymous from loopback, no passwords, no rules.
    fn default() -> Auth {
        let config = AuthConfig::default();
        Auth {
            checks: Arc::new(Semaphore::new(config.max_password_checks.max(1))),
            config,
            rules: Rules::default(),
            credentials: None,
        }
    }
}

impl Auth {
    /// The defaults with another anonymous policy: for a listener started on its own.
    pub fn with_anonymous(anonymous: Anonymous) -> Auth {
        let mut auth = Auth::default();
        auth.config.anonymous = anonymous;
        auth
    }

    /// Compiles the rules; `passwords` are the password file's entries (read at load).
    pub fn new(
        config: &AuthConfig,
        passwords: Option<&Loaded<Credentials>>,
    ) -> Result<Auth, AuthError> {
        let mut problems = Problems::default();
        let rules = Rules::new(&config.rules, "auth", &mut problems);
        if !problems.is_empty() {
            return Err(AuthError::Rules(problems.0));
        }
        let credentials = match (&config.password_file, passwords) {
            (Some(_), Some(passwords)) => Some(passwords.get().clone()),
            (Some(_), None) => return Err(AuthError::NotLoaded),
            (None, _) => None,
        };
        Ok(Auth {
            config: config.clone(),
            rules,
            credentials,
            checks: Arc::new(Semaphore::new(config.max_password_checks.max(1))),
        })
    }

    /// Decides whether a CONNECT is accepted, and as whom.
    pub async fn authenticate(&self, claim: &Claim<'_>) -> Result<Identity, Failure> {
        let mut identity = Identity {
            kind: Kind::Anonymous,
            client_id: claim.client_id.to_owned(),
            username: None,
            cert_cn: None,
        };
        if claim.password.is_some() && claim.username.is_none() {
            return Err(Failure::Credentials("password_without_username"));
        }
        if let Some(username) = claim.username {
            let Some(credentials) = &self.credentials else {
                return Err(Failure::Credentials("no_password_file"));
            };
            let password = claim.password.unwrap_or_default().to_vec();
            let ok = self.verify(credentials.clone(), username, password).await?;
            if !ok {
                return Err(Failure::Credentials(if credentials.contains(username) {
                    "bad_password"
                } else {
                    "unknown_user"
                }));
            }
            identity.kind = Kind::Password;
            identity.username = Some(username.to_owned());
        }
        if let Some(cert) = claim.cert {
            let ids: &[String] = match self.config.cert_identity {
                CertField::Cn => cert.cn.as_slice(),
                CertField::SanDns => &cert.san_dns,
                CertField::SanEmail => &cert.san_email,
                CertField::SanUri => &cert.san_uri,
            };
            let Some(first) = ids.first() else {
                return Err(Failure::NotAuthorized("no_certificate_identity"));
            };
            match self.config.cert_client_id {
                ClientIdPolicy::Replace => identity.client_id = first.clone(),
                // An empty client id asks the server for one: the certificate's.
                ClientIdPolicy::Match if claim.client_id.is_empty() => {
                    identity.client_id = first.clone();
                }
                ClientIdPolicy::Match => {
                    if !ids.iter().any(|id| id == claim.client_id) {
                        return Err(Failure::NotAuthorized("client_id_mismatch"));
                    }
                }
            }
            identity.kind = Kind::Certificate;
            identity.cert_cn = cert.cn.clone();
        }
        if identity.kind == Kind::Anonymous && !self.config.anonymous.admits(claim.peer.ip()) {
            return Err(Failure::NotAuthorized("anonymous"));
        }
        Ok(identity)
    }

    /// Runs argon2 off the reactor, at most `max_password_checks` at once.
    async fn verify(
        &self,
        credentials: Arc<Credentials>,
        username: &str,
        password: Vec<u8>,
    ) -> Result<bool, Failure> {
        let Ok(_permit) = self.checks.clone().acquire_owned().await else {
            return Err(Failure::Credentials("internal"));
        };
        let username = username.to_owned();
        tokio::task::spawn_blocking(move || credentials.verify(&username, &password))
            .await
            .map_err(|_| Failure::Credentials("internal"))
    }

    pub fn may_publish(&self, identity: &Identity, topic: &str) -> bool {
        self.rules.may_publish(identity, topic)
    }

    pub fn may_subscribe(&self, identity: &Identity, filter: &str) -> bool {
        self.rules.may_subscribe(identity, filter)
    }

    pub fn anonymous(&self) -> Anonymous {
        self.config.anonymous
    }
}

/// `[auth]` changes on reload: connections take the value in force at CONNECT and keep it,
/// CoAP requests each read it.
impl Reloadable for Auth {
    const KEYS: &'static [&'static str] = &["auth"];
    type Error = AuthError;

    fn build(config: &Config) -> Result<Arc<Auth>, AuthError> {
        Auth::new(&config.auth, config.files.passwords.as_ref()).map(Arc::new)
    }

    fn reloaded(&self, config: &Config) {
        let users = self.credentials.as_ref().map_or(0, |c| c.len());
        tracing::info!(
            rules = config.auth.rules.len(),
            users,
            "Reloaded [auth]: rules and password file."
        );
    }

    fn kept(error: &dyn std::fmt::Display) {
        tracing::error!(%error, "Kept the [auth] rules and passwords in force: the new ones are unusable.");
    }
}
