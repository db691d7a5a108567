//! The OpenAI side of the gateway, pure (no I/O): reading and checking a
//! `/v1/chat/completions` or `/v1/completions` request into an [`Ask`],
//! the `llm_inference` payload it becomes, and the JSON shapes of the
//! answers (chunks, whole completions, usage, error objects) as the OpenAI
//! API writes them.

use serde_json::{json, Map, Number, Value};

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub endpoint: Endpoint,
    pub model: String,
    /// Chat: `[{role, content}]` with text content; completions: the prompt string.
    pub input: Value,
    pub max_tokens: Option<u64>,
    pub temperature: Option<Number>,
    pub top_p: Option<Number>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// An answer that is an error: the HTTP status and the OpenAI error object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// 400 about one field of the request.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_owned()),
            ..ApiError::new(400, "invalid_request_error", message)
        }
    }

    /// `{"error": {message, type, param, code}}`
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Read a request body of `endpoint`; the error names the field to fix.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Ask, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            format!("We could not parse the JSON body of your request ({e}). Send a JSON object."),
        )
    })?;
    let Value::Object(r) = value else {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "The request body must be a JSON object.",
        ));
    };
    let model = match present(&r, "model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.trim().to_owned(),
        None => {
            return Err(ApiError::field(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(other) => return Err(wrong("model", "a non-empty string", other)),
    };
    let input = match endpoint {
        Endpoint::Chat => messages(present(&r, "messages"))?,
        Endpoint::Completions => prompt(present(&r, "prompt"))?,
    };
    let tokens = |key: &str| -> Result<Option<u64>, ApiError> {
        match present(&r, key) {
            None => Ok(None),
            Some(v) => match v.as_u64().filter(|n| *n > 0) {
                Some(n) => Ok(Some(n)),
                None => Err(wrong(key, "a positive integer", v)),
            },
        }
    };
    // The newer name wins when both are given.
    let max_tokens = match tokens("max_completion_tokens")? {
        Some(n) => Some(n),
        None => tokens("max_tokens")?,
    };
    let ranged = |key: &str, max: f64| -> Result<Option<Number>, ApiError> {
        match present(&r, key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_f64().is_some_and(|f| (0.0..=max).contains(&f)) => {
                Ok(Some(n.clone()))
            }
            Some(other) => Err(wrong(key, &format!("a number from 0 to {max}"), other)),
        }
    };
    let temperature = ranged("temperature", 2.0)?;
    let top_p = ranged("top_p", 1.0)?;
    let stop = match present(&r, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(v @ Value::Array(items)) => {
            let stops: Option<Vec<String>> = items
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect();
            match stops {
                Some(s) if s.len() <= 4 => s,
                _ => return Err(wrong("stop", "a string or up to 4 strings", v)),
            }
        }
        Some(other) => return Err(wrong("stop", "a string or up to 4 strings", other)),
    };
    let stream = match present(&r, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(wrong("stream", "a boolean", other)),
    };
    let include_usage = match present(&r, "stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::field(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            ))
        }
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(wrong("stream_options.include_usage", "a boolean", other)),
        },
        Some(other) => return Err(wrong("stream_options", "an object", other)),
    };
    match present(&r, "n") {
        None => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => return Err(wrong("n", "1 (one choice per request)", v)),
    }
    Ok(Ask {
        endpoint,
        model,
        input,
        max_tokens,
        temperature,
        top_p,
        stop,
        stream,
        include_usage,
    })
}

/// The `llm_inference` payload of `ask` (PROTOCOL.md §4). `backend`: the
/// engine kind, or `None` to let a `vllm/`-style prefix of the model pick.
/// Always streamed from the engine: chunks are what the gateway relays.
pub fn payload(ask: &Ask, backend: Option<&str>, timeout_ms: u64) -> Value {
    let mut p = Map::new();
    p.insert("model".into(), ask.model.clone().into());
    if let Some(b) = backend {
        p.insert("backend".into(), b.into());
    }
    let key = match ask.endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    p.insert(key.into(), ask.input.clone());
    if let Some(n) = ask.max_tokens {
        p.insert("max_tokens".into(), n.into());
    }
    if let Some(t) = &ask.temperature {
        p.insert("temperature".into(), Value::Number(t.clone()));
    }
    if let Some(t) = &ask.top_p {
        p.insert("top_p".into(), Value::Number(t.clone()));
    }
    if !ask.stop.is_empty() {
        p.insert("stop".into(), ask.stop.clone().into());
    }
    p.insert("stream".into(), true.into());
    p.insert("timeout_ms".into(), timeout_ms.into());
    Value::Object(p)
}

/// One answer being built: what every chunk and the whole completion share.
pub struct Answer<'a> {
    pub ask: &'a Ask,
    /// `chatcmpl-{jobId}` / `cmpl-{jobId}`.
    pub id: String,
    pub created: u64,
    /// A text chunk's JSON before and after its text (see `text_chunk_json`).
    text_frame: (String, String),
}

impl<'a> Answer<'a> {
    pub fn new(ask: &'a Ask, job_id: &str, created: u64) -> Answer<'a> {
        let prefix = match ask.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        let mut a = Answer {
            ask,
            id: format!("{prefix}-{job_id}"),
            created,
            text_frame: Default::default(),
        };
        // The text is the only string of this key: any other `"text":""`
        // would be inside a string, its quotes escaped.
        let whole = a.text_chunk("").to_string();
        let key = match ask.endpoint {
            Endpoint::Chat => r#""content":"""#,
            Endpoint::Completions => r#""text":"""#,
        };
        let at = whole.find(key).map_or(whole.len(), |i| i + key.len() - 2);
        let after = whole.get(at + 2..).unwrap_or_default().to_owned();
        a.text_frame = (whole[..at].to_owned(), after);
        a
    }

    fn object(&self, choices: Value) -> Value {
        let object = match self.ask.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created,
            "model": self.ask.model, "choices": choices,
        });
        if self.ask.include_usage {
            // OpenAI: every chunk but the usage chunk has "usage": null.
            v["usage"] = Value::Null;
        }
        v
    }

    /// The first chunk of a chat stream: the role, no text. `None` for
    /// completions (their chunks carry no role).
    pub fn role_chunk(&self) -> Option<Value> {
        (self.ask.endpoint == Endpoint::Chat).then(|| {
            self.object(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null}]),
            )
        })
    }

    /// A chunk carrying `text`.
    pub fn text_chunk(&self, text: &str) -> Value {
        self.object(match self.ask.endpoint {
            Endpoint::Chat => json!([{"index": 0, "delta": {"content": text},
                                      "logprobs": null, "finish_reason": null}]),
            Endpoint::Completions => json!([{"index": 0, "text": text,
                                             "logprobs": null, "finish_reason": null}]),
        })
    }

    /// `text_chunk(text)` as JSON text, the same bytes, written around the
    /// text without building a `Value` (this is the chunk of every token).
    pub fn text_chunk_json(&self, text: &str) -> String {
        let (before, after) = &self.text_frame;
        let mut out = Vec::with_capacity(before.len() + text.len() + after.len() + 8);
        out.extend_from_slice(before.as_bytes());
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, text);
        out.extend_from_slice(after.as_bytes());
        // JSON text serde_json wrote, between pieces of JSON text.
        String::from_utf8(out).unwrap_or_default()
    }

    /// The last chunk with choices: no text, the finish reason.
    pub fn finish_chunk(&self, finish_reason: &str) -> Value {
        self.object(match self.ask.endpoint {
            Endpoint::Chat => json!([{"index": 0, "delta": {},
                                      "logprobs": null, "finish_reason": finish_reason}]),
            Endpoint::Completions => json!([{"index": 0, "text": "",
                                             "logprobs": null, "finish_reason": finish_reason}]),
        })
    }

    /// The chunk `stream_options.include_usage` asks for: no choices.
    pub fn usage_chunk(&self, usage: &Value) -> Value {
        let mut v = self.object(json!([]));
        v["usage"] = usage.clone();
        v
    }

    /// A whole `chat.completion` / `text_completion`.
    pub fn whole(&self, text: &str, finish_reason: &str, usage: &Value) -> Value {
        let (object, choice) = match self.ask.endpoint {
            Endpoint::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": null, "finish_reason": finish_reason}),
            ),
            Endpoint::Completions => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null,
                       "finish_reason": finish_reason}),
            ),
        };
        json!({"id": self.id, "object": object, "created": self.created,
               "model": self.ask.model, "choices": [choice], "usage": usage})
    }
}

/// The finish reason of a job's result, as OpenAI names them.
pub fn finish_reason(result: &Value) -> &str {
    match result["finish_reason"].as_str() {
        Some(r @ ("stop" | "length" | "content_filter" | "tool_calls")) => r,
        _ => "stop",
    }
}

/// The usage of a job's result; when the engine reported none, the chunk
/// count stands in for the completion tokens and the prompt counts 0.
pub fn usage(result: &Value, chunks: u64) -> Value {
    let u = &result["usage"];
    let n = |k: &str| u[k].as_u64();
    match (n("prompt_tokens"), n("completion_tokens")) {
        (Some(p), Some(c)) => json!({"prompt_tokens": p, "completion_tokens": c,
                                     "total_tokens": n("total_tokens").unwrap_or(p + c)}),
        _ => json!({"prompt_tokens": 0, "completion_tokens": chunks, "total_tokens": chunks}),
    }
}

/// How a job's `error` event is answered before the first byte.
pub fn job_error(message: &str) -> ApiError {
    if message.contains("exceeded its timeout_ms") || message.contains("deadline") {
        return ApiError::new(
            504,
            "timeout",
            format!("the job's deadline passed: {message}"),
        )
        .code("job_deadline_exceeded");
    }
    if message.contains("(HTTP 404)") {
        return ApiError::new(404, "invalid_request_error", message.to_owned())
            .code("model_not_found");
    }
    if message.contains("(HTTP 4") || message.starts_with("llm_inference: payload") {
        return ApiError::new(400, "invalid_request_error", message.to_owned());
    }
    ApiError::new(502, "upstream_error", message.to_owned()).code("job_failed")
}

fn present<'a>(r: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    r.get(key).filter(|v| !v.is_null())
}

fn wrong(param: &str, want: &str, got: &Value) -> ApiError {
    let mut got = got.to_string();
    if got.len() > 60 {
        got = format!("{}…", got.chars().take(60).collect::<String>());
    }
    ApiError::field(param, format!("'{param}' must be {want}, got {got}"))
}

/// Chat messages with text content: a content array of text parts is
/// joined into one string (the job's messages carry strings).
fn messages(v: Option<&Value>) -> Result<Value, ApiError> {
    let items = match v {
        None => return Err(ApiError::field("messages", "you must provide messages")),
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(other) => return Err(wrong("messages", "a non-empty array", other)),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}].{f}");
        let role = match m.get("role") {
            Some(Value::String(r))
                if matches!(
                    r.as_str(),
                    "system" | "user" | "assistant" | "developer" | "tool"
                ) =>
            {
                r.clone()
            }
            Some(other) => {
                return Err(wrong(
                    &at("role"),
                    "one of system, user, assistant, developer, tool",
                    other,
                ))
            }
            None if m.is_object() => {
                return Err(ApiError::field(
                    &at("role"),
                    format!("'{}' is required", at("role")),
                ))
            }
            None => return Err(wrong(&format!("messages[{i}]"), "an object", m)),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part["type"].as_str(), part["text"].as_str()) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => return Err(wrong(
                            &format!("messages[{i}].content[{j}]"),
                            "a text part {\"type\": \"text\", \"text\": …} (only text is served)",
                            part,
                        )),
                    }
                }
                text
            }
            Some(other) => return Err(wrong(&at("content"), "a string", other)),
            None => {
                return Err(ApiError::field(
                    &at("content"),
                    format!("'{}' is required", at("content")),
                ))
            }
        };
        out.push(json!({"role": role, "content": content}));
    }
    Ok(Value::Array(out))
}

/// A completion prompt: a string, or an array holding one string.
fn prompt(v: Option<&Value>) -> Result<Value, ApiError> {
    match v {
        None => Err(ApiError::field("prompt", "you must provide a prompt")),
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(a[0].clone()),
        Some(other) => Err(wrong("prompt", "a string (one prompt per request)", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Ask, ApiError> {
        parse(Endpoint::Chat, body.to_string().as_bytes())
    }

    #[test]
    fn a_full_chat_request_becomes_a_streamed_job_payload() {
        let ask = chat(json!({"model": "llama3", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                             {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 8, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
            "stop": "\n", "stream": true, "stream_options": {"include_usage": true},
            "n": 1, "user": "ignored"}))
        .unwrap();
        assert!(ask.stream && ask.include_usage);
        assert_eq!(
            payload(&ask, Some("vllm"), 60_000),
            json!({"model": "llama3", "backend": "vllm", "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi there"}],
                "max_tokens": 8, "temperature": 0, "top_p": 0.5, "stop": ["\n"],
                "stream": true, "timeout_ms": 60_000})
        );
        let ask = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":["Once"],"max_tokens":4}"#,
        )
        .unwrap();
        assert!(!ask.stream);
        assert_eq!(
            payload(&ask, None, 1),
            json!({"model": "m", "prompt": "Once", "max_tokens": 4, "stream": true,
                   "timeout_ms": 1})
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (json!({"model": "", "messages": []}), "model"),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": [3]}), "messages[0]"),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "king", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 7}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0]",
            ),
        ];
        for (body, param) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}");
        }
        let ok = json!([{"role": "user", "content": "x"}]);
        let knob_cases = [
            ("max_tokens", json!(0)),
            ("max_tokens", json!(-1)),
            ("max_tokens", json!("8")),
            ("max_completion_tokens", json!(1.5)),
            ("temperature", json!(3)),
            ("temperature", json!("hot")),
            ("top_p", json!(1.5)),
            ("stop", json!(["a", "b", "c", "d", "e"])),
            ("stop", json!([1])),
            ("stream", json!("yes")),
            ("n", json!(2)),
        ];
        for (key, value) in knob_cases {
            let mut body = json!({"model": "m", "messages": ok});
            body[key] = value.clone();
            let e = chat(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(key), "{key}={value}");
            assert!(e.message.contains(key), "{}", e.message);
        }
        let e =
            chat(json!({"model": "m", "messages": ok, "stream_options": {"include_usage": true}}))
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        for body in [&b"{"[..], b"[1]", b"", b"\xff\xfe"] {
            let e = parse(Endpoint::Chat, body).unwrap_err();
            assert_eq!((e.status, e.kind), (400, "invalid_request_error"));
        }
        let e = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":["a","b"]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn chunks_and_whole_answers_have_the_openai_shapes() {
        let ask = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                              "stream": true, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        let a = Answer::new(&ask, "j1", 7);
        let role = a.role_chunk().unwrap();
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["id"], "chatcmpl-j1");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["usage"], Value::Null);
        assert_eq!(a.text_chunk("Hel")["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(
            a.finish_chunk("length")["choices"][0]["finish_reason"],
            "length"
        );
        let u = usage(
            &json!({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
            9,
        );
        assert_eq!(
            u,
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        assert_eq!(a.usage_chunk(&u)["choices"], json!([]));
        assert_eq!(a.usage_chunk(&u)["usage"]["total_tokens"], 5);
        let whole = a.whole("Hello", "stop", &u);
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(whole["choices"][0]["message"]["content"], "Hello");
        let ask = parse(Endpoint::Completions, br#"{"model":"m","prompt":"x"}"#).unwrap();
        let a = Answer::new(&ask, "j2", 7);
        assert!(a.role_chunk().is_none());
        assert_eq!(a.text_chunk("t")["choices"][0]["text"], "t");
        assert!(a.text_chunk("t").get("usage").is_none());
        assert_eq!(a.whole("t", "stop", &u)["object"], "text_completion");
        assert_eq!(usage(&json!({}), 4)["completion_tokens"], 4);
        assert_eq!(finish_reason(&json!({"finish_reason": "weird"})), "stop");
    }

    #[test]
    fn a_text_chunk_written_around_its_text_is_the_value_one() {
        let bodies = [
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            json!({"model": r#"a"content":"" \u0000 é"#, "messages": [{"role": "user", "content": "x"}],
                   "stream": true, "stream_options": {"include_usage": true}}),
        ];
        for body in bodies {
            let chat_ask = chat(body.clone()).unwrap();
            let mut prompt = body.clone();
            prompt["prompt"] = json!("p");
            let text_ask = parse(Endpoint::Completions, prompt.to_string().as_bytes()).unwrap();
            for ask in [&chat_ask, &text_ask] {
                let a = Answer::new(ask, "j\"1", 7);
                for text in ["", "Hel", "\"\\\n\u{1}\u{7f}", "日本 🌌", r#""text":"""#] {
                    assert_eq!(
                        a.text_chunk_json(text),
                        a.text_chunk(text).to_string(),
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn job_errors_map_to_statuses() {
        assert_eq!(job_error("job exceeded its timeout_ms of 5ms").status, 504);
        assert_eq!(
            job_error("vLLM rejected the request (HTTP 404): no model").status,
            404
        );
        assert_eq!(
            job_error("llama.cpp rejected the request (HTTP 400): long").status,
            400
        );
        assert_eq!(job_error("connection refused").status, 502);
        let body = ApiError::field("model", "bad").body();
        assert_eq!(
            body,
            json!({"error": {"message": "bad", "type": "invalid_request_error",
                             "param": "model", "code": null}})
        );
    }
}
