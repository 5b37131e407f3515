//! Device security, black box: the gateway with `[mqtt.tls]` and `[auth]`, certificates
//! generated here with rcgen (a device CA, a server certificate, good, expired, self-signed
//! and foreign client certificates), passwords written by `edgegate passwd`, real clients
//! (`mosquitto_pub`, rumqttc over rustls with ring), and records read back from the test
//! Kafka broker. The gateway runs in process, and as the real `edgegate` binary where a test
//! reads its log lines or sends it SIGHUP.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::GatewayToml;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::{Event, Packet, QoS};
use tokio_rustls::rustls;

/// A certificate authority that signs server and device certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its key (PEM).
    fn leaf(&self, cn: &str, sans: &[&str], server: bool, expired: bool) -> (String, String) {
        let (params, key) = leaf_params(cn, sans, server, expired);
        let cert = params.signed_by(&key, &*self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

fn leaf_params(
    cn: &str,
    sans: &[&str],
    server: bool,
    expired: bool,
) -> (CertificateParams, KeyPair) {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(sans).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    (params, KeyPair::generate().expect("key"))
}

/// A self-signed device certificate: right name, no trusted issuer.
fn self_signed(cn: &str) -> (String, String) {
    let (params, key) = leaf_params(cn, &[], false, false);
    let cert = params.self_signed(&key).expect("self-sign");
    (cert.pem(), key.serialize_pem())
}

/// Every file of the test PKI, written into a directory.
struct Pki {
    dir: PathBuf,
    devices: Ca,
    servers: Ca,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.to_owned(),
            devices: Ca::new("edgegate test device CA"),
            servers: Ca::new("edgegate test server CA"),
        };
        pki.write("devices-ca.crt", &pki.devices.pem());
        pki.write("server-ca.crt", &pki.servers.pem());
        let (cert, key) = pki
            .servers
            .leaf("gateway", &["localhost", "127.0.0.1"], true, false);
        pki.write("server.crt", &cert);
        pki.write("server.key", &key);
        pki.device("pump7", &pki.devices, false);
        pki.device("pump8", &pki.devices, false);
        pki.device("pump-old", &pki.devices, true);
        let (cert, key) = self_signed("pump7");
        pki.write("selfsigned.crt", &cert);
        pki.write("selfsigned.key", &key);
        let stranger = Ca::new("someone else's CA");
        pki.write("stranger-ca.crt", &stranger.pem());
        let (cert, key) = stranger.leaf("pump7", &[], false, false);
        pki.write("stranger.crt", &cert);
        pki.write("stranger.key", &key);
        pki
    }

    fn device(&self, cn: &str, ca: &Ca, expired: bool) {
        let (cert, key) = ca.leaf(cn, &[], false, expired);
        self.write(&format!("{cn}.crt"), &cert);
        self.write(&format!("{cn}.key"), &key);
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.join(name), text).expect("write pem");
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

const PASSWORD: &str = "correct horse battery staple";

/// A gateway with TLS on one port and plaintext on another, anonymous clients on loopback
/// (the default) and `sensor1` in its password file, about to start; its directory holds the
/// test PKI. `tune` adds to the config.
fn setup(topic: &str, tune: impl FnOnce(GatewayToml) -> GatewayToml) -> (common::Builder, Pki) {
    let config = GatewayToml::new()
        .id("tls-gw")
        .without_coap()
        .without_admin()
        .mqtt("connect_timeout", "2s")
        .with_mqtt_tls("server.crt", "server.key")
        .mqtt_tls("client_ca", "devices-ca.crt")
        .mqtt_tls("client_certs", "optional")
        .mqtt_tls("handshake_timeout", "2s")
        .auth("password_file", "passwd")
        .route("#", topic);
    let builder = common::gateway(tune(config));
    let pki = Pki::new(builder.dir());
    passwd_add(&builder.dir().join("passwd"), "sensor1", PASSWORD);
    (builder, pki)
}

/// No anonymous clients, and each device may publish under `devices/<its client id>/` only.
fn devices_only(config: GatewayToml) -> GatewayToml {
    config
        .auth("anonymous", "never")
        .raw("[[auth.rules]]\npublish = [\"devices/{client_id}/#\"]\n")
}

/// `mosquitto_pub` over TLS to `localhost` (the name in the server certificate), trusting the
/// server CA, with `args`; its output. Killed after 20 s.
fn mosquitto_tls(pki: &Pki, addr: SocketAddr, args: &[&str]) -> Output {
    common::mosquitto_pub(addr)
        .host("localhost")
        .args(["--cafile", &pki.path("server-ca.crt")])
        .args(args)
        .timeout(Duration::from_secs(20))
        .run()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `edgegate passwd --file <file> <user>`, the password on stdin.
fn passwd_add(file: &Path, user: &str, password: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["passwd", "--file"])
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edgegate passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success(), "{}", text(&output));
}

/// A rustls client configuration (ring) trusting `ca` and presenting `cert`/`key` if given.
fn client_tls(pki: &Pki, ca: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path(ca)).expect("ca") {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(pki.path(cert))
                .expect("cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_file(pki.path(key)).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

fn rumqttc_options(
    addr: SocketAddr,
    client_id: &str,
    tls: Arc<rustls::ClientConfig>,
) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", addr.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(20)
        .set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    options
}

/// Publishes `payloads` at QoS 1 with rumqttc (3.1.1) over TLS and returns how many were
/// PUBACKed.
async fn publish_tls(
    addr: SocketAddr,
    client_id: &str,
    tls: Arc<rustls::ClientConfig>,
    topic: &str,
    payloads: Vec<String>,
) -> usize {
    let payloads = payloads.into_iter().map(String::into_bytes).collect();
    common::rumqttc(addr, client_id)
        .tls(tls)
        .publish(topic, payloads)
        .await
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_with_a_certificate_or_a_password_publish_over_tls_and_arrive_in_kafka() {
    let topic = common::unique_topic("tls-ok");
    common::create_topic(&topic, 1);
    let (builder, pki) = setup(&topic, devices_only);
    let gateway = builder.start();
    // The passwd file holds a hash, is 0600, and never the password.
    let passwd = std::fs::read_to_string(gateway.dir().join("passwd")).expect("passwd");
    assert!(passwd.starts_with("sensor1:$argon2id$"), "{passwd}");
    assert!(!passwd.contains(PASSWORD));

    // mosquitto_pub with a client certificate (TLS 1.3 and 1.2) ...
    for (version, message) in [("tlsv1.3", "cert-13"), ("tlsv1.2", "cert-12")] {
        let out = mosquitto_tls(
            &pki,
            gateway.mqtts_addr(),
            &[
                "--cert",
                &pki.path("pump7.crt"),
                "--key",
                &pki.path("pump7.key"),
                "--tls-version",
                version,
                "-i",
                "pump7",
                "-q",
                "1",
                "-t",
                "devices/pump7/temp",
                "-m",
                message,
            ],
        );
        assert!(out.status.success(), "{version}: {}", text(&out));
    }
    // ... and with a username and password, no certificate, MQTT 5.
    let out = mosquitto_tls(
        &pki,
        gateway.mqtts_addr(),
        &[
            "-V",
            "mqttv5",
            "-u",
            "sensor1",
            "-P",
            PASSWORD,
            "-i",
            "sensor1",
            "-q",
            "1",
            "-t",
            "devices/sensor1/x",
            "-m",
            "password-5",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    // rumqttc over rustls (ring) with the device certificate: 200 QoS 1 messages.
    let tls = client_tls(&pki, "server-ca.crt", Some(("pump7.crt", "pump7.key")));
    let payloads: Vec<String> = (0..200).map(|i| format!("rumqttc-{i}")).collect();
    let acked = publish_tls(
        gateway.mqtts_addr(),
        "pump7",
        tls,
        "devices/pump7/bulk",
        payloads,
    )
    .await;
    assert_eq!(acked, 200);

    let records = common::consume_all(&topic, 203, Duration::from_secs(60)).await;
    let payloads: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned())
        .collect();
    for expected in [
        "cert-13",
        "cert-12",
        "password-5",
        "rumqttc-0",
        "rumqttc-199",
    ] {
        assert!(payloads.iter().any(|p| p == expected), "{expected} missing");
    }
    assert_eq!(payloads.len(), 203, "{payloads:?}");
    let keys: Vec<&[u8]> = records.iter().filter_map(|r| r.key.as_deref()).collect();
    assert!(keys.iter().all(|k| *k == b"pump7" || *k == b"sensor1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_get_the_right_code_are_logged_and_are_not_stored() {
    let topic = common::unique_topic("tls-refused");
    common::create_topic(&topic, 1);
    // The binary: the refusals are checked in its log lines.
    let (builder, pki) = setup(&topic, devices_only);
    let gateway = builder.start_process();
    let pki = &pki;
    let cert_args = |name: &str| {
        vec![
            "--cert".to_owned(),
            pki.path(&format!("{name}.crt")),
            "--key".to_owned(),
            pki.path(&format!("{name}.key")),
        ]
    };
    let publish = |extra: Vec<String>, id: &str, topic: &str| {
        let mut args: Vec<String> = extra;
        args.extend(
            ["-i", id, "-q", "1", "-t", topic, "-m", "must-not-be-stored"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mosquitto_tls(pki, gateway.mqtts_addr(), &args)
    };

    // The client does not trust the gateway's CA: it refuses the handshake itself.
    let out = common::mosquitto_pub(gateway.mqtts_addr())
        .host("localhost")
        .args([
            "--cafile",
            &pki.path("stranger-ca.crt"),
            "-t",
            "devices/x/y",
            "-m",
            "x",
        ])
        .timeout(Duration::from_secs(20))
        .run();
    assert!(!out.status.success(), "wrong CA accepted: {}", text(&out));

    // Expired, self-signed and foreign client certificates: refused in the handshake, logged
    // with the subject they claimed. (TLS 1.2 for mosquitto_pub: there the server refuses the
    // certificate before the client's handshake completes, so mosquitto_pub exits instead of
    // reconnecting; TLS 1.3 is checked with rumqttc below.)
    let tls12 = |name: &str| {
        let mut args = cert_args(name);
        args.extend(["--tls-version".to_owned(), "tlsv1.2".to_owned()]);
        args
    };
    let out = publish(tls12("pump-old"), "pump-old", "devices/pump-old/t");
    assert!(!out.status.success(), "{}", text(&out));
    gateway.wait_for_log(&[
        "reason=\"certificate_expired\"",
        "cert_cn=pump-old",
        "peer=127.0.0.1",
    ]);
    let out = publish(tls12("selfsigned"), "pump7", "devices/pump7/t");
    assert!(!out.status.success(), "{}", text(&out));
    gateway.wait_for_log(&["certificate_unknown_issuer", "cert_cn=pump7"]);
    let out = publish(tls12("stranger"), "pump7", "devices/pump7/t");
    assert!(!out.status.success(), "{}", text(&out));
    let expired13 = client_tls(pki, "server-ca.crt", Some(("pump-old.crt", "pump-old.key")));
    let acked = publish_tls(
        gateway.mqtts_addr(),
        "pump-old",
        expired13,
        "devices/pump-old/t",
        vec!["must-not-be-stored".into()],
    )
    .await;
    assert_eq!(acked, 0);

    // Wrong password: CONNACK 0x04 (3.1.1) / 0x86 (5), logged with the username, never the
    // password.
    let out = publish(
        ["-u", "sensor1", "-P", "wrong"].map(str::to_owned).to_vec(),
        "sensor1",
        "devices/sensor1/t",
    );
    assert!(!out.status.success());
    assert!(
        text(&out)
            .to_lowercase()
            .contains("bad user name or password"),
        "{}",
        text(&out)
    );
    let line = gateway.wait_for_log(&["reason=\"bad_password\"", "sensor1"]);
    assert!(!line.contains("wrong"), "{line}");
    let out = publish(
        ["-V", "mqttv5", "-u", "nobody", "-P", "x"]
            .map(str::to_owned)
            .to_vec(),
        "nobody",
        "devices/nobody/t",
    );
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("bad user"),
        "{}",
        text(&out)
    );
    gateway.wait_for_log(&["reason=\"unknown_user\"", "nobody"]);

    // Anonymous is off: CONNACK 0x05 Not authorized.
    let out = publish(Vec::new(), "anon", "devices/anon/t");
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("not authori"),
        "{}",
        text(&out)
    );
    gateway.wait_for_log(&["reason=\"anonymous\""]);

    // The client id must match the certificate.
    let out = publish(cert_args("pump7"), "pump8", "devices/pump8/t");
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("not authori"),
        "{}",
        text(&out)
    );
    gateway.wait_for_log(&[
        "reason=\"client_id_mismatch\"",
        "client_id=pump8",
        "cert_cn=pump7",
    ]);

    // A publish outside the device's rights. 3.1.1: no PUBACK, disconnected.
    let tls = client_tls(pki, "server-ca.crt", Some(("pump7.crt", "pump7.key")));
    let acked = publish_tls(
        gateway.mqtts_addr(),
        "pump7",
        tls,
        "devices/pump8/t",
        vec!["must-not-be-stored".into()],
    )
    .await;
    assert_eq!(acked, 0);
    gateway.wait_for_log(&["reason=\"topic_denied\"", "topic=devices/pump8/t"]);
    // MQTT 5 over rumqttc: PUBACK 0x87, and the connection goes on to publish what it may.
    let tls = client_tls(pki, "server-ca.crt", Some(("pump7.crt", "pump7.key")));
    let reasons = v5_publish_reasons(
        gateway.mqtts_addr(),
        "pump7",
        tls,
        &[
            ("devices/pump9/t", "must-not-be-stored"),
            ("devices/pump7/t", "allowed"),
        ],
    )
    .await;
    assert_eq!(
        reasons,
        vec![
            rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized,
            rumqttc::v5::mqttbytes::v5::PubAckReason::Success
        ]
    );

    // Only the allowed publish reached Kafka.
    let records = common::consume_all(&topic, 1, Duration::from_secs(60)).await;
    let payloads: Vec<&[u8]> = records
        .iter()
        .filter_map(|r| r.payload.as_deref())
        .collect();
    assert_eq!(payloads, vec![b"allowed".as_slice()]);
}

/// Publishes each (topic, payload) at QoS 1 over MQTT 5 and returns the PUBACK reasons.
async fn v5_publish_reasons(
    addr: SocketAddr,
    client_id: &str,
    tls: Arc<rustls::ClientConfig>,
    messages: &[(&str, &str)],
) -> Vec<rumqttc::v5::mqttbytes::v5::PubAckReason> {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    use rumqttc::v5::{AsyncClient, Event as Event5, MqttOptions};
    let mut options = MqttOptions::new(client_id, "127.0.0.1", addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let mut reasons = Vec::new();
    for (topic, payload) in messages {
        client
            .publish(
                *topic,
                QoS5::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .expect("queue publish");
        loop {
            match tokio::time::timeout(Duration::from_secs(20), eventloop.poll()).await {
                Ok(Ok(Event5::Incoming(Packet5::PubAck(ack)))) => {
                    reasons.push(ack.reason);
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("MQTT 5 connection failed: {e}"),
                Err(_) => panic!("no PUBACK within 20 s"),
            }
        }
    }
    reasons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_holding_every_handshake_slot_block_neither_plaintext_nor_established_tls() {
    let topic = common::unique_topic("tls-idle");
    common::create_topic(&topic, 1);
    let (builder, pki) = setup(&topic, |c| c.mqtt_tls("max_handshakes", 2));
    let gateway = builder.start();
    let tls = client_tls(&pki, "server-ca.crt", Some(("pump7.crt", "pump7.key")));
    // An established TLS connection first.
    let (client, mut eventloop) = rumqttc::AsyncClient::new(
        rumqttc_options(gateway.mqtts_addr(), "pump7", tls.clone()),
        10,
    );
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK: {other:?}"),
        }
    }
    // Now idle sockets take both handshake slots and say nothing.
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(gateway.mqtts_addr()).expect("idle connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Plaintext is served at once.
    let started = Instant::now();
    let out = common::mosquitto_pub(gateway.mqtt_addr())
        .qos(1)
        .topic("plain/x")
        .timeout(Duration::from_secs(20))
        .message("plain-while-idle");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The established TLS connection keeps publishing.
    for i in 0..5 {
        client
            .publish(
                "devices/pump7/t",
                QoS::AtLeastOnce,
                false,
                format!("established-{i}"),
            )
            .await
            .expect("publish");
    }
    let mut acked = 0;
    while acked < 5 {
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("the established connection stalled: {other:?}"),
        }
    }
    // The idle sockets are closed after handshake_timeout (2 s), and new TLS clients get in.
    for mut socket in idle {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        assert_eq!(socket.read(&mut buf).expect("closed, not timed out"), 0);
    }
    let acked = publish_tls(
        gateway.mqtts_addr(),
        "pump7",
        tls,
        "devices/pump7/after",
        vec!["after-idle".into()],
    )
    .await;
    assert_eq!(acked, 1);
    let records = common::consume_all(&topic, 7, Duration::from_secs(60)).await;
    assert_eq!(records.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_under_load_and_refuses_a_bad_set() {
    let topic = common::unique_topic("tls-rotate");
    common::create_topic(&topic, 1);
    // The binary, for SIGHUP and its log lines.
    let (builder, pki) = setup(&topic, |c| c);
    let gateway = builder.start_process();
    let pki = &pki;
    // Clients trust both server CAs, so the publisher keeps reconnecting across the swap.
    let next = Ca::new("edgegate test server CA 2");
    pki.write("server-ca-2.crt", &next.pem());
    pki.write(
        "both-cas.crt",
        &format!("{}{}", pki.servers.pem(), next.pem()),
    );
    let tls_both = client_tls(pki, "both-cas.crt", Some(("pump7.crt", "pump7.key")));

    // Load: one client publishing QoS 1 the whole time, counting acks.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let options = rumqttc_options(gateway.mqtts_addr(), "pump7", tls_both.clone());
        tokio::spawn(async move {
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) || acked.load(Ordering::Relaxed) < sent {
                if !stop.load(Ordering::Relaxed) && sent < acked.load(Ordering::Relaxed) + 10 {
                    client
                        .try_publish(
                            "devices/pump7/load",
                            QoS::AtLeastOnce,
                            false,
                            format!("load-{sent}"),
                        )
                        .expect("queue");
                    sent += 1;
                }
                match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("the loaded connection failed: {e}"),
                    Err(_) => panic!("the loaded connection stalled"),
                }
            }
            sent
        })
    };
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while acked.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "load stalled at {}",
                    acked.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_acked(100).await;

    // Swap in a certificate from the second CA and reload.
    let (cert, key) = next.leaf("gateway-2", &["localhost", "127.0.0.1"], true, false);
    pki.write("server.crt", &cert);
    pki.write("server.key", &key);
    gateway.hup();
    gateway.wait_for_log(&["Reloaded the MQTT TLS certificate"]);
    let before = acked.load(Ordering::Relaxed);
    wait_acked(before + 100).await;

    // New connections see the new certificate: trusting only the new CA works, only the old
    // one does not.
    let only_new = client_tls(pki, "server-ca-2.crt", Some(("pump8.crt", "pump8.key")));
    assert_eq!(
        publish_tls(
            gateway.mqtts_addr(),
            "pump8",
            only_new,
            "devices/pump7-new/x",
            vec!["new-ca".into()]
        )
        .await,
        1
    );
    let out = mosquitto_tls(
        pki,
        gateway.mqtts_addr(),
        &["-t", "devices/x/y", "-m", "old-ca"],
    );
    assert!(
        !out.status.success(),
        "the old certificate is still served: {}",
        text(&out)
    );

    // A bad set (the key of another certificate): refused with an ERROR, the good one stays.
    let (_, other_key) = next.leaf("unrelated", &[], true, false);
    pki.write("server.key", &other_key);
    gateway.hup();
    let line = gateway.wait_for_log(&["ERROR", "Kept the MQTT TLS certificate in force"]);
    assert!(line.contains("server.key"), "{line}");
    let only_new = client_tls(pki, "server-ca-2.crt", Some(("pump8.crt", "pump8.key")));
    assert_eq!(
        publish_tls(
            gateway.mqtts_addr(),
            "pump8",
            only_new,
            "devices/pump7-new/x",
            vec!["still-new".into()]
        )
        .await,
        1
    );
    let before = acked.load(Ordering::Relaxed);
    wait_acked(before + 100).await;

    stop.store(true, Ordering::Relaxed);
    let sent = load.await.expect("load task");
    let total = acked.load(Ordering::Relaxed);
    assert_eq!(sent, total);
    // Every acknowledged message is in Kafka, once.
    let records = common::consume_all(&topic, total + 2, Duration::from_secs(120)).await;
    let mut loads: Vec<usize> = records
        .iter()
        .filter_map(|r| r.payload.as_deref())
        .filter_map(|p| {
            std::str::from_utf8(p)
                .ok()?
                .strip_prefix("load-")?
                .parse()
                .ok()
        })
        .collect();
    loads.sort_unstable();
    loads.dedup();
    assert_eq!(
        loads.len(),
        total,
        "acknowledged messages missing from Kafka"
    );
}

/// Certificate files replaced on disk (as certbot or a config-management run would) are
/// picked up without a signal: new connections get the new certificate, and a key that does
/// not match is refused with an ERROR while the good set stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_certificate_files_are_reloaded_without_a_signal() {
    let topic = common::unique_topic("tls-watch");
    // The binary: the reloads are checked in its log lines.
    let (builder, pki) = setup(&topic, |c| c.mqtt_tls("watch_interval", "200ms"));
    let gateway = builder.start_process();
    let pki = &pki;
    let next = Ca::new("edgegate test server CA 3");
    pki.write("server-ca-3.crt", &next.pem());
    let (cert, key) = next.leaf("gateway-3", &["localhost", "127.0.0.1"], true, false);
    pki.write("server.crt", &cert);
    pki.write("server.key", &key);
    gateway.wait_for_log(&["Reloaded the MQTT TLS certificate"]);
    // The key may have been read before it was rewritten: wait for the set that loads.
    let only_new = client_tls(pki, "server-ca-3.crt", Some(("pump8.crt", "pump8.key")));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let published = publish_tls(
            gateway.mqtts_addr(),
            "pump8",
            only_new.clone(),
            "devices/pump8/x",
            vec!["watched".into()],
        )
        .await;
        if published == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = mosquitto_tls(
        pki,
        gateway.mqtts_addr(),
        &["-t", "devices/x/y", "-m", "old-ca"],
    );
    assert!(!out.status.success(), "the old certificate is still served");

    let (_, other_key) = next.leaf("unrelated", &[], true, false);
    pki.write("server.key", &other_key);
    gateway.wait_for_log(&["ERROR", "Kept the MQTT TLS certificate in force"]);
    assert_eq!(
        publish_tls(
            gateway.mqtts_addr(),
            "pump8",
            only_new,
            "devices/pump8/x",
            vec!["still-watched".into()],
        )
        .await,
        1,
        "the good set stays in force"
    );
}

/// True if the gateway has closed the socket without being sent anything. Called within a
/// second of connecting: the connect timeout is 2 s, so only a flood limit closes this fast.
fn closed_at_once(mut socket: &TcpStream) -> bool {
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    match socket.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn a_connection_flood_from_one_address_is_closed_before_reading() {
    let topic = common::unique_topic("tls-flood");
    // Concurrent connections per address.
    let (builder, _pki) = setup(&topic, |c| c.mqtt("max_connections_per_address", 3));
    let gateway = builder.start();
    let connect = || TcpStream::connect(gateway.mqtt_addr()).expect("connect");
    let held: Vec<TcpStream> = (0..3).map(|_| connect()).collect();
    let fourth = connect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(closed_at_once(&fourth));
    // Over TLS too: the cap is per address over both listeners.
    let tls = TcpStream::connect(gateway.mqtts_addr()).expect("connect");
    std::thread::sleep(Duration::from_millis(200));
    assert!(closed_at_once(&tls));
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let out = common::mosquitto_pub(gateway.mqtt_addr())
        .topic("x")
        .timeout(Duration::from_secs(20))
        .message("ok");
    assert!(out.status.success(), "{}", text(&out));
    drop(gateway);

    // New connections per second from one address: a burst of 12 against a rate of 5 gets
    // 5 through and the rest closed at once.
    let (builder, _pki) = setup(&topic, |c| c.mqtt("connection_rate_per_address", 5));
    let gateway = builder.start();
    let burst: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(gateway.mqtt_addr()).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let refused = burst.iter().filter(|s| closed_at_once(s)).count();
    assert!((6..=7).contains(&refused), "{refused} of 12 refused");
}
