//! A fake Nexus control plane (PROTOCOL.md §3) for the agent's tests: a
//! std `TcpListener` HTTP/1.1 server on 127.0.0.1, one thread per connection,
//! keep-alive (several requests per connection, bodies by `Content-Length`
//! or chunked).
//!
//! Scriptable: `GET /api/v1/jobs/next` answers from a queue of [`Next`]
//! replies (a job, 204, any status with headers, garbage, a stall, a dropped
//! connection), then from a cycling "default" list (204 unless set with
//! [`FakeNexus::set_default_next`]). `POST /api/v1/jobs/{id}/status` answers
//! from that job's own queue and default ([`FakeNexus::push_report_for`],
//! [`FakeNexus::set_report_for`]), then from a queue of [`Report`] replies
//! for any job, then from a default (200 unless set with
//! [`FakeNexus::set_default_report`]); a body over
//! [`FakeNexus::set_max_report_body`] gets 413. Every request is
//! recorded with the `Instant` it was fully read; accepted reports are kept
//! apart ([`FakeNexus::reports`]).
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// How often connection threads look at the stop flag while idle.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// The largest request head or body the fake accepts (a bigger one is a bug).
const MAX_REQUEST: usize = 16 << 20;

pub const NEXT_PATH: &str = "/api/v1/jobs/next";

/// One scripted reply to `GET /api/v1/jobs/next`.
#[derive(Clone, Debug)]
pub enum Next {
    /// 200 with this JSON as the body (`{"id","type","payload"}`, or anything).
    Job(Json),
    /// 204 No Content.
    NoJob,
    /// This status code, extra headers (e.g. `Retry-After`) and body.
    Status(u16, Vec<(String, String)>, String),
    /// 200, `Content-Type: application/json`, a body that is not JSON.
    Garbage,
    /// Waits this long (or until the fake is dropped), then answers 204.
    Stall(Duration),
    /// Waits until [`FakeNexus::release_held`] (or until the fake is
    /// dropped), then answers with the inner reply.
    Held(Box<Next>),
    /// Closes the connection without answering.
    Drop,
}

/// One scripted reply to `POST /api/v1/jobs/{id}/status`. Only `Accept`
/// (and a `Status` of 200 or 204) records the report as accepted.
#[derive(Clone, Debug)]
pub enum Report {
    /// 200 with `{}`.
    Accept,
    /// This status code, extra headers and body.
    Status(u16, Vec<(String, String)>, String),
    /// Waits this long (or until the fake is dropped), then answers 500.
    Stall(Duration),
    /// Closes the connection without answering.
    Drop,
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the whole request had been read.
    pub at: Instant,
    /// Which connection it came on (1, 2, … in accept order).
    pub conn: u64,
    /// What the fake did with it, e.g. `"200 job"`, `"204"`, `"drop"`.
    pub answer: String,
}

impl Request {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether this is a poll: `GET /api/v1/jobs/next` (query ignored).
    pub fn is_poll(&self) -> bool {
        self.method == "GET" && path_only(&self.path) == NEXT_PATH
    }

    /// The job id if this is `POST /api/v1/jobs/{id}/status`.
    pub fn report_job_id(&self) -> Option<String> {
        if self.method != "POST" {
            return None;
        }
        let rest = path_only(&self.path).strip_prefix("/api/v1/jobs/")?;
        let id = rest.strip_suffix("/status")?;
        (!id.is_empty() && !id.contains('/')).then(|| percent_decode(id))
    }
}

/// An accepted status report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub job_id: String,
    /// `"SUCCESS"` / `"FAILURE"` (or whatever the agent sent; `""` if the
    /// body had no `status` string).
    pub status: String,
    /// The `output` string (`""` if absent).
    pub output: String,
    /// The whole body, parsed (`Null` if it was not JSON).
    pub body: Json,
}

#[derive(Default)]
struct State {
    next: VecDeque<Next>,
    /// Used in turn when `next` is empty; empty = 204.
    default_next: Vec<Next>,
    default_pos: usize,
    report: VecDeque<Report>,
    /// Used when `report` is empty; `None` = accept.
    default_report: Option<Report>,
    /// Per job: used before `report` and `default_report`.
    report_for: HashMap<String, VecDeque<Report>>,
    default_report_for: HashMap<String, Report>,
    /// A report body longer than this gets 413.
    max_report_body: Option<usize>,
    requests: Vec<Request>,
    accepted: Vec<Accepted>,
}

struct Shared {
    state: Mutex<State>,
    /// Notified on every recorded request, and on stop.
    changed: Condvar,
    stop: AtomicBool,
    /// Set by `release_held`: held replies go.
    released: AtomicBool,
    conns: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until held replies are released or the fake stops.
    fn wait_released(&self) {
        let mut guard = self.lock();
        while !self.stop.load(Ordering::SeqCst) && !self.released.load(Ordering::SeqCst) {
            guard = self
                .changed
                .wait_timeout(guard, IDLE_TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sleeps up to `d`, returning early when the fake stops.
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut guard = self.lock();
        while !self.stop.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            guard = self
                .changed
                .wait_timeout(guard, left.min(IDLE_TICK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The fake server. Dropping it stops accepting, ends stalls and closes
/// every connection (within ~100 ms).
pub struct FakeNexus {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeNexus {
    /// Listens on a free port of 127.0.0.1.
    pub fn start() -> FakeNexus {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake Nexus");
        FakeNexus::serve(listener)
    }

    /// Listens on 127.0.0.1:`port` (e.g. one an agent was already told to
    /// use); retries for up to 5 s while the port is busy.
    pub fn start_on(port: u16) -> FakeNexus {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => return FakeNexus::serve(l),
                Err(e) if Instant::now() >= deadline => {
                    panic!("binding the fake Nexus to 127.0.0.1:{port}: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn serve(listener: TcpListener) -> FakeNexus {
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            released: AtomicBool::new(false),
            conns: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name(format!("fake nexus {addr}"))
            .spawn(move || accept_loop(&listener, &s))
            .expect("spawning the fake Nexus");
        FakeNexus {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    // --- scripting ---------------------------------------------------------

    /// Queues a reply for a later `GET /api/v1/jobs/next`.
    pub fn push_next(&self, reply: Next) {
        self.shared.lock().next.push_back(reply);
    }

    /// Queues `{"id": id, "type": job_type, "payload": payload}`.
    pub fn push_job(&self, id: &str, job_type: &str, payload: Json) {
        self.push_next(Next::Job(serde_json::json!({
            "id": id,
            "type": job_type,
            "payload": payload,
        })));
    }

    /// Replies used in turn (cycling) whenever the queue is empty; an empty
    /// list means 204. Queued replies still go first.
    pub fn set_default_next(&self, replies: Vec<Next>) {
        let mut st = self.shared.lock();
        st.default_next = replies;
        st.default_pos = 0;
    }

    /// How many queued `GET` replies have not been used yet.
    pub fn queued_next(&self) -> usize {
        self.shared.lock().next.len()
    }

    /// Queues a reply for a later status POST (any job).
    pub fn push_report(&self, reply: Report) {
        self.shared.lock().report.push_back(reply);
    }

    /// The reply to status POSTs once the queue is empty: `None` (the
    /// initial setting) accepts, `Some(r)` answers `r` every time.
    pub fn set_default_report(&self, reply: Option<Report>) {
        self.shared.lock().default_report = reply;
    }

    /// Queues a reply for a later status POST of `job_id`.
    pub fn push_report_for(&self, job_id: &str, reply: Report) {
        self.shared
            .lock()
            .report_for
            .entry(job_id.to_owned())
            .or_default()
            .push_back(reply);
    }

    /// The reply to status POSTs of `job_id` once its queue is empty:
    /// `Some(r)` answers `r` every time, `None` (the initial setting) falls
    /// through to the replies for any job.
    pub fn set_report_for(&self, job_id: &str, reply: Option<Report>) {
        let mut st = self.shared.lock();
        match reply {
            Some(r) => st.default_report_for.insert(job_id.to_owned(), r),
            None => st.default_report_for.remove(job_id),
        };
    }

    /// Status POSTs whose body is longer than `max` bytes get 413 (before
    /// any scripted reply); `None` lifts the limit.
    pub fn set_max_report_body(&self, max: Option<usize>) {
        self.shared.lock().max_report_body = max;
    }

    /// Lets every [`Next::Held`] reply go, now and from now on.
    pub fn release_held(&self) {
        self.shared.released.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }

    /// The next `n` status POSTs (any job) get `code` with an empty body.
    pub fn fail_reports(&self, n: usize, code: u16) {
        let mut st = self.shared.lock();
        for _ in 0..n {
            st.report
                .push_back(Report::Status(code, Vec::new(), String::new()));
        }
    }

    // --- observing ---------------------------------------------------------

    /// Every request so far, in the order they were read.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Every `GET /api/v1/jobs/next` so far.
    pub fn polls(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::is_poll)
            .collect()
    }

    /// Every status POST so far (accepted or not).
    pub fn report_attempts(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.report_job_id().is_some())
            .collect()
    }

    /// Accepted reports as `(job_id, status, output)`, in order.
    pub fn reports(&self) -> Vec<(String, String, String)> {
        self.accepted()
            .into_iter()
            .map(|a| (a.job_id, a.status, a.output))
            .collect()
    }

    /// Accepted reports with their parsed bodies.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.shared.lock().accepted.clone()
    }

    /// Accepted reports of one job.
    pub fn reports_for(&self, job_id: &str) -> Vec<Accepted> {
        self.accepted()
            .into_iter()
            .filter(|a| a.job_id == job_id)
            .collect()
    }

    /// Waits until at least `n` reports were accepted; returns them all.
    /// Panics with every request seen on timeout.
    pub fn wait_for_reports(&self, n: usize, timeout: Duration) -> Vec<(String, String, String)> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.accepted.len() >= n {
                return st
                    .accepted
                    .iter()
                    .map(|a| (a.job_id.clone(), a.status.clone(), a.output.clone()))
                    .collect();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let accepted = st.accepted.clone();
                let requests = summary(&st.requests);
                drop(st);
                panic!(
                    "timed out after {timeout:?} waiting for {n} accepted reports; accepted: \
                     {accepted:?}\nrequests:\n{requests}"
                );
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(IDLE_TICK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until an accepted report for `job_id` exists; returns it.
    pub fn wait_for_report(&self, job_id: &str, timeout: Duration) -> Accepted {
        self.wait_for(
            &format!("an accepted report of job {job_id:?}"),
            timeout,
            |st| st.accepted.iter().find(|a| a.job_id == job_id).cloned(),
        )
    }

    /// Waits until at least `n` requests satisfy `pred`; returns those.
    pub fn wait_for_requests(
        &self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Request) -> bool,
    ) -> Vec<Request> {
        self.wait_for(what, timeout, |st| {
            let hits: Vec<Request> = st.requests.iter().filter(|r| pred(r)).cloned().collect();
            (hits.len() >= n).then_some(hits)
        })
    }

    /// Waits until at least `n` polls have been received; returns them all.
    pub fn wait_for_polls(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_for_requests(&format!("{n} polls"), n, timeout, Request::is_poll)
    }

    fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&State) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(v) = f(&st) {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let requests = summary(&st.requests);
                drop(st);
                panic!("timed out after {timeout:?} waiting for {what}; requests:\n{requests}");
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(IDLE_TICK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A one-line-per-request listing (for assertion messages).
    pub fn summary(&self) -> String {
        summary(&self.shared.lock().requests)
    }
}

impl Drop for FakeNexus {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn summary(requests: &[Request]) -> String {
    let t0 = requests.first().map(|r| r.at);
    requests
        .iter()
        .map(|r| {
            let ms = t0.map(|t| r.at.duration_since(t).as_millis()).unwrap_or(0);
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
                "  +{ms}ms conn {} {} {} -> {} {body}",
                r.conn, r.method, r.path, r.answer
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn path_only(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let n = shared.conns.fetch_add(1, Ordering::SeqCst) + 1;
        let s = Arc::clone(shared);
        let _ = thread::Builder::new()
            .name(format!("fake nexus conn {n}"))
            .spawn(move || {
                let _ = serve_conn(stream, n, &s);
            });
    }
}

/// Reads one line (up to CRLF/LF), waiting through read timeouts until the
/// fake stops. `Ok(None)` on a clean EOF before any byte.
fn read_line(r: &mut BufReader<TcpStream>, shared: &Shared) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Err(ErrorKind::Interrupted.into());
        }
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => {
                return if buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ErrorKind::UnexpectedEof.into())
                }
            }
            Ok(_) if buf.ends_with(b"\n") => {
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if buf.len() > MAX_REQUEST {
            return Err(ErrorKind::InvalidData.into());
        }
    }
}

fn read_exact(r: &mut BufReader<TcpStream>, n: usize, shared: &Shared) -> std::io::Result<Vec<u8>> {
    if n > MAX_REQUEST {
        return Err(ErrorKind::InvalidData.into());
    }
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        if shared.stop.load(Ordering::SeqCst) {
            return Err(ErrorKind::Interrupted.into());
        }
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(k) => got += k,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

fn serve_conn(stream: TcpStream, conn: u64, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TICK))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        // Request line (skipping stray empty lines between requests).
        let line = loop {
            match read_line(&mut reader, shared)? {
                None => return Ok(()),
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
            let Some(h) = read_line(&mut reader, shared)? else {
                return Ok(());
            };
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let chunked =
            header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            read_chunked(&mut reader, shared)?
        } else {
            let len = match header("content-length") {
                Some(v) => v
                    .parse::<usize>()
                    .map_err(|_| std::io::Error::from(ErrorKind::InvalidData))?,
                None => 0,
            };
            read_exact(&mut reader, len, shared)?
        };
        let close_asked = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || (version == "HTTP/1.0"
                && !header("connection").is_some_and(|v| v.eq_ignore_ascii_case("keep-alive")));

        let mut req = Request {
            method,
            path,
            headers,
            body,
            at: Instant::now(),
            conn,
            answer: String::new(),
        };
        let action = decide(&mut req, shared);
        if !perform(action, &mut writer, close_asked, shared)? {
            let _ = writer.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Carries out `action`; returns whether the connection stays open.
fn perform(
    action: Action,
    writer: &mut TcpStream,
    close_asked: bool,
    shared: &Shared,
) -> std::io::Result<bool> {
    match action {
        Action::Drop => Ok(false),
        Action::Stall(d, code) => {
            shared.sleep(d);
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            respond(writer, code, &[], "", close_asked)
        }
        Action::Held(inner) => {
            shared.wait_released();
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            perform(*inner, writer, close_asked, shared)
        }
        Action::Respond {
            code,
            headers,
            body,
        } => respond(writer, code, &headers, &body, close_asked),
    }
}

fn read_chunked(r: &mut BufReader<TcpStream>, shared: &Shared) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let Some(size_line) = read_line(r, shared)? else {
            return Err(ErrorKind::UnexpectedEof.into());
        };
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| std::io::Error::from(ErrorKind::InvalidData))?;
        if size == 0 {
            // Trailers until the empty line.
            loop {
                match read_line(r, shared)? {
                    None => return Ok(body),
                    Some(l) if l.is_empty() => return Ok(body),
                    Some(_) => {}
                }
            }
        }
        if body.len() + size > MAX_REQUEST {
            return Err(ErrorKind::InvalidData.into());
        }
        body.extend(read_exact(r, size, shared)?);
        // The CRLF after the chunk data.
        read_line(r, shared)?;
    }
}

enum Action {
    Respond {
        code: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Wait, then answer with this code and an empty body.
    Stall(Duration, u16),
    /// Wait for `release_held`, then do this.
    Held(Box<Action>),
    Drop,
}

/// Picks the reply for `req`, records it (and an accepted report), and
/// notifies waiters.
fn decide(req: &mut Request, shared: &Shared) -> Action {
    let mut st = shared.lock();
    let (action, answer) = if req.is_poll() {
        let reply = match st.next.pop_front() {
            Some(r) => r,
            None if st.default_next.is_empty() => Next::NoJob,
            None => {
                let i = st.default_pos % st.default_next.len();
                st.default_pos = st.default_pos.wrapping_add(1);
                st.default_next[i].clone()
            }
        };
        next_action(reply)
    } else if let Some(job_id) = req.report_job_id() {
        let too_large = st.max_report_body.is_some_and(|max| req.body.len() > max);
        let own = st.report_for.get_mut(&job_id).and_then(VecDeque::pop_front);
        let reply = match (too_large, own) {
            (true, _) => Report::Status(413, Vec::new(), "request entity too large".into()),
            (false, Some(r)) => r,
            (false, None) => match st.default_report_for.get(&job_id) {
                Some(r) => r.clone(),
                None => match st.report.pop_front() {
                    Some(r) => r,
                    None => st.default_report.clone().unwrap_or(Report::Accept),
                },
            },
        };
        let (action, answer) = report_action(reply);
        if let Action::Respond { code, .. } = &action {
            if *code == 200 || *code == 204 {
                let body: Json = serde_json::from_slice(&req.body).unwrap_or(Json::Null);
                let field = |k: &str| {
                    body.get(k)
                        .and_then(Json::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                st.accepted.push(Accepted {
                    job_id,
                    status: field("status"),
                    output: field("output"),
                    body,
                });
            }
        }
        (action, answer)
    } else {
        (
            Action::Respond {
                code: 404,
                headers: Vec::new(),
                body: r#"{"error":"not found"}"#.to_owned(),
            },
            "404".to_owned(),
        )
    };
    req.answer = answer;
    st.requests.push(req.clone());
    drop(st);
    shared.changed.notify_all();
    action
}

fn next_action(reply: Next) -> (Action, String) {
    match reply {
        Next::Job(json) => (
            Action::Respond {
                code: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: json.to_string(),
            },
            "200 job".to_owned(),
        ),
        Next::NoJob => (
            Action::Respond {
                code: 204,
                headers: Vec::new(),
                body: String::new(),
            },
            "204".to_owned(),
        ),
        Next::Status(code, headers, body) => (
            Action::Respond {
                code,
                headers,
                body,
            },
            format!("{code}"),
        ),
        Next::Garbage => (
            Action::Respond {
                code: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: "<html>\u{0}\u{1}not json at all {{{ ]]".to_owned(),
            },
            "200 garbage".to_owned(),
        ),
        Next::Stall(d) => (Action::Stall(d, 204), format!("stall {d:?} then 204")),
        Next::Held(inner) => {
            let (action, answer) = next_action(*inner);
            (
                Action::Held(Box::new(action)),
                format!("held, then {answer}"),
            )
        }
        Next::Drop => (Action::Drop, "drop".to_owned()),
    }
}

fn report_action(reply: Report) -> (Action, String) {
    match reply {
        Report::Accept => (
            Action::Respond {
                code: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: "{}".to_owned(),
            },
            "200 accepted".to_owned(),
        ),
        Report::Status(code, headers, body) => {
            let answer = if code == 200 || code == 204 {
                format!("{code} accepted")
            } else {
                format!("{code}")
            };
            (
                Action::Respond {
                    code,
                    headers,
                    body,
                },
                answer,
            )
        }
        Report::Stall(d) => (Action::Stall(d, 500), format!("stall {d:?} then 500")),
        Report::Drop => (Action::Drop, "drop".to_owned()),
    }
}

/// Writes a response; returns whether the connection stays open.
fn respond(
    w: &mut TcpStream,
    code: u16,
    headers: &[(String, String)],
    body: &str,
    close: bool,
) -> std::io::Result<bool> {
    let reason = match code {
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
        _ => "Whatever",
    };
    let mut head = format!("HTTP/1.1 {code} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    // 204 and 1xx have no body and must not send Content-Length.
    if code != 204 && code >= 200 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str(if close {
        "Connection: close\r\n"
    } else {
        "Connection: keep-alive\r\n"
    });
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if code != 204 {
        out.extend_from_slice(body.as_bytes());
    }
    w.write_all(&out)?;
    w.flush()?;
    Ok(!close)
}
