#!/usr/bin/env python3
"""Decodes Confluent-framed records, independently of the gateway: Avro with fastavro, JSON
Schema with the `jsonschema` package (the record's JSON validated by the writer's schema),
Protobuf with Google's `protobuf` package, the schema's .proto text compiled by protoc.

Usage: registry_decode.py REGISTRY_URL < payloads

Each input line is one Kafka record's value in hex. Each output line is JSON:
{"id": <schema id>, "type": "AVRO" | "JSON" | "PROTOBUF", "value": <the record as read>},
with "message" (the Protobuf message's full name) for Protobuf, or {"error": "..."}. The
schema is fetched from the registry by the id in the record's frame (GET /schemas/ids/{id},
with its schemaType), the way Confluent's deserializers do; a Protobuf record's message is
the one its message indexes name. A Protobuf value is the message as JSON (field names as in
the .proto, 64-bit integers as strings, as the Protobuf JSON mapping has them).
"""

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from io import BytesIO

import fastavro
import jsonschema


def fetch(registry, schema_id):
    with urllib.request.urlopen(f"{registry}/schemas/ids/{schema_id}", timeout=10) as r:
        answer = json.load(r)
    kind = answer.get("schemaType", "AVRO")
    if kind == "PROTOBUF":
        return kind, compile_proto(answer["schema"])
    schema = json.loads(answer["schema"])
    if kind == "JSON":
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return kind, cls(schema)
    if kind == "AVRO":
        return kind, fastavro.parse_schema(schema)
    raise ValueError(f"schema {schema_id} is {kind}")


def compile_proto(source):
    """The messages of .proto text `source`, top-level ones in file order, by protoc."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "schema.proto"), "w", encoding="utf-8") as f:
            f.write(source)
        out = os.path.join(tmp, "schema.desc")
        subprocess.run(
            ["protoc", f"--proto_path={tmp}", "--include_imports",
             f"--descriptor_set_out={out}", "schema.proto"],
            check=True, capture_output=True)
        with open(out, "rb") as f:
            files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    schema = pool.FindFileByName("schema.proto")
    return [message_factory.GetMessageClass(m)
            for m in schema.message_types_by_name.values()]


def read_varint(stream):
    shift = value = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise ValueError("the message indexes end early")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return (value >> 1) ^ -(value & 1)
        shift += 7


def decode_protobuf(messages, body):
    from google.protobuf import json_format, message_factory

    stream = BytesIO(body)
    count = read_varint(stream)
    indexes = [read_varint(stream) for _ in range(count)] if count else [0]
    cls = messages[indexes[0]]
    for i in indexes[1:]:
        cls = message_factory.GetMessageClass(cls.DESCRIPTOR.nested_types[i])
    message = cls.FromString(stream.read())
    value = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return {"value": value, "message": cls.DESCRIPTOR.full_name}


def decode(kind, schema, body):
    if kind == "PROTOBUF":
        return decode_protobuf(schema, body)
    if kind == "JSON":
        value = json.loads(body.decode("utf-8"))
        errors = [e.message for e in schema.iter_errors(value)]
        if errors:
            return {"error": "does not match its JSON Schema: " + "; ".join(errors)}
        return {"value": value}
    stream = BytesIO(body)
    value = fastavro.schemaless_reader(stream, schema, None)
    if stream.read():
        return {"error": "bytes left after the record"}
    return {"value": value}


def main():
    registry = sys.argv[1].rstrip("/")
    schemas = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        data = bytes.fromhex(line)
        if len(data) < 5 or data[0] != 0:
            print(json.dumps({"error": "not the Confluent wire format"}), flush=True)
            continue
        schema_id = int.from_bytes(data[1:5], "big")
        if schema_id not in schemas:
            schemas[schema_id] = fetch(registry, schema_id)
        kind, schema = schemas[schema_id]
        out = decode(kind, schema, data[5:])
        if "value" in out:
            out.update({"id": schema_id, "type": kind})
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
