//! `llm_inference` (PROTOCOL.md §4): a prompt or a chat sent to vLLM, Ollama
//! or llama.cpp, its text streamed back as chunks, the result
//! `{content, finish_reason, usage?}`.
//!
//! This file owns the job's side: reading the payload ([`Params`]), routing
//! to an engine ([`Backend`]: payload `backend`, or a `vllm/`, `ollama/`,
//! `llamacpp/` prefix of `model`, which is stripped) and the result. A bad
//! payload is a `Permanent` error saying what to fix. What is sent lives in
//! request.rs; the HTTP call, timeouts, cancellation and retry decisions in
//! client.rs; the wire formats in stream.rs, sse.rs and ndjson.rs.

mod chunk;
mod client;
mod ndjson;
#[cfg(test)]
mod proptests;
mod request;
mod sse;
mod stream;

use super::{Context, Handler};
use crate::config::Settings;
use crate::job::{Job, JobError};
use client::{EngineClient, Target};
use serde_json::{json, Map, Number, Value};

/// An inference engine this agent can call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vllm,
    Ollama,
    LlamaCpp,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Vllm, Backend::Ollama, Backend::LlamaCpp];

    /// The name used in payloads, model prefixes and settings (`vllm-url`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Vllm => "vllm",
            Backend::Ollama => "ollama",
            Backend::LlamaCpp => "llamacpp",
        }
    }

    /// The engine's own name, for messages.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Vllm => "vLLM",
            Backend::Ollama => "Ollama",
            Backend::LlamaCpp => "llama.cpp",
        }
    }

    fn parse(name: &str) -> Option<Backend> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The configured base URL of this engine.
    pub fn url(self, settings: &Settings) -> &str {
        match self {
            Backend::Vllm => &settings.vllm_url,
            Backend::Ollama => &settings.ollama_url,
            Backend::LlamaCpp => &settings.llamacpp_url,
        }
    }

    /// A cheap GET that answers 200 when the engine can take requests.
    pub fn probe_path(self) -> &'static str {
        match self {
            Backend::Vllm => "/v1/models",
            Backend::Ollama => "/api/tags",
            Backend::LlamaCpp => "/health",
        }
    }

    /// The GET that lists the models the engine serves (vLLM and
    /// llama.cpp `{"data":[{"id"}]}`, Ollama `{"models":[{"name"}]}`).
    pub fn models_path(self) -> &'static str {
        match self {
            Backend::LlamaCpp => "/v1/models",
            b => b.probe_path(),
        }
    }
}

/// What the job asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompt(String),
    /// `(role, content)` of each message.
    Messages(Vec<(String, String)>),
}

/// A parsed `llm_inference` payload (the model without its engine prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub model: String,
    pub input: Input,
    pub max_tokens: Option<u64>,
    pub temperature: Option<Number>,
    pub top_p: Option<Number>,
    pub stop: Vec<String>,
    pub stream: bool,
}

/// The `llm_inference` handler: engine URLs and one client for all jobs.
pub struct Inference {
    urls: [(Backend, String); 3],
    client: EngineClient,
}

impl Inference {
    pub fn new(settings: &Settings) -> Inference {
        Inference {
            urls: Backend::ALL.map(|b| (b, b.url(settings).to_owned())),
            client: EngineClient::new(
                settings.engine_connect_timeout,
                settings.engine_first_token_timeout,
                settings.engine_idle_timeout,
            ),
        }
    }
}

impl Handler for Inference {
    fn run(&self, job: &Job, ctx: &mut Context<'_>) -> Result<Value, JobError> {
        let (backend, params) = route(&job.payload).map_err(JobError::Permanent)?;
        let api = request::api(backend, &params.input);
        let body = request::body(api, &params).to_string();
        let base = self
            .urls
            .iter()
            .find(|(b, _)| *b == backend)
            .map(|(_, url)| url.as_str())
            .unwrap_or_default();
        let target = Target {
            backend,
            base,
            api,
            stream: params.stream,
        };
        let t = self.client.call(&target, body.as_bytes(), ctx)?;
        let mut result = json!({
            "content": t.content,
            "finish_reason": t.finish_reason.as_deref().unwrap_or("stop"),
        });
        if let Some((prompt, completion, total)) = t.usage {
            result["usage"] = json!({
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": total,
            });
        }
        Ok(result)
    }
}

/// The engine and the parameters of a payload; the error says what to fix.
pub fn route(p: &Map<String, Value>) -> Result<(Backend, Params), String> {
    let accepted = || Backend::ALL.map(Backend::name).join(", ");
    let model = match p.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.trim(),
        None | Some(Value::Null) => return Err(
            "llm_inference: payload.model is required (e.g. \"llama3.2\" or \"ollama/llama3.2\")"
                .into(),
        ),
        Some(other) => return Err(bad("model", "a non-empty string", other)),
    };
    let (by_prefix, model) = match model.split_once('/') {
        Some((prefix, rest)) => match Backend::parse(prefix) {
            Some(_) if rest.trim().is_empty() => {
                return Err(format!(
                    "llm_inference: payload.model '{model}' names the engine but no model"
                ))
            }
            Some(b) => (Some(b), rest.trim()),
            // A hub name such as meta-llama/Llama-3.2-1B: not an engine.
            None => (None, model),
        },
        None => (None, model),
    };
    let by_field = match p.get("backend") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(Backend::parse(name).ok_or_else(|| {
            format!(
                "llm_inference: unknown backend '{name}' (accepted: {})",
                accepted()
            )
        })?),
        Some(other) => return Err(bad("backend", &format!("one of {}", accepted()), other)),
    };
    let backend = match (by_prefix, by_field) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "llm_inference: payload.model says {}/ but payload.backend says {}",
                a.name(),
                b.name()
            ))
        }
        (a, b) => a.or(b).unwrap_or(Backend::Vllm),
    };
    let input = match (present(p, "prompt"), present(p, "messages")) {
        (Some(_), Some(_)) => {
            return Err("llm_inference: give payload.prompt or payload.messages, not both".into())
        }
        (None, None) => {
            return Err(
                "llm_inference: payload needs prompt (a string) or messages ([{role, content}])"
                    .into(),
            )
        }
        (Some(Value::String(s)), None) => Input::Prompt(s.clone()),
        (Some(other), None) => return Err(bad("prompt", "a string", other)),
        (None, Some(m)) => Input::Messages(messages(m)?),
    };
    let max_tokens = match present(p, "max_tokens") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad("max_tokens", "a positive whole number", v))?,
        ),
    };
    let number = |key: &str| -> Result<Option<Number>, String> {
        match present(p, key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(Some(n.clone())),
            Some(other) => Err(bad(key, "a number", other)),
        }
    };
    let stop = match present(p, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("stop", "a string or an array of strings", &p["stop"]))?,
        Some(other) => return Err(bad("stop", "a string or an array of strings", other)),
    };
    let stream = match present(p, "stream") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(bad("stream", "true or false", other)),
    };
    let params = Params {
        model: model.to_owned(),
        input,
        max_tokens,
        temperature: number("temperature")?,
        top_p: number("top_p")?,
        stop,
        stream,
    };
    Ok((backend, params))
}

/// `p[key]` unless absent or null.
fn present<'a>(p: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    p.get(key).filter(|v| !v.is_null())
}

fn bad(key: &str, want: &str, got: &Value) -> String {
    let mut got = got.to_string();
    if got.len() > 80 {
        got = format!("{}…", got.chars().take(80).collect::<String>());
    }
    format!("llm_inference: payload.{key} must be {want}, got {got}")
}

fn messages(v: &Value) -> Result<Vec<(String, String)>, String> {
    let want = "a non-empty array of {role, content} objects";
    let items = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("messages", want, v))?;
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| match m.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(format!(
                    "llm_inference: payload.messages[{i}].{name} must be a string, got {}",
                    m.get(name).unwrap_or(&Value::Null)
                )),
            };
            if !m.is_object() {
                return Err(bad(
                    &format!("messages[{i}]"),
                    "a {role, content} object",
                    m,
                ));
            }
            Ok((field("role")?, field("content")?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<(Backend, Params), String> {
        route(v.as_object().unwrap())
    }

    fn ok(v: Value) -> (Backend, Params) {
        parse(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn err(v: Value) -> String {
        parse(v.clone())
            .map(|r| panic!("{v} parsed: {r:?}"))
            .unwrap_err()
    }

    #[test]
    fn backend_defaults_to_vllm_and_a_model_prefix_selects_and_is_stripped() {
        let (b, p) = ok(json!({"model": "m", "prompt": "hi"}));
        assert_eq!((b, p.model.as_str()), (Backend::Vllm, "m"));
        for (model, backend, name) in [
            ("ollama/llama3.2", Backend::Ollama, "llama3.2"),
            ("vllm/Qwen/Qwen3-0.6B", Backend::Vllm, "Qwen/Qwen3-0.6B"),
            ("llamacpp/smollm2", Backend::LlamaCpp, "smollm2"),
            (
                "meta-llama/Llama-3.2-1B",
                Backend::Vllm,
                "meta-llama/Llama-3.2-1B",
            ),
        ] {
            let (b, p) = ok(json!({"model": model, "prompt": "hi"}));
            assert_eq!((b, p.model.as_str()), (backend, name), "{model}");
        }
        let (b, _) = ok(json!({"model": "m", "prompt": "hi", "backend": "ollama"}));
        assert_eq!(b, Backend::Ollama);
        let (b, _) = ok(json!({"model": "ollama/m", "prompt": "hi", "backend": "Ollama"}));
        assert_eq!(b, Backend::Ollama);
        let (b, _) = ok(json!({"model": "m", "prompt": "hi", "backend": null}));
        assert_eq!(b, Backend::Vllm);
    }

    #[test]
    fn routing_conflicts_and_unknown_backends_are_refused() {
        assert_eq!(
            err(json!({"model": "m", "prompt": "hi", "backend": "tgi"})),
            "llm_inference: unknown backend 'tgi' (accepted: vllm, ollama, llamacpp)"
        );
        assert!(err(json!({"model": "m", "prompt": "x", "backend": 3})).contains("one of vllm"));
        assert_eq!(
            err(json!({"model": "ollama/m", "prompt": "hi", "backend": "vllm"})),
            "llm_inference: payload.model says ollama/ but payload.backend says vllm"
        );
        assert!(err(json!({"model": "ollama/", "prompt": "hi"})).contains("no model"));
    }

    #[test]
    fn every_knob_is_read() {
        let (_, p) = ok(json!({
            "model": "m",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 8, "temperature": 0.2, "top_p": 0.9, "stop": ["\n"], "stream": false,
        }));
        assert_eq!(
            p,
            Params {
                model: "m".into(),
                input: Input::Messages(vec![
                    ("system".into(), "be brief".into()),
                    ("user".into(), "hi".into())
                ]),
                max_tokens: Some(8),
                temperature: Number::from_f64(0.2),
                top_p: Number::from_f64(0.9),
                stop: vec!["\n".into()],
                stream: false,
            }
        );
        let (_, p) = ok(json!({"model": "m", "prompt": "", "stop": "END", "max_tokens": null}));
        assert_eq!(
            (p.input, p.stop, p.stream, p.max_tokens),
            (
                Input::Prompt(String::new()),
                vec!["END".to_owned()],
                true,
                None
            )
        );
    }

    #[test]
    fn bad_payloads_say_what_to_fix() {
        let cases = [
            (json!({"prompt": "hi"}), "payload.model is required"),
            (
                json!({"model": "", "prompt": "hi"}),
                "payload.model must be a non-empty string",
            ),
            (
                json!({"model": 7, "prompt": "hi"}),
                "payload.model must be a non-empty string, got 7",
            ),
            (json!({"model": "m"}), "needs prompt (a string) or messages"),
            (
                json!({"model": "m", "prompt": "a", "messages": []}),
                "not both",
            ),
            (
                json!({"model": "m", "prompt": ["a"]}),
                "payload.prompt must be a string",
            ),
            (
                json!({"model": "m", "messages": []}),
                "payload.messages must be a non-empty array",
            ),
            (
                json!({"model": "m", "messages": "hi"}),
                "payload.messages must be a non-empty array",
            ),
            (
                json!({"model": "m", "messages": [1]}),
                "payload.messages[0] must be a {role, content} object",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "payload.messages[0].content must be a string, got null",
            ),
            (
                json!({"model": "m", "prompt": "a", "max_tokens": 0}),
                "payload.max_tokens must be a positive whole number, got 0",
            ),
            (
                json!({"model": "m", "prompt": "a", "max_tokens": "5"}),
                "max_tokens must be a positive whole number",
            ),
            (
                json!({"model": "m", "prompt": "a", "temperature": "hot"}),
                "payload.temperature must be a number",
            ),
            (
                json!({"model": "m", "prompt": "a", "top_p": true}),
                "payload.top_p must be a number",
            ),
            (
                json!({"model": "m", "prompt": "a", "stop": [1]}),
                "payload.stop must be a string or an array of strings",
            ),
            (
                json!({"model": "m", "prompt": "a", "stream": "yes"}),
                "payload.stream must be true or false",
            ),
        ];
        for (payload, want) in cases {
            let e = err(payload.clone());
            assert!(e.contains(want), "{payload}: {e}");
        }
    }
}
