//! Property tests (proptest) of the parsers that take input from outside:
//! the Redis job-entry decoder (XREADGROUP replies and entry fields), the
//! Nexus job decoder, the config file and `Settings::set`, the duration
//! parser, and the device-config validator. Arbitrary input gives an `Err`
//! with a message, never a panic; well-formed input round-trips.
//! `PROPTEST_CASES` sets the number of cases (scripts/fuzz.sh raises it).
//! The stream decoders' properties are in handlers/inference/proptests.rs.

use crate::config::{format_duration, parse_duration, Settings, SETTINGS};
use crate::handlers::Registry;
use crate::node::profile::{config_of, parse_update, DeviceConfig, FIELDS};
use crate::transport::nexus::client::parse_job;
use crate::transport::redis_streams::entry::{parse_entries, parse_read_reply, Entry, RawEntry};
use proptest::prelude::*;
use redis::Value as Redis;
use serde_json::{Map, Value as Json};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        any::<f64>().prop_map(Json::from),
        any::<String>().prop_map(Json::String),
        "[0-9]{1,12}(ms|s)?".prop_map(Json::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Json::Object(kv.into_iter().collect())),
        ]
    })
}

/// Object keys: the ones the parsers look for, or anything.
fn key() -> impl Strategy<Value = String> {
    const KNOWN: &[&str] = &[
        "id",
        "type",
        "payload",
        "timeout_ms",
        "rayId",
        "config",
        "chunks",
        "sleep_ms",
    ];
    prop_oneof![
        (0..KNOWN.len()).prop_map(|i| KNOWN[i].to_owned()),
        (0..FIELDS.len()).prop_map(|i| FIELDS[i].to_owned()),
        any::<String>(),
    ]
}

fn object() -> impl Strategy<Value = Map<String, Json>> {
    prop::collection::vec((key(), json()), 0..8).prop_map(|kv| kv.into_iter().collect())
}

/// Any Redis reply, a few levels deep.
fn redis_value() -> impl Strategy<Value = Redis> {
    let leaf = prop_oneof![
        Just(Redis::Nil),
        Just(Redis::Okay),
        any::<i64>().prop_map(Redis::Int),
        any::<f64>().prop_map(Redis::Double),
        any::<bool>().prop_map(Redis::Boolean),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Redis::BulkString),
        "[0-9]{1,3}-[0-9]".prop_map(|s| Redis::BulkString(s.into_bytes())),
        any::<String>().prop_map(Redis::SimpleString),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Redis::Array),
            prop::collection::vec((inner.clone(), inner), 0..3).prop_map(Redis::Map),
        ]
    })
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::from_settings(&Settings::default()))
}

fn entry(fields: Vec<(String, Vec<u8>)>) -> Entry {
    let raw = RawEntry {
        id: "1-0".into(),
        fields: Some(fields),
    };
    Entry::new(Arc::from("jobs:v1:test"), raw, 1)
}

/// Entry field names: the decoder's own, or anything.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["jobId", "type", "payload", "rayId", "enqueuedAt"])
            .prop_map(str::to_owned),
        any::<String>(),
    ]
}

fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        json().prop_map(|j| j.to_string().into_bytes()),
        object().prop_map(|o| Json::Object(o).to_string().into_bytes()),
        prop::sample::select(vec!["echo", "llm_inference", "shell_command", ""])
            .prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..32),
    ]
}

/// A payload that `Job::timeout` accepts: no `timeout_ms` key.
fn payload() -> impl Strategy<Value = Map<String, Json>> {
    object().prop_map(|mut o| {
        o.remove("timeout_ms");
        o
    })
}

fn setting_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9.]{0,12}(ms|s|m|h|x)?",
        "(redis|rediss|unix|http|https)://[a-z:@/0-9.]{0,20}",
        prop::sample::select(vec![
            "true", "false", "0", "-1", "", " ", "redis", "nexus", "auto"
        ])
        .prop_map(str::to_owned),
    ]
}

/// A device config that may well be valid: the validator's own vocabulary.
fn device_config() -> impl Strategy<Value = Map<String, Json>> {
    let services = prop::collection::vec(
        prop::sample::select(vec!["vllm", "ollama", "llamacpp", "extraction", "nope"]),
        0..5,
    )
    .prop_map(|s| Json::from(s.into_iter().map(Json::from).collect::<Vec<_>>()));
    let tags = prop::collection::vec("[a-z0-9._:-]{0,12}|.{0,3}", 0..6)
        .prop_map(|t| Json::from(t.into_iter().map(Json::from).collect::<Vec<_>>()));
    let field = prop_oneof![
        ("[ -~]{0,70}".prop_map(Json::from)).prop_map(|v| ("deviceName".to_owned(), v)),
        services.prop_map(|v| ("services".to_owned(), v)),
        tags.prop_map(|v| ("customTags".to_owned(), v)),
        (prop::sample::select(FIELDS.to_vec()), any::<bool>())
            .prop_map(|(k, b)| (k.to_owned(), Json::Bool(b))),
        (key(), json()),
    ];
    prop::collection::vec(field, 0..10).prop_map(|kv| kv.into_iter().collect())
}

/// A unique scratch file for one case's config text.
fn write_config(text: &[u8]) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("citadel-proptest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("config-{}.json", N.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&path, text).expect("writing the config file");
    path
}

proptest! {
    #[test]
    fn read_replies_of_any_shape_are_an_error_not_a_panic(v in redis_value()) {
        let _ = parse_read_reply(v.clone());
        let _ = parse_entries(v);
    }

    #[test]
    fn entries_with_any_fields_parse_or_say_why(
        fields in prop::collection::vec((field_name(), field_value()), 0..8),
        max_size in prop_oneof![Just(1usize << 20), 0usize..256],
    ) {
        let mut e = entry(fields);
        if let Err(msg) = e.parse(registry(), max_size) {
            prop_assert!(!msg.is_empty());
        }
    }

    #[test]
    fn a_well_formed_entry_round_trips(
        id in any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
        payload in payload(),
        ray in proptest::option::of("[a-z0-9-]{1,12}"),
    ) {
        let mut fields = vec![
            ("jobId".to_owned(), id.clone().into_bytes()),
            ("type".to_owned(), b"echo".to_vec()),
            ("payload".to_owned(), Json::Object(payload.clone()).to_string().into_bytes()),
        ];
        if let Some(r) = &ray {
            fields.push(("rayId".to_owned(), r.clone().into_bytes()));
        }
        let job = entry(fields).parse(registry(), usize::MAX).expect("a valid entry");
        prop_assert_eq!(job.id, id);
        prop_assert_eq!(job.kind, "echo");
        prop_assert_eq!(job.payload, payload);
        if ray.is_some() {
            prop_assert_eq!(job.ray_id, ray);
        }
    }

    #[test]
    fn nexus_jobs_of_any_shape_parse_or_say_why(
        body in prop_oneof![any::<String>(), json().prop_map(|j| j.to_string()),
                            object().prop_map(|o| Json::Object(o).to_string())],
    ) {
        if let Err((_, msg)) = parse_job(&body) {
            prop_assert!(!msg.is_empty());
        }
    }

    #[test]
    fn a_well_formed_nexus_job_round_trips(
        id in any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
        kind in any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
        payload in payload(),
    ) {
        let body = serde_json::json!({"id": id, "type": kind, "payload": payload}).to_string();
        let job = parse_job(&body).expect("a valid job");
        prop_assert_eq!(job.id, id);
        prop_assert_eq!(job.kind, kind);
        prop_assert_eq!(job.payload, payload);
    }

    #[test]
    fn durations_of_any_text_parse_or_say_why(text in prop_oneof![
        any::<String>(), "[ 0-9.e+-]{0,16}(ms|s|m|h|us|)[ ]?"
    ]) {
        if let Err(msg) = parse_duration(&text) {
            prop_assert!(!msg.is_empty());
        }
    }

    #[test]
    fn a_formatted_duration_round_trips(ms in 0u64..999_999_999_000) {
        let d = Duration::from_millis(ms);
        let text = format_duration(d);
        prop_assert_eq!(parse_duration(&text), Ok(d), "{}", text);
    }

    #[test]
    fn every_setting_takes_any_text_or_says_why(
        i in 0..SETTINGS.len(),
        value in setting_value(),
    ) {
        let mut s = Settings::default();
        if let Err(msg) = s.set(SETTINGS[i].0, &value) {
            prop_assert!(!msg.is_empty());
        }
    }

    #[test]
    fn config_files_of_any_content_load_or_say_why(
        text in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(
                (
                    (0..SETTINGS.len()).prop_map(|i| SETTINGS[i].0.replace('-', "_")),
                    prop_oneof![json(), setting_value().prop_map(Json::from)],
                ),
                0..6,
            )
            .prop_map(|kv| Json::Object(kv.into_iter().collect()).to_string().into_bytes()),
        ],
    ) {
        let path = write_config(&text);
        let loaded = Settings::load_with(Some(&path), false);
        let _ = std::fs::remove_file(&path);
        if let Err(msg) = loaded {
            prop_assert!(!msg.is_empty());
        }
    }

    #[test]
    fn a_config_file_duration_round_trips(ms in 1u64..999_999_000) {
        let d = Duration::from_millis(ms);
        let text = serde_json::json!({"claim_idle": format_duration(d)}).to_string();
        let path = write_config(text.as_bytes());
        let loaded = Settings::load_with(Some(&path), false);
        let _ = std::fs::remove_file(&path);
        prop_assert_eq!(loaded.map(|s| s.claim_idle), Ok(d));
    }

    #[test]
    fn device_configs_of_any_shape_validate_or_say_why(
        payload in prop_oneof![
            object(),
            device_config().prop_map(|c| [("config".to_owned(), Json::Object(c))].into_iter().collect()),
            device_config().prop_map(|c| [("config".to_owned(), Json::from(Json::Object(c).to_string()))].into_iter().collect()),
        ],
    ) {
        match config_of(&payload) {
            Ok(config) => {
                if let Err(msg) = parse_update(&config) {
                    prop_assert!(!msg.is_empty());
                }
            }
            Err(msg) => prop_assert!(!msg.is_empty()),
        }
    }

    #[test]
    fn a_valid_device_config_round_trips_through_its_file_form(config in device_config()) {
        if let Ok(update) = parse_update(&config) {
            let applied = DeviceConfig::default().with(&update);
            let file = applied.to_json();
            let again = parse_update(file.as_object().expect("an object")).expect("its own form");
            prop_assert_eq!(DeviceConfig::default().with(&again), applied);
        }
    }
}

/// Found by `a_well_formed_entry_round_trips` / `a_well_formed_nexus_job_round_trips`:
/// without serde_json's `float_roundtrip` a payload float came back one ulp off.
#[test]
fn payload_floats_are_read_exactly() {
    for x in [1.3861182960654985e-68, 4.220762630257733e-267, 0.1, 1e308] {
        let payload = serde_json::json!({ "x": x }).to_string();
        let fields = vec![
            ("jobId".to_owned(), b"j".to_vec()),
            ("type".to_owned(), b"echo".to_vec()),
            ("payload".to_owned(), payload.clone().into_bytes()),
        ];
        let job = entry(fields).parse(registry(), usize::MAX).expect("valid");
        assert_eq!(job.payload["x"].as_f64(), Some(x), "redis entry {payload}");
        let body = format!(r#"{{"id":"j","type":"echo","payload":{payload}}}"#);
        let job = parse_job(&body).expect("valid");
        assert_eq!(job.payload["x"].as_f64(), Some(x), "nexus job {payload}");
    }
}
