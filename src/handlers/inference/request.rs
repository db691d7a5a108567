//! What each engine is sent: for a parsed job ([`Params`]) and its engine,
//! the API to call ([`Api`]: path, and the format of its answer) and the
//! request body. Pure: no I/O, no settings.
//!
//! vLLM and llama.cpp's chat speak OpenAI (`max_tokens`, `stop`,
//! `stream_options.include_usage` so a stream reports token counts); llama.cpp's
//! native `/completion` takes `n_predict`; Ollama takes sampling knobs under
//! `options` (`num_predict`, `temperature`, `top_p`, `stop`).

use super::ndjson::NdjsonDecoder;
use super::sse::{decode_response, SseDecoder, SseDialect};
use super::stream::{Decoder, StreamItem};
use super::{Backend, Input, Params};
use serde_json::{json, Map, Value};

/// One engine API, by the shape of its request and answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/completions` (vLLM): prompt → SSE `choices[0].text`.
    OpenAiCompletions,
    /// `POST /v1/chat/completions` (vLLM, llama.cpp): messages → SSE `delta.content`.
    OpenAiChat,
    /// `POST /completion` (llama.cpp): prompt → SSE `content`, `stop:true`.
    LlamaCppCompletion,
    /// `POST /api/generate` (Ollama): prompt → NDJSON `response`.
    OllamaGenerate,
    /// `POST /api/chat` (Ollama): messages → NDJSON `message.content`.
    OllamaChat,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::OpenAiCompletions => "/v1/completions",
            Api::OpenAiChat => "/v1/chat/completions",
            Api::LlamaCppCompletion => "/completion",
            Api::OllamaGenerate => "/api/generate",
            Api::OllamaChat => "/api/chat",
        }
    }

    /// The `Accept` header of a streaming request.
    pub fn stream_media_type(self) -> &'static str {
        match self {
            Api::OllamaGenerate | Api::OllamaChat => "application/x-ndjson",
            _ => "text/event-stream",
        }
    }

    /// A decoder for a streamed answer.
    pub fn decoder(self) -> Box<dyn Decoder + Send> {
        match self.sse_dialect() {
            Some(dialect) => Box::new(SseDecoder::new(dialect)),
            None => Box::new(NdjsonDecoder::new()),
        }
    }

    /// The items of a whole (`stream: false`) answer; `Done` last unless an error.
    pub fn decode_whole(self, body: &[u8]) -> Vec<StreamItem> {
        match self.sse_dialect() {
            Some(dialect) => decode_response(dialect, body),
            None => {
                // Ollama's whole answer is its stream's last line, with all the text.
                let mut d = NdjsonDecoder::new();
                let mut items = d.feed(body);
                items.extend(d.finish());
                items
            }
        }
    }

    fn sse_dialect(self) -> Option<SseDialect> {
        match self {
            Api::OpenAiCompletions => Some(SseDialect::OpenAiCompletions),
            Api::OpenAiChat => Some(SseDialect::OpenAiChat),
            Api::LlamaCppCompletion => Some(SseDialect::LlamaCppNative),
            Api::OllamaGenerate | Api::OllamaChat => None,
        }
    }
}

/// The API a job uses on its engine: prompt or chat.
pub fn api(backend: Backend, input: &Input) -> Api {
    match (backend, input) {
        (Backend::Vllm, Input::Prompt(_)) => Api::OpenAiCompletions,
        (Backend::LlamaCpp, Input::Prompt(_)) => Api::LlamaCppCompletion,
        (Backend::Ollama, Input::Prompt(_)) => Api::OllamaGenerate,
        (Backend::Vllm | Backend::LlamaCpp, Input::Messages(_)) => Api::OpenAiChat,
        (Backend::Ollama, Input::Messages(_)) => Api::OllamaChat,
    }
}

/// The request body of `p` for `api`. Unset knobs are left out, so the
/// engine's own defaults apply.
pub fn body(api: Api, p: &Params) -> Value {
    let mut b = Map::new();
    b.insert("model".into(), p.model.clone().into());
    match &p.input {
        Input::Prompt(prompt) => b.insert("prompt".into(), prompt.clone().into()),
        Input::Messages(m) => b.insert("messages".into(), messages(m)),
    };
    match api {
        Api::OpenAiCompletions | Api::OpenAiChat | Api::LlamaCppCompletion => {
            let max_tokens = if api == Api::LlamaCppCompletion {
                "n_predict"
            } else {
                "max_tokens"
            };
            knobs(&mut b, p, max_tokens);
            b.insert("stream".into(), p.stream.into());
            if p.stream && api != Api::LlamaCppCompletion {
                // Otherwise an OpenAI stream carries no token counts.
                b.insert("stream_options".into(), json!({"include_usage": true}));
            }
        }
        Api::OllamaGenerate | Api::OllamaChat => {
            b.insert("stream".into(), p.stream.into());
            let mut options = Map::new();
            knobs(&mut options, p, "num_predict");
            if !options.is_empty() {
                b.insert("options".into(), Value::Object(options));
            }
        }
    }
    Value::Object(b)
}

/// `max_tokens` (under the engine's name), `temperature`, `top_p`, `stop`.
fn knobs(into: &mut Map<String, Value>, p: &Params, max_tokens: &str) {
    if let Some(n) = p.max_tokens {
        into.insert(max_tokens.into(), n.into());
    }
    if let Some(t) = &p.temperature {
        into.insert("temperature".into(), t.clone().into());
    }
    if let Some(t) = &p.top_p {
        into.insert("top_p".into(), t.clone().into());
    }
    if !p.stop.is_empty() {
        into.insert("stop".into(), p.stop.clone().into());
    }
}

fn messages(m: &[(String, String)]) -> Value {
    m.iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(input: Input) -> Params {
        Params {
            model: "m".into(),
            input,
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            stream: true,
        }
    }

    fn all_knobs(input: Input) -> Params {
        Params {
            max_tokens: Some(16),
            temperature: Some(serde_json::Number::from_f64(0.5).unwrap()),
            top_p: Some(1.into()),
            stop: vec!["\n".into(), "END".into()],
            ..params(input)
        }
    }

    fn prompt() -> Input {
        Input::Prompt("Hi".into())
    }

    fn chat() -> Input {
        Input::Messages(vec![("user".into(), "Hi".into())])
    }

    #[test]
    fn each_engine_and_input_has_its_api() {
        let cases = [
            (Backend::Vllm, prompt(), "/v1/completions"),
            (Backend::Vllm, chat(), "/v1/chat/completions"),
            (Backend::LlamaCpp, prompt(), "/completion"),
            (Backend::LlamaCpp, chat(), "/v1/chat/completions"),
            (Backend::Ollama, prompt(), "/api/generate"),
            (Backend::Ollama, chat(), "/api/chat"),
        ];
        for (backend, input, path) in cases {
            assert_eq!(api(backend, &input).path(), path, "{backend:?} {input:?}");
        }
    }

    #[test]
    fn openai_bodies() {
        assert_eq!(
            body(Api::OpenAiCompletions, &all_knobs(prompt())),
            json!({"model": "m", "prompt": "Hi", "max_tokens": 16, "temperature": 0.5,
                   "top_p": 1, "stop": ["\n", "END"], "stream": true,
                   "stream_options": {"include_usage": true}})
        );
        let mut p = params(chat());
        p.stream = false;
        // stream_options is only allowed with stream: true (vLLM rejects it otherwise).
        assert_eq!(
            body(Api::OpenAiChat, &p),
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                   "stream": false})
        );
    }

    #[test]
    fn llama_cpp_native_body_uses_n_predict() {
        assert_eq!(
            body(Api::LlamaCppCompletion, &all_knobs(prompt())),
            json!({"model": "m", "prompt": "Hi", "n_predict": 16, "temperature": 0.5,
                   "top_p": 1, "stop": ["\n", "END"], "stream": true})
        );
    }

    #[test]
    fn ollama_bodies_put_knobs_under_options() {
        assert_eq!(
            body(Api::OllamaChat, &all_knobs(chat())),
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                   "stream": true, "options": {"num_predict": 16, "temperature": 0.5,
                   "top_p": 1, "stop": ["\n", "END"]}})
        );
        assert_eq!(
            body(Api::OllamaGenerate, &params(prompt())),
            json!({"model": "m", "prompt": "Hi", "stream": true})
        );
    }

    #[test]
    fn whole_answers_of_every_api() {
        use StreamItem::{Done, Text};
        let text = |api: Api, body: &str| -> Vec<StreamItem> {
            api.decode_whole(body.as_bytes())
                .into_iter()
                .filter(|i| matches!(i, Text(_) | Done))
                .collect()
        };
        let want = [Text("ok".into()), Done];
        assert_eq!(
            text(
                Api::OllamaGenerate,
                r#"{"response":"ok","done":true,"done_reason":"stop"}"#
            ),
            want
        );
        assert_eq!(
            text(
                Api::OllamaChat,
                r#"{"message":{"role":"assistant","content":"ok"},"done":true}"#
            ),
            want
        );
        assert_eq!(
            text(Api::LlamaCppCompletion, r#"{"content":"ok","stop":true}"#),
            want
        );
        assert_eq!(
            text(Api::OpenAiCompletions, r#"{"choices":[{"text":"ok"}]}"#),
            want
        );
    }
}
