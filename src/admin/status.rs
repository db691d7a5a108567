//! `citadel status`: the mode a `citadel agent` last recorded in
//! `{state-dir}/agent-status.json`, then which inference engines answer at
//! their configured URLs (vLLM `GET /v1/models`, Ollama `GET /api/tags`,
//! llama.cpp `GET /health`) and whether the extraction service does
//! (`GET /health`); and the engines' state as one log line when
//! `citadel work` starts. Nothing here fails the command: a missing status or
//! an engine that does not answer is a state to report, not an error (exit 0).

use super::Exit;
use crate::config::Settings;
use crate::handlers::inference::Backend;
use crate::http::{HttpClient, ReadDeadline};
use serde_json::Value;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one engine said.
#[derive(Debug, Clone, PartialEq)]
pub enum Readiness {
    /// 2xx; the models it listed, if any.
    Ready(Vec<String>),
    /// It answered, but not 2xx (e.g. 503 while loading a model).
    Busy(u16, String),
    /// No answer (refused, timed out, not HTTP).
    Down(String),
}

impl Readiness {
    pub fn describe(&self) -> String {
        match self {
            Readiness::Ready(models) if models.is_empty() => "ready".into(),
            Readiness::Ready(models) => format!("ready (models: {})", models.join(", ")),
            Readiness::Busy(status, message) => format!("not ready: HTTP {status}: {message}"),
            Readiness::Down(why) => format!("not answering: {why}"),
        }
    }
}

/// `citadel status`: the agent's mode, then one line per engine and one for
/// the extraction service; exit 0.
pub fn run(settings: &Settings) -> Result<i32, Exit> {
    println!("{}", agent_mode(&settings.state_dir));
    println!("{}", crate::node::provision::describe(settings));
    let (engines, extraction) = std::thread::scope(|s| {
        let extraction = s.spawn(|| probe_extraction(settings));
        let engines = probe_all(settings);
        let extraction = extraction
            .join()
            .unwrap_or_else(|_| Readiness::Down("probe panicked".into()));
        (engines, extraction)
    });
    println!("{:<10} {:<32} STATE", "ENGINE", "URL");
    for (backend, readiness) in engines {
        println!(
            "{:<10} {:<32} {}",
            backend.name(),
            backend.url(settings),
            readiness.describe()
        );
    }
    println!(
        "{:<10} {:<32} {}",
        "extraction",
        settings.extraction_url,
        extraction.describe()
    );
    Ok(0)
}

/// The extraction service's `GET /health`, probed like an engine.
fn probe_extraction(settings: &Settings) -> Readiness {
    let client = HttpClient::new(settings.engine_connect_timeout);
    let url = format!("{}/health", settings.extraction_url);
    probe(&client, &url, settings.engine_connect_timeout * 2)
}

/// What `{state_dir}/agent-status.json` (written by adaptive mode) says.
fn agent_mode(state_dir: &std::path::Path) -> String {
    let path = state_dir.join("agent-status.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return format!("agent: no status recorded in {}", path.display());
    };
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |k: &str| {
        v.get(k)
            .map(|x| x.as_str().map_or(x.to_string(), str::to_owned))
    };
    match (
        field("mode"),
        field("since"),
        v.get("pid").and_then(Value::as_u64),
    ) {
        (Some(mode), since, pid) => {
            let alive = pid.map(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            format!(
                "agent: mode {mode}{}{}",
                since.map(|t| format!(" since {t}")).unwrap_or_default(),
                match (pid, alive) {
                    (Some(p), Some(true)) => format!(" (pid {p})"),
                    (Some(p), _) => format!(" (pid {p}, not running)"),
                    _ => String::new(),
                }
            )
        }
        _ => format!("agent: unreadable status in {}", path.display()),
    }
}

/// Logs which engines answer, from a background thread (start-up is not
/// delayed by an engine that does not answer).
pub fn log_readiness(settings: &Settings) {
    let settings = settings.clone();
    let _ = std::thread::Builder::new()
        .name("engine-probe".into())
        .spawn(move || {
            let states: Vec<String> = probe_all(&settings)
                .into_iter()
                .map(|(b, r)| format!("{} at {}: {}", b.label(), b.url(&settings), r.describe()))
                .collect();
            log::info!("inference engines: {}", states.join("; "));
        });
}

/// Every engine probed at once; each probe takes at most the engine connect
/// timeout to connect and as long again to answer.
pub fn probe_all(settings: &Settings) -> Vec<(Backend, Readiness)> {
    let client = HttpClient::new(settings.engine_connect_timeout);
    let budget = settings.engine_connect_timeout * 2;
    std::thread::scope(|s| {
        let probes: Vec<_> = Backend::ALL
            .map(|b| {
                let client = &client;
                let url = format!("{}{}", b.url(settings), b.probe_path());
                (b, s.spawn(move || probe(client, &url, budget)))
            })
            .into_iter()
            .collect();
        probes
            .into_iter()
            .map(|(b, t)| {
                let r = t
                    .join()
                    .unwrap_or_else(|_| Readiness::Down("probe panicked".into()));
                (b, r)
            })
            .collect()
    })
}

pub(crate) fn probe(client: &HttpClient, url: &str, budget: Duration) -> Readiness {
    let deadline = Arc::new(ReadDeadline::new());
    deadline.set(Some(Instant::now() + budget));
    let agent = client.agent(deadline.clone());
    let response = match agent.get(url).call() {
        Ok(r) => r,
        Err(_) if deadline.expired() => {
            return Readiness::Down(format!("no answer within {budget:?}"))
        }
        Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Readiness::Down("connection refused".into())
        }
        Err(e) => return Readiness::Down(e.to_string()),
    };
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let _ = response
        .into_body()
        .into_reader()
        .take(1 << 20)
        .read_to_end(&mut body);
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let message = json
            .pointer("/error/message")
            .or_else(|| json.get("error"))
            .or_else(|| json.get("message"))
            .or_else(|| json.get("detail"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| one_line(&String::from_utf8_lossy(&body)));
        return Readiness::Busy(status, message);
    }
    Readiness::Ready(model_names(&json))
}

/// A body that is not JSON, as one short line.
fn one_line(text: &str) -> String {
    crate::clip::one_line(text, 120)
}

/// Model names from vLLM's `{"data":[{"id"}]}` or Ollama's `{"models":[{"name"}]}`.
fn model_names(v: &Value) -> Vec<String> {
    let (list, key) = match (v.get("data"), v.get("models")) {
        (Some(Value::Array(list)), _) => (list, "id"),
        (_, Some(Value::Array(list))) => (list, "name"),
        _ => return Vec::new(),
    };
    list.iter()
        .filter_map(|m| m.get(key).and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn agent_mode_comes_from_the_state_dir() {
        let dir = std::env::temp_dir().join(format!("citadel-status-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(agent_mode(&dir).starts_with("agent: no status recorded in "));
        let status = json!({"mode": "nexus", "pid": std::process::id(), "since": "2026-01-20T10:00:01.123Z"});
        std::fs::write(dir.join("agent-status.json"), status.to_string()).unwrap();
        assert_eq!(
            agent_mode(&dir),
            format!(
                "agent: mode nexus since 2026-01-20T10:00:01.123Z (pid {})",
                std::process::id()
            )
        );
        std::fs::write(dir.join("agent-status.json"), "{").unwrap();
        assert!(agent_mode(&dir).starts_with("agent: unreadable status in "));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn models_are_listed_from_either_shape() {
        assert_eq!(
            model_names(
                &json!({"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model"}]})
            ),
            ["Qwen/Qwen3-0.6B"]
        );
        assert_eq!(
            model_names(&json!({"models":[{"name":"llama3.2:latest"},{"name":"qwen3:0.6b"}]})),
            ["llama3.2:latest", "qwen3:0.6b"]
        );
        assert!(model_names(&json!({"status":"ok"})).is_empty());
        assert_eq!(
            one_line("<html>\n  <p>Error</p>\n</html>\n"),
            "<html> <p>Error</p> </html>"
        );
        assert_eq!(one_line(&"x".repeat(200)), format!("{}…", "x".repeat(120)));
        assert_eq!(
            Readiness::Ready(vec!["a".into()]).describe(),
            "ready (models: a)"
        );
        assert_eq!(
            Readiness::Busy(503, "Loading model".into()).describe(),
            "not ready: HTTP 503: Loading model"
        );
    }
}
