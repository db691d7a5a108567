//! One call to an engine: send the request, turn the answer into chunks as it
//! is read, and classify every way it can fail. Owns the engine timeouts and
//! cancellation; knows nothing of payloads (mod.rs) or request bodies
//! (request.rs).
//!
//! Timeouts. ureq's timeouts bound phases, not single reads, so each call
//! gets its own agent with a [`ReadDeadline`] that bounds every socket read:
//! - connect: `engine-connect-timeout` (ureq's own connect timeout);
//! - first token: the deadline starts at `request + engine-first-token-timeout`
//!   and stays there until the first piece of text arrives (keep-alive
//!   comments, headers and role-only chunks do not move it). With
//!   `stream: false` the first token is the whole answer;
//! - idle: after each piece of text the deadline becomes
//!   `now + engine-idle-timeout` (taken after the chunk was handed on, so a
//!   slow Redis never counts as a silent engine);
//! - job deadline (`timeout_ms`): the worker's watchdog cancels the job.
//!
//! Cancellation. The job's cancel hook calls `Agent::shutdown()`, which shuts
//! down this call's socket: a blocked read returns at once, the engine sees
//! the connection close (so it stops generating), and the executor turns the
//! error into `cancelled` (or `deadline exceeded`).
//!
//! Errors. Before any chunk was streamed a failure can be retried cleanly:
//! refused/reset connections, timeouts, HTTP 408/429/5xx, "loading model",
//! an error line inside a 200 stream are `Retryable`; other 4xx are
//! `Permanent` and carry the engine's message. After chunks were streamed a
//! retry would stream the answer twice (subscribers cannot tell), so every
//! failure is `Permanent` ("engine connection lost after N chunks: …").

use super::request::Api;
use super::stream::{error_message, StreamItem, Transcript};
use super::Backend;
use crate::handlers::Context;
use crate::http::{HttpClient, ReadDeadline};
use crate::job::JobError;
use std::io::{ErrorKind, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest whole (`stream: false`) answer, and the part of an error body kept.
const MAX_ANSWER: u64 = 16 << 20;
const MAX_ERROR_BODY: u64 = 64 << 10;

/// The engine timeouts and the HTTP client; shared by every job.
pub struct EngineClient {
    http: HttpClient,
    connect_timeout: Duration,
    first_token_timeout: Duration,
    idle_timeout: Duration,
}

/// Where a call goes.
pub struct Target<'a> {
    pub backend: Backend,
    /// The engine's base URL (for messages).
    pub base: &'a str,
    pub api: Api,
    pub stream: bool,
}

impl EngineClient {
    pub fn new(connect: Duration, first_token: Duration, idle: Duration) -> EngineClient {
        EngineClient {
            http: HttpClient::new(connect),
            connect_timeout: connect,
            first_token_timeout: first_token,
            idle_timeout: idle,
        }
    }

    /// POSTs `body` and reads the answer; text is passed to `ctx.chunk` as
    /// it arrives (`stream: false`: once, whole).
    pub fn call(
        &self,
        to: &Target<'_>,
        body: &[u8],
        ctx: &mut Context<'_>,
    ) -> Result<Transcript, JobError> {
        let deadline = Arc::new(ReadDeadline::new());
        let agent = self.http.agent(deadline.clone());
        let closer = agent.clone();
        ctx.cancel_token().on_cancel(move || closer.shutdown());
        let mut call = Call {
            client: self,
            to,
            deadline,
            chunks: 0,
        };
        if ctx.is_cancelled() {
            return Err(JobError::Cancelled(
                "cancelled before the engine was called".into(),
            ));
        }
        let url = format!("{}{}", to.base, to.api.path());
        let accept = if to.stream {
            to.api.stream_media_type()
        } else {
            "application/json"
        };
        call.deadline
            .set(Some(Instant::now() + self.first_token_timeout));
        let response = agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", accept)
            .send(body)
            .map_err(|e| call.failed(ctx, e.into_io()))?;
        let status = response.status().as_u16();
        let mut reader = response.into_body().into_reader();
        if !(200..300).contains(&status) {
            let mut text = Vec::new();
            let _ = (&mut reader).take(MAX_ERROR_BODY).read_to_end(&mut text);
            return Err(call.status_error(status, &text));
        }
        if to.stream {
            call.stream(&mut reader, ctx)
        } else {
            call.whole(&mut reader, ctx)
        }
    }
}

/// The state of one call, for reading and for error messages.
struct Call<'a> {
    client: &'a EngineClient,
    to: &'a Target<'a>,
    deadline: Arc<ReadDeadline>,
    /// Chunks handed to the job so far.
    chunks: u64,
}

impl Call<'_> {
    fn stream(
        &mut self,
        body: &mut impl Read,
        ctx: &mut Context<'_>,
    ) -> Result<Transcript, JobError> {
        let mut decoder = self.to.api.decoder();
        let mut transcript = Transcript::default();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let (items, eof) = match body.read(&mut buf) {
                Ok(0) => (decoder.finish(), true),
                Ok(n) => (decoder.feed(&buf[..n]), false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.failed(ctx, e)),
            };
            let chunks_before = self.chunks;
            for item in items {
                match &item {
                    StreamItem::Text(text) => {
                        ctx.chunk(text);
                        self.chunks += 1;
                    }
                    StreamItem::Error(message) => return Err(self.engine_error(message)),
                    _ => {}
                }
                transcript.apply(&item);
            }
            if self.chunks > chunks_before {
                let idle = self.client.idle_timeout;
                self.deadline.set(Some(Instant::now() + idle));
            }
            if transcript.done {
                return Ok(transcript);
            }
            if eof {
                // Some servers end the body right after the finish reason.
                if transcript.finish_reason.is_some() {
                    return Ok(transcript);
                }
                if ctx.is_cancelled() {
                    // The cancel hook's shutdown can read as a clean end.
                    return Err(self.failed(ctx, ErrorKind::UnexpectedEof.into()));
                }
                return Err(self.lost("the stream ended before the engine said it was done"));
            }
        }
    }

    fn whole(
        &mut self,
        body: &mut impl Read,
        ctx: &mut Context<'_>,
    ) -> Result<Transcript, JobError> {
        let mut bytes = Vec::new();
        if let Err(e) = body.take(MAX_ANSWER + 1).read_to_end(&mut bytes) {
            return Err(self.failed(ctx, e));
        }
        if bytes.len() as u64 > MAX_ANSWER {
            return Err(JobError::Permanent(format!(
                "{} sent an answer larger than {} MiB",
                self.label(),
                MAX_ANSWER >> 20
            )));
        }
        let items = self.to.api.decode_whole(&bytes);
        if let Some(StreamItem::Error(message)) =
            items.iter().find(|i| matches!(i, StreamItem::Error(_)))
        {
            return Err(self.engine_error(message));
        }
        let transcript = Transcript::from_items(&items);
        ctx.chunk(&transcript.content);
        Ok(transcript)
    }

    fn label(&self) -> &'static str {
        self.to.backend.label()
    }

    /// A failed send or read, by what caused it.
    fn failed(&self, ctx: &Context<'_>, e: std::io::Error) -> JobError {
        let (label, base) = (self.label(), self.to.base);
        if ctx.is_cancelled() {
            return JobError::Cancelled(format!("cancelled; the {label} connection was closed"));
        }
        if self.deadline.expired() {
            return if self.chunks == 0 {
                JobError::Retryable(format!(
                    "{label} at {base} sent no token within {} (engine-first-token-timeout)",
                    crate::config::format_duration(self.client.first_token_timeout)
                ))
            } else {
                JobError::Permanent(format!(
                    "{label} sent no token for {} after {} (engine-idle-timeout); the stream was abandoned",
                    crate::config::format_duration(self.client.idle_timeout),
                    plural(self.chunks)
                ))
            };
        }
        if let Some(ureq_error) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
            match ureq_error {
                ureq::Error::Timeout(ureq::Timeout::Connect) => {
                    return JobError::Retryable(format!(
                        "connecting to {label} at {base} timed out after {} (engine-connect-timeout)",
                        crate::config::format_duration(self.client.connect_timeout)
                    ))
                }
                ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::TooManyRedirects => {
                    return JobError::Permanent(format!("cannot call {label} at {base}: {ureq_error}"))
                }
                _ => {}
            }
        }
        if e.kind() == ErrorKind::ConnectionRefused {
            return JobError::Retryable(format!(
                "cannot connect to {label} at {base}: connection refused (is it running?)"
            ));
        }
        self.lost(&e.to_string())
    }

    /// The connection broke or the stream ended early.
    fn lost(&self, why: &str) -> JobError {
        if self.chunks == 0 {
            JobError::Retryable(format!(
                "{} at {}: connection lost before the first token: {why}",
                self.label(),
                self.to.base
            ))
        } else {
            JobError::Permanent(format!(
                "engine connection lost after {}: {why}",
                plural(self.chunks)
            ))
        }
    }

    /// An error the engine reported inside a 200 answer.
    fn engine_error(&self, message: &str) -> JobError {
        if self.chunks == 0 {
            JobError::Retryable(format!("{} reported an error: {message}", self.label()))
        } else {
            JobError::Permanent(format!(
                "{} reported an error after {}: {message}",
                self.label(),
                plural(self.chunks)
            ))
        }
    }

    /// A non-2xx answer: 408/429/5xx and "loading model" may pass; other
    /// 4xx will not.
    fn status_error(&self, status: u16, body: &[u8]) -> JobError {
        let label = self.label();
        let message = body_message(body);
        let transient = matches!(status, 408 | 429 | 500..=599)
            || message.to_ascii_lowercase().contains("loading model");
        if transient {
            JobError::Retryable(format!("{label} answered HTTP {status}: {message}"))
        } else {
            JobError::Permanent(format!(
                "{label} rejected the request (HTTP {status}): {message}"
            ))
        }
    }
}

/// The engine's own words from an error body: its JSON error message
/// (`{"error": …}`, `{"message": …}`, FastAPI's `{"detail": …}`), else the
/// text itself on one line, shortened.
fn body_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        if let Some(m) = error_message(&v) {
            return m;
        }
        for key in ["message", "detail"] {
            match v.get(key) {
                Some(serde_json::Value::String(s)) => return s.clone(),
                Some(other) if !other.is_null() => return other.to_string(),
                _ => {}
            }
        }
    }
    let line = crate::clip::one_line(text, 500);
    if line.is_empty() {
        return "(no message)".into();
    }
    line
}

/// `1 chunk`, `2 chunks`.
fn plural(chunks: u64) -> String {
    if chunks == 1 {
        "1 chunk".into()
    } else {
        format!("{chunks} chunks")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_give_the_engines_message() {
        assert_eq!(
            body_message(br#"{"error":{"message":"model 'x' not found","code":404}}"#),
            "model 'x' not found"
        );
        assert_eq!(
            body_message(br#"{"error":"model 'y' not found"}"#),
            "model 'y' not found"
        );
        assert_eq!(
            body_message(br#"{"object":"error","message":"max_tokens too large","code":400}"#),
            "max_tokens too large"
        );
        assert_eq!(body_message(br#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(body_message(b"  Bad Gateway\n"), "Bad Gateway");
        assert_eq!(
            body_message(b"<h1>Bad</h1>\n<p>Gateway</p>"),
            "<h1>Bad</h1> <p>Gateway</p>"
        );
        assert_eq!(body_message(b""), "(no message)");
        let long = "x".repeat(600);
        assert_eq!(
            body_message(long.as_bytes()),
            format!("{}…", "x".repeat(500))
        );
    }

    #[test]
    fn durations_are_written_like_settings() {
        assert_eq!(
            crate::config::format_duration(Duration::from_millis(250)),
            "250ms"
        );
        assert_eq!(
            crate::config::format_duration(Duration::from_secs(30)),
            "30s"
        );
        assert_eq!(
            crate::config::format_duration(Duration::from_secs(120)),
            "2m"
        );
    }
}
