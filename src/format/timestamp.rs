//! Device timestamps: a route may take a record's timestamp from its payload instead of the
//! receive time (`timestamp = "payload"`).
//!
//! Applied at ingest, when the record is built: the route's topic and key templates then see
//! the device's time, and the log holds the outcome. The log's time field stays the receive
//! time (the `edgegate-received-ms` header, TTL expiry and the backlog's age keep meaning
//! what they meant); an accepted device time travels as the stored header
//! [`DEVICE_MS_HEADER`], which the forwarder makes the Kafka timestamp. A device time
//! outside the window around the gateway's clock (a dead RTC says 1970), a payload without
//! the field, or one that is not JSON never refuses nor delays the message: the record keeps
//! the receive time and gets [`REJECTED_HEADER`] saying why, counted in
//! `edgegate_device_timestamps_total{outcome}`.

use std::time::Duration;

use serde::Deserialize;

/// The stored header carrying an accepted device time, milliseconds since the Unix epoch:
/// the Kafka timestamp of the record.
pub const DEVICE_MS_HEADER: &str = "edgegate-device-ms";
/// The stored header saying why a route that takes device timestamps kept the receive time:
/// `missing`, `invalid` or `out_of_window`.
pub const REJECTED_HEADER: &str = "edgegate-timestamp-rejected";

/// A route's `timestamp`: where a record's timestamp comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The time the gateway received the message.
    #[default]
    Received,
    /// The device's own, from the payload (`timestamp_pointer`, or Sparkplug's timestamp).
    Payload,
}

/// A route's `timestamp_unit`: what a number at the pointer counts since the Unix epoch.
/// Strings are always read as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    S,
    #[default]
    Ms,
    Us,
    Ns,
}

impl Unit {
    /// Milliseconds from a JSON number of this unit (integers exactly, fractions rounded
    /// down); `None` when out of any plausible range.
    fn to_ms(self, n: &serde_json::Number) -> Option<i64> {
        let per_ms: i64 = match self {
            Unit::S => {
                return n
                    .as_i64()
                    .and_then(|s| s.checked_mul(1000))
                    .or_else(|| float_ms(n.as_f64()? * 1e3));
            }
            Unit::Ms => 1,
            Unit::Us => 1000,
            Unit::Ns => 1_000_000,
        };
        match n.as_i64() {
            Some(i) => Some(i.div_euclid(per_ms)),
            None => float_ms(n.as_f64()? / per_ms as f64),
        }
    }
}

/// A float of milliseconds, if finite and within ±2^53 (±285,000 years: beyond that
/// nothing is a plausible timestamp).
fn float_ms(ms: f64) -> Option<i64> {
    (ms.is_finite() && ms.abs() < 9.0e15).then(|| ms.floor() as i64)
}

/// What became of one record's device time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In the window: the record's timestamp.
    Used(i64),
    /// Not JSON, or nothing at the pointer.
    Missing,
    /// Something at the pointer that is not a time (a bool, an object, a bad string).
    Invalid,
    /// A time too far in the future or past of the gateway's clock.
    OutOfWindow,
}

impl Outcome {
    /// The metric label, and the value of [`REJECTED_HEADER`].
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Used(_) => "used",
            Outcome::Missing => "missing",
            Outcome::Invalid => "invalid",
            Outcome::OutOfWindow => "out_of_window",
        }
    }
}

/// A route's compiled device-time policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTime {
    /// RFC 6901 pointers tried in order; the first that finds a value decides.
    pub pointers: Vec<String>,
    pub unit: Unit,
    /// How far ahead of the gateway's clock a device time may be.
    pub max_future: Duration,
    /// How far behind it (a device replaying what it stored while offline).
    pub max_age: Duration,
}

/// The future half of the default window: clocks that drift, not clocks that are wrong.
pub const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(3600);
/// The past half: a device that buffered a week offline is still believed.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// Where a Sparkplug B record's time is: the metric's own, else the payload's.
pub const SPARKPLUG_POINTERS: [&str; 2] = ["/metric_timestamp", "/timestamp"];

impl DeviceTime {
    /// The device time of `payload` judged against `now_ms`, the receive time.
    pub fn extract(&self, payload: &[u8], now_ms: i64) -> Outcome {
        let mut found = None;
        for pointer in &self.pointers {
            match lookup(payload, pointer) {
                Ok(Some(value)) => {
                    found = Some(value);
                    break;
                }
                Ok(None) => {}
                Err(_) => return Outcome::Missing,
            }
        }
        let Some(value) = found else {
            return Outcome::Missing;
        };
        let ms = match value {
            Found::Number(n) => self.unit.to_ms(&n),
            Found::String(s) => parse_rfc3339(&s),
            Found::Other => None,
        };
        let Some(ms) = ms else {
            return Outcome::Invalid;
        };
        let future = i64::try_from(self.max_future.as_millis()).unwrap_or(i64::MAX);
        let age = i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX);
        if ms > now_ms.saturating_add(future) || ms < now_ms.saturating_sub(age) {
            return Outcome::OutOfWindow;
        }
        Outcome::Used(ms)
    }
}

/// The value a JSON pointer found, as far as a time needs it.
#[derive(Debug, Clone, PartialEq)]
enum Found {
    Number(serde_json::Number),
    String(String),
    /// `null`, a bool, an array or an object.
    Other,
}

/// The value at `pointer` (RFC 6901, already checked) in the JSON document `payload`;
/// `Err` if `payload` is not one JSON document. `serde_json::Value::pointer` without the
/// `Value`: one pass that skips what is off the path instead of building a tree of it (a
/// device payload is mostly what is not its timestamp). The same answers, duplicate keys
/// included (the last one wins), except that nesting deeper than serde_json's limit (128)
/// off the path is skipped (without recursion) instead of failing the document.
fn lookup(payload: &[u8], pointer: &str) -> Result<Option<Found>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let found = serde::de::DeserializeSeed::deserialize(At(pointer), &mut de)?;
    de.end()?;
    Ok(found)
}

/// A [`DeserializeSeed`](serde::de::DeserializeSeed) that walks the rest of a pointer
/// (`""` at the target, else `/token...`).
struct At<'p>(&'p str);

impl<'p> At<'p> {
    /// The first token (still escaped) and the pointer after it.
    fn split(&self) -> Option<(&'p str, At<'p>)> {
        let rest = self.0.strip_prefix('/')?;
        Some(match rest.find('/') {
            Some(i) => (&rest[..i], At(&rest[i..])),
            None => (rest, At("")),
        })
    }

    fn at_target(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for At<'_> {
    type Value = Option<Found>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for At<'_> {
    type Value = Option<Found>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(self.at_target().then_some(Found::Other))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.at_target().then_some(Found::Other))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.at_target().then(|| Found::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.at_target().then(|| Found::Number(v.into())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(self
            .at_target()
            .then(|| serde_json::Number::from_f64(v).map_or(Found::Other, Found::Number)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.at_target().then(|| Found::String(v.to_owned())))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        use serde::de::IgnoredAny;
        let target = self
            .split()
            .and_then(|(token, rest)| Some((index(token)?, rest)));
        let mut found = self.at_target().then_some(Found::Other);
        let mut i = 0usize;
        loop {
            match &target {
                Some((want, rest)) if *want == i => match seq.next_element_seed(At(rest.0))? {
                    Some(value) => found = value,
                    None => break,
                },
                _ => {
                    if seq.next_element::<IgnoredAny>()?.is_none() {
                        break;
                    }
                }
            }
            i += 1;
        }
        Ok(found)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::IgnoredAny;
        let target = self.split();
        let mut found = self.at_target().then_some(Found::Other);
        while let Some(hit) = map.next_key_seed(Key(target.as_ref().map(|(t, _)| *t)))? {
            match (&target, hit) {
                (Some((_, rest)), true) => found = map.next_value_seed(At(rest.0))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// An array index token as RFC 6901 and `serde_json` read it: digits, no leading zero.
fn index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

/// Deserializes an object key into whether it is the pointer's (escaped) token, without
/// keeping it.
struct Key<'t>(Option<&'t str>);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(self.0.is_some_and(|token| token_is(token, key)))
    }
}

/// Whether the escaped pointer token `token` names `key` (`~1` is `/`, `~0` is `~`).
fn token_is(token: &str, key: &str) -> bool {
    let mut t = token.chars();
    let mut k = key.chars();
    loop {
        let want = match t.next() {
            None => return k.next().is_none(),
            Some('~') => match t.next() {
                Some('0') => '~',
                Some('1') => '/',
                _ => return false,
            },
            Some(c) => c,
        };
        if k.next() != Some(want) {
            return false;
        }
    }
}

/// Whether `pointer` is an RFC 6901 JSON pointer: empty, or `/`-separated tokens in which
/// `~` is only ever `~0` or `~1`.
pub fn valid_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!(
            "`{pointer}` is not a JSON pointer (RFC 6901): it must start with `/`, as in `/ts`"
        ));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "`{pointer}` is not a JSON pointer (RFC 6901): `~` must be followed by 0 or 1"
            ));
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch of an RFC 3339 date-time
/// (`2026-12-04T19:30:00.250Z`, `2026-12-04t21:30:00+02:00`); `None` if it is not one.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(r)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let sep = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut millis = 0;
    if sep(i, b".") {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        // Milliseconds from the first three digits, padded: ".5" is 500 ms.
        for k in 0..3 {
            let d = b
                .get(start + k)
                .filter(|_| start + k < i)
                .map_or(0, |d| d - b'0');
            millis = millis * 10 + i64::from(d);
        }
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && sep(i + 3, b":") => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap(year) => 29,
        2 => 28,
        _ => return None,
    };
    // Second 60 is a leap second; it is counted as the next one's start, as Unix time does.
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_400_000_000; // 2026-12-04T16:00:00Z

    fn policy(pointer: &str, unit: Unit) -> DeviceTime {
        DeviceTime {
            pointers: vec![pointer.to_owned()],
            unit,
            max_future: DEFAULT_MAX_FUTURE,
            max_age: DEFAULT_MAX_AGE,
        }
    }

    #[test]
    fn numbers_at_the_pointer_in_every_unit() {
        let ms = NOW - 1234;
        for (unit, text) in [
            (Unit::Ms, format!("{ms}")),
            (Unit::S, format!("{}.766", (ms / 1000))),
            (Unit::Us, format!("{}", ms * 1000 + 999)),
            (Unit::Ns, format!("{}", i128::from(ms) * 1_000_000 + 5)),
        ] {
            let payload = format!(r#"{{"a":{{"b/c":[1,{{"ts":{text}}}]}}}}"#);
            let got = policy("/a/b~1c/1/ts", unit).extract(payload.as_bytes(), NOW);
            let want = if unit == Unit::S {
                ms / 1000 * 1000 + 766
            } else {
                ms
            };
            assert_eq!(got, Outcome::Used(want), "{unit:?} {payload}");
        }
    }

    #[test]
    fn rfc3339_strings_whatever_the_unit() {
        let p = policy("/ts", Unit::S);
        assert_eq!(
            p.extract(br#"{"ts":"2026-12-04T15:30:00.25Z"}"#, NOW),
            Outcome::Used(NOW - 1_800_000 + 250)
        );
        assert_eq!(
            p.extract(br#"{"ts":"2026-12-04T17:30:00+01:30"}"#, NOW),
            Outcome::Used(NOW)
        );
        assert_eq!(p.extract(br#"{"ts":"yesterday"}"#, NOW), Outcome::Invalid);
    }

    #[test]
    fn rfc3339_edges() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59z"),
            Some(1_709_251_199_000)
        );
        assert_eq!(
            parse_rfc3339("2026-12-04 16:00:00.123456789Z"),
            Some(NOW + 123)
        );
        assert_eq!(
            parse_rfc3339("2026-12-04T16:00:00-00:30"),
            Some(NOW + 1_800_000)
        );
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-04T24:00:00Z",
            "2026-12-04T16:00:00",
            "2026-12-04T16:00:00.Z",
            "2026-12-04T16:00:00+0100",
            "2026-12-04T16:00:00Zjunk",
            "2026-1-04T16:00:00Z",
            "+026-12-04T16:00:00Z",
            "",
            "2026-12-04T16:00:00+01:",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_window_edges_are_inside() {
        let p = policy("/ts", Unit::Ms);
        let at = |ms: i64| p.extract(format!(r#"{{"ts":{ms}}}"#).as_bytes(), NOW);
        let future = DEFAULT_MAX_FUTURE.as_millis() as i64;
        let age = DEFAULT_MAX_AGE.as_millis() as i64;
        assert_eq!(at(NOW + future), Outcome::Used(NOW + future));
        assert_eq!(at(NOW + future + 1), Outcome::OutOfWindow);
        assert_eq!(at(NOW - age), Outcome::Used(NOW - age));
        assert_eq!(at(NOW - age - 1), Outcome::OutOfWindow);
        // A dead RTC.
        assert_eq!(at(0), Outcome::OutOfWindow);
        assert_eq!(at(i64::MIN), Outcome::OutOfWindow);
    }

    #[test]
    fn what_is_not_a_time_is_missing_or_invalid_never_a_panic() {
        let p = policy("/ts", Unit::Ns);
        for payload in [
            &b"\xff\xfe binary"[..],
            b"",
            b"21.5",
            b"{\"t\":1}",
            b"[1,2]",
            b"{\"ts\":",
        ] {
            assert_eq!(p.extract(payload, NOW), Outcome::Missing, "{payload:?}");
        }
        // Deep nesting is skipped without recursion, no stack overflow: only the pointer's
        // path is walked recursively.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(p.extract(deep.as_bytes(), NOW), Outcome::Missing);
        let deep_on = format!(r#"{{"ts":{deep}}}"#);
        assert_eq!(p.extract(deep_on.as_bytes(), NOW), Outcome::Invalid);
        let deep_off = format!(r#"{{"x":{deep},"ts":{}}}"#, NOW * 1_000_000);
        assert_eq!(p.extract(deep_off.as_bytes(), NOW), Outcome::Used(NOW));
        for payload in [
            &br#"{"ts":true}"#[..],
            br#"{"ts":null}"#,
            br#"{"ts":{"s":1}}"#,
            br#"{"ts":1e300}"#,
            br#"{"ts":-1e300}"#,
        ] {
            assert_eq!(p.extract(payload, NOW), Outcome::Invalid, "{payload:?}");
        }
    }

    #[test]
    fn sparkplug_records_prefer_the_metrics_timestamp() {
        let p = DeviceTime {
            pointers: SPARKPLUG_POINTERS.map(str::to_owned).to_vec(),
            ..policy("", Unit::Ms)
        };
        let metric = format!(
            r#"{{"timestamp":{},"metric_timestamp":{NOW},"value":1}}"#,
            NOW - 5
        );
        assert_eq!(p.extract(metric.as_bytes(), NOW), Outcome::Used(NOW));
        let payload = format!(r#"{{"timestamp":{},"value":1}}"#, NOW - 5);
        assert_eq!(p.extract(payload.as_bytes(), NOW), Outcome::Used(NOW - 5));
        assert_eq!(p.extract(br#"{"value":1}"#, NOW), Outcome::Missing);
    }

    #[test]
    fn pointers_are_checked() {
        for good in ["", "/", "/ts", "/a~0b/~1c/0"] {
            assert!(valid_pointer(good).is_ok(), "{good}");
        }
        for bad in ["ts", "/a~2", "/a~", "#/ts"] {
            assert!(valid_pointer(bad).is_err(), "{bad}");
        }
    }

    /// The one-pass lookup answers as `serde_json::Value::pointer` does.
    #[test]
    fn lookup_agrees_with_serde_json_pointer() {
        use serde_json::Value;
        let docs = [
            r#"{"ts":1,"a":{"b":[10,{"c~d/e":"x"},[true,null]],"":{"":2.5}},"ts":-3}"#,
            r#"[{"ts":1},{"ts":"2026-12-04T16:00:00Z"},[],{}]"#,
            r#"{"a":{"b":1},"a":{"c":2}}"#,
            r#"{"0":{"01":7},"-":8,"~":9,"/":10}"#,
            r#"17"#,
            r#""s""#,
            r#"null"#,
            r#"{"a":[0,1,2,3,4,5,6,7,8,9,10,11]}"#,
            r#"{"big":18446744073709551615,"neg":-9223372036854775808,"f":1e-7}"#,
        ];
        let pointers = [
            "",
            "/",
            "/ts",
            "/a",
            "/a/b",
            "/a/b/0",
            "/a/b/1/c~0d~1e",
            "/a/b/2/1",
            "/a/b/3",
            "/a//",
            "/a/",
            "/a/c",
            "/0",
            "/0/ts",
            "/1/ts",
            "/3",
            "/0/01",
            "/-",
            "/~0",
            "/~1",
            "/a/b/01",
            "/a/b/+1",
            "/a/11",
            "/a/12",
            "/big",
            "/neg",
            "/f",
            "/ts/x",
        ];
        for doc in docs {
            let value: Value = serde_json::from_str(doc).expect("JSON");
            for pointer in pointers {
                let want = value.pointer(pointer).map(|v| match v {
                    Value::Number(n) => Found::Number(n.clone()),
                    Value::String(s) => Found::String(s.clone()),
                    _ => Found::Other,
                });
                let got = lookup(doc.as_bytes(), pointer).expect("JSON");
                assert_eq!(got, want, "{pointer} in {doc}");
            }
        }
        for bad in [
            &b"{\"ts\":1} trailing"[..],
            b"{\"ts\":1",
            b"\xff",
            b"",
            b"[1,]",
        ] {
            assert!(lookup(bad, "/ts").is_err(), "{bad:?}");
        }
    }
}
