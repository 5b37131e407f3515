//! Unit tests: framing, version choice, the MQTT 5 decoder, QoS 2 deduplication.
