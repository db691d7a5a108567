//! Property tests (proptest) of the stream decoders: arbitrary bytes, and
//! bytes built from SSE/NDJSON fragments, never panic, give well-formed
//! items, and give the same items however the body is split into reads;
//! well-formed streams of arbitrary tokens round-trip to those tokens.
//! `PROPTEST_CASES` sets the number of cases (scripts/fuzz.sh raises it);
//! the hand-rolled `testkit::fuzz` rounds in sse.rs / ndjson.rs stay too.

use super::ndjson::NdjsonDecoder;
use super::sse::{SseDecoder, SseDialect};
use super::stream::testkit::{assert_well_formed, TOKENS};
use super::stream::{decode_all, Decoder, StreamItem};
use proptest::prelude::*;

const DIALECTS: [SseDialect; 3] = [
    SseDialect::OpenAiChat,
    SseDialect::OpenAiCompletions,
    SseDialect::LlamaCppNative,
];

/// Raw bytes, or a soup of protocol fragments and stray bytes.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        3 => (0..TOKENS.len()).prop_map(|i| TOKENS[i].to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..4),
        1 => any::<String>().prop_map(String::into_bytes),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(fragment, 0..60).prop_map(|f| f.concat()),
    ]
}

/// `wire` cut at the given (sorted, clamped) offsets.
fn pieces<'a>(wire: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts {
        out.push(&wire[at..c]);
        at = c;
    }
    out.push(&wire[at..]);
    out
}

fn check_decoder<D: Decoder>(new: impl Fn() -> D, wire: &[u8], cuts: &[usize]) {
    let whole = decode_all(&mut new(), &[wire]);
    assert_well_formed(&whole);
    let split = decode_all(&mut new(), &pieces(wire, cuts));
    assert_eq!(split, whole, "cut at {cuts:?}");
}

fn texts(items: &[StreamItem]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| match i {
            StreamItem::Text(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn tokens() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
        0..20,
    )
}

proptest! {
    #[test]
    fn sse_never_panics_and_ignores_read_boundaries(
        wire in wire(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        dialect in 0..DIALECTS.len(),
        max_line in prop_oneof![Just(super::stream::MAX_LINE), 1usize..64],
    ) {
        check_decoder(|| SseDecoder::with_max_line(DIALECTS[dialect], max_line), &wire, &cuts);
        let _ = super::sse::decode_response(DIALECTS[dialect], &wire);
    }

    #[test]
    fn ndjson_never_panics_and_ignores_read_boundaries(
        wire in wire(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        max_line in prop_oneof![Just(super::stream::MAX_LINE), 1usize..64],
    ) {
        check_decoder(|| NdjsonDecoder::with_max_line(max_line), &wire, &cuts);
    }

    #[test]
    fn sse_chat_stream_round_trips_its_tokens(
        tokens in tokens(),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut wire = String::new();
        for t in &tokens {
            let chunk = serde_json::json!({"choices": [{"delta": {"content": t}}]});
            wire.push_str(&format!("data: {chunk}{nl}{nl}"));
        }
        wire.push_str(&format!("data: [DONE]{nl}{nl}"));
        let items = decode_all(&mut SseDecoder::new(SseDialect::OpenAiChat), &pieces(wire.as_bytes(), &cuts));
        prop_assert_eq!(texts(&items), tokens);
        prop_assert_eq!(items.last(), Some(&StreamItem::Done));
    }

    #[test]
    fn ndjson_stream_round_trips_its_tokens(
        tokens in tokens(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut wire = String::new();
        for t in &tokens {
            wire.push_str(&format!("{}\n", serde_json::json!({"response": t, "done": false})));
        }
        wire.push_str("{\"response\":\"\",\"done\":true,\"done_reason\":\"stop\"}\n");
        let items = decode_all(&mut NdjsonDecoder::new(), &pieces(wire.as_bytes(), &cuts));
        prop_assert_eq!(texts(&items), tokens);
        prop_assert_eq!(items.last(), Some(&StreamItem::Done));
    }
}

/// A value a chunk's field may hold: mostly absent, else the right type,
/// a wrong one, or null.
fn field_value() -> impl Strategy<Value = Option<serde_json::Value>> {
    use serde_json::json;
    prop_oneof![
        8 => Just(None),
        1 => Just(Some(json!(null))),
        1 => Just(Some(json!(""))),
        3 => any::<String>().prop_map(|s| Some(json!(s))),
        1 => Just(Some(json!("stop"))),
        1 => Just(Some(json!("error"))),
        1 => Just(Some(json!(7))),
        1 => Just(Some(json!(true))),
        1 => Just(Some(json!(false))),
        1 => Just(Some(json!([1]))),
        1 => Just(Some(json!({"message": "m", "prompt_tokens": 2}))),
    ]
}

/// Mostly `right`, else a `field_value`.
fn or_wrong(right: BoxedStrategy<serde_json::Value>) -> BoxedStrategy<Option<serde_json::Value>> {
    prop_oneof![3 => right.prop_map(Some), 2 => field_value()].boxed()
}

/// An object of the fields given (absent ones left out).
fn object_of(
    fields: Vec<(&'static str, BoxedStrategy<Option<serde_json::Value>>)>,
) -> BoxedStrategy<serde_json::Value> {
    let (keys, values): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
    values
        .prop_map(move |vals| {
            let map = keys
                .iter()
                .zip(vals)
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect();
            serde_json::Value::Object(map)
        })
        .boxed()
}

/// Chunks shaped like the engines' (and wrongly shaped ones), as JSON text.
fn chunk_text() -> impl Strategy<Value = String> {
    let text = || or_wrong(any::<String>().prop_map(serde_json::Value::String).boxed());
    let wrong = || prop_oneof![4 => Just(None), 1 => field_value()].boxed();
    let message = || or_wrong(object_of(vec![("content", text()), ("role", wrong())]));
    let choice = object_of(vec![
        ("delta", prop_oneof![message(), Just(None)].boxed()),
        ("message", prop_oneof![field_value(), message()].boxed()),
        ("text", text()),
        ("finish_reason", wrong()),
        ("index", wrong()),
    ]);
    let choices = prop::collection::vec(choice, 0..3)
        .prop_map(serde_json::Value::Array)
        .boxed();
    let openai = object_of(vec![
        ("choices", or_wrong(choices)),
        ("usage", wrong()),
        ("error", wrong()),
        ("object", wrong()),
        ("id", wrong()),
    ]);
    let llama = object_of(vec![
        ("content", text()),
        ("stop", wrong()),
        ("error", wrong()),
        ("object", wrong()),
        ("id_slot", wrong()),
    ]);
    let ollama = object_of(vec![
        ("response", text()),
        ("message", prop_oneof![field_value(), message()].boxed()),
        ("done", wrong()),
        ("error", wrong()),
        ("object", wrong()),
    ]);
    prop_oneof![openai, llama, ollama].prop_map(|v| v.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]
    #[test]
    fn the_fast_chunk_path_says_what_the_value_path_says(
        data in chunk_text(),
        dialect in 0..DIALECTS.len(),
    ) {
        let dialect = DIALECTS[dialect];
        if let Some(fast) = super::chunk::plain_items(dialect, &data) {
            prop_assert_eq!(fast, super::sse::value_items(dialect, &data), "{}", data);
        }
        if let Some(fast) = super::chunk::plain_ndjson_items(&data) {
            prop_assert_eq!(fast, super::ndjson::value_items(&data), "{}", data);
        }
    }
}
