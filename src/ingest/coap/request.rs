//! Whether a request may be stored, before its body is known: the anonymous policy, options,
//! path, method, Block1, the log's pressure ([`check`]); the answers a refusal gets
//! ([`Refusal`], [`rejection`]); and the same path without a socket for the fuzz target
//! ([`classify`]).

use std::net::SocketAddr;

use coap_lite::{MessageClass, Packet, RequestType};

use super::block::TransferKey;
use super::config::{CoapConfig, valid_segment};
use super::message::{self, Block, code, opt};
use crate::auth::config::Anonymous;
use crate::ingest::{Delivery, Rejected};
use crate::route::RouteError;

/// Everything that can refuse a request before its body is known: options, path, method,
/// Block1, the log's pressure. A free function so the fuzz entry runs exactly this.
pub(super) fn check(
    config: &CoapConfig,
    anonymous: Anonymous,
    packet: &Packet,
    peer: SocketAddr,
    closing: bool,
    high: bool,
) -> Result<Accepted, Refusal> {
    if closing {
        return Err(Refusal::busy("shutting down"));
    }
    if !anonymous.admits(peer.ip()) {
        let device = packet
            .get_option(coap_lite::CoapOption::UriPath)
            .and_then(|l| l.iter().nth(1))
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .unwrap_or_default();
        crate::auth::failed(peer, &device, "anonymous");
        return Err(Refusal::new(
            code::UNAUTHORIZED,
            "anonymous devices are not accepted from this address",
        ));
    }
    if let Some((&number, _)) = packet
        .options()
        .find(|(n, _)| **n % 2 == 1 && !opt::understood_critical(**n))
    {
        tracing::debug!(%peer, option = number, "Refused a CoAP request with an unknown critical option.");
        return Err(Refusal::new(code::BAD_OPTION, "unknown critical option"));
    }
    if message::first(packet, opt::PROXY_URI).is_some()
        || message::first(packet, opt::PROXY_SCHEME).is_some()
    {
        return Err(Refusal::new(code::PROXYING_NOT_SUPPORTED, "not a proxy"));
    }
    let segments: Vec<&[u8]> = packet
        .get_option(coap_lite::CoapOption::UriPath)
        .map(|l| l.iter().map(Vec::as_slice).collect())
        .unwrap_or_default();
    let Some((resource, rest)) = segments.split_first() else {
        return Err(Refusal::new(code::NOT_FOUND, "no such resource"));
    };
    if *resource != config.resource.as_bytes() || rest.is_empty() {
        return Err(Refusal::new(code::NOT_FOUND, "no such resource"));
    }
    let mut levels = Vec::with_capacity(rest.len());
    for segment in rest {
        match std::str::from_utf8(segment) {
            Ok(s) if valid_segment(s) => levels.push(s),
            _ => {
                return Err(Refusal::new(
                    code::BAD_REQUEST,
                    "path segments must be UTF-8 without / + # or control characters",
                ));
            }
        }
    }
    let device = levels[0];
    if device.len() > config.max_device_len {
        return Err(Refusal::new(code::BAD_REQUEST, "device id too long"));
    }
    let method = match packet.header.code {
        MessageClass::Request(RequestType::Post) => "POST",
        MessageClass::Request(RequestType::Put) => "PUT",
        _ => {
            return Err(Refusal::new(
                code::METHOD_NOT_ALLOWED,
                "POST or PUT telemetry",
            ));
        }
    };
    let block = match message::first(packet, opt::BLOCK1) {
        None => None,
        Some(value) => Some(
            Block::decode(value)
                .ok_or_else(|| Refusal::new(code::BAD_OPTION, "bad Block1 value"))?,
        ),
    };
    if high {
        return Err(Refusal::busy("the log is nearly full"));
    }
    let content_format = match message::first(packet, opt::CONTENT_FORMAT) {
        None => None,
        Some(value) => Some(
            message::uint(value)
                .filter(|v| *v <= 0xFFFF)
                .ok_or_else(|| Refusal::new(code::BAD_REQUEST, "bad Content-Format value"))?,
        ),
    };
    let topic = format!("{}/{}", config.topic_prefix, levels.join("/"));
    let uri_path = format!("/{}", {
        let mut all = vec![config.resource.as_str()];
        all.extend(&levels);
        all.join("/")
    });
    Ok(Accepted {
        device: device.to_owned(),
        topic,
        uri_path,
        method,
        content_format,
        block,
    })
}

/// What `check` learned about an acceptable request.
pub(super) struct Accepted {
    pub(super) device: String,
    pub(super) topic: String,
    pub(super) uri_path: String,
    pub(super) method: &'static str,
    pub(super) content_format: Option<u32>,
    pub(super) block: Option<Block>,
}

/// An answer before it is framed as ACK, NON or CON.
pub(super) struct Refusal {
    pub(super) code: u8,
    pub(super) options: Vec<(u16, Vec<u8>)>,
    pub(super) diagnostic: &'static str,
}

impl Refusal {
    pub(super) fn new(code: u8, diagnostic: &'static str) -> Refusal {
        Refusal {
            code,
            options: Vec::new(),
            diagnostic,
        }
    }

    pub(super) fn busy(diagnostic: &'static str) -> Refusal {
        Refusal::new(code::UNAVAILABLE, diagnostic)
    }

    pub(super) fn too_large(size1: u32, block_hint: Option<Block>) -> Refusal {
        let mut options = vec![(opt::SIZE1, message::uint_bytes(size1))];
        if let Some(hint) = block_hint {
            options.push((opt::BLOCK1, hint.encode()));
        }
        Refusal {
            code: code::TOO_LARGE,
            options,
            diagnostic: "request too large",
        }
    }
}

/// Maps a refusal of the pipeline to a CoAP answer; logs and counts it.
pub(super) fn rejection(
    rejected: &Rejected,
    peer: SocketAddr,
    confirmable: bool,
    size1: u32,
) -> Refusal {
    crate::ingest::refused(Delivery::Coap { confirmable }, rejected, peer, None);
    match rejected {
        // The topic the path names leads nowhere: for the device, no such resource.
        Rejected::Route(RouteError::NoRoute(_)) => Refusal::new(code::NOT_FOUND, "no route"),
        // The device or stream name cannot make a Kafka topic: the request is at fault.
        Rejected::Route(RouteError::InvalidKafkaTopic { .. }) => {
            Refusal::new(code::BAD_REQUEST, "path makes an invalid Kafka topic")
        }
        Rejected::Full => Refusal::busy("the log is full"),
        Rejected::Closed => Refusal::busy("shutting down"),
        Rejected::TooLarge(_) => Refusal::too_large(size1, None),
        Rejected::Io(_) => Refusal::new(code::INTERNAL_ERROR, "could not store"),
    }
}

pub(super) fn transfer_key(packet: &Packet, peer: SocketAddr) -> TransferKey {
    let mut uri = Vec::new();
    for number in [opt::URI_PATH, opt::URI_QUERY] {
        for value in packet
            .get_option(coap_lite::CoapOption::from(number))
            .into_iter()
            .flatten()
        {
            uri.push(number as u8);
            uri.extend_from_slice(&(value.len() as u32).to_be_bytes());
            uri.extend_from_slice(value);
        }
    }
    TransferKey {
        peer,
        uri,
        request_tag: message::first(packet, opt::REQUEST_TAG).map(<[u8]>::to_vec),
    }
}

/// The datagram → request path of `Server::on_datagram` without a socket or a log, for the
/// fuzz target: framing and parse, classification by type and code, [`check`], the Block1
/// transfer key, and the encoding of the answer sent at once (a Reset, a refusal, or the 2.04
/// an accepted request would get). Returns that answer, `None` when nothing would be sent.
/// Oversized datagrams are out of scope: the receive buffer never holds one.
///
/// # Panics
///
/// When an answer does not parse back: the gateway must never send what it would refuse.
#[cfg(any(test, feature = "fuzz"))]
pub(super) fn classify(config: &CoapConfig, datagram: &[u8]) -> Option<Vec<u8>> {
    use super::message::Reply;
    use coap_lite::MessageType;
    let peer = SocketAddr::from(([127, 0, 0, 1], 5683));
    let reset = |mid| Reply::empty(MessageType::Reset, mid).encode();
    let packet = match message::parse(datagram) {
        Ok(packet) => packet,
        Err(malformed) => return malformed.reset.and_then(reset),
    };
    let mid = packet.header.message_id;
    match (packet.header.get_type(), packet.header.code) {
        (MessageType::Acknowledgement | MessageType::Reset, _) => return None,
        (MessageType::Confirmable, MessageClass::Empty) => return reset(mid),
        (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Request(_)) => {}
        (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Reserved(c))
            if c >> 5 == 0 => {}
        (kind, _) => {
            return (kind == MessageType::Confirmable)
                .then_some(mid)
                .and_then(reset);
        }
    }
    let (code, options, diagnostic) =
        match check(config, Anonymous::Always, &packet, peer, false, false) {
            Err(refusal) => (refusal.code, refusal.options, refusal.diagnostic),
            Ok(accepted) => {
                if accepted.block.is_some() {
                    let _ = transfer_key(&packet, peer);
                }
                let options = accepted
                    .block
                    .map(|b| vec![(opt::BLOCK1, b.encode())])
                    .unwrap_or_default();
                (code::CHANGED, options, "")
            }
        };
    if message::suppresses(message::no_response(&packet), code) {
        return None;
    }
    let confirmable = packet.header.get_type() == MessageType::Confirmable;
    let answer = Reply {
        kind: if confirmable {
            MessageType::Acknowledgement
        } else {
            MessageType::NonConfirmable
        },
        code,
        mid,
        token: packet.get_token().to_vec(),
        options,
        payload: diagnostic,
    }
    .encode()?;
    assert!(
        message::parse(&answer).is_ok(),
        "the answer to {datagram:02x?} does not parse: {answer:02x?}"
    );
    Some(answer)
}
