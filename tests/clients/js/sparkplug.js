// Encodes Sparkplug B payloads with Eclipse Tahu's sparkplug-payload (npm), an implementation
// independent of edgegate's decoder, for tests/e2e.rs. Reads a JSON array of
// {"topic": ..., "payload": <a Tahu payload object>} on stdin and prints a JSON array of
// {"topic": ..., "hex": <the encoded payload>}.
"use strict";
const sparkplug = require("sparkplug-payload").get("spBv1.0");

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const out = JSON.parse(input).map(({ topic, payload }) => ({
    topic,
    hex: Buffer.from(sparkplug.encodePayload(payload)).toString("hex"),
  }));
  process.stdout.write(JSON.stringify(out));
});
