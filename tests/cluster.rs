//! The gateway against a real three-broker Kafka cluster (issue 14): replication factor 3,
//! `min.insync.replicas=2`, the brokers faulted for real while rumqttc devices publish QoS 1
//! through the real binary. The scenarios:
//!
//! - the leader of the topic's partition is SIGKILLed, then restarted;
//! - a broker (the leader) goes through a controlled shutdown (SIGTERM), then restarts;
//! - two brokers are down at once, below `min.insync.replicas`: the gateway keeps
//!   acknowledging devices and buffering on disk, `/readyz` says `degraded` with the reason,
//!   `/metrics` has `edgegate_kafka_short_of_replicas 1`, and the backlog drains once one
//!   broker returns;
//! - a rolling restart of all three brokers, each back in sync before the next goes.
//!
//! After each: every acknowledged message is in Kafka, first copies in per-device order;
//! duplicates (at least once allows them) are counted and printed on a `FIGURES` line; the
//! backlog drains; the link was never reported down (a broker or two answered throughout)
//! and the liveness safety net did not take a broker fault for a stalled producer.
//!
//! Each scenario runs twice: at least once, and with the gateway in `delivery =
//! "exactly_once"`, where [`check_in_kafka`] reads with `read_committed` and a single
//! duplicate fails it. One cluster for the whole target (`common::cluster`), the scenarios
//! one after another on it.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, cluster};
use common::load::{SteadyLoad, parse_payload, steady_load};
use common::{GatewayToml, Process};

/// Publishers, their pace and window: about 1,600 messages a second in all.
const DEVICES: usize = 8;
const EVERY: Duration = Duration::from_millis(5);
const WINDOW: usize = 8;
/// Longest accepted time from "the last broker is back" to "the backlog is drained".
const DRAIN_LIMIT: Duration = Duration::from_secs(90);

/// How the gateway delivers to Kafka (`[kafka] delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}

impl Delivery {
    /// What the gateway's config needs for this mode.
    fn configure(self, config: GatewayToml) -> GatewayToml {
        match self {
            Delivery::AtLeastOnce => config,
            Delivery::ExactlyOnce => config
                .kafka("delivery", "exactly_once")
                .kafka("transaction_interval", "50ms"),
        }
    }

    /// The consumer's `isolation.level` for reading the topic back.
    fn isolation_level(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "read_uncommitted",
            Delivery::ExactlyOnce => "read_committed",
        }
    }

    /// Whether the mode allows duplicates in Kafka.
    fn allows_duplicates(self) -> bool {
        match self {
            Delivery::AtLeastOnce => true,
            Delivery::ExactlyOnce => false,
        }
    }
}

/// What a scenario found.
#[derive(Debug)]
pub struct Figures {
    pub acked: usize,
    pub found: usize,
    pub missing: usize,
    pub duplicates: usize,
    /// From "the fault is over" (as the scenario says) to "the backlog is drained".
    pub drain: Duration,
}

/// One scenario's run: the gateway (the real binary) on the cluster, the load, the topic.
pub struct Scenario<'c> {
    pub name: &'static str,
    pub cluster: &'c Cluster,
    pub gateway: Process,
    pub topic: String,
    load: Option<SteadyLoad>,
    /// When the fault ended, for the drain figure.
    recovered_at: Instant,
}

impl Scenario<'_> {
    /// `/readyz`, parsed.
    pub fn readiness(&self) -> serde_json::Value {
        let (code, body) = common::http_get(self.gateway.admin_addr(), "/readyz");
        assert!(
            code == 200 || code == 503,
            "/readyz answered {code}: {body}"
        );
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz: {e}: {body}"))
    }

    /// Messages the devices have had acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.load.as_ref().map_or(0, SteadyLoad::acked)
    }

    /// The broker leading the topic's partition 0.
    pub fn leader(&self) -> u32 {
        self.cluster.leader(&self.topic, 0)
    }

    /// Marks the end of the fault: the drain is timed from here.
    pub fn recovered(&mut self) {
        self.recovered_at = Instant::now();
    }

    /// Waits up to `limit` for `/readyz` to satisfy `ok`; the last answer either way.
    pub fn wait_readiness(
        &self,
        limit: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let r = self.readiness();
            if ok(&r) {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(r);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `fault` on a fresh topic (one partition, three replicas, `min.insync.replicas=2`)
/// under steady load through a gateway in `mode`, then checks everything the module header
/// promises and returns the figures. The cluster is whole again (every replica in sync)
/// before the scenario starts and after it ends.
pub fn run_scenario(
    cluster: &Cluster,
    name: &'static str,
    mode: Delivery,
    fault: impl FnOnce(&mut Scenario<'_>),
) -> Figures {
    let topic = common::unique_topic(name);
    cluster.create_topic(&topic, 1);
    let config = GatewayToml::new()
        .id(name)
        .buffer_sizes("256KiB", "512MiB")
        .without_coap()
        .kafka_brokers(&cluster.brokers())
        // Short, so a fault taken for a stall would show within the scenario.
        .kafka("stall_timeout", "10s")
        .route_keyed("cluster/+dev/t", &topic, "{dev}");
    let gateway = common::gateway(mode.configure(config))
        .pin_addresses()
        // What the forwarder did, transaction by transaction, in the log a failure prints.
        .rust_log("info,edgegate::forward=debug")
        .start_process();
    let load = steady_load(gateway.mqtt_addr(), "cluster", DEVICES, EVERY, WINDOW);
    let mut s = Scenario {
        name,
        cluster,
        gateway,
        topic,
        load: Some(load),
        recovered_at: Instant::now(),
    };
    // Steady delivery before the fault.
    s.wait_readiness(Duration::from_secs(30), |r| {
        r["forwarder"]["delivered"].as_u64().unwrap_or(0) > 1000
    })
    .unwrap_or_else(|r| panic!("{name}: nothing delivered before the fault: {r}"));

    fault(&mut s);

    // Back in steady delivery, then stop the load.
    std::thread::sleep(Duration::from_secs(1));
    let acked = s.load.take().expect("the load runs").stop();
    let drained = s.wait_readiness(DRAIN_LIMIT, |r| {
        r["log"]["records"] == 0 && r["forwarder"]["in_flight"] == 0
    });
    let drain = s.recovered_at.elapsed();
    let log = s.gateway.log_text();
    let kept = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"));
    let _ = std::fs::write(&kept, &log);
    eprintln!("{name}: the gateway's log is in {}", kept.display());
    if let Err(r) = drained {
        panic!(
            "{name}: the backlog did not drain within {DRAIN_LIMIT:?}: {r}\n{}",
            tail(&log, 60)
        );
    }
    let r = s.readiness();
    assert_eq!(r["status"], "ready", "{name}: {r}");
    assert_eq!(r["kafka"], "up", "{name}: {r}");

    let figures = check_in_kafka(cluster, name, &s.topic, mode, &acked, drain);
    let (_, metrics) = common::http_get(s.gateway.admin_addr(), "/metrics");
    let counter = |name: &str| common::metric(&metrics, name).unwrap_or(0.0) as u64;
    eprintln!(
        "FIGURES {name}: acknowledged {}, in Kafka {}, missing {}, duplicates {}, drained {:.1} s \
         after the fault ended, safety net: stalls {} rebuilds {} rebootstraps {}",
        figures.acked,
        figures.found,
        figures.missing,
        figures.duplicates,
        figures.drain.as_secs_f64(),
        counter("edgegate_kafka_stalls_total"),
        counter("edgegate_kafka_producer_rebuilds_total"),
        counter("edgegate_kafka_rebootstraps_total"),
    );
    // Two brokers answer throughout every scenario: the link never went down (one broker
    // refusing connections is librdkafka's business, not an outage).
    let downs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Kafka link is down"))
        .collect();
    assert!(
        downs.is_empty(),
        "{name}: the link was reported down with brokers up: {downs:?}"
    );
    assert_eq!(
        counter("edgegate_kafka_stalls_total"),
        0,
        "{name}: a broker fault was taken for a stalled producer:\n{}",
        tail(&log, 80)
    );
    cluster.wait_isr(&s.topic);
    figures
}

/// Reads `topic` back from `cluster` and checks it against what the devices had
/// acknowledged (`acked[d]`: device `d`'s sequence numbers): all there, first copies in
/// per-device order, keys right; duplicates counted (and refused if `mode` allows none).
pub fn check_in_kafka(
    cluster: &Cluster,
    name: &str,
    topic: &str,
    mode: Delivery,
    acked: &[Vec<u64>],
    drain: Duration,
) -> Figures {
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(total > 0, "{name}: nothing was acknowledged");
    let mut config = cluster.client_config();
    config.set("isolation.level", mode.isolation_level());
    let records = common::kafka::consume_all_from(config, topic, total, Duration::from_secs(60));
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    let mut last: HashMap<usize, u64> = HashMap::new();
    let mut duplicates = 0;
    for record in &records {
        let payload = record.payload.as_deref().unwrap_or_default();
        let (device, seq) = parse_payload(payload)
            .unwrap_or_else(|| panic!("{name}: a foreign record: {:?}", record.payload));
        let key = record.key.as_deref().unwrap_or_default();
        assert_eq!(
            key,
            format!("dev{device}").as_bytes(),
            "key of {device}:{seq}"
        );
        if !seen.insert((device, seq)) {
            duplicates += 1;
            continue;
        }
        if let Some(&before) = last.get(&device) {
            assert!(
                seq > before,
                "{name}: dev{device}: {seq} reached Kafka after {before}"
            );
        }
        last.insert(device, seq);
    }
    let missing: Vec<(usize, u64)> = acked
        .iter()
        .enumerate()
        .flat_map(|(d, seqs)| seqs.iter().map(move |&s| (d, s)))
        .filter(|k| !seen.contains(k))
        .collect();
    let figures = Figures {
        acked: total,
        found: total - missing.len(),
        missing: missing.len(),
        duplicates,
        drain,
    };
    assert!(
        missing.is_empty(),
        "{name}: {} acknowledged messages are not in Kafka, first {:?}; {figures:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    if !mode.allows_duplicates() {
        assert_eq!(duplicates, 0, "{name}: duplicates in {mode:?} mode");
    }
    figures
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `n` more messages are acknowledged than now: the devices are served.
fn wait_acked(s: &Scenario<'_>, more: u64, limit: Duration) {
    let start = s.acked();
    let deadline = Instant::now() + limit;
    while s.acked() < start + more {
        assert!(
            Instant::now() < deadline,
            "{}: devices got {} acknowledgements in {limit:?}, wanted {more}",
            s.name,
            s.acked() - start
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the gateway has delivered 1,000 more records: a new leader took over.
fn delivers_to_a_new_leader(s: &Scenario<'_>) {
    let delivered = s.readiness()["forwarder"]["delivered"]
        .as_u64()
        .unwrap_or(0);
    s.wait_readiness(Duration::from_secs(30), |r| {
        r["forwarder"]["delivered"].as_u64().unwrap_or(0) > delivered + 1000
    })
    .unwrap_or_else(|r| panic!("{}: no delivery to the new leader: {r}", s.name));
}

#[test]
fn leader_sigkill_and_restart() {
    leader_sigkill_and_restart_in(Delivery::AtLeastOnce, "cluster-leader-kill");
}

#[test]
fn leader_sigkill_and_restart_exactly_once() {
    leader_sigkill_and_restart_in(Delivery::ExactlyOnce, "cluster-leader-kill-eos");
}

fn leader_sigkill_and_restart_in(mode: Delivery, scenario: &'static str) {
    let Some(cluster) = cluster(scenario) else {
        return;
    };
    run_scenario(&cluster, scenario, mode, |s| {
        let leader = s.leader();
        eprintln!("{}: SIGKILL broker {leader}, the leader", s.name);
        s.cluster.kill(leader);
        // The devices are served throughout: the log is the buffer.
        wait_acked(s, 2000, Duration::from_secs(10));
        // A new leader takes over within the broker session timeout (3 s) and the gateway
        // delivers to it before the old leader is back.
        delivers_to_a_new_leader(s);
        let new_leader = s.leader();
        assert_ne!(new_leader, leader, "{}: leadership did not move", s.name);
        eprintln!("{}: broker {new_leader} leads; restarting {leader}", s.name);
        s.cluster.start(leader);
        s.recovered();
        s.cluster.wait_isr(&s.topic);
    });
}

#[test]
fn controlled_shutdown_and_restart() {
    controlled_shutdown_and_restart_in(Delivery::AtLeastOnce, "cluster-controlled-shutdown");
}

#[test]
fn controlled_shutdown_and_restart_exactly_once() {
    controlled_shutdown_and_restart_in(Delivery::ExactlyOnce, "cluster-controlled-shutdown-eos");
}

fn controlled_shutdown_and_restart_in(mode: Delivery, scenario: &'static str) {
    let Some(cluster) = cluster(scenario) else {
        return;
    };
    run_scenario(&cluster, scenario, mode, |s| {
        let leader = s.leader();
        eprintln!("{}: SIGTERM broker {leader}, the leader", s.name);
        s.cluster.stop(leader);
        wait_acked(s, 2000, Duration::from_secs(10));
        delivers_to_a_new_leader(s);
        s.cluster.start(leader);
        s.recovered();
        s.cluster.wait_isr(&s.topic);
    });
}

#[test]
fn two_brokers_down_below_min_insync_replicas() {
    two_brokers_down_below_min_insync_replicas_in(Delivery::AtLeastOnce, "cluster-below-min-isr");
}

#[test]
fn two_brokers_down_below_min_insync_replicas_exactly_once() {
    two_brokers_down_below_min_insync_replicas_in(
        Delivery::ExactlyOnce,
        "cluster-below-min-isr-eos",
    );
}

fn two_brokers_down_below_min_insync_replicas_in(mode: Delivery, scenario: &'static str) {
    let Some(cluster) = cluster(scenario) else {
        return;
    };
    run_scenario(&cluster, scenario, mode, |s| {
        let leader = s.leader();
        let followers: Vec<u32> = (1..=3).filter(|&n| n != leader).collect();
        eprintln!(
            "{}: SIGKILL brokers {followers:?}; broker {leader} leads alone",
            s.name
        );
        for &n in &followers {
            s.cluster.kill(n);
        }
        // Devices are still acknowledged: the records wait in the log.
        wait_acked(s, 3000, Duration::from_secs(15));
        // Found by the forwarder's replica check (the oldest record waited 5 s), reported
        // as degraded with the reason, never as a stalled producer.
        let degraded = s
            .wait_readiness(Duration::from_secs(40), |r| r["status"] == "degraded")
            .unwrap_or_else(|r| panic!("{}: never degraded below min ISR: {r}", s.name));
        eprintln!("{}: degraded: {degraded}", s.name);
        assert_eq!(degraded["kafka"], "up", "{degraded}");
        let reason = degraded["last_error"].as_str().unwrap_or_default();
        assert!(
            reason.contains("min.insync.replicas=2"),
            "{}: reason {reason:?}",
            s.name
        );
        assert!(degraded["log"]["records"].as_u64().unwrap_or(0) > 0);
        let (_, metrics) = common::http_get(s.gateway.admin_addr(), "/metrics");
        assert_eq!(
            common::metric(&metrics, "edgegate_kafka_short_of_replicas"),
            Some(1.0),
            "{}: the gauge",
            s.name
        );
        s.gateway.wait_for_log(&["too few in-sync replicas"]);
        // Still buffering, still degraded.
        wait_acked(s, 2000, Duration::from_secs(10));
        assert_eq!(s.readiness()["status"], "degraded");

        // One broker back is enough: two replicas in sync.
        eprintln!("{}: starting broker {}", s.name, followers[0]);
        s.cluster.start(followers[0]);
        s.recovered();
        s.wait_readiness(DRAIN_LIMIT, |r| r["status"] == "ready")
            .unwrap_or_else(|r| panic!("{}: not ready with two brokers: {r}", s.name));
        s.gateway.wait_for_log(&["Kafka takes records again"]);
        let (_, metrics) = common::http_get(s.gateway.admin_addr(), "/metrics");
        assert_eq!(
            common::metric(&metrics, "edgegate_kafka_short_of_replicas"),
            Some(0.0)
        );
        s.wait_readiness(DRAIN_LIMIT, |r| {
            r["log"]["records"].as_u64().unwrap_or(u64::MAX) < 2000
        })
        .unwrap_or_else(|r| panic!("{}: the backlog did not drain: {r}", s.name));
        s.cluster.start(followers[1]);
    });
}

#[test]
fn rolling_restart_of_all_three() {
    rolling_restart_of_all_three_in(Delivery::AtLeastOnce, "cluster-rolling-restart");
}

#[test]
fn rolling_restart_of_all_three_exactly_once() {
    rolling_restart_of_all_three_in(Delivery::ExactlyOnce, "cluster-rolling-restart-eos");
}

fn rolling_restart_of_all_three_in(mode: Delivery, scenario: &'static str) {
    let Some(cluster) = cluster(scenario) else {
        return;
    };
    run_scenario(&cluster, scenario, mode, |s| {
        for n in 1..=3 {
            eprintln!(
                "{}: restarting broker {n} (leader now {})",
                s.name,
                s.leader()
            );
            s.cluster.stop(n);
            wait_acked(s, 500, Duration::from_secs(10));
            s.cluster.start(n);
            s.cluster.wait_isr(&s.topic);
        }
        s.recovered();
    });
}
