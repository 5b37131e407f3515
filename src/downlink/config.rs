//! `[[downlink]]` in gateway.toml: Kafka topics whose records become MQTT messages for the
//! devices on site.

use serde::Deserialize;

use crate::config::Duration;
use crate::config::problems::Problems;

/// Which records of the topic are this gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Address {
    /// Every record (one commands topic per gateway).
    All,
    /// Records whose header `gateway_header` equals this gateway's id (one topic per fleet).
    #[default]
    Header,
    /// Records whose key is `<gateway id>/<rest>`; `{key}` is then the rest.
    KeyPrefix,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkConfig {
    /// The Kafka topic the commands come from.
    pub topic: String,
    /// The MQTT topic each command is published to: `{key}` (the record's key, after the
    /// gateway prefix under `address = "key_prefix"`), `{header:NAME}` (a header's value),
    /// `{gateway_id}`. A value that is empty or holds `/`, `+`, `#` or U+0000 makes the
    /// command refused (reported), never a wildcard.
    pub mqtt_topic: String,
    #[serde(default)]
    pub address: Address,
    /// The header naming the gateway, under `address = "header"`.
    #[serde(default = "default_header")]
    pub gateway_header: String,
    /// QoS of the delivery to the device: 1 or 2.
    #[serde(default = "one")]
    pub qos: u8,
    /// How long a command waits for its device, from the record's timestamp; a header
    /// `edgegate-expiry` (seconds) overrides it. Also the MQTT 5 Message Expiry Interval.
    #[serde(default = "day")]
    pub ttl: Duration,
    /// The Kafka topic every command's outcome is written to (through the log, so it gets
    /// there across outages); none: outcomes are only counted.
    #[serde(default)]
    pub status_topic: Option<String>,
}

fn default_header() -> String {
    "edgegate-gateway".into()
}

fn one() -> u8 {
    1
}

fn day() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl DownlinkConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.topic.is_empty() {
            problems.push(format!("{path}.topic"), "must name a Kafka topic");
        }
        if let Err(e) = super::template::Template::parse(&self.mqtt_topic) {
            problems.push(format!("{path}.mqtt_topic"), e);
        }
        if !(1..=2).contains(&self.qos) {
            problems.push(format!("{path}.qos"), "must be 1 or 2");
        }
        if self.ttl.get().is_zero() {
            problems.push(format!("{path}.ttl"), "must be greater than zero");
        }
        if self.status_topic.as_deref().is_some_and(str::is_empty) {
            problems.push(format!("{path}.status_topic"), "must not be empty");
        }
    }
}
