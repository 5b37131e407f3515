//! `[admin]` in gateway.toml.

use serde::Deserialize;

use crate::config::problems::Problems;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve `/metrics`, `/healthz` and `/readyz`. Off, `edgegate status` has nothing to ask.
    pub enabled: bool,
    /// Address of the admin HTTP listener. Loopback by default: the endpoints carry no
    /// authentication, and Prometheus on the gateway (or an SSH tunnel) is the usual reader.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9100".into(),
        }
    }
}

impl AdminConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(
                format!("{path}.listen"),
                format!(
                    "`{}` is not an address such as \"127.0.0.1:9100\"",
                    self.listen
                ),
            );
        }
    }

    /// Where a local client (`edgegate status`) reaches the listener: a wildcard listen
    /// address is reached over loopback.
    pub fn client_addr(&self) -> Option<std::net::SocketAddr> {
        let mut addr: std::net::SocketAddr = self.listen.parse().ok()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Some(addr)
    }
}
