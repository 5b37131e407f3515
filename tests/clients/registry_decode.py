#!/usr/bin/env python3
"""Decodes Confluent-framed records, independently of the gateway: Avro with fastavro, JSON
Schema with the `jsonschema` package (the record's JSON validated by the writer's schema).

Usage: registry_decode.py REGISTRY_URL < payloads

Each input line is one Kafka record's value in hex. Each output line is JSON:
{"id": <schema id>, "type": "AVRO" | "JSON", "value": <the record as read>}, or
{"error": "..."}. The schema is fetched from the registry by the id in the record's frame
(GET /schemas/ids/{id}, with its schemaType), the way Confluent's deserializers do.
"""

import json
import sys
import urllib.request
from io import BytesIO

import fastavro
import jsonschema


def fetch(registry, schema_id):
    with urllib.request.urlopen(f"{registry}/schemas/ids/{schema_id}", timeout=10) as r:
        answer = json.load(r)
    kind = answer.get("schemaType", "AVRO")
    schema = json.loads(answer["schema"])
    if kind == "JSON":
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return kind, cls(schema)
    if kind == "AVRO":
        return kind, fastavro.parse_schema(schema)
    raise ValueError(f"schema {schema_id} is {kind}")


def decode(kind, schema, body):
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
