//! A fake Nexus control plane (PROTOCOL.md §3) for the agent's tests, on
//! the shared HTTP server ([`super::http`]): 127.0.0.1, one thread per
//! connection, keep-alive (several requests per connection, bodies by
//! `Content-Length` or chunked).
//!
//! Scriptable: `GET /api/v1/jobs/next` answers from a queue of [`Next`]
//! replies (a job, 204, any status with headers, garbage, a stall, a dropped
//! connection), then from a cycling "default" list (204 unless set with
//! [`FakeNexus::set_default_next`]). `POST /api/v1/jobs/{id}/status` answers
//! from that job's own queue and default ([`FakeNexus::push_report_for`],
//! [`FakeNexus::set_report_for`]), then from a queue of [`Report`] replies
//! for any job, then from a default (200 unless set with
//! [`FakeNexus::set_default_report`]); a body over
//! [`FakeNexus::set_max_report_body`] gets 413. Every answer says
//! `Connection: keep-alive`, or `close` when the client asked for that.
//!
//! The server records every request with the `Instant` it was fully read
//! and its connection; this fake keeps what it did with each (its "answer"
//! label, keyed by the request's sequence number) and the accepted reports
//! ([`FakeNexus::reports`]). A request counts as seen once its answer is
//! chosen; waits block on a condition variable with a deadline.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::http::{self, Answer, HttpServer, Response};

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

/// One request as the fake received it: the server's record of it
/// (method, path, headers, body, `at`, `conn`, … through `Deref`) and what
/// the fake did with it.
#[derive(Clone, Debug)]
pub struct Request {
    pub http: http::Request,
    /// What the fake did with it, e.g. `"200 job"`, `"204"`, `"drop"`.
    pub answer: String,
}

impl std::ops::Deref for Request {
    type Target = http::Request;
    fn deref(&self) -> &http::Request {
        &self.http
    }
}

impl Request {
    /// Whether this is a poll: `GET /api/v1/jobs/next` (query ignored).
    pub fn is_poll(&self) -> bool {
        self.method == "GET" && path_only(&self.path) == NEXT_PATH
    }

    /// The job id if this is `POST /api/v1/jobs/{id}/status`.
    pub fn report_job_id(&self) -> Option<String> {
        report_job_id(&self.method, &self.path)
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
    /// What the fake did with each request, by the server's `seq`.
    answers: HashMap<usize, String>,
    accepted: Vec<Accepted>,
    /// Set by `release_held`: held replies go.
    released: bool,
    /// Set when the fake is dropped: held replies end unanswered.
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Notified on every answer chosen, on `release_held` and on stop.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until held replies are released (true) or the fake stops (false).
    fn wait_released(&self) -> bool {
        let mut st = self.lock();
        while !st.stopped && !st.released {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        !st.stopped
    }
}

/// The fake server. Dropping it stops accepting, ends stalls and held
/// replies, and closes every connection.
pub struct FakeNexus {
    shared: Arc<Shared>,
    server: HttpServer,
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let answers = Arc::clone(&shared);
        let server = HttpServer::serve(listener, "fake-nexus", move |req| answer(req, &answers));
        FakeNexus { shared, server }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
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
        self.shared.lock().released = true;
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

    /// Every request answered so far, in the order they were read.
    pub fn requests(&self) -> Vec<Request> {
        let st = self.shared.lock();
        self.answered(&st)
    }

    /// The server's record joined with the answers in `st` (held, so that
    /// no answer is chosen meanwhile); requests still being decided are left
    /// out.
    fn answered(&self, st: &State) -> Vec<Request> {
        self.server
            .requests()
            .into_iter()
            .filter_map(|r| {
                let answer = st.answers.get(&r.seq)?.clone();
                Some(Request { http: r, answer })
            })
            .collect()
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
        triples(&self.accepted())
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
        self.wait_for(&format!("{n} accepted reports"), timeout, |st| {
            (st.accepted.len() >= n).then(|| triples(&st.accepted))
        })
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
            let hits: Vec<Request> = self.answered(st).into_iter().filter(|r| pred(r)).collect();
            (hits.len() >= n).then_some(hits)
        })
    }

    /// Waits until at least `n` polls have been received; returns them all.
    pub fn wait_for_polls(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_for_requests(&format!("{n} polls"), n, timeout, Request::is_poll)
    }

    /// Waits until `f` finds what it looks for in the state (checked again
    /// on every answer chosen); panics with every request after `timeout`.
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
                let accepted = st.accepted.clone();
                let requests = self.answered(&st);
                drop(st);
                panic!(
                    "timed out after {timeout:?} waiting for {what}; accepted: {accepted:?}\n\
                     requests:\n{}",
                    summary(&requests)
                );
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A one-line-per-request listing (for assertion messages).
    pub fn summary(&self) -> String {
        summary(&self.requests())
    }
}

impl Drop for FakeNexus {
    /// Ends held replies; the server (dropped next) ends stalls and closes
    /// every connection.
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
    }
}

fn triples(accepted: &[Accepted]) -> Vec<(String, String, String)> {
    accepted
        .iter()
        .map(|a| (a.job_id.clone(), a.status.clone(), a.output.clone()))
        .collect()
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

/// The job id if `method target` is `POST /api/v1/jobs/{id}/status`.
fn report_job_id(method: &str, target: &str) -> Option<String> {
    if method != "POST" {
        return None;
    }
    let rest = path_only(target).strip_prefix("/api/v1/jobs/")?;
    let id = rest.strip_suffix("/status")?;
    (!id.is_empty() && !id.contains('/')).then(|| percent_decode(id))
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

/// What the fake does with a request, once chosen.
enum Action {
    Answer(Answer),
    /// Wait for `release_held`, then do this.
    Held(Box<Action>),
}

/// The server's handler: chooses the reply (recording its label and an
/// accepted report), then carries it out on the connection's thread.
fn answer(req: &http::Request, shared: &Shared) -> Answer {
    let mut action = decide(req, shared);
    let keep_alive = if req.wants_close() {
        "close"
    } else {
        "keep-alive"
    };
    loop {
        match action {
            Action::Held(inner) => {
                if !shared.wait_released() {
                    return Answer::HangUp(Duration::ZERO);
                }
                action = *inner;
            }
            Action::Answer(Answer::Respond(resp)) => {
                return resp.header("Connection", keep_alive).into();
            }
            Action::Answer(hang_up) => return hang_up,
        }
    }
}

/// Picks the reply for `req`, records its label (and an accepted report),
/// and notifies waiters.
fn decide(req: &http::Request, shared: &Shared) -> Action {
    let poll = req.method == "GET" && req.path_only() == NEXT_PATH;
    let mut st = shared.lock();
    let (action, label) = if poll {
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
    } else if let Some(job_id) = report_job_id(&req.method, &req.path) {
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
        let accepts = matches!(
            reply,
            Report::Accept | Report::Status(200, ..) | Report::Status(204, ..)
        );
        if accepts {
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
        report_action(reply)
    } else {
        (
            Action::Answer(Response::json(404, r#"{"error":"not found"}"#).into()),
            "404".to_owned(),
        )
    };
    st.answers.insert(req.seq, label);
    drop(st);
    shared.changed.notify_all();
    action
}

/// `status` and `headers` as scripted, and `body` as is.
fn scripted(status: u16, headers: Vec<(String, String)>, body: String) -> Action {
    let mut resp = Response::new(status);
    resp.headers = headers;
    Action::Answer(resp.send(body).into())
}

fn next_action(reply: Next) -> (Action, String) {
    match reply {
        Next::Job(json) => (
            Action::Answer(Response::json(200, &json.to_string()).into()),
            "200 job".to_owned(),
        ),
        Next::NoJob => (Action::Answer(Response::new(204).into()), "204".to_owned()),
        Next::Status(code, headers, body) => (scripted(code, headers, body), format!("{code}")),
        Next::Garbage => (
            Action::Answer(Response::json(200, "<html>\u{0}\u{1}not json at all {{{ ]]").into()),
            "200 garbage".to_owned(),
        ),
        Next::Stall(d) => (
            Action::Answer(Response::new(204).delayed(d).into()),
            format!("stall {d:?} then 204"),
        ),
        Next::Held(inner) => {
            let (action, label) = next_action(*inner);
            (
                Action::Held(Box::new(action)),
                format!("held, then {label}"),
            )
        }
        Next::Drop => (
            Action::Answer(Answer::HangUp(Duration::ZERO)),
            "drop".to_owned(),
        ),
    }
}

fn report_action(reply: Report) -> (Action, String) {
    match reply {
        Report::Accept => (
            Action::Answer(Response::json(200, "{}").into()),
            "200 accepted".to_owned(),
        ),
        Report::Status(code, headers, body) => {
            let label = if code == 200 || code == 204 {
                format!("{code} accepted")
            } else {
                format!("{code}")
            };
            (scripted(code, headers, body), label)
        }
        Report::Stall(d) => (
            Action::Answer(Response::new(500).delayed(d).into()),
            format!("stall {d:?} then 500"),
        ),
        Report::Drop => (
            Action::Answer(Answer::HangUp(Duration::ZERO)),
            "drop".to_owned(),
        ),
    }
}
