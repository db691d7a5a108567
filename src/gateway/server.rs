//! Answering one request (on one of tiny_http's answering threads): the
//! routes, API keys, and a completion as a job: enqueue an `llm_inference`
//! entry, follow its replayable events, answer from them (SSE or one JSON
//! object), and cancel the job when the client goes away.

use super::front::{self, Conn};
use super::openai::{self, Answer, ApiError, Ask, Endpoint};
use super::sse::{Framing, SseWriter};
use crate::config::Settings;
use crate::follow::{Follower, Read, Seam};
use crate::{backoff, clock, redis_conn};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response};

/// What every answering thread shares.
pub struct Gateway {
    pub settings: Settings,
    /// SHA-256 of each API key: compared in constant time, never kept in clear.
    keys: Vec<[u8; 32]>,
    /// Jobs being answered now: cancelled when the gateway stops.
    live: Mutex<HashSet<String>>,
}

/// How long past the job's own deadline the gateway still waits for its end.
const DEADLINE_GRACE: Duration = Duration::from_secs(5);
/// How long a cancel key this gateway sets lives.
const CANCEL_TTL_S: u64 = 3600;

impl Gateway {
    pub fn new(settings: Settings) -> Gateway {
        let keys = settings
            .gateway_api_keys
            .iter()
            .map(|k| digest(k.0.as_bytes()))
            .collect();
        Gateway {
            settings,
            keys,
            live: Mutex::new(HashSet::new()),
        }
    }

    /// The jobs still being answered (at a stop: to cancel them).
    pub fn live_jobs(&self) -> Vec<String> {
        lock(&self.live).iter().cloned().collect()
    }

    fn authorized(&self, rq: &Request) -> Result<(), ApiError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let given = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.as_str().trim());
        let Some(given) = given else {
            return Err(ApiError::new(
                401,
                "invalid_request_error",
                "You didn't provide an API key: send 'Authorization: Bearer KEY'.",
            ));
        };
        let key = given
            .strip_prefix("Bearer ")
            .or_else(|| given.strip_prefix("bearer "))
            .unwrap_or_default()
            .trim();
        let d = digest(key.as_bytes());
        // Every key is compared, each in constant time.
        let ok = self.keys.iter().fold(false, |ok, k| ok | same(k, &d));
        if ok {
            Ok(())
        } else {
            Err(
                ApiError::new(401, "invalid_request_error", "Incorrect API key provided.")
                    .code("invalid_api_key"),
            )
        }
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks the request answered for the front, whatever way this returns.
struct Answered(Option<Arc<Conn>>);

impl Drop for Answered {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.answered();
        }
    }
}

pub fn answer(gw: &Gateway, mut rq: Request) {
    let conn = rq
        .headers()
        .iter()
        .find(|h| h.field.equiv(front::CONN_HEADER))
        .and_then(|h| front::conn(h.value.as_str()));
    let _answered = Answered(conn.clone());
    let path = rq.url().split('?').next().unwrap_or_default().to_owned();
    let method = rq.method().clone();
    let endpoint = match path.as_str() {
        "/v1/chat/completions" => Some(Endpoint::Chat),
        "/v1/completions" => Some(Endpoint::Completions),
        _ => None,
    };
    let allowed = match path.as_str() {
        "/healthz" | "/v1/models" => "GET",
        _ if endpoint.is_some() => "POST",
        _ => {
            let e = ApiError::new(
                404,
                "invalid_request_error",
                format!("Unknown request URL: {method} {path}"),
            )
            .code("unknown_url");
            return respond_error(rq, &e, None);
        }
    };
    let method_ok = match allowed {
        "GET" => matches!(method, Method::Get | Method::Head),
        _ => method == Method::Post,
    };
    if !method_ok {
        let e = ApiError::new(
            405,
            "invalid_request_error",
            format!("{method} is not allowed on {path}: use {allowed}"),
        );
        return respond_error(rq, &e, None);
    }
    if path == "/healthz" {
        return healthz(gw, rq);
    }
    if let Err(e) = gw.authorized(&rq) {
        return respond_error(rq, &e, None);
    }
    let Some(endpoint) = endpoint else {
        let s = &gw.settings;
        return match super::models::list(s, |cmd| with_redis(s, |c| cmd.query(c))) {
            Ok(list) => respond_json(rq, 200, &list, &[]),
            Err(e) => respond_error(
                rq,
                &unavailable("cannot read the nodes' heartbeats", &e),
                None,
            ),
        };
    };
    let body = match read_body(&mut rq, gw.settings.gateway_max_body) {
        Ok(b) => b,
        Err(e) => return respond_error(rq, &e, None),
    };
    let ask = match openai::parse(endpoint, &body) {
        Ok(a) => a,
        Err(e) => return respond_error(rq, &e, None),
    };
    completion(gw, rq, &ask, conn.as_deref());
}

fn read_body(rq: &mut Request, max: usize) -> Result<Vec<u8>, ApiError> {
    let too_big = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("the request body is over {max} bytes"),
        )
    };
    if rq.body_length().is_some_and(|n| n > max) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    rq.as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| {
            ApiError::new(
                400,
                "invalid_request_error",
                format!("cannot read the body: {e}"),
            )
        })?;
    if body.len() > max {
        return Err(too_big());
    }
    Ok(body)
}

fn healthz(gw: &Gateway, rq: Request) {
    let ping = with_redis(&gw.settings, |c| redis::cmd("PING").query::<String>(c));
    match ping {
        Ok(_) => respond_json(rq, 200, &json!({"status": "ok", "redis": "ok"}), &[]),
        Err(e) => respond_json(
            rq,
            503,
            &json!({"status": "unavailable", "redis": format!("unreachable: {e}")}),
            &[],
        ),
    }
}

/// Where a model's jobs go: (engine kind or `None` for "the model's prefix
/// decides", queue).
fn route<'a>(settings: &'a Settings, model: &str) -> Result<(Option<&'a str>, &'a str), ApiError> {
    let first_queue = settings.queues[0].as_str();
    if settings.gateway_routes.is_empty() {
        let prefixed = model
            .split_once('/')
            .is_some_and(|(p, _)| matches!(p, "vllm" | "ollama" | "llamacpp"));
        let backend = (!prefixed).then_some(settings.default_backend.as_str());
        return Ok((backend, first_queue));
    }
    match settings.gateway_routes.iter().find(|r| r.model == model) {
        Some(r) => Ok((
            Some(r.backend.as_str()),
            r.queue.as_deref().unwrap_or(first_queue),
        )),
        None => Err(ApiError::new(
            404,
            "invalid_request_error",
            format!(
                "The model `{model}` does not exist or is not served here (see GET /v1/models)."
            ),
        )
        .code("model_not_found")),
    }
}

thread_local! {
    /// This answering thread's connection for commands (not the follower's).
    static REDIS: RefCell<Option<crate::redis_conn::Conn>> = const { RefCell::new(None) };
}

/// Run `f` on this thread's Redis connection, opened (again) when needed;
/// a connection that failed is dropped, and `f` is tried once more on a new one.
fn with_redis<T>(
    s: &Settings,
    mut f: impl FnMut(&mut crate::redis_conn::Conn) -> redis::RedisResult<T>,
) -> redis::RedisResult<T> {
    REDIS.with(|cell| {
        let mut slot = cell.borrow_mut();
        let mut last = None;
        for _ in 0..2 {
            if slot.is_none() {
                *slot = Some(redis_conn::connect(
                    &s.redis_url,
                    s.redis_timeout,
                    s.redis_timeout,
                )?);
            }
            let Some(conn) = slot.as_mut() else { break };
            match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) if redis_conn::fault(&e) == redis_conn::Fault::Reconnect => {
                    *slot = None;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from(std::io::Error::other("no Redis connection"))
        }))
    })
}

fn unavailable(what: &str, e: &redis::RedisError) -> ApiError {
    ApiError::new(
        503,
        "server_error",
        format!("the job fabric is unavailable: {what} ({e})"),
    )
    .code("fabric_unavailable")
}

/// The job's cancel key, set so that the worker stops it.
pub fn cancel(s: &Settings, job_id: &str, why: &str) {
    let key = format!("job:cancelled:{job_id}");
    match with_redis(s, |c| {
        redis::cmd("SET")
            .arg(&key)
            .arg(why)
            .arg("EX")
            .arg(CANCEL_TTL_S)
            .query::<()>(c)
    }) {
        Ok(()) => log::info!("gateway: job {job_id} cancelled ({why})"),
        Err(e) => log::warn!("gateway: cannot cancel job {job_id} ({why}): {e}"),
    }
}

/// Removes the job from the live set when the answer is over.
struct Live<'a>(&'a Gateway, String);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        lock(&self.0.live).remove(&self.1);
    }
}

fn completion(gw: &Gateway, rq: Request, ask: &Ask, conn: Option<&Conn>) {
    let s = &gw.settings;
    let (backend, queue) = match route(s, &ask.model) {
        Ok(r) => r,
        Err(e) => return respond_error(rq, &e, None),
    };
    let job_id = format!(
        "gw-{:x}-{:08x}",
        clock::now_millis(),
        backoff::random_u64() as u32
    );
    let timeout_ms = s.gateway_job_timeout.as_millis() as u64;
    let payload = openai::payload(ask, backend, timeout_ms).to_string();
    // Workers dead-letter entries over --max-job-size as malformed: say so now.
    let entry_bytes = payload.len() + job_id.len() + 96;
    if entry_bytes > s.max_job_size {
        let e = ApiError::new(
            413,
            "invalid_request_error",
            format!(
                "the job would be {entry_bytes} bytes; workers take at most --max-job-size {} bytes",
                s.max_job_size
            ),
        );
        return respond_error(rq, &e, None);
    }
    let enqueued = with_redis(s, |c| {
        redis::cmd("XADD")
            .arg(queue)
            .arg("*")
            .arg("jobId")
            .arg(&job_id)
            .arg("type")
            .arg("llm_inference")
            .arg("payload")
            .arg(&payload)
            .arg("enqueuedAt")
            .arg(clock::now_rfc3339())
            .query::<String>(c)
    });
    let entry = match enqueued {
        Ok(id) => id,
        Err(e) => return respond_error(rq, &unavailable("cannot enqueue the job", &e), Some(1)),
    };
    lock(&gw.live).insert(job_id.clone());
    let _live = Live(gw, job_id.clone());
    log::debug!(
        "gateway: {} {} → job {job_id} on {queue} ({entry})",
        rq.url(),
        ask.model
    );
    let mut job = Job {
        gw,
        follower: Follower::new(&s.redis_url, s.redis_timeout, &job_id, "0"),
        id: job_id,
        conn,
        pending: VecDeque::new(),
        seam: Seam::default(),
    };
    // Claimed within the setting, or withdrawn.
    match job.wait_claimed() {
        Ok(()) => {}
        Err(Stop::Gone) => return job.cancel("the client went away"),
        Err(Stop::Fail(e)) => {
            // Nobody ran it: take it back off the queue, and make sure
            // nobody does later.
            job.cancel("no worker claimed it in time");
            let _ = with_redis(s, |c| {
                redis::cmd("XDEL").arg(queue).arg(&entry).query::<i64>(c)
            });
            let retry = s.gateway_claim_timeout.as_secs().max(1);
            return respond_error(rq, &e, Some(retry));
        }
    }
    if ask.stream {
        stream(job, rq, ask);
    } else {
        whole(job, rq, ask);
    }
}

/// Why waiting on the job's events stopped.
enum Stop {
    /// The client is gone: cancel.
    Gone,
    /// Answer this error.
    Fail(ApiError),
}

struct Job<'a> {
    gw: &'a Gateway,
    id: String,
    follower: Follower,
    conn: Option<&'a Conn>,
    /// Events read and not yet handled.
    pending: VecDeque<Read>,
    /// A redelivered job's chunks are not passed on twice.
    seam: Seam,
}

impl Job<'_> {
    fn settings(&self) -> &Settings {
        &self.gw.settings
    }

    fn cancel(&self, why: &str) {
        cancel(self.settings(), &self.id, why);
    }

    fn gone(&self) -> bool {
        self.conn.is_some_and(Conn::gone)
    }

    /// The next event, waiting until `until` at most (`Ok(None)` then).
    /// Redis errors are retried until `until`.
    fn next(&mut self, until: Instant) -> Result<Option<Read>, Stop> {
        let mut retry = backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            if !self.pending.is_empty() {
                let Some(r) = self.pending.pop_front() else {
                    continue;
                };
                if self.seam.keep(&r) {
                    return Ok(Some(r));
                }
                continue;
            }
            if self.gone() {
                return Err(Stop::Gone);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Short blocks: the client's leaving is noticed within one.
            match self.follower.next(left.min(Duration::from_millis(250))) {
                Ok(events) => {
                    retry.reset();
                    self.pending = events.into();
                }
                Err(e) => {
                    log::warn!(
                        "gateway: job {}: reading its events failed ({e}); again after entry {}",
                        self.id,
                        self.follower.last_id()
                    );
                    std::thread::sleep(retry.next_delay().min(left));
                }
            }
        }
    }

    fn wait_claimed(&mut self) -> Result<(), Stop> {
        let until = Instant::now() + self.settings().gateway_claim_timeout;
        match self.next(until)? {
            None => Err(Stop::Fail(
                ApiError::new(
                    503,
                    "server_error",
                    format!(
                        "no worker took the job within {}: the fabric is busy or no worker serves this queue",
                        crate::config::format_duration(self.settings().gateway_claim_timeout)
                    ),
                )
                .code("no_worker"),
            )),
            Some(r) if r.kind() == "claimed" => Ok(()),
            // Any other first event (a malformed job's error): the answer handles it.
            Some(r) => {
                self.pending.push_front(r);
                Ok(())
            }
        }
    }

    /// When the gateway gives up on a claimed job.
    fn deadline(&self) -> Instant {
        Instant::now() + self.settings().gateway_job_timeout + DEADLINE_GRACE
    }

    fn deadline_error(&self) -> ApiError {
        ApiError::new(
            504,
            "timeout",
            format!(
                "the job did not finish within its deadline ({})",
                crate::config::format_duration(self.settings().gateway_job_timeout)
            ),
        )
        .code("job_deadline_exceeded")
    }
}

/// The error of a terminal event that is not `end`.
fn terminal_error(r: &Read) -> ApiError {
    let data = &r.event["data"];
    match r.kind() {
        "cancelled" => ApiError::new(
            409,
            "cancelled",
            format!(
                "the job was cancelled: {}",
                data["reason"].as_str().unwrap_or("cancelled")
            ),
        )
        .code("job_cancelled"),
        _ => openai::job_error(data["error"].as_str().unwrap_or("the job failed")),
    }
}

fn now_secs() -> u64 {
    clock::now_millis() / 1000
}

fn whole(mut job: Job, rq: Request, ask: &Ask) {
    let until = job.deadline();
    let mut text = String::new();
    let mut chunks = 0u64;
    loop {
        match job.next(until) {
            Err(Stop::Gone) => return job.cancel("the client went away"),
            Err(Stop::Fail(e)) => return respond_error(rq, &e, None),
            Ok(None) => {
                job.cancel("its deadline passed");
                return respond_error(rq, &job.deadline_error(), None);
            }
            Ok(Some(r)) => match r.kind() {
                "chunk" => {
                    text.push_str(r.event["data"]["content"].as_str().unwrap_or_default());
                    chunks += 1;
                }
                "end" => {
                    let result = &r.event["data"]["result"];
                    let content = result["content"].as_str().unwrap_or(&text);
                    let usage = openai::usage(result, chunks);
                    let a = Answer::new(ask, &job.id, now_secs());
                    let body = a.whole(content, openai::finish_reason(result), &usage);
                    return respond_json(rq, 200, &body, &[("X-Citadel-Job-Id", &job.id)]);
                }
                _ if r.is_terminal() => return respond_error(rq, &terminal_error(&r), None),
                _ => {}
            },
        }
    }
}

fn stream(mut job: Job, rq: Request, ask: &Ask) {
    let s = job.settings().clone();
    let until = job.deadline();
    let a = Answer::new(ask, &job.id, now_secs());
    // Hold the head back up to one keep-alive interval: a job that fails
    // before its first token is then answered with a real status.
    let hold_until = Instant::now() + s.gateway_keepalive;
    let first = loop {
        match job.next(hold_until.min(until)) {
            Err(Stop::Gone) => return job.cancel("the client went away"),
            Err(Stop::Fail(e)) => return respond_error(rq, &e, None),
            Ok(None) if Instant::now() >= until => {
                job.cancel("its deadline passed");
                return respond_error(rq, &job.deadline_error(), None);
            }
            Ok(None) => break None,
            Ok(Some(r)) if r.kind() == "chunk" || r.kind() == "end" => break Some(r),
            Ok(Some(r)) if r.is_terminal() => return respond_error(rq, &terminal_error(&r), None),
            Ok(Some(_)) => {}
        }
    };
    let job_id = job.id.clone();
    let framing = if *rq.http_version() < tiny_http::HTTPVersion(1, 1) {
        Framing::Close
    } else {
        Framing::Chunked
    };
    // tiny_http's writer is held to the end even when the stream goes
    // straight to the client's socket (see Conn::direct).
    let tiny = rq.into_writer();
    let direct = job.conn.and_then(Conn::direct);
    // An HTTP/1.0 body ends with the connection: it is closed when this
    // returns, even where the client asked to keep it alive.
    let _close = direct
        .as_ref()
        .filter(|_| framing == Framing::Close)
        .and_then(|tcp| tcp.try_clone().ok())
        .map(CloseOnDrop);
    let out: Box<dyn std::io::Write> = match direct {
        Some(tcp) => Box::new(tcp),
        None => tiny,
    };
    let mut w = match SseWriter::start(out, &[("X-Citadel-Job-Id", &job_id)], framing) {
        Ok(w) => w,
        Err(_) => return job.cancel("the client went away"),
    };
    let send = |w: &mut SseWriter<_>, v: &Value| w.data(&v.to_string());
    if let Some(role) = a.role_chunk() {
        if send(&mut w, &role).is_err() {
            return job.cancel("the client went away");
        }
    }
    let mut chunks = 0u64;
    let mut next = first;
    let mut last_write = Instant::now();
    loop {
        let r = match next.take() {
            Some(r) => r,
            None => {
                let tick = (last_write + s.gateway_keepalive).min(until);
                match job.next(tick) {
                    Err(Stop::Gone) => return job.cancel("the client went away"),
                    Err(Stop::Fail(e)) => {
                        let _ = send(&mut w, &e.body());
                        return drop(w);
                    }
                    Ok(None) if Instant::now() >= until => {
                        job.cancel("its deadline passed");
                        let _ = send(&mut w, &job.deadline_error().body());
                        return drop(w);
                    }
                    Ok(None) => {
                        if w.keepalive().is_err() {
                            return job.cancel("the client went away");
                        }
                        last_write = Instant::now();
                        continue;
                    }
                    Ok(Some(r)) => r,
                }
            }
        };
        let sent = match r.kind() {
            "chunk" => {
                chunks += 1;
                let text = r.event["data"]["content"].as_str().unwrap_or_default();
                w.data(&a.text_chunk_json(text))
            }
            "end" => {
                let result = &r.event["data"]["result"];
                let mut out = send(&mut w, &a.finish_chunk(openai::finish_reason(result)));
                if ask.include_usage {
                    out = out
                        .and_then(|_| send(&mut w, &a.usage_chunk(&openai::usage(result, chunks))));
                }
                let done = out.and_then(|_| w.data("[DONE]")).and_then(|_| w.finish());
                if done.is_err() {
                    log::debug!("gateway: job {job_id}: the client left before [DONE]");
                }
                return;
            }
            _ if r.is_terminal() => {
                // After the first byte an error is an error object in the stream.
                let _ = send(&mut w, &terminal_error(&r).body());
                return drop(w);
            }
            _ => Ok(()),
        };
        if sent.is_err() {
            return job.cancel("the client went away");
        }
        last_write = Instant::now();
    }
}

/// Closes a client's connection when dropped.
struct CloseOnDrop(std::net::TcpStream);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

fn respond_json(rq: Request, status: u16, body: &Value, headers: &[(&str, &str)]) {
    let mut response = Response::from_data(body.to_string().into_bytes()).with_status_code(status);
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    for (name, value) in all {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response = response.with_header(h);
        }
    }
    if let Err(e) = rq.respond(response) {
        log::debug!("gateway: answer not delivered: {e}");
    }
}

fn respond_error(rq: Request, e: &ApiError, retry_after: Option<u64>) {
    let retry = retry_after.map(|s| s.to_string());
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(r) = &retry {
        headers.push(("Retry-After", r));
    }
    if e.status == 405 {
        headers.push((
            "Allow",
            if rq.url().starts_with("/v1/c") {
                "POST"
            } else {
                "GET, HEAD"
            },
        ));
    }
    respond_json(rq, e.status, &e.body(), &headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_route_to_their_queue_or_are_unknown() {
        let mut s = Settings::default();
        assert_eq!(
            route(&s, "anything").unwrap(),
            (Some("vllm"), "jobs:v1:gpu-general")
        );
        assert_eq!(
            route(&s, "llamacpp/smol").unwrap(),
            (None, "jobs:v1:gpu-general")
        );
        assert_eq!(route(&s, "meta-llama/x").unwrap().0, Some("vllm"));
        s.set("gateway-routes", "a=ollama@jobs:v1:a,b=llamacpp")
            .unwrap();
        assert_eq!(route(&s, "a").unwrap(), (Some("ollama"), "jobs:v1:a"));
        assert_eq!(
            route(&s, "b").unwrap(),
            (Some("llamacpp"), "jobs:v1:gpu-general")
        );
        let e = route(&s, "c").unwrap_err();
        assert_eq!((e.status, e.code), (404, Some("model_not_found")));
        let list = super::super::models::list(&s, |_| panic!("routes need no Redis")).unwrap();
        assert_eq!(list["data"][1]["id"], "b");
    }

    #[test]
    fn keys_compare_by_digest() {
        assert!(same(&digest(b"sk-1"), &digest(b"sk-1")));
        assert!(!same(&digest(b"sk-1"), &digest(b"sk-2")));
    }
}
