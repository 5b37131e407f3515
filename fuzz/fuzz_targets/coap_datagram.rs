//! One UDP datagram through the CoAP listener's parse → validation → request classification
//! (`edgegate::ingest::coap::fuzz_datagram`): it must never panic, and every answer it would
//! send must parse back (asserted inside).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|datagram: &[u8]| {
    let _ = edgegate::ingest::coap::fuzz_datagram(datagram);
});
