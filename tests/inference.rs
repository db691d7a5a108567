//! `llm_inference` end to end: the real `citadel work` against a real
//! redis-server and fake engines (tests/support/fake_engine.rs) that speak
//! vLLM's, Ollama's and llama.cpp's wire formats byte for byte. Each test
//! checks what the engine was sent, the job's events (chunks gap-free, in
//! order), its result or error text, and the retry decision (how many
//! requests the engine saw, the dead letter's reason). Timeouts are set in
//! milliseconds through the settings so the failure cases run fast.

mod support;

use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};
use support::fake_engine::{FakeEngine, Framing, Reply};
use support::observe::{event_type, has_ended, kinds, wait_status};
use support::{citadel_cmd, wait_until, xadd_job, xrange_all, Citadel, RedisServer, Subscriber};

const WAIT: Duration = Duration::from_secs(10);
const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";

/// vLLM `/v1/chat/completions`, `stream_options.include_usage`, a reasoning
/// model (its `reasoning_content` is not output), keep-alive comments.
const VLLM_CHAT: &str = concat!(
    r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
    "\n\n",
    ": ping\n\n",
    r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"reasoning_content":"Greet them."},"logprobs":null,"finish_reason":null}]}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":", wörld 🦀"},"logprobs":null,"finish_reason":null}]}"#,
    "\n\n",
    ": ping\n\n",
    r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":"stop","stop_reason":null}]}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-8f1c2d","object":"chat.completion.chunk","created":1718000000,"model":"Qwen/Qwen3-0.6B","choices":[],"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,"prompt_tokens_details":null}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

/// Ollama `/api/generate`, stopped by `num_predict`.
const OLLAMA_GENERATE: &str = concat!(
    r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.512837Z","response":"The","done":false}"#,
    "\n",
    r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.534204Z","response":" sky","done":false}"#,
    "\n",
    r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.555921Z","response":" is blü 🌌","done":false}"#,
    "\n",
    r#"{"model":"llama3.2","created_at":"2024-11-04T10:15:01.577410Z","response":"","done":true,"done_reason":"length","context":[128006,9125,128007],"total_duration":5043500667,"load_duration":5025959,"prompt_eval_count":26,"prompt_eval_duration":325953000,"eval_count":3,"eval_duration":4709213000}"#,
    "\n",
);

/// llama.cpp `POST /completion` with `stream: true`, stopped by `n_predict`:
/// the events as llama-server sends them (scripts/real-engine.sh), each the
/// JSON of one `data:` line.
const LLAMA_NATIVE: [&str; 3] = [
    r#"{"index":0,"content":" Once","tokens":[9038],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":6}"#,
    r#"{"index":0,"content":" upon","tokens":[2402],"stop":false,"id_slot":-1,"tokens_predicted":2,"tokens_evaluated":6}"#,
    r#"{"index":0,"content":"","tokens":[],"id_slot":1,"stop":true,"model":"/models/SmolLM2-135M-Instruct.Q4_1.gguf","tokens_predicted":2,"tokens_evaluated":6,"generation_settings":{"seed":4294967295,"temperature":0.800000011920929,"n_predict":2,"stream":true},"prompt":"Tell me a story","has_new_line":false,"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":7,"timings":{"cache_n":0,"prompt_n":6,"prompt_ms":31.2,"prompt_per_token_ms":5.2,"prompt_per_second":192.3,"predicted_n":2,"predicted_ms":40.5,"predicted_per_token_ms":20.25,"predicted_per_second":49.4}}"#,
];

/// [`LLAMA_NATIVE`] as llama-server streams it: each event `data: …` and a
/// blank line (LF), one event per HTTP chunk.
fn llama_native_stream() -> Reply {
    LLAMA_NATIVE
        .iter()
        .fold(Reply::llamacpp_stream(), |r, e| r.llamacpp_event(e))
}

/// One OpenAI chat chunk carrying `text`.
fn chat_chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]})
    )
}

/// `citadel work` against `redis`, with every engine URL set (unused ones
/// to a port nothing listens on), ms-scale settings, and `extra` last.
fn worker(redis: &RedisServer, engine_urls: &[(&str, &str)], extra: &[&str]) -> Citadel {
    worker_with_env(redis, engine_urls, extra, &[])
}

fn worker_with_env(
    redis: &RedisServer,
    engine_urls: &[(&str, &str)],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Citadel {
    let dead = dead_url();
    let node = format!("inf-{}", support::free_port());
    let mut args: Vec<String> = [
        "--retry-base",
        "5ms",
        "--retry-cap",
        "20ms",
        "--max-retries",
        "0",
        "--shutdown-grace",
        "2s",
        "--vllm-url",
        &dead,
        "--ollama-url",
        &dead,
        "--llamacpp-url",
        &dead,
    ]
    .map(str::to_owned)
    .to_vec();
    for (name, url) in engine_urls {
        args.push(format!("--{name}-url"));
        args.push(url.to_string());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    support::worker_with_env(redis, &node, &args, env)
}

/// An engine URL where nothing listens.
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", support::free_port())
}

/// Enqueues an `llm_inference` job and waits for its terminal event.
fn run(redis: &RedisServer, sub: &Subscriber, id: &str, payload: Json) -> Vec<Json> {
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, id, "llm_inference", &payload.to_string());
    wait_until(&format!("a terminal event of {id}"), WAIT, || {
        let events = sub.events_for(id);
        has_ended(&events).then_some(events)
    })
}

/// Chunk contents, checking that indices run 0, 1, 2… without a gap.
fn chunks(events: &[Json]) -> Vec<String> {
    events
        .iter()
        .filter(|e| event_type(e) == "chunk")
        .enumerate()
        .map(|(i, e)| {
            assert_eq!(
                e["data"]["index"], i,
                "chunk indices must be gap-free: {events:?}"
            );
            e["data"]["content"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn last(events: &[Json]) -> &Json {
    events.last().expect("at least one event")
}

/// The `error` event's text; panics (with the events) if the job did not fail.
fn error_text(events: &[Json]) -> String {
    let e = last(events);
    assert_eq!(event_type(e), "error", "{events:?}");
    e["data"]["error"].as_str().unwrap().to_owned()
}

/// The reason of the dead letter of job `id`.
fn dead_letter_reason(redis: &RedisServer, id: &str) -> String {
    let mut conn = redis.conn();
    let letters = xrange_all(&mut conn, DLQ);
    letters
        .iter()
        .find(|(_, f)| f.get("jobId").map(String::as_str) == Some(id))
        .and_then(|(_, f)| f.get("reason").cloned())
        .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:?}"))
}

// ---------------------------------------------------------------------------
// Streams, each engine
// ---------------------------------------------------------------------------

#[test]
fn vllm_chat_stream_split_mid_line_becomes_gap_free_chunks() {
    let wire = VLLM_CHAT.as_bytes();
    // Cut inside "data:", inside a JSON string, inside the 4-byte 🦀, and
    // between the two line ends of an event.
    let crab = VLLM_CHAT.find('🦀').unwrap();
    let cuts = [
        3,
        150,
        400,
        crab + 2,
        crab + 3,
        VLLM_CHAT.find("\n\n: ping").unwrap() + 1,
    ];
    let engine = FakeEngine::start(vec![Reply::sse().send_split(wire, &cuts)]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = worker(&redis, &[("vllm", &engine.url())], &[]);

    let events = run(
        &redis,
        &sub,
        "j-chat",
        json!({"model": "vllm/Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": "Hi"}],
               "max_tokens": 32, "temperature": 0.7, "stop": "\n\n"}),
    );
    assert_eq!(
        kinds(&events),
        ["claimed", "start", "chunk", "chunk", "chunk", "end"]
    );
    assert_eq!(chunks(&events), ["Hello", ", wörld 🦀", "!"]);
    assert_eq!(
        last(&events)["data"]["result"],
        json!({"content": "Hello, wörld 🦀!", "finish_reason": "stop",
               "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}})
    );

    let req = &engine.requests()[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(req.header("accept"), Some("text/event-stream"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(
        req.json(),
        json!({"model": "Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": "Hi"}],
               "max_tokens": 32, "temperature": 0.7, "stop": ["\n\n"], "stream": true,
               "stream_options": {"include_usage": true}})
    );
    // The start-up probe found the fake vLLM, and nothing at the other two.
    w.wait_for_log(
        &format!(
            "inference engines: vLLM at {}: ready; Ollama at",
            engine.url()
        ),
        WAIT,
    );
    assert_eq!(engine.probes()[0].path, "/v1/models");
}

#[test]
fn vllm_completions_with_stream_false_is_one_chunk() {
    let answer = r#"{"id":"cmpl-1","object":"text_completion","created":1718000100,"model":"meta-llama/Llama-3.2-1B","choices":[{"index":0,"text":" Paris is the capital","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":{"prompt_tokens":5,"total_tokens":9,"completion_tokens":4}}"#;
    let engine = FakeEngine::start(vec![Reply::json(200, answer)]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    // Proxies that do not exist: engines are local, the client must ignore them.
    let proxy = dead_url();
    let proxies = [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ]
    .map(|k| (k, proxy.as_str()));
    let _w = worker_with_env(&redis, &[("vllm", &engine.url())], &[], &proxies);

    let events = run(
        &redis,
        &sub,
        "j-whole",
        json!({"model": "meta-llama/Llama-3.2-1B", "prompt": "The capital of France",
               "stream": false, "top_p": 0.9}),
    );
    assert_eq!(chunks(&events), [" Paris is the capital"]);
    assert_eq!(
        last(&events)["data"]["result"],
        json!({"content": " Paris is the capital", "finish_reason": "length",
               "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})
    );
    let req = &engine.requests()[0];
    assert_eq!(req.path, "/v1/completions");
    assert_eq!(req.header("accept"), Some("application/json"));
    assert_eq!(
        req.json(),
        json!({"model": "meta-llama/Llama-3.2-1B", "prompt": "The capital of France",
               "top_p": 0.9, "stream": false})
    );
}

#[test]
fn ollama_generate_ndjson_stream_split_mid_line() {
    let wire = OLLAMA_GENERATE.as_bytes();
    let cuts: Vec<usize> = (1..wire.len()).step_by(37).collect();
    let engine = FakeEngine::start(vec![Reply::ndjson().send_split(wire, &cuts)]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &[("ollama", &engine.url())], &[]);

    let events = run(
        &redis,
        &sub,
        "j-ollama",
        json!({"model": "llama3.2", "backend": "ollama", "prompt": "Why is the sky blue?",
               "max_tokens": 3, "temperature": 0, "top_p": 0.5, "stop": ["\n"]}),
    );
    assert_eq!(chunks(&events), ["The", " sky", " is blü 🌌"]);
    assert_eq!(
        last(&events)["data"]["result"],
        json!({"content": "The sky is blü 🌌", "finish_reason": "length",
               "usage": {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}})
    );
    let req = &engine.requests()[0];
    assert_eq!(req.path, "/api/generate");
    assert_eq!(req.header("accept"), Some("application/x-ndjson"));
    assert_eq!(
        req.json(),
        json!({"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": true,
               "options": {"num_predict": 3, "temperature": 0, "top_p": 0.5, "stop": ["\n"]}})
    );
}

#[test]
fn ollama_chat_with_stream_false() {
    let answer = r#"{"model":"qwen3:0.6b","created_at":"2025-06-01T08:00:00.160Z","message":{"role":"assistant","content":"Hi there","thinking":"User says hi."},"done_reason":"stop","done":true,"total_duration":61000000,"prompt_eval_count":11,"eval_count":3}"#;
    let engine = FakeEngine::start(vec![Reply::json(200, answer)]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &[("ollama", &engine.url())], &[]);

    let events = run(
        &redis,
        &sub,
        "j-ochat",
        json!({"model": "ollama/qwen3:0.6b", "stream": false,
               "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}),
    );
    assert_eq!(chunks(&events), ["Hi there"]);
    assert_eq!(
        last(&events)["data"]["result"],
        json!({"content": "Hi there", "finish_reason": "stop",
               "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}})
    );
    let req = &engine.requests()[0];
    assert_eq!(req.path, "/api/chat");
    assert_eq!(
        req.json(),
        json!({"model": "qwen3:0.6b", "stream": false,
               "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
    );
}

#[test]
fn llamacpp_native_completion_and_chat() {
    let chat = Reply::llamacpp_stream()
        .send(chat_chunk("Hey"))
        .send(chat_chunk("!"))
        .send("data: [DONE]\n\n");
    // The same events with CRLF line ends, close-delimited, cut inside
    // "data:", between a CR and its LF, between the two line ends of an
    // event and inside the JSON.
    let crlf: String = LLAMA_NATIVE
        .iter()
        .map(|e| format!("data: {e}\r\n\r\n"))
        .collect();
    let cr = crlf.find('\r').unwrap();
    let crlf_split = Reply::sse()
        .framing(Framing::Close)
        .send_split(crlf.as_bytes(), &[3, cr + 1, cr + 2, cr + 40]);
    let engine = FakeEngine::start(vec![llama_native_stream(), chat, crlf_split]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &[("llamacpp", &engine.url())], &[]);

    let events = run(
        &redis,
        &sub,
        "j-native",
        json!({"model": "llamacpp/smollm2", "prompt": "Tell me a story", "max_tokens": 2}),
    );
    assert_eq!(chunks(&events), [" Once", " upon"]);
    assert_eq!(
        last(&events)["data"]["result"],
        json!({"content": " Once upon", "finish_reason": "length",
               "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}})
    );
    let events = run(
        &redis,
        &sub,
        "j-lchat",
        json!({"model": "smollm2", "backend": "llamacpp",
               "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(chunks(&events), ["Hey", "!"]);
    // No finish reason on the wire: "stop"; no usage: left out.
    assert_eq!(
        last(&events)["data"]["result"],
        json!({"content": "Hey!", "finish_reason": "stop"})
    );

    let events = run(
        &redis,
        &sub,
        "j-native-crlf",
        json!({"model": "llamacpp/smollm2", "prompt": "Tell me a story", "max_tokens": 2}),
    );
    assert_eq!(chunks(&events), [" Once", " upon"]);
    assert_eq!(
        last(&events)["data"]["result"],
        json!({"content": " Once upon", "finish_reason": "length",
               "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}})
    );

    let reqs = engine.requests();
    assert_eq!(reqs[0].path, "/completion");
    assert_eq!(
        reqs[0].json(),
        json!({"model": "smollm2", "prompt": "Tell me a story", "n_predict": 2, "stream": true})
    );
    assert_eq!(reqs[1].path, "/v1/chat/completions");
    assert_eq!(
        reqs[1].json()["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(reqs[2].path, "/completion");
}

// ---------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------

#[test]
fn slow_first_token_within_the_limit_succeeds() {
    // The token and the end come in one piece: after the first token the
    // 100 ms idle timeout has no gap to fire in, however loaded the machine.
    let engine = FakeEngine::start(vec![Reply::sse()
        .send(": ping\n\n")
        .pause(Duration::from_millis(300))
        .send(format!("{}data: [DONE]\n\n", chat_chunk("late")))]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &[("vllm", &engine.url())],
        &[
            "--engine-first-token-timeout",
            "5s",
            "--engine-idle-timeout",
            "100ms",
        ],
    );
    let events = run(
        &redis,
        &sub,
        "j-slow",
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(chunks(&events), ["late"]);
    assert_eq!(event_type(last(&events)), "end");
}

#[test]
fn no_first_token_in_time_is_retryable_even_with_keep_alives() {
    // Keep-alive comments keep coming, but no text: the first-token limit holds.
    let pinging = Reply::sse()
        .send(": ping\n\n")
        .pause(Duration::from_millis(150))
        .send(": ping\n\n")
        .pause(Duration::from_millis(150))
        .send(": ping\n\n")
        .hang();
    let engine = FakeEngine::start(vec![pinging.clone(), pinging]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &[("vllm", &engine.url())],
        &[
            "--engine-first-token-timeout",
            "250ms",
            "--max-retries",
            "1",
        ],
    );
    let t0 = Instant::now();
    let events = run(&redis, &sub, "j-ttft", json!({"model": "m", "prompt": "x"}));
    let err = error_text(&events);
    assert!(
        err.starts_with(&format!(
            "vLLM at {} sent no token within 250ms (engine-first-token-timeout)",
            engine.url()
        )),
        "{err}"
    );
    assert!(err.ends_with("(gave up after 2 attempts)"), "{err}");
    assert_eq!(chunks(&events).len(), 0);
    assert_eq!(engine.requests().len(), 2, "retryable: tried again once");
    assert_eq!(dead_letter_reason(&redis, "j-ttft"), "retries exhausted");
    assert!(t0.elapsed() >= Duration::from_millis(500));
    engine.wait_closed(0, WAIT);
    engine.wait_closed(1, WAIT);
}

#[test]
fn hung_stream_hits_the_idle_timeout_and_is_not_retried() {
    let engine = FakeEngine::start(vec![Reply::sse()
        .send(chat_chunk("one"))
        .send(chat_chunk(" two"))
        .hang()]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    // 1 s: long enough that a loaded machine never stalls that long between
    // the two chunks, which are written back to back.
    let _w = worker(
        &redis,
        &[("vllm", &engine.url())],
        &["--engine-idle-timeout", "1s", "--max-retries", "3"],
    );
    let events = run(
        &redis,
        &sub,
        "j-idle",
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(chunks(&events), ["one", " two"]);
    assert_eq!(
        error_text(&events),
        "vLLM sent no token for 1s after 2 chunks (engine-idle-timeout); the stream was abandoned"
    );
    assert_eq!(dead_letter_reason(&redis, "j-idle"), "permanent error");
    assert_eq!(engine.requests().len(), 1, "chunks were streamed: no retry");
    engine.wait_closed(0, WAIT);
}

#[test]
fn job_deadline_ends_a_hung_stream_and_closes_the_connection() {
    let engine = FakeEngine::start(vec![Reply::ndjson()
        .send("{\"response\":\"a\",\"done\":false}\n")
        .hang()]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &[("ollama", &engine.url())], &[]);
    let events = run(
        &redis,
        &sub,
        "j-deadline",
        json!({"model": "ollama/m", "prompt": "x", "timeout_ms": 400}),
    );
    assert_eq!(chunks(&events), ["a"]);
    assert_eq!(error_text(&events), "job exceeded its timeout_ms of 400ms");
    assert_eq!(
        dead_letter_reason(&redis, "j-deadline"),
        "deadline exceeded"
    );
    engine.wait_closed(0, WAIT);
}

// ---------------------------------------------------------------------------
// Engine errors and retry decisions
// ---------------------------------------------------------------------------

#[test]
fn ollama_error_line_after_200_fails_the_job() {
    let after_output = Reply::ndjson()
        .send("{\"model\":\"llama3.2\",\"response\":\"Par\",\"done\":false}\n")
        .send("{\"error\":\"an error was encountered while running the model: unexpected EOF\"}\n");
    let before_output = Reply::ndjson().send("{\"error\":\"model is loading\"}\n");
    let engine = FakeEngine::start(vec![after_output, before_output.clone(), before_output]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &[("ollama", &engine.url())],
        &["--max-retries", "1"],
    );

    let events = run(
        &redis,
        &sub,
        "j-oerr",
        json!({"model": "ollama/llama3.2", "prompt": "x"}),
    );
    assert_eq!(chunks(&events), ["Par"]);
    assert_eq!(
        error_text(&events),
        "Ollama reported an error after 1 chunk: an error was encountered while running the model: unexpected EOF"
    );
    assert_eq!(dead_letter_reason(&redis, "j-oerr"), "permanent error");
    assert_eq!(engine.requests().len(), 1);

    // Before any output, the same kind of line is worth another try.
    let events = run(
        &redis,
        &sub,
        "j-oerr2",
        json!({"model": "ollama/llama3.2", "prompt": "x"}),
    );
    assert_eq!(
        error_text(&events),
        "Ollama reported an error: model is loading (gave up after 2 attempts)"
    );
    assert_eq!(dead_letter_reason(&redis, "j-oerr2"), "retries exhausted");
    assert_eq!(engine.requests().len(), 3);
}

#[test]
fn http_503_is_retried_then_200_succeeds() {
    // As llama-server answers while its model loads: then it closes the connection.
    let loading = Reply::llamacpp_error(503, "unavailable_error", "Loading model");
    let engine = FakeEngine::start(vec![
        loading,
        Reply::json(429, r#"{"error":"too many requests"}"#),
        Reply::llamacpp_stream()
            .send(chat_chunk("ready"))
            .send("data: [DONE]\n\n"),
    ]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = worker(
        &redis,
        &[("llamacpp", &engine.url())],
        &["--max-retries", "3"],
    );
    let events = run(
        &redis,
        &sub,
        "j-retry",
        json!({"model": "llamacpp/m", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert_eq!(kinds(&events), ["claimed", "start", "chunk", "end"]);
    assert_eq!(chunks(&events), ["ready"]);
    assert_eq!(engine.requests().len(), 3);
    wait_status(&mut redis.conn(), "j-retry", "completed", WAIT);
    w.wait_for_log("llama.cpp answered HTTP 503: Loading model", WAIT);
    w.wait_for_log("llama.cpp answered HTTP 429: too many requests", WAIT);
    // The engine closed the connection of its error; the client let go of it.
    engine.wait_closed(0, WAIT);
}

#[test]
fn http_400_is_permanent_and_carries_the_engines_message() {
    let body = r#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 4096 tokens.","type":"BadRequestError","param":null,"code":400}"#;
    let engine = FakeEngine::always(Reply::json(400, body));
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &[("vllm", &engine.url())], &["--max-retries", "3"]);
    let events = run(
        &redis,
        &sub,
        "j-400",
        json!({"model": "m", "prompt": "x", "max_tokens": 4096}),
    );
    assert_eq!(
        error_text(&events),
        "vLLM rejected the request (HTTP 400): This model's maximum context length is 2048 tokens. \
         However, you requested 4096 tokens."
    );
    assert_eq!(last(&events)["data"]["recoverable"], false);
    assert_eq!(dead_letter_reason(&redis, "j-400"), "permanent error");
    assert_eq!(engine.requests().len(), 1, "a 4xx is not retried");
}

#[test]
fn connection_reset_mid_stream_is_permanent_after_chunks_and_retryable_before() {
    let engine = FakeEngine::start(vec![
        Reply::sse()
            .send(chat_chunk("a"))
            .send(chat_chunk("b"))
            .reset(),
        Reply::sse().reset(),
        Reply::sse().reset(),
    ]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &[("vllm", &engine.url())], &["--max-retries", "1"]);
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});

    let events = run(&redis, &sub, "j-reset", chat.clone());
    assert_eq!(chunks(&events), ["a", "b"]);
    let err = error_text(&events);
    assert!(
        err.starts_with("engine connection lost after 2 chunks: "),
        "{err}"
    );
    assert_eq!(dead_letter_reason(&redis, "j-reset"), "permanent error");
    assert_eq!(engine.requests().len(), 1);

    let events = run(&redis, &sub, "j-reset0", chat);
    let err = error_text(&events);
    assert!(
        err.starts_with(&format!(
            "vLLM at {}: connection lost before the first token: ",
            engine.url()
        )),
        "{err}"
    );
    assert_eq!(dead_letter_reason(&redis, "j-reset0"), "retries exhausted");
    assert_eq!(engine.requests().len(), 3);
}

#[test]
fn connection_refused_is_retryable() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let dead = dead_url();
    let w = worker(&redis, &[("vllm", &dead)], &["--max-retries", "2"]);
    let events = run(
        &redis,
        &sub,
        "j-refused",
        json!({"model": "m", "prompt": "x"}),
    );
    assert_eq!(
        error_text(&events),
        format!(
            "cannot connect to vLLM at {dead}: connection refused (is it running?) (gave up after 3 attempts)"
        )
    );
    assert_eq!(dead_letter_reason(&redis, "j-refused"), "retries exhausted");
    w.wait_for_log(
        &format!("vLLM at {dead}: not answering: connection refused"),
        WAIT,
    );
}

#[test]
fn connect_timeout_is_retryable_and_names_its_setting() {
    // A listener that never accepts, with its backlog full: the next SYN is
    // dropped and a connect hangs until its timeout.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
        held.push(c);
        assert!(held.len() < 100, "the backlog never filled");
    }
    let url = format!("http://{addr}");
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &[("vllm", &url)],
        &["--engine-connect-timeout", "200ms", "--max-retries", "1"],
    );
    let events = run(
        &redis,
        &sub,
        "j-connect",
        json!({"model": "m", "prompt": "x"}),
    );
    assert_eq!(
        error_text(&events),
        format!(
            "connecting to vLLM at {url} timed out after 200ms (engine-connect-timeout) \
             (gave up after 2 attempts)"
        )
    );
    assert_eq!(dead_letter_reason(&redis, "j-connect"), "retries exhausted");
}

#[test]
fn bad_payloads_fail_permanently_without_calling_an_engine() {
    let engine = FakeEngine::start(Vec::new());
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let url = engine.url();
    let _w = worker(
        &redis,
        &[("vllm", &url), ("ollama", &url), ("llamacpp", &url)],
        &["--max-retries", "3"],
    );
    let cases = [
        (
            json!({"prompt": "x"}),
            "llm_inference: payload.model is required",
        ),
        (
            json!({"model": "m", "prompt": "x", "backend": "tgi"}),
            "llm_inference: unknown backend 'tgi' (accepted: vllm, ollama, llamacpp)",
        ),
        (
            json!({"model": "m"}),
            "llm_inference: payload needs prompt (a string) or messages",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
            "llm_inference: payload.messages[0].content must be a string, got 5",
        ),
    ];
    for (i, (payload, want)) in cases.into_iter().enumerate() {
        let id = format!("j-bad-{i}");
        let err = error_text(&run(&redis, &sub, &id, payload));
        assert!(err.starts_with(want), "{id}: {err}");
        assert_eq!(dead_letter_reason(&redis, &id), "permanent error");
    }
    assert_eq!(engine.requests().len(), 0, "{:?}", engine.requests());
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

#[test]
fn cancellation_closes_the_engine_connection_at_the_next_cancel_poll() {
    let engine = FakeEngine::start(vec![Reply::sse()
        .send(chat_chunk("x"))
        .send(chat_chunk("y"))
        .hang()]);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &[("vllm", &engine.url())], &[]);
    let mut conn = redis.conn();
    xadd_job(
        &mut conn,
        QUEUE,
        "j-cancel",
        "llm_inference",
        r#"{"model":"m","messages":[{"role":"user","content":"go on"}]}"#,
    );
    wait_until("two chunks", WAIT, || {
        (sub.events_for("j-cancel")
            .iter()
            .filter(|e| event_type(e) == "chunk")
            .count()
            == 2)
            .then_some(())
    });
    assert!(engine.requests()[0].closed_at.is_none(), "still streaming");
    let cancelled_at = Instant::now();
    redis::cmd("SET")
        .arg("job:cancelled:j-cancel")
        .arg(1)
        .exec(&mut conn)
        .unwrap();
    let closed_at = engine.wait_closed(0, WAIT);
    let took = closed_at.duration_since(cancelled_at);
    // One 100 ms cancel poll, then the cancel hook shuts the socket down;
    // 2.9 s of slack for a loaded machine, still far below anything else
    // that could end the hung stream (the idle timeout is 30 s).
    assert!(
        took < Duration::from_secs(3),
        "engine saw the close after {took:?} with a 100ms cancel poll"
    );
    let ev = sub.wait_for("j-cancel", "cancelled", WAIT);
    assert_eq!(event_type(&ev), "cancelled");
    assert_eq!(chunks(&sub.events_for("j-cancel")), ["x", "y"]);
    wait_status(&mut conn, "j-cancel", "cancelled", WAIT);
    assert_eq!(engine.requests().len(), 1);
}

// ---------------------------------------------------------------------------
// citadel status
// ---------------------------------------------------------------------------

#[test]
fn status_says_which_engines_answer() {
    let vllm = FakeEngine::always(Reply::json(
        200,
        r#"{"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model","owned_by":"vllm"}]}"#,
    ));
    let llama = FakeEngine::always(Reply::json(
        503,
        r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
    ));
    let dead = dead_url();
    let out = citadel_cmd(&[
        "status",
        "--vllm-url",
        &vllm.url(),
        "--llamacpp-url",
        &llama.url(),
        "--ollama-url",
        &dead,
        "--engine-connect-timeout",
        "1s",
    ])
    .output()
    .expect("running citadel status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line("vllm"),
        format!("vllm {} ready (models: Qwen/Qwen3-0.6B)", vllm.url())
    );
    assert_eq!(
        line("llamacpp"),
        format!(
            "llamacpp {} not ready: HTTP 503: Loading model",
            llama.url()
        )
    );
    assert_eq!(
        line("ollama"),
        format!("ollama {dead} not answering: connection refused")
    );
    assert_eq!(vllm.probes()[0].path, "/v1/models");
    assert_eq!(llama.probes()[0].path, "/health");
}

// ---------------------------------------------------------------------------
// The fake engine itself
// ---------------------------------------------------------------------------

/// What the split-stream tests rely on: a reply cut into pieces reaches the
/// client in as many reads, even when the client is slow to read (a slow
/// reader is what would otherwise merge them).
#[test]
fn fake_engine_delivers_each_piece_of_a_split_reply_in_its_own_read() {
    use std::io::{Read, Write};
    let wire = b"data: one\n\ndata: two\n\n";
    let cuts = [4, 5, 11, 12, 20];
    let engine = FakeEngine::start(vec![Reply::sse()
        .framing(Framing::Close)
        .send_split(wire, &cuts)]);
    let addr = engine.url().trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let mut reads: Vec<Vec<u8>> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // A slow reader: the engine has long written the next piece by now,
        // unless it waits for this read.
        std::thread::sleep(Duration::from_millis(20));
        match conn.read(&mut buf).unwrap() {
            0 => break,
            n => reads.push(buf[..n].to_vec()),
        }
    }
    // The head may come with the first piece; every later read is one piece.
    let first = reads.remove(0);
    let head_end = first.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut pieces = vec![first[head_end..].to_vec()];
    pieces.retain(|p| !p.is_empty());
    pieces.extend(reads);
    let want: Vec<&[u8]> = vec![
        &wire[..4],
        &wire[4..5],
        &wire[5..11],
        &wire[11..12],
        &wire[12..20],
        &wire[20..],
    ];
    assert_eq!(
        pieces
            .iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>(),
        want.iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>()
    );
}
