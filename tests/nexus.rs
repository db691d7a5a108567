//! The Nexus HTTP transport (PROTOCOL.md §3) and adaptive mode selection
//! (`citadel agent`): the real binary against the fake Nexus of
//! tests/support/fake_nexus.rs and, for the adaptive tests, a real
//! redis-server.
//!
//! Every test has its own fake Nexus (own port), its own `--state-dir` and,
//! where needed, its own Redis, so they run in parallel. Timings are
//! millisecond-scale (`--poll-interval 50ms`, `--nexus-retry-cap 200ms`…);
//! waits poll with deadlines.

mod support;

use serde_json::{json, Value as Json};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};
use support::fake_engine::{FakeEngine, Reply};
use support::fake_nexus::{FakeNexus, Next, Report, Request};
use support::observe::{info_lines_with, wait_info_lines};
use support::{citadel_cmd, free_port, hgetall, wait_until, xadd_job, xlen, Citadel, RedisServer};

const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";
/// The single-file spool of older versions, migrated at start.
const LEGACY_SPOOL: &str = "nexus-reports.json";
/// One file per undelivered report.
const SPOOL_DIR: &str = "nexus-spool";
/// Reports Nexus said it will never take.
const REJECTED_DIR: &str = "nexus-rejected";
const STATUS_FILE: &str = "agent-status.json";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A temp `--state-dir`, removed when the test passes (kept for a
/// post-mortem when it fails).
struct StateDir(PathBuf);

impl StateDir {
    fn new() -> StateDir {
        StateDir(support::fresh_temp_dir("nexus-state"))
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The file's content, `None` if it does not exist (or cannot be read).
    fn read(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.file(name)).ok()
    }

    /// The reports spooled for delivery, each file parsed (a torn one
    /// panics).
    fn spooled(&self) -> Vec<Json> {
        self.reports_in(SPOOL_DIR)
    }

    /// The reports in the rejected store.
    fn rejected(&self) -> Vec<Json> {
        self.reports_in(REJECTED_DIR)
    }

    /// Every `*.json` of `state/dir` (none if the directory is not there);
    /// a file removed while this reads is skipped.
    fn reports_in(&self, dir: &str) -> Vec<Json> {
        let Ok(entries) = fs::read_dir(self.file(dir)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| {
                let text = fs::read_to_string(e.path()).ok()?;
                Some(serde_json::from_str(&text).unwrap_or_else(|err| {
                    panic!(
                        "a torn report file {} ({err}): {text:?}",
                        e.path().display()
                    )
                }))
            })
            .collect()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- state dir kept: {} ---", self.0.display());
            for entry in fs::read_dir(&self.0).into_iter().flatten().flatten() {
                let text = fs::read_to_string(entry.path()).unwrap_or_default();
                eprintln!("{}:\n{text}", entry.path().display());
            }
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Short defaults for every Nexus-side setting; a flag in `extra` replaces
/// the default of the same name.
const DEFAULTS: &[(&str, &str)] = &[
    ("--node-name", "nexus-node"),
    ("--concurrency", "1"),
    ("--poll-interval", "50ms"),
    ("--nexus-timeout", "2s"),
    ("--nexus-retry-cap", "200ms"),
    ("--retry-base", "10ms"),
];

fn args_with_defaults(first: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    for (flag, value) in DEFAULTS {
        if !extra.contains(flag) {
            args.push(flag.to_string());
            args.push(value.to_string());
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `citadel work --mode nexus --nexus-url … --state-dir …` with the short
/// defaults, `RUST_LOG=debug` and `env`.
fn nexus_worker(
    nexus_url: &str,
    state: &StateDir,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Citadel {
    let state_arg = state.arg();
    let args = args_with_defaults(
        &[
            "work",
            "--mode",
            "nexus",
            "--nexus-url",
            nexus_url,
            "--state-dir",
            &state_arg,
        ],
        extra,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut all_env = vec![("RUST_LOG", "debug")];
    all_env.extend_from_slice(env);
    Citadel::spawn(&args, &all_env)
}

fn agent(nexus: &FakeNexus, state: &StateDir, extra: &[&str]) -> Citadel {
    nexus_worker(&nexus.url(), state, extra, &[])
}

/// How many times the job started on this agent (the pool's "job X (T)
/// started" line).
fn starts(c: &Citadel, job: &str) -> usize {
    let prefix = format!("job {job} (");
    info_lines_with(&c.log(), &prefix)
        .iter()
        .filter(|l| l.ends_with(") started"))
        .count()
}

/// A successful echo's output: the chunks, then the result JSON (the chunks
/// end with a newline, so it starts right after them), optionally followed
/// by one newline.
fn assert_output(output: &str, chunks: &str, result: &Json) {
    let rest = output
        .strip_prefix(chunks)
        .unwrap_or_else(|| panic!("output {output:?} does not start with the chunks {chunks:?}"));
    assert!(
        !rest.starts_with('\n'),
        "chunks ending with a newline must not get an extra one before the result: {output:?}"
    );
    let json_text = rest.strip_suffix('\n').unwrap_or(rest);
    assert!(
        !json_text.contains('\n'),
        "the result JSON must be one line after the chunks: {output:?}"
    );
    let got: Json = serde_json::from_str(json_text)
        .unwrap_or_else(|e| panic!("the result part {json_text:?} of {output:?}: {e}"));
    assert_eq!(&got, result, "result JSON in output {output:?}");
}

/// The middle one of these durations (the upper middle of an even count).
fn median(ds: &[Duration]) -> Duration {
    let mut ds = ds.to_vec();
    ds.sort();
    ds.get(ds.len() / 2).copied().unwrap_or_default()
}

fn report_job_is(r: &Request, job: &str) -> bool {
    r.report_job_id().as_deref() == Some(job)
}

/// Waits until the fake has answered `n` more polls than `since` did, so
/// that whatever the agent would have sent meanwhile has been sent: lets a
/// test assert that something did NOT happen, without sleeping.
fn wait_more_polls(nexus: &FakeNexus, since: usize, n: usize) {
    nexus.wait_for_polls(since + n, Duration::from_secs(10));
}

// ---------------------------------------------------------------------------
// The fake Nexus itself (plain TcpStream client)
// ---------------------------------------------------------------------------

/// A minimal HTTP/1.1 client over one TcpStream, for testing the fake.
struct Raw {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

type Response = (u16, Vec<(String, String)>, String);

impl Raw {
    fn connect(nexus: &FakeNexus) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", nexus.port())).expect("connect to fake");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.w.write_all(req.as_bytes()).unwrap();
    }

    fn send_chunked(&mut self, path: &str, parts: &[&str]) {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
             Content-Type: application/json\r\n\r\n"
        );
        for p in parts {
            req.push_str(&format!("{:x}\r\n{p}\r\n", p.len()));
        }
        req.push_str("0\r\n\r\n");
        self.w.write_all(req.as_bytes()).unwrap();
    }

    /// The next response; `None` if the server closed the connection.
    fn response(&mut self) -> Option<Response> {
        let mut line = String::new();
        if self.r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':')?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse::<usize>().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).ok()?;
        Some((code, headers, String::from_utf8_lossy(&body).into_owned()))
    }

    fn get_next(&mut self) -> Option<Response> {
        self.send(
            "GET",
            "/api/v1/jobs/next",
            &[("Authorization", "Bearer t")],
            "",
        );
        self.response()
    }
}

fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.1
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn fake_nexus_self_test() {
    let nexus = FakeNexus::start();
    nexus.push_job("j-1", "echo", json!({"chunks": 2, "x": [1, null]}));
    nexus.push_next(Next::Status(
        429,
        vec![("Retry-After".into(), "7".into())],
        String::new(),
    ));
    nexus.push_next(Next::Garbage);
    nexus.push_next(Next::Stall(Duration::from_millis(300)));
    nexus.push_next(Next::NoJob);

    // Keep-alive: all of these on one connection.
    let mut c = Raw::connect(&nexus);
    let job = c.get_next().expect("job response");
    assert_eq!(job.0, 200);
    assert_eq!(header(&job, "connection"), Some("keep-alive"));
    let v: Json = serde_json::from_str(&job.2).unwrap();
    assert_eq!(
        v,
        json!({"id": "j-1", "type": "echo", "payload": {"chunks": 2, "x": [1, null]}})
    );
    let limited = c.get_next().expect("429 response");
    assert_eq!(limited.0, 429);
    assert_eq!(header(&limited, "retry-after"), Some("7"));
    let garbage = c.get_next().expect("garbage response");
    assert_eq!(garbage.0, 200);
    assert!(serde_json::from_str::<Json>(&garbage.2).is_err());
    let t = Instant::now();
    let stalled = c.get_next().expect("stalled response");
    assert_eq!(stalled.0, 204);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(c.get_next().expect("queued 204").0, 204);
    // Queue empty: 204.
    let empty = c.get_next().expect("default 204");
    assert_eq!(empty.0, 204);
    assert_eq!(empty.2, "");

    // Drop closes without answering.
    nexus.push_next(Next::Drop);
    assert!(
        c.get_next().is_none(),
        "a dropped request must get no answer"
    );

    // Reports: fail twice, then accept; a chunked body works too.
    nexus.fail_reports(2, 500);
    let body = r#"{"status":"SUCCESS","output":"chunk 0\n{}"}"#;
    let mut c = Raw::connect(&nexus);
    for want in [500, 500, 200] {
        c.send(
            "POST",
            "/api/v1/jobs/j-1/status",
            &[("Content-Type", "application/json")],
            body,
        );
        assert_eq!(c.response().expect("report response").0, want);
    }
    c.send_chunked(
        "/api/v1/jobs/j%2D2/status",
        &[r#"{"status":"FAIL"#, r#"URE","output":"boom"}"#],
    );
    assert_eq!(c.response().expect("chunked report").0, 200);
    // Unknown paths: 404, recorded.
    c.send("GET", "/nope", &[], "");
    assert_eq!(c.response().expect("404").0, 404);

    let reports = nexus.wait_for_reports(2, Duration::from_secs(1));
    assert_eq!(
        reports,
        vec![
            (
                "j-1".to_owned(),
                "SUCCESS".to_owned(),
                "chunk 0\n{}".to_owned()
            ),
            ("j-2".to_owned(), "FAILURE".to_owned(), "boom".to_owned()),
        ]
    );
    assert_eq!(nexus.report_attempts().len(), 4);

    // Recording: methods, paths, headers, bodies, times, connections.
    let reqs = nexus.requests();
    assert_eq!(reqs.len(), 7 + 4 + 1, "{}", nexus.summary());
    assert!(reqs[..7]
        .iter()
        .all(|r| r.is_poll() && r.conn == reqs[0].conn));
    assert!(reqs[..7]
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer t")));
    assert!(reqs.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(reqs[6].answer, "drop");
    assert_ne!(
        reqs[6].conn, reqs[7].conn,
        "a new connection after the drop"
    );
    assert_eq!(reqs[7].body_text(), body);
    assert_eq!(reqs.last().unwrap().answer, "404");
    assert_eq!(nexus.polls().len(), 7);

    // A cycling default, then back to 204.
    nexus.set_default_next(vec![
        Next::Garbage,
        Next::Status(500, Vec::new(), "x".into()),
    ]);
    let mut c = Raw::connect(&nexus);
    let codes: Vec<u16> = (0..4).map(|_| c.get_next().unwrap().0).collect();
    assert_eq!(codes, [200, 500, 200, 500]);
    nexus.set_default_next(Vec::new());
    assert_eq!(c.get_next().unwrap().0, 204);

    // A default report reply.
    nexus.set_default_report(Some(Report::Status(503, Vec::new(), String::new())));
    c.send("POST", "/api/v1/jobs/j-3/status", &[], body);
    assert_eq!(c.response().unwrap().0, 503);
    nexus.set_default_report(None);
    c.send("POST", "/api/v1/jobs/j-3/status", &[], body);
    assert_eq!(c.response().unwrap().0, 200);
    assert_eq!(nexus.reports_for("j-3").len(), 1);

    // Connection: close is honoured.
    c.send("GET", "/api/v1/jobs/next", &[("Connection", "close")], "");
    let closing = c.response().unwrap();
    assert_eq!(closing.0, 204);
    assert_eq!(header(&closing, "connection"), Some("close"));
    assert!(c.response().is_none());

    // Dropping the fake ends a stall at once.
    nexus.push_next(Next::Stall(Duration::from_secs(30)));
    let mut c = Raw::connect(&nexus);
    c.send("GET", "/api/v1/jobs/next", &[], "");
    nexus.wait_for_polls(14, Duration::from_secs(5));
    // At once: long before the 30 s stall would have ended (the margin is
    // for a loaded machine).
    let t = Instant::now();
    drop(nexus);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(c.response().is_none());
}

#[test]
fn fake_nexus_start_on_a_chosen_port() {
    let port = free_port();
    let nexus = FakeNexus::start_on(port);
    assert_eq!(nexus.url(), format!("http://127.0.0.1:{port}"));
    let mut c = Raw::connect(&nexus);
    assert_eq!(c.get_next().unwrap().0, 204);
}

// ---------------------------------------------------------------------------
// Jobs run and report
// ---------------------------------------------------------------------------

#[test]
fn echo_jobs_run_and_report_with_bearer_token_on_every_request() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_job("e-chunks", "echo", json!({"chunks": 3}));
    nexus.push_job("e-plain", "echo", json!({}));
    nexus.push_job(
        "e-permanent",
        "echo",
        json!({"chunks": 2, "fail": "permanent"}),
    );
    nexus.push_job("e-retryable", "echo", json!({"fail": "retryable"}));
    let a = agent(
        &nexus,
        &state,
        &["--nexus-token", "s3cret-tok", "--max-retries", "1"],
    );

    nexus.wait_for_reports(4, Duration::from_secs(20));
    let one = |job: &str| {
        let r = nexus.reports_for(job);
        assert_eq!(r.len(), 1, "reports of {job}: {r:?}");
        r.into_iter().next().unwrap()
    };

    let r = one("e-chunks");
    assert_eq!(r.status, "SUCCESS", "{r:?}");
    assert_output(
        &r.output,
        "chunk 0\nchunk 1\nchunk 2\n",
        &json!({"chunks": 3}),
    );
    assert_eq!(
        r.body.as_object().map(|o| o.len()),
        Some(2),
        "the report body is {{status, output}}: {r:?}"
    );

    let r = one("e-plain");
    assert_eq!(r.status, "SUCCESS", "{r:?}");
    assert_output(&r.output, "", &json!({}));

    let r = one("e-permanent");
    assert_eq!(r.status, "FAILURE", "{r:?}");
    assert!(
        r.output.starts_with("chunk 0\nchunk 1\n"),
        "a failure's output starts with its chunks: {r:?}"
    );
    assert!(
        r.output.contains("echo: asked to fail (permanent)"),
        "a failure's output has the error: {r:?}"
    );

    let r = one("e-retryable");
    assert_eq!(r.status, "FAILURE", "{r:?}");
    assert!(
        r.output.contains("echo: asked to fail (retryable)"),
        "{r:?}"
    );

    // Polls go on after the last job; then every request so far had the token.
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 3);
    let reqs = nexus.requests();
    for req in &reqs {
        assert_eq!(
            req.header("authorization"),
            Some("Bearer s3cret-tok"),
            "{} {} without the token; all:\n{}",
            req.method,
            req.path,
            nexus.summary()
        );
    }
    assert!(reqs.iter().any(|r| r.method == "POST"));
    for job in ["e-chunks", "e-plain", "e-permanent", "e-retryable"] {
        assert_eq!(starts(&a, job), 1, "job {job} started once: {}", a.log());
    }
}

#[test]
fn llm_inference_jobs_stream_into_the_report() {
    let ok = Reply::ndjson()
        .send("{\"model\":\"m\",\"response\":\"Hel\",\"done\":false}\n")
        .send("{\"model\":\"m\",\"response\":\"lo\",\"done\":false}\n")
        .send(
            "{\"model\":\"m\",\"response\":\"\",\"done\":true,\"done_reason\":\"stop\",\
             \"prompt_eval_count\":3,\"eval_count\":2}\n",
        );
    let broken = Reply::ndjson()
        .send("{\"model\":\"m\",\"response\":\"Par\",\"done\":false}\n")
        .send("{\"error\":\"unexpected EOF in the model\"}\n");
    let engine = FakeEngine::start(vec![ok, broken]);
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_job(
        "llm-ok",
        "llm_inference",
        json!({"model": "ollama/m", "prompt": "Say hello"}),
    );
    nexus.push_job(
        "llm-broken",
        "llm_inference",
        json!({"model": "ollama/m", "prompt": "Say it"}),
    );
    let _a = agent(
        &nexus,
        &state,
        &["--ollama-url", &engine.url(), "--max-retries", "0"],
    );
    nexus.wait_for_reports(2, Duration::from_secs(20));

    let r = &nexus.reports_for("llm-ok")[0];
    assert_eq!(r.status, "SUCCESS", "{r:?}");
    // The chunks do not end with a newline: the result gets its own line.
    let (text, result) = r
        .output
        .split_once('\n')
        .unwrap_or_else(|| panic!("no result line in {:?}", r.output));
    assert_eq!(text, "Hello", "{r:?}");
    let result: Json = serde_json::from_str(result.trim_end())
        .unwrap_or_else(|e| panic!("result line of {:?}: {e}", r.output));
    assert_eq!(result["content"], "Hello", "{result}");
    assert_eq!(result["finish_reason"], "stop", "{result}");

    let r = &nexus.reports_for("llm-broken")[0];
    assert_eq!(r.status, "FAILURE", "{r:?}");
    assert!(r.output.starts_with("Par"), "chunks first: {r:?}");
    assert!(
        r.output.contains("unexpected EOF in the model"),
        "then the error: {r:?}"
    );
}

#[test]
fn payload_values_of_any_json_type_reach_the_handler() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let payload = json!({
        "text": "ü ✓ \"quoted\" \\ back\nslash and newline",
        "int": -12,
        "big": 12_345_678_901_234_i64,
        "float": 2.5,
        "yes": true,
        "no": false,
        "nothing": null,
        "list": [1, "two", [3], {"four": 4}, null, false],
        "obj": {"nested": {"deep": [null, {"x": "y"}]}},
        "empty_obj": {},
        "empty_list": [],
        "": "empty key",
    });
    nexus.push_job("any-json", "echo", payload.clone());
    // The token from the environment this time.
    let _a = nexus_worker(
        &nexus.url(),
        &state,
        &[],
        &[("CITADEL_NEXUS_TOKEN", "from-env")],
    );
    let r = nexus.wait_for_report("any-json", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS", "{r:?}");
    assert_output(&r.output, "", &payload);
    assert!(nexus
        .requests()
        .iter()
        .all(|q| q.header("authorization") == Some("Bearer from-env")));
}

#[test]
fn no_token_configured_sends_no_authorization_header() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_job("no-token", "echo", json!({"chunks": 1}));
    let _a = agent(&nexus, &state, &[]);
    nexus.wait_for_report("no-token", Duration::from_secs(15));
    for req in nexus.requests() {
        assert_eq!(
            req.header("authorization"),
            None,
            "{} {}",
            req.method,
            req.path
        );
    }
}

// ---------------------------------------------------------------------------
// Polling discipline
// ---------------------------------------------------------------------------

#[test]
fn no_poll_while_all_handlers_are_busy() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_job("busy-1", "echo", json!({"sleep_ms": 1500}));
    let _a = agent(&nexus, &state, &["--concurrency", "1"]);

    nexus.wait_for_report("busy-1", Duration::from_secs(15));
    // Polls resume after the report.
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 2);

    let reqs = nexus.requests();
    let fetched = reqs
        .iter()
        .find(|r| r.is_poll() && r.answer == "200 job")
        .expect("the poll that took the job")
        .at;
    let reported = reqs
        .iter()
        .find(|r| report_job_is(r, "busy-1"))
        .expect("the report")
        .at;
    assert!(
        reported.duration_since(fetched) >= Duration::from_millis(1400),
        "the 1.5 s job was reported {:?} after it was fetched",
        reported.duration_since(fetched)
    );
    // The handler is busy from the fetch until at least 1.5 s later (the
    // job's sleep starts after the fake answered): a poll in that window is
    // a poll while no handler was idle. (The poll "at once after the job"
    // may reach the fake a moment before the report does.)
    let busy_until = fetched + Duration::from_millis(1500);
    let during: Vec<&Request> = reqs
        .iter()
        .filter(|r| r.is_poll() && r.at > fetched && r.at < busy_until)
        .collect();
    assert!(
        during.is_empty(),
        "{} polls while the only handler was busy (--poll-interval 50ms):\n{}",
        during.len(),
        nexus.summary()
    );
    // With a 50 ms interval, polls did happen before and after.
    assert!(
        reqs.iter()
            .filter(|r| r.is_poll() && r.at > reported)
            .count()
            >= 2,
        "{}",
        nexus.summary()
    );
}

#[test]
fn polls_until_every_handler_is_busy_then_stops() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    for i in 0..3 {
        nexus.push_job(&format!("par-{i}"), "echo", json!({"sleep_ms": 2500}));
    }
    let _a = agent(&nexus, &state, &["--concurrency", "3"]);
    nexus.wait_for_reports(3, Duration::from_secs(15));
    let reqs = nexus.requests();
    let first_report = reqs
        .iter()
        .find(|r| r.report_job_id().is_some())
        .unwrap()
        .at;
    let fetches: Vec<Instant> = reqs
        .iter()
        .filter(|r| r.is_poll() && r.answer == "200 job")
        .map(|r| r.at)
        .collect();
    assert_eq!(fetches.len(), 3, "{}", nexus.summary());
    assert!(
        fetches.iter().all(|t| *t < first_report),
        "with --concurrency 3 all three jobs are fetched before the first ends:\n{}",
        nexus.summary()
    );
    // All three handlers are busy from the third fetch until at least
    // 2.5 s after the first one (long jobs: the three fetches may spread
    // out on a loaded machine, and the window must still mean something).
    let last_fetch = *fetches.last().unwrap();
    let busy_until = fetches[0] + Duration::from_millis(2500);
    let busy_polls = reqs
        .iter()
        .filter(|r| r.is_poll() && r.at > last_fetch && r.at < busy_until)
        .count();
    assert_eq!(
        busy_polls,
        0,
        "polls while all 3 handlers were busy:\n{}",
        nexus.summary()
    );
    assert!(
        busy_until > last_fetch + Duration::from_millis(500),
        "the window checked is too short to mean anything:\n{}",
        nexus.summary()
    );
}

#[test]
fn polls_again_at_once_after_a_job_finishes() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_job("soon-a", "echo", json!({"sleep_ms": 200}));
    nexus.push_job("soon-b", "echo", json!({"sleep_ms": 200}));
    // With a 20 s interval, only "at once after a job" explains a second
    // fetch right after the first job.
    let _a = agent(&nexus, &state, &["--poll-interval", "20s"]);
    let reports = nexus.wait_for_reports(2, Duration::from_secs(40));
    assert_eq!(reports[0].0, "soon-a");
    assert_eq!(reports[1].0, "soon-b");
    let reqs = nexus.requests();
    let fetches: Vec<Instant> = reqs
        .iter()
        .filter(|r| r.is_poll() && r.answer == "200 job")
        .map(|r| r.at)
        .collect();
    // The interval's jitter keeps it over 16 s; 5 s is a loaded machine's
    // margin over the 200 ms job and its report.
    let gap = fetches[1].duration_since(fetches[0]);
    assert!(
        gap < Duration::from_secs(5),
        "the second job was fetched {gap:?} after the first (a 200 ms job, interval 20 s):\n{}",
        nexus.summary()
    );
}

#[test]
fn polls_every_interval_with_jitter() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let _a = agent(&nexus, &state, &["--poll-interval", "200ms"]);
    let polls = nexus.wait_for_polls(12, Duration::from_secs(15));
    let gaps: Vec<Duration> = polls
        .windows(2)
        .skip(1)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    // The agent waits 160-240 ms after each answer, so no gap is shorter
    // (load only makes waits longer). The typical gap is the interval, while
    // one poll held up by a loaded machine may come late, not seconds late.
    for g in &gaps {
        assert!(
            *g >= Duration::from_millis(100) && *g < Duration::from_secs(2),
            "a {g:?} gap between idle polls with --poll-interval 200ms: {gaps:?}"
        );
    }
    let median = median(&gaps);
    assert!(
        median < Duration::from_millis(600),
        "the median gap between idle polls is {median:?} with --poll-interval 200ms: {gaps:?}"
    );
    let (lo, hi) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
    assert!(
        *hi - *lo >= Duration::from_millis(10),
        "no jitter: every gap within {:?}: {gaps:?}",
        *hi - *lo
    );
}

#[test]
fn sigterm_lets_the_running_nexus_job_finish_and_report() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_job("draining", "echo", json!({"sleep_ms": 1000, "chunks": 1}));
    let mut a = agent(&nexus, &state, &["--shutdown-grace", "10s"]);
    a.wait_for_log("job draining (echo) started", Duration::from_secs(10));
    a.sigterm();
    // Queued after the signal: must not be taken.
    nexus.push_job("too-late", "echo", json!({}));
    let status = a
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the agent did not exit after SIGTERM:\n{}", a.log()));
    assert!(status.success(), "exit status {status}:\n{}", a.log());
    let r = nexus.reports_for("draining");
    assert_eq!(
        r.len(),
        1,
        "the drained job is reported before exit:\n{}",
        nexus.summary()
    );
    assert_eq!(r[0].status, "SUCCESS");
    assert_eq!(
        nexus.queued_next(),
        1,
        "a job was taken after SIGTERM:\n{}",
        nexus.summary()
    );
    assert!(nexus.reports_for("too-late").is_empty());
}

// ---------------------------------------------------------------------------
// Reports are never lost, never sent twice
// ---------------------------------------------------------------------------

#[test]
fn status_post_failing_5_times_then_succeeding_is_delivered_exactly_once() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.fail_reports(5, 500);
    nexus.push_job("flaky-report", "echo", json!({"chunks": 1}));
    let a = agent(&nexus, &state, &[]);

    let r = nexus.wait_for_report("flaky-report", Duration::from_secs(20));
    assert_eq!(r.status, "SUCCESS");
    assert_output(&r.output, "chunk 0\n", &json!({"chunks": 1}));
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 5);
    let attempts: Vec<Request> = nexus
        .report_attempts()
        .into_iter()
        .filter(|r| report_job_is(r, "flaky-report"))
        .collect();
    assert_eq!(
        attempts.len(),
        6,
        "5 refused attempts + 1 accepted, nothing after:\n{}",
        nexus.summary()
    );
    assert!(attempts.iter().all(|r| r.body == attempts[0].body));
    assert_eq!(nexus.reports_for("flaky-report").len(), 1);
    assert_eq!(starts(&a, "flaky-report"), 1, "the job is not rerun");
}

#[test]
fn status_post_retried_through_every_kind_of_failure() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_report(Report::Drop);
    nexus.push_report(Report::Status(
        502,
        Vec::new(),
        "<html>bad gw</html>".into(),
    ));
    // Longer than --nexus-timeout: a timed-out POST.
    nexus.push_report(Report::Stall(Duration::from_secs(3)));
    nexus.push_report(Report::Status(408, Vec::new(), String::new()));
    nexus.push_report(Report::Status(
        429,
        vec![("Retry-After".into(), "1".into())],
        String::new(),
    ));
    nexus.push_report(Report::Status(503, Vec::new(), String::new()));
    nexus.push_job("rough-report", "echo", json!({"chunks": 2}));
    let _a = agent(&nexus, &state, &["--nexus-timeout", "500ms"]);

    let r = nexus.wait_for_report("rough-report", Duration::from_secs(30));
    assert_eq!(r.status, "SUCCESS");
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 5);
    let attempts: Vec<Request> = nexus
        .report_attempts()
        .into_iter()
        .filter(|r| report_job_is(r, "rough-report"))
        .collect();
    assert_eq!(attempts.len(), 7, "{}", nexus.summary());
    assert_eq!(nexus.reports_for("rough-report").len(), 1);
    // The 429's Retry-After: 1 held back the next attempt.
    let i429 = attempts.iter().position(|r| r.answer == "429").unwrap();
    let gap = attempts[i429 + 1].at.duration_since(attempts[i429].at);
    assert!(
        gap >= Duration::from_secs(1),
        "report retried {gap:?} after a 429 with Retry-After: 1"
    );
}

#[test]
fn killed_agent_delivers_its_spooled_report_after_restart() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.set_default_report(Some(Report::Status(500, Vec::new(), String::new())));
    nexus.push_job("spooled", "echo", json!({"chunks": 2}));
    let mut first = agent(&nexus, &state, &["--node-name", "spool-node"]);

    nexus.wait_for_requests(
        "3 refused reports of the job",
        3,
        Duration::from_secs(15),
        |r| report_job_is(r, "spooled"),
    );
    let spooled = wait_until(
        "the spool to hold the report",
        Duration::from_secs(5),
        || state.spooled().into_iter().find(|r| r["id"] == "spooled"),
    );
    assert_eq!(spooled["status"], "SUCCESS", "{spooled}");
    assert_eq!(starts(&first, "spooled"), 1);
    first.kill9();
    assert_eq!(state.spooled().len(), 1);

    nexus.set_default_report(None);
    let before = nexus.report_attempts().len();
    let second = agent(&nexus, &state, &["--node-name", "spool-node"]);
    let r = nexus.wait_for_report("spooled", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS");
    assert_output(&r.output, "chunk 0\nchunk 1\n", &json!({"chunks": 2}));
    assert!(nexus.report_attempts().len() > before);

    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 5);
    assert_eq!(nexus.reports_for("spooled").len(), 1);
    assert_eq!(
        starts(&second, "spooled"),
        0,
        "the restarted agent delivers the report, it does not rerun the job"
    );
    wait_until(
        "the spool to forget the delivered report",
        Duration::from_secs(5),
        || state.spooled().is_empty().then_some(()),
    );

    // A third start has nothing left to send.
    drop(second);
    let attempts = nexus.report_attempts().len();
    let _third = agent(&nexus, &state, &["--node-name", "spool-node"]);
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 5);
    assert_eq!(
        nexus.report_attempts().len(),
        attempts,
        "{}",
        nexus.summary()
    );
}

#[test]
fn spool_files_are_always_whole_json_while_reports_churn() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    // Every other report attempt fails, so the spool is rewritten often.
    for _ in 0..15 {
        nexus.push_report(Report::Status(500, Vec::new(), String::new()));
        nexus.push_report(Report::Accept);
    }
    for i in 0..30 {
        nexus.push_job(&format!("churn-{i}"), "echo", json!({"chunks": 20}));
    }
    let _a = agent(&nexus, &state, &["--concurrency", "4"]);
    let mut reads = 0;
    wait_until("all 30 reports delivered", Duration::from_secs(30), || {
        // Every file parses whole (`spooled` panics on a torn one).
        reads += state.spooled().len();
        (nexus.accepted().len() >= 30).then_some(())
    });
    assert!(reads > 10, "only {reads} spool files read");
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 5);
    assert_reported_once_each(&nexus, (0..30).map(|i| format!("churn-{i}")));
}

/// Every accepted report is of one of `jobs`, and each of them was
/// accepted exactly once (every report counts, not a set of ids).
fn assert_reported_once_each(nexus: &FakeNexus, jobs: impl IntoIterator<Item = String>) {
    let mut count: std::collections::BTreeMap<String, usize> =
        jobs.into_iter().map(|j| (j, 0)).collect();
    for (job, _, _) in nexus.reports() {
        *count.entry(job).or_default() += 1;
    }
    let wrong: Vec<_> = count.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        wrong.is_empty(),
        "reports per job, where not exactly one: {wrong:?}\n{}",
        nexus.summary()
    );
}

#[test]
fn unreadable_spool_is_set_aside_and_the_agent_runs() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    fs::write(state.file(LEGACY_SPOOL), "{ this is not a spool").unwrap();
    nexus.push_job("after-corrupt", "echo", json!({}));
    let a = agent(&nexus, &state, &[]);
    nexus.wait_for_report("after-corrupt", Duration::from_secs(15));
    let aside: Vec<String> = fs::read_dir(state.0.as_path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // (not the temporary file of an atomic rewrite in progress)
        .filter(|n| n.starts_with("nexus-reports") && n.contains("corrupt"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the unreadable spool is kept aside: {aside:?}"
    );
    assert!(
        info_lines_with(&a.log(), " ERROR ")
            .iter()
            .any(|l| l.contains("spool")),
        "{}",
        a.log()
    );
}

// ---------------------------------------------------------------------------
// Each report on its own: refusals, the rejected store, 413, the bound
// ---------------------------------------------------------------------------

/// Every status POST of `job` so far.
fn attempts_of(nexus: &FakeNexus, job: &str) -> Vec<Request> {
    nexus
        .report_attempts()
        .into_iter()
        .filter(|r| report_job_is(r, job))
        .collect()
}

fn refuse(code: u16) -> Option<Report> {
    Some(Report::Status(code, Vec::new(), String::new()))
}

#[test]
fn a_report_nexus_keeps_refusing_holds_back_no_other_report() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    // Run first, so that today's "front of the spool first" would block
    // everything behind them.
    let stuck = [
        ("stuck-401", 401),
        ("stuck-403", 403),
        ("stuck-404", 404),
        ("stuck-409", 409),
        ("stuck-503", 503),
    ];
    for (job, code) in stuck {
        nexus.set_report_for(job, refuse(code));
        nexus.push_job(job, "echo", json!({}));
    }
    let free: Vec<String> = (0..5).map(|i| format!("free-{i}")).collect();
    for job in &free {
        nexus.push_job(job, "echo", json!({}));
    }
    let a = agent(&nexus, &state, &[]);

    for job in &free {
        nexus.wait_for_report(job, Duration::from_secs(20));
    }
    // The refused ones are retried (a single 404 is not "gone": that takes
    // 5 of them over 5 minutes by default), not dropped, not accepted.
    for (job, _) in stuck {
        nexus.wait_for_requests(
            &format!("3 attempts of {job}"),
            3,
            Duration::from_secs(20),
            |r| report_job_is(r, job),
        );
        assert!(nexus.reports_for(job).is_empty());
    }
    // Nexus takes them now: each is delivered.
    for (job, _) in stuck {
        nexus.set_report_for(job, None);
    }
    for (job, _) in stuck {
        nexus.wait_for_report(job, Duration::from_secs(20));
    }
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 5);
    let all = stuck.iter().map(|(j, _)| j.to_string()).chain(free);
    assert_reported_once_each(&nexus, all);
    assert!(state.rejected().is_empty(), "{:?}", state.rejected());
    assert_eq!(
        info_lines_with(&a.log(), "Nexus rejected the token").len(),
        1,
        "one episode of refused tokens, logged once:\n{}",
        a.log()
    );
    wait_info_lines(
        &a,
        "Nexus accepts the token again",
        1,
        Duration::from_secs(5),
    );
}

#[test]
fn reports_of_jobs_nexus_no_longer_knows_are_kept_in_the_rejected_store() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.set_report_for(
        "gone-410",
        Some(Report::Status(
            410,
            Vec::new(),
            r#"{"error":"gone"}"#.into(),
        )),
    );
    nexus.set_report_for("gone-404", refuse(404));
    // One 404 (a proxy during a deploy), then accepted.
    nexus.push_report_for("blip-404", Report::Status(404, Vec::new(), String::new()));
    for job in ["gone-410", "gone-404", "blip-404", "after-gone"] {
        nexus.push_job(job, "echo", json!({"chunks": 1}));
    }
    let a = agent(
        &nexus,
        &state,
        &[
            "--nexus-gone-after-attempts",
            "4",
            "--nexus-gone-after",
            "1s",
        ],
    );

    let rejected = wait_until(
        "two reports in the rejected store",
        Duration::from_secs(20),
        || Some(state.rejected()).filter(|r| r.len() >= 2),
    );
    nexus.wait_for_report("blip-404", Duration::from_secs(10));
    nexus.wait_for_report("after-gone", Duration::from_secs(10));
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 5);

    assert_eq!(attempts_of(&nexus, "gone-410").len(), 1, "410 is final");
    let tries = attempts_of(&nexus, "gone-404");
    assert!(tries.len() >= 4, "{}", nexus.summary());
    let span = tries.last().unwrap().at.duration_since(tries[0].at);
    assert!(
        span >= Duration::from_secs(1),
        "404s were given up after spanning {span:?} (--nexus-gone-after 1s)"
    );
    assert_eq!(
        attempts_of(&nexus, "blip-404").len(),
        2,
        "one 404 is retried"
    );
    for (job, code) in [("gone-410", "410"), ("gone-404", "404")] {
        assert!(nexus.reports_for(job).is_empty());
        let r = rejected
            .iter()
            .find(|r| r["id"] == job)
            .unwrap_or_else(|| panic!("{job} not in the rejected store: {rejected:?}"));
        assert_eq!(r["status"], "SUCCESS", "{r}");
        assert_output(
            r["output"].as_str().unwrap(),
            "chunk 0\n",
            &json!({"chunks": 1}),
        );
        assert!(r["reason"].as_str().unwrap().contains(code), "{r}");
    }
    assert_eq!(state.rejected().len(), 2);
    wait_until("the spool to be empty", Duration::from_secs(5), || {
        state.spooled().is_empty().then_some(())
    });
    let says_where = info_lines_with(&a.log(), " ERROR ")
        .iter()
        .filter(|l| l.contains(REJECTED_DIR))
        .count();
    assert_eq!(says_where, 2, "{}", a.log());
}

#[test]
fn a_report_too_large_for_nexus_is_sent_again_with_its_output_cut() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.set_max_report_body(Some(8000));
    nexus.push_job("huge", "echo", json!({"chunks": 2000}));
    nexus.push_job("small", "echo", json!({"chunks": 1}));
    let _a = agent(&nexus, &state, &["--nexus-report-max-output", "4000"]);

    let r = nexus.wait_for_report("huge", Duration::from_secs(20));
    assert_eq!(r.status, "SUCCESS");
    assert!(r.output.len() <= 4000, "{} bytes", r.output.len());
    assert!(r.output.starts_with("chunk 0\nchunk 1\n"), "{}", r.output);
    assert!(
        r.output.ends_with("\n{\"chunks\":2000}"),
        "the end (the result) is kept: {}",
        r.output
    );
    let marker = r
        .output
        .lines()
        .find(|l| l.starts_with("[citadel: ") && l.contains("bytes of output cut here"))
        .unwrap_or_else(|| panic!("no truncation marker in {}", r.output));
    assert!(marker.contains("413"), "{marker}");
    let answers: Vec<String> = attempts_of(&nexus, "huge")
        .into_iter()
        .map(|r| r.answer)
        .collect();
    assert_eq!(answers, ["413", "200 accepted"]);
    nexus.wait_for_report("small", Duration::from_secs(10));
    assert_eq!(attempts_of(&nexus, "small").len(), 1);
}

#[test]
fn a_full_spool_stops_polling_until_nexus_accepts_reports() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.set_default_report(refuse(503));
    for i in 0..3 {
        nexus.push_job(&format!("bounded-{i}"), "echo", json!({}));
    }
    let a = agent(&nexus, &state, &["--nexus-spool-max", "2"]);

    a.wait_for_log("the report spool is full", Duration::from_secs(15));
    let polls = nexus.polls().len();
    let tried = nexus.report_attempts().len();
    // It keeps trying to deliver, and asks for no job meanwhile.
    nexus.wait_for_requests(
        "6 more report attempts",
        tried + 6,
        Duration::from_secs(20),
        |r| r.report_job_id().is_some(),
    );
    assert_eq!(
        nexus.polls().len(),
        polls,
        "polled with a full spool:\n{}",
        nexus.summary()
    );
    assert_eq!(nexus.queued_next(), 1, "the third job waits in Nexus");
    assert_eq!(state.spooled().len(), 2);

    nexus.set_default_report(None);
    for i in 0..3 {
        nexus.wait_for_report(&format!("bounded-{i}"), Duration::from_secs(20));
    }
    a.wait_for_log("the report spool has room again", Duration::from_secs(5));
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 3);
    assert_reported_once_each(&nexus, (0..3).map(|i| format!("bounded-{i}")));
}

#[test]
fn ten_thousand_reports_left_by_an_older_version_are_migrated_and_each_delivered_once() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let n = 10_000;
    let old: Vec<Json> = (0..n)
        .map(|i| json!({"id": format!("old-{i}"), "status": "SUCCESS", "output": format!("out {i}")}))
        .collect();
    fs::write(state.file(LEGACY_SPOOL), serde_json::to_vec(&old).unwrap()).unwrap();
    // RUST_LOG=info: a debug line per request would dwarf the test.
    let args = args_with_defaults(
        &[
            "work",
            "--mode",
            "nexus",
            "--nexus-url",
            &nexus.url(),
            "--state-dir",
            &state.arg(),
        ],
        &[],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Citadel::spawn(&args, &[("RUST_LOG", "info")]);

    nexus.wait_for_reports(n, Duration::from_secs(300));
    assert!(!state.file(LEGACY_SPOOL).exists(), "migrated, then removed");
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 3);
    assert_reported_once_each(&nexus, (0..n).map(|i| format!("old-{i}")));
    for r in nexus.reports_for("old-9999") {
        assert_eq!(
            (r.status.as_str(), r.output.as_str()),
            ("SUCCESS", "out 9999")
        );
    }
    wait_until("the spool to be empty", Duration::from_secs(5), || {
        state.spooled().is_empty().then_some(())
    });
    // The default bound (1000) held polling back until the backlog drained.
    assert!(
        !info_lines_with(&a.log(), "the report spool has room again").is_empty(),
        "{}",
        a.log()
    );
}

// ---------------------------------------------------------------------------
// Shutdown is bounded, whatever Nexus does
// ---------------------------------------------------------------------------

fn unavailable_for_an_hour() -> (u16, Vec<(String, String)>, String) {
    (
        503,
        vec![("Retry-After".into(), "3600".into())],
        "maintenance".into(),
    )
}

#[test]
fn sigterm_during_a_nexus_outage_with_retry_after_exits_within_the_grace() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_job("refused", "echo", json!({}));
    nexus.push_job("cut-short", "echo", json!({"sleep_ms": 60_000}));
    let (code, headers, body) = unavailable_for_an_hour();
    nexus.set_default_next(vec![Next::Status(code, headers.clone(), body.clone())]);
    nexus.set_default_report(Some(Report::Status(code, headers, body)));
    // Two handlers, so that the poller goes on polling while a job runs.
    let mut a = agent(
        &nexus,
        &state,
        &["--shutdown-grace", "1s", "--concurrency", "2"],
    );
    a.wait_for_log("job cut-short (echo) started", Duration::from_secs(10));
    // A report was refused with Retry-After: 3600, and the poller has met
    // the outage too: both wait out the hour.
    nexus.wait_for_requests("the refused report", 1, Duration::from_secs(10), |r| {
        report_job_is(r, "refused")
    });
    nexus.wait_for_requests("a refused poll", 1, Duration::from_secs(10), |r| {
        r.is_poll() && r.answer == "503"
    });

    a.sigterm();
    let status = a.wait_exit(Duration::from_secs(1 + 2)).unwrap_or_else(|| {
        panic!(
            "still running 3 s after SIGTERM (--shutdown-grace 1s):\n{}",
            a.log()
        )
    });
    assert!(status.success(), "exit status {status}:\n{}", a.log());
    // Both reports wait in the spool for the next run: the refused one, and
    // the FAILURE of the job the grace cut short.
    let mut spooled: Vec<(String, String)> = state
        .spooled()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().into(),
                r["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    spooled.sort();
    assert_eq!(
        spooled,
        [
            ("cut-short".to_owned(), "FAILURE".to_owned()),
            ("refused".to_owned(), "SUCCESS".to_owned())
        ]
    );

    nexus.set_default_next(Vec::new());
    nexus.set_default_report(None);
    let b = agent(&nexus, &state, &[]);
    let r = nexus.wait_for_report("cut-short", Duration::from_secs(15));
    assert_eq!(r.status, "FAILURE");
    assert!(
        r.output
            .contains("the agent stopped before the job finished"),
        "{r:?}"
    );
    nexus.wait_for_report("refused", Duration::from_secs(15));
    assert_eq!(starts(&b, "cut-short"), 0, "reported, not run again");
}

#[test]
fn sigterm_while_a_poll_hangs_exits_within_the_grace() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    // Never answered while the agent lives.
    nexus.push_next(Next::Held(Box::new(Next::NoJob)));
    let mut a = agent(
        &nexus,
        &state,
        &["--shutdown-grace", "1s", "--nexus-timeout", "60s"],
    );
    nexus.wait_for_polls(1, Duration::from_secs(10));

    a.sigterm();
    let status = a.wait_exit(Duration::from_secs(1 + 2)).unwrap_or_else(|| {
        panic!(
            "still running 3 s after SIGTERM with a poll hanging (--shutdown-grace 1s):\n{}",
            a.log()
        )
    });
    assert!(status.success(), "exit status {status}:\n{}", a.log());
}

#[test]
fn a_job_from_a_poll_in_flight_at_sigterm_is_reported_not_run_and_never_started() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_next(Next::Held(Box::new(Next::Job(
        json!({"id": "late", "type": "echo", "payload": {}}),
    ))));
    // A request timeout that cannot end the held poll first.
    let mut a = agent(
        &nexus,
        &state,
        &["--shutdown-grace", "10s", "--nexus-timeout", "60s"],
    );
    nexus.wait_for_polls(1, Duration::from_secs(10));

    a.sigterm();
    // The agent has taken in the signal while the poll is in flight.
    a.wait_for_log("signal received", Duration::from_secs(10));
    nexus.release_held();
    let status = a
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the agent did not exit after SIGTERM:\n{}", a.log()));
    assert!(status.success(), "exit status {status}:\n{}", a.log());
    let r = nexus.reports_for("late");
    assert_eq!(r.len(), 1, "{}", nexus.summary());
    assert_eq!(r[0].status, "FAILURE");
    assert_eq!(r[0].output, "not run: the agent was stopping");
    assert_eq!(starts(&a, "late"), 0, "{}", a.log());
    assert!(state.spooled().is_empty());
}

// ---------------------------------------------------------------------------
// Nexus failures
// ---------------------------------------------------------------------------

#[test]
fn retry_after_is_respected_on_429_and_503() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.push_next(Next::Status(
        429,
        vec![("Retry-After".into(), "2".into())],
        "slow down".into(),
    ));
    nexus.push_next(Next::Status(
        503,
        vec![("Retry-After".into(), "1".into())],
        String::new(),
    ));
    nexus.push_job("after-limit", "echo", json!({}));
    let _a = agent(&nexus, &state, &[]);

    nexus.wait_for_report("after-limit", Duration::from_secs(20));
    let reqs = nexus.requests();
    for (code, secs) in [("429", 2), ("503", 1)] {
        let i = reqs.iter().position(|r| r.answer == code).unwrap();
        let next = reqs
            .get(i + 1)
            .unwrap_or_else(|| panic!("no request after the {code}"));
        let gap = next.at.duration_since(reqs[i].at);
        assert!(
            gap >= Duration::from_secs(secs),
            "a request came {gap:?} after a {code} with Retry-After: {secs}:\n{}",
            nexus.summary()
        );
        assert!(
            gap < Duration::from_secs(secs + 3),
            "Retry-After: {secs} held the agent back {gap:?}:\n{}",
            nexus.summary()
        );
    }
}

/// How long the garbage storm lasts: 60 s as issue 4 asks (the test runs in
/// parallel with the rest); `CITADEL_TEST_NEXUS_STORM_SECS` shortens it while
/// iterating.
fn storm_length() -> Duration {
    let secs = std::env::var("CITADEL_TEST_NEXUS_STORM_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(60.0);
    Duration::from_secs_f64(secs)
}

#[test]
fn survives_a_storm_of_garbage_then_runs_the_next_real_job() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    nexus.set_default_next(vec![
        Next::Garbage,
        Next::Status(500, Vec::new(), "internal error".into()),
        Next::Drop,
        Next::Stall(Duration::from_secs(2)),
        Next::Status(502, Vec::new(), "<html>bad gateway</html>".into()),
        Next::Status(
            200,
            vec![("Content-Type".into(), "application/json".into())],
            "[1,2,3]".into(),
        ),
        Next::Status(503, Vec::new(), String::new()),
        Next::Status(
            200,
            vec![("Content-Type".into(), "application/json".into())],
            "null".into(),
        ),
    ]);
    let storm = storm_length();
    let mut a = agent(&nexus, &state, &["--nexus-timeout", "300ms"]);
    a.wait_for_log("Nexus unreachable", Duration::from_secs(10));
    let t0 = Instant::now();
    while t0.elapsed() < storm {
        assert!(a.is_running(), "the agent died in the storm:\n{}", a.log());
        thread::sleep(Duration::from_millis(50));
    }
    let stormy = nexus.polls();
    nexus.set_default_next(Vec::new());
    nexus.push_job("after-storm", "echo", json!({"chunks": 1}));

    let r = nexus.wait_for_report("after-storm", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS", "{r:?}");
    assert!(a.is_running());
    a.wait_for_log("Nexus connection restored", Duration::from_secs(5));
    assert_eq!(
        info_lines_with(&a.log(), "Nexus unreachable").len(),
        1,
        "one outage, logged once:\n{}",
        a.log()
    );
    assert_eq!(
        info_lines_with(&a.log(), "Nexus connection restored").len(),
        1,
        "{}",
        a.log()
    );

    // The storm was really exercised, and backoff stayed under its cap
    // (200 ms) plus the request timeout (300 ms), with slack.
    assert!(
        stormy.len() >= 5,
        "only {} polls during the storm",
        stormy.len()
    );
    let kinds: std::collections::BTreeSet<&str> =
        stormy.iter().map(|r| r.answer.as_str()).collect();
    assert!(kinds.len() >= 4, "storm replies seen: {kinds:?}");
    // Uncapped, the backoff would reach seconds within a dozen failures:
    // the typical gap stays under cap + timeout with slack, and none (even
    // one held up by a loaded machine) grows to seconds.
    let gaps: Vec<Duration> = stormy
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    let median = median(&gaps);
    assert!(
        median < Duration::from_millis(600),
        "the median gap between polls in the storm is {median:?} (cap 200ms, timeout 300ms):\n{}",
        nexus.summary()
    );
    let worst = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_secs(3),
        "a {worst:?} gap between polls in the storm (cap 200ms, timeout 300ms):\n{}",
        nexus.summary()
    );
}

#[test]
fn nexus_refusing_connections_at_start_then_coming_up() {
    let port = free_port();
    let state = StateDir::new();
    let a = nexus_worker(&format!("http://127.0.0.1:{port}"), &state, &[], &[]);
    a.wait_for_log("Nexus unreachable", Duration::from_secs(10));
    let nexus = FakeNexus::start_on(port);
    nexus.push_job("late-nexus", "echo", json!({}));
    let r = nexus.wait_for_report("late-nexus", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS");
    a.wait_for_log("Nexus connection restored", Duration::from_secs(5));
    assert_eq!(
        info_lines_with(&a.log(), "Nexus unreachable").len(),
        1,
        "{}",
        a.log()
    );
}

#[test]
fn malformed_jobs_fail_or_are_skipped_and_the_next_job_runs() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let bad = [
        (
            "bad-no-type",
            json!({"id": "bad-no-type", "payload": {}}),
            "type",
        ),
        (
            "bad-payload",
            json!({"id": "bad-payload", "type": "echo", "payload": "not an object"}),
            "payload",
        ),
        (
            "bad-timeout",
            json!({"id": "bad-timeout", "type": "echo", "payload": {"timeout_ms": "soon"}}),
            "timeout_ms",
        ),
        (
            "bad-handler",
            json!({"id": "bad-handler", "type": "no_such_handler", "payload": {}}),
            "no_such_handler",
        ),
    ];
    for (_, job, _) in &bad {
        nexus.push_next(Next::Job(job.clone()));
    }
    nexus.push_next(Next::Job(json!({"type": "echo", "payload": {"chunks": 1}})));
    nexus.push_next(Next::Job(json!({"id": "", "type": "echo", "payload": {}})));
    nexus.push_job("good-after", "echo", json!({"chunks": 1}));
    let mut a = agent(&nexus, &state, &[]);

    nexus.wait_for_report("good-after", Duration::from_secs(15));
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 3);
    for (id, _, word) in &bad {
        let r = nexus.reports_for(id);
        assert_eq!(r.len(), 1, "{id}: {:?}\n{}", r, nexus.summary());
        assert_eq!(r[0].status, "FAILURE", "{id}: {:?}", r[0]);
        assert!(
            r[0].output.contains(word),
            "the FAILURE of {id} must name the problem ({word:?}): {:?}",
            r[0].output
        );
        assert_eq!(starts(&a, id), 0, "malformed {id} must not run");
    }
    let reported: Vec<String> = nexus.reports().into_iter().map(|r| r.0).collect();
    assert_eq!(reported.len(), bad.len() + 1, "{reported:?}");
    assert_eq!(nexus.reports_for("good-after")[0].status, "SUCCESS");
    assert!(a.is_running());
}

// ---------------------------------------------------------------------------
// Adaptive mode (`citadel agent`)
// ---------------------------------------------------------------------------

/// The `mode` of `{state}/agent-status.json`, if the file is there and valid.
fn status_mode(state: &StateDir) -> Option<String> {
    let text = state.read(STATUS_FILE)?;
    let v: Json = serde_json::from_str(&text).ok()?;
    v.get("mode").and_then(Json::as_str).map(str::to_owned)
}

fn wait_status_mode(state: &StateDir, want: &str, timeout: Duration) {
    wait_until(
        &format!("{STATUS_FILE} to say mode {want}"),
        timeout,
        || (status_mode(state).as_deref() == Some(want)).then_some(()),
    );
}

fn redis_status(redis: &RedisServer, job: &str) -> Option<String> {
    hgetall(&mut redis.conn(), &format!("job:{job}:status"))
        .get("status")
        .cloned()
}

fn wait_redis_completed(redis: &RedisServer, job: &str, timeout: Duration) {
    wait_until(&format!("job {job} completed in Redis"), timeout, || {
        (redis_status(redis, job).as_deref() == Some("completed")).then_some(())
    });
}

/// `citadel agent` with a Redis URL on `redis_port` (nothing there yet, or
/// a server started later) and short adaptive timings.
fn adaptive_agent(nexus: &FakeNexus, state: &StateDir, redis_port: u16, extra: &[&str]) -> Citadel {
    let redis_url = format!("redis://127.0.0.1:{redis_port}/");
    let state_arg = state.arg();
    let nexus_url = nexus.url();
    let mut ex: Vec<&str> = vec![
        "--nexus-url",
        &nexus_url,
        "--state-dir",
        &state_arg,
        "--redis-url",
        &redis_url,
        "--redis-fallback",
        "1s",
        "--redis-probe",
        "200ms",
        "--redis-timeout",
        "500ms",
        "--block",
        "200ms",
        "--concurrency",
        "2",
        "--node-name",
        "adaptive-node",
    ];
    ex.extend_from_slice(extra);
    let args = args_with_defaults(&["agent"], &ex);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Citadel::spawn(&args, &[("RUST_LOG", "debug")])
}

#[test]
fn adaptive_mode_follows_redis_and_loses_no_job() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let port = free_port();
    let a = adaptive_agent(&nexus, &state, port, &[]);

    // 1. No Redis: Nexus mode, Nexus jobs run.
    wait_info_lines(&a, "mode: nexus", 1, Duration::from_secs(10));
    wait_status_mode(&state, "nexus", Duration::from_secs(5));
    nexus.push_job("n-1", "echo", json!({"chunks": 1}));
    nexus.wait_for_report("n-1", Duration::from_secs(15));

    // A Nexus job still running when Redis appears settles on Nexus.
    nexus.push_job("n-inflight", "echo", json!({"sleep_ms": 1500}));
    a.wait_for_log("job n-inflight (echo) started", Duration::from_secs(10));

    // 2. Redis comes up: switch to Redis Streams.
    let mut redis = RedisServer::start_on(port);
    wait_info_lines(&a, "mode: redis", 1, Duration::from_secs(10));
    wait_status_mode(&state, "redis", Duration::from_secs(5));
    let mut c = redis.conn();
    xadd_job(&mut c, QUEUE, "r-1", "echo", r#"{"chunks":1}"#);
    wait_redis_completed(&redis, "r-1", Duration::from_secs(15));
    let r = nexus.wait_for_report("n-inflight", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS", "{r:?}");

    // In Redis mode Nexus is not polled: a Redis job's run is long enough
    // for many 50 ms polls.
    let polls = nexus.polls().len();
    xadd_job(&mut c, QUEUE, "r-2", "echo", r#"{"sleep_ms":500}"#);
    wait_redis_completed(&redis, "r-2", Duration::from_secs(15));
    assert!(
        nexus.polls().len() <= polls + 1,
        "Nexus polled while in Redis mode:\n{}",
        nexus.summary()
    );

    // A Redis job still running when Redis dies settles on Redis later.
    xadd_job(&mut c, QUEUE, "r-inflight", "echo", r#"{"sleep_ms":1500}"#);
    a.wait_for_log("job r-inflight (echo) started", Duration::from_secs(10));

    // 3. Redis dies: back to Nexus within the fall-back time, still working.
    drop(c);
    redis.kill();
    let killed = Instant::now();
    wait_info_lines(&a, "mode: nexus", 2, Duration::from_secs(10));
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "fell back to Nexus {took:?} after Redis died (--redis-fallback 1s)"
    );
    wait_status_mode(&state, "nexus", Duration::from_secs(5));
    nexus.push_job("n-2", "echo", json!({"chunks": 2}));
    let r = nexus.wait_for_report("n-2", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS");

    // 4. Redis is back: Redis mode again; the stranded outcome is written.
    redis.restart();
    wait_info_lines(&a, "mode: redis", 2, Duration::from_secs(10));
    wait_status_mode(&state, "redis", Duration::from_secs(5));
    let mut c = redis.conn();
    wait_redis_completed(&redis, "r-inflight", Duration::from_secs(15));
    xadd_job(&mut c, QUEUE, "r-3", "echo", r#"{"chunks":1}"#);
    wait_redis_completed(&redis, "r-3", Duration::from_secs(15));
    wait_until("the group to drain", Duration::from_secs(10), || {
        (support::pending_count(&mut c, QUEUE, "workers") == 0).then_some(())
    });

    // No job lost, none run twice.
    for job in [
        "n-1",
        "n-inflight",
        "n-2",
        "r-1",
        "r-2",
        "r-inflight",
        "r-3",
    ] {
        assert_eq!(
            starts(&a, job),
            1,
            "job {job} runs exactly once:\n{}",
            a.log()
        );
    }
    for job in ["n-1", "n-inflight", "n-2"] {
        assert_eq!(
            nexus.reports_for(job).len(),
            1,
            "{job}: {}",
            nexus.summary()
        );
    }
    assert_eq!(nexus.reports().len(), 3, "{}", nexus.summary());
    assert_eq!(xlen(&mut c, DLQ), 0);
    assert_eq!(
        info_lines_with(&a.log(), "mode: redis").len(),
        2,
        "{}",
        a.log()
    );
    assert_eq!(
        info_lines_with(&a.log(), "mode: nexus").len(),
        2,
        "{}",
        a.log()
    );
}

#[test]
fn agent_without_redis_stays_on_nexus() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let port = free_port();
    let a = adaptive_agent(&nexus, &state, port, &[]);
    wait_info_lines(&a, "mode: nexus", 1, Duration::from_secs(10));
    for i in 0..3 {
        nexus.push_job(&format!("only-nexus-{i}"), "echo", json!({}));
    }
    nexus.wait_for_reports(3, Duration::from_secs(15));
    // Several probes later (200 ms each) it is still in Nexus mode.
    let polls = nexus.polls().len();
    wait_more_polls(&nexus, polls, 20);
    assert_eq!(
        info_lines_with(&a.log(), "mode: redis").len(),
        0,
        "{}",
        a.log()
    );
    assert_eq!(status_mode(&state).as_deref(), Some("nexus"));
}

#[test]
fn citadel_status_shows_the_mode() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let port = free_port();
    let a = adaptive_agent(&nexus, &state, port, &[]);
    wait_info_lines(&a, "mode: nexus", 1, Duration::from_secs(10));
    wait_status_mode(&state, "nexus", Duration::from_secs(5));
    let show = || {
        let out = citadel_cmd(&["status", "--state-dir", &state.arg()])
            .output()
            .expect("running citadel status");
        assert!(out.status.success(), "citadel status: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The first line names the mode and the live agent's pid; a fallback
    // ("no status recorded in …nexus-state…") must not pass for it.
    let mode_line = |text: &str| text.lines().next().unwrap_or_default().to_owned();
    let alive = format!("(pid {})", a.pid());
    let line = mode_line(&show());
    assert!(line.starts_with("agent: mode nexus since "), "{line}");
    assert!(line.ends_with(&alive), "{line}");
    let _redis = RedisServer::start_on(port);
    wait_status_mode(&state, "redis", Duration::from_secs(10));
    let line = mode_line(&show());
    assert!(line.starts_with("agent: mode redis since "), "{line}");
    assert!(line.ends_with(&alive), "{line}");
}

#[test]
fn citadel_up_says_there_is_nothing_to_start_then_runs_the_agent() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let port = free_port();
    let redis_url = format!("redis://127.0.0.1:{port}/");
    let args = args_with_defaults(
        &[
            "up",
            "--nexus-url",
            &nexus.url(),
            "--state-dir",
            &state.arg(),
            "--redis-url",
            &redis_url,
        ],
        &[],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Citadel::spawn(&args, &[("RUST_LOG", "info")]);
    nexus.push_job("via-up", "echo", json!({}));
    let r = nexus.wait_for_report("via-up", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS");
    let says_nothing = a.log().lines().any(|l| {
        let l = l.to_lowercase();
        l.contains("citadel up") && (l.contains("nothing to start") || l.contains("no services"))
    });
    assert!(
        says_nothing,
        "citadel up must say there is nothing to start:\n{}",
        a.log()
    );
    assert!(
        !info_lines_with(&a.log(), "mode: nexus").is_empty(),
        "{}",
        a.log()
    );
}

#[test]
fn bad_nexus_settings_are_rejected_with_exit_code_2() {
    let state = StateDir::new();
    let state_arg = state.arg();
    let cases: [&[&str]; 4] = [
        &["work", "--mode", "nexus"],
        &[
            "work",
            "--mode",
            "sideways",
            "--nexus-url",
            "http://127.0.0.1:1",
        ],
        &["work", "--mode", "nexus", "--nexus-url", "ftp://127.0.0.1/"],
        &[
            "work",
            "--mode",
            "nexus",
            "--nexus-url",
            "http://127.0.0.1:1",
            "--poll-interval",
            "soon",
        ],
    ];
    for args in cases {
        let mut all = args.to_vec();
        all.extend(["--state-dir", &state_arg]);
        let out = citadel_cmd(&all)
            .env_remove("CITADEL_NEXUS_URL")
            .env_remove("CITADEL_MODE")
            .output()
            .expect("running citadel");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {stderr}");
        assert!(stderr.starts_with("citadel: "), "{all:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{all:?}: {stderr}");
    }
}

/// A handler panic under Nexus is what it is under Redis: a failed attempt,
/// retried, then one FAILURE report naming the panic; the agent runs on.
#[test]
fn a_panicking_job_is_retried_then_reported_failed_once() {
    let nexus = FakeNexus::start();
    let state = StateDir::new();
    let a = nexus_worker(&nexus.url(), &state, &["--max-retries", "2"], &[]);
    nexus.push_job("panics", "echo", json!({"fail": "panic"}));
    nexus.push_job("after", "echo", json!({"x": 1}));
    let report = nexus.wait_for_report("panics", Duration::from_secs(20));
    assert_eq!(report.status, "FAILURE");
    assert!(
        report
            .output
            .starts_with("handler panicked: echo: asked to panic (gave up after 3 attempts)"),
        "{}",
        report.output
    );
    assert_eq!(
        nexus
            .wait_for_report("after", Duration::from_secs(20))
            .status,
        "SUCCESS"
    );
    assert_eq!(nexus.reports_for("panics").len(), 1);
    assert_eq!(a.log().matches("job panics (echo) started").count(), 1);
}
