//! Giving freed memory back (`edgegate::memory`). A test binary of its own: it reads the
//! process's RSS, which other tests' allocations in the same process would move.

#![cfg(target_env = "gnu")]

use edgegate::memory::{give_back, resident};

const MIB: u64 = 1 << 20;

/// What the downlink's reconnect storm leaves: runs of freed blocks between blocks that
/// stay, none of it at the top of the heap, so glibc keeps all of it resident until told.
#[test]
fn free_pages_between_live_blocks_go_back_to_the_system() {
    // 24 MiB in 96 KiB runs of 4 KiB blocks, each run followed by a small block that stays.
    // Made on one thread and freed there, as the gateway's workers do.
    let mut kept = Vec::with_capacity(256);
    let mut freed = Vec::with_capacity(256 * 24);
    for run in 0..256u32 {
        for _ in 0..24 {
            freed.push(vec![run as u8; 4096]);
        }
        kept.push(vec![run as u8; 32]);
    }
    let full = resident().expect("/proc/self/status");
    drop(freed);
    let freed = resident().expect("/proc/self/status");
    assert!(
        full.saturating_sub(freed) < 4 * MIB,
        "glibc gave back {} MiB of its own: the test no longer shows anything",
        (full - freed) / MIB
    );
    give_back();
    let given = resident().expect("/proc/self/status");
    assert!(
        freed.saturating_sub(given) >= 16 * MIB,
        "RSS {} MiB before giving back, {} MiB after",
        freed / MIB,
        given / MIB
    );
    // What stayed is untouched.
    for (run, block) in kept.iter().enumerate() {
        assert!(block.iter().all(|&b| b == run as u8));
    }
}
