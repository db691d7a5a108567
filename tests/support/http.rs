//! The one HTTP/1.1 server behind the test fakes (fake_engine.rs,
//! fake_nexus.rs, fake_extraction.rs): a std `TcpListener` on
//! 127.0.0.1, one thread per connection, keep-alive (requests in turn on one
//! connection), request bodies by `Content-Length` or chunked, `Expect:
//! 100-continue`, a client's `Connection: close` and HTTP/1.0 honoured.
//!
//! What to answer is the fake's business: it gives the server a handler that
//! turns each [`Request`] into an [`Answer`], called on the connection's
//! thread. A [`Response`] is a status line, headers, a [`Framing`]
//! (chunked, close-delimited or `Content-Length`) and [`Step`]s written in
//! order: body pieces, pauses, a hang until the client goes away, a TCP
//! reset, a generator; or no answer at all (hang up, or say nothing until
//! the client goes away). Each piece is written and flushed on its own
//! (`TCP_NODELAY`), and the next one only once the client has read it (its
//! socket's receive queue in `/proc/net/tcp` is empty; at most
//! [`DELIVERY_WAIT`]): a reply cut into pieces reaches the client in as many
//! reads, which is the point of cutting it, even on a loaded machine.
//!
//! The server records every request (method, target, headers, body, when it
//! was read, its connection) and when the client closed that connection
//! after it (a read saw EOF or an error, or a write failed). Waits on the
//! record block on a condition variable with a deadline.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// How often a waiting connection thread looks at the stop flag.
const TICK: Duration = Duration::from_millis(20);

/// The largest request head or body accepted (a bigger one is a bug).
const MAX_REQUEST: usize = 16 << 20;

/// How long a piece waits for the client to read the one before it; past
/// this the reply goes on anyway (a client that stopped reading is a case
/// some tests make on purpose).
pub const DELIVERY_WAIT: Duration = Duration::from_secs(2);

/// Writes one piece of a body (framed as the response says) and flushes it.
pub type PieceWriter<'a> = dyn FnMut(&[u8]) -> io::Result<()> + 'a;

/// Produces body pieces through the writer it is given, as fast as the
/// client takes them (benchmarks: no delivery wait between them).
pub type Generator = Arc<dyn Fn(&mut PieceWriter<'_>) -> io::Result<()> + Send + Sync>;

/// One step of a response's body.
#[derive(Clone)]
pub enum Step {
    /// These bytes, written and flushed as one piece.
    Send(Vec<u8>),
    /// Wait this long before the next step (cut short when the server stops).
    Pause(Duration),
    /// Write nothing more; keep the connection open until the client closes it.
    Hang,
    /// End the connection with a TCP reset (RST), mid-body.
    Reset,
    /// Let the generator write the pieces.
    Generate(Generator),
}

/// How the body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`; each `Send` is one chunk.
    Chunked,
    /// No length: the body ends when the server closes the connection.
    Close,
    /// `Content-Length` of all `Send` steps together (none for 1xx, 204, 304).
    Length,
}

/// A scripted answer to one request.
#[derive(Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    /// Waited (cut short when the server stops) before the status line.
    pub delay: Duration,
    pub steps: Vec<Step>,
}

impl Response {
    /// `status`, no headers, an empty `Content-Length` body.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            framing: Framing::Length,
            delay: Duration::ZERO,
            steps: Vec::new(),
        }
    }

    /// `status` with a JSON body and its Content-Length.
    pub fn json(status: u16, body: &str) -> Response {
        Response::new(status)
            .header("Content-Type", "application/json")
            .send(body)
    }

    /// 200, chunked, this `Content-Type`; the body is what `send` adds.
    pub fn streaming(content_type: &str) -> Response {
        Response::new(200)
            .header("Content-Type", content_type)
            .framing(Framing::Chunked)
    }

    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn framing(mut self, framing: Framing) -> Response {
        self.framing = framing;
        self
    }

    /// Waits `d` before answering at all (a stalled server).
    pub fn delayed(mut self, d: Duration) -> Response {
        self.delay = d;
        self
    }

    /// One more piece of body.
    pub fn send(mut self, bytes: impl AsRef<[u8]>) -> Response {
        self.steps.push(Step::Send(bytes.as_ref().to_vec()));
        self
    }

    /// `wire` in pieces cut at these byte offsets (e.g. mid-line), each
    /// delivered in its own read.
    pub fn send_split(mut self, wire: &[u8], cuts: &[usize]) -> Response {
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&wire.len())) {
            if cut > at {
                self.steps.push(Step::Send(wire[at..cut].to_vec()));
                at = cut;
            }
        }
        self
    }

    pub fn pause(mut self, d: Duration) -> Response {
        self.steps.push(Step::Pause(d));
        self
    }

    pub fn hang(mut self) -> Response {
        self.steps.push(Step::Hang);
        self
    }

    pub fn reset(mut self) -> Response {
        self.steps.push(Step::Reset);
        self
    }

    pub fn generate(mut self, g: Generator) -> Response {
        self.steps.push(Step::Generate(g));
        self
    }

    /// The first header of that name (case-insensitive).
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the response says the connection ends after it.
    fn closes(&self) -> bool {
        self.framing == Framing::Close
            || self
                .header_value("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    fn has_body(&self) -> bool {
        !(self.status < 200 || self.status == 204 || self.status == 304)
    }
}

/// What the server does with one request.
#[derive(Clone)]
pub enum Answer {
    Respond(Response),
    /// Close the connection without answering (after `delay`, if any).
    HangUp(Duration),
    /// Write nothing; keep the connection open until the client closes it
    /// (recorded as the request's `closed_at`).
    Silence,
}

impl From<Response> for Answer {
    fn from(r: Response) -> Answer {
        Answer::Respond(r)
    }
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Its place in [`HttpServer::requests`] (0, 1, …).
    pub seq: usize,
    /// Which connection it came on (1, 2, … in accept order).
    pub conn: u64,
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// When the whole request had been read.
    pub at: Instant,
    /// When the server saw the client close the connection, if it did so
    /// right after this request (a later request on it leaves this `None`).
    pub closed_at: Option<Instant>,
}

impl Request {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The target without its query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }

    /// Whether the client asked to close the connection after this request
    /// (`Connection: close`, or HTTP/1.0 without `keep-alive`).
    pub fn wants_close(&self) -> bool {
        match self.header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => true,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => false,
            _ => self.version == "HTTP/1.0",
        }
    }
}

type Handler = dyn Fn(&Request) -> Answer + Send + Sync;

struct Shared {
    requests: Mutex<Vec<Request>>,
    /// Notified on every request recorded or closed, and on stop.
    changed: Condvar,
    stop: AtomicBool,
    conns: AtomicU64,
    handler: Box<Handler>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Request>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`; false if the server stopped meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut guard = self.lock();
        loop {
            if self.stopping() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            guard = self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn record(&self, mut req: Request) -> Request {
        let mut requests = self.lock();
        req.seq = requests.len();
        requests.push(req.clone());
        drop(requests);
        self.changed.notify_all();
        req
    }

    fn closed(&self, seq: usize) {
        if let Some(r) = self.lock().get_mut(seq) {
            r.closed_at.get_or_insert_with(Instant::now);
        }
        self.changed.notify_all();
    }
}

/// The server; dropping it stops accepting, ends pauses and hangs, and
/// closes every connection (within [`TICK`]).
pub struct HttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves on a free port of 127.0.0.1, answering with `handler`.
    pub fn start(
        name: &str,
        handler: impl Fn(&Request) -> Answer + Send + Sync + 'static,
    ) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        HttpServer::serve(listener, name, handler)
    }

    /// Serves on `listener` (e.g. bound to a port a client was already told).
    pub fn serve(
        listener: TcpListener,
        name: &str,
        handler: impl Fn(&Request) -> Answer + Send + Sync + 'static,
    ) -> HttpServer {
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: AtomicU64::new(0),
            handler: Box::new(handler),
        });
        let acceptor = {
            let shared = shared.clone();
            let name = name.to_owned();
            thread::Builder::new()
                .name(format!("{name} {addr}"))
                .spawn(move || accept(&listener, &name, &shared))
                .expect("spawning the HTTP server")
        };
        HttpServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in the order they were read.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().clone()
    }

    /// Waits until `f` finds what it looks for in the requests so far;
    /// panics with them all after `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&[Request]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut requests = self.shared.lock();
        loop {
            if let Some(v) = f(&requests) {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let seen = summary(&requests);
                drop(requests);
                panic!("timed out after {timeout:?} waiting for {what}; requests:\n{seen}");
            }
            requests = self
                .shared
                .changed
                .wait_timeout(requests, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the blocked accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// One line per request, for assertion messages.
pub fn summary(requests: &[Request]) -> String {
    let t0 = requests.first().map(|r| r.at);
    requests
        .iter()
        .map(|r| {
            let ms = t0.map_or(0, |t| r.at.duration_since(t).as_millis());
            let closed = if r.closed_at.is_some() {
                " (closed)"
            } else {
                ""
            };
            let mut body = r.body_text();
            if body.len() > 200 {
                let mut cut = 200;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
                body.push('…');
            }
            format!(
                "  #{} +{ms}ms conn {} {} {}{closed} {body}",
                r.seq, r.conn, r.method, r.path
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn accept(listener: &TcpListener, name: &str, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopping() {
            return;
        }
        let Ok(conn) = conn else { continue };
        let n = shared.conns.fetch_add(1, Ordering::SeqCst) + 1;
        let shared = shared.clone();
        let _ = thread::Builder::new()
            .name(format!("{name} conn {n}"))
            .spawn(move || serve(conn, n, &shared));
    }
}

/// How a response left the connection.
enum After {
    /// Open for the next request.
    KeepAlive,
    /// The server ends it (close framing, `Connection: close`): wait for the
    /// client to close its side.
    Close,
    /// Open, written nothing more, until the client closes it.
    Hang,
    /// Reset by the server: nothing more to see.
    Reset,
    /// A write failed: the client is gone.
    Gone,
}

/// One connection: requests in turn until either side ends it.
fn serve(stream: TcpStream, conn: u64, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(TICK));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut reader = ConnReader {
        stream: match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        },
        buf: VecDeque::new(),
    };
    let mut writer = stream;
    let mut last: Option<usize> = None;
    loop {
        let req = match read_request(&mut reader, &mut writer, conn, shared) {
            Ok(Some(req)) => req,
            Ok(None) => {
                // The client closed between requests (or before any).
                if let Some(seq) = last {
                    shared.closed(seq);
                }
                return;
            }
            Err(_) => {
                if let Some(seq) = last.filter(|_| !shared.stopping()) {
                    shared.closed(seq);
                }
                return;
            }
        };
        let req = shared.record(req);
        last = Some(req.seq);
        let after = match (shared.handler)(&req) {
            Answer::HangUp(delay) => {
                shared.sleep(delay);
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            Answer::Silence => After::Hang,
            Answer::Respond(resp) => {
                if !shared.sleep(resp.delay) {
                    let _ = writer.shutdown(Shutdown::Both);
                    return;
                }
                write_response(&mut writer, &resp, req.wants_close(), shared)
            }
        };
        match after {
            After::KeepAlive => {}
            After::Close => {
                let _ = writer.shutdown(Shutdown::Write);
                if reader.wait_for_close(shared) {
                    shared.closed(req.seq);
                }
                return;
            }
            After::Hang => {
                if reader.wait_for_close(shared) {
                    shared.closed(req.seq);
                }
                return;
            }
            After::Reset => return,
            After::Gone => {
                if !shared.stopping() {
                    shared.closed(req.seq);
                }
                return;
            }
        }
    }
}

/// The read side of a connection: buffered, retried over read timeouts
/// until the server stops.
struct ConnReader {
    stream: TcpStream,
    buf: VecDeque<u8>,
}

impl ConnReader {
    /// Reads more into the buffer; Ok(0) at EOF.
    fn fill(&mut self, shared: &Shared) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        loop {
            if shared.stopping() {
                return Err(ErrorKind::Interrupted.into());
            }
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend(&chunk[..n]);
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One line without its LF (and CR); `Ok(None)` at EOF before any byte.
    fn line(&mut self, shared: &Shared) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.buf.len() > MAX_REQUEST {
                return Err(ErrorKind::InvalidData.into());
            }
            if self.fill(shared)? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    fn exact(&mut self, n: usize, shared: &Shared) -> io::Result<Vec<u8>> {
        if n > MAX_REQUEST {
            return Err(ErrorKind::InvalidData.into());
        }
        while self.buf.len() < n {
            if self.fill(shared)? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn chunked(&mut self, shared: &Shared) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let size_line = self.line(shared)?.ok_or(ErrorKind::UnexpectedEof)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| io::Error::from(ErrorKind::InvalidData))?;
            if size == 0 {
                // Trailers, until the empty line.
                while let Some(l) = self.line(shared)? {
                    if l.is_empty() {
                        break;
                    }
                }
                return Ok(body);
            }
            if body.len() + size > MAX_REQUEST {
                return Err(ErrorKind::InvalidData.into());
            }
            body.extend(self.exact(size, shared)?);
            // The CRLF after the chunk's data.
            self.line(shared)?;
        }
    }

    /// Reads (and drops) until the client closes: true when it did, false
    /// when the server stopped first.
    fn wait_for_close(&mut self, shared: &Shared) -> bool {
        loop {
            self.buf.clear();
            match self.fill(shared) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return !shared.stopping(),
            }
        }
    }
}

/// The next request, its body read; `Ok(None)` when the client closed first.
fn read_request(
    reader: &mut ConnReader,
    writer: &mut TcpStream,
    conn: u64,
    shared: &Shared,
) -> io::Result<Option<Request>> {
    // The request line, skipping stray empty lines between requests.
    let line = loop {
        match reader.line(shared)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let version = parts.next().unwrap_or("HTTP/1.0").to_owned();
    let mut headers = Vec::new();
    loop {
        let h = reader.line(shared)?.ok_or(ErrorKind::UnexpectedEof)?;
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut req = Request {
        seq: 0,
        conn,
        method,
        path,
        version,
        headers,
        body: Vec::new(),
        at: Instant::now(),
        closed_at: None,
    };
    if req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    req.body = if chunked {
        reader.chunked(shared)?
    } else {
        let len = match req.header("content-length") {
            Some(v) => v
                .parse()
                .map_err(|_| io::Error::from(ErrorKind::InvalidData))?,
            None => 0,
        };
        reader.exact(len, shared)?
    };
    req.at = Instant::now();
    Ok(Some(req))
}

/// Writes the response; says what state it left the connection in.
fn write_response(
    conn: &mut TcpStream,
    resp: &Response,
    client_closes: bool,
    shared: &Shared,
) -> After {
    let close = client_closes || resp.closes();
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (name, value) in &resp.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match resp.framing {
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::Close => {}
        Framing::Length if resp.has_body() => {
            let n: usize = resp
                .steps
                .iter()
                .map(|s| match s {
                    Step::Send(b) => b.len(),
                    _ => 0,
                })
                .sum();
            head.push_str(&format!("Content-Length: {n}\r\n"));
        }
        Framing::Length => {}
    }
    if close && resp.header_value("connection").is_none() {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    if conn.write_all(head.as_bytes()).is_err() || conn.flush().is_err() {
        return After::Gone;
    }
    if !resp.has_body() {
        return if close {
            After::Close
        } else {
            After::KeepAlive
        };
    }
    let framing = resp.framing;
    let mut sent_before = false;
    for step in &resp.steps {
        let ok = match step {
            Step::Send(bytes) if bytes.is_empty() => true,
            Step::Send(bytes) => {
                if sent_before {
                    wait_until_read(conn, shared);
                }
                sent_before = true;
                write_piece(conn, framing, bytes).is_ok()
            }
            Step::Pause(d) => shared.sleep(*d),
            Step::Generate(g) => g(&mut |b: &[u8]| write_piece(conn, framing, b)).is_ok(),
            Step::Hang => return After::Hang,
            Step::Reset => {
                // What was sent reaches the client before the reset does.
                wait_until_read(conn, shared);
                // Closing a socket that lingers 0 s sends RST (once every
                // handle of it is dropped: the caller returns at once).
                let _ = socket2::SockRef::from(&*conn).set_linger(Some(Duration::ZERO));
                return After::Reset;
            }
        };
        if !ok || shared.stopping() {
            return After::Gone;
        }
    }
    match framing {
        Framing::Chunked if conn.write_all(b"0\r\n\r\n").is_err() => After::Gone,
        Framing::Close => After::Close,
        _ if close => After::Close,
        _ => After::KeepAlive,
    }
}

/// One body piece, framed, flushed.
fn write_piece(conn: &mut TcpStream, framing: Framing, bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    if framing == Framing::Chunked {
        let mut piece = format!("{:x}\r\n", bytes.len()).into_bytes();
        piece.extend_from_slice(bytes);
        piece.extend_from_slice(b"\r\n");
        conn.write_all(&piece)?;
    } else {
        conn.write_all(bytes)?;
    }
    conn.flush()
}

/// Waits (up to [`DELIVERY_WAIT`], or until the server stops) until the
/// client has every byte written so far (this socket's send queue is
/// acknowledged) and has read them all (its socket's receive queue is
/// empty), as `/proc/net/tcp` shows both. Where that file says nothing of
/// these sockets (another OS, IPv6), a short pause stands in.
fn wait_until_read(conn: &TcpStream, shared: &Shared) {
    let (Ok(ours), Ok(theirs)) = (conn.local_addr(), conn.peer_addr()) else {
        return;
    };
    let deadline = Instant::now() + DELIVERY_WAIT;
    loop {
        match queues(ours, theirs) {
            Some((unacked, unread)) if unacked == 0 && unread == 0 => return,
            Some(_) => {}
            None => {
                shared.sleep(Duration::from_millis(5));
                return;
            }
        }
        if Instant::now() >= deadline || shared.stopping() {
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// From `/proc/net/tcp`: the bytes `ours` sent that `theirs` has not yet
/// acknowledged, and the bytes `theirs` received that its owner has not read.
fn queues(ours: SocketAddr, theirs: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (ours, theirs) = (hex(ours)?, hex(theirs)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (mut unacked, mut unread) = (None, None);
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(q)) = (cols.get(1), cols.get(2), cols.get(4)) else {
            continue;
        };
        let (tx, rx) = q.split_once(':')?;
        if *local == ours && *remote == theirs {
            unacked = u64::from_str_radix(tx, 16).ok();
        } else if *local == theirs && *remote == ours {
            unread = u64::from_str_radix(rx, 16).ok();
        }
    }
    Some((unacked?, unread?))
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
