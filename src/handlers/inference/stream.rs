//! Shared vocabulary of the inference stream decoders: the items they yield
//! ([`StreamItem`]), the [`Decoder`] trait that the SSE and NDJSON decoders
//! implement, a pure accumulator ([`Transcript`]) and the small JSON helpers
//! both wire formats use.
//!
//! Pure parsing: no I/O, no clocks, no logging. Callers own the sockets.

use serde_json::Value;

/// What a decoder found in the bytes fed so far.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A piece of generated text (never empty).
    Text(String),
    /// The engine said why it stopped (e.g. "stop", "length").
    Finish(String),
    /// Token counts reported by the engine.
    Usage {
        prompt_tokens: u64,
        completion_tokens: u64,
        total_tokens: u64,
    },
    /// The engine reported an error inside a 200 stream.
    Error(String),
    /// The stream is complete (SSE `[DONE]`, llama.cpp `stop:true`, Ollama `done:true`).
    Done,
}

/// An incremental decoder of one response body.
///
/// Bytes may be split anywhere (mid-line, mid-UTF-8 character): the items
/// returned never depend on how the body was chunked, except that adjacent
/// `Text` items may be split differently. After `Done` further input is ignored.
pub trait Decoder {
    /// Consumes the next bytes of the body and returns the items they completed.
    fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem>;
    /// Signals end of body and returns what an unterminated last line or event held.
    fn finish(&mut self) -> Vec<StreamItem>;
}

/// The longest line (or SSE event) a decoder buffers: an engine that never
/// sends a line end must not grow memory without bound.
pub const MAX_LINE: usize = 1 << 20;

/// The error a decoder reports, once, when a line grows past its limit; it
/// then ignores the rest of the body.
pub fn line_too_long(limit: usize) -> StreamItem {
    StreamItem::Error(format!(
        "engine sent more than {limit} bytes without a line end; stream abandoned"
    ))
}

/// Feeds every chunk, then finishes: the items of a whole body.
#[cfg(test)]
pub fn decode_all(decoder: &mut impl Decoder, chunks: &[&[u8]]) -> Vec<StreamItem> {
    let mut items: Vec<StreamItem> = chunks.iter().flat_map(|c| decoder.feed(c)).collect();
    items.extend(decoder.finish());
    items
}

/// Everything a stream said, folded together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    pub content: String,
    pub finish_reason: Option<String>,
    /// `(prompt, completion, total)` tokens; the last report wins.
    pub usage: Option<(u64, u64, u64)>,
    /// The first error reported (later ones are usually its consequences).
    pub error: Option<String>,
    pub done: bool,
}

impl Transcript {
    pub fn apply(&mut self, item: &StreamItem) {
        match item {
            StreamItem::Text(text) => self.content.push_str(text),
            StreamItem::Finish(reason) => self.finish_reason = Some(reason.clone()),
            StreamItem::Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens,
            } => self.usage = Some((*prompt_tokens, *completion_tokens, *total_tokens)),
            StreamItem::Error(message) => {
                self.error.get_or_insert_with(|| message.clone());
            }
            StreamItem::Done => self.done = true,
        }
    }

    pub fn from_items(items: &[StreamItem]) -> Self {
        let mut transcript = Self::default();
        items.iter().for_each(|item| transcript.apply(item));
        transcript
    }
}

/// Parses one event's data or one line; invalid JSON becomes the error item to report.
pub fn parse_json(text: &str) -> Result<Value, StreamItem> {
    serde_json::from_str(text).map_err(|_| {
        let head: String = text.chars().take(200).collect();
        StreamItem::Error(format!("engine sent invalid JSON in stream: {head}"))
    })
}

/// The engine's error message, if `v` reports one: `{"error": "…"}`,
/// `{"error": {"message": "…"}}`, or older vLLM's top-level
/// `{"object": "error", "message": "…"}`.
pub fn error_message(v: &Value) -> Option<String> {
    match v.get("error") {
        Some(error) if !error.is_null() => Some(describe_error(error)),
        _ if v.get("object").and_then(Value::as_str) == Some("error") => Some(describe_error(v)),
        _ => None,
    }
}

/// A readable message from an error value: a string, or an object's `message`.
pub fn describe_error(error: &Value) -> String {
    let message = match error {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("message").and_then(Value::as_str) {
            Some(m) => m.to_owned(),
            None => error.to_string(),
        },
        other => other.to_string(),
    };
    if message.is_empty() {
        "engine reported an error without a message".to_owned()
    } else {
        message
    }
}

/// `Text` for a non-empty JSON string; nothing for null, "", or any other type.
pub fn text_item(v: Option<&Value>) -> Option<StreamItem> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| StreamItem::Text(s.to_owned()))
}

/// `v[key]` as an unsigned count.
pub fn count(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// `Usage` when the engine reported at least one of the two counts; the total
/// is the engine's own when given, else their sum.
pub fn usage_item(
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
) -> Option<StreamItem> {
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    let (prompt_tokens, completion_tokens) = (prompt.unwrap_or(0), completion.unwrap_or(0));
    Some(StreamItem::Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: total.unwrap_or(prompt_tokens.saturating_add(completion_tokens)),
    })
}

/// Helpers for the decoders' tests: chunking-invariance checks and a fuzzer.
///
/// Items are compared one by one, never with adjacent texts merged: each
/// `Text` is a chunk event of the job, so a split that lost one chunk at a
/// boundary and repeated another (or cut one in two) must show, even when
/// the text put together is the same.
#[cfg(test)]
pub mod testkit {
    use super::{decode_all, Decoder, StreamItem};

    /// Checks the contract every decoder output must meet, whatever the input.
    pub fn assert_well_formed(items: &[StreamItem]) {
        for (i, item) in items.iter().enumerate() {
            assert_ne!(
                item,
                &StreamItem::Text(String::new()),
                "empty Text in {items:?}"
            );
            if item == &StreamItem::Done {
                assert_eq!(i + 1, items.len(), "items after Done in {items:?}");
            }
        }
    }

    /// Decodes `wire` in one piece, in two pieces split at every byte position,
    /// and byte by byte; all must give the same items, one by one. Returns them.
    pub fn assert_split_invariant<D: Decoder>(new: impl Fn() -> D, wire: &[u8]) -> Vec<StreamItem> {
        let whole = decode_all(&mut new(), &[wire]);
        assert_well_formed(&whole);
        for at in 0..=wire.len() {
            let (a, b) = wire.split_at(at);
            let split = decode_all(&mut new(), &[a, b]);
            assert_eq!(split, whole, "split at byte {at}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&mut new(), &bytes), whole, "byte by byte");
        whole
    }

    /// Deterministic xorshift64 generator.
    pub struct XorShift(u64);

    impl XorShift {
        pub fn new(seed: u64) -> Self {
            Self(seed.max(1))
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform-ish in `0..n` (n > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub const TOKENS: &[&[u8]] = &[
        b"data:",
        b"data: ",
        b"error: ",
        b": ping",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"[DONE]",
        b"{",
        b"}",
        b"\"",
        b":",
        b",",
        b"{\"content\":\"x\",\"stop\":true}",
        b"{\"choices\":[{\"delta\":{\"content\":\"y\"},\"text\":\"z\"}]}",
        b"{\"response\":\"r\",\"done\":true,\"eval_count\":1}",
        b"{\"error\":\"e\"}",
        b"\xE2\x82",
        b"\xAC",
        b"\xF0\x9F\xA6\x80",
        b"\xFF",
        b"\xEF\xBB\xBF",
    ];

    /// One random input: token soup, a splice of corpus slices, or a mutated corpus entry.
    fn random_input(rng: &mut XorShift, corpus: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        match rng.below(3) {
            0 => {
                for _ in 0..rng.below(40) {
                    if rng.below(4) == 0 {
                        out.push(rng.next_u64() as u8);
                    } else {
                        out.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
                    }
                }
            }
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let src = corpus[rng.below(corpus.len())];
                    let start = rng.below(src.len() + 1);
                    let end = start + rng.below(src.len() - start + 1);
                    out.extend_from_slice(&src[start..end]);
                }
            }
            _ => {
                out.extend_from_slice(corpus[rng.below(corpus.len())]);
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(out.len() + 1);
                    match rng.below(3) {
                        0 if at < out.len() => out[at] = rng.next_u64() as u8,
                        1 if at < out.len() => drop(out.remove(at)),
                        _ => out.insert(at, TOKENS[rng.below(TOKENS.len())][0]),
                    }
                }
            }
        }
        out
    }

    /// Feeds `rounds` random inputs, each whole and in random chunks: no panic,
    /// well-formed output, and chunking never changes the items.
    pub fn fuzz<D: Decoder>(new: impl Fn() -> D, corpus: &[&[u8]], seed: u64, rounds: usize) {
        let mut rng = XorShift::new(seed);
        for round in 0..rounds {
            let input = random_input(&mut rng, corpus);
            let whole = decode_all(&mut new(), &[&input]);
            assert_well_formed(&whole);
            let mut chunks = Vec::new();
            let mut rest = input.as_slice();
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(1 + rng.below(rest.len().min(16)));
                chunks.push(chunk);
                rest = tail;
            }
            let chunked = decode_all(&mut new(), &chunks);
            assert_eq!(
                chunked,
                whole,
                "round {round}, input {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn transcript_folds_items() {
        let t = Transcript::from_items(&[
            StreamItem::Text("Hel".into()),
            StreamItem::Text("lo".into()),
            StreamItem::Error("first".into()),
            StreamItem::Error("second".into()),
            StreamItem::Finish("length".into()),
            StreamItem::Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
            },
            StreamItem::Usage {
                prompt_tokens: 4,
                completion_tokens: 5,
                total_tokens: 9,
            },
            StreamItem::Done,
        ]);
        assert_eq!(
            t,
            Transcript {
                content: "Hello".into(),
                finish_reason: Some("length".into()),
                usage: Some((4, 5, 9)),
                error: Some("first".into()),
                done: true,
            }
        );
    }

    #[test]
    fn error_shapes() {
        assert_eq!(
            error_message(&json!({"error": "boom"})),
            Some("boom".into())
        );
        assert_eq!(
            error_message(&json!({"error": {"message": "bad", "code": 400}})),
            Some("bad".into())
        );
        assert_eq!(
            error_message(&json!({"error": {"code": 500}})),
            Some(r#"{"code":500}"#.into())
        );
        assert_eq!(
            error_message(&json!({"object": "error", "message": "old vllm", "code": 400})),
            Some("old vllm".into())
        );
        assert_eq!(
            error_message(&json!({"error": ""})),
            Some("engine reported an error without a message".into())
        );
        assert_eq!(error_message(&json!({"error": null, "content": "x"})), None);
        assert_eq!(
            error_message(&json!({"object": "chat.completion.chunk"})),
            None
        );
    }

    #[test]
    fn invalid_json_is_reported_with_the_first_200_chars() {
        let garbage = "é".repeat(300);
        let Err(StreamItem::Error(message)) = parse_json(&garbage) else {
            panic!("expected an error")
        };
        assert_eq!(
            message,
            format!("engine sent invalid JSON in stream: {}", "é".repeat(200))
        );
    }

    #[test]
    fn usage_needs_one_count_and_sums_when_no_total() {
        assert_eq!(usage_item(None, None, Some(3)), None);
        assert_eq!(
            usage_item(Some(2), None, None),
            Some(StreamItem::Usage {
                prompt_tokens: 2,
                completion_tokens: 0,
                total_tokens: 2
            })
        );
        assert_eq!(
            usage_item(Some(u64::MAX), Some(1), None),
            Some(StreamItem::Usage {
                prompt_tokens: u64::MAX,
                completion_tokens: 1,
                total_tokens: u64::MAX
            })
        );
    }
}
