//! Connection flood limits, checked right after `accept` and before anything is read: new
//! connections per second (all addresses, and per IP address) and concurrent connections per
//! IP address. A refused socket is closed at once and counted; it costs one accept.
//!
//! Rates are token buckets whose burst equals the per-second rate. Per-address state is
//! created only for connections the global bucket admitted, and forgotten once the address
//! has no connection open and its bucket has refilled, so the table stays bounded by about
//! one second of admitted connections plus the open ones.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Rate,
    RatePerAddress,
    PerAddress,
}

impl Over {
    pub fn reason(self) -> &'static str {
        match self {
            Over::Rate => "rate",
            Over::RatePerAddress => "rate_per_address",
            Over::PerAddress => "per_address",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: rate,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
    }
}

struct Address {
    bucket: Bucket,
    open: usize,
}

struct State {
    global: Bucket,
    addresses: HashMap<IpAddr, Address>,
    /// Table size after the last sweep; the next sweep runs when it has doubled.
    swept_at: usize,
}

pub struct Limiter {
    rate: f64,
    rate_per_address: f64,
    max_per_address: usize,
    state: Mutex<State>,
}

/// An admitted connection's slot; dropping it frees the address's concurrent count.
pub struct Admitted {
    limiter: Arc<Limiter>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.limiter.lock();
        if let Some(a) = state.addresses.get_mut(&self.ip) {
            a.open = a.open.saturating_sub(1);
        }
    }
}

impl Limiter {
    pub fn new(rate: u32, rate_per_address: u32, max_per_address: usize) -> Arc<Limiter> {
        let now = Instant::now();
        Arc::new(Limiter {
            rate: f64::from(rate.max(1)),
            rate_per_address: f64::from(rate_per_address.max(1)),
            max_per_address: max_per_address.max(1),
            state: Mutex::new(State {
                global: Bucket::full(f64::from(rate.max(1)), now),
                addresses: HashMap::new(),
                swept_at: 1024,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip`, or says which limit it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Over> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Admitted, Over> {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(a) = state.addresses.get_mut(&ip) {
            if a.open >= self.max_per_address {
                return Err(Over::PerAddress);
            }
            a.bucket.refill(self.rate_per_address, now);
            if a.bucket.tokens < 1.0 {
                return Err(Over::RatePerAddress);
            }
        }
        state.global.refill(self.rate, now);
        if state.global.tokens < 1.0 {
            return Err(Over::Rate);
        }
        state.global.tokens -= 1.0;
        let rate_per_address = self.rate_per_address;
        let a = state.addresses.entry(ip).or_insert_with(|| Address {
            bucket: Bucket::full(rate_per_address, now),
            open: 0,
        });
        a.bucket.tokens -= 1.0;
        a.open += 1;
        if state.addresses.len() >= state.swept_at.saturating_mul(2) {
            state.addresses.retain(|_, a| {
                a.bucket.refill(rate_per_address, now);
                a.open > 0 || a.bucket.tokens < rate_per_address
            });
            state.swept_at = state.addresses.len().max(1024);
        }
        Ok(Admitted {
            limiter: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().addresses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn concurrent_per_address_is_capped_and_freed_on_drop() {
        let limiter = Limiter::new(1000, 1000, 2);
        let now = Instant::now();
        let a = limiter.admit_at(ip(1), now).expect("first");
        let _b = limiter.admit_at(ip(1), now).expect("second");
        assert_eq!(limiter.admit_at(ip(1), now).err(), Some(Over::PerAddress));
        assert!(limiter.admit_at(ip(2), now).is_ok());
        drop(a);
        assert!(limiter.admit_at(ip(1), now).is_ok());
    }

    #[test]
    fn rates_refill_over_time() {
        let limiter = Limiter::new(3, 2, 100);
        let now = Instant::now();
        let mut held = Vec::new();
        held.push(limiter.admit_at(ip(1), now).expect("1"));
        held.push(limiter.admit_at(ip(1), now).expect("2"));
        assert_eq!(
            limiter.admit_at(ip(1), now).err(),
            Some(Over::RatePerAddress)
        );
        held.push(limiter.admit_at(ip(2), now).expect("3"));
        assert_eq!(limiter.admit_at(ip(3), now).err(), Some(Over::Rate));
        let later = now + Duration::from_secs(1);
        held.push(limiter.admit_at(ip(1), later).expect("refilled"));
    }

    #[test]
    fn idle_addresses_are_forgotten() {
        let limiter = Limiter::new(1_000_000, 10, 10);
        let mut now = Instant::now();
        for n in 0..10_000 {
            now += Duration::from_millis(1);
            drop(limiter.admit_at(ip(n), now).expect("admitted"));
        }
        assert!(limiter.tracked() < 5_000, "{}", limiter.tracked());
    }
}
