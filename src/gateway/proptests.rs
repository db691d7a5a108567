//! Property tests of what the gateway reads from clients: request bodies
//! (any bytes, and JSON objects with the request's keys holding anything)
//! and request heads. Arbitrary input is an answer with a status, never a
//! panic. `PROPTEST_CASES` sets the number of cases.

use super::front::rewrite_head_for_tests as rewrite_head;
use super::openai::{parse, Endpoint};
use proptest::prelude::*;
use serde_json::Value as Json;

fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        any::<f64>().prop_map(Json::from),
        any::<String>().prop_map(Json::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            prop::collection::vec(("[a-z]{1,8}", inner), 0..6)
                .prop_map(|kv| Json::Object(kv.into_iter().collect())),
        ]
    })
}

const KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "n",
    "role",
    "content",
];

proptest! {
    #[test]
    fn any_body_is_a_request_or_a_400(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            if let Err(e) = parse(endpoint, &bytes) {
                prop_assert_eq!(e.status, 400);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn any_request_shaped_object_is_a_request_or_names_what_is_wrong(
        kv in prop::collection::vec(((0..KEYS.len()).prop_map(|i| KEYS[i]), json()), 0..8),
    ) {
        let body = Json::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            match parse(endpoint, body.to_string().as_bytes()) {
                Ok(ask) => prop_assert!(!ask.model.is_empty()),
                Err(e) => {
                    prop_assert_eq!(e.status, 400);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn any_head_is_passed_on_with_our_header_first_or_refused(
        head in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        if let Ok(out) = rewrite_head(&head, 42) {
            let text = String::from_utf8(out).unwrap();
            let second = text.split("\r\n").nth(1).unwrap_or_default().to_owned();
            prop_assert_eq!(second, "X-Citadel-Conn: 42");
            let forged = text.split("\r\n").skip(2).any(|l| {
                l.split_once(':').is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("x-citadel-conn"))
            });
            prop_assert!(!forged, "{}", text);
        }
    }
}
