//! `citadel gateway` driven by the official `openai` Python client (PyPI, in
//! a venv under target/tmp/openai-venv that scripts/deps.sh makes; this
//! test makes it too when missing) against a real `citadel work` and the
//! REAL llama-server with its small model (scripts/real-engine.sh's cache,
//! as tests/real_engine.rs). Chat and completions, streamed and whole,
//! `include_usage`; the text must equal what the engine answers directly
//! at temperature 0. A client that leaves mid-stream: the job ends
//! `cancelled` and the engine's slot is free again.
//!
//! Without the engine or the venv it prints a loud SKIPPED line (a failure
//! under CI=true); CITADEL_SKIP_REAL_ENGINE=1 skips it on purpose.

mod support;

use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::real_engine::{engine_or_skip, one_engine, LlamaServer};
use support::{fresh_temp_dir, skip_unless_ci, wait_until, Citadel, RedisServer};

const WAIT: Duration = Duration::from_secs(90);
const TEST: &str = "openai_client_through_the_gateway_matches_the_engine_and_cancels_on_leave";

/// The client's side, one run: every answer as one JSON line on stdout.
const CLIENT: &str = r#"
import json, sys
from openai import OpenAI
base, mode = sys.argv[1], sys.argv[2]
c = OpenAI(base_url=base, api_key="sk-gateway-test", max_retries=0, timeout=120)
msgs = [{"role": "user", "content": "Name three colors."}]
out = {}
if mode == "answers":
    r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
    out["chat"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                   "usage": r.usage.model_dump(), "object": r.object}
    text, usage, roles = "", None, 0
    for ch in c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage.model_dump()
        for choice in ch.choices:
            if choice.delta.role:
                roles += 1
            text += choice.delta.content or ""
    out["chat_stream"] = {"text": text, "usage": usage, "roles": roles}
    r = c.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8,
                             temperature=0)
    out["completion"] = {"text": r.choices[0].text, "usage": r.usage.model_dump()}
    text = ""
    for ch in c.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8,
                                   temperature=0, stream=True):
        text += ch.choices[0].text if ch.choices else ""
    out["completion_stream"] = {"text": text}
    out["models"] = [m.id for m in c.models.list()]
    try:
        c.chat.completions.create(model="nope", messages=msgs)
    except Exception as e:
        out["unknown_model"] = {"status": getattr(e, "status_code", None), "kind": type(e).__name__}
elif mode == "leave":
    s = c.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,", max_tokens=400,
                             temperature=0, stream=True)
    n = 0
    for ch in s:
        n += 1
        if n == 3:
            break
    s.close()
    out["chunks_read"] = n
print(json.dumps(out))
"#;

fn venv_python() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv/bin/python")
}

/// The venv's python with `openai` importable, made when missing.
fn openai_python() -> Result<PathBuf, String> {
    let py = venv_python();
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&py) {
        return Ok(py);
    }
    let venv = py.parent().and_then(Path::parent).unwrap().to_path_buf();
    let _ = std::fs::remove_dir_all(&venv);
    let made = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        return Err("python3 -m venv failed (no python3-venv?)".into());
    }
    let pip = venv.join("bin/pip");
    let installed = Command::new(pip)
        .args(["install", "--quiet", "openai"])
        .status();
    if installed.is_ok_and(|s| s.success()) && works(&py) {
        Ok(py)
    } else {
        let _ = std::fs::remove_dir_all(&venv);
        Err(
            "pip install openai failed (no PyPI?); scripts/deps.sh's ensure_openai_venv makes it"
                .into(),
        )
    }
}

fn client(py: &Path, base: &str, mode: &str) -> Json {
    let script = fresh_temp_dir("openai-client").join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let out = Command::new(py)
        .arg(&script)
        .args([base, mode])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("NO_PROXY", "*")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn openai_client_through_the_gateway_matches_the_engine_and_cancels_on_leave() {
    let Some((server, model)) = engine_or_skip(TEST) else {
        return;
    };
    let py = match openai_python() {
        Ok(py) => py,
        Err(why) => return skip_unless_ci(TEST, &why),
    };
    let _one = one_engine();
    let llama = LlamaServer::start(&server, &model, 1024, 1);
    // What the engine answers directly, at temperature 0.
    let msgs = json!([{"role": "user", "content": "Name three colors."}]);
    let direct_chat = llama.post(
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": msgs, "max_tokens": 8, "temperature": 0}),
    )["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let direct_completion = llama.post(
        "/completion",
        &json!({"prompt": "Once upon a time", "n_predict": 8, "temperature": 0}),
    )["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!direct_chat.is_empty() && !direct_completion.is_empty());

    let redis = RedisServer::start();
    let w = support::worker(
        &redis,
        "gw-real",
        &[
            "--llamacpp-url",
            &llama.url,
            "--engine-first-token-timeout",
            "60s",
        ],
    );
    w.wait_working();
    let addr = format!("127.0.0.1:{}", support::free_port());
    let url = redis.url();
    let g = Citadel::spawn(
        &[
            "gateway",
            "--listen",
            &addr,
            "--route",
            "smollm2=llamacpp",
            "--api-key",
            "sk-gateway-test",
            "--gateway-claim-timeout",
            "30s",
        ],
        &[("CITADEL_REDIS_URL", &url)],
    );
    g.wait_for_log("gateway: listening on", WAIT);
    let base = format!("http://{addr}/v1");

    let out = client(&py, &base, "answers");
    assert_eq!(out["chat"]["text"], direct_chat.as_str(), "{out}");
    assert_eq!(out["chat"]["object"], "chat.completion");
    assert!(
        out["chat"]["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{out}"
    );
    assert_eq!(out["chat_stream"]["text"], direct_chat.as_str(), "{out}");
    assert_eq!(out["chat_stream"]["roles"], 1, "{out}");
    assert!(
        out["chat_stream"]["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{out}"
    );
    assert_eq!(
        out["completion"]["text"],
        direct_completion.as_str(),
        "{out}"
    );
    assert_eq!(
        out["completion_stream"]["text"],
        direct_completion.as_str(),
        "{out}"
    );
    assert_eq!(out["models"], json!(["smollm2"]));
    assert_eq!(out["unknown_model"]["status"], 404, "{out}");

    // A client that leaves after 3 chunks of a long answer.
    let t = Instant::now();
    let out = client(&py, &base, "leave");
    assert_eq!(out["chunks_read"], 3);
    let mut c = redis.conn();
    wait_until("the left job to end cancelled", WAIT, || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("job:gw-*:status")
            .query(&mut c)
            .unwrap();
        keys.iter().find_map(|k| {
            (support::hgetall(&mut c, k)
                .get("status")
                .map(String::as_str)
                == Some("cancelled"))
            .then_some(())
        })
    });
    wait_until("the engine's slot free again", WAIT, || {
        (!llama.busy()).then_some(())
    });
    assert!(t.elapsed() < WAIT);
    // The engine serves the next request at once.
    let again = client(&py, &base, "answers");
    assert_eq!(again["chat"]["text"], direct_chat.as_str());
}
