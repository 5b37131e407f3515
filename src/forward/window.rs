//! The adaptive window: how much the forwarder keeps in flight, and how long it backs off.
//!
//! The window bounds the records and bytes handed to librdkafka and not yet acknowledged by
//! Kafka. It is additive-increase/multiplicative-decrease in spirit, with a slow start:
//!
//! * it starts small and doubles each time a whole window's worth of records is delivered
//!   without trouble, up to the configured maximum;
//! * trouble (a stall longer than `delivery_timeout`, librdkafka's queue full, a broken
//!   producer) halves it, down to a floor, and arms the back-off;
//! * the back-off doubles from `retry_backoff_min` to `retry_backoff_max` with jitter and
//!   is reset by the next success.
//!
//! Live traffic never fills the window: each read returns the few records that are there
//! and they go out at once (librdkafka's short `linger.ms` is the only wait). A backlog fills
//! every read, so the window — and librdkafka's batches — grow to their maximum. The mode
//! (live or backlog) is tracked with hysteresis only to report it.
//!
//! The controller is pure (no clock, no I/O) so it is tested directly.

use std::time::Duration;

use rand::Rng;

/// Whether the forwarder is keeping up with arrivals or draining a backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    Backlog,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::Backlog => "backlog",
        }
    }
}

/// A change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub records: usize,
    pub bytes: usize,
    pub mode: Mode,
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Window {
    min_records: usize,
    max_records: usize,
    min_bytes: usize,
    max_bytes: usize,
    records: usize,
    bytes: usize,
    /// Records delivered since the window last changed size.
    credit: usize,
    mode: Mode,
    /// Consecutive reads that filled (positive) or did not fill (negative) their request.
    streak: i32,
    /// What the last log line said, to log only material changes.
    logged: (usize, Mode),
}

/// Reads in a row that must agree before the mode flips.
const MODE_STREAK: i32 = 3;
/// Smallest window as a fraction of the largest.
const FLOOR_DIVISOR: usize = 64;

impl Window {
    pub fn new(max_records: usize, max_bytes: usize) -> Window {
        let max_records = max_records.max(1);
        let max_bytes = max_bytes.max(1);
        let min_records = (max_records / FLOOR_DIVISOR).max(64).min(max_records);
        let min_bytes = (max_bytes / FLOOR_DIVISOR).max(64 << 10).min(max_bytes);
        Window {
            min_records,
            max_records,
            min_bytes,
            max_bytes,
            records: min_records,
            bytes: min_bytes,
            credit: 0,
            mode: Mode::Live,
            streak: 0,
            logged: (min_records, Mode::Live),
        }
    }

    /// (records, bytes) the forwarder may have in flight now.
    pub fn limits(&self) -> (usize, usize) {
        (self.records, self.bytes)
    }

    #[cfg(test)]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `n` records were delivered.
    pub fn on_delivered(&mut self, n: usize) -> Option<Change> {
        self.credit += n;
        if self.credit < self.records
            || (self.records == self.max_records && self.bytes == self.max_bytes)
        {
            return None;
        }
        self.credit = 0;
        self.records = (self.records * 2).min(self.max_records);
        self.bytes = (self.bytes * 2).min(self.max_bytes);
        self.material("grown after clean deliveries")
    }

    /// A stall, a full queue or a broken producer.
    pub fn on_trouble(&mut self, reason: &'static str) -> Option<Change> {
        self.credit = 0;
        self.records = (self.records / 2).max(self.min_records);
        self.bytes = (self.bytes / 2).max(self.min_bytes);
        self.material(reason)
    }

    /// A read returned; `filled` says whether it returned all that was asked for (there is
    /// more waiting in the log).
    pub fn on_read(&mut self, filled: bool) -> Option<Change> {
        self.streak = match (filled, self.streak) {
            (true, s) if s > 0 => s + 1,
            (true, _) => 1,
            (false, s) if s < 0 => s - 1,
            (false, _) => -1,
        };
        let mode = if self.streak >= MODE_STREAK {
            Mode::Backlog
        } else if self.streak <= -MODE_STREAK {
            Mode::Live
        } else {
            self.mode
        };
        if mode == self.mode {
            return None;
        }
        self.mode = mode;
        self.material(match mode {
            Mode::Backlog => "draining a backlog",
            Mode::Live => "caught up with live traffic",
        })
    }

    /// Some only when the change deserves a log line: a mode flip, a step of 4× or more
    /// since the last line, or reaching either bound.
    fn material(&mut self, reason: &'static str) -> Option<Change> {
        let (last, last_mode) = self.logged;
        let now = self.records;
        let bound = |x: usize| x == self.min_records || x == self.max_records;
        let material = last_mode != self.mode
            || now >= last.saturating_mul(4)
            || now.saturating_mul(4) <= last
            || (bound(now) && now != last);
        if !material {
            return None;
        }
        self.logged = (now, self.mode);
        Some(Change {
            records: now,
            bytes: self.bytes,
            mode: self.mode,
            reason,
        })
    }
}

/// Exponential back-off with jitter: each wait is drawn from [d/2, d] and d doubles up to
/// the maximum, so many gateways that lost the same broker do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let half = d / 2;
        let jitter = rand::rng().random_range(0..=half.as_micros().min(u64::MAX as u128) as u64);
        half + Duration::from_micros(jitter)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_small_and_doubles_on_clean_windows() {
        let mut w = Window::new(64_000, 64 << 20);
        assert_eq!(w.limits(), (1000, 1 << 20));
        assert_eq!(w.on_delivered(999), None);
        w.on_delivered(1);
        assert_eq!(w.limits(), (2000, 2 << 20));
        // Growth is slow-start: one doubling per delivered window.
        for _ in 0..10 {
            let (r, _) = w.limits();
            w.on_delivered(r);
        }
        assert_eq!(w.limits(), (64_000, 64 << 20));
    }

    #[test]
    fn trouble_halves_down_to_the_floor() {
        let mut w = Window::new(64_000, 64 << 20);
        for _ in 0..10 {
            let (r, _) = w.limits();
            w.on_delivered(r);
        }
        w.on_trouble("stall");
        assert_eq!(w.limits(), (32_000, 32 << 20));
        for _ in 0..20 {
            w.on_trouble("stall");
        }
        assert_eq!(w.limits(), (1000, 1 << 20));
        // Deliveries before the trouble do not count towards the next growth.
        w.on_delivered(999);
        assert_eq!(w.limits().0, 1000);
    }

    #[test]
    fn logs_only_material_changes() {
        let mut w = Window::new(64_000, 64 << 20);
        let mut lines = Vec::new();
        for _ in 0..10 {
            let (r, _) = w.limits();
            lines.extend(w.on_delivered(r));
        }
        // 1000 → 64000 in six doublings; lines at 4000, 16000 and the maximum.
        assert_eq!(
            lines.iter().map(|c| c.records).collect::<Vec<_>>(),
            [4000, 16_000, 64_000]
        );
        assert_eq!(w.on_trouble("stall"), None);
        assert_eq!(w.on_trouble("stall").map(|c| c.records), Some(16_000));
    }

    #[test]
    fn mode_flips_with_hysteresis() {
        let mut w = Window::new(1000, 1 << 20);
        assert_eq!(w.mode(), Mode::Live);
        assert_eq!(w.on_read(true), None);
        assert_eq!(w.on_read(true), None);
        assert_eq!(w.on_read(true).map(|c| c.mode), Some(Mode::Backlog));
        assert_eq!(w.on_read(false), None);
        assert_eq!(w.on_read(true), None);
        assert_eq!(w.on_read(false), None);
        assert_eq!(w.on_read(false), None);
        assert_eq!(w.on_read(false).map(|c| c.mode), Some(Mode::Live));
    }

    #[test]
    fn tiny_maximums_work() {
        let mut w = Window::new(1, 100);
        assert_eq!(w.limits(), (1, 100));
        w.on_trouble("stall");
        w.on_delivered(5);
        assert_eq!(w.limits(), (1, 100));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bases = [100, 200, 400, 800, 1000, 1000];
        for (w, base) in waits.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *w >= base / 2 && *w <= base,
                "{w:?} not in [{:?}, {base:?}]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
