//! Sparkplug B conversion (`edgegate::format::sparkplug`): a sequence of messages on one edge
//! node, each a topic picked by one byte and a payload of hostile bytes, through the same
//! state (births, aliases, sequence numbers). Converting must never panic; a payload it
//! cannot decode is an error, not a crash. Each record's device time (`format::timestamp`)
//! is taken as a `timestamp = "payload"` route would.
#![no_main]

use bytes::Bytes;
use edgegate::format::sparkplug::{Records, Sparkplug};
use edgegate::format::timestamp::{
    DEFAULT_MAX_AGE, DEFAULT_MAX_FUTURE, DeviceTime, SPARKPLUG_POINTERS, Unit, parse_rfc3339,
};
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
        let Ok(converted) = state.convert(topic, &Bytes::copy_from_slice(payload), shape) else {
            continue;
        };
        // What a route with timestamp = "payload" does with each record, and with the raw
        // bytes as a JSON route would: never a panic, whatever the time in them.
        let device_time = DeviceTime {
            pointers: SPARKPLUG_POINTERS.map(str::to_owned).to_vec(),
            unit: Unit::Ms,
            max_future: DEFAULT_MAX_FUTURE,
            max_age: DEFAULT_MAX_AGE,
        };
        let now = i64::from(pick) * 1_000_000_000_000 - 1;
        for record in &converted.records {
            let _ = device_time.extract(record, now);
        }
        let _ = device_time.extract(payload, now);
        if let Ok(text) = std::str::from_utf8(payload) {
            let _ = parse_rfc3339(text);
        }
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
