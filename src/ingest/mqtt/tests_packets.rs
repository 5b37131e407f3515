//! Unit tests of the packets a broker needs: SUBSCRIBE and UNSUBSCRIBE as data, the client's
//! acks of server publishes, the checks of the 3.1.1 decoder (`v4.rs`) and their MQTT 5
//! counterparts, the publish and will properties, and the hand-written encoders
//! (`encode.rs`), each encoder checked by an independent decoder: rumqttc's client-side v4
//! and v5 codecs.
//!
//! Every test names the normative statement it checks; 3.1.1's and 5's are numbered apart
//! (the version is in the test's name).

use bytes::{BufMut, Bytes, BytesMut};

use super::connection::Frame;
use super::encode::{EncodeError, OutPublish, encode_publish, encode_publish_within};
use super::packet::{
    self, ConnAckProps, DecodeError, Limits, Outgoing, Packet, Subscription, Version,
};
use super::tests::{frame, string, v5_publish_body};

const LIMITS: Limits = Limits {
    max_user_properties: 4,
};

/// Frames `byte1` + `body` through a real socket and decodes it as `version`.
async fn decode(version: Version, byte1: u8, body: &[u8]) -> Result<Packet, DecodeError> {
    packet::decode(version, frame(byte1, body).await, &LIMITS)
}

fn subscription(filter: &str, qos: u8) -> Subscription {
    Subscription {
        filter: filter.into(),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    }
}

// ---- 3.1.1 CONNECT ------------------------------------------------------------------------

/// A 3.1.1 CONNECT: `flags` as given, then the payload fields in order.
fn v4_connect(flags: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4);
    body.push(flags);
    body.put_u16(30);
    for f in fields {
        body.put_u16(f.len() as u16);
        body.extend_from_slice(f);
    }
    body
}

/// The same fields as an MQTT 5 CONNECT (no properties; a will gets an empty will
/// property section before its topic, when `will_at` says where the will starts).
fn v5_connect(flags: u8, fields: &[&[u8]], will_at: Option<usize>) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(5);
    body.push(flags);
    body.put_u16(30);
    body.push(0);
    for (i, f) in fields.iter().enumerate() {
        if will_at == Some(i) {
            body.push(0);
        }
        body.put_u16(f.len() as u16);
        body.extend_from_slice(f);
    }
    body
}

async fn refused_by_both(flags: u8, fields: &[&[u8]], will_at: Option<usize>, what: &str) {
    let v4 = decode(Version::V4, 0x10, &v4_connect(flags, fields)).await;
    assert!(v4.is_err(), "3.1.1, {what}: {v4:?}");
    let v5 = decode(Version::V5, 0x10, &v5_connect(flags, fields, will_at)).await;
    assert!(v5.is_err(), "5, {what}: {v5:?}");
}

#[tokio::test]
async fn v4_connect_reserved_flag_closes_mqtt_3_1_2_3() {
    // 3.1.1 [MQTT-3.1.2-3]; MQTT 5 [MQTT-3.1.2-3] too.
    let got = decode(Version::V4, 0x10, &v4_connect(0x03, &[b"dev"])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("reserved CONNECT flag set"))
    );
    refused_by_both(0x03, &[b"dev"], None, "reserved flag").await;
}

#[tokio::test]
async fn v4_connect_nul_in_client_id_user_name_or_will_topic_closes_mqtt_1_5_3_2() {
    // 3.1.1 [MQTT-1.5.3-2]; MQTT 5 [MQTT-1.5.4-2].
    for (what, flags, fields, will_at) in [
        ("client id", 0x02, vec![&b"d\0v"[..]], None),
        ("user name", 0x82, vec![&b"dev"[..], b"u\0"], None),
        (
            "will topic",
            0x06,
            vec![&b"dev"[..], b"w\0", b"bye"],
            Some(1),
        ),
    ] {
        let got = decode(Version::V4, 0x10, &v4_connect(flags, &fields)).await;
        assert!(
            matches!(
                got,
                Err(DecodeError::Malformed("string contains U+0000") | DecodeError::TopicInvalid(_))
            ),
            "{what}: {got:?}"
        );
        refused_by_both(flags, &fields, will_at, what).await;
    }
}

#[tokio::test]
async fn v4_connect_password_without_user_name_closes_mqtt_3_1_2_22() {
    // 3.1.1 [MQTT-3.1.2-22]: refused by the decoder, so the session sends no CONNACK (a
    // 3.1.1 refusal of a CONNECT that fails to decode is never encoded).
    let got = decode(Version::V4, 0x10, &v4_connect(0x42, &[b"dev", b"secret"])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("password without a user name"))
    );
    let mut out = BytesMut::new();
    let refusal = Outgoing::ConnAck(Err(packet::Refusal::Invalid(0x81)));
    assert!(!packet::encode(Version::V4, &refusal, &mut out));
    assert!(out.is_empty());
    // MQTT 5 allows a password alone (3.1.2.9).
    match decode(
        Version::V5,
        0x10,
        &v5_connect(0x42, &[b"dev", b"secret"], None),
    )
    .await
    {
        Ok(Packet::Connect(c)) => {
            assert_eq!(c.username, None);
            assert_eq!(c.password.map(|p| p.0), Some(Bytes::from_static(b"secret")));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn v4_connect_bytes_after_the_payload_close() {
    // 3.1.1 3.1.3: the payload is the fields the flags announce, and nothing else.
    let mut body = v4_connect(0x02, &[b"dev"]);
    body.push(0);
    let got = decode(Version::V4, 0x10, &body).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("bytes after the end of the packet"))
    );
    let mut body = v5_connect(0x02, &[b"dev"], None);
    body.push(0);
    let got = decode(Version::V5, 0x10, &body).await;
    assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
}

#[tokio::test]
async fn v4_connect_will_qos_and_retain_need_a_will_mqtt_3_1_2_11_to_15() {
    // Will QoS 3 [MQTT-3.1.2-14]; will QoS [MQTT-3.1.2-13] or will retain [MQTT-3.1.2-15]
    // without the will flag ([MQTT-3.1.2-11]). MQTT 5: [MQTT-3.1.2-11] to -13.
    for (flags, fields, will_at) in [
        (0x1e, vec![&b"dev"[..], b"w", b"bye"], Some(1)),
        (0x0a, vec![&b"dev"[..]], None),
        (0x22, vec![&b"dev"[..]], None),
    ] {
        let got = decode(Version::V4, 0x10, &v4_connect(flags, &fields)).await;
        assert_eq!(
            got.err(),
            Some(DecodeError::Malformed(
                "will QoS or retain without a valid will"
            )),
            "flags {flags:#04x}"
        );
        refused_by_both(flags, &fields, will_at, "will flags").await;
    }
}

#[tokio::test]
async fn v4_connect_decodes_every_field_and_a_binary_password() {
    // The password is Binary Data (3.1.3.5), not a string: any bytes.
    let body = v4_connect(
        0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02,
        &[
            b"dev-7",
            b"plant/dev-7/status",
            b"gone",
            b"user",
            &[0xff, 0x00, 0xfe],
        ],
    );
    match decode(Version::V4, 0x10, &body).await {
        Ok(Packet::Connect(c)) => {
            assert_eq!(c.client_id, "dev-7");
            assert!(c.clean_start);
            assert_eq!(c.keep_alive, 30);
            assert_eq!(c.username.as_deref(), Some("user"));
            assert_eq!(
                c.password.map(|p| p.0),
                Some(Bytes::from_static(&[0xff, 0x00, 0xfe]))
            );
            assert_eq!((c.receive_maximum, c.maximum_packet_size), (u16::MAX, None));
            let will = c.will.expect("a will");
            assert_eq!(will.topic, "plant/dev-7/status");
            assert_eq!(will.payload, Bytes::from_static(b"gone"));
            assert_eq!((will.qos, will.retain), (1, true));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn v4_connect_with_an_empty_user_name_and_no_password_stays_anonymous() {
    // What rumqttc's codec did, kept so such 3.1.1 devices connect as before.
    for body in [
        v4_connect(0x82, &[b"dev", b""]),
        v4_connect(0xc2, &[b"dev", b"", b""]),
    ] {
        match decode(Version::V4, 0x10, &body).await {
            Ok(Packet::Connect(c)) => {
                assert!(c.username.is_none() && c.password.is_none(), "{c:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    // With a password, the empty name is a login to check.
    match decode(Version::V4, 0x10, &v4_connect(0xc2, &[b"dev", b"", b"pw"])).await {
        Ok(Packet::Connect(c)) => assert_eq!(c.username.as_deref(), Some("")),
        other => panic!("{other:?}"),
    }
}

// ---- SUBSCRIBE -----------------------------------------------------------------------------

/// A SUBSCRIBE body: packet id, MQTT 5 properties (`None` for 3.1.1), (filter, options).
fn subscribe_body(pkid: u16, props: Option<&[u8]>, filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u16(pkid);
    if let Some(props) = props {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    for (filter, options) in filters {
        body.put_u16(filter.len() as u16);
        body.extend_from_slice(filter);
        body.push(*options);
    }
    body
}

#[tokio::test]
async fn v4_subscribe_decodes_every_filter_in_order() {
    let body = subscribe_body(9, None, &[(b"a/+/c", 0), (b"b/#", 2), (b"$share/g/x", 1)]);
    match decode(Version::V4, 0x82, &body).await {
        Ok(Packet::Subscribe(s)) => {
            assert_eq!(s.pkid, 9);
            assert_eq!((s.id, s.user_properties.len()), (None, 0));
            assert_eq!(
                s.filters,
                [
                    subscription("a/+/c", 0),
                    subscription("b/#", 2),
                    subscription("$share/g/x", 1)
                ]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn v4_subscribe_packet_id_0_closes_mqtt_2_3_1_1() {
    let got = decode(Version::V4, 0x82, &subscribe_body(0, None, &[(b"a", 1)])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("packet identifier 0"))
    );
    // MQTT 5 [MQTT-2.2.1-3].
    let got = decode(
        Version::V5,
        0x82,
        &subscribe_body(0, Some(&[]), &[(b"a", 1)]),
    )
    .await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("packet identifier 0"))
    );
}

#[tokio::test]
async fn v4_subscribe_reserved_bits_or_qos_3_close_mqtt_3_8_3_4() {
    // 3.1.1 [MQTT-3.8.3-4] (printed MQTT-3-8.3-4): the requested-QoS byte is 0, 1 or 2.
    for options in [0x03, 0x04, 0x09, 0x80] {
        let got = decode(
            Version::V4,
            0x82,
            &subscribe_body(1, None, &[(b"a", options)]),
        )
        .await;
        assert_eq!(
            got.err(),
            Some(DecodeError::Malformed("requested QoS byte")),
            "options {options:#04x}"
        );
    }
}

#[tokio::test]
async fn v4_subscribe_without_a_filter_closes_mqtt_3_8_3_3() {
    let got = decode(Version::V4, 0x82, &subscribe_body(1, None, &[])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Protocol("SUBSCRIBE without a topic filter"))
    );
}

#[tokio::test]
async fn subscribe_with_an_empty_filter_closes_mqtt_4_7_3_1() {
    let got = decode(
        Version::V4,
        0x82,
        &subscribe_body(1, None, &[(b"a", 0), (b"", 0)]),
    )
    .await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("empty topic filter"))
    );
    let got = decode(
        Version::V5,
        0x82,
        &subscribe_body(1, Some(&[]), &[(b"", 0)]),
    )
    .await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("empty topic filter"))
    );
}

#[tokio::test]
async fn subscribe_filter_with_nul_closes_mqtt_1_5_3_2() {
    // 3.1.1 [MQTT-1.5.3-2]; MQTT 5 [MQTT-1.5.4-2].
    let got = decode(Version::V4, 0x82, &subscribe_body(1, None, &[(b"a/\0", 0)])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("string contains U+0000"))
    );
    let got = decode(
        Version::V5,
        0x82,
        &subscribe_body(1, Some(&[]), &[(b"a/\0", 0)]),
    )
    .await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("string contains U+0000"))
    );
}

#[tokio::test]
async fn subscribe_filter_not_utf8_closes_mqtt_1_5_3_1() {
    // 3.1.1 [MQTT-1.5.3-1]; MQTT 5 [MQTT-1.5.4-1]. 0xc3 0x28 is an invalid sequence.
    let got = decode(
        Version::V4,
        0x82,
        &subscribe_body(1, None, &[(&[0xc3, 0x28], 0)]),
    )
    .await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("string is not UTF-8"))
    );
    let body = subscribe_body(1, Some(&[]), &[(&[0xc3, 0x28], 0)]);
    let got = decode(Version::V5, 0x82, &body).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("string is not UTF-8"))
    );
}

#[tokio::test]
async fn v5_subscribe_decodes_options_identifier_and_user_properties() {
    // Subscription Identifier 300 (a two-byte variable byte integer), two user properties.
    let mut props = vec![0x0b, 0xac, 0x02];
    for (k, v) in [("z", "1"), ("a", "2")] {
        props.push(0x26);
        string(&mut props, k);
        string(&mut props, v);
    }
    // QoS 2 + no local + retain as published + retain handling 2; QoS 1, handling 1; QoS 0.
    let filters: [(&[u8], u8); 3] = [(b"a/#", 0x2e), (b"$share/g/b", 0x11), (b"c", 0x00)];
    let body = subscribe_body(77, Some(&props), &filters);
    match decode(Version::V5, 0x82, &body).await {
        Ok(Packet::Subscribe(s)) => {
            assert_eq!((s.pkid, s.id), (77, Some(300)));
            assert_eq!(
                s.user_properties,
                [("z".into(), "1".into()), ("a".into(), "2".into())]
            );
            assert_eq!(
                s.filters,
                [
                    Subscription {
                        filter: "a/#".into(),
                        qos: 2,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                    Subscription {
                        retain_handling: 1,
                        ..subscription("$share/g/b", 1)
                    },
                    subscription("c", 0),
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    // The largest identifier, 268,435,455 (four bytes).
    let body = subscribe_body(1, Some(&[0x0b, 0xff, 0xff, 0xff, 0x7f]), &[(b"a", 0)]);
    match decode(Version::V5, 0x82, &body).await {
        Ok(Packet::Subscribe(s)) => assert_eq!(s.id, Some(268_435_455)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn v5_subscription_identifier_0_or_twice_is_a_protocol_error_3_8_2_1_2() {
    let got = decode(
        Version::V5,
        0x82,
        &subscribe_body(1, Some(&[0x0b, 0]), &[(b"a", 0)]),
    )
    .await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Protocol("subscription identifier of 0"))
    );
    let body = subscribe_body(1, Some(&[0x0b, 1, 0x0b, 2]), &[(b"a", 0)]);
    let got = decode(Version::V5, 0x82, &body).await.err();
    assert_eq!(got, Some(DecodeError::Protocol("property appears twice")));
    assert_eq!(got.map(DecodeError::reason_code), Some(0x82));
}

#[tokio::test]
async fn v5_subscribe_options_are_checked_mqtt_3_8_3_4_and_5() {
    let cases: [(&[u8], u8, DecodeError); 5] = [
        // Reserved bits [MQTT-3.8.3-5].
        (
            b"a",
            0x40,
            DecodeError::Malformed("reserved subscription option bits"),
        ),
        (
            b"a",
            0x80,
            DecodeError::Malformed("reserved subscription option bits"),
        ),
        // Maximum QoS 3 and Retain Handling 3 are protocol errors (3.8.3.1).
        (
            b"a",
            0x03,
            DecodeError::Protocol("subscription maximum QoS 3"),
        ),
        (b"a", 0x30, DecodeError::Protocol("retain handling 3")),
        // No Local on a shared subscription [MQTT-3.8.3-4].
        (
            b"$share/g/a",
            0x04,
            DecodeError::Protocol("no local on a shared subscription"),
        ),
    ];
    for (filter, options, error) in cases {
        let got = decode(
            Version::V5,
            0x82,
            &subscribe_body(1, Some(&[]), &[(filter, options)]),
        )
        .await;
        assert_eq!(got.err(), Some(error), "options {options:#04x}");
    }
}

#[tokio::test]
async fn v5_subscribe_without_a_filter_is_a_protocol_error_mqtt_3_8_3_2() {
    let got = decode(Version::V5, 0x82, &subscribe_body(1, Some(&[]), &[])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Protocol("SUBSCRIBE without a topic filter"))
    );
}

// ---- UNSUBSCRIBE ---------------------------------------------------------------------------

fn unsubscribe_body(pkid: u16, props: Option<&[u8]>, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u16(pkid);
    if let Some(props) = props {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    for filter in filters {
        body.put_u16(filter.len() as u16);
        body.extend_from_slice(filter);
    }
    body
}

#[tokio::test]
async fn unsubscribe_decodes_every_filter_in_order() {
    let expected = ["a/#".to_owned(), "$share/g/b".to_owned()];
    let got = decode(
        Version::V4,
        0xa2,
        &unsubscribe_body(4, None, &[b"a/#", b"$share/g/b"]),
    )
    .await;
    assert!(
        matches!(&got, Ok(Packet::Unsubscribe(u)) if u.pkid == 4 && u.filters == expected),
        "{got:?}"
    );
    let mut props = vec![0x26];
    string(&mut props, "k");
    string(&mut props, "v");
    let body = unsubscribe_body(4, Some(&props), &[b"a/#", b"$share/g/b"]);
    let got = decode(Version::V5, 0xa2, &body).await;
    assert!(
        matches!(&got, Ok(Packet::Unsubscribe(u)) if u.pkid == 4 && u.filters == expected),
        "{got:?}"
    );
}

#[tokio::test]
async fn unsubscribe_packet_id_0_closes_mqtt_2_3_1_1() {
    let got = decode(Version::V4, 0xa2, &unsubscribe_body(0, None, &[b"a"])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("packet identifier 0"))
    );
    let got = decode(Version::V5, 0xa2, &unsubscribe_body(0, Some(&[]), &[b"a"])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("packet identifier 0"))
    );
}

#[tokio::test]
async fn unsubscribe_without_a_filter_closes_mqtt_3_10_3_2() {
    let got = decode(Version::V4, 0xa2, &unsubscribe_body(1, None, &[])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"))
    );
    let got = decode(Version::V5, 0xa2, &unsubscribe_body(1, Some(&[]), &[])).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"))
    );
}

#[tokio::test]
async fn unsubscribe_with_an_empty_filter_or_nul_closes_mqtt_4_7_3_1_and_1_5_3_2() {
    for (filter, error) in [
        (&b""[..], "empty topic filter"),
        (b"a\0", "string contains U+0000"),
    ] {
        let got = decode(
            Version::V4,
            0xa2,
            &unsubscribe_body(1, None, &[b"a", filter]),
        )
        .await;
        assert_eq!(got.err(), Some(DecodeError::Malformed(error)));
        let got = decode(
            Version::V5,
            0xa2,
            &unsubscribe_body(1, Some(&[]), &[filter]),
        )
        .await;
        assert_eq!(got.err(), Some(DecodeError::Malformed(error)));
    }
}

// ---- PUBACK, PUBREC, PUBCOMP from a client --------------------------------------------------

#[tokio::test]
async fn client_acks_decode_in_both_versions() {
    for version in [Version::V4, Version::V5] {
        let got = decode(version, 0x40, &[0, 7]).await;
        assert!(
            matches!(got, Ok(Packet::PubAck { pkid: 7, reason: 0 })),
            "{got:?}"
        );
        let got = decode(version, 0x50, &[0, 8]).await;
        assert!(
            matches!(got, Ok(Packet::PubRec { pkid: 8, reason: 0 })),
            "{got:?}"
        );
        let got = decode(version, 0x70, &[0, 9]).await;
        assert!(matches!(got, Ok(Packet::PubComp { pkid: 9 })), "{got:?}");
        // Fixed-header flags must be 0 [MQTT-2.2.2-2] (3.1.1 [MQTT-2.2.2-1]).
        let got = decode(version, 0x42, &[0, 7]).await;
        assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
        // Packet id 0 is never in use (MQTT 5 [MQTT-2.2.1-3]).
        let got = decode(version, 0x40, &[0, 0]).await;
        assert_eq!(
            got.err(),
            Some(DecodeError::Malformed("packet identifier 0"))
        );
    }
    // 3.1.1 acks are a packet id and nothing more (remaining length 2, 3.4.1).
    for byte1 in [0x40, 0x50, 0x62, 0x70] {
        let got = decode(Version::V4, byte1, &[0, 7, 0]).await;
        assert_eq!(
            got.err(),
            Some(DecodeError::Malformed("bytes after the end of the packet")),
            "{byte1:#04x}"
        );
    }
    // Server-only packets stay unexpected.
    for (byte1, name) in [(0x20, "CONNACK"), (0x90, "SUBACK"), (0xb0, "UNSUBACK")] {
        for version in [Version::V4, Version::V5] {
            let got = decode(version, byte1, &[0, 1, 0]).await;
            assert!(
                matches!(got, Ok(Packet::Unexpected(n)) if n == name),
                "{got:?}"
            );
        }
    }
}

#[tokio::test]
async fn v5_client_acks_carry_checked_reason_codes_and_properties_3_4_2_1() {
    // Every PUBACK/PUBREC code (3.4.2.1, 3.5.2.1), with and without properties.
    for reason in [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99] {
        let got = decode(Version::V5, 0x40, &[0, 3, reason]).await;
        assert!(
            matches!(got, Ok(Packet::PubAck { pkid: 3, reason: r }) if r == reason),
            "{got:?}"
        );
        let mut body = vec![0, 3, reason, 0];
        let mut props = vec![0x1f];
        string(&mut props, "why");
        body[3] = props.len() as u8;
        body.extend_from_slice(&props);
        let got = decode(Version::V5, 0x50, &body).await;
        assert!(
            matches!(got, Ok(Packet::PubRec { pkid: 3, reason: r }) if r == reason),
            "{got:?}"
        );
    }
    // Codes PUBACK does not have; PUBCOMP has 0x00 and 0x92 only (3.7.2.1).
    for reason in [0x01, 0x8e, 0x92] {
        let got = decode(Version::V5, 0x40, &[0, 3, reason]).await;
        assert_eq!(
            got.err(),
            Some(DecodeError::Malformed("PUBACK reason code"))
        );
    }
    let got = decode(Version::V5, 0x70, &[0, 3, 0x92, 0]).await;
    assert!(matches!(got, Ok(Packet::PubComp { pkid: 3 })), "{got:?}");
    let got = decode(Version::V5, 0x70, &[0, 3, 0x10]).await;
    assert_eq!(
        got.err(),
        Some(DecodeError::Malformed("PUBCOMP reason code"))
    );
    // A property acks may not carry (Content Type), and a section overrunning the packet.
    let got = decode(Version::V5, 0x40, &[0, 3, 0, 4, 0x03, 0, 1, b'x']).await;
    assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
    let got = decode(Version::V5, 0x40, &[0, 3, 0, 9, 0x1f, 0, 1]).await;
    assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
}

// ---- PUBLISH and will properties ------------------------------------------------------------

#[tokio::test]
async fn publish_retain_flag_is_decoded_in_both_versions_3_3_1_3() {
    let mut v4_body = Vec::new();
    string(&mut v4_body, "t");
    v4_body.extend_from_slice(&[0, 1, b'x']);
    let v5_body = v5_publish_body("t", Some(1), &[], b"x");
    for (version, body) in [(Version::V4, v4_body), (Version::V5, v5_body)] {
        for (byte1, retain) in [(0x33, true), (0x32, false)] {
            match decode(version, byte1, &body).await {
                Ok(Packet::Publish(p)) => assert_eq!(p.retain, retain, "{version:?}"),
                other => panic!("{other:?}"),
            }
        }
    }
}

/// Message Expiry 3600, Payload Format 1, Response Topic `r/1`, Correlation Data `c1`.
fn message_properties() -> Vec<u8> {
    let mut props = vec![0x02, 0, 0, 0x0e, 0x10, 0x01, 1, 0x08];
    string(&mut props, "r/1");
    props.push(0x09);
    string(&mut props, "c1");
    props
}

#[tokio::test]
async fn v5_publish_keeps_the_properties_a_broker_forwards_3_3_2_3() {
    match decode(
        Version::V5,
        0x32,
        &v5_publish_body("t", Some(1), &message_properties(), b"x"),
    )
    .await
    {
        Ok(Packet::Publish(p)) => {
            assert_eq!(p.message_expiry, Some(3600));
            assert!(p.payload_format_utf8);
            assert_eq!(p.response_topic.as_deref(), Some("r/1"));
            assert_eq!(p.correlation_data, Some(Bytes::from_static(b"c1")));
            assert_eq!(p.payload, Bytes::from_static(b"x"));
        }
        other => panic!("{other:?}"),
    }
    // Absent: no expiry, unspecified bytes.
    match decode(
        Version::V5,
        0x30,
        &v5_publish_body("t", None, &[0x01, 0], b""),
    )
    .await
    {
        Ok(Packet::Publish(p)) => {
            assert_eq!(p.message_expiry, None);
            assert!(!p.payload_format_utf8);
            assert!(p.response_topic.is_none() && p.correlation_data.is_none());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn v5_response_topic_must_be_a_topic_name_mqtt_3_3_2_14() {
    for topic in ["r/+", "r/#", ""] {
        let mut props = vec![0x08];
        string(&mut props, topic);
        let got = decode(Version::V5, 0x30, &v5_publish_body("t", None, &props, b"")).await;
        assert_eq!(
            got.err(),
            Some(DecodeError::Protocol(
                "response topic is not a valid topic name"
            )),
            "{topic:?}"
        );
    }
}

#[tokio::test]
async fn v5_publish_with_a_subscription_identifier_is_a_protocol_error_mqtt_3_3_4_6() {
    let got = decode(
        Version::V5,
        0x30,
        &v5_publish_body("t", None, &[0x0b, 5], b""),
    )
    .await;
    let got = got.err();
    assert_eq!(
        got,
        Some(DecodeError::Protocol(
            "subscription identifier in a client's PUBLISH"
        ))
    );
    assert_eq!(got.map(DecodeError::reason_code), Some(0x82));
}

#[tokio::test]
async fn v5_will_keeps_its_properties_and_retain_3_1_3_2() {
    let mut will_props = vec![0x18, 0, 0, 0, 30];
    will_props.extend_from_slice(&message_properties());
    will_props.push(0x03);
    string(&mut will_props, "text/plain");
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    // Will retain, will QoS 2, will flag, clean start.
    body.extend_from_slice(&[5, 0x20 | 0x10 | 0x04 | 0x02, 0, 30]);
    // CONNECT properties: Receive Maximum 10, Maximum Packet Size 1024.
    body.extend_from_slice(&[8, 0x21, 0, 10, 0x27, 0, 0, 4, 0]);
    string(&mut body, "dev");
    body.push(will_props.len() as u8);
    body.extend_from_slice(&will_props);
    string(&mut body, "w/t");
    string(&mut body, "bye");
    match decode(Version::V5, 0x10, &body).await {
        Ok(Packet::Connect(c)) => {
            assert_eq!((c.receive_maximum, c.maximum_packet_size), (10, Some(1024)));
            let w = c.will.expect("a will");
            assert_eq!((w.qos, w.retain, w.delay_interval), (2, true, 30));
            assert_eq!(w.message_expiry, Some(3600));
            assert!(w.payload_format_utf8);
            assert_eq!(w.content_type.as_deref(), Some("text/plain"));
            assert_eq!(w.response_topic.as_deref(), Some("r/1"));
            assert_eq!(w.correlation_data, Some(Bytes::from_static(b"c1")));
        }
        other => panic!("{other:?}"),
    }
}

// ---- the fuzz corpus --------------------------------------------------------------------------

#[test]
fn subscribe_corpus_streams_decode_whole_in_their_version() {
    // So the fuzzer starts from every packet type of this layer, valid, in both versions.
    use super::connection::parse_header;
    for (stream, version) in [
        (super::tests::robustness::CORPUS[3], Version::V4),
        (super::tests::robustness::CORPUS[6], Version::V5),
    ] {
        let mut kinds = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let (_, len) = parse_header(&stream[at..], usize::MAX)
                .expect("a valid header")
                .expect("a whole header");
            let raw = BytesMut::from(&stream[at..at + len]);
            at += len;
            let frame = Frame::parse(raw, usize::MAX).expect("a whole frame");
            kinds.push(frame.packet_type());
            let got = packet::decode(version, frame, &LIMITS);
            assert!(got.is_ok(), "{version:?}: {got:?}");
        }
        assert_eq!(kinds, [1, 8, 10, 3, 4, 5, 7, 6, 12, 14], "{version:?}");
        assert!(super::fuzz_stream(stream) >= kinds.len());
    }
}

// ---- encoders, checked by rumqttc's client-side decoders -----------------------------------

mod encode {
    use rumqttc::mqttbytes::{QoS, v4 as c4};
    use rumqttc::v5::mqttbytes::{QoS as Q5, v5 as c5};

    use super::*;

    fn qos(q: u8) -> QoS {
        match q {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }

    fn read_v4(out: &mut BytesMut) -> c4::Packet {
        let packet = c4::Packet::read(out, usize::MAX).expect("rumqttc v4 reads it");
        assert!(out.is_empty(), "{} bytes left over", out.len());
        packet
    }

    fn read_v5(out: &mut BytesMut) -> c5::Packet {
        let packet = c5::Packet::read(out, None).expect("rumqttc v5 reads it");
        assert!(out.is_empty(), "{} bytes left over", out.len());
        packet
    }

    #[test]
    fn publish_round_trips_through_rumqttc_v4_3_3() {
        let payload = vec![7u8; 300];
        for (q, pkid, dup, retain) in [
            (0, 0, false, false),
            (1, 9, true, true),
            (2, 65535, false, true),
        ] {
            let publish = OutPublish {
                dup,
                qos: q,
                retain,
                topic: "plant/a/b",
                pkid,
                payload: &payload,
                // MQTT 5 fields are not written for 3.1.1.
                subscription_ids: &[3],
                content_type: Some("x"),
                ..OutPublish::default()
            };
            let mut out = BytesMut::from(&b"before"[..]);
            let written = encode_publish(Version::V4, &publish, &mut out).expect("encodes");
            assert_eq!(written, out.len() - 6);
            assert_eq!(publish.packet_len(Version::V4), Ok(written));
            let _ = out.split_to(6);
            match read_v4(&mut out) {
                c4::Packet::Publish(p) => {
                    assert_eq!(
                        (p.dup, p.qos, p.retain, p.pkid),
                        (dup, qos(q), retain, pkid)
                    );
                    assert_eq!(p.topic, "plant/a/b");
                    assert_eq!(p.payload, payload);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn publish_round_trips_through_rumqttc_v5_with_every_property_3_3_2_3() {
        let user = [
            ("b".to_owned(), "1".to_owned()),
            ("a".to_owned(), "2".to_owned()),
        ];
        // One id per matching subscription; 128 and 268,435,455 take two and four bytes.
        let ids = [1, 128, 268_435_455];
        let publish = OutPublish {
            dup: true,
            qos: 1,
            retain: true,
            topic: "t/1",
            pkid: 42,
            payload: b"{\"v\":1}",
            subscription_ids: &ids,
            message_expiry: Some(59),
            payload_format_utf8: true,
            content_type: Some("application/json"),
            response_topic: Some("reply/1"),
            correlation_data: Some(b"\x00\x01"),
            user_properties: &user,
        };
        let mut out = BytesMut::new();
        let written = encode_publish(Version::V5, &publish, &mut out).expect("encodes");
        assert_eq!(
            (written, publish.packet_len(Version::V5)),
            (out.len(), Ok(out.len()))
        );
        match read_v5(&mut out) {
            c5::Packet::Publish(p) => {
                assert_eq!(
                    (p.dup, p.qos, p.retain, p.pkid),
                    (true, Q5::AtLeastOnce, true, 42)
                );
                assert_eq!(p.topic, "t/1");
                assert_eq!(p.payload, "{\"v\":1}");
                let props = p.properties.expect("properties");
                assert_eq!(props.subscription_identifiers, [1, 128, 268_435_455]);
                assert_eq!(props.message_expiry_interval, Some(59));
                assert_eq!(props.payload_format_indicator, Some(1));
                assert_eq!(props.content_type.as_deref(), Some("application/json"));
                assert_eq!(props.response_topic.as_deref(), Some("reply/1"));
                assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00\x01"[..]));
                assert_eq!(props.user_properties, user);
                assert_eq!(props.topic_alias, None);
            }
            other => panic!("{other:?}"),
        }
        // No properties: an empty section, QoS 0 without a packet id.
        let bare = OutPublish {
            topic: "t",
            payload: b"p",
            ..OutPublish::default()
        };
        let mut out = BytesMut::new();
        encode_publish(Version::V5, &bare, &mut out).expect("encodes");
        assert_eq!(&out[..], &[0x30, 5, 0, 1, b't', 0, b'p']);
        match read_v5(&mut out) {
            c5::Packet::Publish(p) => {
                assert_eq!(
                    (p.qos, p.pkid, p.dup, p.retain),
                    (Q5::AtMostOnce, 0, false, false)
                );
                assert_eq!(p.properties, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_remaining_length_takes_up_to_four_bytes_1_5_5() {
        // 3 and 4 bytes of remaining length: 16,384 and 2,097,152 bytes and more.
        for size in [127 - 3, 128 - 3, 16_384, 2_097_152] {
            let payload = vec![1u8; size];
            let publish = OutPublish {
                topic: "t",
                payload: &payload,
                ..OutPublish::default()
            };
            for version in [Version::V4, Version::V5] {
                let mut out = BytesMut::new();
                let written = encode_publish(version, &publish, &mut out).expect("encodes");
                assert_eq!(written, out.len());
                let payload_len = if version == Version::V4 {
                    match read_v4(&mut out) {
                        c4::Packet::Publish(p) => p.payload.len(),
                        other => panic!("{other:?}"),
                    }
                } else {
                    match read_v5(&mut out) {
                        c5::Packet::Publish(p) => p.payload.len(),
                        other => panic!("{other:?}"),
                    }
                };
                assert_eq!(payload_len, size);
            }
        }
    }

    #[test]
    fn publish_that_cannot_be_expressed_writes_nothing() {
        let long = "x".repeat(65_536);
        let big = vec![0u8; 268_435_455];
        let user = [(long.clone(), String::new())];
        let cases: [(OutPublish<'_>, Version, EncodeError); 7] = [
            (
                OutPublish {
                    topic: &long,
                    ..OutPublish::default()
                },
                Version::V4,
                EncodeError::TooLarge("topic"),
            ),
            (
                OutPublish {
                    topic: "t",
                    user_properties: &user,
                    ..OutPublish::default()
                },
                Version::V5,
                EncodeError::TooLarge("user property name"),
            ),
            (
                OutPublish {
                    topic: "t",
                    payload: &big,
                    ..OutPublish::default()
                },
                Version::V4,
                EncodeError::TooLarge("packet"),
            ),
            (
                OutPublish {
                    topic: "t",
                    qos: 3,
                    pkid: 1,
                    ..OutPublish::default()
                },
                Version::V4,
                EncodeError::Invalid("QoS 3"),
            ),
            (
                OutPublish {
                    topic: "t",
                    qos: 1,
                    ..OutPublish::default()
                },
                Version::V5,
                EncodeError::Invalid("packet id not 0 exactly when QoS is 0"),
            ),
            (
                OutPublish {
                    topic: "t",
                    dup: true,
                    ..OutPublish::default()
                },
                Version::V5,
                EncodeError::Invalid("DUP on QoS 0"),
            ),
            (
                OutPublish {
                    topic: "t",
                    subscription_ids: &[0],
                    ..OutPublish::default()
                },
                Version::V5,
                EncodeError::Invalid("subscription identifier out of range"),
            ),
        ];
        for (publish, version, error) in cases {
            let mut out = BytesMut::new();
            assert_eq!(encode_publish(version, &publish, &mut out), Err(error));
            assert_eq!(publish.packet_len(version), Err(error));
            assert!(out.is_empty());
        }
        // The same long user property is no problem for 3.1.1, which does not carry it.
        let publish = OutPublish {
            topic: "t",
            user_properties: &user,
            ..OutPublish::default()
        };
        assert_eq!(publish.packet_len(Version::V4), Ok(5));
    }

    /// A client's Maximum Packet Size bounds the whole packet, fixed header included: at
    /// the limit it is written, one byte over it nothing is [MQTT-3.1.2-24].
    #[test]
    fn a_publish_over_the_clients_maximum_is_not_written() {
        let ids = [7];
        let publish = OutPublish {
            qos: 1,
            pkid: 9,
            topic: "a/b",
            payload: b"12345",
            subscription_ids: &ids,
            ..OutPublish::default()
        };
        for version in [Version::V4, Version::V5] {
            let len = publish.packet_len(version).expect("valid");
            let mut out = BytesMut::from(&b"before"[..]);
            assert_eq!(
                encode_publish_within(version, &publish, len - 1, &mut out),
                Err(EncodeError::OverClientMaximum)
            );
            assert_eq!(&out[..], b"before", "nothing written");
            assert_eq!(
                encode_publish_within(version, &publish, len, &mut out),
                Ok(len)
            );
            let mut whole = BytesMut::new();
            encode_publish(version, &publish, &mut whole).expect("encodes");
            assert_eq!(&out[6..], &whole[..], "the same bytes as without a limit");
        }
    }

    #[test]
    fn our_decoder_reads_back_what_our_encoder_wrote() {
        // Not independent, but it ties the two together: a client's PUBLISH and a server's
        // have the same layout once the server-only property is left out.
        let user = [("k".to_owned(), "v".to_owned())];
        let publish = OutPublish {
            qos: 2,
            retain: true,
            topic: "a/b",
            pkid: 5,
            payload: b"body",
            message_expiry: Some(1),
            payload_format_utf8: true,
            content_type: Some("c"),
            response_topic: Some("r"),
            correlation_data: Some(b"d"),
            user_properties: &user,
            ..OutPublish::default()
        };
        for version in [Version::V4, Version::V5] {
            let mut out = BytesMut::new();
            encode_publish(version, &publish, &mut out).expect("encodes");
            let frame = Frame::parse(out, usize::MAX).expect("one whole frame");
            match packet::decode(version, frame, &LIMITS) {
                Ok(Packet::Publish(p)) => {
                    assert_eq!((p.qos, p.retain, p.pkid), (2, true, 5));
                    assert_eq!((p.topic.as_str(), &p.payload[..]), ("a/b", &b"body"[..]));
                    if version == Version::V5 {
                        assert_eq!(p.message_expiry, Some(1));
                        assert_eq!(p.user_properties, user);
                    }
                }
                other => panic!("{version:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn suback_round_trips_with_every_reason_code_3_9_3() {
        let v5_codes = [
            0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8f, 0x91, 0x97, 0x9e, 0xa1, 0xa2,
        ];
        let mut out = BytesMut::new();
        let suback = Outgoing::SubAck {
            pkid: 12,
            codes: v5_codes.to_vec(),
        };
        assert!(packet::encode(Version::V5, &suback, &mut out));
        match read_v5(&mut out) {
            c5::Packet::SubAck(s) => {
                use c5::SubscribeReasonCode as R;
                assert_eq!(s.pkid, 12);
                assert_eq!(
                    s.return_codes,
                    [
                        R::Success(Q5::AtMostOnce),
                        R::Success(Q5::AtLeastOnce),
                        R::Success(Q5::ExactlyOnce),
                        R::Unspecified,
                        R::ImplementationSpecific,
                        R::NotAuthorized,
                        R::TopicFilterInvalid,
                        R::PkidInUse,
                        R::QuotaExceeded,
                        R::SharedSubscriptionsNotSupported,
                        R::SubscriptionIdNotSupported,
                        R::WildcardSubscriptionsNotSupported,
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        // 3.1.1 has 0x00..=0x02 and 0x80 only [MQTT-3.9.3-2]; MQTT 5 codes it lacks are sent
        // as 0x80, as are codes MQTT 5 lacks.
        let mut out = BytesMut::new();
        assert!(packet::encode(Version::V4, &suback, &mut out));
        match read_v4(&mut out) {
            c4::Packet::SubAck(s) => {
                use c4::SubscribeReasonCode as R;
                assert_eq!(s.pkid, 12);
                let mut expected = vec![
                    R::Success(QoS::AtMostOnce),
                    R::Success(QoS::AtLeastOnce),
                    R::Success(QoS::ExactlyOnce),
                ];
                expected.resize(v5_codes.len(), R::Failure);
                assert_eq!(s.return_codes, expected);
            }
            other => panic!("{other:?}"),
        }
        let mut out = BytesMut::new();
        assert!(packet::encode(
            Version::V5,
            &Outgoing::SubAck {
                pkid: 1,
                codes: vec![0x03, 0x11]
            },
            &mut out
        ));
        assert_eq!(&out[..], &[0x90, 5, 0, 1, 0, 0x80, 0x80]);
    }

    #[test]
    fn unsuback_round_trips_3_11() {
        let codes = vec![0x00, 0x11, 0x80, 0x83, 0x87, 0x8f, 0x91, 0x02];
        let unsuback = Outgoing::UnsubAck { pkid: 300, codes };
        let mut out = BytesMut::new();
        assert!(packet::encode(Version::V5, &unsuback, &mut out));
        match read_v5(&mut out) {
            c5::Packet::UnsubAck(u) => {
                use c5::UnsubAckReason as R;
                assert_eq!(u.pkid, 300);
                assert_eq!(
                    u.reasons,
                    [
                        R::Success,
                        R::NoSubscriptionExisted,
                        R::UnspecifiedError,
                        R::ImplementationSpecificError,
                        R::NotAuthorized,
                        R::TopicFilterInvalid,
                        R::PacketIdentifierInUse,
                        // 0x02 is no UNSUBACK code: sent as 0x80.
                        R::UnspecifiedError,
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        // 3.1.1: the packet id alone (3.11.3).
        let mut out = BytesMut::new();
        assert!(packet::encode(Version::V4, &unsuback, &mut out));
        assert_eq!(&out[..], &[0xb0, 2, 1, 44]);
        assert!(matches!(read_v4(&mut out), c4::Packet::UnsubAck(u) if u.pkid == 300));
    }

    #[test]
    fn pubrel_round_trips_3_6() {
        for (version, found) in [
            (Version::V4, true),
            (Version::V4, false),
            (Version::V5, true),
            (Version::V5, false),
        ] {
            let mut out = BytesMut::new();
            assert!(packet::encode(
                version,
                &Outgoing::PubRel { pkid: 513, found },
                &mut out
            ));
            // Fixed-header flags 0b0010 [MQTT-3.6.1-1].
            assert_eq!(out.first(), Some(&0x62));
            match version {
                Version::V4 => {
                    assert!(matches!(read_v4(&mut out), c4::Packet::PubRel(p) if p.pkid == 513));
                }
                Version::V5 => match read_v5(&mut out) {
                    c5::Packet::PubRel(p) => {
                        assert_eq!(p.pkid, 513);
                        let reason = if found {
                            c5::PubRelReason::Success
                        } else {
                            c5::PubRelReason::PacketIdentifierNotFound
                        };
                        assert_eq!(p.reason, reason);
                    }
                    other => panic!("{other:?}"),
                },
            }
        }
    }

    #[test]
    fn connack_says_what_subscribers_are_offered_3_2_2_3() {
        for offered in [false, true] {
            let props = ConnAckProps {
                receive_maximum: 100,
                topic_alias_maximum: 10,
                max_packet_size: 1 << 16,
                wildcard_subscriptions: offered,
                shared_subscriptions: offered,
                subscription_ids: offered,
                retain_available: offered,
                ..ConnAckProps::default()
            };
            let mut out = BytesMut::new();
            assert!(packet::encode(
                Version::V5,
                &Outgoing::ConnAck(Ok(props)),
                &mut out
            ));
            match read_v5(&mut out) {
                c5::Packet::ConnAck(c) => {
                    let p = c.properties.expect("properties");
                    let sent = Some(u8::from(offered));
                    assert_eq!(p.wildcard_subscription_available, sent);
                    assert_eq!(p.shared_subscription_available, sent);
                    assert_eq!(p.subscription_identifiers_available, sent);
                    assert_eq!(p.retain_available, sent);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
