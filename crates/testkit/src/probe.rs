//! Readiness probes on the servers' own protocols: NATS's INFO line and a Mongo `ping` (OP_MSG).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

pub(crate) fn connect(port: u16) -> io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to a NATS server and returns its INFO line (the JSON after `INFO `).
pub(crate) fn nats_info(port: u16) -> io::Result<String> {
    let mut stream = connect(port)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no INFO line"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let _ = stream.shutdown(Shutdown::Both);
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("INFO ")
        .map(|s| s.trim().to_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("not INFO: {line:?}")))
}

/// Sends `{ping: 1, $db: "admin"}` as an OP_MSG and reports whether the reply has `ok: 1`.
pub(crate) fn mongo_ping(port: u16) -> io::Result<bool> {
    let mut stream = connect(port)?;
    let mut doc = Vec::new();
    doc.extend_from_slice(&[0; 4]); // length, patched below
    doc.push(0x10); // int32
    doc.extend_from_slice(b"ping\0");
    doc.extend_from_slice(&1i32.to_le_bytes());
    doc.push(0x02); // string
    doc.extend_from_slice(b"$db\0");
    doc.extend_from_slice(&6i32.to_le_bytes());
    doc.extend_from_slice(b"admin\0");
    doc.push(0);
    let doc_len = doc.len() as i32;
    doc[..4].copy_from_slice(&doc_len.to_le_bytes());

    const OP_MSG: i32 = 2013;
    let msg_len = 16 + 4 + 1 + doc.len();
    let mut msg = Vec::with_capacity(msg_len);
    msg.extend_from_slice(&(msg_len as i32).to_le_bytes());
    msg.extend_from_slice(&1i32.to_le_bytes()); // requestID
    msg.extend_from_slice(&0i32.to_le_bytes()); // responseTo
    msg.extend_from_slice(&OP_MSG.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes()); // flagBits
    msg.push(0); // section kind 0: body
    msg.extend_from_slice(&doc);
    stream.write_all(&msg)?;

    let mut header = [0u8; 16];
    stream.read_exact(&mut header)?;
    let len = i32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let opcode = i32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if opcode != OP_MSG || !(21..=48 * 1024 * 1024).contains(&len) {
        return Ok(false);
    }
    let mut body = vec![0u8; len as usize - 16];
    stream.read_exact(&mut body)?;
    let _ = stream.shutdown(Shutdown::Both);
    // flagBits (4), section kind (1), then the reply document.
    if body[4] != 0 {
        return Ok(false);
    }
    Ok(bson_ok(&body[5..]))
}

/// Whether a BSON document has a top-level numeric `ok` equal to 1.
pub(crate) fn bson_ok(doc: &[u8]) -> bool {
    let rd_i32 = |at: usize| -> Option<i32> {
        doc.get(at..at + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let Some(total) = rd_i32(0) else { return false };
    let end = (total as usize).min(doc.len());
    let mut pos = 4;
    while pos < end {
        let ty = doc[pos];
        if ty == 0 {
            break;
        }
        pos += 1;
        let Some(name_len) = doc[pos..end].iter().position(|&b| b == 0) else {
            return false;
        };
        let name = &doc[pos..pos + name_len];
        pos += name_len + 1;
        let value_at = pos;
        let size = match ty {
            0x01 | 0x09 | 0x11 | 0x12 => 8, // double, date, timestamp, int64
            0x02 | 0x0D | 0x0E => rd_i32(pos).map_or(usize::MAX, |l| 4 + l as usize), // strings
            0x03 | 0x04 => rd_i32(pos).map_or(usize::MAX, |l| l as usize), // doc, array
            0x05 => rd_i32(pos).map_or(usize::MAX, |l| 5 + l as usize), // binary
            0x07 => 12,                     // ObjectId
            0x08 => 1,                      // bool
            0x0A | 0x06 | 0xFF | 0x7F => 0, // null, undefined, min/max key
            0x10 => 4,                      // int32
            0x13 => 16,                     // decimal128
            _ => return false,
        };
        if name == b"ok" {
            let v = &doc[value_at..];
            return match ty {
                0x01 if v.len() >= 8 => {
                    f64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]) == 1.0
                }
                0x10 if v.len() >= 4 => i32::from_le_bytes([v[0], v[1], v[2], v[3]]) == 1,
                0x12 if v.len() >= 8 => {
                    i64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]) == 1
                }
                0x08 if !v.is_empty() => v[0] == 1,
                _ => false,
            };
        }
        pos = match pos.checked_add(size) {
            Some(p) => p,
            None => return false,
        };
    }
    false
}
