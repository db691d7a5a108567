//! The HTTP side of `model_download`: requests through `crate::http`
//! (redirects followed here, so only the `hf-url` origin ever sees the
//! token), `Range` resumes checked against `Content-Range`, the body streamed
//! to the `.partial` file while it is hashed, progress chunks, and what each
//! failure means. Knows nothing of payloads or where files go (disk.rs).
//!
//! Resuming. A network failure after body bytes arrived (reset, early close,
//! `download-idle-timeout`) is followed, after a backoff, by a new request
//! with `Range: bytes=N-` for the bytes not yet on disk, up to
//! `download-max-resumes` times in one attempt: once progress chunks went
//! out the executor no longer retries the job, so the handler must. A
//! failure before any byte came (refused, 5xx) is `Retryable` and left to
//! the executor; every attempt starts from what is on disk. A server that
//! answers a range with 200, 416 or a `Content-Range` that is not the one
//! asked for is not trusted: the file restarts from zero.
//!
//! Cancellation: one hook per request shuts down the agent in use, so a
//! blocked read returns at once.

use super::disk::{self, Place};
use super::hash::{HashPipe, HasherGone};
use crate::backoff::full_jitter;
use crate::config::Secret;
use crate::handlers::Context;
use crate::http::{HttpClient, ReadDeadline};
use crate::job::JobError;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::http::{HeaderMap, Response};
use ureq::{Agent, Body};

const MAX_REDIRECTS: usize = 10;
/// At most two progress chunks a second.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
const READ_BUF: usize = 1 << 20;
/// Written bytes are handed to the disk in steps of this size while the
/// download runs (the fsync at the end then waits for little).
const WRITEBACK_STEP: u64 = 16 << 20;

pub struct Fetcher {
    pub http: HttpClient,
    pub idle: Duration,
    /// `scheme://host[:port]` of `hf-url`: the one origin the token goes to.
    pub token_origin: String,
    pub token: Option<Secret>,
    pub max_resumes: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

/// A finished download, still named `.partial`.
pub struct Fetched {
    pub file: File,
    pub bytes: u64,
    pub sha256: String,
    /// Bytes that were on disk already when this job began.
    pub resumed_from: u64,
}

/// Why one request did not finish the file.
enum Failure {
    /// The connection broke or the server failed: worth resuming.
    Broken(String),
    /// Anything else, classified.
    Job(JobError),
}

impl From<JobError> for Failure {
    fn from(e: JobError) -> Failure {
        Failure::Job(e)
    }
}

#[derive(Clone, Copy)]
enum Method {
    Get,
    Head,
}

/// The agent of the request in flight, for the cancel hook.
struct Session {
    current: Arc<Mutex<Option<Agent>>>,
    deadline: Arc<ReadDeadline>,
}

impl Session {
    fn new(ctx: &Context<'_>) -> Session {
        let current: Arc<Mutex<Option<Agent>>> = Arc::default();
        let hook = current.clone();
        ctx.cancel_token().on_cancel(move || {
            if let Some(agent) = crate::sync::lock(&hook).take() {
                agent.shutdown();
            }
        });
        Session {
            current,
            deadline: Arc::new(ReadDeadline::new()),
        }
    }
}

/// The `.partial` file and how far it is.
struct Transfer {
    file: File,
    /// Bytes in the file (and written at this position next).
    offset: u64,
    /// Whether `hash` covers exactly the file's first `offset` bytes.
    hashed: bool,
    hash: HashPipe,
    /// The buffer being read into (from the hash pipe's pool).
    buf: Option<Vec<u8>>,
    /// Bytes received over the network by this job.
    fetched: u64,
    /// Bytes before this offset were handed to the disk already.
    written_back: u64,
    resumed_from: u64,
    progress: Progress,
}

impl From<HasherGone> for Failure {
    fn from(_: HasherGone) -> Failure {
        Failure::Job(JobError::Permanent(
            "model_download: the hashing thread failed".into(),
        ))
    }
}

impl Transfer {
    fn restart(&mut self, place: &Place) -> Result<(), Failure> {
        self.file
            .set_len(0)
            .and_then(|_| self.file.seek(SeekFrom::Start(0)).map(drop))
            .map_err(|e| write_error(place, e))?;
        self.offset = 0;
        self.written_back = 0;
        self.hash.reset()?;
        self.hashed = true;
        self.resumed_from = 0;
        Ok(())
    }
}

impl Fetcher {
    /// Brings `place.partial` to the whole file at `url`.
    pub fn download(
        &self,
        url: &str,
        place: &Place,
        ctx: &mut Context<'_>,
    ) -> Result<Fetched, JobError> {
        let session = Session::new(ctx);
        let mut file = disk::open_nofollow(&place.partial, false).map_err(|e| {
            JobError::Permanent(format!(
                "model_download: cannot open {}: {e}",
                place.partial.display()
            ))
        })?;
        let offset = file
            .seek(SeekFrom::End(0))
            .map_err(|e| JobError::Permanent(format!("model_download: {e}")))?;
        let hash = HashPipe::start(READ_BUF).map_err(|e| {
            JobError::Permanent(format!("model_download: cannot start hashing: {e}"))
        })?;
        let mut t = Transfer {
            file,
            offset,
            hashed: offset == 0,
            hash,
            buf: None,
            fetched: 0,
            written_back: offset,
            resumed_from: offset,
            progress: Progress::new(),
        };
        let mut resumes = 0;
        loop {
            match self.transfer(&session, url, place, &mut t, ctx) {
                Ok(()) => break,
                Err(Failure::Job(e)) => return Err(e),
                Err(Failure::Broken(_)) if ctx.is_cancelled() => {
                    return Err(JobError::Cancelled("cancelled while downloading".into()))
                }
                Err(Failure::Broken(why)) => {
                    let kept = format!("{why} ({} bytes are on disk for the next try)", t.offset);
                    if t.fetched == 0 || resumes >= self.max_resumes {
                        return Err(JobError::Retryable(kept));
                    }
                    let wait = full_jitter(resumes, self.backoff_base, self.backoff_cap);
                    resumes += 1;
                    log::info!(
                        "model_download: {kept}; resuming at byte {} in {}ms ({resumes} of {})",
                        t.offset,
                        wait.as_millis(),
                        self.max_resumes
                    );
                    ctx.sleep(wait)?;
                }
            }
        }
        drop(t.buf.take());
        let sha256 = t
            .hash
            .finish()
            .map_err(|_| JobError::Permanent("model_download: the hashing thread failed".into()))?;
        Ok(Fetched {
            file: t.file,
            bytes: t.offset,
            sha256,
            resumed_from: t.resumed_from,
        })
    }

    /// The size the server gives for `url` (HEAD, redirects followed), if any.
    pub fn remote_size(&self, url: &str, ctx: &Context<'_>) -> Result<Option<u64>, JobError> {
        let session = Session::new(ctx);
        match self.open(&session, Method::Head, url, None, ctx) {
            Ok((resp, _)) if resp.status().is_success() => Ok(content_length(resp.headers())),
            Ok(_) => Ok(None),
            Err(Failure::Job(e)) => Err(e),
            Err(Failure::Broken(why)) => Err(JobError::Retryable(why)),
        }
    }

    /// One request (and a restart from zero if the server does not honour
    /// the range), reading as far as the connection goes.
    fn transfer(
        &self,
        session: &Session,
        url: &str,
        place: &Place,
        t: &mut Transfer,
        ctx: &mut Context<'_>,
    ) -> Result<(), Failure> {
        let (resp, at, total) = loop {
            let from = (t.offset > 0).then_some(t.offset);
            let (resp, at) = self.open(session, Method::Get, url, from, ctx)?;
            let status = resp.status().as_u16();
            let length = content_length(resp.headers());
            match (status, from) {
                (200, None) => break (resp, at, length),
                (200, Some(from)) => {
                    log::info!(
                        "model_download: {} ignored Range bytes={from}- (HTTP 200); restarting \
                         from byte 0",
                        shown(&at)
                    );
                    t.restart(place)?;
                    break (resp, at, length);
                }
                (206, Some(from)) => match content_range(resp.headers()) {
                    Some((start, end, total)) if start == from && end + 1 == total => {
                        break (resp, at, Some(total))
                    }
                    other => log::info!(
                        "model_download: {} answered bytes={from}- with Content-Range {other:?}; \
                         restarting from byte 0",
                        shown(&at)
                    ),
                },
                (416, Some(from)) => log::info!(
                    "model_download: {} refused Range bytes={from}- (HTTP 416); restarting from \
                     byte 0",
                    shown(&at)
                ),
                _ => return Err(status_failure(status, &at, resp, self.token.is_some())),
            }
            // The range was not honoured as asked: the whole file again (a
            // request without Range, so this loop runs at most twice).
            t.restart(place)?;
        };
        if let Some(total) = total {
            let need = total.saturating_sub(t.offset);
            let free = disk::free_bytes(&place.dir).map_err(|e| write_error(place, e))?;
            if need > free {
                return Err(Failure::Job(JobError::Permanent(format!(
                    "model_download: not enough free space in {}: {need} bytes needed, {free} \
                     available",
                    place.dir.display()
                ))));
            }
        }
        if !t.hashed {
            hash_prefix(t).map_err(|e| match e {
                Ok(e) => write_error(place, e),
                Err(gone) => gone.into(),
            })?;
            t.hashed = true;
        }
        let mut body = resp.into_body().into_reader();
        loop {
            session.deadline.set(Some(Instant::now() + self.idle));
            // A buffer from the pool, kept here until its bytes are written.
            let buf = match t.buf.take() {
                Some(buf) => t.buf.insert(buf),
                None => t.buf.insert(t.hash.buffer()?),
            };
            let n = match body.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.broken(session, &at, e, ctx)),
            };
            if n == 0 {
                break;
            }
            t.file
                .write_all(&buf[..n])
                .map_err(|e| write_error(place, e))?;
            if let Some(buf) = t.buf.take() {
                t.hash.hash(buf, n)?;
            }
            t.offset += n as u64;
            t.fetched += n as u64;
            if t.offset - t.written_back >= WRITEBACK_STEP {
                disk::start_writeback(&t.file, t.written_back, t.offset - t.written_back);
                t.written_back = t.offset;
            }
            t.progress.tick(t.offset, total, t.fetched, ctx);
        }
        match total {
            Some(total) if t.offset < total => Err(Failure::Broken(format!(
                "{} closed the connection at byte {} of {total}",
                shown(&at),
                t.offset
            ))),
            _ if ctx.is_cancelled() => Err(Failure::Job(JobError::Cancelled(
                "cancelled while downloading".into(),
            ))),
            _ => Ok(()),
        }
    }

    /// Sends one request, following redirects; the token goes only to the
    /// `hf-url` origin.
    fn open(
        &self,
        session: &Session,
        method: Method,
        url: &str,
        from: Option<u64>,
        ctx: &Context<'_>,
    ) -> Result<(Response<Body>, String), Failure> {
        let mut url = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let agent = self.http.agent_for(&url, session.deadline.clone());
            *crate::sync::lock(&session.current) = Some(agent.clone());
            if ctx.is_cancelled() {
                return Err(Failure::Job(JobError::Cancelled(
                    "cancelled before the download started".into(),
                )));
            }
            session.deadline.set(Some(Instant::now() + self.idle));
            let mut req = match method {
                Method::Get => agent.get(&url),
                Method::Head => agent.head(&url),
            };
            if let Some(from) = from {
                req = req.header("Range", format!("bytes={from}-"));
            }
            if let Some(token) = &self.token {
                if origin(&url) == self.token_origin {
                    req = req.header("Authorization", format!("Bearer {}", token.0));
                }
            }
            let resp = match req.call() {
                Ok(resp) => resp,
                Err(ureq::Error::BadUri(e)) => {
                    return Err(Failure::Job(JobError::Permanent(format!(
                        "model_download: '{}' is not a usable URL: {e}",
                        shown(&url)
                    ))))
                }
                Err(e) => return Err(self.broken(session, &url, e.into_io(), ctx)),
            };
            if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok((resp, url));
            }
            let next = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .and_then(|loc| resolve(&url, loc));
            match next {
                Some(next) => {
                    log::debug!(
                        "model_download: {} redirects to {}",
                        shown(&url),
                        shown(&next)
                    );
                    url = next;
                }
                None => {
                    return Err(Failure::Job(JobError::Permanent(format!(
                        "model_download: {} sent a redirect (HTTP {}) without a usable http(s) \
                         Location",
                        shown(&url),
                        resp.status().as_u16()
                    ))))
                }
            }
        }
        Err(Failure::Job(JobError::Permanent(format!(
            "model_download: more than {MAX_REDIRECTS} redirects from {}",
            shown(&url)
        ))))
    }

    fn broken(&self, session: &Session, url: &str, e: io::Error, ctx: &Context<'_>) -> Failure {
        if ctx.is_cancelled() {
            return Failure::Job(JobError::Cancelled("cancelled while downloading".into()));
        }
        if session.deadline.expired() {
            return Failure::Broken(format!(
                "{} sent nothing for {}s (download-idle-timeout)",
                shown(url),
                self.idle.as_secs_f64()
            ));
        }
        Failure::Broken(format!("connection to {} failed: {e}", shown(url)))
    }
}

/// Feeds the file's first `t.offset` bytes (kept from an earlier try) to
/// the hash, leaving the file positioned at `t.offset`.
fn hash_prefix(t: &mut Transfer) -> Result<(), Result<io::Error, HasherGone>> {
    t.file.seek(SeekFrom::Start(0)).map_err(Ok)?;
    let mut left = t.offset;
    while left > 0 {
        let mut buf = t.hash.buffer().map_err(Err)?;
        let want = left.min(buf.len() as u64) as usize;
        let n = t.file.read(&mut buf[..want]).map_err(Ok)?;
        if n == 0 {
            return Err(Ok(ErrorKind::UnexpectedEof.into()));
        }
        t.hash.hash(buf, n).map_err(Err)?;
        left -= n as u64;
    }
    Ok(())
}

fn write_error(place: &Place, e: io::Error) -> Failure {
    Failure::Job(JobError::Permanent(format!(
        "model_download: cannot write {}: {e}",
        place.partial.display()
    )))
}

/// A status that is neither the file nor a redirect.
fn status_failure(status: u16, url: &str, resp: Response<Body>, has_token: bool) -> Failure {
    let mut text = Vec::new();
    let _ = resp
        .into_body()
        .into_reader()
        .take(512)
        .read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    let text = text.trim();
    let detail = if text.is_empty() {
        String::new()
    } else {
        format!(": {}", crate::clip::one_line(text, 200))
    };
    let msg = format!(
        "model_download: {} answered HTTP {status}{detail}",
        shown(url)
    );
    match status {
        408 | 429 | 500..=599 => Failure::Broken(msg),
        401 | 403 if !has_token => Failure::Job(JobError::Permanent(format!(
            "{msg} (a gated repository needs hf-token)"
        ))),
        _ => Failure::Job(JobError::Permanent(msg)),
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get("content-length")?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range: bytes START-END/TOTAL` (a known total only).
fn content_range(h: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = h.get("content-range")?.to_str().ok()?.trim();
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end && end < total).then_some((start, end, total))
}

/// `scheme://host[:port]`, lower-cased, without user info.
pub fn origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}").to_ascii_lowercase()
}

/// A URL for messages and logs: origin and path, no query (signed CDN URLs
/// carry credentials there).
pub fn shown(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    match url[..end].split_once("://") {
        Some((_, rest)) => {
            let path = rest.find('/').map_or("", |i| &rest[i..]);
            format!("{}{path}", origin(url))
        }
        None => url[..end].to_owned(),
    }
}

/// A `Location` resolved against the URL that sent it; `None` when it is
/// not http(s).
fn resolve(base: &str, loc: &str) -> Option<String> {
    let loc = loc.trim();
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return Some(loc.to_owned());
    }
    if loc.is_empty() || loc.split('/').next().is_some_and(|s| s.contains(':')) {
        return None;
    }
    let (scheme, rest) = base.split_once("://")?;
    if let Some(r) = loc.strip_prefix("//") {
        return Some(format!("{scheme}://{r}"));
    }
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let origin = format!("{scheme}://{}", &rest[..auth_end]);
    if loc.starts_with('/') {
        return Some(format!("{origin}{loc}"));
    }
    let path = rest[auth_end..].split(['?', '#']).next().unwrap_or("");
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let dir = if dir.is_empty() { "/" } else { dir };
    Some(format!("{origin}{dir}{loc}"))
}

/// Progress chunks: `{"bytes","total","percent","rate"}` lines, at most one
/// per [`PROGRESS_EVERY`]; none in the first interval, so that a small file
/// (or an early failure) streams nothing and stays retryable.
struct Progress {
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress {
            started: now,
            last: now,
        }
    }

    fn tick(&mut self, bytes: u64, total: Option<u64>, fetched: u64, ctx: &mut Context<'_>) {
        let now = Instant::now();
        if now.duration_since(self.last) < PROGRESS_EVERY {
            return;
        }
        self.last = now;
        let secs = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let percent = total
            .filter(|t| *t > 0)
            .map(|t| (bytes as f64 * 1000.0 / t as f64).floor() / 10.0);
        let line = serde_json::json!({
            "bytes": bytes,
            "total": total,
            "percent": percent,
            "rate": (fetched as f64 / secs) as u64,
        });
        ctx.chunk(&format!("{line}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_against_the_url_that_sent_them() {
        let base = "https://hf.co/org/m/resolve/main/w.bin?x=1";
        assert_eq!(resolve(base, "https://cdn/x").unwrap(), "https://cdn/x");
        assert_eq!(resolve(base, "//cdn/y").unwrap(), "https://cdn/y");
        assert_eq!(resolve(base, "/api/z").unwrap(), "https://hf.co/api/z");
        assert_eq!(
            resolve(base, "v.bin").unwrap(),
            "https://hf.co/org/m/resolve/main/v.bin"
        );
        assert_eq!(resolve(base, "ftp://x/y"), None);
        assert_eq!(resolve(base, ""), None);
    }

    #[test]
    fn origins_and_shown_urls_drop_what_must_not_leak() {
        assert_eq!(origin("HTTPS://u:p@HF.co:8443/a?b"), "https://hf.co:8443");
        assert_eq!(shown("https://cdn.x/a/b?sig=secret"), "https://cdn.x/a/b");
        assert_eq!(shown("http://127.0.0.1:9"), "http://127.0.0.1:9");
    }
}
