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
//! * The probe gets no answer: it is an outage, not a stall; probes go on at a growing
//!   interval (up to [`MAX_PROBE_INTERVAL`]) so a wedged producer is still found once Kafka
//!   returns.
//! * The probe answers: Kafka is there, but the producer may only just be getting back to it
//!   (a reconnect back-off of up to `reconnect_backoff_max`, a producer id to acquire, a drain
//!   to finish). It gets another `stall_timeout`; if a second probe still finds Kafka
//!   answering, nothing has moved since the first answered and the producer's own
//!   connection attempts have not failed in between (Kafka gone again from where it
//!   stands), the producer is **stalled**.
//!   The worker logs an ERROR with what it saw, rebuilds the producer and sends every
//!   unfinished record again in order.
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
    /// A broker answers but nothing has moved since a probe found it answering
    /// `stall_timeout` ago: rebuild the producer.
    Stalled,
    /// A broker answers, for the first time since nothing moved: give the producer another
    /// `stall_timeout` to use it.
    Answering,
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
    /// When a probe's answer showed the brokers answering, with nothing moving since;
    /// cleared by progress and by a probe that gets no answer.
    answering_since: Option<Instant>,
    /// When the producer was first found stalled; cleared by progress and by a probe that
    /// gets no answer.
    stalled_since: Option<Instant>,
    /// The producer's failed connection attempts so far (see [`Liveness::connects_failed`]).
    failed_connects: u64,
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
            answering_since: None,
            stalled_since: None,
            failed_connects: 0,
        }
    }

    /// A delivery report arrived (any outcome), or nothing is in flight.
    pub fn progress(&mut self, now: Instant) {
        self.since = now;
        self.answering_since = None;
        self.stalled_since = None;
        self.probe_interval = self.stall_timeout;
        self.next_probe = now;
    }

    /// A new producer instance: its byte count starts again, and it gets a full
    /// `stall_timeout` to show progress before it is probed. Kafka was answering when it
    /// was made (if it was), so one more answering probe finds it stalled too.
    pub fn new_producer(&mut self, now: Instant) {
        self.since = now;
        self.bytes_at = 0;
        self.failed_connects = 0;
        self.next_probe = now;
        if self.answering_since.is_some() {
            self.answering_since = Some(now);
        }
    }

    /// The producer's count of connection attempts made while it had no broker connection
    /// (`ClientHealth::failed_connects`), given before each [`Liveness::check`]. A rise
    /// means the producer tried to reach Kafka and could not: whatever a probe found
    /// answering before says nothing about now, so the verdict starts over (a stall needs
    /// two answers a `stall_timeout` apart with no failed attempt between them). Kafka up
    /// for a second in every ten, as in quick restarts, is an outage then, not a stall: the
    /// two probes of `faults::quick_restarts` each landed in such a second and called a
    /// producer that was being refused every second "stalled".
    pub fn connects_failed(&mut self, total: u64) {
        if total != self.failed_connects {
            self.failed_connects = total;
            self.answering_since = None;
            self.stalled_since = None;
        }
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
            self.answering_since = None;
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
        if !answered {
            self.answering_since = None;
            self.stalled_since = None;
            self.next_probe = now + self.probe_interval;
            self.probe_interval = (self.probe_interval * 2).min(MAX_PROBE_INTERVAL);
            return Verdict::Unreachable;
        }
        self.probe_interval = self.stall_timeout;
        match self.answering_since {
            Some(at) if self.since <= at && started.duration_since(at) >= self.stall_timeout => {
                self.stalled_since.get_or_insert(now);
                self.next_probe = now + self.stall_timeout;
                Verdict::Stalled
            }
            Some(at) => {
                self.next_probe = at + self.stall_timeout;
                Verdict::Answering
            }
            // From the answer, not from the probe's start: a probe may wait several seconds
            // for a broker that is still starting, and the producer deserves the whole
            // timeout with Kafka actually there.
            None => {
                self.answering_since = Some(now);
                self.next_probe = now + self.stall_timeout;
                Verdict::Answering
            }
        }
    }

    /// A probe found the producer stalled and no progress has come since.
    pub fn stalled(&self) -> bool {
        self.stalled_since.is_some()
    }

    /// Stalled for longer than `stall_timeout` with Kafka answering: a rebuild did not help.
    /// The watchdog should stop being fed.
    pub fn stuck(&self, now: Instant) -> bool {
        self.answering_since.is_some()
            && self
                .stalled_since
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

    /// Checks until a probe is due, stepping a second at a time from `now`.
    fn until_probe(l: &mut Liveness, now: &mut Instant, bytes: u64) {
        for _ in 0..10_000 {
            if l.check(*now, true, bytes) {
                return;
            }
            *now += Duration::from_secs(1);
        }
        panic!("no probe was due");
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
    fn kafka_answering_twice_a_timeout_apart_with_nothing_moving_is_a_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        assert!(!l.check(at(t0, 59), true, 0));
        assert!(l.check(at(t0, 60), true, 0), "probe due");
        assert!(!l.check(at(t0, 61), true, 0), "one probe at a time");
        assert_eq!(l.probed(at(t0, 62), at(t0, 60), true), Verdict::Answering);
        assert!(
            !l.stalled(),
            "one answer is not a stall: the producer may be reconnecting"
        );
        assert!(!l.check(at(t0, 121), true, 0));
        assert!(l.check(at(t0, 122), true, 0));
        assert_eq!(l.probed(at(t0, 123), at(t0, 122), true), Verdict::Stalled);
        assert!(l.stalled());
        assert!(!l.stuck(at(t0, 123)));
        // The worker rebuilds; the new producer gets a full timeout.
        l.new_producer(at(t0, 124));
        assert!(!l.check(at(t0, 150), true, 0));
        assert!(l.stuck(at(t0, 183)), "a rebuild that did not help is stuck");
        assert!(l.check(at(t0, 184), true, 0), "and it is probed again");
        assert_eq!(l.probed(at(t0, 185), at(t0, 184), true), Verdict::Stalled);
    }

    /// CI's quick restarts: Kafka up for about a second in every ten. Two probes a timeout
    /// apart each landed in such a second while the producer, refused every second in
    /// between, delivered nothing: not a stall. With no failed attempt between the
    /// answers it is one.
    #[test]
    fn answers_with_the_producers_connections_failing_between_them_are_no_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        l.connects_failed(3);
        assert!(l.check(at(t0, 60), true, 0));
        assert_eq!(l.probed(at(t0, 61), at(t0, 60), true), Verdict::Answering);
        for s in 62..121 {
            l.connects_failed(3 + (s - 61) / 10);
            assert!(!l.check(at(t0, s), true, 0), "at {s}s");
        }
        l.connects_failed(9);
        assert!(l.check(at(t0, 121), true, 0));
        assert_eq!(
            l.probed(at(t0, 122), at(t0, 121), true),
            Verdict::Answering,
            "Kafka went away in between"
        );
        assert!(!l.stalled());
        // Kafka stays; the producer still delivers nothing and no attempt fails: stalled.
        for s in 123..182 {
            l.connects_failed(9);
            assert!(!l.check(at(t0, s), true, 0), "at {s}s");
        }
        l.connects_failed(9);
        assert!(l.check(at(t0, 182), true, 0));
        assert_eq!(l.probed(at(t0, 183), at(t0, 182), true), Verdict::Stalled);
        assert!(l.stalled());
        // A failed attempt after the verdict: Kafka is away again, so not stuck either.
        l.connects_failed(10);
        assert!(!l.stalled());
        assert!(!l.stuck(at(t0, 300)));
    }

    #[test]
    fn a_producer_that_resumes_after_kafka_returns_is_not_stalled() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        let mut now = t0;
        // An outage: probes find nobody.
        until_probe(&mut l, &mut now, 0);
        assert_eq!(l.probed(now, now, false), Verdict::Unreachable);
        // Kafka is back; the producer waits out its reconnect back-off.
        until_probe(&mut l, &mut now, 0);
        assert_eq!(l.probed(now, now, true), Verdict::Answering);
        now += Duration::from_secs(10);
        l.progress(now);
        assert!(!l.stalled());
        assert!(!l.check(now + Duration::from_secs(30), true, 0));
    }

    #[test]
    fn a_late_answer_counts_from_when_it_came() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        assert!(l.check(at(t0, 60), true, 0));
        // The probe waited for a broker that was starting and got its answer late.
        assert_eq!(l.probed(at(t0, 70), at(t0, 60), true), Verdict::Answering);
        assert!(
            !l.check(at(t0, 120), true, 0),
            "the producer gets the whole timeout"
        );
        assert!(l.check(at(t0, 130), true, 0));
        assert_eq!(l.probed(at(t0, 131), at(t0, 130), true), Verdict::Stalled);
    }

    #[test]
    fn any_delivery_clears_a_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        let mut now = t0;
        until_probe(&mut l, &mut now, 0);
        assert_eq!(l.probed(now, now, true), Verdict::Answering);
        until_probe(&mut l, &mut now, 0);
        assert_eq!(l.probed(now, now, true), Verdict::Stalled);
        l.progress(now + Duration::from_secs(1));
        assert!(!l.stalled());
        assert!(!l.stuck(now + Duration::from_secs(500)));
    }

    #[test]
    fn an_outage_after_a_stall_is_not_stuck() {
        let t0 = Instant::now();
        let mut l = Liveness::new(T, t0);
        let mut now = t0;
        until_probe(&mut l, &mut now, 0);
        l.probed(now, now, true);
        until_probe(&mut l, &mut now, 0);
        assert_eq!(l.probed(now, now, true), Verdict::Stalled);
        l.new_producer(now);
        until_probe(&mut l, &mut now, 0);
        assert_eq!(l.probed(now, now, false), Verdict::Unreachable);
        assert!(
            !l.stuck(now + Duration::from_secs(600)),
            "Kafka went away: an outage"
        );
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
            until_probe(&mut l, &mut now, 0);
            gaps.push(now.duration_since(last).as_secs());
            last = now;
            assert_eq!(l.probed(now, now, false), Verdict::Unreachable);
            assert!(!l.stalled());
        }
        assert_eq!(gaps, [0, 60, 120, 240, 300, 300, 300, 300]);
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
