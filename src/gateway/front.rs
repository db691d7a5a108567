//! The gateway's TCP side, in front of tiny_http (which listens on a Unix
//! socket in a private directory, as the metrics listener does: tiny_http
//! has no socket timeouts, no size limits and a thread per connection).
//!
//! One thread per client connection, at most `max_connections` (more are
//! answered 503 at once). It reads each request's head (up to
//! [`MAX_HEAD_BYTES`], else 431) and body (its `Content-Length`, up to
//! `max_body`, else 413; a chunked request body gets 411) within
//! `client_timeout` of its first byte (else 408: slow clients are cut
//! off), and passes them on with one header added first,
//! `X-Citadel-Conn: N`, that ties the request to this connection's
//! [`Conn`]. While a request is being answered the connection may be quiet
//! for as long as the answer takes; between requests, for at most
//! `client_timeout`. When the client goes away, [`Conn::gone`] says so, and
//! the answering thread cancels the job. Bytes from tiny_http are copied
//! back unread, with a write timeout (a client that stops reading is cut
//! off too); a streamed answer may skip that copy ([`Conn::direct`]).

use super::openai::ApiError;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// The header the front adds to every request it passes on.
pub const CONN_HEADER: &str = "X-Citadel-Conn";
/// How often a waiting read looks at the connection's state.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub client_timeout: Duration,
    pub max_body: usize,
}

/// What the front knows of one client connection, shared with the thread
/// answering its request.
#[derive(Default)]
pub struct Conn {
    gone: AtomicBool,
    /// Requests passed on and not yet answered.
    busy: AtomicUsize,
    /// The client's socket, for an answer written straight to it.
    client: Mutex<Option<TcpStream>>,
}

impl Conn {
    /// The client's socket, to write a streamed answer to it directly (one
    /// thread hop less per token than through tiny_http and the copy back),
    /// when the request asking is the only one passed on and not answered:
    /// nothing of tiny_http's is then on its way to the client. The caller
    /// holds tiny_http's writer of the request until it is done, so that an
    /// answer to a later request waits behind it.
    pub fn direct(&self) -> Option<TcpStream> {
        if self.busy.load(Ordering::SeqCst) != 1 || self.gone() {
            return None;
        }
        let client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        client.as_ref().and_then(|c| c.try_clone().ok())
    }

    /// The client closed the connection (or it was cut off).
    pub fn gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// The request passed on is answered (the answering thread says so).
    pub fn answered(&self) {
        let _ = self
            .busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1));
    }
}

static CONNS: Mutex<Option<HashMap<u64, Arc<Conn>>>> = Mutex::new(None);

fn conns() -> std::sync::MutexGuard<'static, Option<HashMap<u64, Arc<Conn>>>> {
    CONNS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection a request came on, by the header the front added.
pub fn conn(id: &str) -> Option<Arc<Conn>> {
    let id: u64 = id.trim().parse().ok()?;
    conns().as_ref()?.get(&id).cloned()
}

/// Accept connections on `tcp` and serve each against the socket, until
/// the process ends.
pub fn accept(tcp: TcpListener, socket: PathBuf, limits: Limits) {
    let open = Arc::new(AtomicUsize::new(0));
    static NEXT: AtomicU64 = AtomicU64::new(1);
    for client in tcp.incoming() {
        let Ok(client) = client else {
            // EMFILE and the like: do not spin.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            let e = ApiError::new(
                503,
                "server_error",
                format!(
                    "the gateway serves {} connections at once; try again",
                    limits.max_connections
                ),
            )
            .code("too_many_connections");
            refuse(&client, &e, Some(1));
            continue;
        }
        let id = NEXT.fetch_add(1, Ordering::SeqCst);
        let conn = Arc::new(Conn {
            client: Mutex::new(client.try_clone().ok()),
            ..Conn::default()
        });
        conns()
            .get_or_insert_with(HashMap::new)
            .insert(id, conn.clone());
        let (count, socket, limits) = (open.clone(), socket.clone(), limits.clone());
        let spawned = std::thread::Builder::new()
            .name("gateway-conn".into())
            .spawn(move || {
                serve(client, &socket, &limits, id, &conn);
                if let Some(map) = conns().as_mut() {
                    map.remove(&id);
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            log::warn!("gateway: cannot start a connection thread");
            if let Some(map) = conns().as_mut() {
                map.remove(&id);
            }
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answer `e` on a connection the front itself closes.
fn refuse(mut client: &TcpStream, e: &ApiError, retry_after: Option<u64>) {
    let _ = client.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = client.write_all(&error_response(e, retry_after));
    let _ = client.shutdown(Shutdown::Write);
    // Let the client read it before the close resets the connection.
    let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
    let _ = client.shutdown(Shutdown::Both);
}

/// A whole HTTP response carrying the error object, closing the connection.
pub fn error_response(e: &ApiError, retry_after: Option<u64>) -> Vec<u8> {
    let body = e.body().to_string();
    let reason = match e.status {
        400 => "Bad Request",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let retry = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
    format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {retry}Connection: close\r\n\r\n{body}",
        e.status,
        body.len()
    )
    .into_bytes()
}

/// What a request head says of its body.
#[derive(Debug, PartialEq)]
enum Body {
    Length(usize),
    Chunked,
}

/// The end of the head in `buf` (the index after the blank line), if there.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The head with the connection header added after the request line, and
/// what it says of the body. Headers named like ours are dropped (a client
/// must not pick another connection).
fn rewrite_head(head: &[u8], id: u64) -> Result<(Vec<u8>, Body), &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not text")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut out = format!("{request_line}\r\n{CONN_HEADER}: {id}\r\n");
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("a header line has no ':'")?;
        let name = name.trim();
        if name.eq_ignore_ascii_case(CONN_HEADER) {
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| "Content-Length is not a number")?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Length headers");
            }
            length = Some(n);
        }
        if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.trim().eq_ignore_ascii_case("identity")
        {
            chunked = true;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let body = if chunked {
        Body::Chunked
    } else {
        Body::Length(length.unwrap_or(0))
    };
    Ok((out.into_bytes(), body))
}

/// [`rewrite_head`]'s head, for the property tests.
#[cfg(test)]
pub fn rewrite_head_for_tests(head: &[u8], id: u64) -> Result<Vec<u8>, &'static str> {
    rewrite_head(head, id).map(|(h, _)| h)
}

fn serve(client: TcpStream, socket: &Path, limits: &Limits, id: u64, conn: &Conn) {
    let Ok(inner) = UnixStream::connect(socket) else {
        return;
    };
    let _ = client.set_write_timeout(Some(limits.client_timeout));
    let _ = client.set_nodelay(true);
    let (Ok(mut client_out), Ok(mut inner_in)) = (client.try_clone(), inner.try_clone()) else {
        return;
    };
    std::thread::scope(|s| {
        // tiny_http → client, unread.
        s.spawn(|| {
            let _ = std::io::copy(&mut inner_in, &mut client_out);
            let _ = client_out.shutdown(Shutdown::Both);
        });
        let why = requests(&client, &inner, limits, id, conn);
        conn.gone.store(true, Ordering::SeqCst);
        if let Some(e) = why {
            // Only between answers: never in the middle of tiny_http's bytes.
            if conn.busy.load(Ordering::SeqCst) == 0 {
                refuse(&client, &e, None);
            }
        }
        let _ = client.shutdown(Shutdown::Both);
        let _ = inner.shutdown(Shutdown::Both);
    });
}

/// Pass requests on until the client leaves (`None`) or breaks a limit
/// (the error to answer).
fn requests(
    mut client: &TcpStream,
    mut inner: &UnixStream,
    limits: &Limits,
    id: u64,
    conn: &Conn,
) -> Option<ApiError> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 << 10];
    let mut idle_since = Instant::now();
    loop {
        // Waiting for a request's first byte (some may be in buf already).
        let started = loop {
            if !buf.is_empty() {
                break Instant::now();
            }
            let busy = conn.busy.load(Ordering::SeqCst) > 0;
            if busy {
                idle_since = Instant::now();
            } else if idle_since.elapsed() >= limits.client_timeout {
                return None;
            }
            let _ = client.set_read_timeout(Some(TICK));
            match client.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(_) => return None,
            }
        };
        let deadline = started + limits.client_timeout;
        let slow = || {
            ApiError::new(
                408,
                "invalid_request_error",
                format!(
                    "the request did not arrive within {}",
                    crate::config::format_duration(limits.client_timeout)
                ),
            )
        };
        // The head.
        let end = loop {
            if let Some(end) = head_end(&buf) {
                break end;
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Some(ApiError::new(
                    431,
                    "invalid_request_error",
                    format!("request headers over {MAX_HEAD_BYTES} bytes"),
                ));
            }
            match read_until(client, &mut chunk, deadline) {
                Ok(0) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(true) => return Some(slow()),
                Err(false) => return None,
            }
        };
        if end > MAX_HEAD_BYTES {
            return Some(ApiError::new(
                431,
                "invalid_request_error",
                format!("request headers over {MAX_HEAD_BYTES} bytes"),
            ));
        }
        let (head, body) = match rewrite_head(&buf[..end], id) {
            Ok(h) => h,
            Err(why) => return Some(ApiError::new(400, "invalid_request_error", why)),
        };
        let length = match body {
            Body::Chunked => {
                return Some(ApiError::new(
                    411,
                    "invalid_request_error",
                    "chunked request bodies are not accepted: send Content-Length",
                ))
            }
            Body::Length(n) if n > limits.max_body => {
                return Some(ApiError::new(
                    413,
                    "invalid_request_error",
                    format!(
                        "the request body is {n} bytes; at most {} are read",
                        limits.max_body
                    ),
                ))
            }
            Body::Length(n) => n,
        };
        conn.busy.fetch_add(1, Ordering::SeqCst);
        if inner.write_all(&head).is_err() {
            return None;
        }
        buf.drain(..end);
        // The body: what is in buf, then the rest from the client.
        let mut left = length;
        loop {
            let take = left.min(buf.len());
            if take > 0 {
                if inner.write_all(&buf[..take]).is_err() {
                    return None;
                }
                buf.drain(..take);
                left -= take;
            }
            if left == 0 {
                break;
            }
            match read_until(client, &mut chunk, deadline) {
                Ok(0) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(true) => {
                    // tiny_http waits for the rest of a body it was promised.
                    let _ = inner.shutdown(Shutdown::Both);
                    return None;
                }
                Err(false) => return None,
            }
        }
        idle_since = Instant::now();
        // What is left in buf is the start of the next request.
    }
}

/// One read before `deadline`: `Err(true)` past it, `Err(false)` on a
/// broken connection.
fn read_until(mut client: &TcpStream, chunk: &mut [u8], deadline: Instant) -> Result<usize, bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(true);
        }
        let _ = client.set_read_timeout(Some(left));
        match client.read(chunk) {
            Ok(n) => return Ok(n),
            Err(e) if is_timeout(&e) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(false),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_gets_our_header_first_and_loses_a_forged_one() {
        let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Citadel-Conn: 99\r\n\
                     Content-Length: 12\r\n\r\n";
        let (out, body) = rewrite_head(head, 7).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/completions HTTP/1.1\r\nX-Citadel-Conn: 7\r\nHost: x\r\nContent-Length: 12\r\n\r\n"
        );
        assert_eq!(body, Body::Length(12));
        let (_, body) = rewrite_head(b"GET / HTTP/1.1\r\n\r\n", 1).unwrap();
        assert_eq!(body, Body::Length(0));
        let (_, body) =
            rewrite_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 1).unwrap();
        assert_eq!(body, Body::Chunked);
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nnocolon\r\n\r\n",
            b"POST / HTTP/1.1\r\nA: \xff\r\n\r\n",
        ] {
            assert!(rewrite_head(bad, 1).is_err());
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn an_error_response_is_whole_and_closes() {
        let e = ApiError::new(413, "invalid_request_error", "too big");
        let text = String::from_utf8(error_response(&e, Some(2))).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Retry-After: 2") && head.contains("Connection: close"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["message"], "too big");
    }
}
