//! What every integration test shares: one Kafka broker per run ([`kafka`]), the admin
//! endpoint over HTTP ([`http`]) and raw MQTT packets ([`mqtt`]).

// Each test binary uses a different part of this module (and of what it re-exports).
#![allow(dead_code, unused_imports)]

pub mod http;
pub mod kafka;
pub mod mqtt;

pub use http::{admin_addr, http_get, metric};
pub use kafka::{
    Consumed, bootstrap, by_partition, client_config, consume_all, consume_all_blocking,
    create_topic, exclusive, secured, shared, unique_topic,
};
pub use mqtt::{mqtt_frame, mqtt_string};
