//! The glue between librdkafka's callbacks (on its own threads) and the forwarder task:
//! delivery reports go into a channel, errors and statistics drive the link state, and
//! librdkafka's log lines go to `tracing` at levels that do not flood the journal during an
//! outage.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{mpsc, watch};

use super::{LinkState, classify, metric};

/// Travels with each message through librdkafka and comes back in its delivery report.
#[derive(Debug)]
pub struct Tag {
    pub seq: u64,
    /// Which send of the record this is; a report for an older send is stale.
    pub attempt: u32,
}

/// One delivery report, as the forwarder task sees it.
#[derive(Debug)]
pub struct Delivery {
    pub seq: u64,
    pub attempt: u32,
    pub result: Result<(), RDKafkaErrorCode>,
    /// Failed, but Kafka may have written it (see [`super::persisted`]).
    pub possibly_persisted: bool,
}

/// The context of one producer instance.
pub struct ForwardContext {
    /// Delivery reports for the forwarder task. Unbounded, but never holds more than the
    /// window: one report per record in flight.
    pub deliveries: mpsc::UnboundedSender<Delivery>,
    /// Shared by every producer instance the forwarder creates.
    pub link: Arc<LinkTracker>,
    /// This instance's own view of its brokers, from its statistics.
    pub health: Arc<ClientHealth>,
}

/// What one librdkafka client's statistics say about it, for the forwarder's liveness
/// checks. Written on librdkafka's polling thread, read by the forwarder task.
#[derive(Debug, Default)]
pub struct ClientHealth {
    /// Statistics reports received: librdkafka's main thread is alive and serving timers.
    reports: AtomicU64,
    /// Brokers the client knows (bootstrap or learned), not counting its internal one. Zero
    /// means it can never reach Kafka again by itself: see [`ClientHealth::orphaned`].
    brokers: AtomicUsize,
    /// Distinct brokers (by node id) the client has learned, per the last report; before
    /// the first report, the number of bootstrap brokers configured.
    nodes: AtomicUsize,
    /// Bytes written to and read from broker connections since the client was created.
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    /// Statistics reports in a row with no broker connected and one failing.
    unconnected_reports: AtomicU32,
    /// Statistics reports in a row with no broker connection UP (a transaction
    /// coordinator's own connection does not count: see [`ClientHealth::stranded`]).
    reports_without_up: AtomicU32,
    /// The brokers of the last report with their states and how long they have been in
    /// them, for the line that reports a stalled producer.
    states: Mutex<String>,
    /// Connection attempts (librdkafka's `connects`, summed over the brokers) per the last
    /// report.
    connects: AtomicU64,
    /// Connection attempts made in report intervals that ended with no broker connection UP:
    /// see [`ClientHealth::failed_connects`].
    failed_connects: AtomicU64,
}

/// How long the brokers must have been answering (the link up) before a client with work
/// waiting and no connection in its last two reports is stranded (see
/// [`ClientHealth::stranded`]): a client that needs a connection has one within its
/// reconnect back-off (1 s at most), and two statistics reports (every 2 s) span that.
const STRANDED_AFTER: std::time::Duration = std::time::Duration::from_secs(4);

impl ClientHealth {
    /// A client bootstrapped from `bootstrap_brokers` addresses.
    pub fn new(bootstrap_brokers: usize) -> ClientHealth {
        ClientHealth {
            nodes: AtomicUsize::new(bootstrap_brokers),
            ..ClientHealth::default()
        }
    }

    fn update(&self, statistics: &Statistics) {
        let real = statistics
            .brokers
            .values()
            .filter(|b| b.source != "internal" && b.source != "logical");
        let (mut brokers, mut tx, mut rx, mut connected, mut connects) = (0, 0, 0, false, 0);
        let mut nodes = std::collections::BTreeSet::new();
        let mut states = String::new();
        for b in real {
            use std::fmt::Write as _;
            let _ = write!(
                states,
                "{}{} {} {:.1}s",
                if states.is_empty() { "" } else { ", " },
                b.name,
                b.state,
                b.stateage as f64 / 1e6
            );
            brokers += 1;
            tx += b.txbytes;
            rx += b.rxbytes;
            connected |= b.state == "UP";
            connects += u64::try_from(b.connects.unwrap_or(0)).unwrap_or(0);
            // Bootstrap entries have no node id, and may be the same broker as a learned one.
            if b.nodeid >= 0 {
                nodes.insert(b.nodeid);
            }
        }
        if connected {
            self.reports_without_up.store(0, Ordering::Relaxed);
        } else {
            self.reports_without_up.fetch_add(1, Ordering::Relaxed);
        }
        *self.states.lock().unwrap_or_else(|e| e.into_inner()) = states;
        let before = self.connects.swap(connects, Ordering::Relaxed);
        if !connected && connects > before {
            self.failed_connects
                .fetch_add(connects - before, Ordering::Relaxed);
        }
        self.brokers.store(brokers, Ordering::Relaxed);
        self.nodes.store(nodes.len(), Ordering::Relaxed);
        self.tx_bytes.store(tx, Ordering::Relaxed);
        self.rx_bytes.store(rx, Ordering::Relaxed);
        self.reports.fetch_add(1, Ordering::Release);
    }

    /// Statistics reports so far.
    pub fn reports(&self) -> u64 {
        self.reports.load(Ordering::Acquire)
    }

    /// The client has forgotten every broker it knew. librdkafka 2.10 and later decommission
    /// the brokers a Metadata response does not list, and a broker in controlled shutdown
    /// answers with an empty broker list (librdkafka issue 5301): with one broker, or with
    /// every broker restarting, nothing is left. No broker means no Metadata request, and
    /// librdkafka re-bootstraps only after one failed or after "all brokers down", which a
    /// client without brokers never reports, so it stays that way for good: no connection,
    /// no delivery, no error, no link event.
    pub fn orphaned(&self) -> bool {
        self.reports() > 0 && self.brokers.load(Ordering::Relaxed) == 0
    }

    /// The client has had no broker connection in its last two reports although the link
    /// has been up for [`STRANDED_AFTER`] (`up_for`). Asked only while a transaction call
    /// waits on the client, which needs a broker for it (the group coordinator takes the
    /// position; metadata and coordinator lookups go to any broker): it cannot reach the
    /// brokers by itself. That is an orphan [`ClientHealth::orphaned`] cannot see. A broker
    /// being decommissioned (librdkafka issue 5301) stays in the statistics, never to
    /// connect again, for as long as something holds a reference to it (the coordinator
    /// cache does), so the client still seems to know one; and it keeps the client from
    /// picking another broker to connect to. CI caught a transactional producer that way
    /// for two minutes after a broker's controlled shutdown: its only broker decommissioned
    /// but lingering, its transaction coordinator waiting for an address it could look up
    /// only through a broker. Its coordinator connection can be UP meanwhile (its address
    /// kept) while the position waits on the lingering broker as the group coordinator, the
    /// hang librdkafka issues 5456 and 5511 describe; a broker connection coming UP makes
    /// librdkafka look that coordinator up again.
    pub fn stranded(&self, up_for: Option<std::time::Duration>) -> bool {
        self.reports_without_up.load(Ordering::Relaxed) >= 2
            && up_for.is_some_and(|d| d >= STRANDED_AFTER)
    }

    /// The brokers of the last report, each with its state and the seconds it has been in
    /// it ("127.0.0.1:9092/1 UP 12.0s, ...").
    pub fn broker_states(&self) -> String {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connection attempts the client made in report intervals that ended without any
    /// broker connection UP: it tried to reach Kafka and could not (refused, reset, timed
    /// out, or connected and lost again). Counts only up; for the liveness watch.
    pub fn failed_connects(&self) -> u64 {
        self.failed_connects.load(Ordering::Relaxed)
    }

    /// Bytes moved over broker connections (both directions) per the last report.
    pub fn bytes_moved(&self) -> u64 {
        self.tx_bytes.load(Ordering::Relaxed) + self.rx_bytes.load(Ordering::Relaxed)
    }

    /// Distinct brokers learned from metadata per the last report (before the first one,
    /// the bootstrap brokers configured).
    pub fn nodes(&self) -> usize {
        self.nodes.load(Ordering::Relaxed)
    }

    /// Brokers known per the last report.
    pub fn brokers(&self) -> usize {
        self.brokers.load(Ordering::Relaxed)
    }
}

impl ClientContext for ForwardContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}");
            }
            // Connection failures are reported per attempt; the link state reports them
            // once per transition instead.
            RDKafkaLogLevel::Error if fac == "FAIL" || fac == "ERROR" => {
                tracing::debug!(target: "librdkafka", facility = fac, "{message}");
            }
            RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}")
            }
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    /// Besides the error callback, the link state follows the broker states every report:
    /// librdkafka suppresses an error identical to the last one within 30 s, so a quick
    /// second outage with the same "connection refused" never reaches the error callback.
    ///
    /// A transaction coordinator's connection (a "logical" broker) counts both ways: its
    /// coming UP ends an outage ([`any_news_of_up`]), and its failing, with no broker UP,
    /// is one. A producer with nothing to send keeps only that connection: after a broker's
    /// controlled shutdown has left its partition without a leader, its learned broker is
    /// not needed and never shows as failing, and the same "connection refused" as an
    /// outage a few seconds before never reaches the error callback (CI:
    /// `faults::quick_restarts_exactly_once` missed an outage that way, and the hang watch
    /// took a position call waiting it out for a hung one).
    ///
    /// Both ways, only news counts ([`news_of_down`]): a connection failing since before
    /// the link was found up says nothing about it. Another source (a delivery, a commit,
    /// the probe's own client) found the brokers answering after that connection last
    /// changed, and a connection that is still trying changes state at every attempt. The
    /// one that does not is a coordinator connection waiting for the coordinator's address,
    /// which the client looks up only through another broker: taken for an outage, it made
    /// the link flap down a report after every probe that found it up (CI, the same test).
    ///
    /// A coordinator connection is not failing when librdkafka closed it itself to look the
    /// coordinator up again: a broker shutting down, or just restarted and still loading
    /// the transaction state, answers "not coordinator", and the client clears the address
    /// and closes the connection (a fresh `TRY_CONNECT`, no address), then sets the address
    /// it finds and closes it again (a fresh `TRY_CONNECT` that may wait out its reconnect
    /// back-off). Without an address it is left out ([`awaiting_address`]); with one, its
    /// state cannot be told from a refused attempt's, so a coordinator connection alone
    /// makes an outage only in a second report in a row: a refused one is failing afresh in
    /// every report, a re-pointed one is UP by the next. CI:
    /// `faults::quick_restarts_exactly_once` saw the link go down 190 ms after it was found
    /// up, on the coordinator's fresh `TRY_CONNECT` alone, and up again a second later.
    ///
    /// The ages are as of the report, which may have waited in librdkafka's queue for a
    /// busy polling thread; they are compared with the link's own times as of now
    /// ([`report_lag_us`]).
    fn stats(&self, statistics: Statistics) {
        self.health.update(&statistics);
        let lag = report_lag_us(statistics.ts);
        let connections = || {
            statistics
                .brokers
                .values()
                .filter(|b| b.source != "internal")
        };
        if any_news_of_up(statistics.brokers.values(), lag, self.link.down_for()) {
            self.health.unconnected_reports.store(0, Ordering::Relaxed);
            self.link.up();
        } else if let Some(b) = {
            let up_for = self.link.up_for();
            // A broker's own connection names the outage better than a coordinator's.
            connections()
                .filter(|b| !awaiting_address(b))
                .filter(|b| news_of_down(&b.state, b.stateage.saturating_add(lag), up_for))
                .min_by_key(|b| b.source == "logical")
        } {
            // With several brokers, a leader moving during a broker's restart can leave the
            // client without a connection for a report or so while the others answer (it
            // connects only to the brokers it needs): two reports in a row make an outage.
            // Every broker unreachable is also reported at once by the error callback.
            let reports = self
                .health
                .unconnected_reports
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            let sole_broker = self.health.nodes() <= 1 && b.source != "logical";
            if sole_broker || reports >= 2 {
                self.link.down(&format!(
                    "{}: no connection to any broker (state {})",
                    b.name, b.state
                ));
            }
        } else {
            self.health.unconnected_reports.store(0, Ordering::Relaxed);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error
            .rdkafka_error_code()
            .unwrap_or(RDKafkaErrorCode::Unknown);
        metric::client_error(classify::kind(code));
        if code == RDKafkaErrorCode::Fatal {
            self.link.fatal(reason);
        } else if classify::is_refusal(code) {
            self.link.refused(reason);
        } else if code == RDKafkaErrorCode::BrokerTransportFailure && self.health.nodes() > 1 {
            // One broker of a cluster went away: librdkafka moves to the others (a new
            // leader) by itself. Connections are sparse (the producer connects to leaders
            // only), so the others need not be connected to be fine. The link is down when
            // none answers: "all brokers down", or the statistics (no broker UP, one failing).
            tracing::debug!(error = %error, reason, "Kafka client error; other brokers are up.");
        } else if classify::is_link_error(code) {
            tracing::debug!(error = %error, reason, "Kafka client error.");
            self.link.down(reason);
        } else {
            tracing::debug!(error = %error, reason, "Kafka client error.");
        }
    }
}

impl ProducerContext for ForwardContext {
    type DeliveryOpaque = Box<Tag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Box<Tag>) {
        let (result, possibly_persisted) = match result {
            Ok(_) => {
                // Here, not in the forwarder task: on librdkafka's thread, in order with
                // its error events, so a late report cannot flip a fresh "down" back up.
                self.link.up();
                (Ok(()), false)
            }
            Err((e, message)) => (
                Err(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Unknown)),
                super::persisted::possibly(message),
            ),
        };
        // The receiver is gone only when the forwarder has stopped; the record stays in the
        // log and is sent again after the restart.
        let _ = self.deliveries.send(Delivery {
            seq: tag.seq,
            attempt: tag.attempt,
            result,
            possibly_persisted,
        });
    }
}

/// A broker state (with its age in microseconds) that means the connection failed: it
/// went down, waits to retry, or has been trying to connect, authenticate or negotiate for
/// longer than a healthy broker takes. `INIT` (never needed yet) is not a failure.
fn failing(state: &str, age_us: i64) -> bool {
    const SLOW_US: i64 = 5_000_000;
    match state {
        "DOWN" | "TRY_CONNECT" => true,
        "UP" | "UPDATE" | "INIT" => false,
        _ => age_us > SLOW_US,
    }
}

/// A transaction or group coordinator's connection (a "logical" broker) that has no broker
/// address: the client lost the coordinator and has not found it again. It is not trying
/// to connect, so its state says nothing about the network.
fn awaiting_address(b: &rdkafka::statistics::Broker) -> bool {
    b.source == "logical" && b.nodename.is_empty()
}

/// How long ago, in microseconds, librdkafka made the report stamped `ts` (its monotonic
/// clock, `CLOCK_MONOTONIC` in microseconds on Linux). The report waits in the client's
/// queue until the polling thread serves it, and its states' ages are as of `ts`.
fn report_lag_us(ts: i64) -> i64 {
    monotonic_us().saturating_sub(ts).max(0)
}

/// librdkafka's clock (`rd_clock`): `CLOCK_MONOTONIC` in microseconds.
fn monotonic_us() -> i64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // `Nsecs` is a `c_long` on 32-bit ARM with the libc backend.
    now.tv_sec.saturating_mul(1_000_000) + now.tv_nsec as i64 / 1_000
}

/// Whether a broker in `state` for `age_us` microseconds says the link is down, the link
/// having been up for `up_for`: it is failing, and has changed state since the link was
/// found up (the mirror of [`news_of_up`]).
fn news_of_down(state: &str, age_us: i64, up_for: Option<std::time::Duration>) -> bool {
    failing(state, age_us) && up_for.is_none_or(|u| i128::from(age_us) < u.as_micros() as i128)
}

/// Whether one of `brokers`, as reported `lag_us` ago, says the link is up, the link having
/// been down for `down_for`.
/// A transactional producer's coordinator (a "logical" broker: a connection of its own to a
/// real one) counts: it reconnects by itself, while a producer with nothing to send may not
/// reconnect to any other broker for minutes (a partition left without a leader by the
/// broker's shutdown is not looked up again until a record needs it, or the 5-minute
/// metadata refresh), and a commit waiting for the link would wait that long.
fn any_news_of_up<'a>(
    brokers: impl IntoIterator<Item = &'a rdkafka::statistics::Broker>,
    lag_us: i64,
    down_for: Option<std::time::Duration>,
) -> bool {
    brokers
        .into_iter()
        .filter(|b| b.source != "internal")
        .any(|b| news_of_up(&b.state, b.stateage.saturating_add(lag_us), down_for))
}

/// Whether a broker in `state` for `age_us` microseconds says the link is up, the link
/// having been down for `down_for`. A connection UP since before the link was found down is
/// no news: a frozen (SIGSTOPped) broker keeps its connections UP until their requests time
/// out, after a metadata probe over them has already failed.
fn news_of_up(state: &str, age_us: i64, down_for: Option<std::time::Duration>) -> bool {
    state == "UP" && down_for.is_none_or(|d| i128::from(age_us) < d.as_micros() as i128)
}

/// The Kafka link state, logged once per transition (WARN down with the reason, INFO up).
pub struct LinkTracker {
    state: watch::Sender<LinkState>,
    /// What was last logged (0 = nothing yet, 1 = up, 2 = down), so a gateway that never
    /// reaches Kafka still says so once. Atomic: called from librdkafka's threads.
    announced: AtomicU8,
    /// librdkafka raised a fatal error; the forwarder rebuilds the producer.
    fatal: AtomicBool,
    /// The brokers refused the gateway (TLS or SASL) since the link was last up; already
    /// logged as an ERROR.
    refused: AtomicBool,
    /// The reason of the last outage or fatal error, for `/readyz` and `edgegate status`.
    last_error: Mutex<Option<String>>,
    /// The state last announced and when (`None` before the first).
    since: Mutex<Option<(LinkState, std::time::Instant)>>,
}

impl LinkTracker {
    pub fn new() -> LinkTracker {
        let (state, _) = watch::channel(LinkState::Down);
        LinkTracker {
            state,
            announced: AtomicU8::new(0),
            fatal: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            last_error: Mutex::new(None),
            since: Mutex::new(None),
        }
    }

    /// How long the link has been down since it was found down (`None`: up, or never
    /// found down yet).
    pub fn down_for(&self) -> Option<std::time::Duration> {
        self.in_state_for(LinkState::Down)
    }

    /// How long the link has been up since it was found up (`None`: down, or never found
    /// up yet).
    pub fn up_for(&self) -> Option<std::time::Duration> {
        self.in_state_for(LinkState::Up)
    }

    fn in_state_for(&self, state: LinkState) -> Option<std::time::Duration> {
        let since = *self.since.lock().unwrap_or_else(|e| e.into_inner());
        since.and_then(|(s, t)| (s == state).then(|| t.elapsed()))
    }

    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }

    /// A broker answered or a record was delivered.
    pub fn up(&self) {
        if self.transition(LinkState::Up) {
            self.refused.store(false, Ordering::Release);
            metric::link(LinkState::Up);
            tracing::info!("Kafka link is up.");
        }
    }

    /// No broker can be reached (or authentication fails).
    pub fn down(&self, reason: &str) {
        if self.transition(LinkState::Down) {
            self.set_last_error(reason);
            metric::link(LinkState::Down);
            tracing::warn!(
                reason,
                "Kafka link is down; records stay in the log until it returns."
            );
        }
    }

    /// The brokers refused the gateway: a failed TLS handshake (unknown CA, bad or missing
    /// client certificate) or SASL authentication. librdkafka keeps retrying, but only a
    /// fixed `[kafka.tls]`/`[kafka.sasl]` (or broker) helps, so this is an ERROR, once per
    /// outage, and the reason is kept for `/readyz` even when the link was already down for
    /// another reason. Records stay in the log.
    pub fn refused(&self, reason: &str) {
        self.set_last_error(reason);
        if !self.refused.swap(true, Ordering::AcqRel) {
            tracing::error!(
                reason,
                "Kafka refused the gateway (TLS or SASL); records stay in the log until [kafka.tls] or [kafka.sasl] is fixed."
            );
        }
        self.down(reason);
    }

    pub fn fatal(&self, reason: &str) {
        if !self.fatal.swap(true, Ordering::AcqRel) {
            self.set_last_error(reason);
            tracing::error!(
                reason,
                "The Kafka producer hit a fatal error; it will be rebuilt."
            );
        }
    }

    /// The reason of the last outage or fatal error since start, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_last_error(&self, reason: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
    }

    /// Takes the fatal flag (the forwarder is about to rebuild).
    pub fn take_fatal(&self) -> bool {
        self.fatal.swap(false, Ordering::AcqRel)
    }

    fn transition(&self, to: LinkState) -> bool {
        let code = match to {
            LinkState::Up => 1,
            LinkState::Down => 2,
        };
        if self.announced.swap(code, Ordering::AcqRel) == code {
            return false;
        }
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((to, std::time::Instant::now()));
        self.state.send_replace(to);
        true
    }
}

impl Default for LinkTracker {
    fn default() -> Self {
        LinkTracker::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_transitions_are_reported_once() {
        let link = LinkTracker::new();
        let rx = link.subscribe();
        assert_eq!(*rx.borrow(), LinkState::Down);
        assert!(
            link.transition(LinkState::Down),
            "the first down is announced"
        );
        assert!(!link.transition(LinkState::Down));
        assert!(link.transition(LinkState::Up));
        assert!(!link.transition(LinkState::Up));
        assert_eq!(*rx.borrow(), LinkState::Up);
        assert!(link.transition(LinkState::Down));
        assert_eq!(*rx.borrow(), LinkState::Down);
    }

    #[test]
    fn a_connection_older_than_the_outage_does_not_end_it() {
        use std::time::Duration;
        let link = LinkTracker::new();
        assert_eq!(link.down_for(), None, "never down yet");
        assert!(news_of_up("UP", 60_000_000, None));
        link.down("the brokers do not answer a metadata request");
        std::thread::sleep(Duration::from_millis(20));
        let down_for = link.down_for();
        assert!(down_for.is_some_and(|d| d >= Duration::from_millis(20)));
        // The frozen broker's old connection: UP for 22 s, the outage found 20 ms ago.
        assert!(!news_of_up("UP", 22_000_000, down_for));
        // A connection made since.
        assert!(news_of_up("UP", 5_000, down_for));
        assert!(!news_of_up("APIVERSION_QUERY", 5_000, down_for));
        link.up();
        assert_eq!(link.down_for(), None);
    }

    /// After a broker's restart, a transactional producer waiting on a commit may have only
    /// its coordinator connected again: that ends the outage; the internal broker never does.
    #[test]
    fn a_reconnected_transaction_coordinator_ends_an_outage() {
        use rdkafka::statistics::Broker;
        use std::time::Duration;
        let broker = |source: &str, state: &str, stateage: i64| Broker {
            source: source.into(),
            state: state.into(),
            stateage,
            ..Broker::default()
        };
        let down_for = Some(Duration::from_secs(30));
        let learned_down = broker("learned", "DOWN", 25_000_000);
        let bootstrap = broker("configured", "INIT", 60_000_000);
        let internal = broker("internal", "UP", 1_000);
        let coordinator = broker("logical", "UP", 2_000_000);
        assert!(!any_news_of_up(
            [&learned_down, &bootstrap, &internal],
            0,
            down_for
        ));
        assert!(any_news_of_up(
            [&learned_down, &bootstrap, &internal, &coordinator],
            0,
            down_for
        ));
        let stale_coordinator = broker("logical", "UP", 40_000_000);
        assert!(!any_news_of_up(
            [&learned_down, &stale_coordinator],
            0,
            down_for
        ));
        assert!(
            !any_news_of_up([&coordinator], 29_000_000, down_for),
            "UP 2 s before a report made 29 s ago: before the outage"
        );
    }
    /// A producer's context on a link found up again after an outage, `up_for` ago.
    fn stats_fixture(up_for: std::time::Duration) -> (Arc<LinkTracker>, ForwardContext) {
        let link = Arc::new(LinkTracker::new());
        link.down("connection refused");
        link.up();
        std::thread::sleep(up_for);
        let (deliveries, _rx) = mpsc::unbounded_channel();
        let context = ForwardContext {
            deliveries,
            link: link.clone(),
            health: Arc::new(ClientHealth::new(1)),
        };
        (link, context)
    }

    /// A statistics report made `made_us_ago`, with brokers as (source, state, age in µs,
    /// address): a coordinator without an address has an empty one.
    fn report(made_us_ago: i64, brokers: &[(&str, &str, i64, &str)]) -> Statistics {
        use rdkafka::statistics::Broker;
        Statistics {
            ts: monotonic_us() - made_us_ago,
            brokers: brokers
                .iter()
                .map(|&(source, state, stateage, nodename)| {
                    let b = Broker {
                        name: format!("{source}-{state}"),
                        nodename: nodename.into(),
                        source: source.into(),
                        state: state.into(),
                        stateage,
                        ..Broker::default()
                    };
                    (b.name.clone(), b)
                })
                .collect(),
            ..Statistics::default()
        }
    }

    const BROKER: &str = "127.0.0.1:9092";

    /// The flap CI found: the probe's client finds the brokers answering, while the
    /// producer's coordinator connection still waits for the coordinator's address (no
    /// attempt, so no state change) and its other brokers are idle. The next report is no
    /// outage; a connection that fails after the link came up is one.
    #[test]
    fn a_connection_failing_since_before_the_link_came_up_is_no_outage() {
        use std::time::Duration;
        let (link, context) = stats_fixture(Duration::from_millis(50));
        context.stats(report(
            0,
            &[
                ("configured", "INIT", 60_000_000, BROKER),
                ("learned", "INIT", 9_000_000, BROKER),
                ("logical", "TRY_CONNECT", 8_000_000, BROKER),
            ],
        ));
        assert_eq!(link.state(), LinkState::Up, "no news: the link stays up");
        assert!(!news_of_down("TRY_CONNECT", 8_000_000, link.up_for()));
        // The coordinator tried again and was refused, and again: that is news.
        let refused = report(
            0,
            &[
                ("learned", "INIT", 9_000_000, BROKER),
                ("logical", "DOWN", 10_000, BROKER),
            ],
        );
        context.stats(refused.clone());
        assert_eq!(
            link.state(),
            LinkState::Up,
            "one report may be a re-pointing"
        );
        context.stats(refused);
        assert_eq!(link.state(), LinkState::Down);
        assert_eq!(link.up_for(), None);
        assert!(news_of_down("TRY_CONNECT", 8_000_000, link.up_for()));
        assert!(!news_of_down("UP", 10, None));
    }

    /// The flap CI found next: a broker shutting down or just restarted answers "not
    /// coordinator", and librdkafka clears the coordinator's address and closes its
    /// connection, then sets the address it finds and closes it again, to reconnect after
    /// its back-off: two fresh `TRY_CONNECT`s that wait for a lookup or a timer, not for
    /// the network. Without an address it never counts; with one, only a second report in
    /// a row counts, while a sole broker's own connection failing counts at once.
    #[test]
    fn a_coordinator_connection_closed_for_a_new_lookup_is_no_outage() {
        use std::time::Duration;
        let (link, context) = stats_fixture(Duration::from_millis(200));
        let coordinator = |address: &'static str, age: i64| {
            report(
                0,
                &[
                    ("configured", "INIT", 60_000_000, BROKER),
                    ("learned", "TRY_CONNECT", 900_000, BROKER),
                    ("logical", "TRY_CONNECT", age, address),
                ],
            )
        };
        for age in [20_000, 60_000, 100_000] {
            context.stats(coordinator("", age));
            assert_eq!(link.state(), LinkState::Up, "awaiting its address");
        }
        context.stats(coordinator(BROKER, 30_000));
        assert_eq!(link.state(), LinkState::Up, "re-pointed, in its back-off");
        // Connecting: neither up nor failing, but the two reports are no longer in a row.
        context.stats(report(0, &[("logical", "CONNECT", 10_000, BROKER)]));
        context.stats(coordinator(BROKER, 30_000));
        assert_eq!(link.state(), LinkState::Up, "a new first report");
        context.stats(coordinator(BROKER, 20_000));
        assert_eq!(
            link.state(),
            LinkState::Down,
            "refused at its address twice"
        );
        assert!(
            link.last_error()
                .is_some_and(|e| e.contains("logical-TRY_CONNECT")),
            "{:?}",
            link.last_error()
        );
        // The sole broker's own connection failing is an outage at once.
        link.up();
        std::thread::sleep(Duration::from_millis(50));
        context.stats(report(0, &[("learned", "DOWN", 1_000, BROKER)]));
        assert_eq!(link.state(), LinkState::Down);
    }

    /// A report that waited in librdkafka's queue: its ages are as of when it was made.
    /// A connection that failed 250 ms ago failed before the link was found up 100 ms ago,
    /// even when the report, made 200 ms ago, says 50 ms.
    #[test]
    fn a_report_s_ages_count_from_when_it_was_made() {
        use std::time::Duration;
        let (link, context) = stats_fixture(Duration::from_millis(100));
        context.stats(report(200_000, &[("learned", "DOWN", 50_000, BROKER)]));
        assert_eq!(link.state(), LinkState::Up, "no news: it failed before");
        context.stats(report(0, &[("learned", "DOWN", 50_000, BROKER)]));
        assert_eq!(link.state(), LinkState::Down, "it failed since");
        // An outage found now: a connection UP for 50 ms as of 200 ms ago came up before it.
        std::thread::sleep(Duration::from_millis(100));
        context.stats(report(200_000, &[("learned", "UP", 50_000, BROKER)]));
        assert_eq!(link.state(), LinkState::Down);
        context.stats(report(0, &[("learned", "UP", 50_000, BROKER)]));
        assert_eq!(link.state(), LinkState::Up);
    }

    /// CI's stranded producer: its learned broker decommissioned but lingering (INIT, never
    /// to connect), its coordinator waiting for an address or connected on its own. It still
    /// seems to know a broker, so it is no orphan; two reports without a broker connection
    /// while the link has been up for four seconds make it stranded, and one broker
    /// connection UP ends that.
    #[test]
    fn a_client_without_a_broker_connection_while_the_brokers_answer_is_stranded() {
        use rdkafka::statistics::{Broker, Statistics};
        use std::time::Duration;
        let report = |learned: &str, coordinator: &str| Statistics {
            brokers: [
                ("127.0.0.1:9092/1", "learned", learned),
                ("TxnCoordinator", "logical", coordinator),
                (":0/internal", "internal", "UP"),
            ]
            .into_iter()
            .map(|(name, source, state)| {
                let b = Broker {
                    name: name.into(),
                    source: source.into(),
                    state: state.into(),
                    ..Broker::default()
                };
                (name.to_owned(), b)
            })
            .collect(),
            ..Statistics::default()
        };
        let up_for = Some(Duration::from_secs(4));
        let health = ClientHealth::new(1);
        health.update(&report("INIT", "TRY_CONNECT"));
        assert!(!health.stranded(up_for), "one report is not enough");
        health.update(&report("INIT", "TRY_CONNECT"));
        assert!(
            !health.orphaned(),
            "the lingering broker hides it from orphaned()"
        );
        assert!(health.stranded(up_for));
        assert!(!health.stranded(None), "not while the link is down");
        assert!(
            !health.stranded(Some(Duration::from_secs(1))),
            "not within its reconnect back-off of the link coming up"
        );
        health.update(&report("INIT", "UP"));
        assert!(
            health.stranded(up_for),
            "the coordinator's own connection does not reach the group coordinator"
        );
        health.update(&report("UP", "UP"));
        assert!(!health.stranded(up_for));
    }

    /// Attempts count as failed when the report that follows them finds no connection UP;
    /// an attempt that got a connection does not.
    #[test]
    fn connection_attempts_without_a_connection_are_failures() {
        use rdkafka::statistics::{Broker, Statistics};
        let report = |state: &str, connects: i64| Statistics {
            brokers: [(
                "127.0.0.1:9092/1".to_owned(),
                Broker {
                    name: "127.0.0.1:9092/1".into(),
                    source: "learned".into(),
                    state: state.into(),
                    stateage: 800_000,
                    connects: Some(connects),
                    ..Broker::default()
                },
            )]
            .into_iter()
            .collect(),
            ..Statistics::default()
        };
        let health = ClientHealth::new(1);
        health.update(&report("UP", 1));
        assert_eq!(health.failed_connects(), 0);
        health.update(&report("TRY_CONNECT", 3));
        assert_eq!(health.failed_connects(), 2, "refused twice since");
        assert_eq!(health.broker_states(), "127.0.0.1:9092/1 TRY_CONNECT 0.8s");
        health.update(&report("TRY_CONNECT", 3));
        assert_eq!(health.failed_connects(), 2, "no attempt, no failure");
        health.update(&report("UP", 5));
        assert_eq!(health.failed_connects(), 2, "connected again");
    }

    #[test]
    fn a_refusal_is_kept_as_the_last_error_even_when_already_down() {
        let link = LinkTracker::new();
        link.down("connection refused");
        link.refused("SASL authentication error: invalid credentials");
        assert_eq!(
            link.last_error().as_deref(),
            Some("SASL authentication error: invalid credentials")
        );
        assert!(link.refused.load(Ordering::Acquire));
        link.up();
        assert!(
            !link.refused.load(Ordering::Acquire),
            "logged again after a recovery"
        );
    }

    #[test]
    fn fatal_flag_is_taken_once() {
        let link = LinkTracker::new();
        assert!(!link.take_fatal());
        link.fatal("test");
        link.fatal("test again");
        assert!(link.take_fatal());
        assert!(!link.take_fatal());
    }
}
