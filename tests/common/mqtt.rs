//! MQTT for tests: raw packets for what well-behaved clients never send.

/// One raw MQTT packet: the first byte (type and flags), the remaining length as a variable
/// byte integer, the body. For what well-behaved clients never send.
pub fn mqtt_frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Appends an MQTT string or binary field: a u16 big-endian length, then the bytes.
pub fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}
