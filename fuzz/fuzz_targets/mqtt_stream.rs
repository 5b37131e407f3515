//! A client's TCP byte stream as the MQTT listener sees it (`edgegate::ingest::mqtt::
//! fuzz_stream`): framing with the size limit, protocol choice from the first CONNECT, and
//! every frame through both the 3.1.1 and the 5 decoder. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = edgegate::ingest::mqtt::fuzz_stream(bytes);
});
