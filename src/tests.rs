//! The whole gateway started in process (`start`, no Kafka reachable) and reloaded through its
//! control channel, as SIGHUP does: a reloaded setting reaches every stage that uses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{Control, start};

const PATIENCE: Duration = Duration::from_secs(10);

/// Writes the gateway's config file; returns its path.
fn write_config(dir: &Path, anonymous: &str) -> PathBuf {
    let text = format!(
        "[gateway]\nshutdown_grace = \"1s\"\n\n\
         [buffer]\ndir = \"{}\"\nsegment_size = \"1MiB\"\nmax_size = \"64MiB\"\n\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\n\n[coap]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin]\nenabled = false\n\n[kafka]\nbrokers = [\"127.0.0.1:1\"]\n\n\
         [auth]\nanonymous = \"{anonymous}\"\n\n[default_route]\ntopic = \"t\"\n",
        dir.join("log").display()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

/// A confirmable POST to `/t/dev`; returns the answer's code.
async fn post(client: &UdpSocket, to: SocketAddr, mid: u16) -> u8 {
    let mut request = Packet::new();
    request.header.set_type(MessageType::Confirmable);
    request.header.code = MessageClass::Request(RequestType::Post);
    request.header.message_id = mid;
    request.add_option(CoapOption::UriPath, b"t".to_vec());
    request.add_option(CoapOption::UriPath, b"dev".to_vec());
    request.payload = b"x".to_vec();
    let datagram = request.to_bytes().expect("encode");
    client.send_to(&datagram, to).await.expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(PATIENCE, client.recv_from(&mut buf))
        .await
        .expect("an answer in time")
        .expect("recv");
    let answer = Packet::from_bytes(&buf[..n]).expect("a CoAP answer");
    assert_eq!(answer.header.message_id, mid);
    u8::from(answer.header.code)
}

/// CoAP devices are anonymous, so `[auth] anonymous` decides whether they are served; a
/// reload that changes it applies to the next request, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_who_may_send_over_coap() {
    const CHANGED: u8 = 0x44;
    const UNAUTHORIZED: u8 = 0x81;
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let config = Config::load(&write_config(dir.path(), "never")).expect("a valid config");
    let gateway = start(config, shutdown.clone()).await.expect("start");
    let coap = gateway.coap_addr().expect("CoAP is enabled");
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(post(&client, coap, 1).await, UNAUTHORIZED);

    gateway.control(Control::Reload(write_config(dir.path(), "loopback")));
    assert_eq!(
        post(&client, coap, 2).await,
        CHANGED,
        "admitted after the reload"
    );

    gateway.control(Control::Reload(write_config(dir.path(), "never")));
    assert_eq!(
        post(&client, coap, 3).await,
        UNAUTHORIZED,
        "refused after the reload"
    );

    shutdown.cancel();
    let (_control, no_more) = tokio::sync::mpsc::channel(1);
    gateway.wait(no_more).await.expect("a clean stop");
}
