//! `edgegate status`: a short human summary from the admin endpoints of a running gateway.
//!
//! Reads `/readyz` (the gateway's own view: backlog, link, last error) and samples
//! `/metrics` twice, [`SAMPLE_INTERVAL`] apart, for the message rates. The HTTP client is a
//! few lines over a `TcpStream`: one GET per connection, `Connection: close`.
//!
//! Exit codes, for scripts: 0 ready (or degraded: Kafka is down and the gateway buffers,
//! which is its job), 1 not ready (stopping, log closed, a listener gone), 2 unreachable or
//! not answering like an edgegate admin endpoint.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Link, Readiness, Status};

/// Between the two `/metrics` samples the rates come from.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// How long one request may take, connect included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of a response read; `/metrics` of one gateway is a few tens of KiB.
const MAX_RESPONSE: u64 = 16 << 20;

pub const EXIT_READY: u8 = 0;
pub const EXIT_NOT_READY: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach the admin endpoint at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {REQUEST_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("unexpected answer from {addr}{path}: {reason}")]
    Protocol {
        addr: SocketAddr,
        path: &'static str,
        reason: String,
    },
}

/// What `edgegate status` found.
#[derive(Debug, Clone)]
pub struct Summary {
    pub addr: SocketAddr,
    pub readiness: Readiness,
    /// Messages stored per second (all protocols).
    pub in_per_sec: f64,
    /// Records acknowledged by Kafka per second.
    pub out_per_sec: f64,
    pub mqtt_connections: f64,
}

impl Summary {
    pub fn exit_code(&self) -> u8 {
        if self.readiness.status.is_ready() && self.readiness.status != Status::Stalled {
            EXIT_READY
        } else {
            EXIT_NOT_READY
        }
    }
}

/// Asks the gateway at `addr`.
pub async fn query(addr: SocketAddr) -> Result<Summary, StatusError> {
    let first = metrics_sample(addr).await?;
    let started = tokio::time::Instant::now();
    let readiness = fetch_readiness(addr).await?;
    tokio::time::sleep_until(started + SAMPLE_INTERVAL).await;
    let second = metrics_sample(addr).await?;
    let secs = second.at.duration_since(first.at).as_secs_f64().max(0.001);
    let rate = |name: &str| (second.sum(name) - first.sum(name)).max(0.0) / secs;
    Ok(Summary {
        addr,
        in_per_sec: rate("edgegate_messages_received_total"),
        out_per_sec: rate("edgegate_kafka_delivered_total"),
        mqtt_connections: second.sum("edgegate_mqtt_connections"),
        readiness,
    })
}

async fn fetch_readiness(addr: SocketAddr) -> Result<Readiness, StatusError> {
    // 503 is an answer too: its body says why the gateway is not ready.
    let (_, body) = get(addr, "/readyz").await?;
    serde_json::from_slice(&body).map_err(|e| StatusError::Protocol {
        addr,
        path: "/readyz",
        reason: e.to_string(),
    })
}

struct Sample {
    at: tokio::time::Instant,
    /// Metric name → sum over its label sets.
    values: HashMap<String, f64>,
}

impl Sample {
    fn sum(&self, name: &str) -> f64 {
        self.values.get(name).copied().unwrap_or(0.0)
    }
}

async fn metrics_sample(addr: SocketAddr) -> Result<Sample, StatusError> {
    let at = tokio::time::Instant::now();
    let (code, body) = get(addr, "/metrics").await?;
    if code != 200 {
        return Err(StatusError::Protocol {
            addr,
            path: "/metrics",
            reason: format!("HTTP {code}"),
        });
    }
    Ok(Sample {
        at,
        values: parse_metrics(&String::from_utf8_lossy(&body)),
    })
}

/// Sums the samples of each metric name over their labels (`name{a="b"} 3` → `name`: 3).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut values = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        if let Ok(value) = value.trim().parse::<f64>() {
            *values.entry(name.to_owned()).or_insert(0.0) += value;
        }
    }
    values
}

/// One `GET path` over HTTP/1.1: the status code and the body.
pub async fn get(addr: SocketAddr, path: &'static str) -> Result<(u16, Vec<u8>), StatusError> {
    tokio::time::timeout(REQUEST_TIMEOUT, get_inner(addr, path))
        .await
        .map_err(|_| StatusError::Timeout { addr })?
}

async fn get_inner(addr: SocketAddr, path: &'static str) -> Result<(u16, Vec<u8>), StatusError> {
    let io = |source| StatusError::Connect { addr, source };
    let protocol = |reason: &str| StatusError::Protocol {
        addr,
        path,
        reason: reason.to_owned(),
    };
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: edgegate-status\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .await
        .map_err(io)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| protocol("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|status| status.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| protocol("no HTTP status line"))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| protocol("malformed chunked body"))?
    } else {
        body.to_vec()
    };
    Ok((code, body))
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_hex = size_field.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.readiness;
        let state = match r.status {
            Status::Ready => "ready",
            Status::Degraded if r.kafka == Link::Up => {
                "degraded (Kafka refuses writes: too few in-sync replicas; buffering)"
            }
            Status::Degraded => "degraded (Kafka unreachable, buffering)",
            Status::Stalled => "STALLED (Kafka answers, nothing delivered; buffering)",
            Status::NotReady => "NOT READY",
            Status::Stopping => "stopping",
        };
        writeln!(f, "edgegate {} at {}: {state}", r.version, self.addr)?;
        writeln!(
            f,
            "  up since     {} ({})",
            utc(r.started_at),
            duration(Duration::from_secs(r.uptime_seconds))
        )?;
        writeln!(f, "  kafka        {}", r.kafka.as_str())?;
        writeln!(
            f,
            "  messages/s   in {:.1}, out {:.1}",
            self.in_per_sec, self.out_per_sec
        )?;
        let mut backlog = format!("{} records, {}", r.log.records, bytes(r.log.bytes));
        if let Some(age) = r.log.oldest_age_seconds {
            let _ = write!(
                backlog,
                ", oldest {}",
                duration(Duration::from_secs_f64(age.max(0.0)))
            );
        }
        match r.log.drain_seconds {
            Some(s) if r.log.records > 0 => {
                let _ = write!(
                    backlog,
                    ", drains in ~{}",
                    duration(Duration::from_secs_f64(s.max(0.0)))
                );
            }
            None => backlog.push_str(", not draining"),
            _ => {}
        }
        writeln!(f, "  backlog      {backlog}")?;
        if r.log.dropped_records > 0 || r.log.corrupt_records > 0 {
            writeln!(
                f,
                "  lost         {} dropped, {} corrupt records",
                r.log.dropped_records, r.log.corrupt_records
            )?;
        }
        if r.dead_letter.records > 0 {
            writeln!(f, "  dead letter  {} records", r.dead_letter.records)?;
        }
        writeln!(f, "  connections  {} MQTT", self.mqtt_connections)?;
        if let Some(b) = &r.broker {
            writeln!(
                f,
                "  local        {} sessions ({} offline), {} subscriptions, {} retained, {} queued",
                b.sessions_online + b.sessions_offline,
                b.sessions_offline,
                b.subscriptions,
                b.retained,
                b.queued_messages
            )?;
            if b.commands_held > 0 || b.downlink_lag.is_some() {
                let oldest = b.oldest_command_ms.map_or_else(String::new, |sent| {
                    let age = crate::ingest::now_ms().saturating_sub(sent).max(0);
                    format!(
                        ", oldest {}",
                        duration(Duration::from_millis(age.unsigned_abs()))
                    )
                });
                let lag = b
                    .downlink_lag
                    .map_or_else(String::new, |l| format!(", consumer lag {l}"));
                writeln!(
                    f,
                    "  downlink     {} commands held{oldest}{lag}",
                    b.commands_held
                )?;
            }
        }
        if let Some(error) = &r.last_error {
            writeln!(f, "  last error   {error}")?;
        }
        Ok(())
    }
}

/// `3d 4h`, `2h 5m`, `4m 12s`, `42s`, `0.25s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{:.2}s", d.as_secs_f64()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// `512 B`, `1.5 KiB`, `380.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `2026-11-25 05:47:35 UTC` from seconds since the Unix epoch.
fn utc(unix: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(unix);
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# TYPE edgegate_messages_received_total counter\n\
                    edgegate_messages_received_total{protocol=\"mqtt\",qos=\"1\"} 3\n\
                    edgegate_messages_received_total{protocol=\"coap\",qos=\"con\"} 4\n\
                    edgegate_mqtt_connections 2\n";
        let values = parse_metrics(text);
        assert_eq!(values["edgegate_messages_received_total"], 7.0);
        assert_eq!(values["edgegate_mqtt_connections"], 2.0);
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n").as_deref(),
            Some(&b"Wikipedia"[..])
        );
        assert_eq!(dechunk(b"ff\r\nshort"), None);
    }

    #[test]
    fn dates_and_durations_read_well() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_592_855), "2026-11-25 07:47:35 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(duration(Duration::from_secs(3725)), "1h 2m");
        assert_eq!(duration(Duration::from_secs(42)), "42s");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(100), "100 B");
    }
}
