//! `extraction` (`GLINER_EXTRACTION`, `EXTRACTION`; PROTOCOL.md §4): the
//! job's `text` and `schema` and/or `labels` forwarded to the node's
//! extraction service (`extraction-url`), whose JSON answer is the result.
//!
//! This file owns the job's side and the service call: reading the payload
//! (a bad one is `Permanent` and says what to fix), the size limit
//! (`extraction-max-bytes`, checked before the service is contacted), waiting
//! for `GET /health` to answer 2xx (`extraction-ready-timeout`), the
//! `POST /extract` (`extraction-timeout`), and what each failure means.
//! It does not configure HTTP (src/http.rs does) and knows nothing of the
//! service's schema language: the schema goes through as given.
//!
//! Errors. Nothing listening (refused) is `Retryable` ("not running on this
//! node"), as are a service that does not become healthy in time, a
//! connection lost before the answer and no answer within
//! `extraction-timeout`. An answer is final: non-2xx or not JSON is
//! `Permanent` and carries the service's own message, clipped.
//!
//! Cancellation. One agent per job; the job's cancel hook calls
//! `Agent::shutdown()`, which closes the connection in use (the service sees
//! it close) and refuses new ones, and the waits between health probes end
//! at once.

use super::{Context, Handler};
use crate::config::Settings;
use crate::http::{HttpClient, ReadDeadline};
use crate::job::{json_kind, Job, JobError};
use serde_json::{Map, Value};
use std::io::{ErrorKind, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest answer read, and the part of an error or non-JSON body kept.
const MAX_ANSWER: u64 = 16 << 20;
const MAX_ERROR_BODY: u64 = 64 << 10;
/// How much of the service's message goes into an error.
const MESSAGE_CHARS: usize = 300;
/// The pause between two health probes: doubling from the first to the last.
const FIRST_PAUSE: Duration = Duration::from_millis(25);
const LAST_PAUSE: Duration = Duration::from_secs(1);

/// The `extraction` handler: where the service is, its limits, one client.
pub struct Extraction {
    base: String,
    ready_timeout: Duration,
    timeout: Duration,
    max_bytes: usize,
    connect_timeout: Duration,
    http: HttpClient,
}

impl Extraction {
    pub fn new(settings: &Settings) -> Extraction {
        Extraction {
            base: settings.extraction_url.clone(),
            ready_timeout: settings.extraction_ready_timeout,
            timeout: settings.extraction_timeout,
            max_bytes: settings.extraction_max_bytes,
            connect_timeout: settings.engine_connect_timeout,
            http: HttpClient::new(settings.engine_connect_timeout),
        }
    }
}

impl Handler for Extraction {
    fn run(&self, job: &Job, ctx: &mut Context<'_>) -> Result<Value, JobError> {
        let body = request_body(&job.payload).map_err(JobError::Permanent)?;
        let body = body.to_string();
        if body.len() > self.max_bytes {
            return Err(JobError::Permanent(format!(
                "extraction: the input is {} bytes as JSON, more than extraction-max-bytes ({})",
                body.len(),
                self.max_bytes
            )));
        }
        let deadline = Arc::new(ReadDeadline::new());
        let agent = self.http.agent(deadline.clone());
        let closer = agent.clone();
        ctx.cancel_token().on_cancel(move || closer.shutdown());
        let call = Call {
            service: self,
            agent,
            deadline,
        };
        call.wait_ready(ctx)?;
        call.extract(body.as_bytes(), ctx)
    }
}

/// What is sent to `POST /extract`: `{text, schema?, labels?}`.
fn request_body(p: &Map<String, Value>) -> Result<Value, String> {
    let present = |k: &str| p.get(k).filter(|v| !v.is_null());
    let mut body = Map::new();
    match present("text") {
        None => {
            return Err("extraction: payload.text is required (the text to extract from)".into())
        }
        Some(Value::String(t)) if t.trim().is_empty() => {
            return Err("extraction: payload.text is empty".into())
        }
        Some(t @ Value::String(_)) => body.insert("text".into(), t.clone()),
        Some(other) => {
            return Err(format!(
                "extraction: payload.text must be a string, got {}",
                json_kind(other)
            ))
        }
    };
    match present("schema") {
        None => {}
        Some(s @ Value::Object(_)) => {
            body.insert("schema".into(), s.clone());
        }
        Some(other) => {
            return Err(format!(
                "extraction: payload.schema must be an object, got {}",
                json_kind(other)
            ))
        }
    }
    match present("labels") {
        None => {}
        Some(Value::Array(labels)) => {
            if labels.is_empty() {
                return Err("extraction: payload.labels is empty (give at least one label)".into());
            }
            for (i, label) in labels.iter().enumerate() {
                if !matches!(label, Value::String(s) if !s.trim().is_empty()) {
                    return Err(format!(
                        "extraction: payload.labels[{i}] must be a non-empty string, got {label}"
                    ));
                }
            }
            body.insert("labels".into(), Value::Array(labels.clone()));
        }
        Some(other) => {
            return Err(format!(
                "extraction: payload.labels must be an array of strings, got {}",
                json_kind(other)
            ))
        }
    }
    Ok(Value::Object(body))
}

/// One job's calls to the service, on one agent.
struct Call<'a> {
    service: &'a Extraction,
    agent: ureq::Agent,
    deadline: Arc<ReadDeadline>,
}

impl Call<'_> {
    fn base(&self) -> &str {
        &self.service.base
    }

    fn not_running(&self) -> JobError {
        JobError::Retryable(format!(
            "the extraction service is not running on this node (expected at {})",
            self.base()
        ))
    }

    /// Probes `GET /health` until it answers 2xx, or the ready timeout passes.
    fn wait_ready(&self, ctx: &Context<'_>) -> Result<(), JobError> {
        let limit = self.service.ready_timeout;
        let until = Instant::now() + limit;
        let url = format!("{}/health", self.base());
        let mut pause = FIRST_PAUSE;
        // What the last probe heard; a probe cut off by the ready deadline
        // itself adds nothing to an answer heard before.
        let mut heard: Option<String> = None;
        loop {
            if ctx.is_cancelled() {
                return Err(cancelled());
            }
            self.deadline.set(Some(until));
            match self.agent.get(&url).call() {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if (200..300).contains(&status) {
                        return Ok(());
                    }
                    let text = read_limited(response, MAX_ERROR_BODY).unwrap_or_default();
                    heard = Some(format!("HTTP {status}: {}", service_message(&text)));
                }
                Err(e) => match self.classify(ctx, e.into_io(), "GET /health")? {
                    Some(why) => heard = Some(why),
                    None => {
                        heard.get_or_insert_with(|| {
                            format!("no answer within {}", crate::config::format_duration(limit))
                        });
                    }
                },
            }
            let last = heard.as_deref().unwrap_or_default();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(JobError::Retryable(format!(
                    "the extraction service at {} did not become ready within {} \
                     (extraction-ready-timeout); last answer to GET /health: {last}",
                    self.base(),
                    crate::config::format_duration(limit)
                )));
            }
            log::debug!(
                "extraction service at {} not ready yet: {last}",
                self.base()
            );
            ctx.sleep(pause.min(left))?;
            pause = (pause * 2).min(LAST_PAUSE);
        }
    }

    /// `POST /extract`; the answer's JSON is the result.
    fn extract(&self, body: &[u8], ctx: &Context<'_>) -> Result<Value, JobError> {
        if ctx.is_cancelled() {
            return Err(cancelled());
        }
        let url = format!("{}/extract", self.base());
        self.deadline
            .set(Some(Instant::now() + self.service.timeout));
        let response = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .send(body)
            .map_err(|e| self.failed(ctx, e.into_io()))?;
        let status = response.status().as_u16();
        let ok = (200..300).contains(&status);
        let limit = if ok { MAX_ANSWER } else { MAX_ERROR_BODY };
        let bytes = read_limited(response, limit + 1).map_err(|e| self.failed(ctx, e))?;
        if !ok {
            return Err(JobError::Permanent(format!(
                "the extraction service answered HTTP {status}: {}",
                service_message(&bytes)
            )));
        }
        if bytes.len() as u64 > MAX_ANSWER {
            return Err(JobError::Permanent(format!(
                "the extraction service sent an answer larger than {} MiB",
                MAX_ANSWER >> 20
            )));
        }
        serde_json::from_slice(&bytes).map_err(|_| {
            JobError::Permanent(format!(
                "the extraction service answered HTTP {status} with something that is not JSON: {}",
                one_line(&bytes)
            ))
        })
    }

    /// A failed `POST /extract` (send or read), by what caused it.
    fn failed(&self, ctx: &Context<'_>, e: std::io::Error) -> JobError {
        match self.classify(ctx, e, "POST /extract") {
            Err(e) => e,
            Ok(None) => JobError::Retryable(format!(
                "the extraction service at {} sent no answer within {} (extraction-timeout)",
                self.base(),
                crate::config::format_duration(self.service.timeout)
            )),
            Ok(Some(why)) => JobError::Retryable(format!(
                "the extraction service at {}: connection lost before an answer: {why}",
                self.base()
            )),
        }
    }

    /// The failures every request shares: `Err` for those that end the job
    /// at once (cancelled, not running, a connect timeout, a bad URL),
    /// `Ok(None)` when the read deadline passed, else `Ok(why)`.
    fn classify(
        &self,
        ctx: &Context<'_>,
        e: std::io::Error,
        waiting_for: &str,
    ) -> Result<Option<String>, JobError> {
        if ctx.is_cancelled() {
            return Err(cancelled());
        }
        if self.deadline.expired() {
            return Ok(None);
        }
        if e.kind() == ErrorKind::ConnectionRefused {
            return Err(self.not_running());
        }
        if let Some(ureq_error) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
            match ureq_error {
                ureq::Error::Timeout(ureq::Timeout::Connect) => {
                    return Err(JobError::Retryable(format!(
                        "connecting to the extraction service at {} (for {waiting_for}) timed out \
                         after {} (engine-connect-timeout)",
                        self.base(),
                        crate::config::format_duration(self.service.connect_timeout)
                    )))
                }
                ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::TooManyRedirects => {
                    return Err(JobError::Permanent(format!(
                        "cannot call the extraction service at {}: {ureq_error}",
                        self.base()
                    )))
                }
                _ => {}
            }
        }
        Ok(Some(e.to_string()))
    }
}

fn cancelled() -> JobError {
    JobError::Cancelled("cancelled; the extraction service connection was closed".into())
}

/// Up to `limit` bytes of a response body.
fn read_limited(
    response: ureq::http::Response<ureq::Body>,
    limit: u64,
) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The service's own words from an error body: FastAPI's `{"detail": …}`,
/// `{"error": …}` (a string or `{message}`) or `{"message": …}`, else the
/// text on one line; clipped.
fn service_message(body: &[u8]) -> String {
    let found = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let m = v
            .pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("message"))?;
        Some(m.as_str().map_or_else(|| m.to_string(), str::to_owned))
    });
    match found {
        Some(m) => crate::clip::one_line(&m, MESSAGE_CHARS),
        None => one_line(body),
    }
}

/// A body as one clipped line.
fn one_line(body: &[u8]) -> String {
    let line = crate::clip::one_line(&String::from_utf8_lossy(body), MESSAGE_CHARS);
    if line.is_empty() {
        "(no message)".into()
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(payload: Value) -> Result<Value, String> {
        request_body(payload.as_object().unwrap())
    }

    #[test]
    fn the_request_is_text_with_schema_and_labels_as_given() {
        let schema = json!({"entities": ["person", "company"]});
        assert_eq!(
            body(json!({"text": "Ada at IBM", "schema": schema, "timeout_ms": 5})),
            Ok(json!({"text": "Ada at IBM", "schema": schema}))
        );
        assert_eq!(
            body(json!({"text": "t", "labels": ["person"], "schema": null})),
            Ok(json!({"text": "t", "labels": ["person"]}))
        );
        assert_eq!(body(json!({"text": "t"})), Ok(json!({"text": "t"})));
    }

    #[test]
    fn bad_payloads_say_what_to_fix() {
        let cases = [
            (json!({}), "payload.text is required"),
            (json!({"text": null}), "payload.text is required"),
            (json!({"text": " "}), "payload.text is empty"),
            (
                json!({"text": 5}),
                "payload.text must be a string, got a number",
            ),
            (
                json!({"text": "t", "schema": "person"}),
                "payload.schema must be an object, got a string",
            ),
            (
                json!({"text": "t", "labels": "person"}),
                "payload.labels must be an array of strings, got a string",
            ),
            (
                json!({"text": "t", "labels": []}),
                "payload.labels is empty",
            ),
            (
                json!({"text": "t", "labels": ["a", 7]}),
                "payload.labels[1] must be a non-empty string, got 7",
            ),
        ];
        for (payload, want) in cases {
            let err = body(payload.clone()).unwrap_err();
            assert!(err.starts_with("extraction: "), "{payload}: {err}");
            assert!(err.contains(want), "{payload}: {err}");
        }
    }

    #[test]
    fn service_messages_are_its_own_words_clipped() {
        assert_eq!(
            service_message(br#"{"detail":"CUDA out of memory"}"#),
            "CUDA out of memory"
        );
        assert_eq!(
            service_message(br#"{"error":{"message":"bad schema"}}"#),
            "bad schema"
        );
        assert_eq!(service_message(br#"{"error":"nope"}"#), "nope");
        assert_eq!(
            service_message(br#"{"detail":[{"loc":["body","text"]}]}"#),
            r#"[{"loc":["body","text"]}]"#
        );
        assert_eq!(
            service_message(b"<h1>Bad\n Gateway</h1>"),
            "<h1>Bad Gateway</h1>"
        );
        assert_eq!(service_message(b""), "(no message)");
        let long = "x".repeat(1000);
        assert_eq!(
            service_message(long.as_bytes()),
            format!("{}…", "x".repeat(MESSAGE_CHARS))
        );
        assert_eq!(
            crate::config::format_duration(Duration::from_millis(300)),
            "300ms"
        );
        assert_eq!(
            crate::config::format_duration(Duration::from_secs(60)),
            "1m"
        );
    }
}
