//! `citadel gateway` end to end, with a raw HTTP client: the real gateway,
//! a real `citadel work` and a real redis-server, the fake vLLM engine
//! behind the worker. Exact SSE bytes, `[DONE]`, OpenAI error objects and
//! statuses, bad and huge requests, slow clients, API keys, routes, the
//! 503 / 504 / disconnect paths; and the replayable events read by
//! `citadel follow` (late start, resuming from an id, lost connections).

mod support;

use serde_json::{json, Value as Json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::fake_engine::{FakeEngine, Reply};
use support::{citadel_cmd, free_port, hgetall, wait_until, xadd_job, xlen, Citadel, RedisServer};

const WAIT: Duration = Duration::from_secs(30);
const QUEUE: &str = "jobs:v1:gpu-general";

/// One vLLM chat stream event carrying `text` (and a finish reason).
fn vllm_event(text: &str, finish: Option<&str>) -> String {
    let chunk = json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"content": text}, "logprobs": null,
        "finish_reason": finish}]});
    format!("data: {chunk}\n\n")
}

/// A vLLM chat stream of `tokens`, its usage, `[DONE]`.
fn vllm_stream(tokens: &[&str]) -> Reply {
    let mut r = Reply::sse();
    for (i, t) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        r = r.send(vllm_event(t, last.then_some("stop")));
    }
    r.send(
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n",
    )
    .send("data: [DONE]\n\n")
}

/// A gateway (and, unless `worker` is false, a worker) against one Redis.
struct Stack {
    redis: RedisServer,
    engine: FakeEngine,
    _worker: Option<Citadel>,
    gateway: Citadel,
    addr: String,
}

fn stack(engine: FakeEngine, gateway_args: &[&str], worker: bool) -> Stack {
    let redis = RedisServer::start();
    let worker = worker.then(|| {
        let w = support::worker(
            &redis,
            &format!("gw-node-{}", free_port()),
            &[
                "--vllm-url",
                &engine.url(),
                "--retry-base",
                "20ms",
                "--max-retries",
                "1",
            ],
        );
        w.wait_working();
        w
    });
    let (gateway, addr) = gateway(&redis, gateway_args);
    Stack {
        redis,
        engine,
        _worker: worker,
        gateway,
        addr,
    }
}

fn gateway(redis: &RedisServer, extra: &[&str]) -> (Citadel, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["gateway", "--listen", &addr];
    args.extend_from_slice(extra);
    let url = redis.url();
    let g = Citadel::spawn(&args, &[("CITADEL_REDIS_URL", &url), ("RUST_LOG", "debug")]);
    g.wait_for_log("gateway: listening on", WAIT);
    (g, addr)
}

/// A whole HTTP response.
#[derive(Debug)]
struct Http {
    status: u16,
    head: String,
    /// The body, de-chunked.
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn json(&self) -> Json {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI error object with this status; returns `error`.
    fn error(&self, status: u16) -> Json {
        assert_eq!(self.status, status, "{}\n{}", self.head, self.text());
        let e = self.json()["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["type"].is_string(), "{e}");
        e
    }
}

/// Send `raw`, read until the server closes; the response parsed.
fn exchange(addr: &str, raw: &[u8]) -> Http {
    let mut s = TcpStream::connect(addr).expect("connecting to the gateway");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(raw).expect("sending the request");
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> Http {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    parse_response(&all)
}

fn parse_response(all: &[u8]) -> Http {
    let text = String::from_utf8_lossy(all);
    let (head, _) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {text:?}"));
    let body_start = head.len() + 4;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let raw = &all[body_start..];
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    Http {
        status,
        head: head.to_owned(),
        body,
    }
}

/// A chunked body's bytes; panics on a broken framing, stops at its end
/// (or where the bytes end: a stream cut off).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size in {:?}", String::from_utf8_lossy(raw)));
        if size == 0 {
            return out;
        }
        let data = &raw[eol + 2..];
        out.extend_from_slice(&data[..size]);
        assert_eq!(&data[size..size + 2], b"\r\n", "chunk not closed by CRLF");
        raw = &data[size + 2..];
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
    for (n, v) in headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

fn post(addr: &str, path: &str, body: &Json) -> Http {
    exchange(
        addr,
        &request("POST", path, &[], body.to_string().as_bytes()),
    )
}

fn chat(stream: bool) -> Json {
    json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": stream,
           "max_tokens": 8, "temperature": 0})
}

/// The `data:` payloads of an SSE body, checking each event is `data: …\n\n`
/// (comments `: …` are returned as they are).
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "an event stream ends with a blank line: {body:?}"
    );
    body.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|e| match e.strip_prefix("data: ") {
            Some(d) => d.to_owned(),
            None => {
                assert!(e.starts_with(": "), "not an SSE event: {e:?}");
                e.to_owned()
            }
        })
        .collect()
}

/// The `delta.content` of each chat chunk among `events` (the role chunk's
/// "" included).
fn delta_contents(events: &[String]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Json>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn streamed_chat_is_role_chunks_finish_usage_then_done_as_exact_sse() {
    let st = stack(
        FakeEngine::start(vec![vllm_stream(&["Hel", "lo", " wörld"])]),
        &[],
        true,
    );
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&st.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
    let job = r.header("x-citadel-job-id").expect("the job id header");
    let events = sse_events(&r.text());
    let first: Json = serde_json::from_str(&events[0]).unwrap();
    let (id, created) = (format!("chatcmpl-{job}"), first["created"].clone());
    let chunk = |choice: Json, usage: Json| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": "m",
               "choices": choice, "usage": usage})
        .to_string()
    };
    let delta = |content: &str| {
        chunk(
            json!([{"index": 0, "delta": {"content": content}, "logprobs": null, "finish_reason": null}]),
            Json::Null,
        )
    };
    let want = vec![
        chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                    "finish_reason": null}]),
            Json::Null,
        ),
        delta("Hel"),
        delta("lo"),
        delta(" wörld"),
        chunk(
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]),
            Json::Null,
        ),
        chunk(
            json!([]),
            json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
        ),
        "[DONE]".to_owned(),
    ];
    // Byte for byte: every event is serde_json's text of the object above.
    assert_eq!(events, want);
    // What the engine was asked.
    let asked = st.engine.requests()[0].json();
    assert_eq!(
        asked["messages"],
        json!([{"role": "user", "content": "Hi"}])
    );
    assert_eq!(
        (asked["max_tokens"].clone(), asked["temperature"].clone()),
        (json!(8), json!(0))
    );
    let mut c = st.redis.conn();
    wait_until("the job's completed status", WAIT, || {
        (hgetall(&mut c, &format!("job:{job}:status")).get("status")
            == Some(&"completed".to_owned()))
        .then_some(())
    });
}

#[test]
fn whole_chat_and_text_completion_answers_carry_usage() {
    let completions = Reply::sse()
        .send("data: {\"choices\":[{\"index\":0,\"text\":\" Paris\",\"finish_reason\":null}]}\n\n")
        .send(
            "data: {\"choices\":[{\"index\":0,\"text\":\" is\",\"finish_reason\":\"length\"}]}\n\n",
        )
        .send("data: [DONE]\n\n");
    let st = stack(
        FakeEngine::start(vec![vllm_stream(&["Hi", " there"]), completions]),
        &[],
        true,
    );
    let r = post(&st.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
    );

    let r = post(
        &st.addr,
        "/v1/completions",
        &json!({"model": "m", "prompt": "The capital of France", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], " Paris is");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // No usage from the engine: the chunks stand in for the tokens.
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(st.engine.requests()[1].path, "/v1/completions");
    assert_eq!(
        st.engine.requests()[1].json()["prompt"],
        "The capital of France"
    );
}

#[test]
fn bad_requests_are_openai_errors_naming_the_field_and_enqueue_nothing() {
    let st = stack(
        FakeEngine::start(vec![]),
        &["--gateway-max-body", "4096"],
        false,
    );
    let addr = &st.addr;
    let raw = |body: &[u8]| exchange(addr, &request("POST", "/v1/chat/completions", &[], body));
    let e = raw(b"{not json").error(400);
    assert_eq!(e["type"], "invalid_request_error");
    raw(b"[1,2]").error(400);
    raw(b"").error(400);
    raw(b"\xff\xfe\x00").error(400);
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (json!({"model": 5, "messages": []}), "model"),
        (json!({"model": "m"}), "messages"),
        (json!({"model": "m", "messages": "hi"}), "messages"),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "8"}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
            "temperature",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            "stream",
        ),
    ];
    for (body, param) in cases {
        let e = post(addr, "/v1/chat/completions", &body).error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    let e = post(addr, "/v1/completions", &json!({"model": "m", "prompt": 7})).error(400);
    assert_eq!(e["param"], "prompt");
    // Too large, by its Content-Length: answered before the body is read.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 999999999\r\n\r\n{",
    )
    .unwrap();
    let r = read_response(&mut s);
    assert!(r.error(413)["message"].as_str().unwrap().contains("4096"));
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(5000));
    exchange(
        addr,
        &request("POST", "/v1/completions", &[], big.as_bytes()),
    )
    .error(413);
    // Within the body limit but over the workers' --max-job-size.
    let st2 = stack(
        FakeEngine::start(vec![]),
        &["--max-job-size", "1000"],
        false,
    );
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(2000));
    let e = exchange(
        &st2.addr,
        &request("POST", "/v1/completions", &[], big.as_bytes()),
    )
    .error(413);
    assert!(
        e["message"].as_str().unwrap().contains("--max-job-size"),
        "{e}"
    );
    // Chunked request bodies: no length to check, refused.
    let r = exchange(
        addr,
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    r.error(411);
    // Headers over the limit.
    let huge = "a".repeat(20_000);
    exchange(
        addr,
        &request("GET", "/v1/models", &[("X-Big", &huge)], b""),
    )
    .error(431);
    // Unknown path, wrong method.
    let e = exchange(addr, &request("POST", "/v2/anything", &[], b"{}")).error(404);
    assert!(e["message"].as_str().unwrap().contains("/v2/anything"));
    let r = exchange(addr, &request("GET", "/v1/chat/completions", &[], b""));
    r.error(405);
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    // Garbage that is not HTTP: an error, and the gateway still serves.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"\x00\x01\x02 garbage\r\n\r\n").unwrap();
    let mut junk = Vec::new();
    let _ = s.read_to_end(&mut junk);
    assert!(
        junk.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&junk)
    );
    let r = exchange(addr, &request("GET", "/healthz", &[], b""));
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("ok")));
    let mut c = st.redis.conn();
    assert_eq!(xlen(&mut c, QUEUE), 0, "no bad request became a job");
}

#[test]
fn api_keys_missing_or_wrong_are_401_and_never_logged() {
    let st = stack(
        FakeEngine::start(vec![]),
        &[
            "--api-key",
            "sk-right-key-1",
            "--api-key",
            "sk-other-key-2",
            "--route",
            "m1=vllm",
        ],
        false,
    );
    let models = |auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        exchange(&st.addr, &request("GET", "/v1/models", &h, b""))
    };
    let e = models(None).error(401);
    assert!(e["message"].as_str().unwrap().contains("API key"), "{e}");
    assert_eq!(
        models(Some("Bearer sk-wrong-key")).error(401)["code"],
        "invalid_api_key"
    );
    models(Some("Basic sk-right-key-1")).error(401);
    models(Some("Bearer sk-right-key-1x")).error(401);
    for key in ["Bearer sk-right-key-1", "Bearer sk-other-key-2"] {
        let r = models(Some(key));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({"object": "list", "data": [{"id": "m1", "object": "model", "created": 0,
                                               "owned_by": "citadel"}]})
        );
    }
    let r = exchange(&st.addr, &request("POST", "/v1/completions", &[], b"{}"));
    r.error(401);
    // Health needs no key.
    assert_eq!(
        exchange(&st.addr, &request("GET", "/healthz", &[], b"")).status,
        200
    );
    let log = st.gateway.log();
    assert!(
        !log.contains("sk-right-key-1") && !log.contains("sk-other-key-2"),
        "{log}"
    );
}

#[test]
fn without_keys_a_public_address_is_refused_unless_insecure_no_auth() {
    let out = citadel_cmd(&["gateway", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without API keys") && err.contains("--insecure-no-auth"),
        "{err}"
    );
}

#[test]
fn routes_pick_the_queue_and_an_unrouted_model_is_404() {
    let engine = FakeEngine::start(vec![vllm_stream(&["ok"])]);
    let redis = RedisServer::start();
    let w = support::worker(
        &redis,
        "routed",
        &["--queue", "jobs:v1:a100", "--vllm-url", &engine.url()],
    );
    w.wait_working();
    let (_g, addr) = gateway(&redis, &["--route", "big=vllm@jobs:v1:a100"]);
    let mut body = chat(false);
    body["model"] = json!("small");
    let e = post(&addr, "/v1/chat/completions", &body).error(404);
    assert_eq!(e["code"], "model_not_found");
    body["model"] = json!("big");
    let r = post(&addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "ok");
    assert_eq!(engine.requests()[0].json()["model"], "big");
    let mut c = redis.conn();
    assert_eq!(xlen(&mut c, QUEUE), 0);
    assert_eq!(xlen(&mut c, "jobs:v1:a100"), 1);
}

#[test]
fn no_worker_is_503_with_retry_after_and_the_job_is_withdrawn() {
    let st = stack(
        FakeEngine::start(vec![]),
        &["--gateway-claim-timeout", "300ms"],
        false,
    );
    let r = post(&st.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.error(503)["code"], "no_worker");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    let mut c = st.redis.conn();
    assert_eq!(xlen(&mut c, QUEUE), 0, "the entry was taken back");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("job:cancelled:*")
        .query(&mut c)
        .unwrap();
    assert_eq!(keys.len(), 1, "a worker reading it late would not run it");
}

#[test]
fn a_job_past_its_deadline_is_504_and_the_engine_is_let_go() {
    let st = stack(
        FakeEngine::always(Reply::sse().hang()),
        &["--gateway-job-timeout", "500ms"],
        true,
    );
    let t = Instant::now();
    let r = post(&st.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.error(504)["code"], "job_deadline_exceeded");
    assert!(t.elapsed() < WAIT);
    // The worker's deadline (the job's timeout_ms) ended it, and the engine stream.
    let job = only_job(&st.redis);
    wait_status(&st.redis, &job, "failed");
    st.engine.wait_closed(0, WAIT);
    // A stream past its deadline: the same status, before the first byte.
    let r = post(&st.addr, "/v1/chat/completions", &chat(true));
    r.error(504);
}

#[test]
fn a_client_leaving_mid_stream_cancels_the_job_and_the_engine_connection_closes() {
    let mut slow = Reply::sse();
    for i in 0..200 {
        slow = slow
            .send(vllm_event(&format!("t{i} "), None))
            .pause(Duration::from_millis(50));
    }
    let st = stack(
        FakeEngine::start(vec![slow.send("data: [DONE]\n\n")]),
        &[],
        true,
    );
    let mut s = TcpStream::connect(&st.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat(true).to_string().as_bytes(),
    ))
    .unwrap();
    // Read until two text chunks came, then leave.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got)
        .matches("\"content\":\"t")
        .count()
        < 2
    {
        let n = s.read(&mut buf).expect("reading the stream");
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let job = parse_response(&got).header("x-citadel-job-id").unwrap();
    drop(s);
    let mut c = st.redis.conn();
    wait_until("the job to end cancelled", WAIT, || {
        (hgetall(&mut c, &format!("job:{job}:status")).get("status")
            == Some(&"cancelled".to_owned()))
        .then_some(())
    });
    st.engine.wait_closed(0, WAIT);
    st.gateway
        .wait_for_log(&format!("job {job} cancelled (the client went away)"), WAIT);
}

#[test]
fn an_error_after_the_stream_started_is_an_error_object_without_done() {
    let broken = Reply::sse()
        .send(vllm_event("a", None))
        .send(vllm_event("b", None))
        .reset();
    let st = stack(FakeEngine::start(vec![broken]), &[], true);
    let r = post(&st.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    let events = sse_events(&r.text());
    let last: Json = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].as_str().is_some(), "{events:?}");
    assert!(!events.contains(&"[DONE]".to_owned()), "{events:?}");
    let texts: Vec<Json> = events[1..3]
        .iter()
        .map(|e| serde_json::from_str::<Json>(e).unwrap()["choices"][0]["delta"]["content"].clone())
        .collect();
    assert_eq!(texts, [json!("a"), json!("b")]);
}

#[test]
fn a_slow_first_token_gets_keepalive_comments() {
    let late = Reply::sse()
        .pause(Duration::from_millis(1500))
        .send(vllm_event("late", Some("stop")))
        .send("data: [DONE]\n\n");
    let st = stack(
        FakeEngine::start(vec![late]),
        &["--gateway-keepalive", "200ms"],
        true,
    );
    let r = post(&st.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200, "{}", r.text());
    let events = sse_events(&r.text());
    let role = events.iter().position(|e| e.contains("\"role\"")).unwrap();
    let first_text = events.iter().position(|e| e.contains("late")).unwrap();
    assert!(
        events[role + 1..first_text]
            .iter()
            .any(|e| e == ": keep-alive"),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
}

/// Without routes, `GET /v1/models` lists what the nodes' heartbeats say
/// their engines serve (here the fake vLLM's model, under its bare name
/// since vLLM is the default backend), with the nodes serving each; a
/// Redis that cannot be read is a 503, not an empty list.
#[test]
fn models_without_routes_come_from_the_nodes_heartbeats() {
    let engine = FakeEngine::start(vec![]);
    engine.set_probe_reply(Reply::json(
        200,
        r#"{"object":"list","data":[{"id":"fake-8b"}]}"#,
    ));
    let mut redis = RedisServer::start();
    let _w = support::worker(
        &redis,
        "gw-models-node",
        &["--vllm-url", &engine.url(), "--heartbeat-interval", "1s"],
    );
    let (_g, addr) = gateway(&redis, &[]);
    let list = wait_until("the node's model in /v1/models", WAIT, || {
        let r = exchange(&addr, &request("GET", "/v1/models", &[], b""));
        assert_eq!(r.status, 200, "{}", r.text());
        let list = r.json();
        (list["data"].as_array().is_some_and(|d| !d.is_empty())).then_some(list)
    });
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["data"][0]["id"], "fake-8b");
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["citadel_nodes"], json!(["gw-models-node"]));
    redis.stop();
    let r = exchange(&addr, &request("GET", "/v1/models", &[], b""));
    r.error(503);
}

#[test]
fn slow_loris_clients_are_cut_off_while_others_are_served() {
    let st = stack(
        FakeEngine::start(vec![]),
        &["--gateway-client-timeout", "500ms", "--route", "m=vllm"],
        false,
    );
    // Half a head, then nothing.
    let mut loris = TcpStream::connect(&st.addr).unwrap();
    loris.set_read_timeout(Some(WAIT)).unwrap();
    loris
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-")
        .unwrap();
    // A head, and a body that never comes whole.
    let mut body_loris = TcpStream::connect(&st.addr).unwrap();
    body_loris.set_read_timeout(Some(WAIT)).unwrap();
    body_loris
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{\"mo",
        )
        .unwrap();
    let r = exchange(&st.addr, &request("GET", "/v1/models", &[], b""));
    assert_eq!(r.status, 200, "served meanwhile");
    let t = Instant::now();
    let r = read_response(&mut loris);
    r.error(408);
    assert!(t.elapsed() < Duration::from_secs(10));
    let mut rest = Vec::new();
    let _ = body_loris.read_to_end(&mut rest);
    // An idle keep-alive connection is closed too.
    let mut idle = TcpStream::connect(&st.addr).unwrap();
    idle.set_read_timeout(Some(WAIT)).unwrap();
    let mut nothing = Vec::new();
    let _ = idle.read_to_end(&mut nothing);
    assert!(nothing.is_empty());
}

#[test]
fn connections_over_the_limit_are_answered_503() {
    let st = stack(
        FakeEngine::start(vec![]),
        &["--gateway-max-connections", "2"],
        false,
    );
    let _a = TcpStream::connect(&st.addr).unwrap();
    let _b = TcpStream::connect(&st.addr).unwrap();
    let r = wait_until("a connection over the limit answered 503", WAIT, || {
        let r = exchange(&st.addr, &request("GET", "/healthz", &[], b""));
        (r.status == 503).then_some(r)
    });
    assert_eq!(r.error(503)["code"], "too_many_connections");
    drop((_a, _b));
    wait_until("a free connection again", WAIT, || {
        (exchange(&st.addr, &request("GET", "/healthz", &[], b"")).status == 200).then_some(())
    });
}

// ---------------------------------------------------------------------------
// Replay: citadel follow / submit --follow on events:v1:{jobId}
// ---------------------------------------------------------------------------

/// 100 chunks `c0 `…`c99 `, with a pause after the first 50.
fn hundred_with_a_pause() -> (Reply, String) {
    let mut r = Reply::sse();
    let mut all = String::new();
    for i in 0..100 {
        if i == 50 {
            r = r.pause(Duration::from_millis(1500));
        }
        let t = format!("c{i} ");
        all.push_str(&t);
        r = r.send(vllm_event(&t, (i == 99).then_some("stop")));
    }
    (r.send("data: [DONE]\n\n"), all)
}

/// An llm_inference payload the fake vLLM answers on /v1/chat/completions.
const COUNT_CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"count"}]}"#;

fn events_len(c: &mut redis::Connection, job: &str) -> usize {
    xlen(c, &format!("events:v1:{job}"))
}

fn follow_output(redis: &RedisServer, args: &[&str]) -> (i32, String) {
    let url = redis.url();
    let out = citadel_cmd(args)
        .env("CITADEL_REDIS_URL", &url)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_follower_started_after_50_chunks_gets_every_chunk_once_in_order() {
    let (reply, all) = hundred_with_a_pause();
    let engine = FakeEngine::start(vec![reply]);
    let redis = RedisServer::start();
    let w = support::worker(&redis, "replay", &["--vllm-url", &engine.url()]);
    w.wait_working();
    let mut c = redis.conn();
    xadd_job(&mut c, QUEUE, "j-late", "llm_inference", COUNT_CHAT);
    // claimed, start, 50 chunks.
    wait_until("50 chunks in the events stream", WAIT, || {
        (events_len(&mut c, "j-late") >= 52).then_some(())
    });
    let (code, out) = follow_output(&redis, &["follow", "j-late"]);
    assert_eq!(code, 0, "{out}");
    let (text, result) = out
        .strip_suffix('\n')
        .and_then(|o| o.rsplit_once('\n'))
        .unwrap_or_else(|| panic!("no result line: {out:?}"));
    assert_eq!(text, all.as_str(), "every chunk once, in order");
    let result: Json = serde_json::from_str(result).unwrap();
    assert_eq!(result["content"], all.as_str());
}

#[test]
fn a_follower_resuming_from_an_id_gets_exactly_what_came_after() {
    let engine = FakeEngine::start(vec![vllm_stream(&["a", "b", "c", "d"])]);
    let redis = RedisServer::start();
    let w = support::worker(&redis, "resume", &["--vllm-url", &engine.url()]);
    w.wait_working();
    let mut c = redis.conn();
    xadd_job(&mut c, QUEUE, "j-resume", "llm_inference", COUNT_CHAT);
    let (code, whole) = follow_output(&redis, &["follow", "j-resume"]);
    assert_eq!(code, 0);
    assert!(whole.starts_with("abcd\n"), "{whole}");
    // Entries: claimed, start, a, b, c, d, end. Resume after "b".
    let ids = support::xrange_all(&mut c, "events:v1:j-resume");
    let after_b = &ids[3].0;
    let (code, rest) = follow_output(&redis, &["follow", "j-resume", "--from", after_b]);
    assert_eq!(code, 0);
    assert!(rest.starts_with("cd\n"), "{rest}");
}

#[test]
fn a_follower_whose_connection_is_killed_goes_on_without_gaps_or_repeats() {
    let (reply, all) = hundred_with_a_pause();
    let engine = FakeEngine::start(vec![reply]);
    let redis = RedisServer::start();
    let w = support::worker(&redis, "killer", &["--vllm-url", &engine.url()]);
    w.wait_working();
    let mut c = redis.conn();
    let url = redis.url();
    let follower = citadel_cmd(&[
        "submit",
        "--type",
        "llm_inference",
        "--job-id",
        "j-kill",
        "--payload",
        COUNT_CHAT,
        "--follow",
    ])
    .env("CITADEL_REDIS_URL", &url)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // During the pause after 50 chunks, kill the follower's connection (the
    // one blocked in XREAD), and only that one.
    wait_until("50 chunks in the events stream", WAIT, || {
        (events_len(&mut c, "j-kill") >= 52).then_some(())
    });
    let killed = wait_until("the follower's XREAD connection", WAIT, || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
        let id = list
            .lines()
            .find(|l| l.split(' ').any(|f| f == "cmd=xread"))
            .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))?
            .to_owned();
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(&id)
            .query(&mut c)
            .unwrap();
        (n == 1).then_some(id)
    });
    assert!(!killed.is_empty());
    let out = follower.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert_eq!(stdout.lines().next(), Some(all.as_str()), "{stdout}");
    drop(w);
}

// ---------------------------------------------------------------------------
// More ways a request ends
// ---------------------------------------------------------------------------

fn wait_status(redis: &RedisServer, job: &str, want: &str) {
    let mut c = redis.conn();
    wait_until(&format!("job {job} to end {want}"), WAIT, || {
        (hgetall(&mut c, &format!("job:{job}:status")).get("status") == Some(&want.to_owned()))
            .then_some(())
    });
}

/// The id of the only gateway job Redis knows, once its status exists.
fn only_job(redis: &RedisServer) -> String {
    let mut c = redis.conn();
    wait_until("the gateway's job", WAIT, || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("job:gw-*:status")
            .query(&mut c)
            .ok()?;
        keys.first().map(|k| {
            k.trim_start_matches("job:")
                .trim_end_matches(":status")
                .to_owned()
        })
    })
}

#[test]
fn a_client_leaving_a_whole_answer_cancels_the_job_too() {
    let st = stack(FakeEngine::always(Reply::sse().hang()), &[], true);
    let mut s = TcpStream::connect(&st.addr).unwrap();
    s.write_all(&request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat(false).to_string().as_bytes(),
    ))
    .unwrap();
    st.engine.wait_requests(1, WAIT);
    let job = only_job(&st.redis);
    drop(s);
    wait_status(&st.redis, &job, "cancelled");
    st.engine.wait_closed(0, WAIT);
}

#[test]
fn stopping_the_gateway_cancels_the_jobs_it_answers() {
    let mut st = stack(FakeEngine::always(Reply::sse().hang()), &[], true);
    let mut s = TcpStream::connect(&st.addr).unwrap();
    s.write_all(&request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat(true).to_string().as_bytes(),
    ))
    .unwrap();
    st.engine.wait_requests(1, WAIT);
    let job = only_job(&st.redis);
    st.gateway.sigterm();
    assert!(st.gateway.wait_exit(WAIT).is_some_and(|s| s.success()));
    wait_status(&st.redis, &job, "cancelled");
}

#[test]
fn redis_unreachable_is_503_and_health_says_so() {
    let mut st = stack(
        FakeEngine::start(vec![]),
        &["--redis-timeout", "500ms"],
        false,
    );
    st.redis.kill();
    let e = post(&st.addr, "/v1/chat/completions", &chat(false)).error(503);
    assert_eq!(e["code"], "fabric_unavailable");
    let r = exchange(&st.addr, &request("GET", "/healthz", &[], b""));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "unavailable");
}

#[test]
fn a_redelivered_job_does_not_repeat_the_chunks_already_sent() {
    // First run: 3 chunks, then the worker dies; the second worker's run
    // streams all 5 from index 0.
    let first = Reply::sse()
        .send(vllm_event("t0 ", None))
        .send(vllm_event("t1 ", None))
        .send(vllm_event("t2 ", None))
        .hang();
    let engine = FakeEngine::start(vec![
        first,
        vllm_stream(&["t0 ", "t1 ", "t2 ", "t3 ", "t4"]),
    ]);
    let redis = RedisServer::start();
    let fast = ["--vllm-url", &engine.url(), "--claim-idle", "1s"];
    let mut dying = support::worker(&redis, "dying", &fast);
    dying.wait_working();
    let (_g, addr) = gateway(&redis, &[]);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&request(
        "POST",
        "/v1/chat/completions",
        &[],
        chat(true).to_string().as_bytes(),
    ))
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("t2 ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    dying.kill9();
    let heir = support::worker(&redis, "heir", &fast);
    heir.wait_working();
    let _ = s.read_to_end(&mut got);
    let r = parse_response(&got);
    let texts: Vec<String> = delta_contents(&sse_events(&r.text()))
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(texts, ["t0 ", "t1 ", "t2 ", "t3 ", "t4"], "{}", r.text());
    assert!(r.text().ends_with("data: [DONE]\n\n"));
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let st = stack(
        FakeEngine::start(vec![vllm_stream(&["one"]), vllm_stream(&["two"])]),
        &[],
        true,
    );
    let keep = |body: &Json| {
        let b = body.to_string();
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
    };
    // One after the other on one connection: a stream, then a whole answer.
    let mut s = TcpStream::connect(&st.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(keep(&chat(true)).as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let first = parse_response(&got);
    assert!(first.text().contains("\"one\"") && first.text().ends_with("data: [DONE]\n\n"));
    s.write_all(&request("GET", "/v1/models", &[], b""))
        .unwrap();
    let second = read_response(&mut s);
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.json()["object"], "list");
    // Pipelined: a stream and a models request sent at once.
    let mut s = TcpStream::connect(&st.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut both = keep(&chat(true)).into_bytes();
    both.extend_from_slice(&request("GET", "/v1/models", &[], b""));
    s.write_all(&both).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    // The stream's last chunk, after its head (a header value may end in 0).
    let body_at = text.find("\r\n\r\n").expect("the stream's head") + 4;
    let cut = body_at
        + text[body_at..]
            .find("\r\n0\r\n\r\n")
            .expect("the stream's end")
        + 7;
    let stream = parse_response(&all[..cut]);
    assert!(stream.text().contains("\"two\"") && stream.text().ends_with("data: [DONE]\n\n"));
    let models = parse_response(&all[cut..]);
    assert_eq!(
        (models.status, models.json()["object"].clone()),
        (200, json!("list"))
    );
}

#[test]
fn submit_follow_against_workers_without_the_stream_ends_by_the_status() {
    let redis = RedisServer::start();
    let w = support::worker(&redis, "nostream", &["--events-stream=false"]);
    w.wait_working();
    let url = redis.url();
    let out = citadel_cmd(&[
        "submit",
        "--type",
        "echo",
        "--payload",
        r#"{"chunks":2}"#,
        "--follow",
    ])
    .env("CITADEL_REDIS_URL", &url)
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("completed, but its events stream has no end event"),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let out = citadel_cmd(&[
        "submit",
        "--type",
        "echo",
        "--payload",
        r#"{"fail":"permanent"}"#,
        "--follow",
    ])
    .env("CITADEL_REDIS_URL", &url)
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("failed (its events stream has no terminal event)"));
}

/// An HTTP/1.0 client (nginx's default `proxy_http_version`) knows no
/// chunked transfer: its stream comes as a plain body that ends with the
/// connection, the same events; a whole answer is unchanged.
#[test]
fn an_http_1_0_client_gets_its_stream_as_a_body_ended_by_the_close() {
    let st = stack(
        FakeEngine::start(vec![vllm_stream(&["Hel", "lo"]), vllm_stream(&["Hi"])]),
        // An idle connection would be cut off after a minute, not sooner.
        &["--gateway-client-timeout", "60s"],
        true,
    );
    // Asked to keep the connection alive, it still ends the stream's body
    // by closing it (read_to_end ends at the close, not at the timeout).
    let http10 = |body: &Json| {
        let body = body.to_string();
        let raw = format!(
            "POST /v1/chat/completions HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(&st.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut all = Vec::new();
        if body.contains(r#""stream":true"#) {
            s.read_to_end(&mut all)
                .expect("the stream ends with the connection");
        } else {
            // A whole answer has its length: read just that.
            let mut buf = [0u8; 4096];
            while !parse_whole(&all) {
                let n = s.read(&mut buf).expect("the whole answer");
                assert!(n > 0, "closed before the whole answer");
                all.extend_from_slice(&buf[..n]);
            }
        }
        parse_response(&all)
    };
    let r = http10(&chat(true));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.head.starts_with("HTTP/1.0 200 OK\r\n"), "{}", r.head);
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    let events = sse_events(&r.text());
    assert_eq!(delta_contents(&events), ["", "Hel", "lo"], "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let r = http10(&chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hi");
}

/// Whether `all` holds a whole response with a `Content-Length`.
fn parse_whole(all: &[u8]) -> bool {
    let text = String::from_utf8_lossy(all);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok());
    len.is_some_and(|n| body.len() >= n)
}
