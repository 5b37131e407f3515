//! The gateway and glibc's allocator: how many arenas it may make, and when what was freed
//! is given back to the system.
//!
//! glibc keeps freed memory for the next allocation and returns to the system only what is
//! freed at the top of a heap (and blocks large enough to have had a mapping of their own).
//! Memory freed between live blocks stays resident: after a phase that held a lot and let it
//! go (commands held for 10,000 offline devices, then delivered while those devices
//! reconnect), the process keeps the freed pages and takes new ones for what it allocates
//! next, and its RSS is the two together. How much stays depends on where the frees fall:
//! `tools/bench-downlink` peaked at 57.8–62.5 MiB in most runs and at 65.9–68.5 MiB in 6 of
//! 63 (docs/ARCHITECTURE.md, "Giving free memory back"). [`start_giving_back`] returns
//! whole free pages every second.

// Two calls into glibc (mallopt, malloc_trim), each said why below.
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

/// How often free memory is given back: while 10,000 devices reconnect to take their
/// commands, the gateway's RSS climbs for about two seconds (`tools/bench-downlink`), and
/// with a status topic swings by several MB between give-backs a second apart (freed while
/// the outcomes go to Kafka, held by glibc until given back). Every 250 ms the bench's peak was
/// over 64 MiB in 2 of 9 runs, every second in 8 of 17, in the same hour
/// (docs/ARCHITECTURE.md, "Giving free memory back"); a call takes under a millisecond.
pub const GIVE_BACK_PERIOD: Duration = Duration::from_millis(250);

/// glibc's malloc gives threads that allocate at once arenas of their own, up to eight per
/// core, and each keeps what was freed in it. The gateway's allocating threads (the runtime's
/// workers, librdkafka's, the log's and the journals' writers) then held tens of MB it no
/// longer used: tools/bench-downlink (10,000 devices, 100,000 held commands) peaked at
/// 103 MB while holding them, 80 MB with two arenas (docs/ARCHITECTURE.md, "The downlink").
/// MALLOC_ARENA_MAX in the environment still decides when it is set. Call it first in
/// `main`, before any other thread exists.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a parameter of glibc's allocator, and this runs before
        // any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Starts a thread that gives whole free pages back to the system ([`give_back`]) every
/// [`GIVE_BACK_PERIOD`]. Where the allocator is not glibc's it starts nothing.
///
/// Every period, not only when the RSS grew: on the downlink bench, giving back only after
/// the RSS had grown by 256 KiB (looked at every 250 ms) still peaked over 64 MiB in one run
/// of twelve, every second in none of twelve (docs/ARCHITECTURE.md, "Giving free memory
/// back"). A give-back takes 0.1–0.6 ms with the 10,000 devices' state in the heap.
pub fn start_giving_back() {
    if !cfg!(target_env = "gnu") {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("give-back".into())
        .spawn(|| {
            loop {
                std::thread::sleep(GIVE_BACK_PERIOD);
                if !tracing::enabled!(tracing::Level::DEBUG) {
                    give_back();
                    continue;
                }
                let (before, started) = (resident(), Instant::now());
                give_back();
                let (after, took) = (resident(), started.elapsed());
                if let (Some(before), Some(after)) = (before, after)
                    && before >= after + (1 << 20)
                {
                    tracing::debug!(
                        before,
                        after,
                        took_us = took.as_micros() as u64,
                        "Gave free memory back to the system."
                    );
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "Cannot start the thread that gives free memory back; the gateway runs without it.");
    }
}

/// Gives every whole free page in glibc's heaps back to the system (`malloc_trim(0)`:
/// it walks each arena's free lists under that arena's lock). Nothing elsewhere.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock) and only releases
    // memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process's resident set size in bytes (`VmRSS`).
pub fn resident() -> Option<u64> {
    status_kib("self", "VmRSS:").map(|kib| kib * 1024)
}

/// A `kB` field (`VmRSS:`, `VmHWM:`) of `/proc/<process>/status`, `process` a pid or `self`.
pub fn status_kib(process: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_is_read() {
        let rss = resident().expect("/proc/self/status");
        assert!(rss > 1 << 20, "{rss}");
    }
}
