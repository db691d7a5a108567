//! `citadel init` against a fake device-authorization server
//! (tests/support/fake_auth.rs): approval after pending polls, slow_down,
//! expiry, denial, garbage, 5xx and dropped connections, hangs and the
//! overall timeout; the config file it writes (mode, merge, relogin); `--json`;
//! `--token-file`; and the agent that runs afterwards with the stored
//! credentials (the fake Nexus sees the bearer token). The token must never
//! show in any output.

mod support;

use serde_json::{json, Value as Json};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use support::fake_auth::{self, approval, FakeAuth, Start, Token};
use support::fake_nexus::FakeNexus;
use support::jobs::{fake_tool, path_with, run_to_end, Finished};
use support::{citadel_cmd, fresh_temp_dir, wait_until, Citadel, RedisServer};

const TOKEN: &str = "dat_9Qm2x7LkT4pZsecret";

/// What one `citadel init` (or other command) run gave.
type Run = Finished;

/// Neither output holds the token.
trait NoToken {
    fn assert_no_token(&self, token: &str);
}

impl NoToken for Run {
    fn assert_no_token(&self, token: &str) {
        assert!(
            !self.all().contains(token),
            "the token is in the output:\n{}",
            self.all()
        );
    }
}

/// `citadel init <args>` with `--config config` and debug logging, waited
/// for at most `limit` (then killed: a failure).
fn init(config: &Path, args: &[&str], limit: Duration) -> Run {
    let mut all = vec!["init", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    run_to_end(citadel_cmd(&all).env("RUST_LOG", "debug"), limit)
}

/// A config path in a fresh directory that does not exist yet.
fn new_config() -> (PathBuf, PathBuf) {
    let base = fresh_temp_dir("init");
    let path = base.join("etc/citadel/config.json");
    (base, path)
}

fn read_json(p: &Path) -> Json {
    serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn gaps(polls: &[support::http::Request]) -> Vec<Duration> {
    polls.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[test]
fn pending_polls_then_approval_store_credentials_0600_in_a_0700_dir() {
    let auth = FakeAuth::start();
    for _ in 0..3 {
        auth.push_token(Token::Pending);
    }
    auth.push_token(Token::Approve(approval(
        TOKEN,
        Some("http://127.0.0.1:9/nexus"),
        Some("redis://:redispw@127.0.0.1:6390/2"),
    )));
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    run.assert_no_token(TOKEN);
    assert!(!run.all().contains("redispw"), "{}", run.all());
    assert!(!run.all().contains(fake_auth::DEVICE_CODE), "{}", run.all());
    assert!(run.stdout.contains(fake_auth::USER_CODE), "{}", run.stdout);
    let complete = format!("{}/device?user_code={}", auth.url(), fake_auth::USER_CODE);
    assert!(run.stdout.contains(&complete), "{}", run.stdout);
    assert!(
        !run.stdout.contains('█'),
        "no QR code when stdout is not a terminal"
    );
    assert!(run.stdout.contains("Node authorized"), "{}", run.stdout);

    // The wire: one start with the node's facts, four polls at the interval.
    let starts = auth.starts();
    assert_eq!(starts.len(), 1);
    let start = starts[0].json();
    assert_eq!(start["client_id"], "citadel-cli");
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(start["hostname"], hostname.trim());
    match fs::read_to_string("/etc/machine-id") {
        Ok(id) => assert_eq!(start["machine_id"], id.trim()),
        Err(_) => assert!(start["machine_id"].is_null()),
    }
    assert_eq!(
        starts[0].header("content-type"),
        Some("application/json"),
        "{:?}",
        starts[0].headers
    );
    let polls = auth.polls();
    assert_eq!(polls.len(), 4);
    for p in &polls {
        assert_eq!(
            p.json(),
            json!({
                "device_code": fake_auth::DEVICE_CODE,
                "grant_type": fake_auth::GRANT_TYPE,
                "client_id": "citadel-cli",
            })
        );
    }
    let first = polls[0].at - starts[0].at;
    assert!(first >= Duration::from_millis(950), "{first:?}");
    for g in gaps(&polls) {
        assert!(
            g >= Duration::from_millis(950),
            "polled faster than the interval: {g:?}"
        );
    }

    // The file: 0600 in a 0700 directory, the credentials only.
    assert_eq!(mode(&config), 0o600);
    assert_eq!(mode(config.parent().unwrap()), 0o700);
    let stored = read_json(&config);
    assert_eq!(stored["device_api_token"], TOKEN);
    assert_eq!(stored["nexus_url"], "http://127.0.0.1:9/nexus");
    assert_eq!(stored["redis_url"], "redis://:redispw@127.0.0.1:6390/2");
    assert_eq!(stored["org_id"], "org-7");
    assert_eq!(stored["api_base_url"], "http://127.0.0.1:9/api");
    assert!(stored.get("token_type").is_none(), "{stored}");

    // `citadel status` says the node is provisioned, redacted.
    let out = citadel_cmd(&[
        "status",
        "--config",
        config.to_str().unwrap(),
        "--engine-connect-timeout",
        "200ms",
    ])
    .output()
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("credentials: device_api_token ***"), "{text}");
    assert!(text.contains("org org-7"), "{text}");
    assert!(
        text.contains("redis redis://:***@127.0.0.1:6390/2"),
        "{text}"
    );
    assert!(!text.contains(TOKEN) && !text.contains("redispw"), "{text}");
}

#[test]
fn credentials_are_merged_into_an_existing_config_keeping_its_keys() {
    let auth = FakeAuth::start();
    auth.push_token(Token::Approve(approval(
        TOKEN,
        Some("http://127.0.0.1:9"),
        None,
    )));
    let base = fresh_temp_dir("init-merge");
    let config = base.join("config.json");
    fs::write(
        &config,
        r#"{"concurrency": 3, "queue": ["jobs:v1:a", "jobs:v1:b"], "custom_key": {"x": 1}}"#,
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let run = init(
        &config,
        &["--auth-url", &auth.url()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let stored = read_json(&config);
    assert_eq!(stored["concurrency"], 3);
    assert_eq!(stored["queue"], json!(["jobs:v1:a", "jobs:v1:b"]));
    assert_eq!(stored["custom_key"], json!({"x": 1}));
    assert_eq!(stored["device_api_token"], TOKEN);
    assert_eq!(mode(&config), 0o600, "an existing file becomes private too");
    let leftovers: Vec<_> = fs::read_dir(&base).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temp file left: {leftovers:?}");
}

#[test]
fn slow_down_widens_the_poll_interval_by_five_seconds_for_good() {
    let auth = FakeAuth::start();
    auth.push_token(Token::SlowDown);
    auth.push_token(Token::Pending);
    auth.push_token(Token::Approve(approval(TOKEN, None, None)));
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url()],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let polls = auth.polls();
    assert_eq!(polls.len(), 3);
    let g = gaps(&polls);
    // interval 1 s + 5 s after slow_down, and it stays that way.
    for gap in &g {
        assert!(*gap >= Duration::from_millis(5950), "{g:?}");
        assert!(*gap < Duration::from_secs(10), "{g:?}");
    }
    let first = polls[0].at - auth.starts()[0].at;
    assert!(
        first < Duration::from_secs(4),
        "the first poll waits 1 s: {first:?}"
    );
}

#[test]
fn expired_and_denied_codes_stop_with_a_clear_message_and_store_nothing() {
    for (reply, want, reason) in [
        (Token::Expired, "the code expired", "expired_token"),
        (Token::Denied, "denied (access_denied)", "access_denied"),
    ] {
        let auth = FakeAuth::start();
        auth.push_token(Token::Pending);
        auth.push_token(reply);
        let (_base, config) = new_config();
        let run = init(
            &config,
            &["--auth-url", &auth.url()],
            Duration::from_secs(30),
        );
        assert_eq!(run.code, Some(1), "{}", run.all());
        assert!(run.stderr.contains(want), "{}", run.stderr);
        assert!(!config.exists(), "nothing is stored");
        assert_eq!(auth.polls().len(), 2, "no poll after the end");
        let json_run = {
            let auth = FakeAuth::start();
            auth.push_token(match reason {
                "expired_token" => Token::Expired,
                _ => Token::Denied,
            });
            init(
                &config,
                &["--auth-url", &auth.url(), "--json"],
                Duration::from_secs(30),
            )
        };
        assert_eq!(json_run.code, Some(1));
        let last: Json = serde_json::from_str(json_run.stdout.lines().last().unwrap()).unwrap();
        assert_eq!(last["event"], "failed");
        assert_eq!(last["reason"], reason);
    }
}

#[test]
fn the_code_expiry_from_expires_in_ends_the_wait() {
    let auth = FakeAuth::start();
    auth.set_start(Start::Json(fake_auth::start_answer(&auth.url(), 1, 2)));
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(run.stderr.contains("the code expired"), "{}", run.stderr);
    assert!(run.took < Duration::from_secs(10), "{:?}", run.took);
}

#[test]
fn garbage_answers_end_with_clear_errors() {
    let huge = format!("{{\"x\":\"{}\"}}", "a".repeat(2 << 20));
    let start_cases: Vec<(Start, &str)> = vec![
        (
            Start::Status(200, "<html>hello</html>".into()),
            "answer to device-auth/start is not JSON: <html>hello</html>",
        ),
        (Start::Json(json!([1, 2])), "not an object (an array)"),
        (
            Start::Json(
                json!({"device_code": "d", "user_code": 5, "verification_uri": "http://x"}),
            ),
            "user_code as a number, not a string",
        ),
        (
            Start::Json(
                json!({"device_code": "d", "user_code": "U", "verification_uri": "http://x", "interval": "fast"}),
            ),
            "interval as a string, not a number",
        ),
        (
            Start::Json(json!({"user_code": "U", "verification_uri": "http://x"})),
            "has no device_code",
        ),
        (
            Start::Status(404, r#"{"error":"not_found"}"#.into()),
            "refused to start (HTTP 404): not_found",
        ),
        (
            Start::Status(200, huge.clone()),
            "answered HTTP 200 with an unreadable body (at most 1 MiB",
        ),
    ];
    for (reply, want) in start_cases {
        let auth = FakeAuth::start();
        auth.set_start(reply);
        let (_base, config) = new_config();
        let run = init(
            &config,
            &["--auth-url", &auth.url()],
            Duration::from_secs(30),
        );
        assert_eq!(run.code, Some(1), "{want}: {}", run.all());
        assert!(
            run.stderr.contains(want),
            "want {want:?} in:\n{}",
            run.stderr
        );
        assert!(
            run.stderr.len() < 2000,
            "a short message: {}",
            run.stderr.len()
        );
        assert!(auth.polls().is_empty());
        assert!(!config.exists());
    }
    let token_cases: Vec<(Token, &str)> = vec![
        (
            Token::Status(200, format!("{{\"device_api_token\": \"{TOKEN}\"")),
            "approval is not JSON (",
        ),
        (
            Token::Status(200, json!({"device_api_token": 12}).to_string()),
            "device_api_token as a number",
        ),
        (
            Token::Status(200, json!({"org_id": "o"}).to_string()),
            "has no device_api_token",
        ),
        (
            Token::Status(
                200,
                json!({"device_api_token": TOKEN, "redis_url": "nope"}).to_string(),
            ),
            "redis_url is unusable",
        ),
        (
            Token::Status(400, "<html>bad</html>".into()),
            "HTTP 400: the auth server's answer to device-auth/token is not JSON",
        ),
        (
            Token::Status(
                400,
                r#"{"error":"invalid_grant","error_description":"code used"}"#.into(),
            ),
            "invalid_grant (code used)",
        ),
        (
            Token::Status(400, r#"{"message":"?"}"#.into()),
            "has no error code",
        ),
        (
            Token::Status(200, huge),
            "answered the token request with HTTP 200 with an unreadable body",
        ),
    ];
    for (reply, want) in token_cases {
        let auth = FakeAuth::start();
        auth.push_token(reply);
        let (_base, config) = new_config();
        let run = init(
            &config,
            &["--auth-url", &auth.url(), "--init-timeout", "20s"],
            Duration::from_secs(40),
        );
        assert_eq!(run.code, Some(1), "{want}: {}", run.all());
        assert!(
            run.stderr.contains(want),
            "want {want:?} in:\n{}",
            run.stderr
        );
        assert_eq!(
            auth.polls().len(),
            1,
            "{want}: it ends at the first such answer"
        );
        assert!(!run.stderr.contains("no approval within"), "{}", run.stderr);
        run.assert_no_token(TOKEN);
        assert!(!config.exists(), "{want}: nothing is stored");
    }
}

#[test]
fn server_errors_and_dropped_connections_are_retried_until_approval() {
    let auth = FakeAuth::start();
    auth.push_token(Token::Status(503, "<html>maintenance</html>".into()));
    auth.push_token(Token::Drop);
    auth.push_token(Token::Status(500, "{}".into()));
    // A 5xx whose body is over the limit is still a 5xx: asked again.
    auth.push_token(Token::Status(502, "x".repeat(2 << 20)));
    auth.push_token(Token::Pending);
    auth.push_token(Token::Approve(approval(TOKEN, None, None)));
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url()],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_eq!(auth.polls().len(), 6);
    assert!(run.stderr.contains("HTTP 503"), "{}", run.stderr);
    assert!(run.stderr.contains("asking again in"), "{}", run.stderr);
    assert_eq!(read_json(&config)["device_api_token"], TOKEN);
    run.assert_no_token(TOKEN);
}

#[test]
fn a_hung_poll_is_given_up_after_the_request_timeout_and_retried() {
    let auth = FakeAuth::start();
    auth.push_token(Token::Hang);
    auth.push_token(Token::Approve(approval(TOKEN, None, None)));
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url(), "--nexus-timeout", "500ms"],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let polls = auth.polls();
    assert_eq!(polls.len(), 2);
    assert!(run.stderr.contains("no answer"), "{}", run.stderr);
}

#[test]
fn the_overall_timeout_ends_a_wait_that_is_never_approved() {
    // Pending forever.
    let auth = FakeAuth::start();
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url(), "--init-timeout", "3s"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.stderr
            .contains("no approval within 3s (--init-timeout)"),
        "{}",
        run.stderr
    );
    assert!(run.took >= Duration::from_millis(2900), "{:?}", run.took);
    assert!(run.took < Duration::from_secs(10), "{:?}", run.took);
    assert!(auth.polls().len() >= 2, "{}", auth.polls().len());

    // A poll that hangs is cut at the deadline too (the request timeout is longer).
    let auth = FakeAuth::start();
    auth.set_default_token(Token::Hang);
    let run = init(
        &config,
        &[
            "--auth-url",
            &auth.url(),
            "--init-timeout",
            "3s",
            "--nexus-timeout",
            "1m",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.stderr.contains("no approval within 3s"),
        "{}",
        run.stderr
    );
    assert!(run.took < Duration::from_secs(10), "{:?}", run.took);

    // And a start that hangs.
    let auth = FakeAuth::start();
    auth.set_start(Start::Hang);
    let run = init(
        &config,
        &[
            "--auth-url",
            &auth.url(),
            "--init-timeout",
            "2s",
            "--nexus-timeout",
            "1m",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.stderr.contains("cannot reach the auth server"),
        "{}",
        run.stderr
    );
    assert!(run.took < Duration::from_secs(10), "{:?}", run.took);
    assert!(!config.exists());
}

#[test]
fn json_mode_prints_the_code_then_the_outcome_as_json_lines() {
    let auth = FakeAuth::start();
    auth.push_token(Token::Pending);
    auth.push_token(Token::Approve(approval(
        TOKEN,
        Some("http://127.0.0.1:9"),
        None,
    )));
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url(), "--json"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    run.assert_no_token(TOKEN);
    let lines: Vec<Json> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert_eq!(lines[0]["event"], "code");
    assert_eq!(lines[0]["user_code"], fake_auth::USER_CODE);
    assert_eq!(
        lines[0]["verification_uri"],
        format!("{}/device", auth.url())
    );
    assert_eq!(
        lines[0]["verification_uri_complete"],
        format!("{}/device?user_code={}", auth.url(), fake_auth::USER_CODE)
    );
    assert_eq!(lines[0]["expires_in"], 600);
    assert_eq!(lines[0]["interval"], 1);
    assert_eq!(lines[1]["event"], "authorized");
    assert_eq!(lines[1]["config"], config.to_str().unwrap());
    assert_eq!(lines[1]["org_id"], "org-7");
    assert_eq!(lines[1]["nexus_url"], "http://127.0.0.1:9");
}

#[test]
fn a_token_file_provisions_without_a_browser() {
    let (base, config) = new_config();
    let token_file = base.join("token");
    fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let run = init(
        &config,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--nexus-url",
            "http://127.0.0.1:9/",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    run.assert_no_token(TOKEN);
    let stored = read_json(&config);
    assert_eq!(stored["device_api_token"], TOKEN);
    assert_eq!(stored["nexus_url"], "http://127.0.0.1:9");
    assert!(stored.get("redis_url").is_none(), "{stored}");
    assert_eq!(mode(&config), 0o600);

    // --token-file - reads stdin.
    let (_b, config_stdin) = new_config();
    let mut child = citadel_cmd(&[
        "init",
        "--config",
        config_stdin.to_str().unwrap(),
        "--token-file",
        "-",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{TOKEN}\n").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(TOKEN));
    assert_eq!(read_json(&config_stdin)["device_api_token"], TOKEN);

    // --token, and bad tokens.
    let (_b, config2) = new_config();
    let run = init(&config2, &["--token", TOKEN], Duration::from_secs(20));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_eq!(read_json(&config2)["device_api_token"], TOKEN);
    let (_b, config3) = new_config();
    for (args, want) in [
        (vec!["--token", "two words"], "spaces"),
        (vec!["--token", " "], "empty"),
        (
            vec!["--token-file", "/nonexistent/token"],
            "--token-file /nonexistent/token",
        ),
        (vec!["--token", "a", "--token-file", "b"], "not both"),
    ] {
        let run = init(&config3, &args, Duration::from_secs(20));
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.all());
        assert!(run.stderr.contains(want), "{args:?}: {}", run.stderr);
        assert!(!config3.exists());
    }
    // Without --auth-url or a token: what is needed.
    let run = init(&config3, &[], Duration::from_secs(20));
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert!(run.stderr.contains("needs --auth-url"), "{}", run.stderr);
}

#[test]
fn a_provisioned_node_is_left_alone_unless_relogin() {
    let base = fresh_temp_dir("init-relogin");
    let config = base.join("config.json");
    let before = r#"{"device_api_token": "old-token", "org_id": "org-old", "node_id": "n1", "concurrency": 2}"#;
    fs::write(&config, before).unwrap();
    let auth = FakeAuth::start();
    auth.push_token(Token::Approve(approval(
        TOKEN,
        Some("http://127.0.0.1:9"),
        None,
    )));
    let run = init(
        &config,
        &["--auth-url", &auth.url()],
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(run.stdout.contains("already provisioned"), "{}", run.stdout);
    assert!(run.stdout.contains("--relogin"), "{}", run.stdout);
    assert!(!run.all().contains("old-token"));
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        before,
        "nothing changed"
    );
    assert!(auth.requests().is_empty(), "no request was made");
    let run = init(
        &config,
        &["--auth-url", &auth.url(), "--json"],
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let line: Json = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        line,
        json!({"event": "already_provisioned", "config": config.to_str().unwrap()})
    );
    assert!(auth.requests().is_empty(), "no request was made");

    let run = init(
        &config,
        &["--auth-url", &auth.url(), "--relogin"],
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let stored = read_json(&config);
    assert_eq!(stored["device_api_token"], TOKEN);
    assert_eq!(stored["org_id"], "org-7");
    assert!(
        stored.get("node_id").is_none(),
        "old credentials go: {stored}"
    );
    assert_eq!(stored["concurrency"], 2, "settings stay");
}

#[test]
fn the_agent_afterwards_polls_nexus_with_the_stored_token_and_uses_the_stored_redis() {
    let nexus = FakeNexus::start();
    let redis = RedisServer::start();
    let auth = FakeAuth::start();
    auth.push_token(Token::Approve(approval(TOKEN, Some(&nexus.url()), None)));
    let (_base, config) = new_config();
    let run = init(
        &config,
        &["--auth-url", &auth.url()],
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());

    let mut agent = Citadel::spawn(
        &[
            "agent",
            "--config",
            config.to_str().unwrap(),
            "--poll-interval",
            "100ms",
            "--heartbeat-interval",
            "0",
        ],
        &[("RUST_LOG", "debug")],
    );
    let polls = nexus.wait_for_polls(2, Duration::from_secs(20));
    for p in &polls {
        assert_eq!(
            p.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{:?}",
            p.headers
        );
    }
    agent.sigterm();
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some());
    assert!(
        !agent.log().contains(TOKEN),
        "the token is in the agent's log"
    );

    // --nexus-token, when given, wins over the stored token.
    let mut agent = Citadel::spawn(
        &[
            "agent",
            "--config",
            config.to_str().unwrap(),
            "--poll-interval",
            "100ms",
            "--heartbeat-interval",
            "0",
            "--nexus-token",
            "explicit-token",
        ],
        &[],
    );
    let n = nexus.polls().len();
    let polls = nexus.wait_for_polls(n + 2, Duration::from_secs(20));
    assert_eq!(
        polls.last().unwrap().header("authorization"),
        Some("Bearer explicit-token")
    );
    agent.sigterm();
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some());

    // A stored redis_url is where `citadel work` takes jobs from.
    let auth = FakeAuth::start();
    auth.push_token(Token::Approve(approval(TOKEN, None, Some(&redis.url()))));
    let run = init(
        &config,
        &["--auth-url", &auth.url(), "--relogin"],
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let mut worker = Citadel::spawn(
        &[
            "work",
            "--config",
            config.to_str().unwrap(),
            "--node-name",
            "init-node",
            "--block",
            "1s",
            "--heartbeat-interval",
            "0",
        ],
        &[("RUST_LOG", "debug")],
    );
    worker.wait_working();
    let mut conn = redis.conn();
    support::xadd_job(
        &mut conn,
        "jobs:v1:gpu-general",
        "init-job-1",
        "echo",
        r#"{"hello":"from init"}"#,
    );
    wait_until(
        "the job's status to be completed",
        Duration::from_secs(20),
        || {
            let st = support::hgetall(&mut conn, "job:init-job-1:status");
            (st.get("status").map(String::as_str) == Some("completed")).then_some(())
        },
    );
    worker.sigterm();
    assert!(worker.wait_exit(Duration::from_secs(30)).is_some());
    assert!(!worker.log().contains(TOKEN));
}

/// `citadel <args>` as a non-root user (uid 65534 through setpriv when the
/// tests run as root) with `HOME` and no `CITADEL_CONFIG`: the default
/// config file is `~/.config/citadel/config.json` (or under
/// `XDG_CONFIG_HOME`), for init and for every other command alike.
fn as_user(home: &Path, xdg: Option<&Path>, args: &[&str]) -> Run {
    let root = running_as_root();
    let mut cmd = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(binary_anyone_can_run());
        c
    } else {
        std::process::Command::new(support::citadel_bin())
    };
    support::clean_env(&mut cmd, home);
    cmd.env_remove("CITADEL_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home)
        .args(args);
    if let Some(x) = xdg {
        cmd.env("XDG_CONFIG_HOME", x);
    }
    run_to_end(&mut cmd, Duration::from_secs(30))
}

/// A copy of the citadel binary in a temp dir that uid 65534 can reach
/// (the checkout may be under a home only root can enter).
fn binary_anyone_can_run() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let dir = fresh_temp_dir("init-bin");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("citadel");
        fs::copy(support::citadel_bin(), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        bin
    })
    .clone()
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn a_non_root_user_keeps_credentials_in_the_home_config_which_every_command_reads() {
    let home = fresh_temp_dir("init-home");
    fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).unwrap();
    let run = as_user(
        &home,
        None,
        &[
            "init",
            "--token",
            TOKEN,
            "--nexus-url",
            "http://127.0.0.1:9",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.all());
    let config = home.join(".config/citadel/config.json");
    assert_eq!(read_json(&config)["device_api_token"], TOKEN);
    assert_eq!(mode(&config), 0o600);
    assert_eq!(mode(config.parent().unwrap()), 0o700);
    assert!(
        run.stdout.contains(config.to_str().unwrap()),
        "{}",
        run.stdout
    );
    let status = as_user(
        &home,
        None,
        &["status", "--engine-connect-timeout", "100ms"],
    );
    assert_eq!(status.code, Some(0), "{}", status.all());
    assert!(
        status.stdout.contains("credentials: device_api_token ***")
            && status.stdout.contains(config.to_str().unwrap())
            && status.stdout.contains("nexus http://127.0.0.1:9"),
        "{}",
        status.stdout
    );
    status.assert_no_token(TOKEN);
    let again = as_user(&home, None, &["init", "--token", "other"]);
    assert!(
        again.stdout.contains("already provisioned"),
        "{}",
        again.all()
    );

    let xdg = home.join("xdg");
    let run = as_user(&home, Some(&xdg), &["init", "--token", TOKEN]);
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(xdg.join("citadel/config.json").exists());
}

#[test]
fn on_a_terminal_the_url_is_also_a_qr_code() {
    let auth = FakeAuth::start();
    auth.push_token(Token::Approve(approval(TOKEN, None, None)));
    let (base, config) = new_config();
    let log = base.join("typescript");
    // script(1) gives the command a pseudo-terminal as stdout.
    let inner = format!(
        "{} init --config {} --auth-url {}",
        support::citadel_bin(),
        config.display(),
        auth.url()
    );
    let mut cmd = std::process::Command::new("script");
    support::clean_env(&mut cmd, &base);
    let out = match cmd
        .args(["-q", "-e", "-c", &inner])
        .arg(&log)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            support::skip_unless_ci(
                "on_a_terminal_the_url_is_also_a_qr_code",
                &format!("script(1) (util-linux) cannot run: {e}"),
            );
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains('█') && text.contains('▀'),
        "no QR code:\n{text}"
    );
    assert!(text.contains(fake_auth::USER_CODE), "{text}");
    assert!(!text.contains(TOKEN));
    assert_eq!(read_json(&config)["device_api_token"], TOKEN);
}

/// A `systemctl` that records its calls in `dir/calls` and says the unit is
/// installed (is-enabled) when `dir/enabled` exists.
fn fake_systemctl(dir: &Path) -> String {
    let bin = dir.join("bin");
    fake_tool(
        &bin,
        "systemctl",
        &format!(
            "echo \"$*\" >> '{d}/calls'\ncase \"$1\" in\nis-enabled) [ -f '{d}/enabled' ] ;;\n*) exit 0 ;;\nesac",
            d = dir.display()
        ),
    );
    path_with(&bin)
}

#[test]
fn an_installed_service_is_restarted_to_run_with_the_new_credentials() {
    if !running_as_root() {
        support::skip_unless_ci(
            "an_installed_service_is_restarted_to_run_with_the_new_credentials",
            "only root restarts the service (the tests do not run as root)",
        );
        return;
    }
    let (base, config) = new_config();
    let token_file = base.join("token");
    fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let path = fake_systemctl(&base);
    let run_init = |config: &Path, json: bool| {
        let mut args = vec![
            "init",
            "--config",
            config.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        let out = citadel_cmd(&args).env("PATH", &path).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let calls = || fs::read_to_string(base.join("calls")).unwrap_or_default();

    // No service installed: nothing restarted.
    let stdout = run_init(&config, false);
    assert!(!stdout.contains("restarted"), "{stdout}");
    assert!(!calls().contains("try-restart"), "{}", calls());

    // Installed: restarted (if running) at once, so approval is all it takes.
    fs::write(base.join("enabled"), "").unwrap();
    let (_b, config2) = new_config();
    let stdout = run_init(&config2, false);
    assert!(
        stdout.contains("restarted citadel.service: the agent now runs with these credentials"),
        "{stdout}"
    );
    assert!(
        calls().lines().any(|l| l == "try-restart citadel.service"),
        "{}",
        calls()
    );
    let (_b, config3) = new_config();
    let stdout = run_init(&config3, true);
    let last: Json = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["service"]["restarted"], true, "{stdout}");
}
