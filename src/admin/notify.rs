//! systemd's notify protocol (`Type=notify`), a no-op unless `NOTIFY_SOCKET` is set.
//!
//! - `READY=1` once [`crate::start`] has returned: the log is recovered and every listener
//!   is bound.
//! - `STATUS=` with the backlog and the Kafka link, at once when the link changes and every
//!   [`STATUS_INTERVAL`] otherwise (`systemctl status` shows the latest).
//! - `WATCHDOG=1` only when `WATCHDOG_USEC` is set, and only while the gateway makes real
//!   progress: the forwarder's loop has refreshed its heartbeat *and* the log's commit thread
//!   has turned its loop since the last ping. A free-running timer would keep a wedged
//!   gateway (a commit thread stuck in fsync, a dead forwarder) alive forever. Kafka being
//!   down is not a lack of progress: the forwarder's heartbeat runs through outages. It stops
//!   when the forwarder is stuck while Kafka answers (a stall its rebuilt producer did not
//!   cure, see `forward::liveness`), so systemd restarts the gateway as a last resort.
//! - `STOPPING=1` when shutdown begins.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::Health;
use crate::forward::LinkState;

/// How often STATUS is refreshed when nothing else changed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Sends READY, then STATUS and WATCHDOG until `shutdown`, then STOPPING. Returns at once
/// when not run by systemd.
pub async fn run(health: Health, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    // Ping at least three times per watchdog period, so one missed tick (a slow fsync) is
    // not a restart.
    let tick = watchdog.map_or(Duration::from_secs(1), |w| {
        (w / 3).clamp(Duration::from_millis(50), Duration::from_secs(1))
    });
    let mut line = status_line(&health);
    send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    tracing::info!(watchdog = ?watchdog, "Told systemd the gateway is ready.");
    let mut link = health.link();
    let mut status_sent = Instant::now();
    // What the last ping was based on: a ping needs both to have moved since.
    let mut pinged = (health.log_stats().commit_loops, None);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        if watchdog.is_some() {
            let loops = health.log_stats().commit_loops;
            let heartbeat = health.progress().heartbeat;
            if loops != pinged.0 && heartbeat.is_some() && heartbeat != pinged.1 {
                send(&[NotifyState::Watchdog]);
                pinged = (loops, heartbeat);
            }
        }
        let now_link = health.link();
        if now_link != link || status_sent.elapsed() >= STATUS_INTERVAL {
            let next = status_line(&health);
            if next != line || now_link != link {
                line = next;
                send(&[NotifyState::Status(&line)]);
            }
            link = now_link;
            status_sent = Instant::now();
        }
    }
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("Stopping: finishing in-flight appends and deliveries"),
    ]);
}

/// `Buffering 1520 records (380.0 KiB), oldest 42s; Kafka down`.
fn status_line(health: &Health) -> String {
    let stats = health.log_stats();
    let kafka = match health.link() {
        _ if health.progress().stalled => "answers, forwarder STALLED",
        _ if health.progress().short_of_replicas => "answers, too few in-sync replicas",
        LinkState::Up => "up",
        LinkState::Down => "down",
    };
    let oldest = stats
        .oldest_age
        .map(|age| format!(", oldest {}", super::status::duration(age)))
        .unwrap_or_default();
    format!(
        "Buffering {} records ({}){oldest}; Kafka {kafka}",
        stats.records,
        super::status::bytes(stats.bytes),
    )
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "Cannot notify systemd.");
    }
}
