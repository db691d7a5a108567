//! The fast path of the stream decoders: the common token chunk of each
//! SSE dialect and of Ollama's NDJSON read into a typed, borrowing view (no
//! `Value` tree: the text is borrowed from the event unless it has
//! escapes), for the one case that is every token but the last: some text,
//! no error, no finish, no usage. Anything else — a finish reason, usage,
//! an error, a field of a type the view does not expect — answers `None`,
//! and the caller decodes the chunk through the `Value` path as before. The
//! items are those of the `Value` path (a property test in proptests.rs
//! checks it), except for a token chunk whose unread fields no `Value` can
//! hold (a number beyond f64, a lone surrogate escape): the `Value` path
//! calls it invalid JSON, this one reads its text.

use super::sse::SseDialect;
use super::stream::StreamItem;
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::borrow::Cow;

#[derive(Deserialize)]
struct OpenAiChunk<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(borrow, default)]
    object: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Message<'a>>,
    #[serde(default)]
    message: Option<IgnoredAny>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// Ollama's NDJSON line (`/api/generate`: `response`; `/api/chat`:
/// `message.content`). `response` tells absent (then `message` counts)
/// from null (then nothing does).
#[derive(Deserialize)]
struct OllamaLine<'a> {
    #[serde(default, deserialize_with = "present")]
    response: Option<Option<Cow<'a, str>>>,
    #[serde(borrow, default)]
    message: Option<Message<'a>>,
    #[serde(default)]
    done: Option<bool>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(borrow, default)]
    object: Option<Cow<'a, str>>,
}

/// A field that is there, even as null.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct LlamaChunk<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    stop: Option<bool>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(borrow, default)]
    object: Option<Cow<'a, str>>,
}

/// The items of the chunk `data` when it is a plain token chunk (text or
/// nothing, and nothing else); `None` when it is anything else.
pub fn plain_items(dialect: SseDialect, data: &str) -> Option<Vec<StreamItem>> {
    let text = match dialect {
        SseDialect::OpenAiChat | SseDialect::OpenAiCompletions => {
            let c: OpenAiChunk = serde_json::from_str(data).ok()?;
            if c.usage.is_some() || says_error(&c.error, &c.object) {
                return None;
            }
            match c.choices.as_deref() {
                None | Some([]) => None,
                Some([first, ..]) => {
                    if first.finish_reason.is_some() {
                        return None;
                    }
                    if dialect == SseDialect::OpenAiChat {
                        // `message` (a whole answer) only counts without `delta`.
                        if first.delta.is_none() && first.message.is_some() {
                            return None;
                        }
                        first.delta.as_ref().and_then(|d| d.content.clone())
                    } else {
                        first.text.clone()
                    }
                }
            }
        }
        SseDialect::LlamaCppNative => {
            let c: LlamaChunk = serde_json::from_str(data).ok()?;
            if c.stop == Some(true) || says_error(&c.error, &c.object) {
                return None;
            }
            c.content
        }
    };
    Some(text_items(text))
}

/// The items of the NDJSON `line` (Ollama) when it is a plain token line
/// (text or nothing, not done, no error); `None` when it is anything else.
pub fn plain_ndjson_items(line: &str) -> Option<Vec<StreamItem>> {
    let c: OllamaLine = serde_json::from_str(line).ok()?;
    if c.done == Some(true) || says_error(&c.error, &c.object) {
        return None;
    }
    let text = match c.response {
        Some(response) => response,
        None => c.message.and_then(|m| m.content),
    };
    Some(text_items(text))
}

/// Whether a chunk reports an error, as `stream::error_message` reads it:
/// an `error` that is not null, or `"object": "error"`.
fn says_error(error: &Option<IgnoredAny>, object: &Option<Cow<'_, str>>) -> bool {
    error.is_some() || object.as_deref() == Some("error")
}

fn text_items(text: Option<Cow<'_, str>>) -> Vec<StreamItem> {
    text.filter(|t| !t.is_empty())
        .map(|t| StreamItem::Text(t.into_owned()))
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_chunk_is_read_without_the_value_path() {
        let chat = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"He\"llo"},"logprobs":null,"finish_reason":null}]}"#;
        assert_eq!(
            plain_items(SseDialect::OpenAiChat, chat),
            Some(vec![StreamItem::Text("He\"llo".into())])
        );
        let text = r#"{"choices":[{"index":0,"text":"x","finish_reason":null}],"usage":null}"#;
        assert_eq!(
            plain_items(SseDialect::OpenAiCompletions, text),
            Some(vec![StreamItem::Text("x".into())])
        );
        let llama = r#"{"content":"y","stop":false,"id_slot":0}"#;
        assert_eq!(
            plain_items(SseDialect::LlamaCppNative, llama),
            Some(vec![StreamItem::Text("y".into())])
        );
        let empty = r#"{"choices":[{"delta":{"content":""}}]}"#;
        assert_eq!(plain_items(SseDialect::OpenAiChat, empty), Some(vec![]));
        let generate = r#"{"model":"m","response":"The","done":false}"#;
        let chat = r#"{"message":{"role":"assistant","content":"Hi","thinking":"t"},"done":false}"#;
        let null = r#"{"response":null,"message":{"content":"not this"}}"#;
        for (line, want) in [
            (generate, vec![StreamItem::Text("The".into())]),
            (chat, vec![StreamItem::Text("Hi".into())]),
            (null, vec![]),
        ] {
            assert_eq!(plain_ndjson_items(line), Some(want), "{line}");
        }
    }

    #[test]
    fn anything_but_a_plain_token_goes_the_value_way() {
        for (dialect, data) in [
            (
                SseDialect::OpenAiChat,
                r#"{"choices":[{"delta":{"content":"a"},"finish_reason":"stop"}]}"#,
            ),
            (
                SseDialect::OpenAiChat,
                r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
            ),
            (SseDialect::OpenAiChat, r#"{"error":{"message":"boom"}}"#),
            (
                SseDialect::OpenAiChat,
                r#"{"object":"error","message":"boom"}"#,
            ),
            (
                SseDialect::OpenAiChat,
                r#"{"choices":[{"message":{"content":"whole"}}]}"#,
            ),
            (
                SseDialect::OpenAiChat,
                r#"{"choices":[{"delta":{"content":7}}]}"#,
            ),
            (SseDialect::OpenAiChat, r#"{"choices":{"0":{}}}"#),
            (SseDialect::OpenAiChat, r#"{"choices":[null]}"#),
            (
                SseDialect::OpenAiChat,
                r#"{"choices":[{"delta":{}}],"choices":[]}"#,
            ),
            (SseDialect::OpenAiChat, r#""just text""#),
            (
                SseDialect::OpenAiChat,
                r#"{"choices":[{"delta":{"content":"a"}}"#,
            ),
            (SseDialect::LlamaCppNative, r#"{"content":"a","stop":true}"#),
            (SseDialect::LlamaCppNative, r#"{"content":"a","stop":"no"}"#),
            (SseDialect::LlamaCppNative, r#"{"error":"x"}"#),
        ] {
            assert_eq!(plain_items(dialect, data), None, "{data}");
        }
        for line in [
            r#"{"response":"","done":true,"done_reason":"stop","eval_count":4}"#,
            r#"{"error":"boom"}"#,
            r#"{"response":7}"#,
            r#"{"message":"text"}"#,
        ] {
            assert_eq!(plain_ndjson_items(line), None, "{line}");
        }
    }
}
