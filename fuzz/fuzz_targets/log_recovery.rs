//! A log directory left by a crash, or by a disk that lies: the input is a u16 (LE) cursor
//! length, the cursor file, then the one segment file. Opened, read to the end and appended
//! to as the gateway does at startup (`edgegate::buffer::fuzz_recovery`); errors are fine, a
//! panic or a hang is not. Each run uses a directory of its own under $TMPDIR.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let cursor_len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (cursor, segment) = rest.split_at(cursor_len);
    let dir = std::env::temp_dir().join(format!("edgegate-fuzz-recovery-{}", std::process::id()));
    let _ = edgegate::buffer::fuzz_recovery(&dir, segment, cursor);
});
