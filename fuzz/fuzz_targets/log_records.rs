//! Bytes read from a segment file, walked as the log's reader walks them (frame checks,
//! padding, resynchronisation after damage), every checksummed body decoded plain and
//! opened with a key (`edgegate::buffer::fuzz_frames`). Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgegate::buffer::fuzz_frames(data);
});
