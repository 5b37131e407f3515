//! Subscribing with real clients: [`Subscriber`] (rumqttc, 3.1.1 or 5, clean or persistent
//! session) and [`mosquitto_sub`] (the mosquitto command line client as a child process).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

/// One message as a subscriber received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// MQTT 5 only.
    pub subscription_ids: Vec<usize>,
    pub correlation_data: Option<Vec<u8>>,
    pub response_topic: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// How a [`Subscriber`] connects.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    pub client_id: String,
    pub v5: bool,
    /// 3.1.1 clean session / MQTT 5 clean start.
    pub clean: bool,
    /// MQTT 5 Session Expiry Interval (seconds) for a persistent session.
    pub session_expiry: u32,
    /// Acknowledge publishes as they arrive (QoS 1/2); off, they are left unacknowledged.
    pub ack: bool,
}

impl SubscriberOptions {
    pub fn new(client_id: &str) -> SubscriberOptions {
        SubscriberOptions {
            client_id: client_id.to_owned(),
            v5: false,
            clean: true,
            session_expiry: 0,
            ack: true,
        }
    }

    pub fn v5(mut self) -> SubscriberOptions {
        self.v5 = true;
        self
    }

    pub fn persistent(mut self, session_expiry: u32) -> SubscriberOptions {
        self.clean = false;
        self.session_expiry = session_expiry;
        self
    }
}

/// A connected rumqttc client whose publishes arrive on a channel.
pub struct Subscriber {
    v4: Option<rumqttc::AsyncClient>,
    v5: Option<rumqttc::v5::AsyncClient>,
    received: mpsc::UnboundedReceiver<Received>,
    /// SUBACK return codes, in order.
    subacks: mpsc::UnboundedReceiver<Vec<u8>>,
    /// Whether the CONNACK said a session was present.
    pub session_present: bool,
    task: tokio::task::JoinHandle<()>,
}

const PATIENCE: Duration = Duration::from_secs(20);

impl Subscriber {
    /// Connects and waits for the CONNACK.
    pub async fn connect(addr: SocketAddr, options: SubscriberOptions) -> Subscriber {
        let (tx, received) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (connack_tx, connack) = tokio::sync::oneshot::channel();
        let (v4, v5, task) = if options.v5 {
            let (client, task) = connect_v5(addr, &options, tx, sub_tx, connack_tx);
            (None, Some(client), task)
        } else {
            let (client, task) = connect_v4(addr, &options, tx, sub_tx, connack_tx);
            (Some(client), None, task)
        };
        let session_present = tokio::time::timeout(PATIENCE, connack)
            .await
            .expect("CONNACK in time")
            .expect("connected");
        Subscriber {
            v4,
            v5,
            received,
            subacks,
            session_present,
            task,
        }
    }

    /// Subscribes to `filter` at `qos` and waits for its SUBACK code.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        if let Some(c) = &self.v4 {
            c.subscribe(filter, qos_v4(qos)).await.expect("subscribe");
        } else if let Some(c) = &self.v5 {
            c.subscribe(filter, qos_v5(qos)).await.expect("subscribe");
        }
        let codes = tokio::time::timeout(PATIENCE, self.subacks.recv())
            .await
            .expect("SUBACK in time")
            .expect("connection open");
        codes[0]
    }

    /// MQTT 5: subscribes with options and a subscription identifier.
    pub async fn subscribe_v5(
        &mut self,
        filter: &str,
        qos: u8,
        no_local: bool,
        retain_as_published: bool,
        id: Option<usize>,
    ) -> u8 {
        use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule, SubscribeProperties};
        let c = self.v5.as_ref().expect("an MQTT 5 subscriber");
        let mut f = Filter::new(filter, qos_v5(qos));
        f.nolocal = no_local;
        f.preserve_retain = retain_as_published;
        f.retain_forward_rule = RetainForwardRule::OnEverySubscribe;
        let props = SubscribeProperties {
            id,
            user_properties: Vec::new(),
        };
        c.subscribe_many_with_properties([f], props)
            .await
            .expect("subscribe");
        let codes = tokio::time::timeout(PATIENCE, self.subacks.recv())
            .await
            .expect("SUBACK in time")
            .expect("connection open");
        codes[0]
    }

    /// Publishes one message from this client (for No Local and request/response tests).
    pub async fn publish(&self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
        if let Some(c) = &self.v4 {
            c.publish(topic, qos_v4(qos), retain, payload.to_vec())
                .await
                .expect("publish");
        } else if let Some(c) = &self.v5 {
            c.publish(topic, qos_v5(qos), retain, payload.to_vec())
                .await
                .expect("publish");
        }
    }

    /// MQTT 5: publishes a reply with a Response Topic-style correlation.
    pub async fn publish_correlated(&self, topic: &str, payload: &[u8], correlation: &[u8]) {
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        let c = self.v5.as_ref().expect("an MQTT 5 client");
        let props = PublishProperties {
            correlation_data: Some(bytes::Bytes::copy_from_slice(correlation)),
            ..PublishProperties::default()
        };
        c.publish_with_properties(topic, qos_v5(1), false, payload.to_vec(), props)
            .await
            .expect("publish");
    }

    /// The next `n` messages, or fewer if none arrives for `quiet`.
    pub async fn recv(&mut self, n: usize, quiet: Duration) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout(quiet, self.received.recv()).await {
                Ok(Some(r)) => out.push(r),
                _ => break,
            }
        }
        out
    }

    /// Disconnects cleanly (DISCONNECT, so no will).
    pub async fn disconnect(self) {
        if let Some(c) = &self.v4 {
            let _ = c.disconnect().await;
        } else if let Some(c) = &self.v5 {
            let _ = c.disconnect().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }

    /// Drops the connection without DISCONNECT.
    pub fn abort(self) {
        self.task.abort();
    }
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    [
        rumqttc::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce,
    ][usize::from(qos.min(2))]
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(qos.min(2))]
}

fn connect_v4(
    addr: SocketAddr,
    o: &SubscriberOptions,
    tx: mpsc::UnboundedSender<Received>,
    sub_tx: mpsc::UnboundedSender<Vec<u8>>,
    connack: tokio::sync::oneshot::Sender<bool>,
) -> (rumqttc::AsyncClient, tokio::task::JoinHandle<()>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, SubscribeReasonCode};
    let mut options = MqttOptions::new(&o.client_id, addr.ip().to_string(), addr.port());
    options
        .set_clean_session(o.clean)
        .set_keep_alive(Duration::from_secs(30))
        .set_manual_acks(!o.ack)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let mut connack = Some(connack);
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::ConnAck(c)) => {
                    if let Some(tx) = connack.take() {
                        let _ = tx.send(c.session_present);
                    }
                }
                Event::Incoming(Packet::SubAck(s)) => {
                    let codes = s
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            SubscribeReasonCode::Success(q) => *q as u8,
                            SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect();
                    let _ = sub_tx.send(codes);
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(Received {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        dup: p.dup,
                        subscription_ids: Vec::new(),
                        correlation_data: None,
                        response_topic: None,
                        user_properties: Vec::new(),
                    });
                }
                _ => {}
            }
        }
    });
    (client, task)
}

fn connect_v5(
    addr: SocketAddr,
    o: &SubscriberOptions,
    tx: mpsc::UnboundedSender<Received>,
    sub_tx: mpsc::UnboundedSender<Vec<u8>>,
    connack: tokio::sync::oneshot::Sender<bool>,
) -> (rumqttc::v5::AsyncClient, tokio::task::JoinHandle<()>) {
    use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet, SubscribeReasonCode};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut options = MqttOptions::new(&o.client_id, addr.ip().to_string(), addr.port());
    options
        .set_clean_start(o.clean)
        .set_keep_alive(Duration::from_secs(30))
        .set_manual_acks(!o.ack);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(o.session_expiry);
    props.max_packet_size = Some(1 << 20);
    options.set_connect_properties(props);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let mut connack = Some(connack);
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::ConnAck(c)) => {
                    if let Some(tx) = connack.take() {
                        let _ = tx.send(c.session_present);
                    }
                }
                Event::Incoming(Packet::SubAck(s)) => {
                    let codes = s
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            SubscribeReasonCode::Success(q) => *q as u8,
                            other => suback_code(other),
                        })
                        .collect();
                    let _ = sub_tx.send(codes);
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let props = p.properties.clone().unwrap_or_default();
                    let _ = tx.send(Received {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        dup: p.dup,
                        subscription_ids: props.subscription_identifiers.clone(),
                        correlation_data: props.correlation_data.map(|b| b.to_vec()),
                        response_topic: props.response_topic.clone(),
                        user_properties: props.user_properties.clone(),
                    });
                }
                _ => {}
            }
        }
    });
    (client, task)
}

fn suback_code(code: &rumqttc::v5::mqttbytes::v5::SubscribeReasonCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as C;
    match code {
        C::Success(q) => *q as u8,
        C::Unspecified | C::Failure => 0x80,
        C::ImplementationSpecific => 0x83,
        C::NotAuthorized => 0x87,
        C::TopicFilterInvalid => 0x8f,
        C::PkidInUse => 0x91,
        C::QuotaExceeded => 0x97,
        C::SharedSubscriptionsNotSupported => 0x9e,
        C::SubscriptionIdNotSupported => 0xa1,
        C::WildcardSubscriptionsNotSupported => 0xa2,
    }
}

/// `mosquitto_sub` against `addr`, as a child process that prints what it receives.
pub fn mosquitto_sub(addr: SocketAddr, args: &[&str]) -> Child {
    Command::new("mosquitto_sub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mosquitto_sub (Debian: mosquitto-clients)")
}
