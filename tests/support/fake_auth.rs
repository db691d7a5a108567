//! A fake device-authorization server (RFC 8628, PROTOCOL.md §6) for
//! `citadel init`'s tests, on the shared HTTP server ([`super::http`]).
//!
//! `POST /api/fabric/device-auth/start` answers with [`FakeAuth::set_start`]'s
//! reply (default: a device code, user code `WDJB-MJHT`, a verification URL
//! and its `_complete` form, `expires_in` 600, `interval` 1).
//! `POST /api/fabric/device-auth/token` checks the request as a real server
//! would (JSON body with the issued `device_code` and the device-code
//! `grant_type`, else `400 invalid_grant` / `invalid_request`), then answers
//! from a queue of [`Token`] replies, then from a default (`Pending` unless
//! set with [`FakeAuth::set_default_token`]). Error replies are `400` with
//! `{"error": …}` and `Cache-Control: no-store`, as RFC 8628 §3.5 has them.
//! The server's record of each request (with the `Instant` it was read) is
//! what tests assert timing on.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value as Json};

use super::http::{Answer, HttpServer, Request, Response};

pub const START_PATH: &str = "/api/fabric/device-auth/start";
pub const TOKEN_PATH: &str = "/api/fabric/device-auth/token";
pub const DEVICE_CODE: &str = "fake-device-code-5f1c9a";
pub const USER_CODE: &str = "WDJB-MJHT";
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// One scripted reply to a token poll.
#[derive(Clone, Debug)]
pub enum Token {
    /// 400 `authorization_pending`.
    Pending,
    /// 400 `slow_down`.
    SlowDown,
    /// 400 `expired_token`.
    Expired,
    /// 400 `access_denied`.
    Denied,
    /// 200 with this JSON (the credentials).
    Approve(Json),
    /// This status and body (as `application/json`, whatever it is).
    Status(u16, String),
    /// Says nothing until the client gives up.
    Hang,
    /// Closes the connection without answering.
    Drop,
}

/// The reply to the start request.
#[derive(Clone, Debug)]
pub enum Start {
    /// 200 with this JSON.
    Json(Json),
    /// This status and body.
    Status(u16, String),
    Hang,
}

struct State {
    start: Start,
    token: VecDeque<Token>,
    default_token: Token,
}

pub struct FakeAuth {
    state: Arc<Mutex<State>>,
    server: HttpServer,
}

/// The default start answer for a server at `base`.
pub fn start_answer(base: &str, interval: u64, expires_in: u64) -> Json {
    json!({
        "device_code": DEVICE_CODE,
        "user_code": USER_CODE,
        "verification_uri": format!("{base}/device"),
        "verification_uri_complete": format!("{base}/device?user_code={USER_CODE}"),
        "expires_in": expires_in,
        "interval": interval,
    })
}

/// An approval as the fabric sends it.
pub fn approval(token: &str, nexus_url: Option<&str>, redis_url: Option<&str>) -> Json {
    let mut j = json!({
        "device_api_token": token,
        "api_base_url": "http://127.0.0.1:9/api",
        "org_id": "org-7",
        "token_type": "Bearer",
    });
    if let Some(n) = nexus_url {
        j["nexus_url"] = json!(n);
    }
    if let Some(r) = redis_url {
        j["redis_url"] = json!(r);
    }
    j
}

fn error(code: &str) -> Response {
    Response::json(400, &json!({"error": code}).to_string()).header("Cache-Control", "no-store")
}

impl FakeAuth {
    pub fn start() -> FakeAuth {
        let state = Arc::new(Mutex::new(State {
            start: Start::Json(Json::Null),
            token: VecDeque::new(),
            default_token: Token::Pending,
        }));
        let shared = state.clone();
        let server = HttpServer::start("fake-auth", move |req| answer(req, &shared));
        let fake = FakeAuth { state, server };
        let default = start_answer(&fake.url(), 1, 600);
        fake.set_start(Start::Json(default));
        fake
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_start(&self, reply: Start) {
        self.lock().start = reply;
    }

    pub fn push_token(&self, reply: Token) {
        self.lock().token.push_back(reply);
    }

    pub fn set_default_token(&self, reply: Token) {
        self.lock().default_token = reply;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.server.requests()
    }

    pub fn starts(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.path_only() == START_PATH)
            .collect()
    }

    pub fn polls(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.path_only() == TOKEN_PATH)
            .collect()
    }

    /// Waits until `n` polls have come; returns them all.
    pub fn wait_for_polls(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.server.wait_for("token polls", timeout, |reqs| {
            let polls: Vec<Request> = reqs
                .iter()
                .filter(|r| r.path_only() == TOKEN_PATH)
                .cloned()
                .collect();
            (polls.len() >= n).then_some(polls)
        })
    }
}

fn answer(req: &Request, state: &Mutex<State>) -> Answer {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    if req.method != "POST" {
        return Response::json(405, r#"{"error":"invalid_request"}"#).into();
    }
    match req.path_only() {
        START_PATH => match &st.start {
            Start::Json(j) => Response::json(200, &j.to_string()).into(),
            Start::Status(code, body) => Response::json(*code, body).into(),
            Start::Hang => Answer::Silence,
        },
        TOKEN_PATH => {
            let body: Json = match serde_json::from_slice(&req.body) {
                Ok(b) => b,
                Err(_) => return error("invalid_request").into(),
            };
            if body["grant_type"] != GRANT_TYPE {
                return error("unsupported_grant_type").into();
            }
            if body["device_code"] != DEVICE_CODE {
                return error("invalid_grant").into();
            }
            let reply = match st.token.pop_front() {
                Some(r) => r,
                None => st.default_token.clone(),
            };
            drop(st);
            match reply {
                Token::Pending => error("authorization_pending").into(),
                Token::SlowDown => error("slow_down").into(),
                Token::Expired => error("expired_token").into(),
                Token::Denied => error("access_denied").into(),
                Token::Approve(j) => Response::json(200, &j.to_string())
                    .header("Cache-Control", "no-store")
                    .into(),
                Token::Status(code, body) => Response::json(code, &body).into(),
                Token::Hang => Answer::Silence,
                Token::Drop => Answer::HangUp(Duration::ZERO),
            }
        }
        _ => Response::json(404, r#"{"error":"not_found"}"#).into(),
    }
}
