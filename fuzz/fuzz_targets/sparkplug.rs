//! Sparkplug B conversion (`edgegate::format::sparkplug`): a sequence of messages on one edge
//! node, each a topic picked by one byte and a payload of hostile bytes, through the same
//! state (births, aliases, sequence numbers). Converting must never panic; a payload it
//! cannot decode is an error, not a crash.
#![no_main]

use bytes::Bytes;
use edgegate::format::sparkplug::{Records, Sparkplug};
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 10] = [
    "spBv1.0/g/NBIRTH/e",
    "spBv1.0/g/NDATA/e",
    "spBv1.0/g/NDEATH/e",
    "spBv1.0/g/NCMD/e",
    "spBv1.0/g/DBIRTH/e/d",
    "spBv1.0/g/DDATA/e/d",
    "spBv1.0/g/DDEATH/e/d",
    "spBv1.0/g/DCMD/e/d",
    "spBv1.0/STATE/host",
    "spBv1.0/g/NDATA",
];

fuzz_target!(|data: &[u8]| {
    let state = Sparkplug::default();
    // Messages separated by 0xff 0x00; the first byte of each picks its topic and shape.
    for message in messages(data) {
        let Some((&pick, payload)) = message.split_first() else {
            continue;
        };
        let topic = TOPICS[usize::from(pick) % TOPICS.len()];
        let shape = if pick & 0x80 == 0 {
            Records::PerMetric
        } else {
            Records::PerPayload
        };
        let _ = state.convert(topic, &Bytes::copy_from_slice(payload), shape);
    }
});

fn messages(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i + 1 < data.len() {
        if data[i] == 0xff && data[i + 1] == 0x00 {
            out.push(&data[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push(&data[start..]);
    out
}
