//! Server-sent events written by hand on the raw response writer, each
//! event flushed at once (tiny_http's own chunked encoder buffers, which
//! would hold tokens back): to an HTTP/1.1 client over chunked transfer,
//! one HTTP chunk per event; to an HTTP/1.0 client (which knows no chunks:
//! nginx's default `proxy_http_version`, say) as a body that the end of
//! the connection ends. The framing is pure ([`head`], [`frame`],
//! [`event`]) so that it is tested byte by byte; [`SseWriter`] only writes
//! it.

use std::io::{self, Write};

/// How the body of a stream is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// HTTP/1.1: chunked transfer, the connection may carry more requests.
    Chunked,
    /// HTTP/1.0: the body ends where the connection does.
    Close,
}

/// The status line and headers of an event stream. `extra`: more
/// `Name: value` headers (already checked to be header-safe).
pub fn head(extra: &[(&str, &str)], framing: Framing) -> Vec<u8> {
    let (status, delimit) = match framing {
        Framing::Chunked => ("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"),
        Framing::Close => ("HTTP/1.0 200 OK", "Connection: close"),
    };
    let mut h = format!(
        "{status}\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         X-Accel-Buffering: no\r\n{delimit}\r\n",
    );
    for (name, value) in extra {
        h.push_str(&format!("{name}: {value}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// `data: {payload}` and a blank line, as the pieces of one HTTP chunk.
pub fn event(payload: &str) -> [&[u8]; 3] {
    [b"data: ", payload.as_bytes(), b"\n\n"]
}

/// The comment sent while no token comes, so proxies and clients see life.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// `parts`, one after the other, as one HTTP chunk.
pub fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut f = Vec::with_capacity(len + 20);
    // Writing into a Vec cannot fail.
    let _ = write!(f, "{len:x}\r\n");
    for p in parts {
        f.extend_from_slice(p);
    }
    f.extend_from_slice(b"\r\n");
    f
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

pub struct SseWriter<W: Write> {
    out: W,
    framing: Framing,
}

impl<W: Write> SseWriter<W> {
    /// Write the head; the stream has started.
    pub fn start(mut out: W, extra: &[(&str, &str)], framing: Framing) -> io::Result<SseWriter<W>> {
        out.write_all(&head(extra, framing))?;
        out.flush()?;
        Ok(SseWriter { out, framing })
    }

    /// One `data:` event, on the wire when this returns.
    pub fn data(&mut self, payload: &str) -> io::Result<()> {
        self.raw(&event(payload))
    }

    pub fn keepalive(&mut self) -> io::Result<()> {
        self.raw(&[KEEPALIVE])
    }

    fn raw(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        match self.framing {
            Framing::Chunked => self.out.write_all(&frame(parts))?,
            Framing::Close => self.out.write_all(&parts.concat())?,
        }
        self.out.flush()
    }

    /// The end of the body: the last chunk (the connection may carry the
    /// next request), or nothing (the caller closes the connection).
    pub fn finish(mut self) -> io::Result<()> {
        if self.framing == Framing::Chunked {
            self.out.write_all(LAST_CHUNK)?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_chunks_on_the_wire() {
        let mut w =
            SseWriter::start(Vec::new(), &[("X-Citadel-Job-Id", "j1")], Framing::Chunked).unwrap();
        w.data(r#"{"a":1}"#).unwrap();
        w.keepalive().unwrap();
        w.data("[DONE]").unwrap();
        let out = w.out.clone();
        w.finish().unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"));
        assert!(text.contains("Transfer-Encoding: chunked\r\nX-Citadel-Job-Id: j1\r\n\r\n"));
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(
            body,
            "f\r\ndata: {\"a\":1}\n\n\r\ne\r\n: keep-alive\n\n\r\ne\r\ndata: [DONE]\n\n\r\n"
        );
        assert_eq!(frame(&[]), b"0\r\n\r\n");
        let mut w = SseWriter::start(Vec::new(), &[], Framing::Close).unwrap();
        w.data("x").unwrap();
        w.keepalive().unwrap();
        let out = w.out.clone();
        w.finish().unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\nConnection: close"), "{head}");
        assert!(!head.contains("chunked"), "{head}");
        assert_eq!(body, "data: x\n\n: keep-alive\n\n");
        let long = frame(&[&[b'x'; 300], b"y"]);
        assert!(long.starts_with(b"12d\r\nxx") && long.ends_with(b"xy\r\n"));
        assert_eq!(long.len(), 5 + 301 + 2);
    }
}
