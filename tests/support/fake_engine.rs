//! A fake inference engine (vLLM, Ollama, llama.cpp all look alike at this
//! level) for the `llm_inference` tests, on the shared HTTP server
//! ([`super::http`]): 127.0.0.1:0, a thread per connection, keep-alive.
//!
//! Scriptable per request: each API call (any method but GET) takes the next
//! [`Reply`] from a queue (then the default reply, if set; else a 500 saying
//! nothing was scripted). GETs are readiness probes (`citadel status`, the
//! start-up log line): they never take a scripted reply, get the probe reply
//! (default: the default reply, else 200 `{}`) and are recorded apart.
//! A reply is a status line, headers, a framing (chunked: each `send` is one
//! HTTP chunk; close-delimited; or Content-Length) and a list of steps:
//! body pieces (each flushed on its own and read by the client before the
//! next is written), pauses, a hang until the client goes away, a TCP reset,
//! or a generator (benchmarks).
//!
//! [`Reply::llamacpp_stream`] and [`Reply::llamacpp_error`] answer as the
//! real llama-server does (its wire format is in the header of
//! scripts/real-engine.sh): events `data: {json}` + LF LF, one per HTTP
//! chunk, and errors as a JSON object with `Connection: close`.
//!
//! Recorded per request: method, path, headers, body, when it was read, and
//! when the client closed the connection (the engine "saw the close": a read
//! returned EOF or an error). Waits block with a deadline, never a blind sleep.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::http::{Answer, HttpServer, Response};
pub use super::http::{Framing, Request};

/// A scripted answer to one request: the shared server's [`Response`].
pub type Reply = Response;

/// The engines' kinds of reply.
impl Reply {
    /// 200, `text/event-stream`, chunked (vLLM, llama.cpp).
    pub fn sse() -> Reply {
        Reply::streaming("text/event-stream")
    }

    /// 200, `application/x-ndjson`, chunked (Ollama).
    pub fn ndjson() -> Reply {
        Reply::streaming("application/x-ndjson")
    }

    /// 200 as llama-server starts a stream: its headers, chunked. Add each
    /// event with [`Reply::llamacpp_event`], one per chunk, as it does.
    pub fn llamacpp_stream() -> Reply {
        Reply::new(200)
            .header("Server", "llama.cpp")
            .header("Access-Control-Allow-Origin", "")
            .header("X-Accel-Buffering", "no")
            .header("Content-Type", "text/event-stream")
            .header("Keep-Alive", "timeout=5, max=100")
            .framing(Framing::Chunked)
    }

    /// One llama-server stream event, `data: {json}` and a blank line (LF),
    /// as one chunk; `json` is the event's JSON text.
    pub fn llamacpp_event(self, json: &str) -> Reply {
        self.send(format!("data: {json}\n\n"))
    }

    /// An error as llama-server answers one: `{"error":{"code","message",
    /// "type"}}`, Content-Length, and `Connection: close` (it closes the
    /// connection after every error).
    pub fn llamacpp_error(status: u16, kind: &str, message: &str) -> Reply {
        let body = serde_json::json!({"error": {"code": status, "message": message, "type": kind}});
        Reply::new(status)
            .header("Server", "llama.cpp")
            .header("Access-Control-Allow-Origin", "")
            .header("Content-Type", "application/json; charset=utf-8")
            .header("Connection", "close")
            .send(body.to_string())
    }
}

#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    probe: Mutex<Option<Reply>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Script {
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

fn is_probe(r: &Request) -> bool {
    r.method == "GET"
}

/// The engine; dropping it stops it and closes every connection.
pub struct FakeEngine {
    server: HttpServer,
    script: Arc<Script>,
}

impl FakeEngine {
    /// Answers requests with `replies`, in order.
    pub fn start(replies: Vec<Reply>) -> FakeEngine {
        let script = Arc::new(Script {
            replies: Mutex::new(replies.into()),
            ..Script::default()
        });
        let answers = script.clone();
        let server = HttpServer::start("fake-engine", move |req| {
            Answer::Respond(answers.reply(is_probe(req)))
        });
        FakeEngine { server, script }
    }

    /// Answers every request with `reply` once the queue is empty.
    pub fn always(reply: Reply) -> FakeEngine {
        let engine = FakeEngine::start(Vec::new());
        *lock(&engine.script.default) = Some(reply);
        engine
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// What GET (readiness) requests are answered with.
    pub fn set_probe_reply(&self, reply: Reply) {
        *lock(&self.script.probe) = Some(reply);
    }

    /// Every API call (not GET) so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        api_calls(&self.server.requests())
    }

    /// Every GET (readiness probe) so far.
    pub fn probes(&self) -> Vec<Request> {
        self.server
            .requests()
            .into_iter()
            .filter(is_probe)
            .collect()
    }

    /// Waits until `n` API calls have arrived; returns them all.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.server.wait_for(
            &format!("{n} requests at the fake engine"),
            timeout,
            |all| {
                let r = api_calls(all);
                (r.len() >= n).then_some(r)
            },
        )
    }

    /// Waits until the client closed the connection of API call `i`; returns when.
    pub fn wait_closed(&self, i: usize, timeout: Duration) -> Instant {
        self.server.wait_for(
            &format!("the client to close the connection of request {i}"),
            timeout,
            |all| api_calls(all).get(i).and_then(|r| r.closed_at),
        )
    }
}

fn api_calls(all: &[Request]) -> Vec<Request> {
    all.iter().filter(|r| !is_probe(r)).cloned().collect()
}
