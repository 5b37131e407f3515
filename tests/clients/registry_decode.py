#!/usr/bin/env python3
"""Decodes Confluent-framed Avro records with fastavro, independently of the gateway.

Usage: avro_decode.py REGISTRY_URL < payloads

Each input line is one Kafka record's value in hex. Each output line is JSON:
{"id": <schema id>, "value": <the record as fastavro reads it>}, or {"error": "..."}.
The schema is fetched from the registry by the id in the record's frame
(GET /schemas/ids/{id}), the way Confluent's deserializers do.
"""

import json
import sys
import urllib.request
from io import BytesIO

import fastavro


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
            with urllib.request.urlopen(f"{registry}/schemas/ids/{schema_id}", timeout=10) as r:
                text = json.load(r)["schema"]
            schemas[schema_id] = fastavro.parse_schema(json.loads(text))
        body = BytesIO(data[5:])
        value = fastavro.schemaless_reader(body, schemas[schema_id], None)
        if body.read():
            print(json.dumps({"error": "bytes left after the record"}), flush=True)
            continue
        print(json.dumps({"id": schema_id, "value": value}), flush=True)


if __name__ == "__main__":
    main()
