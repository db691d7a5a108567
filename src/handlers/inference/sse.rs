//! Decoder of `text/event-stream` bodies from OpenAI-compatible engines (vLLM,
//! llama.cpp `/v1/*`) and llama.cpp's native `POST /completion`.
//!
//! Owns the SSE framing (WHATWG: LF / CRLF / CR line ends, even split across
//! reads; `:` comments; `data:` lines joined with "\n"; dispatch at a blank
//! line) and the mapping of each dialect's JSON chunks to [`StreamItem`]s.
//! Pure parsing: no I/O. Bytes are buffered, not chars, so a read may end
//! inside a UTF-8 character.
//!
//! Two deliberate extensions to the spec: llama.cpp's non-standard `error:`
//! field is reported as [`StreamItem::Error`], and an event cut off by the end
//! of the body is still dispatched by [`SseDecoder::finish`] (a truncated chunk
//! then surfaces as an invalid-JSON error instead of vanishing).

use serde_json::Value;

use super::stream::{
    count, describe_error, error_message, line_too_long, parse_json, text_item, usage_item,
    Decoder, StreamItem, MAX_LINE,
};

/// Which JSON shape the `data:` events carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseDialect {
    /// `/v1/completions`: text in `choices[0].text`.
    OpenAiCompletions,
    /// `/v1/chat/completions`: text in `choices[0].delta.content`.
    OpenAiChat,
    /// llama.cpp `POST /completion` with `stream: true`: `content`, `stop`, `stop_type`.
    LlamaCppNative,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Incremental SSE decoder; see the module docs.
#[derive(Debug)]
pub struct SseDecoder {
    dialect: SseDialect,
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// The last line ended with CR: an LF right after it ends nothing.
    after_cr: bool,
    /// No line seen yet: a leading UTF-8 BOM is to be stripped.
    first_line: bool,
    /// `data:` values of the event being built, joined with "\n".
    data: Option<String>,
    /// llama.cpp `error:` values of the event being built.
    error: Option<String>,
    /// Longest line, and longest event data, accepted ([`MAX_LINE`]).
    max_line: usize,
    /// `Done` was seen, or a limit was passed: the rest is ignored.
    done: bool,
}

impl SseDecoder {
    pub fn new(dialect: SseDialect) -> Self {
        Self::with_max_line(dialect, MAX_LINE)
    }

    pub fn with_max_line(dialect: SseDialect, max_line: usize) -> Self {
        Self {
            dialect,
            line: Vec::new(),
            after_cr: false,
            first_line: true,
            data: None,
            error: None,
            max_line,
            done: false,
        }
    }

    /// Appends to the current line; false (and an error item) past the limit.
    fn extend_line(&mut self, bytes: &[u8], out: &mut Vec<StreamItem>) -> bool {
        if self.line.len() + bytes.len() > self.max_line {
            self.overflow(out);
            return false;
        }
        self.line.extend_from_slice(bytes);
        true
    }

    fn overflow(&mut self, out: &mut Vec<StreamItem>) {
        self.line = Vec::new();
        self.data = None;
        self.error = None;
        self.done = true;
        out.push(line_too_long(self.max_line));
    }

    /// Consumes the next bytes of the body and returns the items they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() && !self.done {
            if std::mem::take(&mut self.after_cr) && rest[0] == b'\n' {
                rest = &rest[1..];
                continue;
            }
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.extend_line(rest, &mut out);
                break;
            };
            if !self.extend_line(&rest[..end], &mut out) {
                break;
            }
            self.after_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            let mut line = std::mem::take(&mut self.line);
            self.on_line(&line, &mut out);
            // The next line reuses its room.
            line.clear();
            self.line = line;
        }
        out
    }

    /// Ends the body: an unterminated last line and a pending event are dispatched.
    pub fn finish(&mut self) -> Vec<StreamItem> {
        let mut out = Vec::new();
        if !self.done {
            let line = std::mem::take(&mut self.line);
            if !line.is_empty() {
                self.on_line(&line, &mut out);
            }
            self.dispatch(&mut out);
        }
        out
    }

    fn on_line(&mut self, mut line: &[u8], out: &mut Vec<StreamItem>) {
        if std::mem::take(&mut self.first_line) {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch(out);
        }
        let line = String::from_utf8_lossy(line);
        let (buffer, value) = match split_field(&line) {
            ("data", value) => (&mut self.data, value),
            ("error", value) => (&mut self.error, value),
            _ => return, // comments, event:, id:, retry:, unknown fields
        };
        let joined = match buffer {
            Some(joined) => {
                joined.push('\n');
                joined.push_str(value);
                joined.len()
            }
            None => {
                *buffer = Some(value.to_owned());
                value.len()
            }
        };
        // Many `data:` lines without a blank line must not grow memory either.
        if joined > self.max_line {
            self.overflow(out);
        }
    }

    fn dispatch(&mut self, out: &mut Vec<StreamItem>) {
        if let Some(data) = self.data.take() {
            let items = decode_data(self.dialect, &data);
            self.done = items.last() == Some(&StreamItem::Done);
            out.extend(items);
        }
        if let Some(error) = self.error.take().filter(|_| !self.done) {
            out.push(StreamItem::Error(match parse_json(&error) {
                Ok(value) => describe_error(&value),
                Err(_) => describe_error(&Value::String(error)),
            }));
        }
    }
}

impl Decoder for SseDecoder {
    fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        SseDecoder::feed(self, bytes)
    }

    fn finish(&mut self) -> Vec<StreamItem> {
        SseDecoder::finish(self)
    }
}

/// Splits a non-blank line into field name and value (one leading space of the
/// value stripped). A comment (`:` first) has an empty field name.
fn split_field(line: &str) -> (&str, &str) {
    match line.split_once(':') {
        Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
        None => (line, ""),
    }
}

/// The items of one event's data; `Done`, if any, is last.
fn decode_data(dialect: SseDialect, data: &str) -> Vec<StreamItem> {
    let data = data.trim();
    if data.is_empty() {
        return Vec::new();
    }
    if data == "[DONE]" {
        return vec![StreamItem::Done];
    }
    match super::chunk::plain_items(dialect, data) {
        Some(items) => items,
        None => value_items(dialect, data),
    }
}

/// The items of one event's (trimmed, non-`[DONE]`) data, read through a
/// `Value`: every shape, where `chunk::plain_items` reads only the common one.
pub(super) fn value_items(dialect: SseDialect, data: &str) -> Vec<StreamItem> {
    let chunk = match parse_json(data) {
        Ok(chunk) => chunk,
        Err(error) => return vec![error],
    };
    if let Some(message) = error_message(&chunk) {
        return vec![StreamItem::Error(message)];
    }
    match dialect {
        SseDialect::OpenAiChat | SseDialect::OpenAiCompletions => openai_items(dialect, &chunk),
        SseDialect::LlamaCppNative => llama_items(&chunk),
    }
}

/// The items of a whole (`stream: false`) answer: the same JSON as one
/// stream chunk, unframed; `Done` is always last unless it is an error.
pub fn decode_response(dialect: SseDialect, body: &[u8]) -> Vec<StreamItem> {
    let mut items = decode_data(dialect, &String::from_utf8_lossy(body));
    if items.is_empty() {
        items.push(StreamItem::Error("engine sent an empty answer".into()));
    }
    if !matches!(items.last(), Some(StreamItem::Done | StreamItem::Error(_))) {
        items.push(StreamItem::Done);
    }
    items
}

fn openai_items(dialect: SseDialect, chunk: &Value) -> Vec<StreamItem> {
    let mut items = Vec::new();
    if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
        let text = match dialect {
            // `delta` in a stream, `message` in a whole (`stream: false`) answer.
            SseDialect::OpenAiChat => choice
                .get("delta")
                .or_else(|| choice.get("message"))
                .and_then(|d| d.get("content")),
            _ => choice.get("text"),
        };
        items.extend(text_item(text));
        if let Some(reason) = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
        {
            items.push(StreamItem::Finish(reason.to_owned()));
        }
    }
    if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
        let counts =
            ["prompt_tokens", "completion_tokens", "total_tokens"].map(|k| count(usage, k));
        items.extend(usage_item(counts[0], counts[1], counts[2]));
    }
    items
}

fn llama_items(chunk: &Value) -> Vec<StreamItem> {
    let mut items: Vec<StreamItem> = text_item(chunk.get("content")).into_iter().collect();
    if chunk.get("stop").and_then(Value::as_bool) == Some(true) {
        items.push(StreamItem::Finish(llama_finish_reason(chunk)));
        let timings = chunk.get("timings");
        let prompt =
            count(chunk, "tokens_evaluated").or_else(|| timings.and_then(|t| count(t, "prompt_n")));
        let completion = count(chunk, "tokens_predicted")
            .or_else(|| timings.and_then(|t| count(t, "predicted_n")));
        items.extend(usage_item(prompt, completion, None));
        items.push(StreamItem::Done);
    }
    items
}

/// llama.cpp's `stop_type` in OpenAI terms (older builds: `stopped_limit`).
fn llama_finish_reason(chunk: &Value) -> String {
    let reason = match chunk.get("stop_type").and_then(Value::as_str) {
        Some("eos" | "word") => "stop",
        Some("limit") => "length",
        Some(other) if !other.is_empty() => other,
        _ if chunk.get("stopped_limit").and_then(Value::as_bool) == Some(true) => "length",
        _ => "stop",
    };
    reason.to_owned()
}

#[cfg(test)]
mod tests {
    use super::super::stream::testkit::{assert_split_invariant, fuzz};
    use super::super::stream::{decode_all, Transcript};
    use super::*;
    use StreamItem::{Done, Error, Finish, Text};

    /// vLLM `/v1/chat/completions`, `stream_options.include_usage`, with a reasoning parser.
    const VLLM_CHAT: &[u8] = concat!(
        r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"reasoning_content":"Greet them."},"logprobs":null,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":", wörld 🦀"},"logprobs":null,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":"stop","stop_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[],"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,"prompt_tokens_details":null}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    )
    .as_bytes();

    /// vLLM `/v1/completions`, stopped by `max_tokens`.
    const VLLM_COMPLETIONS: &[u8] = concat!(
        r#"data: {"id":"cmpl-3b2a91","object":"text_completion","created":1718000100,"model":"meta-llama/Llama-3.2-1B","choices":[{"index":0,"text":" Paris","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"cmpl-3b2a91","object":"text_completion","created":1718000100,"model":"meta-llama/Llama-3.2-1B","choices":[{"index":0,"text":" is","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"cmpl-3b2a91","object":"text_completion","created":1718000100,"model":"meta-llama/Llama-3.2-1B","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"cmpl-3b2a91","object":"text_completion","created":1718000100,"model":"meta-llama/Llama-3.2-1B","choices":[],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    )
    .as_bytes();

    /// llama.cpp `POST /completion` with `stream: true`, stopped by `n_predict`,
    /// as llama-server sends it (scripts/real-engine.sh: LF line ends, token
    /// ids in `tokens`, the last event with the settings and timings).
    const LLAMA_NATIVE: &[u8] = concat!(
        r#"data: {"index":0,"content":" Once","tokens":[9038],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":6}"#,
        "\n\n",
        r#"data: {"index":0,"content":" upon","tokens":[2402],"stop":false,"id_slot":-1,"tokens_predicted":2,"tokens_evaluated":6}"#,
        "\n\n",
        r#"data: {"index":0,"content":"","tokens":[],"id_slot":1,"stop":true,"model":"/models/SmolLM2-135M-Instruct.Q4_1.gguf","tokens_predicted":2,"tokens_evaluated":6,"generation_settings":{"n_predict":2,"seed":4294967295,"temperature":0.800000011920929},"prompt":"Tell me a story","has_new_line":false,"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":7,"timings":{"cache_n":0,"prompt_n":6,"prompt_ms":31.2,"prompt_per_token_ms":5.2,"prompt_per_second":192.3,"predicted_n":2,"predicted_ms":40.5,"predicted_per_token_ms":20.25,"predicted_per_second":49.4}}"#,
        "\n\n",
    )
    .as_bytes();

    fn chat() -> SseDecoder {
        SseDecoder::new(SseDialect::OpenAiChat)
    }

    fn decode(dialect: SseDialect, wire: &[u8]) -> Vec<StreamItem> {
        assert_split_invariant(|| SseDecoder::new(dialect), wire)
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64, total_tokens: u64) -> StreamItem {
        StreamItem::Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
        }
    }

    #[test]
    fn vllm_chat() {
        // Each content delta is its own item, however the bytes were cut.
        let items = decode(SseDialect::OpenAiChat, VLLM_CHAT);
        assert_eq!(
            items,
            [
                Text("Hello".into()),
                Text(", wörld 🦀".into()),
                Text("!".into()),
                Finish("stop".into()),
                usage(12, 7, 19),
                Done
            ]
        );
    }

    #[test]
    fn vllm_completions() {
        let items = decode(SseDialect::OpenAiCompletions, VLLM_COMPLETIONS);
        assert_eq!(
            items,
            [
                Text(" Paris".into()),
                Text(" is".into()),
                Text(" the".into()),
                Finish("length".into()),
                usage(5, 3, 8),
                Done
            ]
        );
    }

    #[test]
    fn llama_cpp_native() {
        let items = decode(SseDialect::LlamaCppNative, LLAMA_NATIVE);
        assert_eq!(
            items,
            [
                Text(" Once".into()),
                Text(" upon".into()),
                Finish("length".into()),
                usage(6, 2, 8),
                Done
            ]
        );
    }

    #[test]
    fn llama_cpp_stop_types() {
        let finish = |chunk: &str| {
            decode(
                SseDialect::LlamaCppNative,
                format!("data: {chunk}\n\n").as_bytes(),
            )
        };
        let stop = |reason: &str| vec![Finish(reason.into()), Done];
        assert_eq!(
            finish(r#"{"content":"","stop":true,"stop_type":"eos"}"#),
            stop("stop")
        );
        assert_eq!(
            finish(r#"{"content":"","stop":true,"stop_type":"word","stopping_word":"\n"}"#),
            stop("stop")
        );
        assert_eq!(
            finish(r#"{"content":"","stop":true,"stop_type":"none"}"#),
            stop("none")
        );
        assert_eq!(finish(r#"{"content":"","stop":true}"#), stop("stop"));
        assert_eq!(
            finish(r#"{"content":"","stop":true,"stopped_limit":true}"#),
            stop("length")
        );
        assert_eq!(
            finish(r#"{"content":"x","stop":true,"timings":{"prompt_n":3,"predicted_n":1}}"#),
            [
                Text("x".into()),
                Finish("stop".into()),
                usage(3, 1, 4),
                Done
            ]
        );
    }

    #[test]
    fn every_line_ending_decodes_alike() {
        let lf = std::str::from_utf8(VLLM_CHAT).unwrap();
        let expected = decode(SseDialect::OpenAiChat, VLLM_CHAT);
        for ending in ["\r\n", "\r"] {
            let wire = lf.replace('\n', ending);
            assert_eq!(
                decode(SseDialect::OpenAiChat, wire.as_bytes()),
                expected,
                "{ending:?}"
            );
        }
    }

    #[test]
    fn crlf_split_across_reads_is_one_line_end() {
        // Were the LF a second line end, the blank line would dispatch `{"content":` alone.
        let mut d = SseDecoder::new(SseDialect::LlamaCppNative);
        assert_eq!(d.feed(b"data: {\"content\":\r"), []);
        assert_eq!(d.feed(b"\ndata: \"hi\"}\r"), []);
        assert_eq!(d.feed(b"\n\r"), [Text("hi".into())]);
        assert_eq!(d.feed(b"\n"), []);
        assert_eq!(d.finish(), []);
    }

    #[test]
    fn comments_and_other_fields_are_ignored() {
        let wire = concat!(
            ": ping\n\n",
            ":\n",
            "event: message\nid: 7\nretry: 3000\nfoo\n",
            r#"data: {"choices":[{"delta":{"content":"a"}}]}"#,
            "\n: keep-alive inside an event\n\n",
            ": ping\r\n\r\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            decode(SseDialect::OpenAiChat, wire.as_bytes()),
            [Text("a".into()), Done]
        );
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let wire = "data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"hi\"}}]}\n\n";
        assert_eq!(
            decode(SseDialect::OpenAiChat, wire.as_bytes()),
            [Text("hi".into())]
        );
        let wire = "data: \"not\ndata: json\n\n";
        assert_eq!(
            decode(SseDialect::OpenAiChat, wire.as_bytes()),
            [Error(
                "engine sent invalid JSON in stream: \"not\njson".into()
            )]
        );
    }

    #[test]
    fn field_value_loses_exactly_one_leading_space() {
        assert_eq!(split_field("data:x"), ("data", "x"));
        assert_eq!(split_field("data: x"), ("data", "x"));
        assert_eq!(split_field("data:  x"), ("data", " x"));
        assert_eq!(split_field("data: a: b"), ("data", "a: b"));
        assert_eq!(split_field("data"), ("data", ""));
        assert_eq!(split_field(": ping"), ("", "ping"));
        let wire = "data:{\"choices\":[{\"text\":\" spaced \"}]}\n\ndata:[DONE]\n\n";
        assert_eq!(
            decode(SseDialect::OpenAiCompletions, wire.as_bytes()),
            [Text(" spaced ".into()), Done]
        );
    }

    #[test]
    fn empty_data_events_are_skipped() {
        assert_eq!(
            decode(SseDialect::OpenAiChat, b"data:\n\ndata\n\ndata: \n\n\n\n"),
            []
        );
    }

    #[test]
    fn leading_bom_is_stripped() {
        assert_eq!(
            decode(SseDialect::OpenAiChat, b"\xEF\xBB\xBFdata: [DONE]\n\n"),
            [Done]
        );
    }

    #[test]
    fn engine_errors() {
        let vllm = concat!(
            r#"data: {"choices":[{"delta":{"content":"par"}}]}"#,
            "\n\n",
            r#"data: {"error":{"object":"error","message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}}"#,
            "\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            decode(SseDialect::OpenAiChat, vllm.as_bytes()),
            [Text("par".into()), Error("CUDA out of memory".into()), Done]
        );
        assert_eq!(
            decode(
                SseDialect::OpenAiCompletions,
                b"data: {\"error\":\"boom\"}\n\n"
            ),
            [Error("boom".into())]
        );
        // llama.cpp sends streaming errors in a non-standard `error:` field.
        let llama = concat!(
            r#"error: {"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}"#,
            "\n\n",
        );
        assert_eq!(
            decode(SseDialect::LlamaCppNative, llama.as_bytes()),
            [Error(
                "the request exceeds the available context size, try increasing it".into()
            )]
        );
        assert_eq!(
            decode(SseDialect::LlamaCppNative, b"error: plain text\n\n"),
            [Error("plain text".into())]
        );
    }

    #[test]
    fn invalid_json_is_an_error_not_a_panic() {
        let long = format!("data: {{\"choices\": {}\n\n", "x".repeat(500));
        let items = decode(SseDialect::OpenAiChat, long.as_bytes());
        let expected = format!(
            "engine sent invalid JSON in stream: {{\"choices\": {}",
            "x".repeat(188)
        );
        assert_eq!(items, [Error(expected)]);
        // Invalid UTF-8 is replaced, not fatal.
        assert_eq!(
            decode(
                SseDialect::LlamaCppNative,
                b"data: {\"content\":\"a\xFFb\"}\n\n"
            ),
            [Text("a\u{FFFD}b".into())]
        );
    }

    #[test]
    fn finish_dispatches_an_unterminated_event() {
        assert_eq!(decode(SseDialect::OpenAiChat, b"data: [DONE]"), [Done]);
        assert_eq!(decode(SseDialect::OpenAiChat, b"data: [DONE]\n"), [Done]);
        assert_eq!(
            decode(
                SseDialect::OpenAiChat,
                b"data: {\"choices\":[{\"delta\":{\"content\":\"tr"
            ),
            [Error(
                "engine sent invalid JSON in stream: {\"choices\":[{\"delta\":{\"content\":\"tr"
                    .into()
            )]
        );
    }

    #[test]
    fn input_after_done_is_ignored() {
        let mut wire = LLAMA_NATIVE.to_vec();
        wire.extend_from_slice(b"data: [DONE]\n\ndata: {\"content\":\"late\"}\n\ngarbage");
        let items = decode(SseDialect::LlamaCppNative, &wire);
        let t = Transcript::from_items(&items);
        assert_eq!(
            (
                t.content.as_str(),
                t.done,
                items.iter().filter(|i| **i == Done).count()
            ),
            (" Once upon", true, 1)
        );
    }

    #[test]
    fn transcript_of_a_chat_stream() {
        let t = Transcript::from_items(&decode_all(&mut chat(), &[VLLM_CHAT]));
        assert_eq!(
            t,
            Transcript {
                content: "Hello, wörld 🦀!".into(),
                finish_reason: Some("stop".into()),
                usage: Some((12, 7, 19)),
                error: None,
                done: true,
            }
        );
    }

    #[test]
    fn whole_answers_decode_like_streams() {
        let chat = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi!","reasoning_content":"hm"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;
        assert_eq!(
            decode_response(SseDialect::OpenAiChat, chat.as_bytes()),
            [
                Text("Hi!".into()),
                Finish("stop".into()),
                usage(9, 2, 11),
                Done
            ]
        );
        let completion = r#"{"choices":[{"index":0,"text":" Paris","finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
        assert_eq!(
            decode_response(SseDialect::OpenAiCompletions, completion.as_bytes()),
            [
                Text(" Paris".into()),
                Finish("length".into()),
                usage(5, 1, 6),
                Done
            ]
        );
        let native = r#"{"content":" Once","stop":true,"stop_type":"eos","tokens_predicted":1,"tokens_evaluated":4}"#;
        assert_eq!(
            decode_response(SseDialect::LlamaCppNative, native.as_bytes()),
            [
                Text(" Once".into()),
                Finish("stop".into()),
                usage(4, 1, 5),
                Done
            ]
        );
        assert_eq!(
            decode_response(SseDialect::OpenAiChat, br#"{"error":{"message":"no"}}"#),
            [Error("no".into())]
        );
        assert_eq!(
            decode_response(SseDialect::OpenAiChat, b""),
            [Error("engine sent an empty answer".into())]
        );
    }

    #[test]
    fn a_line_or_event_past_the_limit_is_an_error_and_ends_decoding() {
        let limit = 16;
        let new = || SseDecoder::with_max_line(SseDialect::LlamaCppNative, limit);
        let ok = b"data: \"a\"\n\n"; // well inside
        assert_eq!(assert_split_invariant(new, ok), []);
        let long_line = b"data: {\"content\":\"a\"}\n\n";
        assert_eq!(
            assert_split_invariant(new, long_line),
            [line_too_long(limit)]
        );
        // Short lines, but one event's data grows past the limit.
        let long_event = b": c\ndata: 123456\ndata: 123456\ndata: 123456\n\ndata: [DONE]\n\n";
        assert_eq!(
            assert_split_invariant(new, long_event),
            [line_too_long(limit)]
        );
        let mut d = new();
        assert_eq!(d.feed(&[b'x'; 16]), []);
        assert_eq!(d.feed(b"x"), [line_too_long(limit)]);
        assert_eq!(d.feed(&[b'x'; 100]), []);
        assert_eq!(d.finish(), []);
        assert!(d.line.capacity() <= limit);
    }

    #[test]
    fn fuzz_never_panics_and_ignores_chunking() {
        let corpus = [VLLM_CHAT, VLLM_COMPLETIONS, LLAMA_NATIVE];
        let dialects = [
            SseDialect::OpenAiChat,
            SseDialect::OpenAiCompletions,
            SseDialect::LlamaCppNative,
        ];
        for (seed, dialect) in (1..).zip(dialects) {
            fuzz(|| SseDecoder::new(dialect), &corpus, seed, 10_000);
        }
    }
}
