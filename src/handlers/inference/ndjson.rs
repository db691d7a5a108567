//! Decoder of Ollama's newline-delimited JSON streams (`/api/generate` and
//! `/api/chat`): owns the line framing and the mapping of each JSON line to
//! [`StreamItem`]s.
//!
//! Pure parsing: no I/O. Bytes are buffered, not chars, so a read may end
//! inside a UTF-8 character.

use serde_json::Value;

use super::stream::{
    count, error_message, line_too_long, parse_json, text_item, usage_item, Decoder, StreamItem,
    MAX_LINE,
};

/// Incremental NDJSON decoder: one JSON object per `\n`-terminated line.
#[derive(Debug)]
pub struct NdjsonDecoder {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// Longest line accepted ([`MAX_LINE`]).
    max_line: usize,
    /// `Done` was seen, or the line limit was passed: the rest is ignored.
    done: bool,
}

impl Default for NdjsonDecoder {
    fn default() -> Self {
        Self::with_max_line(MAX_LINE)
    }
}

impl NdjsonDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            max_line,
            done: false,
        }
    }

    /// Appends to the current line; false (and an error item) past the limit.
    fn extend_line(&mut self, bytes: &[u8], out: &mut Vec<StreamItem>) -> bool {
        if self.line.len() + bytes.len() > self.max_line {
            self.line = Vec::new();
            self.done = true;
            out.push(line_too_long(self.max_line));
            return false;
        }
        self.line.extend_from_slice(bytes);
        true
    }

    /// Consumes the next bytes of the body and returns the items they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !self.done {
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                self.extend_line(rest, &mut out);
                break;
            };
            if !self.extend_line(&rest[..end], &mut out) {
                break;
            }
            rest = &rest[end + 1..];
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, &mut out);
        }
        out
    }

    /// Ends the body: a last line without its `\n` is decoded.
    pub fn finish(&mut self) -> Vec<StreamItem> {
        let mut out = Vec::new();
        let line = std::mem::take(&mut self.line);
        if !self.done {
            self.on_line(&line, &mut out);
        }
        out
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<StreamItem>) {
        let items = decode_line(line);
        self.done = items.last() == Some(&StreamItem::Done);
        out.extend(items);
    }
}

impl Decoder for NdjsonDecoder {
    fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        NdjsonDecoder::feed(self, bytes)
    }

    fn finish(&mut self) -> Vec<StreamItem> {
        NdjsonDecoder::finish(self)
    }
}

/// The items of one line; `Done`, if any, is last.
fn decode_line(line: &[u8]) -> Vec<StreamItem> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim(); // also drops the `\r` of a CRLF line end
    if line.is_empty() {
        return Vec::new();
    }
    match super::chunk::plain_ndjson_items(line) {
        Some(items) => items,
        None => value_items(line),
    }
}

/// The items of one (trimmed, non-empty) line, read through a `Value`:
/// every shape, where `chunk::plain_ndjson_items` reads only the common one.
pub(super) fn value_items(line: &str) -> Vec<StreamItem> {
    let chunk = match parse_json(line) {
        Ok(chunk) => chunk,
        Err(error) => return vec![error],
    };
    if let Some(message) = error_message(&chunk) {
        return vec![StreamItem::Error(message)];
    }
    // `response` for /api/generate, `message.content` for /api/chat; `thinking` is not output.
    let text = chunk
        .get("response")
        .or_else(|| chunk.get("message").and_then(|m| m.get("content")));
    let mut items: Vec<StreamItem> = text_item(text).into_iter().collect();
    if chunk.get("done").and_then(Value::as_bool) == Some(true) {
        let reason = chunk
            .get("done_reason")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty());
        items.push(StreamItem::Finish(reason.unwrap_or("stop").to_owned()));
        items.extend(usage_item(
            count(&chunk, "prompt_eval_count"),
            count(&chunk, "eval_count"),
            None,
        ));
        items.push(StreamItem::Done);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::super::stream::testkit::{assert_split_invariant, fuzz};
    use super::super::stream::Transcript;
    use super::*;
    use StreamItem::{Done, Error, Finish, Text};

    /// `POST /api/generate`, stopped naturally.
    const OLLAMA_GENERATE: &[u8] = concat!(
        r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.512837Z","response":"The","done":false}"#,
        "\n",
        r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.534204Z","response":" sky","done":false}"#,
        "\n",
        r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.555921Z","response":" is blü 🌌","done":false}"#,
        "\n",
        r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.577410Z","response":"","done":true,"done_reason":"stop","context":[128006,9125,128007],"total_duration":5043500667,"load_duration":5025959,"prompt_eval_count":26,"prompt_eval_duration":325953000,"eval_count":4,"eval_duration":4709213000}"#,
        "\n",
    )
    .as_bytes();

    /// `POST /api/chat` with a thinking model, stopped by `num_predict`.
    const OLLAMA_CHAT: &[u8] = concat!(
        r#"{"model":"qwen3:0.6b","created_at":"2025-06-01T08:00:00.100Z","message":{"role":"assistant","content":"","thinking":"User says hi."},"done":false}"#,
        "\n",
        r#"{"model":"qwen3:0.6b","created_at":"2025-06-01T08:00:00.120Z","message":{"role":"assistant","content":"Hi"},"done":false}"#,
        "\n",
        r#"{"model":"qwen3:0.6b","created_at":"2025-06-01T08:00:00.140Z","message":{"role":"assistant","content":" there"},"done":false}"#,
        "\n",
        r#"{"model":"qwen3:0.6b","created_at":"2025-06-01T08:00:00.160Z","message":{"role":"assistant","content":""},"done_reason":"length","done":true,"total_duration":61000000,"load_duration":9000000,"prompt_eval_count":11,"prompt_eval_duration":12000000,"eval_count":3,"eval_duration":40000000}"#,
        "\n",
    )
    .as_bytes();

    /// `POST /api/generate` that fails after some output (no `done` line follows).
    const OLLAMA_ERROR: &[u8] = concat!(
        r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.512837Z","response":"Par","done":false}"#,
        "\n",
        r#"{"error":"an error was encountered while running the model: unexpected EOF"}"#,
        "\n",
    )
    .as_bytes();

    fn decode(wire: &[u8]) -> Vec<StreamItem> {
        assert_split_invariant(NdjsonDecoder::new, wire)
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64, total_tokens: u64) -> StreamItem {
        StreamItem::Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
        }
    }

    #[test]
    fn ollama_generate() {
        // Each line's text is its own item, however the bytes were cut.
        assert_eq!(
            decode(OLLAMA_GENERATE),
            [
                Text("The".into()),
                Text(" sky".into()),
                Text(" is blü 🌌".into()),
                Finish("stop".into()),
                usage(26, 4, 30),
                Done
            ]
        );
    }

    #[test]
    fn ollama_chat_skips_thinking() {
        assert_eq!(
            decode(OLLAMA_CHAT),
            [
                Text("Hi".into()),
                Text(" there".into()),
                Finish("length".into()),
                usage(11, 3, 14),
                Done
            ]
        );
    }

    #[test]
    fn ollama_error_after_output() {
        let items = decode(OLLAMA_ERROR);
        assert_eq!(
            items,
            [
                Text("Par".into()),
                Error("an error was encountered while running the model: unexpected EOF".into())
            ]
        );
        let t = Transcript::from_items(&items);
        assert_eq!(
            (t.content.as_str(), t.error.is_some(), t.done),
            ("Par", true, false)
        );
    }

    #[test]
    fn done_without_reason_or_counts() {
        assert_eq!(
            decode(b"{\"response\":\"x\",\"done\":true}\n"),
            [Text("x".into()), Finish("stop".into()), Done]
        );
        assert_eq!(
            decode(b"{\"done\":true,\"done_reason\":\"load\",\"eval_count\":2}\n"),
            [Finish("load".into()), usage(0, 2, 2), Done]
        );
    }

    #[test]
    fn crlf_and_blank_lines() {
        let wire = std::str::from_utf8(OLLAMA_CHAT)
            .unwrap()
            .replace('\n', "\r\n\r\n\n");
        assert_eq!(decode(wire.as_bytes()), decode(OLLAMA_CHAT));
    }

    #[test]
    fn last_line_without_newline_is_decoded_by_finish() {
        let wire = OLLAMA_GENERATE.strip_suffix(b"\n").unwrap();
        let mut d = NdjsonDecoder::new();
        let fed = d.feed(wire);
        assert!(!fed.contains(&Done));
        assert_eq!(d.finish().last(), Some(&Done));
        assert_eq!(decode(wire), decode(OLLAMA_GENERATE));
    }

    #[test]
    fn invalid_json_line_is_an_error() {
        assert_eq!(
            decode(b"{\"response\":\"a\",\"done\":false}\nnot json\n{\"response\":\"b\"}\n"),
            [
                Text("a".into()),
                Error("engine sent invalid JSON in stream: not json".into()),
                Text("b".into())
            ]
        );
        assert_eq!(
            decode(b"{\"response\":\"trunc"),
            [Error(
                "engine sent invalid JSON in stream: {\"response\":\"trunc".into()
            )]
        );
    }

    #[test]
    fn input_after_done_is_ignored() {
        let mut wire = OLLAMA_GENERATE.to_vec();
        wire.extend_from_slice(b"{\"response\":\"late\"}\n{broken");
        assert_eq!(decode(&wire), decode(OLLAMA_GENERATE));
    }

    #[test]
    fn a_line_past_the_limit_is_an_error_and_ends_decoding() {
        let limit = 16;
        let new = || NdjsonDecoder::with_max_line(limit);
        let ok = b"{\"response\":\"a\"}\n"; // 17 bytes with its \n: 16 without
        assert_eq!(assert_split_invariant(new, ok), [Text("a".into())]);
        let wire = b"{\"response\":\"a\"}\n{\"response\":\"bb\"}\n{\"response\":\"c\"}\n";
        assert_eq!(
            assert_split_invariant(new, wire),
            [Text("a".into()), line_too_long(limit)]
        );
        // A line end never comes: the buffer stops growing at the limit.
        let mut d = new();
        assert_eq!(d.feed(&[b'x'; 16]), []);
        assert_eq!(d.feed(b"x"), [line_too_long(limit)]);
        assert_eq!(d.feed(&[b'x'; 100]), []);
        assert_eq!(d.finish(), []);
        assert!(d.line.capacity() <= limit);
    }

    #[test]
    fn fuzz_never_panics_and_ignores_chunking() {
        fuzz(
            NdjsonDecoder::new,
            &[OLLAMA_GENERATE, OLLAMA_CHAT, OLLAMA_ERROR],
            7,
            10_000,
        );
    }
}
