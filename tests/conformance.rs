//! The local broker against the normative statements of MQTT 3.1.1 and MQTT 5 for a server,
//! with independent clients from the registries playing each scenario: the Eclipse Paho Go
//! clients (paho.golang for MQTT 5, paho.mqtt.golang for 3.1.1) and MQTT.js, both versions
//! ([`common::drivers`]). Each test names the statements it checks, numbered as the
//! specification of the version it speaks numbers them (3.1.1 and 5 number some alike
//! statements differently), and compares everything the clients observed with what the
//! statements require. Kafka is unreachable: local delivery does not depend on it.

mod common;

use serde_json::Value;

use common::drivers::{
    Driver, connack, connect, connect_persistent, disconnect, disconnected, drop_connection,
    message, play, publish, publish_many, receive, sleep, sub, suback, subscribe, subscribe_id,
    unsuback, unsubscribe, will, with,
};
use common::{GatewayToml, gateway};

/// Kafka unreachable; a short grace, since with Kafka down the forwarder has nothing to
/// drain that a longer one would let it finish.
fn config() -> GatewayToml {
    GatewayToml::new()
        .kafka_unreachable()
        .shutdown_grace("100ms")
        .route("#", "local")
}

/// How long a client waits for messages that are to come.
const COME: u64 = 5000;
/// How long a client waits to be sure that no more messages come.
const NO_MORE: u64 = 400;

/// The `message` events of `client`, in the order it received them.
fn messages_of(events: &[Value], client: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == "message" && e["client"] == client)
        .cloned()
        .collect()
}

// ---- Topic filters and wildcards (§4.7) ----

/// Each subscriber's one filter and the topics of [`TOPICS`] it must receive, in publish
/// order: `#` matches its parent level too, `+` exactly one level (the empty level before a
/// leading `/` included), filters starting with a wildcard match no `$` topic, and nothing
/// is normalised (`Sport` is not `sport`).
const MATCHES: &[(&str, &str, &[&str])] = &[
    (
        "one-level-last",
        "sport/tennis/+",
        &["sport/tennis/player1"],
    ),
    (
        "multi-level",
        "sport/#",
        &[
            "sport",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
        ],
    ),
    ("two-levels", "+/+", &["sport/tennis", "/finance"]),
    (
        "everything",
        "#",
        &[
            "sport",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "/finance",
            "Sport",
        ],
    ),
    ("one-level", "+", &["sport", "Sport"]),
    ("wildcard-first", "+/monitor", &[]),
    ("dollar", "$edge/#", &["$edge/monitor", "$edge"]),
    ("empty-level", "/+", &["/finance"]),
    ("case", "Sport/#", &["Sport"]),
];

const TOPICS: &[&str] = &[
    "sport",
    "sport/tennis",
    "sport/tennis/player1",
    "sport/tennis/player1/ranking",
    "/finance",
    "$edge/monitor",
    "$edge",
    "Sport",
];

/// Nine subscribers, one filter each; one publisher publishes every topic of [`TOPICS`].
fn wildcards(driver: Driver, version: u8) {
    // `#` in a route does not match `$` topics either: they need a route of their own.
    let gw = gateway(config().route("$edge/#", "local-edge")).start();
    let mut steps = Vec::new();
    let mut expected = Vec::new();
    for (client, filter, _) in MATCHES {
        steps.push(connect(client, version));
        steps.push(subscribe(client, &[sub(filter, 1)]));
        expected.push(connack(client, false));
        expected.push(suback(client, &[1]));
    }
    steps.push(connect("pub", version));
    expected.push(connack("pub", false));
    for topic in TOPICS {
        steps.push(publish("pub", topic, topic, 1, false));
    }
    for (client, _, topics) in MATCHES {
        steps.push(receive(client, topics.len(), COME));
        for topic in *topics {
            expected.push(message(client, topic, topic, 1, false));
        }
    }
    steps.push(sleep(NO_MORE));
    for (client, _, _) in MATCHES {
        steps.push(receive(client, 10, 0));
    }
    assert_eq!(play(driver, gw.mqtt_addr(), &steps), expected);
}

/// MQTT 5, paho.golang: `#` and `+` as §4.7.1 defines them ([MQTT-4.7.1-1], [MQTT-4.7.1-2]),
/// no `$` topic for a filter starting with a wildcard [MQTT-4.7.2-1], no normalisation
/// [MQTT-4.7.3-4], and the Topic Name sent matches the filter [MQTT-3.3.2-3].
#[test]
fn mqtt5_wildcards_match_as_4_7_says_paho_go() {
    wildcards(Driver::Go, 5);
}

/// MQTT 3.1.1, MQTT.js: `#` and `+` as §4.7.1 defines them ([MQTT-4.7.1-2],
/// [MQTT-4.7.1-3]), no `$` topic for a filter starting with a wildcard [MQTT-4.7.2-1], no
/// normalisation [MQTT-4.7.3-4], and the Topic Name sent matches the filter [MQTT-3.3.2-3].
#[test]
fn mqtt311_wildcards_match_as_4_7_says_mqtt_js() {
    wildcards(Driver::Js, 4);
}

// ---- SUBSCRIBE and SUBACK ----

/// MQTT 5, paho.golang: one SUBSCRIBE with six filters is handled as six [MQTT-3.8.4-5]
/// and answered with one Reason Code per filter [MQTT-3.8.4-6], [MQTT-3.9.3-2], in their
/// order [MQTT-3.9.3-1]: the granted QoS, or 0x8F for a filter whose `#` is not last
/// [MQTT-4.7.1-1] and for shared subscriptions without a ShareName or a filter
/// [MQTT-4.8.2-1], [MQTT-4.8.2-2] [MQTT-3.8.4-7]. What the granted ones deliver comes at
/// the minimum of the published and the granted QoS [MQTT-3.8.4-8].
#[test]
fn mqtt5_suback_answers_each_filter_in_order_paho_go() {
    let gw = gateway(config()).start();
    let subs = [
        sub("a/b", 2),
        sub("a/#/c", 1),
        sub("$share/g", 1),
        sub("$share//x", 1),
        sub("c/+", 0),
        sub("d", 1),
    ];
    let steps = [
        connect("s", 5),
        subscribe("s", &subs),
        connect("p", 5),
        publish("p", "a/b", "ab", 2, false),
        publish("p", "c/x", "cx", 2, false),
        publish("p", "d", "d", 2, false),
        publish("p", "a/b", "ab1", 1, false),
        receive("s", 4, COME),
        sleep(NO_MORE),
        receive("s", 10, 0),
    ];
    assert_eq!(
        play(Driver::Go, gw.mqtt_addr(), &steps),
        [
            connack("s", false),
            suback("s", &[2, 0x8f, 0x8f, 0x8f, 0, 1]),
            connack("p", false),
            message("s", "a/b", "ab", 2, false),
            message("s", "c/x", "cx", 0, false),
            message("s", "d", "d", 1, false),
            message("s", "a/b", "ab1", 1, false),
        ]
    );
}

/// MQTT 3.1.1, MQTT.js: a SUBSCRIBE with four filters is handled as four [MQTT-3.8.4-4],
/// answered with a return code per filter [MQTT-3.8.4-5], in their order [MQTT-3.9.3-1],
/// with 3.1.1's codes only [MQTT-3.9.3-2]: the granted QoS, or 0x80 where the client has
/// no subscribe right. The refused filter delivers nothing, the others do.
#[test]
fn mqtt311_suback_answers_each_filter_in_order_mqtt_js() {
    let gw = gateway(config().raw(
        r##"
        [[auth.rules]]
        publish = ["#"]
        subscribe = ["ok/#"]
        "##,
    ))
    .start();
    let steps = [
        connect("s", 4),
        subscribe(
            "s",
            &[
                sub("ok/a", 1),
                sub("no/b", 1),
                sub("ok/c", 2),
                sub("ok/d", 0),
            ],
        ),
        connect("p", 4),
        publish("p", "no/b", "refused", 1, false),
        publish("p", "ok/c", "granted", 1, false),
        receive("s", 1, COME),
        sleep(NO_MORE),
        receive("s", 10, 0),
    ];
    assert_eq!(
        play(Driver::Js, gw.mqtt_addr(), &steps),
        [
            connack("s", false),
            suback("s", &[1, 0x80, 2, 0]),
            connack("p", false),
            message("s", "ok/c", "granted", 1, false),
        ]
    );
}

/// Subscribers at QoS 0, 1 and 2 and one whose two overlapping subscriptions grant 0 and 2;
/// a publisher sends at QoS 0, 1 and 2.
fn granted_qos(driver: Driver, version: u8) {
    let gw = gateway(config()).start();
    let mut steps = Vec::new();
    let mut expected = Vec::new();
    for (client, qos) in [("q0", 0), ("q1", 1), ("q2", 2)] {
        steps.push(connect(client, version));
        steps.push(subscribe(client, &[sub("t/#", qos)]));
        expected.push(connack(client, false));
        expected.push(suback(client, &[qos]));
    }
    steps.push(connect("both", version));
    steps.push(subscribe("both", &[sub("t/+", 0), sub("t/#", 2)]));
    expected.push(connack("both", false));
    expected.push(suback("both", &[0, 2]));
    steps.push(connect("p", version));
    expected.push(connack("p", false));
    for qos in 0..3 {
        steps.push(publish("p", "t/a", &format!("p{qos}"), qos, false));
    }
    for (client, granted) in [("q0", 0), ("q1", 1), ("q2", 2), ("both", 2)] {
        steps.push(receive(client, 3, COME));
        for qos in 0..3 {
            let payload = format!("p{qos}");
            expected.push(message(client, "t/a", &payload, qos.min(granted), false));
        }
    }
    steps.push(sleep(NO_MORE));
    steps.push(receive("both", 10, 0));
    assert_eq!(play(driver, gw.mqtt_addr(), &steps), expected);
}

/// MQTT 3.1.1, paho.mqtt.golang: messages come at the minimum of the published and the
/// granted QoS [MQTT-3.8.4-6]; overlapping subscriptions deliver at the maximum QoS of
/// those matching [MQTT-3.3.5-1] (once: the gateway sends one copy per session).
#[test]
fn mqtt311_delivery_qos_is_the_minimum_of_published_and_granted_paho_go() {
    granted_qos(Driver::Go, 4);
}

/// MQTT 5, MQTT.js: messages come at the minimum of the published and the granted QoS
/// [MQTT-3.8.4-8]; overlapping subscriptions deliver at the maximum QoS of those matching
/// [MQTT-3.3.4-2] (once: the gateway sends one copy per session).
#[test]
fn mqtt5_delivery_qos_is_the_minimum_of_published_and_granted_mqtt_js() {
    granted_qos(Driver::Js, 5);
}

// ---- MQTT 5 subscription options ----

/// MQTT 5, paho.golang: with No Local a client does not get its own messages back
/// [MQTT-3.8.3-3]; without it, it does, and others get them either way.
#[test]
fn mqtt5_no_local_keeps_a_clients_own_messages_from_it_paho_go() {
    let gw = gateway(config()).start();
    let steps = [
        connect("a", 5),
        subscribe("a", &[with(sub("chat/#", 1), "nl", true)]),
        connect("b", 5),
        subscribe("b", &[sub("chat/#", 1)]),
        publish("a", "chat/a", "from a", 1, false),
        publish("b", "chat/b", "from b", 1, false),
        receive("b", 2, COME),
        receive("a", 1, COME),
        sleep(NO_MORE),
        receive("a", 10, 0),
    ];
    assert_eq!(
        play(Driver::Go, gw.mqtt_addr(), &steps),
        [
            connack("a", false),
            suback("a", &[1]),
            connack("b", false),
            suback("b", &[1]),
            message("b", "chat/a", "from a", 1, false),
            message("b", "chat/b", "from b", 1, false),
            message("a", "chat/b", "from b", 1, false),
        ]
    );
}

/// MQTT 5, paho.golang: Retain As Published 0 forwards with RETAIN 0 [MQTT-3.3.1-12], 1
/// keeps the flag as published [MQTT-3.3.1-13]; a retained message sent because of the
/// subscription has RETAIN 1 under both (§3.3.1.3).
#[test]
fn mqtt5_retain_as_published_paho_go() {
    let gw = gateway(config()).start();
    let steps = [
        connect("p", 5),
        publish("p", "dev/1", "r0", 1, true),
        connect("plain", 5),
        subscribe("plain", &[sub("dev/#", 1)]),
        connect("rap", 5),
        subscribe("rap", &[with(sub("dev/#", 1), "rap", true)]),
        receive("plain", 1, COME),
        receive("rap", 1, COME),
        publish("p", "dev/1", "r1", 1, true),
        publish("p", "dev/1", "n1", 1, false),
        receive("plain", 2, COME),
        receive("rap", 2, COME),
    ];
    assert_eq!(
        play(Driver::Go, gw.mqtt_addr(), &steps),
        [
            connack("p", false),
            connack("plain", false),
            suback("plain", &[1]),
            connack("rap", false),
            suback("rap", &[1]),
            message("plain", "dev/1", "r0", 1, true),
            message("rap", "dev/1", "r0", 1, true),
            message("plain", "dev/1", "r1", 1, false),
            message("plain", "dev/1", "n1", 1, false),
            message("rap", "dev/1", "r1", 1, true),
            message("rap", "dev/1", "n1", 1, false),
        ]
    );
}

/// MQTT 5, paho.golang: Retain Handling 0 sends the retained messages on every subscribe
/// [MQTT-3.3.1-9], also when it replaces a subscription [MQTT-3.8.4-3], [MQTT-3.8.4-4]; 1
/// only when the subscription is new [MQTT-3.3.1-10]; 2 never [MQTT-3.3.1-11]. Each
/// SUBSCRIBE has its own Subscription Identifier, so each retained copy names the
/// subscription that asked for it [MQTT-3.3.4-3].
#[test]
fn mqtt5_retain_handling_paho_go() {
    let gw = gateway(config()).start();
    let rh = |filter: &str, handling: u8| [with(sub(filter, 1), "rh", handling)];
    let steps = [
        connect("p", 5),
        publish("p", "rh/a", "kept", 1, true),
        connect("s", 5),
        subscribe_id("s", &rh("rh/#", 0), 1),
        receive("s", 1, COME),
        subscribe_id("s", &rh("rh/#", 0), 2),
        receive("s", 1, COME),
        subscribe_id("s", &rh("rh/+", 1), 3),
        receive("s", 1, COME),
        subscribe_id("s", &rh("rh/+", 1), 4),
        receive("s", 1, NO_MORE),
        subscribe_id("s", &rh("rh/a", 2), 5),
        receive("s", 1, NO_MORE),
    ];
    let kept = |id: u32| with(message("s", "rh/a", "kept", 1, true), "sub_ids", [id]);
    assert_eq!(
        play(Driver::Go, gw.mqtt_addr(), &steps),
        [
            connack("p", false),
            connack("s", false),
            suback("s", &[1]),
            kept(1),
            suback("s", &[1]),
            kept(2),
            suback("s", &[1]),
            kept(3),
            suback("s", &[1]),
            suback("s", &[1]),
        ]
    );
}

/// MQTT 5, MQTT.js: a message matching overlapping subscriptions comes once, at the highest
/// QoS of those [MQTT-3.3.4-2], with the Subscription Identifiers of all of them
/// [MQTT-3.3.4-3], [MQTT-3.3.4-4]; one matching only a subscription without an identifier
/// has none. A SUBSCRIBE with an existing filter replaces that subscription, identifier
/// included [MQTT-3.8.4-3].
#[test]
fn mqtt5_subscription_identifiers_of_every_matching_subscription_mqtt_js() {
    let gw = gateway(config()).start();
    let steps = [
        connect("s", 5),
        subscribe_id("s", &[sub("si/+", 0)], 1),
        subscribe_id("s", &[sub("si/#", 2)], 2),
        subscribe("s", &[sub("other/#", 1)]),
        connect("p", 5),
        // One at a time: MQTT.js hands a QoS 2 message over only after PUBREL.
        publish("p", "si/a", "both", 2, false),
        receive("s", 1, COME),
        publish("p", "other/x", "none", 1, false),
        receive("s", 1, COME),
        subscribe_id("s", &[sub("si/+", 0)], 3),
        publish("p", "si/b", "replaced", 1, false),
        receive("s", 1, COME),
        sleep(NO_MORE),
        receive("s", 10, 0),
    ];
    let mut events = play(Driver::Js, gw.mqtt_addr(), &steps);
    // Their order is not significant [MQTT-3.3.4-4].
    for event in &mut events {
        if let Some(ids) = event.get_mut("sub_ids").and_then(Value::as_array_mut) {
            ids.sort_by_key(|id| id.as_u64());
        }
    }
    assert_eq!(
        events,
        [
            connack("s", false),
            suback("s", &[0]),
            suback("s", &[2]),
            suback("s", &[1]),
            connack("p", false),
            with(message("s", "si/a", "both", 2, false), "sub_ids", [1, 2]),
            message("s", "other/x", "none", 1, false),
            suback("s", &[0]),
            with(
                message("s", "si/b", "replaced", 1, false),
                "sub_ids",
                [2, 3]
            ),
        ]
    );
}

// ---- Retained messages ----

/// A publisher stores, replaces and clears retained messages; a subscriber subscribed before
/// sees them live, one subscribing after gets what is stored.
fn retained(driver: Driver, version: u8) {
    let gw = gateway(config()).start();
    let steps = [
        connect("p", version),
        publish("p", "st/1", "a", 1, true),
        publish("p", "st/1", "b", 1, true),
        publish("p", "st/2", "c", 1, true),
        publish("p", "st/2", "not kept", 1, false),
        publish("p", "st/3", "gone", 1, true),
        publish("p", "st/3", "", 1, true),
        connect("early", version),
        subscribe("early", &[sub("st/#", 1)]),
        receive("early", 2, COME),
        publish("p", "st/1", "e", 0, true),
        publish("p", "st/1", "", 1, true),
        receive("early", 2, COME),
        connect("late", version),
        subscribe("late", &[sub("st/#", 1)]),
        receive("late", 1, COME),
        sleep(NO_MORE),
        receive("early", 10, 0),
        receive("late", 10, 0),
    ];
    let events = play(driver, gw.mqtt_addr(), &steps);
    let mut first = messages_of(&events, "early");
    // Retained messages of different topics come in no defined order.
    first[..2].sort_by_key(|m| m["topic"].as_str().map(str::to_owned));
    assert_eq!(
        first,
        [
            message("early", "st/1", "b", 1, true),
            message("early", "st/2", "c", 1, true),
            message("early", "st/1", "e", 0, false),
            message("early", "st/1", "", 1, false),
        ]
    );
    assert_eq!(
        messages_of(&events, "late"),
        [message("late", "st/2", "c", 1, true)]
    );
}

/// MQTT 3.1.1, MQTT.js: a retained publish is stored, replacing the topic's last one
/// [MQTT-3.3.1-5], [MQTT-3.3.1-7]; a new subscription gets the last retained message of each
/// matching topic [MQTT-3.3.1-6] with RETAIN 1 [MQTT-3.3.1-8]; an established one gets live
/// messages with RETAIN 0 [MQTT-3.3.1-9]; an empty retained publish is delivered as normal
/// and clears the topic [MQTT-3.3.1-10] without being stored [MQTT-3.3.1-11]; a publish
/// with RETAIN 0 neither stores nor replaces [MQTT-3.3.1-12].
#[test]
fn mqtt311_retained_messages_mqtt_js() {
    retained(Driver::Js, 4);
}

/// MQTT 5, paho.golang: a retained publish replaces the topic's retained message and is
/// stored [MQTT-3.3.1-5]; an empty one is delivered as normal, clears the topic
/// [MQTT-3.3.1-6] and is not stored [MQTT-3.3.1-7]; a publish with RETAIN 0 neither stores
/// nor replaces [MQTT-3.3.1-8]; a new subscription gets them (Retain Handling 0,
/// [MQTT-3.3.1-9]) with RETAIN 1, live ones come with RETAIN 0 (Retain As Published 0,
/// [MQTT-3.3.1-12]).
#[test]
fn mqtt5_retained_messages_paho_go() {
    retained(Driver::Go, 5);
}

// ---- Sessions ----

/// A persistent session keeps its subscription and the QoS 1 messages published while its
/// client is away; a clean one forgets both.
fn persistent_session(driver: Driver, version: u8) {
    let gw = gateway(config()).start();
    let steps = [
        connect_persistent("s", version, 600),
        subscribe("s", &[sub("ps/#", 1)]),
        drop_connection("s"),
        connect("p", version),
        publish("p", "ps/1", "m1", 1, false),
        publish("p", "ps/2", "m2", 2, false),
        publish("p", "ps/1", "m3", 1, false),
        connect_persistent("s", version, 600),
        receive("s", 3, COME),
        disconnect("s"),
        connect("s", version),
        publish("p", "ps/1", "m4", 1, false),
        receive("s", 1, NO_MORE),
        disconnect("s"),
        connect_persistent("s", version, 600),
    ];
    assert_eq!(
        play(driver, gw.mqtt_addr(), &steps),
        [
            connack("s", false),
            suback("s", &[1]),
            connack("p", false),
            connack("s", true),
            message("s", "ps/1", "m1", 1, false),
            message("s", "ps/2", "m2", 1, false),
            message("s", "ps/1", "m3", 1, false),
            connack("s", false),
            connack("s", false),
        ]
    );
}

/// MQTT 5, MQTT.js: Clean Start 0 without a session creates one and says Session Present 0
/// [MQTT-3.1.2-6], [MQTT-3.2.2-3]; with Session Expiry Interval > 0 it outlives the
/// connection [MQTT-3.1.2-23], keeps the messages for its subscription, and a Clean Start 0
/// resumes it with Session Present 1 [MQTT-3.1.2-5], [MQTT-3.2.2-3], [MQTT-4.5.0-1]. Clean
/// Start 1 discards it and says Session Present 0 [MQTT-3.1.2-4], [MQTT-3.2.2-2]: no
/// subscription delivers, and no session is left to resume.
#[test]
fn mqtt5_persistent_session_and_session_present_mqtt_js() {
    persistent_session(Driver::Js, 5);
}

/// MQTT 3.1.1, paho.mqtt.golang: Clean Session 0 creates or resumes a session
/// [MQTT-3.1.2-4] with Session Present 0 or 1 [MQTT-3.2.2-3], [MQTT-3.2.2-2]; the QoS 1 and
/// 2 messages for its subscriptions are stored while the client is away [MQTT-3.1.2-5].
/// Clean Session 1 discards it [MQTT-3.1.2-6] and says Session Present 0 [MQTT-3.2.2-1].
#[test]
fn mqtt311_persistent_session_and_session_present_paho_go() {
    persistent_session(Driver::Go, 4);
}

/// MQTT 5, paho.golang: Clean Start 1 discards the previous session and starts a new one
/// [MQTT-3.1.2-4], which a Session Expiry Interval above 0 keeps after the connection
/// closes [MQTT-3.1.2-23]: a Clean Start 0 finds it, with Session Present 1 [MQTT-3.2.2-3]
/// and what was queued for it. Its Will Message waits for the Will Delay Interval and is
/// not sent if the client is back by then [MQTT-3.1.3-9]; if not, it is [MQTT-3.1.2-8].
#[test]
fn mqtt5_clean_start_session_with_expiry_outlives_the_connection_paho_go() {
    let gw = gateway(config()).start();
    let with_will = |step: Value| {
        let gone = with(will("will/c", "c gone", 1, false), "delay", 1);
        with(with(step, "expiry", 60), "will", gone)
    };
    let steps = [
        connect("watch", 5),
        subscribe("watch", &[sub("will/#", 1)]),
        with_will(connect("c", 5)),
        subscribe("c", &[sub("cmd/#", 1)]),
        drop_connection("c"),
        connect("p", 5),
        publish("p", "cmd/c", "queued", 1, false),
        with_will(connect_persistent("c", 5, 60)),
        receive("c", 1, COME),
        sleep(1500),
        receive("watch", 1, 0),
        drop_connection("c"),
        receive("watch", 1, COME),
    ];
    assert_eq!(
        play(Driver::Go, gw.mqtt_addr(), &steps),
        [
            connack("watch", false),
            suback("watch", &[1]),
            connack("c", false),
            suback("c", &[1]),
            connack("p", false),
            connack("c", true),
            message("c", "cmd/c", "queued", 1, false),
            message("watch", "will/c", "c gone", 1, false),
        ]
    );
}

/// MQTT 3.1.1, MQTT.js: a Will Message is published when the connection closes without
/// DISCONNECT [MQTT-3.1.2-8] and discarded on DISCONNECT [MQTT-3.1.2-10]; with Will Retain
/// 1 it is also retained [MQTT-3.1.2-17], with 0 not [MQTT-3.1.2-16].
#[test]
fn mqtt311_will_messages_mqtt_js() {
    let gw = gateway(config()).start();
    let steps = [
        connect("watch", 4),
        subscribe("watch", &[sub("will/#", 1)]),
        with(connect("a", 4), "will", will("will/a", "a gone", 1, true)),
        with(connect("b", 4), "will", will("will/b", "b gone", 1, false)),
        with(connect("c", 4), "will", will("will/c", "c left", 1, false)),
        drop_connection("a"),
        receive("watch", 1, COME),
        drop_connection("b"),
        receive("watch", 1, COME),
        disconnect("c"),
        receive("watch", 1, NO_MORE),
        connect("late", 4),
        subscribe("late", &[sub("will/#", 1)]),
        receive("late", 2, NO_MORE),
    ];
    assert_eq!(
        play(Driver::Js, gw.mqtt_addr(), &steps),
        [
            connack("watch", false),
            suback("watch", &[1]),
            connack("a", false),
            connack("b", false),
            connack("c", false),
            message("watch", "will/a", "a gone", 1, false),
            message("watch", "will/b", "b gone", 1, false),
            connack("late", false),
            suback("late", &[1]),
            message("late", "will/a", "a gone", 1, true),
        ]
    );
}

/// A client whose session ends with its connection is taken over by a CONNECT with its
/// Client Identifier that asks to resume a session.
fn takeover(driver: Driver, version: u8) {
    let gw = gateway(config()).start();
    let steps = [
        connect("old", version),
        subscribe("old", &[sub("t/#", 1)]),
        with(connect_persistent("new", version, 60), "id", "old"),
        receive("old", 1, COME),
        connect("p", version),
        publish("p", "t/1", "for the old session", 1, false),
        receive("new", 1, NO_MORE),
    ];
    // MQTT 5 says why; a 3.1.1 server can only close the connection.
    let reason = (version == 5).then_some(0x8e);
    assert_eq!(
        play(driver, gw.mqtt_addr(), &steps),
        [
            connack("old", false),
            suback("old", &[1]),
            connack("new", false),
            disconnected("old", reason),
            connack("p", false),
        ]
    );
}

/// MQTT 5, paho.golang: a CONNECT with a Client Identifier already connected gets the old
/// connection a DISCONNECT 0x8E (Session taken over) and closed [MQTT-3.1.4-3]. The old
/// session's Session Expiry Interval was 0, so it ended with that connection: the new one
/// finds no session, Session Present 0 [MQTT-3.2.2-3], and none of its subscriptions.
#[test]
fn mqtt5_session_takeover_paho_go() {
    takeover(Driver::Go, 5);
}

/// MQTT 3.1.1, MQTT.js: a CONNECT with a Client Identifier already connected closes the old
/// connection [MQTT-3.1.4-2]. The old one had Clean Session 1, a session that lasts as long
/// as its connection [MQTT-3.1.2-6]: the new one (Clean Session 0) finds none, Session
/// Present 0 [MQTT-3.2.2-3], and none of its subscriptions.
#[test]
fn mqtt311_session_takeover_mqtt_js() {
    takeover(Driver::Js, 4);
}

/// MQTT 5, paho.golang: a message whose Message Expiry Interval passed while it waited for
/// a disconnected session is not delivered [MQTT-3.3.2-5]; one still valid is, with the
/// interval less the time it waited [MQTT-3.3.2-6]; one without an interval keeps none.
#[test]
fn mqtt5_message_expiry_paho_go() {
    let gw = gateway(config()).start();
    let steps = [
        connect_persistent("s", 5, 600),
        subscribe("s", &[sub("exp/#", 1)]),
        disconnect("s"),
        connect("p", 5),
        with(publish("p", "exp/short", "short", 1, false), "expiry", 1),
        with(publish("p", "exp/long", "long", 1, false), "expiry", 100),
        publish("p", "exp/none", "none", 1, false),
        sleep(1500),
        connect_persistent("s", 5, 600),
        receive("s", 2, COME),
        receive("s", 1, NO_MORE),
    ];
    let events = play(Driver::Go, gw.mqtt_addr(), &steps);
    let got = messages_of(&events, "s");
    // 1.5 s waited, plus the reconnect: 100 s less that, rounded up to whole seconds.
    let left = got.first().map(|m| m["expiry"].clone());
    assert!(
        matches!(left.as_ref().and_then(Value::as_u64), Some(98 | 99)),
        "remaining expiry {left:?}"
    );
    assert_eq!(
        got,
        [
            with(message("s", "exp/long", "long", 1, false), "expiry", left),
            message("s", "exp/none", "none", 1, false),
        ]
    );
}

// ---- Shared subscriptions (§4.8.2) ----

/// MQTT 5, MQTT.js: each message published to a shared subscription's filter goes to one
/// member of the group (§4.8.2), at the QoS granted to that member [MQTT-4.8.2-3]; an
/// ordinary subscription to the same filter gets every message.
#[test]
fn mqtt5_shared_subscription_gives_each_message_to_one_member_mqtt_js() {
    let gw = gateway(config()).start();
    let members = [("m1", 1), ("m2", 1), ("m0", 0)];
    let mut steps = Vec::new();
    for (member, qos) in members {
        steps.push(connect(member, 5));
        steps.push(subscribe(member, &[sub("$share/workers/jobs/#", qos)]));
    }
    steps.push(connect("all", 5));
    steps.push(subscribe("all", &[sub("jobs/#", 1)]));
    steps.push(connect("p", 5));
    steps.push(publish_many("p", "jobs/x", 30, 1));
    steps.push(receive("all", 30, COME));
    steps.push(sleep(NO_MORE));
    for (member, _) in members {
        steps.push(receive(member, 30, 0));
    }
    let events = play(Driver::Js, gw.mqtt_addr(), &steps);
    let subacks: Vec<&Value> = events.iter().filter(|e| e["event"] == "suback").collect();
    assert_eq!(
        subacks,
        [
            &suback("m1", &[1]),
            &suback("m2", &[1]),
            &suback("m0", &[0]),
            &suback("all", &[1])
        ]
    );
    let everything: Vec<Value> = (0..30)
        .map(|i| message("all", "jobs/x", &i.to_string(), 1, false))
        .collect();
    assert_eq!(messages_of(&events, "all"), everything);
    let mut shared = Vec::new();
    for (member, qos) in members {
        let got = messages_of(&events, member);
        assert!(!got.is_empty(), "{member} got none");
        for m in got {
            assert_eq!(m["qos"], qos, "{member}: {m}");
            shared.push(m["payload"].as_str().map(str::to_owned));
        }
    }
    shared.sort_by_key(|p| p.as_deref().and_then(|p| p.parse::<u32>().ok()));
    let once: Vec<Option<String>> = (0..30).map(|i| Some(i.to_string())).collect();
    assert_eq!(shared, once, "each message to exactly one member");
}

// ---- UNSUBSCRIBE ----

/// Three overlapping subscriptions, removed in two UNSUBSCRIBEs.
fn unsubscribe_stops_delivery(driver: Driver, version: u8) {
    let gw = gateway(config()).start();
    let steps = [
        connect("s", version),
        subscribe("s", &[sub("u/a", 1), sub("u/+", 1), sub("u/#", 1)]),
        unsubscribe("s", &["u/a", "u/none", "u/+"]),
        connect("p", version),
        publish("p", "u/a", "still", 1, false),
        receive("s", 1, COME),
        unsubscribe("s", &["u/#"]),
        publish("p", "u/a", "gone", 1, false),
        receive("s", 1, NO_MORE),
    ];
    // MQTT 5 names each filter's outcome: 0x00 removed, 0x11 no subscription existed.
    let (first, second): (&[u8], &[u8]) = if version == 5 {
        (&[0, 0x11, 0], &[0])
    } else {
        (&[], &[])
    };
    assert_eq!(
        play(driver, gw.mqtt_addr(), &steps),
        [
            connack("s", false),
            suback("s", &[1, 1, 1]),
            unsuback("s", first),
            connack("p", false),
            message("s", "u/a", "still", 1, false),
            unsuback("s", second),
        ]
    );
}

/// MQTT 5, MQTT.js: UNSUBSCRIBE removes the subscriptions whose filter is identical
/// [MQTT-3.10.4-1], and no new message is added for them [MQTT-3.10.4-2]; it is answered
/// with one UNSUBACK [MQTT-3.10.4-4], [MQTT-3.10.4-6] even for a filter with no subscription
/// [MQTT-3.10.4-5], with a Reason Code per filter in their order [MQTT-3.11.3-1],
/// [MQTT-3.11.3-2].
#[test]
fn mqtt5_unsubscribe_stops_delivery_mqtt_js() {
    unsubscribe_stops_delivery(Driver::Js, 5);
}

/// MQTT 3.1.1, paho.mqtt.golang: UNSUBSCRIBE removes the subscriptions whose filter is
/// identical [MQTT-3.10.4-1], and no new message is added for them [MQTT-3.10.4-2]; it is
/// answered with one UNSUBACK [MQTT-3.10.4-4], [MQTT-3.10.4-6], even for a filter with no
/// subscription [MQTT-3.10.4-5].
#[test]
fn mqtt311_unsubscribe_stops_delivery_paho_go() {
    unsubscribe_stops_delivery(Driver::Go, 4);
}

// ---- Ordering (§4.6) ----

/// 100 QoS 1 messages sent back to back by one publisher reach a subscriber in that order.
/// (Fewer than the gateway's Receive Maximum, 128: MQTT.js does not keep to the server's.)
fn ordered(driver: Driver, publisher: u8, subscriber: u8) {
    let gw = gateway(config()).start();
    let steps = [
        connect("s", subscriber),
        subscribe("s", &[sub("ord/#", 2)]),
        connect("p", publisher),
        publish_many("p", "ord/x", 100, 1),
        receive("s", 100, COME),
    ];
    let events = play(driver, gw.mqtt_addr(), &steps);
    let order: Vec<Value> = (0..100)
        .map(|i| message("s", "ord/x", &i.to_string(), 1, false))
        .collect();
    assert_eq!(messages_of(&events, "s"), order);
}

/// MQTT 3.1.1 publisher (paho.mqtt.golang), MQTT 5 subscriber (paho.golang): a topic is
/// ordered by default, and its messages go to subscribers in the order they came from a
/// client ([MQTT-4.6.0-5], [MQTT-4.6.0-6]; 3.1.1 and 5 number these two the other way
/// round).
#[test]
fn messages_keep_publish_order_paho_go() {
    ordered(Driver::Go, 4, 5);
}

/// MQTT 5 publisher, MQTT 3.1.1 subscriber (MQTT.js): a topic is ordered by default, and its
/// messages go to subscribers in the order they came from a client ([MQTT-4.6.0-5],
/// [MQTT-4.6.0-6]).
#[test]
fn messages_keep_publish_order_mqtt_js() {
    ordered(Driver::Js, 5, 4);
}

// ---- Topic aliases ----

/// MQTT 5, paho.golang: the server accepts the client's Topic Aliases up to the Topic Alias
/// Maximum it sent (16) [MQTT-3.3.2-12], a later PUBLISH with topic and alias remaps it,
/// and subscribers get the full Topic Name: a client that sent no Topic Alias Maximum gets
/// no alias [MQTT-3.1.2-27].
#[test]
fn mqtt5_topic_aliases_from_the_client_paho_go() {
    let gw = gateway(config()).start();
    let alias = |step: Value, alias: u16| with(step, "alias", alias);
    let steps = [
        connect("s", 5),
        subscribe("s", &[sub("alias/#", 1)]),
        connect("p", 5),
        alias(publish("p", "alias/t", "1", 1, false), 16),
        alias(publish("p", "", "2", 1, false), 16),
        alias(publish("p", "alias/u", "3", 0, false), 16),
        alias(publish("p", "", "4", 1, false), 16),
        alias(publish("p", "alias/v", "5", 1, false), 1),
        alias(publish("p", "", "6", 1, false), 16),
        alias(publish("p", "", "7", 1, false), 1),
        receive("s", 7, COME),
    ];
    let topics = ["t", "t", "u", "u", "v", "u", "v"];
    let mut expected = vec![connack("s", false), suback("s", &[1]), connack("p", false)];
    for (i, topic) in topics.iter().enumerate() {
        let qos = if i == 2 { 0 } else { 1 };
        expected.push(message(
            "s",
            &format!("alias/{topic}"),
            &(i + 1).to_string(),
            qos,
            false,
        ));
    }
    assert_eq!(play(Driver::Go, gw.mqtt_addr(), &steps), expected);
}

/// MQTT 5, paho.golang: a Topic Alias mapping ends with its connection [MQTT-3.3.2-7]: on a
/// new one, a PUBLISH with only that alias is a Protocol Error (DISCONNECT 0x82), and
/// nothing reaches the subscriber.
#[test]
fn mqtt5_topic_aliases_do_not_outlive_the_connection_paho_go() {
    let gw = gateway(config()).start();
    let steps = [
        connect("s", 5),
        subscribe("s", &[sub("alias/#", 1)]),
        connect("p", 5),
        with(publish("p", "alias/t", "mapped", 1, false), "alias", 3),
        disconnect("p"),
        connect("p", 5),
        with(publish("p", "", "unmapped", 0, false), "alias", 3),
        receive("p", 1, COME),
        receive("s", 2, NO_MORE),
    ];
    assert_eq!(
        play(Driver::Go, gw.mqtt_addr(), &steps),
        [
            connack("s", false),
            suback("s", &[1]),
            connack("p", false),
            connack("p", false),
            disconnected("p", Some(0x82)),
            message("s", "alias/t", "mapped", 1, false),
        ]
    );
}
