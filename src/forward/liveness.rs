//! The forwarder's watch over its own progress: the safety net under every cause of a stuck
//! producer, known or not.
//!
//! Kafka being away is not a fault of the gateway (the log is the buffer), and neither is a
//! slow uplink. A fault is records in flight that go nowhere while Kafka answers. So:
//!
//! * **Progress** is a delivery report of any kind, bytes moving over the producer's broker
//!   connections (a slow link uploading a large batch), or having nothing in flight.
//! * After `stall_timeout` without progress, a **probe** asks the brokers for metadata
//!   through a client of its own (the stuck producer's answer would prove nothing).
//! * The probe answers: the producer is **stalled**. The worker logs an ERROR with what it
//!   saw, rebuilds the producer and sends every unfinished record again in order. The probe
//!   gets no answer: it is an outage, not a stall; probes go on at a growing interval (up
//!   to [`MAX_PROBE_INTERVAL`]) so a wedged producer is still found once Kafka returns.
//! * A stall that outlives a rebuild by another `stall_timeout` is **stuck**: the heartbeat
//!   that feeds systemd's watchdog stops, so systemd restarts the gateway as a last resort.
//!
//! The state machine is pure (the caller passes the time and the byte count), so it is
//! tested directly.

use std::time::Duration;

use tokio::time::Instant;

/// Longest wait between two probes during an outage.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(300);

/// Bytes that count as "moving": more than the metadata refreshes a stuck client still sends
/// (about 100 bytes a second each way), less than any batch of records.
pub const MOVING_BYTES: u64 = 64 * 1024;

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A broker answers but nothing moved: rebuild the producer.
    Stalled,
    /// No broker answers: an outage. Nothing to do but wait.
    Unreachable,
    /// Progress came while the probe ran: nothing to do.
    Moving,
}

#[derive(Debug)]
pub struct Liveness {
    stall_timeout: Duration,
    /// Last progress, and the connections' byte count then.
    since: Instant,
    bytes_at: u64,
    probing: bool,
    /// No probe before this.
    next_probe: Instant,
    probe_interval: Duration,
    /// When a probe first found the brokers answering while nothing moved; cleared by
    /// progress.
    stalled_since: Option<Instant>,
}

impl Liveness {
    pub fn new(stall_timeout: Duration, now: Instant) -> Liveness {
        Liveness {
            stall_timeout,
            since: now,
            bytes_at: 0,
            probing: false,
            next_probe: now,
            probe_interval: stall_timeout,
            stalled_since: None,
        }
    }

    /// A delivery report arrived (any outcome), or nothing is in flight.
    pub fn progress(&mut self, now: Instant) {
        self.since = now;
        self.stalled_since = None;
        self.probe_interval = self.stall_timeout;
        self.next_probe = now;
    }

    /// A new producer instance: its byte count starts again, and it gets a full
    /// `stall_timeout` to show progress before it is probed.
    pub fn new_producer(&mut self, now: Instant) {
        self.since = now;
        self.bytes_at = 0;
        self.next_probe = now;
    }

    /// Called twice a second. `waiting` says whether records are handed to librdkafka and
    /// not reported; `bytes` is the producer's connections' byte count. Returns true when a
    /// probe should start now.
    pub fn check(&mut self, now: Instant, waiting: bool, bytes: u64) -> bool {
        if !waiting {
            self.bytes_at = bytes;
            self.progress(now);
            return false;
        }
        if bytes < self.bytes_at || bytes - self.bytes_at >= MOVING_BYTES {
            // Bytes moved (or the count restarted): a slow link, not a stall.
            self.bytes_at = bytes;
            self.since = now;
            self.stalled_since = None;
        }
        if self.probing
            || now < self.next_probe
            || now.duration_since(self.since) < self.stall_timeout
        {
            return false;
        }
        self.probing = true;
        true
    }

    /// The probe started at `started` finished: did a broker answer?
    pub fn probed(&mut self, now: Instant, started: Instant, answered: bool) -> Verdict {
        self.probing = false;
        if self.since > started {
            return Verdict::Moving;
        }
        if answered {
            self.stalled_since.get_or_insert(now);
            self.probe_interval = self.stall_timeout;
            self.next_probe = now + self.stall_timeout;
            Verdict::Stalled
        } else {
            self.next_probe = now + self.probe_interval;
            self.probe_interval = (self.probe_interval * 2).min(MAX_PROBE_INTERVAL);
            Verdict::Unreachable
        }
    }

    /// A probe found the producer stalled and no progress has come since.
    pub fn stalled(&self) -> bool {
        self.stalled_since.is_some()
    }

    /// Stalled for longer than `stall_timeout`: a rebuild did not help. The watchdog should
    /// stop being fed.
    pub fn stuck(&self, now: Instant) -> bool {
        self.stalled_since
            .is_some_and(|at| now.duration_since(at) >= self.stall_timeout)
    }

    /// How long nothing has moved.
    pub fn quiet_for(&self, now: Instant) -> Duration {
        now.duration_since(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn at(base: Instant, secs: u64) -> Instant {
        base + Duration::from_secs(secs)
    }

    #[test]
    fn nothing_in_flight_is_never_a_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        for s in (0..600).step_by(10) {
            assert!(!l.check(at(t0, s), false, 0));
        }
        assert!(!l.stalled());
    }

    #[test]
    fn a_quiet_producer_is_probed_after_the_timeout_once_at_a_time() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        assert!(!l.check(at(t0, 59), true, 0));
        assert!(l.check(at(t0, 60), true, 0), "probe due");
        assert!(!l.check(at(t0, 61), true, 0), "one probe at a time");
        assert_eq!(l.probed(at(t0, 62), at(t0, 60), true), Verdict::Stalled);
        assert!(l.stalled());
        assert!(!l.stuck(at(t0, 62)));
        // The worker rebuilds; the new producer gets a full timeout.
        l.new_producer(at(t0, 62));
        assert!(!l.check(at(t0, 100), true, 0));
        assert!(l.stuck(at(t0, 122)), "a rebuild that did not help is stuck");
        assert!(l.check(at(t0, 122), true, 0), "and it is probed again");
    }

    #[test]
    fn any_delivery_clears_a_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        assert!(l.check(at(t0, 60), true, 0));
        assert_eq!(l.probed(at(t0, 61), at(t0, 60), true), Verdict::Stalled);
        l.progress(at(t0, 70));
        assert!(!l.stalled());
        assert!(!l.stuck(at(t0, 500)));
    }

    #[test]
    fn moving_bytes_are_a_slow_link_not_a_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        let mut bytes = 0;
        for s in (0..600).step_by(30) {
            bytes += 2 * MOVING_BYTES;
            assert!(!l.check(at(t0, s), true, bytes), "at {s}s");
        }
        // Metadata refreshes alone are not movement.
        assert!(l.check(at(t0, 630), true, bytes + 100));
    }

    #[test]
    fn an_outage_is_probed_less_and_less_often() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        let mut now = at(t0, 60);
        let mut gaps = vec![];
        let mut last = now;
        for _ in 0..8 {
            while !l.check(now, true, 0) {
                now += Duration::from_secs(1);
            }
            gaps.push(now.duration_since(last).as_secs());
            last = now;
            assert_eq!(l.probed(now, now, false), Verdict::Unreachable);
            assert!(!l.stalled());
        }
        assert_eq!(gaps, [0, 60, 120, 240, 300, 300, 300, 300]);
        // When Kafka returns and the producer does not deliver, the next probe finds it.
        while !l.check(now, true, 0) {
            now += Duration::from_secs(1);
        }
        assert_eq!(l.probed(now, now, true), Verdict::Stalled);
    }

    #[test]
    fn progress_during_a_probe_wins() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        assert!(l.check(at(t0, 60), true, 0));
        l.progress(at(t0, 61));
        assert_eq!(l.probed(at(t0, 62), at(t0, 60), true), Verdict::Moving);
        assert!(!l.stalled());
    }
}
