//! `gateway.toml` for one test: [`GatewayToml`], a builder with defaults for tests, written out
//! as real TOML so the gateway reads it the way it reads an operator's file.
//!
//! Defaults (what [`GatewayToml::new`] writes):
//!
//! ```toml
//! [gateway]
//! shutdown_grace = "5s"
//! [buffer]
//! dir = "log"                 # beside gateway.toml, in the test's own directory
//! segment_size = "1MiB"
//! max_size = "256MiB"
//! [mqtt]
//! listen = "127.0.0.1:0"      # every listener on port 0: the started gateway says
//! [coap]                      # which port it got
//! listen = "127.0.0.1:0"
//! [admin]
//! listen = "127.0.0.1:0"
//! [kafka]
//! brokers = ["<the run's test broker>"]   # unless the test names other brokers
//! ```
//!
//! No routes: a test adds the ones it needs ([`GatewayToml::route`],
//! [`GatewayToml::default_route`]). Any other key goes through [`GatewayToml::set`] (or one of
//! the per-section shorthands) with a typed TOML value; [`GatewayToml::raw`] merges a piece of
//! TOML text for what has no method, such as `[[auth.rules]]`.

use std::path::Path;

use toml::{Table, Value};

use super::gateway::Listening;

/// The sections in the order they are written, as in the shipped `gateway.toml`; any other
/// section a test adds comes after them.
const SECTIONS: &[&str] = &[
    "gateway",
    "buffer",
    "mqtt",
    "coap",
    "admin",
    "kafka",
    "auth",
    "routes",
    "default_route",
];

/// A broker address where nothing listens: the gateway keeps accepting and buffering, and
/// reports Kafka down.
pub const UNREACHABLE_KAFKA: &str = "127.0.0.1:1";

/// `gateway.toml` for one test; see the module docs for the defaults.
#[derive(Clone, Debug)]
pub struct GatewayToml {
    doc: Table,
}

/// Where `[kafka.sasl]` takes the password from.
#[derive(Clone, Copy, Debug)]
pub enum Password<'a> {
    /// `password = "..."`, in the config itself.
    Inline(&'a str),
    /// `password_file = "..."`, relative to the config's directory unless absolute.
    File(&'a str),
    /// `password_env = "..."`, the gateway's environment.
    Env(&'a str),
}

impl Default for GatewayToml {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayToml {
    pub fn new() -> GatewayToml {
        GatewayToml { doc: Table::new() }
            .set("gateway", "shutdown_grace", "5s")
            .set("buffer", "dir", "log")
            .buffer_sizes("1MiB", "256MiB")
            .set("mqtt", "listen", "127.0.0.1:0")
            .set("coap", "listen", "127.0.0.1:0")
            .set("admin", "listen", "127.0.0.1:0")
    }

    /// Sets `key` in `[section]` (a dotted path such as `mqtt.tls`), creating the section.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.section(section).insert(key.to_owned(), value.into());
        self
    }

    /// Removes `key` from `[section]`, so the gateway's own default applies.
    pub fn unset(mut self, section: &str, key: &str) -> GatewayToml {
        self.section(section).remove(key);
        self
    }

    /// `[gateway] id`: the prefix of every record id.
    pub fn id(self, id: &str) -> GatewayToml {
        self.set("gateway", "id", id)
    }

    pub fn shutdown_grace(self, grace: &str) -> GatewayToml {
        self.set("gateway", "shutdown_grace", grace)
    }

    pub fn buffer(self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.set("buffer", key, value)
    }

    /// `[buffer] segment_size` and `max_size`.
    pub fn buffer_sizes(self, segment: &str, max: &str) -> GatewayToml {
        self.buffer("segment_size", segment).buffer("max_size", max)
    }

    /// `[buffer.encryption]` on or off with `key_file`.
    pub fn encryption(self, enabled: bool, key_file: &Path) -> GatewayToml {
        self.set("buffer.encryption", "enabled", enabled).set(
            "buffer.encryption",
            "key_file",
            path(key_file),
        )
    }

    pub fn mqtt(self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.set("mqtt", key, value)
    }

    /// `[mqtt.tls]` enabled on `127.0.0.1:0` with a certificate and key (relative to the
    /// config's directory unless absolute); further keys through [`GatewayToml::mqtt_tls`].
    pub fn with_mqtt_tls(self, cert: &str, key: &str) -> GatewayToml {
        self.mqtt_tls("enabled", true)
            .mqtt_tls("listen", "127.0.0.1:0")
            .mqtt_tls("cert", cert)
            .mqtt_tls("key", key)
    }

    pub fn mqtt_tls(self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.set("mqtt.tls", key, value)
    }

    pub fn coap(self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.set("coap", key, value)
    }

    /// `[coap] enabled = false`: no UDP socket at all.
    pub fn without_coap(self) -> GatewayToml {
        self.unset("coap", "listen").coap("enabled", false)
    }

    /// `[admin] enabled = false`: no metrics recorder, no admin listener.
    pub fn without_admin(self) -> GatewayToml {
        self.unset("admin", "listen").set("admin", "enabled", false)
    }

    pub fn kafka(self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.set("kafka", key, value)
    }

    /// `[kafka] brokers`, instead of the run's test broker.
    pub fn kafka_brokers(self, brokers: &[&str]) -> GatewayToml {
        self.kafka("brokers", brokers.to_vec())
    }

    /// Brokers where nothing listens ([`UNREACHABLE_KAFKA`]); needs no test broker at all.
    pub fn kafka_unreachable(self) -> GatewayToml {
        self.kafka_brokers(&[UNREACHABLE_KAFKA])
    }

    /// `[kafka.tls]`: trust `ca_file`; present `client` (certificate, key) when given.
    pub fn kafka_tls(self, ca_file: &Path, client: Option<(&Path, &Path)>) -> GatewayToml {
        let with_ca = self.set("kafka.tls", "ca_file", path(ca_file));
        match client {
            Some((cert, key)) => with_ca.set("kafka.tls", "cert_file", path(cert)).set(
                "kafka.tls",
                "key_file",
                path(key),
            ),
            None => with_ca,
        }
    }

    /// `[kafka.sasl]` with a mechanism, a username and where the password comes from.
    pub fn kafka_sasl(self, mechanism: &str, username: &str, password: Password) -> GatewayToml {
        let (key, value) = match password {
            Password::Inline(p) => ("password", p),
            Password::File(f) => ("password_file", f),
            Password::Env(name) => ("password_env", name),
        };
        self.set("kafka.sasl", "mechanism", mechanism)
            .set("kafka.sasl", "username", username)
            .set("kafka.sasl", key, value)
    }

    /// A raw librdkafka property, `[kafka.properties]`.
    pub fn kafka_property(self, key: &str, value: &str) -> GatewayToml {
        self.set("kafka.properties", key, value)
    }

    pub fn auth(self, key: &str, value: impl Into<Value>) -> GatewayToml {
        self.set("auth", key, value)
    }

    /// `[[routes]]`: `filter` to Kafka `topic`, keyed by the client id.
    pub fn route(self, filter: &str, topic: &str) -> GatewayToml {
        self.push_route(filter, topic, None)
    }

    /// `[[routes]]` with a `key` template (`{device}`, `{client_id}`, ...).
    pub fn route_keyed(self, filter: &str, topic: &str, key: &str) -> GatewayToml {
        self.push_route(filter, topic, Some(key))
    }

    /// `[default_route] topic`: where a message no route matches goes.
    pub fn default_route(self, topic: &str) -> GatewayToml {
        self.set("default_route", "topic", topic)
    }

    /// Merges a piece of TOML text: tables merge key by key, arrays of tables (`[[routes]]`,
    /// `[[auth.rules]]`) are appended to, any other value replaces the one set before.
    pub fn raw(mut self, text: &str) -> GatewayToml {
        let extra: Table = text
            .parse()
            .unwrap_or_else(|e| panic!("not TOML ({e}):\n{text}"));
        merge(&mut self.doc, extra);
        self
    }

    /// Writes the addresses the listeners got into the config, so a restart binds the same
    /// ports and `edgegate status --config` finds the admin endpoint.
    pub fn pin(self, listening: &Listening) -> GatewayToml {
        let mut pinned = self;
        if let Some(addr) = listening.mqtt {
            pinned = pinned.mqtt("listen", addr.to_string());
        }
        if let Some(addr) = listening.mqtts {
            pinned = pinned.mqtt_tls("listen", addr.to_string());
        }
        if let Some(addr) = listening.coap {
            pinned = pinned.coap("listen", addr.to_string());
        }
        if let Some(addr) = listening.admin {
            pinned = pinned.set("admin", "listen", addr.to_string());
        }
        pinned
    }

    /// Whether `[admin]` is on (the gateway's default) in this config.
    pub fn admin_enabled(&self) -> bool {
        self.get("admin", "enabled") != Some(&Value::Boolean(false))
    }

    /// The TOML text. Kafka brokers left unset become the run's test broker (started here on
    /// first use if `tools/test` did not start one).
    pub fn render(&self) -> String {
        let mut doc = self.doc.clone();
        if self.get("kafka", "brokers").is_none() {
            let kafka = doc
                .entry("kafka")
                .or_insert_with(|| Value::Table(Table::new()));
            if let Value::Table(kafka) = kafka {
                kafka.insert("brokers".into(), vec![super::bootstrap()].into());
            }
        }
        let mut order: Vec<&str> = SECTIONS.to_vec();
        order.extend(
            doc.keys()
                .map(String::as_str)
                .filter(|k| !SECTIONS.contains(k)),
        );
        let sections: Vec<String> = order
            .into_iter()
            .filter_map(|name| {
                let mut one = Table::new();
                one.insert(name.to_owned(), doc.get(name)?.clone());
                Some(
                    toml::to_string(&one)
                        .unwrap_or_else(|e| panic!("cannot write [{name}] as TOML: {e}")),
                )
            })
            .collect();
        sections.join("\n")
    }

    /// Writes [`GatewayToml::render`] to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.render())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    fn get(&self, section: &str, key: &str) -> Option<&Value> {
        let mut table = &self.doc;
        for part in section.split('.') {
            table = table.get(part)?.as_table()?;
        }
        table.get(key)
    }

    fn section(&mut self, section: &str) -> &mut Table {
        let mut table = &mut self.doc;
        for part in section.split('.') {
            let entry = table
                .entry(part)
                .or_insert_with(|| Value::Table(Table::new()));
            table = match entry {
                Value::Table(t) => t,
                other => panic!("[{section}]: `{part}` is {other:?}, not a table"),
            };
        }
        table
    }

    fn push_route(mut self, filter: &str, topic: &str, key: Option<&str>) -> GatewayToml {
        let mut route = Table::new();
        route.insert("match".into(), filter.into());
        route.insert("topic".into(), topic.into());
        if let Some(key) = key {
            route.insert("key".into(), key.into());
        }
        let routes = self
            .doc
            .entry("routes")
            .or_insert_with(|| Value::Array(Vec::new()));
        match routes {
            Value::Array(routes) => routes.push(Value::Table(route)),
            other => panic!("`routes` is {other:?}, not an array of tables"),
        }
        self
    }
}

/// A path as a TOML string; tests' temporary paths are UTF-8.
fn path(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
        .to_owned()
}

fn merge(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(old)), Value::Table(new)) => merge(old, new),
            (Some(Value::Array(old)), Value::Array(new))
                if old.iter().chain(&new).all(Value::is_table) =>
            {
                old.extend(new)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}
