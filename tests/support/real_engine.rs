//! The REAL engine for tests/real_engine.rs and tests/gateway_openai.rs:
//! llama.cpp's `llama-server` with its small model, as cached by
//! `scripts/real-engine.sh` (see [`super::cached_engine`]), started on a
//! free 127.0.0.1 port and killed on drop; its slots and plain requests
//! for comparing with what goes through citadel. Never builds anything.

use super::{cached_engine, fresh_temp_dir, report_skip, skip_unless_ci, POLL};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for llama-server to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest single request to it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// One llama-server at a time (in one test binary): two of them spinning on
/// a 2-core machine slow each other down many times over.
static ONE_ENGINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn one_engine() -> std::sync::MutexGuard<'static, ()> {
    ONE_ENGINE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The engine (server, model), or a loud skip (a failure under CI=true
/// unless asked for with CITADEL_SKIP_REAL_ENGINE=1).
pub fn engine_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    if std::env::var("CITADEL_SKIP_REAL_ENGINE").is_ok_and(|v| v == "1" || v == "true") {
        report_skip(test, "CITADEL_SKIP_REAL_ENGINE=1");
        return None;
    }
    let found = cached_engine();
    if found.is_none() {
        skip_unless_ci(
            test,
            "the real llama-server is not cached; run scripts/real-engine.sh (scripts/test.sh does)",
        );
    }
    found
}

/// A `llama-server` on a free 127.0.0.1 port, killed on drop.
pub struct LlamaServer {
    child: Child,
    pub url: String,
    /// Holds the log; removed on drop unless a test failed.
    dir: PathBuf,
    log: PathBuf,
}

/// What `GET /slots` says of one slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    pub processing: bool,
    /// Tokens generated so far by the running task (only while processing).
    pub decoded: Option<u64>,
}

/// An HTTP client for the engine: no proxy, errors' bodies kept.
pub fn local_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

impl LlamaServer {
    /// `ctx` tokens of context shared by `slots` slots (requests served at
    /// once), ONE thread: llama.cpp's threads wait for each other at every
    /// step, so on a busy 2-core machine 2 threads ran 3-5x slower than 1.
    pub fn start(server: &Path, model: &Path, ctx: u32, slots: u32) -> LlamaServer {
        let mut last_log = String::new();
        for _ in 0..3 {
            // A dir per attempt: a failed attempt's drop removes its own.
            let dir = fresh_temp_dir("llama");
            let log = dir.join("llama-server.log");
            let port = super::free_port();
            let file = std::fs::File::create(&log).expect("creating the llama-server log");
            let child = Command::new(server)
                .args(["-m"])
                .arg(model)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["-c", &ctx.to_string(), "-np", &slots.to_string()])
                .args(["-t", "1", "--no-webui"])
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", server.display()));
            let mut s = LlamaServer {
                child,
                url: format!("http://127.0.0.1:{port}"),
                dir,
                log,
            };
            if s.wait_healthy() {
                return s;
            }
            // Exited: the port was taken between the probe and the bind?
            last_log = s.log_text();
            if !last_log.to_lowercase().contains("bind") {
                panic!("llama-server did not start:\n{last_log}");
            }
        }
        panic!("llama-server could not get a port:\n{last_log}");
    }

    /// Polls GET /health until 200 (true) or the process exits (false).
    fn wait_healthy(&mut self) -> bool {
        let agent = local_agent(Duration::from_secs(2));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let status = agent
                .get(format!("{}/health", self.url))
                .call()
                .map(|r| r.status().as_u16());
            if status.ok() == Some(200) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "llama-server not healthy within {START_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `POST path` with a JSON body, straight to the engine: its JSON answer.
    pub fn post(&self, path: &str, body: &Json) -> Json {
        let mut r = local_agent(REQUEST_TIMEOUT)
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let text = r.body_mut().read_to_string().unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    }

    /// `GET /slots`: each slot, whether it is generating and how far it got.
    pub fn slots(&self) -> Vec<Slot> {
        let mut response = local_agent(Duration::from_secs(10))
            .get(format!("{}/slots", self.url))
            .call()
            .unwrap_or_else(|e| panic!("GET /slots: {e}"));
        let text = response.body_mut().read_to_string().unwrap();
        let slots: Json =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("/slots {e}: {text}"));
        let slots = slots.as_array().unwrap_or_else(|| panic!("/slots: {text}"));
        slots
            .iter()
            .map(|s| Slot {
                processing: s["is_processing"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("/slots without is_processing: {text}")),
                decoded: s["next_token"][0]["n_decoded"].as_u64(),
            })
            .collect()
    }

    /// The only slot of an engine started with `slots` 1.
    pub fn slot(&self) -> Slot {
        let slots = self.slots();
        assert_eq!(slots.len(), 1, "{slots:?}");
        slots[0]
    }

    /// Whether any slot is generating.
    pub fn busy(&self) -> bool {
        self.slots().iter().any(|s| s.processing)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let mut from = log.len().saturating_sub(4000);
            while !log.is_char_boundary(from) {
                from += 1;
            }
            eprintln!("--- llama-server log (tail) ---\n{}", &log[from..]);
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
