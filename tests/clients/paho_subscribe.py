"""Subscribes with paho-mqtt (MQTT 5) and prints each message as a JSON line.

Usage: paho_subscribe.py HOST PORT CLIENT_ID FILTER QOS COUNT TIMEOUT_SECONDS

Prints "SUBACK <codes>" once subscribed (so the caller knows when to publish), then one
JSON object per message: topic, payload (text), qos, retain, and the MQTT 5 properties
response_topic, correlation_data (hex), content_type, user_properties. Exits 0 after COUNT
messages, 1 on timeout.
"""

import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

host, port, client_id, topic_filter, qos, count, timeout = sys.argv[1:8]
count = int(count)
received = []


def on_connect(client, userdata, flags, reason_code, properties):
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 42
    client.subscribe(topic_filter, qos=int(qos), properties=props)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    print("SUBACK " + " ".join(str(rc.value) for rc in reason_codes), flush=True)


def on_message(client, userdata, message):
    p = message.properties
    out = {
        "topic": message.topic,
        "payload": message.payload.decode("utf-8", "replace"),
        "qos": message.qos,
        "retain": bool(message.retain),
        "response_topic": getattr(p, "ResponseTopic", None),
        "correlation_data": getattr(p, "CorrelationData", b"").hex() or None,
        "content_type": getattr(p, "ContentType", None),
        "user_properties": getattr(p, "UserProperty", []),
        "subscription_ids": getattr(p, "SubscriptionIdentifier", []),
    }
    print(json.dumps(out), flush=True)
    received.append(out)


client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, int(port), keepalive=30)
client.loop_start()
deadline = time.time() + float(timeout)
while len(received) < count and time.time() < deadline:
    time.sleep(0.05)
client.disconnect()
client.loop_stop()
sys.exit(0 if len(received) >= count else 1)
