//! Admin: what operators and systemd see of a running gateway.
//!
//! - [`server`]: the admin HTTP listener — `/metrics` (Prometheus text), `/healthz` (the
//!   process answers), `/readyz` (JSON [`Readiness`]; 200 while the gateway does its job).
//! - [`metrics`]: the process-wide Prometheus recorder, and the once-a-second refresh of the
//!   gauges that come from the log's statistics.
//! - [`notify`]: systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING).
//! - [`status`]: `edgegate status`, a client of the endpoints above.
//!
//! Everything here observes one gateway through a [`Health`]; the stages themselves count
//! their own events (one place per event), so this module adds only what no stage owns:
//! the log's gauges, the drain estimate, uptime.
//!
//! "Ready" means the log is open and every listener is still serving. Kafka being down does
//! not make the gateway unready — it is doing its job by buffering — so `/readyz` answers 200
//! with `"status": "degraded"`. A load balancer or a script sees 503 only when the gateway
//! cannot accept data (stopping, log closed, a listener gone).

pub mod config;
pub mod metrics;
pub mod notify;
pub mod server;
pub mod status;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, BrokerStats};
use crate::buffer::{Log, LogStats};
use crate::forward::{LastError, LinkState, Progress};

/// A handle on one gateway's state, for the admin endpoints and systemd. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    log: Log,
    dead_letter: Log,
    link: watch::Receiver<LinkState>,
    progress: watch::Receiver<Progress>,
    last_error: LastError,
    /// The ingest listeners' tasks: one ending before shutdown makes the gateway unready.
    listeners: TaskTracker,
    expected_listeners: usize,
    shutdown: CancellationToken,
    broker: Option<Broker>,
    started: SystemTime,
    /// Smoothed rates, updated by [`metrics::refresh`] (per gateway, not global, so several
    /// gateways in one test process each report their own).
    rates: Arc<Mutex<Rates>>,
}

/// The parts of a gateway a [`Health`] watches.
pub struct Parts {
    pub log: Log,
    pub dead_letter: Log,
    pub link: watch::Receiver<LinkState>,
    pub progress: watch::Receiver<Progress>,
    pub last_error: LastError,
    pub listeners: TaskTracker,
    pub expected_listeners: usize,
    pub shutdown: CancellationToken,
    /// The local broker, when MQTT serves.
    pub broker: Option<Broker>,
}

/// Records per second into and out of the log, exponentially smoothed.
#[derive(Debug, Default)]
struct Rates {
    last: Option<(Instant, u64, u64)>,
    appended_per_sec: f64,
    finished_per_sec: f64,
}

/// Weight of the newest one-second sample: about a 10-second memory, so the drain estimate
/// does not jump with every batch.
const RATE_WEIGHT: f64 = 0.1;

impl Health {
    pub fn new(parts: Parts) -> Health {
        Health {
            log: parts.log,
            dead_letter: parts.dead_letter,
            link: parts.link,
            progress: parts.progress,
            last_error: parts.last_error,
            listeners: parts.listeners,
            expected_listeners: parts.expected_listeners,
            shutdown: parts.shutdown,
            broker: parts.broker,
            started: SystemTime::now(),
            rates: Arc::default(),
        }
    }

    pub fn log_stats(&self) -> LogStats {
        self.log.stats()
    }

    pub fn link(&self) -> LinkState {
        *self.link.borrow()
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Feeds the rate estimates one sample; called about once a second.
    fn sample(&self, stats: &LogStats) {
        let progress = self.progress();
        let finished = progress.delivered + progress.dead_lettered;
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, appended, done)) = rates.last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 {
                let a = stored(stats).saturating_sub(appended) as f64 / secs;
                let f = finished.saturating_sub(done) as f64 / secs;
                rates.appended_per_sec += RATE_WEIGHT * (a - rates.appended_per_sec);
                rates.finished_per_sec += RATE_WEIGHT * (f - rates.finished_per_sec);
            }
        }
        rates.last = Some((now, stored(stats), finished));
    }

    /// Seconds until the backlog is gone at the current rates: zero when it is empty, `None`
    /// when it is not shrinking.
    fn drain_estimate(&self, records: u64) -> Option<f64> {
        if records == 0 {
            return Some(0.0);
        }
        let rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let net = rates.finished_per_sec - rates.appended_per_sec;
        (net > 0.01).then(|| records as f64 / net)
    }

    /// What `/readyz` answers.
    pub fn readiness(&self) -> Readiness {
        let stats = self.log.stats();
        let dead_letter = self.dead_letter.stats();
        let progress = self.progress();
        let kafka = match self.link() {
            LinkState::Up => Link::Up,
            LinkState::Down => Link::Down,
        };
        let log_open = self.log.is_open();
        let listeners = self.listeners.len();
        let status = if self.shutdown.is_cancelled() {
            Status::Stopping
        } else if !log_open || listeners < self.expected_listeners {
            Status::NotReady
        } else if progress.stalled {
            Status::Stalled
        } else if kafka == Link::Down || progress.short_of_replicas {
            Status::Degraded
        } else {
            Status::Ready
        };
        let started_at = self
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Readiness {
            status,
            kafka,
            log: LogReport {
                open: log_open,
                records: stats.records,
                bytes: stats.bytes,
                segments: stats.segments,
                oldest_age_seconds: stats.oldest_age.map(|d| d.as_secs_f64()),
                dropped_records: stats.dropped_records,
                corrupt_records: stats.corrupt_records,
                drain_seconds: self.drain_estimate(stats.records),
            },
            dead_letter: DeadLetterReport {
                records: dead_letter.records,
                bytes: dead_letter.bytes,
            },
            forwarder: ForwarderReport {
                delivered: progress.delivered,
                dead_lettered: progress.dead_lettered,
                in_flight: progress.in_flight,
            },
            listeners,
            started_at,
            uptime_seconds: self.started.elapsed().unwrap_or(Duration::ZERO).as_secs(),
            last_error: self.last_error.get(),
            broker: self.broker_stats(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    pub fn broker_stats(&self) -> Option<BrokerStats> {
        self.broker.as_ref().map(Broker::stats)
    }
}

/// Appends that became records since the log was opened: refused ones are not arrivals.
fn stored(stats: &LogStats) -> u64 {
    stats.next_seq.saturating_sub(stats.failed_appends)
}

/// The body of `/readyz`, also what `edgegate status` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Readiness {
    pub status: Status,
    pub kafka: Link,
    pub log: LogReport,
    pub dead_letter: DeadLetterReport,
    pub forwarder: ForwarderReport,
    /// Ingest listeners serving.
    pub listeners: usize,
    /// Start time, seconds since the Unix epoch.
    pub started_at: u64,
    pub uptime_seconds: u64,
    /// The reason of the last Kafka outage or fatal producer error since start.
    pub last_error: Option<String>,
    /// The local broker: sessions, subscriptions, retained and queued messages (absent from
    /// gateways older than the broker).
    #[serde(default)]
    pub broker: Option<BrokerStats>,
    pub version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepting, and Kafka is reachable.
    Ready,
    /// Accepting and buffering; Kafka is unreachable, or answers but refuses writes because
    /// a partition has fewer in-sync replicas than `min.insync.replicas` (`last_error` says
    /// which). Still ready (HTTP 200).
    Degraded,
    /// Accepting and buffering, Kafka answers, but the forwarder delivers nothing: it is
    /// being rebuilt, and if that does not help systemd's watchdog restarts the gateway.
    /// Still ready (HTTP 200: the devices' data is safe on disk), but worth a look.
    Stalled,
    /// The log is closed or a listener stopped: devices cannot deliver (HTTP 503).
    NotReady,
    /// Shutdown has begun (HTTP 503).
    Stopping,
}

impl Status {
    pub fn is_ready(self) -> bool {
        matches!(self, Status::Ready | Status::Degraded | Status::Stalled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ready => "ready",
            Status::Degraded => "degraded",
            Status::Stalled => "stalled",
            Status::NotReady => "not_ready",
            Status::Stopping => "stopping",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    Up,
    Down,
}

impl Link {
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Up => "up",
            Link::Down => "down",
        }
    }
}

/// The durable log's backlog: what is stored and not yet acknowledged by Kafka.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogReport {
    pub open: bool,
    pub records: u64,
    pub bytes: u64,
    pub segments: usize,
    /// Age of the oldest unsent record (at segment granularity when it has not been read).
    pub oldest_age_seconds: Option<f64>,
    pub dropped_records: u64,
    pub corrupt_records: u64,
    /// Estimated time to send the backlog at the current rates; `null` while it grows.
    pub drain_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterReport {
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwarderReport {
    pub delivered: u64,
    pub dead_lettered: u64,
    pub in_flight: usize,
}
