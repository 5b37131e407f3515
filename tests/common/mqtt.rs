//! MQTT for tests: the one way tests publish with real clients ([`mosquitto_pub`] and
//! [`rumqttc`]), and raw packets for what well-behaved clients never send.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;

/// `mosquitto_pub` (Debian mosquitto-clients) against `addr`; say what to send with
/// [`MosquittoPub::message`] or [`MosquittoPub::lines`].
pub fn mosquitto_pub(addr: SocketAddr) -> MosquittoPub {
    MosquittoPub {
        host: addr.ip().to_string(),
        port: addr.port(),
        args: Vec::new(),
        timeout: Duration::from_secs(120),
    }
}

/// One `mosquitto_pub` run: its options, then [`MosquittoPub::message`] or
/// [`MosquittoPub::lines`] runs it and returns its exit status and output.
pub struct MosquittoPub {
    host: String,
    port: u16,
    args: Vec<OsString>,
    /// After this the client is killed (a failed status), so a stuck client fails the test
    /// instead of hanging it.
    timeout: Duration,
}

impl MosquittoPub {
    /// `-h`: the name to connect to instead of the address's IP (TLS checks it against the
    /// server certificate).
    pub fn host(mut self, host: &str) -> MosquittoPub {
        self.host = host.to_owned();
        self
    }

    /// `-i`: the client id.
    pub fn id(self, client_id: &str) -> MosquittoPub {
        self.args(["-i", client_id])
    }

    /// `-t`: the topic.
    pub fn topic(self, topic: &str) -> MosquittoPub {
        self.args(["-t", topic])
    }

    /// `-q`: the QoS (0 when not given).
    pub fn qos(self, qos: u8) -> MosquittoPub {
        self.args(["-q", &qos.to_string()])
    }

    /// `-V mqttv5` or `-V mqttv311`.
    pub fn v5(self, v5: bool) -> MosquittoPub {
        self.args(["-V", if v5 { "mqttv5" } else { "mqttv311" }])
    }

    /// Any other options (`--cafile`, `-u`/`-P`, `-D`, ...).
    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> MosquittoPub {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> MosquittoPub {
        self.timeout = timeout;
        self
    }

    /// Runs it with the options given so far (a test that passes `-m` among them).
    pub fn run(self) -> Output {
        let command = self.command(std::iter::empty());
        run(command, None, self.timeout)
    }

    /// Publishes one message (`-m`). Exit status 0 means it was acknowledged (QoS ≥ 1).
    pub fn message(self, message: &str) -> Output {
        let command = self.command(["-m", message]);
        run(command, None, self.timeout)
    }

    /// Publishes each line as one message (`-l`, lines on stdin). Exit status 0 means every
    /// one was acknowledged (QoS ≥ 1).
    pub fn lines(self, lines: &[String]) -> Output {
        let command = self.command(["-l"]);
        let mut input = lines.join("\n");
        input.push('\n');
        run(command, Some(input.into_bytes()), self.timeout)
    }

    fn command<'a>(&self, what: impl IntoIterator<Item = &'a str>) -> Command {
        let mut command = Command::new("mosquitto_pub");
        command
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(&self.args)
            .args(what);
        command
    }
}

/// Runs `command` with `stdin` as its input, killing it after `timeout`.
fn run(mut command: Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Output {
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mosquitto_pub (Debian: mosquitto-clients)");
    // Fed and drained by threads: a client that stops reading or writes a lot must not
    // block this one before the timeout.
    let feeder = child.stdin.take().zip(stdin).map(|(mut pipe, input)| {
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        })
    });
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mosquitto_pub") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait for mosquitto_pub");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// How long a rumqttc publisher waits for the next event before it gives up.
const PATIENCE: Duration = Duration::from_secs(20);

/// A rumqttc client (3.1.1 unless [`Rumqttc::v5`]) against `addr`, as `client_id`; send with
/// [`Rumqttc::publish`].
pub fn rumqttc(addr: SocketAddr, client_id: &str) -> Rumqttc {
    Rumqttc {
        addr,
        client_id: client_id.to_owned(),
        v5: false,
        qos: 1,
        properties: None,
        tls: None,
    }
}

/// One rumqttc connection that publishes a list of payloads.
pub struct Rumqttc {
    addr: SocketAddr,
    client_id: String,
    v5: bool,
    qos: u8,
    /// MQTT 5 only: a content type and user properties on every publish.
    properties: Option<(String, Vec<(String, String)>)>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Rumqttc {
    pub fn v5(mut self, v5: bool) -> Rumqttc {
        self.v5 = v5;
        self
    }

    /// 0, 1 (the default) or 2.
    pub fn qos(mut self, qos: u8) -> Rumqttc {
        self.qos = qos;
        self
    }

    /// MQTT 5: a content type and user properties on every publish.
    pub fn properties(mut self, content_type: &str, user: &[(&str, &str)]) -> Rumqttc {
        let user = user
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        self.properties = Some((content_type.into(), user));
        self
    }

    /// Over TLS (rustls with ring) with this client configuration.
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Rumqttc {
        self.tls = Some(config);
        self
    }

    /// Publishes `payloads` to `topic` and returns the indexes the gateway acknowledged
    /// (PUBACK with success / PUBREC for QoS 1 / 2; sent, for QoS 0), in that order. Stops at
    /// the first connection error or after [`PATIENCE`] without an event; after a complete
    /// run it disconnects cleanly.
    pub async fn publish(self, topic: &str, payloads: Vec<Vec<u8>>) -> Vec<usize> {
        if self.v5 {
            self.publish_v5(topic, payloads).await
        } else {
            self.publish_v4(topic, payloads).await
        }
    }

    async fn publish_v4(self, topic: &str, payloads: Vec<Vec<u8>>) -> Vec<usize> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};
        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(self.qos)];
        let mut options = MqttOptions::new(
            &self.client_id,
            self.addr.ip().to_string(),
            self.addr.port(),
        );
        options
            .set_inflight(20)
            .set_keep_alive(Duration::from_secs(30));
        if let Some(tls) = self.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let total = payloads.len();
        let topic = topic.to_owned();
        let publisher = tokio::spawn(async move {
            for payload in payloads {
                if client
                    .publish(topic.as_str(), qos, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            client
        });
        let mut acks = Acks::default();
        while acks.acked.len() < total {
            let Ok(Ok(event)) = tokio::time::timeout(PATIENCE, eventloop.poll()).await else {
                break;
            };
            acks.see(seen_v4(event), qos == QoS::AtMostOnce);
        }
        if acks.acked.len() < total {
            // The connection died: without its event loop, a publish blocked on the full
            // request channel fails and the publisher ends.
            drop(eventloop);
            publisher.abort();
            return acks.acked;
        }
        if let Ok(client) = publisher.await {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        acks.acked
    }

    async fn publish_v5(self, topic: &str, payloads: Vec<Vec<u8>>) -> Vec<usize> {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        use rumqttc::v5::{AsyncClient, MqttOptions};
        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(self.qos)];
        let mut options = MqttOptions::new(
            &self.client_id,
            self.addr.ip().to_string(),
            self.addr.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(tls) = self.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let total = payloads.len();
        let topic = topic.to_owned();
        let properties = self.properties;
        let publisher = tokio::spawn(async move {
            for payload in payloads {
                let result = match &properties {
                    Some((content_type, user)) => {
                        let properties = PublishProperties {
                            content_type: Some(content_type.clone()),
                            user_properties: user.clone(),
                            ..Default::default()
                        };
                        client
                            .publish_with_properties(
                                topic.as_str(),
                                qos,
                                false,
                                payload,
                                properties,
                            )
                            .await
                    }
                    None => client.publish(topic.as_str(), qos, false, payload).await,
                };
                if result.is_err() {
                    break;
                }
            }
            client
        });
        let mut acks = Acks::default();
        while acks.acked.len() < total {
            let Ok(Ok(event)) = tokio::time::timeout(PATIENCE, eventloop.poll()).await else {
                break;
            };
            acks.see(seen_v5(event), qos == QoS::AtMostOnce);
        }
        if acks.acked.len() < total {
            drop(eventloop);
            publisher.abort();
            return acks.acked;
        }
        if let Ok(client) = publisher.await {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
        }
        acks.acked
    }
}

/// Which publish each packet id carries, and which the gateway acknowledged (the same
/// bookkeeping for rumqttc's 3.1.1 and 5 clients, whose event types differ).
#[derive(Default)]
struct Acks {
    /// Publishes gone out so far: the next one's index.
    sent: usize,
    /// Packet id → index of the publish awaiting its PUBACK / PUBREC.
    pending: HashMap<u16, usize>,
    /// Indexes acknowledged (QoS 0: sent), in the order they were.
    acked: Vec<usize>,
}

/// What a 3.1.1 client's event means to [`Acks`].
fn seen_v4(event: rumqttc::Event) -> Seen {
    use rumqttc::{Event, Outgoing, Packet};
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => Seen::Sent(pkid),
        Event::Incoming(Packet::PubAck(a)) => Seen::Answered(a.pkid, true),
        Event::Incoming(Packet::PubRec(r)) => Seen::Answered(r.pkid, true),
        _ => Seen::Other,
    }
}

/// What an MQTT 5 client's event means to [`Acks`]: a PUBACK with a reason other than
/// success is an answer, not an acknowledgement.
fn seen_v5(event: rumqttc::v5::Event) -> Seen {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => Seen::Sent(pkid),
        Event::Incoming(Packet::PubAck(a)) => {
            Seen::Answered(a.pkid, a.reason == PubAckReason::Success)
        }
        Event::Incoming(Packet::PubRec(r)) => Seen::Answered(r.pkid, true),
        _ => Seen::Other,
    }
}

/// What one event of either client means to [`Acks`].
enum Seen {
    /// A publish went out with this packet id.
    Sent(u16),
    /// The gateway answered this packet id, with success or not.
    Answered(u16, bool),
    Other,
}

impl Acks {
    fn see(&mut self, seen: Seen, qos0: bool) {
        match seen {
            Seen::Sent(pkid) => self.sent(pkid, qos0),
            Seen::Answered(pkid, success) => self.answered(pkid, success),
            Seen::Other => {}
        }
    }

    /// A publish went out; QoS 0 counts as acknowledged when sent.
    fn sent(&mut self, pkid: u16, qos0: bool) {
        if qos0 {
            self.acked.push(self.sent);
        } else {
            self.pending.insert(pkid, self.sent);
        }
        self.sent += 1;
    }

    /// The gateway answered `pkid`; only a success counts as acknowledged.
    fn answered(&mut self, pkid: u16, success: bool) {
        let index = self.pending.remove(&pkid);
        if success {
            self.acked.extend(index);
        }
    }
}

/// One raw MQTT packet: the first byte (type and flags), the remaining length as a variable
/// byte integer, the body. For what well-behaved clients never send.
pub fn mqtt_frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Appends an MQTT string or binary field: a u16 big-endian length, then the bytes.
pub fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}
