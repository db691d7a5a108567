//! A fake extraction service for the `extraction` tests, on the shared HTTP
//! server ([`super::http`]): `GET /health` and `POST /extract` on
//! 127.0.0.1:0, one thread per connection. Every answer says `Connection:
//! close` (the agent pools no connection to it, and the fake makes sure).
//!
//! `/health` answers 503 `{"detail":"loading model"}` for the first N probes
//! ([`FakeExtraction::ready_after`]; never, with `usize::MAX`), then 200.
//! `/extract` gets the one [`Answer`] it was started with, or no answer at
//! all: the connection stays open until the client closes it. Recorded:
//! every request's method and path in order, each `/extract` body, and when
//! the client closed its connection. Waits block with a deadline.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::http::{self, HttpServer, Response};

/// What `POST /extract` is answered with.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status and body, `Content-Type: application/json`.
    Json(u16, String),
    /// This status and body, `Content-Type: text/html`.
    Text(u16, String),
    /// Nothing; the connection stays open until the client closes it.
    Hang,
}

/// One `POST /extract` as the service received it.
#[derive(Clone, Debug)]
pub struct Extract {
    pub body: Vec<u8>,
    /// When the client closed the connection (of a hung answer: when it
    /// gave up waiting).
    pub closed_at: Option<Instant>,
}

impl Extract {
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "/extract body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The service; dropping it stops it and closes every connection.
pub struct FakeExtraction {
    server: HttpServer,
}

impl FakeExtraction {
    /// Healthy at once; every `/extract` gets `answer`.
    pub fn start(answer: Answer) -> FakeExtraction {
        FakeExtraction::ready_after(0, answer)
    }

    /// `/health` answers 503 to the first `probes` probes, then 200.
    pub fn ready_after(probes: usize, answer: Answer) -> FakeExtraction {
        let not_ready_for = AtomicUsize::new(probes);
        let server = HttpServer::start("fake-extraction", move |req| {
            respond(req, &answer, &not_ready_for)
        });
        FakeExtraction { server }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `GET /health`, `POST /extract`, … so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.server
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    pub fn health_probes(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| *r == "GET /health")
            .count()
    }

    pub fn extracts(&self) -> Vec<Extract> {
        extracts(&self.server.requests())
    }

    /// Waits until `/extract` request `i` arrived.
    pub fn wait_extract(&self, i: usize, timeout: Duration) -> Extract {
        self.server
            .wait_for(&format!("/extract request {i}"), timeout, |all| {
                extracts(all).get(i).cloned()
            })
    }

    /// Waits until the client closed the connection of `/extract` request `i`.
    pub fn wait_closed(&self, i: usize, timeout: Duration) -> Instant {
        self.server.wait_for(
            &format!("the client to close /extract request {i}"),
            timeout,
            |all| extracts(all).get(i).and_then(|r| r.closed_at),
        )
    }
}

fn is_extract(r: &http::Request) -> bool {
    r.method == "POST" && r.path == "/extract"
}

fn extracts(all: &[http::Request]) -> Vec<Extract> {
    all.iter()
        .filter(|r| is_extract(r))
        .map(|r| Extract {
            body: r.body.clone(),
            closed_at: r.closed_at,
        })
        .collect()
}

/// The server's handler.
fn respond(req: &http::Request, answer: &Answer, not_ready_for: &AtomicUsize) -> http::Answer {
    let (status, content_type, text) = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/health") => {
            let not_ready = not_ready_for
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n > 0).then(|| n - 1)
                })
                .is_ok();
            if not_ready {
                (503, "application/json", r#"{"detail":"loading model"}"#)
            } else {
                (200, "application/json", r#"{"status":"ok"}"#)
            }
        }
        ("POST", "/extract") => match answer {
            Answer::Json(status, text) => (*status, "application/json", text.as_str()),
            Answer::Text(status, text) => (*status, "text/html", text.as_str()),
            Answer::Hang => return http::Answer::Silence,
        },
        _ => (404, "application/json", r#"{"detail":"Not Found"}"#),
    };
    Response::new(status)
        .header("Content-Type", content_type)
        .header("Connection", "close")
        .send(text)
        .into()
}
