//! Unit tests of the packets a broker needs: SUBSCRIBE and UNSUBSCRIBE as data, the client's
//! acks of server publishes, the checks of the 3.1.1 decoder (`v4.rs`) and their MQTT 5
//! counterparts, and the publish and will properties.
//!
//! Every test names the normative statement it checks; 3.1.1's and 5's are numbered apart
//! (the version is in the test's name).

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::{self, DecodeError, Limits, Outgoing, Packet, Subscription, Version};
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
