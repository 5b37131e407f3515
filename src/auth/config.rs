//! `[auth]` in gateway.toml.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Credentials;
use crate::config::problems::Problems;
use crate::config::{Loaded, resolve};

/// Who may connect, and with which rights.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Clients with neither a verified certificate nor a username: "never", "loopback" (only
    /// from 127.0.0.0/8 and ::1) or "always".
    pub anonymous: Anonymous,
    /// `username:argon2id-PHC-string` lines, written by `edgegate passwd`. Without it, a
    /// CONNECT carrying a username is refused.
    pub password_file: Option<PathBuf>,
    /// Which certificate field names the device: "cn", "san_dns", "san_email" or "san_uri".
    pub cert_identity: CertField,
    /// With a certificate identity, the MQTT client id must equal it ("match") or is
    /// replaced by it ("replace").
    pub cert_client_id: ClientIdPolicy,
    /// Password verifications running at once (argon2 is slow and memory-hard on purpose);
    /// more CONNECTs wait, within `[mqtt] connect_timeout`.
    pub max_password_checks: usize,
    /// Topic rights; none means every client may publish anywhere.
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anonymous {
    Never,
    Loopback,
    Always,
}

impl Anonymous {
    /// Whether an anonymous client at `ip` is let in.
    pub fn admits(self, ip: std::net::IpAddr) -> bool {
        match self {
            Anonymous::Always => true,
            Anonymous::Loopback => ip.is_loopback(),
            Anonymous::Never => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertField {
    Cn,
    SanDns,
    SanEmail,
    SanUri,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIdPolicy {
    Match,
    Replace,
}

/// `[[auth.rules]]`: topics a kind of client may publish to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// "any", "anonymous", "password" or "certificate".
    #[serde(default = "Clients::any")]
    pub clients: Clients,
    /// Only for this username.
    #[serde(default)]
    pub username: Option<String>,
    /// MQTT topic filters a client may publish to, with `{client_id}`, `{username}` and
    /// `{cert_cn}` placeholders.
    #[serde(default)]
    pub publish: Vec<String>,
    /// MQTT topic filters a client may subscribe within (a requested filter must be covered
    /// by one of them), with the same placeholders.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clients {
    Any,
    Anonymous,
    Password,
    Certificate,
}

impl Clients {
    fn any() -> Clients {
        Clients::Any
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            anonymous: Anonymous::Loopback,
            password_file: None,
            cert_identity: CertField::Cn,
            cert_client_id: ClientIdPolicy::Match,
            max_password_checks: 2,
            rules: Vec::new(),
        }
    }
}

impl AuthConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        if let Some(file) = &mut self.password_file {
            resolve(file, base);
        }
    }

    /// Reads the password file, or says why it cannot be used.
    pub(crate) fn load_files(
        &self,
        path: &str,
        problems: &mut Problems,
    ) -> Option<Loaded<Credentials>> {
        let file = self.password_file.as_ref()?;
        Credentials::load(file)
            .map_err(|e| problems.push(format!("{path}.password_file"), e.to_string()))
            .ok()
            .map(Loaded::new)
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.max_password_checks == 0 {
            problems.push(format!("{path}.max_password_checks"), "must be at least 1");
        }
        super::rules::Rules::new(&self.rules, path, problems);
    }
}
