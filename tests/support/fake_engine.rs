//! A fake inference engine (vLLM, Ollama, llama.cpp all look alike at this
//! level) for the `llm_inference` tests: a std `TcpListener` HTTP/1.1 server
//! on 127.0.0.1:0, one thread per connection.
//!
//! Scriptable per request: each API call (any method but GET) takes the next
//! [`Reply`] from a queue (then the default reply, if set; else a 500 saying
//! nothing was scripted). GETs are readiness probes (`citadel status`, the
//! start-up log line): they never take a scripted reply, get the probe reply
//! (default: the default reply, else 200 `{}`) and are recorded apart.
//! A reply is a status line, headers, a framing (chunked: each `send` is one
//! HTTP chunk, flushed on its own; close-delimited; or Content-Length) and a
//! list of [`Step`]s: bytes, pauses, a hang until the client goes away, a
//! TCP reset, or a generator (benchmarks).
//!
//! Recorded per request: method, path, headers, body, when it was read, and
//! when the client closed the connection (the engine "saw the close": a read
//! returned EOF or an error). Waits poll with a deadline, never a blind sleep.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// How often a hanging or idle connection looks at the stop flag.
const TICK: Duration = Duration::from_millis(20);

/// Writes one piece of a body (framed as the reply says) and flushes it.
pub type PieceWriter<'a> = dyn FnMut(&[u8]) -> io::Result<()> + 'a;

/// Produces body pieces through the writer it is given (benchmarks).
pub type Generator = Arc<dyn Fn(&mut PieceWriter<'_>) -> io::Result<()> + Send + Sync>;

/// One step of a reply's body.
#[derive(Clone)]
pub enum Step {
    /// These bytes, written and flushed as one piece.
    Send(Vec<u8>),
    /// Wait this long before the next step.
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
    /// No length: the body ends when the engine closes the connection.
    Close,
    /// `Content-Length` of all `Send` steps together, written at once.
    Length,
}

/// A scripted answer to one request.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    pub steps: Vec<Step>,
}

impl Reply {
    /// 200, `text/event-stream`, chunked (vLLM, llama.cpp).
    pub fn sse() -> Reply {
        Reply::streaming("text/event-stream")
    }

    /// 200, `application/x-ndjson`, chunked (Ollama).
    pub fn ndjson() -> Reply {
        Reply::streaming("application/x-ndjson")
    }

    fn streaming(content_type: &str) -> Reply {
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            framing: Framing::Chunked,
            steps: Vec::new(),
        }
    }

    /// `status` with a JSON body and its Content-Length.
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            framing: Framing::Length,
            steps: vec![Step::Send(body.as_bytes().to_vec())],
        }
    }

    pub fn framing(mut self, framing: Framing) -> Reply {
        self.framing = framing;
        self
    }

    /// One more piece of body.
    pub fn send(mut self, bytes: impl AsRef<[u8]>) -> Reply {
        self.steps.push(Step::Send(bytes.as_ref().to_vec()));
        self
    }

    /// `wire` in pieces cut at these byte offsets (e.g. mid-line).
    pub fn send_split(mut self, wire: &[u8], cuts: &[usize]) -> Reply {
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&wire.len())) {
            if cut > at {
                self.steps.push(Step::Send(wire[at..cut].to_vec()));
                at = cut;
            }
        }
        self
    }

    pub fn pause(mut self, d: Duration) -> Reply {
        self.steps.push(Step::Pause(d));
        self
    }

    pub fn hang(mut self) -> Reply {
        self.steps.push(Step::Hang);
        self
    }

    pub fn reset(mut self) -> Reply {
        self.steps.push(Step::Reset);
        self
    }

    pub fn generate(mut self, g: Generator) -> Reply {
        self.steps.push(Step::Generate(g));
        self
    }
}

/// One request as the engine received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the whole request had been read.
    pub at: Instant,
    /// When the engine saw the client close the connection, if it has.
    pub closed_at: Option<Instant>,
}

impl Request {
    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    replies: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    probe: Mutex<Option<Reply>>,
    /// API calls, then probes (GET).
    requests: Mutex<Vec<Request>>,
    probes: Mutex<Vec<Request>>,
    stop: AtomicBool,
}

impl State {
    fn log(&self, probe: bool) -> &Mutex<Vec<Request>> {
        if probe {
            &self.probes
        } else {
            &self.requests
        }
    }

    fn reply(&self, probe: bool) -> Reply {
        let scripted = if probe {
            lock(&self.probe).clone()
        } else {
            lock(&self.replies).pop_front()
        };
        scripted
            .or_else(|| lock(&self.default).clone())
            .unwrap_or_else(|| {
                if probe {
                    Reply::json(200, "{}")
                } else {
                    Reply::json(500, r#"{"error":"fake engine: no reply scripted"}"#)
                }
            })
    }
}

/// The engine; dropping it stops it and closes every connection.
pub struct FakeEngine {
    addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeEngine {
    /// Answers requests with `replies`, in order.
    pub fn start(replies: Vec<Reply>) -> FakeEngine {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(State {
            replies: Mutex::new(replies.into()),
            default: Mutex::new(None),
            probe: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            probes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let state = state.clone();
            thread::Builder::new()
                .name(format!("fake-engine {addr}"))
                .spawn(move || {
                    for conn in listener.incoming() {
                        if state.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let state = state.clone();
                        let _ = thread::Builder::new()
                            .name("fake-engine conn".into())
                            .spawn(move || serve(conn, &state));
                    }
                })
                .expect("spawning the fake engine")
        };
        FakeEngine {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// Answers every request with `reply` once the queue is empty.
    pub fn always(reply: Reply) -> FakeEngine {
        let engine = FakeEngine::start(Vec::new());
        *lock(&engine.state.default) = Some(reply);
        engine
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What GET (readiness) requests are answered with.
    pub fn set_probe_reply(&self, reply: Reply) {
        *lock(&self.state.probe) = Some(reply);
    }

    /// Every API call (not GET) so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state.requests).clone()
    }

    /// Every GET (readiness probe) so far.
    pub fn probes(&self) -> Vec<Request> {
        lock(&self.state.probes).clone()
    }

    /// Waits until `n` requests have arrived; returns them all.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        super::wait_until(&format!("{n} requests at the fake engine"), timeout, || {
            let r = self.requests();
            (r.len() >= n).then_some(r)
        })
    }

    /// Waits until the client closed the connection of request `i`; returns when.
    pub fn wait_closed(&self, i: usize, timeout: Duration) -> Instant {
        super::wait_until(
            &format!("the client to close the connection of request {i}"),
            timeout,
            || self.requests().get(i).and_then(|r| r.closed_at),
        )
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// One connection: requests in turn (keep-alive) until the client closes.
fn serve(mut conn: TcpStream, state: &State) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(TICK));
    let mut pending = Vec::new();
    loop {
        let Some((method, path, headers, body)) = read_request(&mut conn, &mut pending, state)
        else {
            return;
        };
        let probe = method == "GET";
        let index = {
            let mut requests = lock(state.log(probe));
            requests.push(Request {
                method,
                path,
                headers,
                body,
                at: Instant::now(),
                closed_at: None,
            });
            requests.len() - 1
        };
        let reply = state.reply(probe);
        let keep_open = answer(&mut conn, &reply, state);
        if !keep_open {
            // Closed by the script (reset, close framing) or gone: only the
            // hang case learns when the client left.
            return;
        }
        if reply.steps.iter().any(|s| matches!(s, Step::Hang)) {
            wait_for_close(&mut conn, state);
            lock(state.log(probe))[index].closed_at = Some(Instant::now());
            return;
        }
        // The client may send another request, or close.
        let mut peek = [0u8; 1];
        match read_some(&mut conn, &mut peek, state) {
            Some(0) | None => {
                lock(state.log(probe))[index].closed_at = Some(Instant::now());
                return;
            }
            Some(n) => pending.extend_from_slice(&peek[..n]),
        }
    }
}

/// Reads until the client closes (EOF or error) or the engine stops.
fn wait_for_close(conn: &mut TcpStream, state: &State) {
    let mut buf = [0u8; 4096];
    while let Some(n) = read_some(conn, &mut buf, state) {
        if n == 0 {
            return;
        }
    }
}

/// One read, retried over read timeouts; None on error or when stopping.
fn read_some(conn: &mut TcpStream, buf: &mut [u8], state: &State) -> Option<usize> {
    loop {
        if state.stop.load(Ordering::SeqCst) {
            return None;
        }
        match conn.read(buf) {
            Ok(n) => return Some(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

type Head = (String, String, Vec<(String, String)>, Vec<u8>);

/// Method, path, headers and body (by Content-Length) of the next request.
fn read_request(conn: &mut TcpStream, pending: &mut Vec<u8>, state: &State) -> Option<Head> {
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match read_some(conn, &mut buf, state)? {
            0 => return None,
            n => pending.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    pending.drain(..head_end);
    while pending.len() < length {
        match read_some(conn, &mut buf, state)? {
            0 => return None,
            n => pending.extend_from_slice(&buf[..n]),
        }
    }
    let body = pending.drain(..length).collect();
    Some((method, path, headers, body))
}

/// Writes the reply; false when the connection is over (closed or reset).
fn answer(conn: &mut TcpStream, reply: &Reply, state: &State) -> bool {
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match reply.framing {
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::Close => head.push_str("Connection: close\r\n"),
        Framing::Length => {
            let n: usize = reply
                .steps
                .iter()
                .map(|s| match s {
                    Step::Send(b) => b.len(),
                    _ => 0,
                })
                .sum();
            head.push_str(&format!("Content-Length: {n}\r\n"));
        }
    }
    head.push_str("\r\n");
    if conn.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let framing = reply.framing;
    for step in &reply.steps {
        let ok = match step {
            Step::Send(bytes) => write_piece(conn, framing, bytes).is_ok(),
            Step::Pause(d) => {
                thread::sleep(*d);
                true
            }
            Step::Generate(g) => g(&mut |b: &[u8]| write_piece(conn, framing, b)).is_ok(),
            Step::Hang => return true,
            Step::Reset => {
                let _ = socket2::SockRef::from(&*conn).set_linger(Some(Duration::ZERO));
                return false;
            }
        };
        if !ok || state.stop.load(Ordering::SeqCst) {
            return false;
        }
    }
    match framing {
        Framing::Chunked => conn.write_all(b"0\r\n\r\n").is_ok(),
        Framing::Close => false,
        Framing::Length => true,
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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
