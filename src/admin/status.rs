//! `citadel status`: one screen for an operator, or (`--json`) one JSON
//! object with the same facts under stable names (README, "citadel
//! status"). In order: the mode a `citadel agent` last recorded in
//! `{state-dir}/agent-status.json`; the node (name, device name, version);
//! credentials (redacted); Redis and Nexus reachability; per stream the
//! worker reads (queues, node stream, tag streams) its length, the group's
//! lag and pending count, the oldest pending entry's age and the consumers
//! with their idle times (`status_redis`); dead-letter counts; which
//! inference engines answer at their configured URLs (vLLM `GET
//! /v1/models`, Ollama `GET /api/tags`, llama.cpp `GET /health`) and
//! whether the extraction service does (`GET /health`); the GPUs
//! (nvidia-smi, bounded by `--gpu-query-timeout`); the configured services
//! and their containers (docker, only when services are configured). Also
//! the engines' state as one log line when `citadel work` starts.
//!
//! Every probe runs at once and each is bounded, so the screen comes within
//! the longest one. Nothing here fails the command: a missing status, a
//! Redis or engine that does not answer is a state to report (exit 0).
//! Secrets are never shown: the token as `***`, passwords in URLs redacted.

use super::status_redis::{self, DeadLetters, StreamState};
use super::Exit;
use crate::config::{redact_password, Settings};
use crate::handlers::inference::Backend;
use crate::http::{HttpClient, ReadDeadline};
use crate::node::gpu::Gpu;
use serde_json::{json, Value};
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

    pub fn to_json(&self, name: &str, url: &str) -> Value {
        let (state, models) = match self {
            Readiness::Ready(m) => ("ready", m.clone()),
            Readiness::Busy(..) => ("not_ready", Vec::new()),
            Readiness::Down(_) => ("down", Vec::new()),
        };
        json!({"name": name, "url": url, "state": state, "detail": self.describe(), "models": models})
    }
}

/// Redis as `status` saw it.
struct RedisView {
    url: String,
    /// The streams and dead letters, or why Redis could not tell.
    answer: Result<(Vec<StreamState>, Vec<DeadLetters>), String>,
}

/// Everything the screen shows, gathered at once.
struct View {
    engines: Vec<(Backend, Readiness)>,
    extraction: Readiness,
    redis: RedisView,
    nexus: Option<(String, Readiness)>,
    gpus: Result<Option<Vec<Gpu>>, String>,
    services: Vec<String>,
    containers: Result<Vec<crate::node::docker::Container>, String>,
}

/// `citadel status [--json]`; exit 0.
pub fn run(settings: &Settings, as_json: bool) -> Result<i32, Exit> {
    let view = gather(settings);
    if as_json {
        println!("{}", to_json(settings, &view));
        return Ok(0);
    }
    println!("{}", agent_mode(&settings.state_dir));
    let device = device_name(settings);
    println!(
        "node: {}{}, citadel {}",
        settings.node_name,
        device
            .as_deref()
            .map(|d| format!(" (device {d})"))
            .unwrap_or_default(),
        crate::events::AGENT_VERSION
    );
    println!("{}", crate::node::provision::describe(settings));
    print_redis(settings, &view.redis);
    match &view.nexus {
        None => println!("nexus: not configured"),
        Some((url, Readiness::Down(why))) => println!("nexus: {url} not answering: {why}"),
        Some((url, Readiness::Busy(status, _))) => println!("nexus: {url} answers (HTTP {status})"),
        Some((url, Readiness::Ready(_))) => println!("nexus: {url} answers"),
    }
    println!("{:<10} {:<32} STATE", "ENGINE", "URL");
    for (backend, readiness) in &view.engines {
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
        view.extraction.describe()
    );
    print_gpus(&view.gpus);
    print_services(&view);
    Ok(0)
}

fn gather(settings: &Settings) -> View {
    let services = crate::node::profile::wanted_services(settings);
    let configured = !services.is_empty();
    std::thread::scope(|s| {
        let extraction = s.spawn(|| probe_extraction(settings));
        let redis = s.spawn(|| redis_view(settings));
        let nexus = s.spawn(|| {
            settings.nexus_url.as_ref().map(|url| {
                let client = HttpClient::new(settings.engine_connect_timeout);
                let shown = redact_password(url);
                (
                    shown,
                    probe(&client, url, settings.engine_connect_timeout * 2),
                )
            })
        });
        let gpus = s.spawn(|| crate::node::gpu::query(settings.gpu_query_timeout));
        let containers = s.spawn(move || {
            if !configured {
                return Ok(Vec::new());
            }
            crate::node::docker::Docker::new(&settings.docker)
                .managed()
                .map_err(|e| e.to_string())
        });
        let engines = probe_all(settings);
        let down = |what: &str| Readiness::Down(format!("{what} probe panicked"));
        View {
            engines,
            extraction: extraction.join().unwrap_or_else(|_| down("extraction")),
            redis: redis.join().unwrap_or_else(|_| RedisView {
                url: redact_password(&settings.redis_url),
                answer: Err("the Redis probe panicked".into()),
            }),
            nexus: nexus.join().unwrap_or(None),
            gpus: gpus
                .join()
                .unwrap_or_else(|_| Err("nvidia-smi probe panicked".into())),
            containers: containers
                .join()
                .unwrap_or_else(|_| Err("docker probe panicked".into())),
            services,
        }
    })
}

/// The streams a worker with these settings reads, with their role.
fn watched_streams(settings: &Settings) -> Vec<(String, &'static str)> {
    let mut list: Vec<(String, &'static str)> = settings
        .queues
        .iter()
        .map(|q| (q.clone(), "queue"))
        .collect();
    list.push((settings.node_stream(), "node"));
    if settings.tag_streams {
        let path = settings.state_dir.join(crate::node::profile::FILE);
        if let Ok(Some(c)) = crate::node::profile::load_file(&path) {
            for t in &c.custom_tags {
                let name = crate::node::profile::tag_stream(t, settings.on_cluster());
                if !list.iter().any(|(s, _)| *s == name) {
                    list.push((name, "tag"));
                }
            }
        }
    }
    list
}

fn device_name(settings: &Settings) -> Option<String> {
    let path = settings.state_dir.join(crate::node::profile::FILE);
    crate::node::profile::load_file(&path)
        .ok()
        .flatten()
        .and_then(|c| c.device_name)
}

fn redis_view(settings: &Settings) -> RedisView {
    let url = redact_password(&settings.redis_url);
    let t = settings.redis_timeout;
    let answer = crate::redis_conn::connect(&settings.redis_url, t, t)
        .and_then(|mut conn| {
            status_redis::streams(
                &mut conn,
                &settings.group,
                &watched_streams(settings),
                crate::clock::now_millis(),
            )
        })
        .map_err(|e| {
            // The client's message may carry the URL: show the redacted one.
            let text = e.to_string().replace(&settings.redis_url, &url);
            format!("{} ({text})", crate::redis_conn::describe(&e))
        });
    RedisView { url, answer }
}

fn print_redis(settings: &Settings, r: &RedisView) {
    let (streams, dlq) = match &r.answer {
        Ok(v) => v,
        Err(why) => {
            println!("redis: {} not reachable: {why}", r.url);
            return;
        }
    };
    println!("redis: {} reachable; group '{}'", r.url, settings.group);
    println!(
        "{:<32} {:<5} {:>8} {:>6} {:>8} {:>10}",
        "STREAM", "ROLE", "LENGTH", "LAG", "PENDING", "OLDEST"
    );
    for s in streams {
        let lag = match (s.group_exists, s.lag) {
            (false, _) => "-".to_owned(),
            (true, None) => "?".to_owned(),
            (true, Some(n)) => n.to_string(),
        };
        println!(
            "{:<32} {:<5} {:>8} {:>6} {:>8} {:>10}",
            s.stream,
            s.role,
            s.length,
            lag,
            s.pending,
            s.oldest_pending_age_seconds
                .map(|a| age(Duration::from_secs_f64(a)))
                .unwrap_or_else(|| "-".into())
        );
        if !s.group_exists {
            println!(
                "  (no group '{}' yet: no worker has read it)",
                settings.group
            );
        }
        for c in &s.consumers {
            println!(
                "  consumer {}: {} pending, idle {}",
                c.name,
                c.pending,
                age(Duration::from_secs_f64(c.idle_seconds))
            );
        }
    }
    println!("{:<32} {:>8}", "DEAD LETTERS", "LENGTH");
    for d in dlq {
        println!("{:<32} {:>8}", d.stream, d.length);
    }
}

fn print_gpus(gpus: &Result<Option<Vec<Gpu>>, String>) {
    let list = match gpus {
        Ok(None) => return println!("gpus: none (no nvidia-smi on PATH)"),
        Err(e) => return println!("gpus: unknown ({e})"),
        Ok(Some(list)) if list.is_empty() => return println!("gpus: none (nvidia-smi lists none)"),
        Ok(Some(list)) => list,
    };
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v}{unit}"));
    println!(
        "{:<4} {:<24} {:>6} {:>6} {:>20} {:>9}",
        "GPU", "NAME", "TEMP", "UTIL", "MEMORY", "POWER"
    );
    for g in list {
        let mem = match (g.memory_used_mb, g.memory_total_mb) {
            (Some(u), Some(t)) => format!("{u}/{t} MiB"),
            _ => "-".into(),
        };
        println!(
            "{:<4} {:<24} {:>6} {:>6} {:>20} {:>9}",
            g.index,
            g.name,
            opt(g.temperature_celsius, "°C"),
            opt(g.utilization_percent, "%"),
            mem,
            opt(g.power_watts, " W"),
        );
    }
}

fn print_services(v: &View) {
    if v.services.is_empty() {
        return println!("services: none configured");
    }
    for (name, state, container) in service_rows(v) {
        println!(
            "service {name}: {state}{}",
            container
                .map(|c| format!(" (container {c})"))
                .unwrap_or_default()
        );
    }
}

/// (service, state, container name) of each configured service.
fn service_rows(v: &View) -> Vec<(String, String, Option<String>)> {
    v.services
        .iter()
        .map(|name| match &v.containers {
            Err(e) => (name.clone(), format!("unknown (docker: {e})"), None),
            Ok(list) => match list.iter().find(|c| c.service == *name) {
                Some(c) => (name.clone(), c.state.clone(), Some(c.name.clone())),
                None => (name.clone(), "no container".into(), None),
            },
        })
        .collect()
}

/// `42s`, `3m07s`, `2h05m`, `3d04h`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The `--json` object (README, "citadel status", lists every field).
fn to_json(settings: &Settings, v: &View) -> Value {
    let agent = agent_status(&settings.state_dir);
    let config = crate::node::provision::read_config(&settings.config_file).unwrap_or_default();
    let (streams, dead_letters, redis_error) = match &v.redis.answer {
        Ok((s, d)) => (json!(s), json!(d), Value::Null),
        Err(e) => (json!([]), json!([]), json!(e)),
    };
    let mut engines: Vec<Value> = v
        .engines
        .iter()
        .map(|(b, r)| r.to_json(b.name(), b.url(settings)))
        .collect();
    engines.push(v.extraction.to_json("extraction", &settings.extraction_url));
    let (gpus, gpu_source, gpu_error) = match &v.gpus {
        Ok(None) => (json!([]), "none", Value::Null),
        Ok(Some(list)) => (json!(list), "nvidia-smi", Value::Null),
        Err(e) => (json!([]), "nvidia-smi", json!(e)),
    };
    let services: Vec<Value> = service_rows(v)
        .into_iter()
        .map(|(name, state, container)| json!({"name": name, "state": state, "container": container}))
        .collect();
    json!({
        "node": {
            "name": settings.node_name,
            "device_name": device_name(settings),
            "version": crate::events::AGENT_VERSION,
        },
        "agent": agent,
        "credentials": {
            "config_file": settings.config_file,
            "device_api_token": settings.device_api_token.as_ref().map(|_| "***"),
            "org_id": config.get("org_id"),
        },
        "redis": {
            "url": v.redis.url,
            "reachable": v.redis.answer.is_ok(),
            "error": redis_error,
            "group": settings.group,
        },
        "nexus": match &v.nexus {
            None => json!({"url": null, "reachable": null, "detail": null}),
            Some((url, r)) => json!({
                "url": url,
                "reachable": !matches!(r, Readiness::Down(_)),
                "detail": r.describe(),
            }),
        },
        "streams": streams,
        "dead_letters": dead_letters,
        "engines": engines,
        "gpu_source": gpu_source,
        "gpu_error": gpu_error,
        "gpus": gpus,
        "services": services,
    })
}

/// `agent-status.json` as the `agent` object: mode, since, pid, running.
fn agent_status(state_dir: &std::path::Path) -> Value {
    let path = state_dir.join("agent-status.json");
    let v: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let pid = v.get("pid").and_then(Value::as_u64);
    json!({
        "status_file": path,
        "mode": v.get("mode").and_then(Value::as_str),
        "since": v.get("since").and_then(Value::as_str),
        "pid": pid,
        "running": pid.map(|p| std::path::Path::new(&format!("/proc/{p}")).exists()),
    })
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
    probe_all_at(settings, Backend::probe_path)
}

/// [`probe_all`] at each engine's model list: the models each serves (the
/// heartbeat's `engines`).
pub fn probe_models(settings: &Settings) -> Vec<(Backend, Readiness)> {
    probe_all_at(settings, Backend::models_path)
}

fn probe_all_at(
    settings: &Settings,
    path: fn(Backend) -> &'static str,
) -> Vec<(Backend, Readiness)> {
    let client = HttpClient::new(settings.engine_connect_timeout);
    let budget = settings.engine_connect_timeout * 2;
    std::thread::scope(|s| {
        let probes: Vec<_> = Backend::ALL
            .map(|b| {
                let client = &client;
                let url = format!("{}{}", b.url(settings), path(b));
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
