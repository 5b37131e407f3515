//! Faults injected on purpose, so the tests of the safety nets can make the thing they guard
//! against happen for real. Compiled only into builds with debug assertions (the tests'
//! builds, `cargo test`), and then inert unless `EDGEGATE_FAULTS` names a fault; a release
//! build, so every shipped binary, has none of it.
//!
//! `EDGEGATE_FAULTS` names the faults, comma-separated:
//!
//! - `stall-first-two-producers`: the forwarder's first two Kafka producers hold every record
//!   and send none (librdkafka's `linger.ms` at its 15-minute maximum), while the brokers
//!   answer. The liveness watch must find the first stalled and rebuild it, find the stall
//!   outlive that rebuild (`/readyz` says "stalled" all along), and rebuild again
//!   (`forward::liveness`). Two, not one: a single rebuild cures it within a few hundred
//!   milliseconds, too short for a test polling `/readyz` to be sure to see it.
//! - `stall-every-producer`: every producer does, so rebuilding does not help and the gateway
//!   must stop feeding systemd's watchdog.
//! - `hang-first-commit`: the exactly-once forwarder's first position-and-commit call never
//!   returns, as `send_offsets_to_transaction` does when its group coordinator left the
//!   cluster (librdkafka issues 5456, 5511). The forwarder must give up on it and go on with
//!   a new producer, nothing lost or sent twice (`forward::transactional`).
//! - `hang-commit-in-outage`: the first position-and-commit call begun while the Kafka link is
//!   down never returns. The hang watch waits while the link is down, so it must learn that
//!   Kafka is back although the stuck producer sends nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;

fn enabled(name: &str) -> bool {
    std::env::var("EDGEGATE_FAULTS")
        .map(|faults| faults.split(',').any(|f| f.trim() == name))
        .unwrap_or(false)
}

/// The configuration for the forwarder's `instance`-th producer (0 the first), stalled if a
/// fault says so.
pub fn producer_config(config: &ClientConfig, instance: u32) -> Option<ClientConfig> {
    let stall =
        enabled("stall-every-producer") || (instance < 2 && enabled("stall-first-two-producers"));
    if !stall {
        return None;
    }
    tracing::warn!(
        instance,
        "Fault injected: this Kafka producer will hold its records and send none."
    );
    let mut stalled = config.clone();
    stalled.set("linger.ms", "900000");
    Some(stalled)
}

/// Under `hang-first-commit`, the first call blocks the calling thread for an hour: a
/// librdkafka call that does not return; under `hang-commit-in-outage`, the first call begun
/// with the link down (`link_down`) does.
pub fn maybe_hang_commit(link_down: bool) {
    static HUNG: AtomicBool = AtomicBool::new(false);
    let hang = enabled("hang-first-commit") || (link_down && enabled("hang-commit-in-outage"));
    if hang && !HUNG.swap(true, Ordering::Relaxed) {
        tracing::warn!("Fault injected: this position-and-commit call will not return.");
        std::thread::sleep(Duration::from_secs(3600));
    }
}
