//! `extraction` end to end: the real `citadel work` (against a real
//! redis-server) and `citadel run-job` against a fake extraction service
//! (tests/support/fake_extraction.rs). Each test checks what the service was
//! asked (health probes, the `/extract` body), the job's result or error
//! text, and the retry decision (how many requests the service saw, the
//! dead letter's reason). Limits are set in milliseconds and bytes through
//! the settings so the failure cases run fast.

mod support;

use serde_json::{json, Value as Json};
use std::process::Output;
use std::time::{Duration, Instant};
use support::fake_extraction::{Answer, FakeExtraction};
use support::observe::{status, wait_status};
use support::{citadel_cmd, wait_until, xadd_job, xrange_all, Citadel, RedisServer, Subscriber};

const WAIT: Duration = Duration::from_secs(20);
const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";

/// What a GLiNER-style service answers.
const ENTITIES: &str =
    r#"{"entities":{"person":["Ada Lovelace"],"company":["IBM"]},"model":"gliner2-base"}"#;

/// `citadel work` against `redis` and the extraction service at `url`, with
/// fast retries (none unless `extra` says so) and `extra` last.
fn worker(redis: &RedisServer, url: &str, extra: &[&str]) -> Citadel {
    let node = format!("ext-{}", support::free_port());
    let mut args = vec![
        "--node-name",
        &node,
        "--block",
        "1s",
        "--cancel-poll",
        "100ms",
        "--retry-base",
        "5ms",
        "--retry-cap",
        "20ms",
        "--max-retries",
        "0",
        "--shutdown-grace",
        "2s",
        "--extraction-url",
        url,
    ];
    args.extend_from_slice(extra);
    Citadel::work(redis, &args, &[])
}

/// `citadel run-job <job>` against the service at `url`; waits for it to exit.
fn run_job(url: &str, job: Json, extra: &[&str]) -> Output {
    let job = job.to_string();
    let mut args = vec!["run-job", "--extraction-url", url, "--retry-base", "5ms"];
    args.extend_from_slice(extra);
    args.push(&job);
    citadel_cmd(&args)
        .output()
        .expect("running citadel run-job")
}

/// A URL where nothing listens.
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", support::free_port())
}

/// Enqueues a job and waits for its terminal event; returns its events.
fn run(redis: &RedisServer, sub: &Subscriber, id: &str, kind: &str, payload: Json) -> Vec<Json> {
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, id, kind, &payload.to_string());
    wait_until(&format!("a terminal event of {id}"), WAIT, || {
        let events = sub.events_for(id);
        events
            .iter()
            .any(|e| support::observe::is_terminal(support::observe::event_type(e)))
            .then_some(events)
    })
}

fn types(events: &[Json]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default())
        .collect()
}

/// The `end` event's result; panics (with the events) if the job did not succeed.
fn result(events: &[Json]) -> Json {
    let e = events.last().expect("at least one event");
    assert_eq!(e["type"], "end", "{events:?}");
    e["data"]["result"].clone()
}

/// The `error` event's text; panics (with the events) if the job did not fail.
fn error_text(events: &[Json]) -> String {
    let e = events.last().expect("at least one event");
    assert_eq!(e["type"], "error", "{events:?}");
    e["data"]["error"].as_str().unwrap().to_owned()
}

/// The reason and error of the dead letter of job `id`.
fn dead_letter(redis: &RedisServer, id: &str) -> (String, String) {
    let letters = xrange_all(&mut redis.conn(), DLQ);
    letters
        .iter()
        .find(|(_, f)| f.get("jobId").map(String::as_str) == Some(id))
        .map(|(_, f)| (f["reason"].clone(), f["error"].clone()))
        .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:?}"))
}

// ---------------------------------------------------------------------------
// Success
// ---------------------------------------------------------------------------

#[test]
fn text_and_schema_go_to_the_service_after_health_and_its_json_is_the_result() {
    let service = FakeExtraction::start(Answer::Json(200, ENTITIES.into()));
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &service.url(), &[]);
    let schema = json!({"entities": ["person", "company"]});
    let events = run(
        &redis,
        &sub,
        "j-ok",
        "GLINER_EXTRACTION",
        json!({"text": "Ada Lovelace met IBM.", "schema": schema, "timeout_ms": 60000}),
    );
    assert_eq!(types(&events), ["claimed", "start", "end"]);
    assert_eq!(
        result(&events),
        serde_json::from_str::<Json>(ENTITIES).unwrap()
    );
    assert_eq!(service.requests(), ["GET /health", "POST /extract"]);
    assert_eq!(
        service.extracts()[0].json(),
        json!({"text": "Ada Lovelace met IBM.", "schema": schema}),
        "the service gets text and schema, nothing else"
    );
    wait_status(&mut redis.conn(), "j-ok", "completed", WAIT);
}

#[test]
fn run_job_sends_labels_and_prints_the_services_json() {
    let service = FakeExtraction::start(Answer::Json(200, ENTITIES.into()));
    let out = run_job(
        &service.url(),
        json!({"type": "EXTRACTION", "payload": {"text": "Ada at IBM", "labels": ["person", "company"]}}),
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed: Json = serde_json::from_str(stdout.trim()).expect("run-job prints JSON");
    assert_eq!(printed, serde_json::from_str::<Json>(ENTITIES).unwrap());
    assert_eq!(
        service.extracts()[0].json(),
        json!({"text": "Ada at IBM", "labels": ["person", "company"]})
    );
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

#[test]
fn service_not_running_is_retried_then_dead_lettered() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let dead = dead_url();
    let _w = worker(&redis, &dead, &["--max-retries", "1"]);
    let events = run(&redis, &sub, "j-down", "extraction", json!({"text": "x"}));
    let want = format!(
        "the extraction service is not running on this node (expected at {dead}) \
         (gave up after 2 attempts)"
    );
    assert_eq!(error_text(&events), want);
    assert_eq!(
        dead_letter(&redis, "j-down"),
        ("retries exhausted".into(), want)
    );
}

#[test]
fn service_that_becomes_healthy_after_some_probes_is_waited_for() {
    let service = FakeExtraction::ready_after(3, Answer::Json(200, ENTITIES.into()));
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &service.url(),
        &["--extraction-ready-timeout", "30s"],
    );
    let events = run(&redis, &sub, "j-warm", "extraction", json!({"text": "x"}));
    assert_eq!(result(&events)["model"], "gliner2-base");
    assert_eq!(
        service.requests(),
        [
            "GET /health",
            "GET /health",
            "GET /health",
            "GET /health",
            "POST /extract"
        ],
        "three 503s, a 200, then the extraction, in one attempt"
    );
}

#[test]
fn service_never_healthy_is_retryable_and_names_its_setting() {
    let service = FakeExtraction::ready_after(usize::MAX, Answer::Json(200, ENTITIES.into()));
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &service.url(),
        &["--extraction-ready-timeout", "1s"],
    );
    let t0 = Instant::now();
    let events = run(&redis, &sub, "j-cold", "extraction", json!({"text": "x"}));
    let want = format!(
        "the extraction service at {} did not become ready within 1s \
         (extraction-ready-timeout); last answer to GET /health: HTTP 503: loading model \
         (gave up after 1 attempts)",
        service.url()
    );
    assert_eq!(error_text(&events), want);
    assert_eq!(dead_letter(&redis, "j-cold").0, "retries exhausted");
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(service.health_probes() >= 2, "{:?}", service.requests());
    assert!(service.extracts().is_empty(), "{:?}", service.requests());
}

// ---------------------------------------------------------------------------
// The service's answers
// ---------------------------------------------------------------------------

#[test]
fn http_500_is_permanent_and_carries_the_services_message_clipped() {
    let detail = format!("CUDA out of memory. {}", "x".repeat(1000));
    let service = FakeExtraction::start(Answer::Json(500, json!({ "detail": detail }).to_string()));
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &service.url(), &["--max-retries", "3"]);
    let events = run(&redis, &sub, "j-500", "extraction", json!({"text": "x"}));
    let err = error_text(&events);
    assert!(
        err.starts_with("the extraction service answered HTTP 500: CUDA out of memory. xxx"),
        "{err}"
    );
    assert!(err.ends_with("x…"), "clipped: {err}");
    assert!(
        err.chars().count() < 400,
        "clipped: {} chars",
        err.chars().count()
    );
    assert_eq!(events.last().unwrap()["data"]["recoverable"], false);
    assert_eq!(dead_letter(&redis, "j-500").0, "permanent error");
    assert_eq!(service.extracts().len(), 1, "an answer is not retried");
}

#[test]
fn an_answer_that_is_not_json_is_permanent() {
    let page = "<html>\n<body>Welcome to nginx!</body>\n</html>\n";
    let service = FakeExtraction::start(Answer::Text(200, page.into()));
    let out = run_job(
        &service.url(),
        json!({"type": "extraction", "payload": {"text": "x"}}),
        &["--max-retries", "3"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "citadel: job local failed (permanent error): the extraction service answered \
         HTTP 200 with something that is not JSON: <html> <body>Welcome to nginx!</body> </html>"
    );
    assert_eq!(service.extracts().len(), 1, "an answer is not retried");
}

#[test]
fn no_answer_within_extraction_timeout_is_retryable() {
    let service = FakeExtraction::start(Answer::Hang);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &service.url(),
        &["--extraction-timeout", "300ms", "--max-retries", "1"],
    );
    let events = run(&redis, &sub, "j-hung", "extraction", json!({"text": "x"}));
    assert_eq!(
        error_text(&events),
        format!(
            "the extraction service at {} sent no answer within 300ms (extraction-timeout) \
             (gave up after 2 attempts)",
            service.url()
        )
    );
    assert_eq!(dead_letter(&redis, "j-hung").0, "retries exhausted");
    assert_eq!(service.extracts().len(), 2);
    service.wait_closed(0, WAIT);
    service.wait_closed(1, WAIT);
}

// ---------------------------------------------------------------------------
// What is refused before the service is called
// ---------------------------------------------------------------------------

#[test]
fn input_over_extraction_max_bytes_is_permanent_and_never_sent() {
    let service = FakeExtraction::start(Answer::Json(200, ENTITIES.into()));
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        &service.url(),
        &["--extraction-max-bytes", "100", "--max-retries", "3"],
    );
    // {"text":"…"} is 11 bytes around the text.
    let fits = json!({"text": "x".repeat(89)});
    assert_eq!(fits.to_string().len(), 100);
    let events = run(&redis, &sub, "j-fits", "extraction", fits);
    result(&events);
    assert_eq!(service.extracts().len(), 1);

    let events = run(
        &redis,
        &sub,
        "j-big",
        "extraction",
        json!({"text": "x".repeat(90)}),
    );
    assert_eq!(
        error_text(&events),
        "extraction: the input is 101 bytes as JSON, more than extraction-max-bytes (100)"
    );
    assert_eq!(dead_letter(&redis, "j-big").0, "permanent error");
    assert_eq!(
        service.requests(),
        ["GET /health", "POST /extract"],
        "the big one contacted nothing"
    );
}

#[test]
fn bad_payloads_fail_permanently_without_calling_the_service() {
    let service = FakeExtraction::start(Answer::Json(200, ENTITIES.into()));
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &service.url(), &["--max-retries", "3"]);
    let cases = [
        (
            json!({"schema": {"entities": ["person"]}}),
            "extraction: payload.text is required (the text to extract from)",
        ),
        (
            json!({"text": ["a", "b"]}),
            "extraction: payload.text must be a string, got an array",
        ),
        (json!({"text": ""}), "extraction: payload.text is empty"),
        (
            json!({"text": "t", "schema": "person"}),
            "extraction: payload.schema must be an object, got a string",
        ),
        (
            json!({"text": "t", "labels": {"person": 1}}),
            "extraction: payload.labels must be an array of strings, got an object",
        ),
        (
            json!({"text": "t", "labels": ["person", 7]}),
            "extraction: payload.labels[1] must be a non-empty string, got 7",
        ),
    ];
    for (i, (payload, want)) in cases.into_iter().enumerate() {
        let id = format!("j-bad-{i}");
        let events = run(&redis, &sub, &id, "extraction", payload);
        assert_eq!(error_text(&events), want, "{id}");
        assert_eq!(dead_letter(&redis, &id).0, "permanent error", "{id}");
    }
    assert!(service.requests().is_empty(), "{:?}", service.requests());
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

#[test]
fn cancellation_closes_the_service_connection() {
    let service = FakeExtraction::start(Answer::Hang);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, &service.url(), &["--extraction-timeout", "10m"]);
    let mut conn = redis.conn();
    xadd_job(
        &mut conn,
        QUEUE,
        "j-cancel",
        "extraction",
        r#"{"text":"long"}"#,
    );
    service.wait_extract(0, WAIT);
    assert!(service.extracts()[0].closed_at.is_none(), "still waiting");
    let cancelled_at = Instant::now();
    redis::cmd("SET")
        .arg("job:cancelled:j-cancel")
        .arg(1)
        .exec(&mut conn)
        .unwrap();
    let took = service.wait_closed(0, WAIT).duration_since(cancelled_at);
    // --cancel-poll is 100ms; far below --extraction-timeout either way.
    assert!(
        took < Duration::from_secs(5),
        "the service saw the close after {took:?}"
    );
    sub.wait_for("j-cancel", "cancelled", WAIT);
    wait_status(&mut conn, "j-cancel", "cancelled", WAIT);
    assert_eq!(
        service.extracts().len(),
        1,
        "{:?}",
        status(&mut conn, "j-cancel")
    );
}

// ---------------------------------------------------------------------------
// citadel status
// ---------------------------------------------------------------------------

#[test]
fn status_says_whether_the_extraction_service_is_ready() {
    let loading = FakeExtraction::ready_after(usize::MAX, Answer::Hang);
    let ready = FakeExtraction::start(Answer::Hang);
    let dead = dead_url();
    let line = |url: &str| {
        let out = citadel_cmd(&[
            "status",
            "--extraction-url",
            url,
            "--vllm-url",
            &dead,
            "--ollama-url",
            &dead,
            "--llamacpp-url",
            &dead,
        ])
        .output()
        .expect("running citadel status");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{text}");
        text.lines()
            .find(|l| l.starts_with("extraction "))
            .unwrap_or_else(|| panic!("no extraction line in:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line(&loading.url()),
        format!(
            "extraction {} not ready: HTTP 503: loading model",
            loading.url()
        )
    );
    assert_eq!(
        line(&ready.url()),
        format!("extraction {} ready", ready.url())
    );
    assert_eq!(
        line(&dead),
        format!("extraction {dead} not answering: connection refused")
    );
    assert_eq!(ready.requests(), ["GET /health"]);
}
