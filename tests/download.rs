//! `model_download` through the real binary: `citadel run-job`, and
//! `citadel work` against a real redis-server, downloading from the local
//! file server in `support::file_server` (Range, faults, request log).

mod support;

use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};
use support::file_server::{FileServer, Serve};
use support::jobs::{run_to_end, Finished, TempDir};
use support::{
    citadel_cmd, hgetall, wait_until, worker_with_env, xadd_job, Citadel, RedisServer, Subscriber,
};

const WAIT: Duration = Duration::from_secs(30);
const QUEUE: &str = "jobs:v1:gpu-general";
const TOKEN: &str = "hf_s3cret-t0ken";

/// `n` bytes that are not all alike.
fn data(n: usize) -> Vec<u8> {
    (0..n as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The job's result: the last stdout line of `citadel run-job` (progress
/// lines come before).
fn result(out: &Finished) -> Json {
    let last = out.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// `citadel run-job` of a `model_download` job with `payload`, files under
/// `models`, fast retries, and `flags`.
fn run_job(models: &Path, payload: Json, flags: &[&str]) -> Finished {
    let job = json!({"type": "model_download", "payload": payload}).to_string();
    let models = models.to_str().unwrap();
    let mut args = vec![
        "run-job",
        &job,
        "--models-dir",
        models,
        "--retry-base",
        "5ms",
    ];
    args.extend_from_slice(flags);
    run_to_end(&mut citadel_cmd(&args), WAIT)
}

/// `citadel work` (support's [`worker_with_env`] timings) downloading into
/// `models`, fast retries, then `extra` and `env`.
fn download_worker(
    redis: &RedisServer,
    models: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Citadel {
    let mut args = vec![
        "--models-dir",
        models.to_str().unwrap(),
        "--retry-base",
        "5ms",
    ];
    args.extend_from_slice(extra);
    worker_with_env(redis, "dl-node", &args, env)
}

/// Serves `body` as `/w.bin`, dropping the first connection halfway;
/// returns where.
fn dropped_halfway(server: &FileServer, body: &[u8]) -> u64 {
    let half = body.len() as u64 / 2;
    server.serve(
        "/w.bin",
        Serve {
            drop_once_at: Some(half),
            ..Serve::file(body.to_vec())
        },
    );
    half
}

/// `citadel run-job` downloading the server's `/w.bin` into `models`, in
/// the background.
fn run_job_in_background(server: &FileServer, models: &Path) -> Citadel {
    let job =
        json!({"type": "model_download", "payload": {"url": server.url("/w.bin")}}).to_string();
    Citadel::spawn(
        &["run-job", &job, "--models-dir", models.to_str().unwrap()],
        &[],
    )
}

/// Serves `body` as `/w.bin`, pausing halfway until released; returns a
/// `run-job` downloading it once the server paused.
fn a_download_paused_halfway(server: &FileServer, models: &Path, body: &[u8]) -> Citadel {
    server.serve(
        "/w.bin",
        Serve {
            pause_at: Some(body.len() as u64 / 2),
            ..Serve::file(body.to_vec())
        },
    );
    let first = run_job_in_background(server, models);
    wait_until("the first job's download to pause", WAIT, || {
        (server.paused() == 1).then_some(())
    });
    first
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn models_dir() -> TempDir {
    TempDir::new("models")
}

#[test]
fn a_repo_file_is_downloaded_verified_and_not_fetched_again() {
    let server = FileServer::start();
    let body = data(300_000);
    let path = "/org/model/resolve/main/weights.bin";
    server.serve(path, Serve::file(body.clone()));
    let models = models_dir();
    let payload = json!({"repo": "org/model", "file_name": "weights.bin",
        "model_type": "llm", "sha256": sha(&body)});
    let hf = server.base();
    let flags = ["--hf-url", hf.as_str()];

    let out = run_job(&models, payload.clone(), &flags);
    assert_eq!(out.code, Some(0), "{out:?}");
    let r = result(&out);
    let want = fs::canonicalize(&models).unwrap().join("llm/weights.bin");
    assert_eq!(r["path"], want.display().to_string(), "{r}");
    assert_eq!(r["bytes"], body.len());
    assert_eq!(r["sha256"], sha(&body));
    assert_eq!(r["resumed_from"], 0);
    assert_eq!(fs::read(&want).unwrap(), body);
    // The lock went with the job.
    assert_eq!(files_under(&models), ["llm/weights.bin"]);
    assert_eq!(server.requests_for("GET", path).len(), 1);

    // With the checksum: no request at all the second time.
    let out = run_job(&models, payload.clone(), &flags);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(result(&out)["resumed_from"], body.len());
    assert_eq!(server.requests().len(), 1, "{:?}", server.requests());

    // Without it: one HEAD for the size, no GET.
    let mut no_sum = payload.clone();
    no_sum.as_object_mut().unwrap().remove("sha256");
    let out = run_job(&models, no_sum, &flags);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(result(&out)["sha256"], sha(&body));
    assert_eq!(server.requests_for("HEAD", path).len(), 1);
    assert_eq!(server.requests_for("GET", path).len(), 1);
}

#[test]
fn a_connection_dropped_mid_file_is_resumed_at_the_offset() {
    let server = FileServer::start();
    let body = data(1 << 20);
    let half = dropped_halfway(&server, &body);
    let models = models_dir();
    let out = run_job(
        &models,
        json!({"url": server.url("/w.bin"), "sha256": sha(&body)}),
        &[],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let gets = server.requests_for("GET", "/w.bin");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].header("range"), None);
    assert_eq!(
        gets[1].header("range"),
        Some(format!("bytes={half}-").as_str())
    );
    assert_eq!(result(&out)["sha256"], sha(&body));
    assert_eq!(fs::read(models.join("models/w.bin")).unwrap(), body);
}

#[test]
fn a_partial_file_on_disk_is_resumed_not_fetched_again() {
    let server = FileServer::start();
    let body = data(200_000);
    server.serve("/w.bin", Serve::file(body.clone()));
    let models = models_dir();
    fs::create_dir_all(models.join("models")).unwrap();
    fs::write(models.join("models/w.bin.partial"), &body[..123_456]).unwrap();
    let out = run_job(
        &models,
        json!({"url": server.url("/w.bin"), "sha256": sha(&body)}),
        &[],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(result(&out)["resumed_from"], 123_456);
    let gets = server.requests_for("GET", "/w.bin");
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].header("range"), Some("bytes=123456-"));
    assert_eq!(fs::read(models.join("models/w.bin")).unwrap(), body);
}

#[test]
fn a_server_that_ignores_range_gets_the_whole_file_again() {
    let server = FileServer::start();
    let body = data(200_000);
    server.serve(
        "/w.bin",
        Serve {
            ignore_range: true,
            ..Serve::file(body.clone())
        },
    );
    let models = models_dir();
    fs::create_dir_all(models.join("models")).unwrap();
    // Not even the right bytes: they must not end up in the file.
    fs::write(models.join("models/w.bin.partial"), vec![0xEE; 50_000]).unwrap();
    let out = run_job(
        &models,
        json!({"url": server.url("/w.bin"), "sha256": sha(&body)}),
        &[],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(result(&out)["resumed_from"], 0);
    let gets = server.requests_for("GET", "/w.bin");
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].header("range"), Some("bytes=50000-"));
    assert_eq!(fs::read(models.join("models/w.bin")).unwrap(), body);
}

#[test]
fn a_network_failure_is_retried_by_the_worker_from_the_bytes_on_disk() {
    let redis = RedisServer::start();
    let server = FileServer::start();
    let body = data(1 << 20);
    let half = dropped_halfway(&server, &body);
    let models = models_dir();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = download_worker(&redis, &models, &["--download-max-resumes", "0"], &[]);
    let payload = json!({"url": server.url("/w.bin"), "sha256": sha(&body)}).to_string();
    xadd_job(
        &mut redis.conn(),
        QUEUE,
        "dl-retry",
        "DOWNLOAD_MODEL",
        &payload,
    );
    let end = sub.wait_for("dl-retry", "end", WAIT);
    assert_eq!(end["data"]["result"]["sha256"], sha(&body), "{end}");
    // The executor's second attempt: a new job run, starting from the disk.
    assert_eq!(end["data"]["result"]["resumed_from"], half, "{end}");
    let gets = server.requests_for("GET", "/w.bin");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(
        gets[1].header("range"),
        Some(format!("bytes={half}-").as_str())
    );
    let status = hgetall(&mut redis.conn(), "job:dl-retry:status");
    assert_eq!(
        status.get("status").map(String::as_str),
        Some("completed"),
        "{status:?}"
    );
}

#[test]
fn progress_is_streamed_twice_a_second_and_a_later_drop_still_resumes() {
    let redis = RedisServer::start();
    let server = FileServer::start();
    let body = data(2 << 20);
    let at = body.len() as u64 * 3 / 4;
    server.serve(
        "/slow.bin",
        Serve {
            drop_once_at: Some(at),
            // 32 pieces of 64 KiB, 40 ms apart: ~1.3 s.
            pace: Some(Duration::from_millis(40)),
            ..Serve::file(body.clone())
        },
    );
    let models = models_dir();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = download_worker(&redis, &models, &[], &[]);
    let payload = json!({"url": server.url("/slow.bin")}).to_string();
    xadd_job(
        &mut redis.conn(),
        QUEUE,
        "dl-progress",
        "model_download",
        &payload,
    );
    let end = sub.wait_for("dl-progress", "end", WAIT);
    assert_eq!(end["data"]["result"]["bytes"], body.len(), "{end}");
    let chunks: Vec<Json> = sub
        .events_for("dl-progress")
        .into_iter()
        .filter(|e| e["type"] == "chunk")
        .collect();
    assert!(!chunks.is_empty(), "no progress chunk in ~1.3 s");
    let stamps: Vec<String> = chunks
        .iter()
        .map(|c| c["timestamp"].as_str().unwrap().to_owned())
        .collect();
    let mut before = 0;
    for c in &chunks {
        let p: Json = serde_json::from_str(c["data"]["content"].as_str().unwrap()).unwrap();
        let bytes = p["bytes"].as_u64().unwrap();
        assert_eq!(p["total"], body.len(), "{p}");
        assert!(p["percent"].as_f64().unwrap() <= 100.0, "{p}");
        assert!(p["rate"].as_u64().unwrap() > 0, "{p}");
        assert!(bytes >= before, "{chunks:?}");
        before = bytes;
    }
    // At most 2 a second: chunks are 500 ms apart by the handler's clock;
    // the event timestamps are taken a moment later, which a loaded
    // machine can stretch for one chunk and not the next, hence 400.
    for w in stamps.windows(2) {
        let ms = |t: &str| -> i64 {
            let hms = &t[11..23];
            let (h, rest) = hms.split_at(2);
            let (m, rest) = rest[1..].split_at(2);
            let (s, frac) = rest[1..].split_at(2);
            ((h.parse::<i64>().unwrap() * 60 + m.parse::<i64>().unwrap()) * 60
                + s.parse::<i64>().unwrap())
                * 1000
                + frac[1..].parse::<i64>().unwrap()
        };
        assert!(ms(&w[1]) - ms(&w[0]) >= 400, "{stamps:?}");
    }
    // The drop came after chunks were streamed; the handler resumed itself.
    let gets = server.requests_for("GET", "/slow.bin");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(
        gets[1].header("range"),
        Some(format!("bytes={at}-").as_str())
    );
}

#[test]
fn redirects_are_followed_the_token_stays_with_the_hf_host_and_no_proxy_for_loopback() {
    let redis = RedisServer::start();
    let hf = FileServer::start();
    let cdn = FileServer::start();
    let body = data(100_000);
    let path = "/org/m/resolve/main/w.bin";
    hf.serve(
        path,
        Serve {
            redirect_to: Some(cdn.url("/blob/w.bin?sig=abc")),
            ..Serve::default()
        },
    );
    cdn.serve("/blob/w.bin?sig=abc", Serve::file(body.clone()));
    let models = models_dir();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let hf_base = hf.base();
    let w = download_worker(
        &redis,
        &models,
        &["--hf-url", hf_base.as_str()],
        // A proxy nobody listens on: loopback downloads must not use it.
        &[
            ("CITADEL_HF_TOKEN", TOKEN),
            ("HTTP_PROXY", "http://127.0.0.1:9"),
            ("http_proxy", "http://127.0.0.1:9"),
        ],
    );
    let payload = json!({"repo": "org/m", "file_name": "w.bin"}).to_string();
    xadd_job(
        &mut redis.conn(),
        QUEUE,
        "dl-redirect",
        "model_download",
        &payload,
    );
    let end = sub.wait_for("dl-redirect", "end", WAIT);
    assert_eq!(end["data"]["result"]["sha256"], sha(&body), "{end}");
    let first = &hf.requests_for("GET", path)[0];
    assert_eq!(
        first.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let second = &cdn.requests()[0];
    assert_eq!(second.header("authorization"), None, "{second:?}");
    for (_, ev) in sub.messages() {
        assert!(!ev.to_string().contains(TOKEN), "{ev}");
    }
    assert!(!w.log().contains(TOKEN));
}

#[test]
fn a_checksum_mismatch_fails_for_good_and_leaves_no_file() {
    let server = FileServer::start();
    let body = data(100_000);
    server.serve("/w.bin", Serve::file(body.clone()));
    let models = models_dir();
    let wrong = sha(b"something else");
    let out = run_job(
        &models,
        json!({"url": server.url("/w.bin"), "sha256": wrong}),
        &[],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("(permanent error)"), "{out:?}");
    assert!(out.stderr.contains("checksum mismatch"), "{out:?}");
    assert!(out.stderr.contains(&sha(&body)), "{out:?}");
    assert_eq!(server.requests().len(), 1, "not retried");
    assert!(
        files_under(&models).is_empty(),
        "{:?}",
        files_under(&models)
    );
}

#[test]
fn a_zero_byte_file_is_downloaded_and_then_found_complete() {
    let server = FileServer::start();
    server.serve("/empty.bin", Serve::file(Vec::new()));
    let models = models_dir();
    let payload = json!({"url": server.url("/empty.bin")});
    let out = run_job(&models, payload.clone(), &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(result(&out)["bytes"], 0);
    assert_eq!(result(&out)["sha256"], sha(b""));
    assert_eq!(fs::read(models.join("models/empty.bin")).unwrap(), b"");
    let out = run_job(&models, payload, &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(server.requests_for("GET", "/empty.bin").len(), 1);
    assert_eq!(server.requests_for("HEAD", "/empty.bin").len(), 1);
}

#[test]
fn a_stalled_server_ends_the_download_after_the_idle_timeout() {
    let server = FileServer::start();
    let body = data(200_000);
    server.serve(
        "/w.bin",
        Serve {
            stall_at: Some(100_000),
            ..Serve::file(body)
        },
    );
    let models = models_dir();
    let t0 = Instant::now();
    let out = run_job(
        &models,
        json!({"url": server.url("/w.bin")}),
        &[
            "--download-idle-timeout",
            "1s",
            "--download-max-resumes",
            "1",
            "--max-retries",
            "0",
        ],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("sent nothing for 1s (download-idle-timeout)"),
        "{out:?}"
    );
    assert!(out.stderr.contains("100000 bytes are on disk"), "{out:?}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    // One resume, at the offset; it stalled again.
    let gets = server.requests_for("GET", "/w.bin");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].header("range"), Some("bytes=100000-"));
    assert_eq!(
        fs::metadata(models.join("models/w.bin.partial"))
            .unwrap()
            .len(),
        100_000
    );
    // A failed download keeps its bytes for a resume, not its lock.
    assert_eq!(files_under(&models), ["models/w.bin.partial"]);
}

#[test]
fn names_that_would_leave_the_models_dir_are_refused() {
    let server = FileServer::start();
    server.serve("/w.bin", Serve::file(data(10)));
    let base = TempDir::new("escape");
    let models = base.join("models");
    let outside = base.join("outside");
    fs::create_dir_all(&models).unwrap();
    fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, models.join("evil")).unwrap();
    fs::create_dir_all(models.join("llm")).unwrap();
    std::os::unix::fs::symlink(outside.join("x.bin"), models.join("llm/x.bin")).unwrap();
    let url = server.url("/w.bin");
    for (extra, want) in [
        (json!({"file_name": "../x.bin"}), "'.' or '..'"),
        (json!({"file_name": "a/../../x.bin"}), "'.' or '..'"),
        (json!({"file_name": "/tmp/x.bin"}), "absolute path"),
        (json!({"file_name": ""}), "is empty"),
        (json!({"model_type": ".."}), "'.' or '..'"),
        (
            json!({"model_type": "evil"}),
            "outside the models directory",
        ),
        (
            json!({"model_type": "evil/sub"}),
            "outside the models directory",
        ),
        (
            json!({"model_type": ".", "file_name": "x.bin"}),
            "'.' or '..'",
        ),
        (json!({"model_type": "", "file_name": "x.bin"}), "is empty"),
    ] {
        let mut payload = json!({ "url": url });
        for (k, v) in extra.as_object().unwrap() {
            payload[k] = v.clone();
        }
        let out = run_job(&models, payload.clone(), &[]);
        assert_eq!(out.code, Some(1), "{payload}: {out:?}");
        assert!(
            out.stderr.contains("(permanent error)"),
            "{payload}: {out:?}"
        );
        assert!(out.stderr.contains(want), "{payload}: {out:?}");
    }
    // A model file that is a symlink to outside.
    let out = run_job(
        &models,
        json!({"url": url, "model_type": "llm", "file_name": "x.bin"}),
        &[],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("outside the models directory"),
        "{out:?}"
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    assert!(
        files_under(&outside).is_empty(),
        "{:?}",
        files_under(&outside)
    );
}

#[test]
fn two_jobs_for_one_file_download_it_once() {
    let server = FileServer::start();
    let body = data(1 << 20);
    let models = models_dir();
    let mut first = a_download_paused_halfway(&server, &models, &body);
    let mut second = run_job_in_background(&server, &models);
    second.wait_for_log("waiting for another job writing", WAIT);
    assert_eq!(
        server.requests().len(),
        1,
        "the second job waits before any request"
    );
    server.release();
    for c in [&mut first, &mut second] {
        let status = c.wait_exit(WAIT).expect("citadel run-job exits");
        assert!(status.success(), "{}", c.log());
        let log = c.log();
        let result = log.lines().rfind(|l| l.contains("\"path\"")).unwrap();
        let r: Json = serde_json::from_str(result).unwrap();
        assert_eq!(r["sha256"], sha(&body), "{log}");
    }
    assert_eq!(server.requests_for("GET", "/w.bin").len(), 1);
    assert_eq!(fs::read(models.join("models/w.bin")).unwrap(), body);
    assert_eq!(files_under(&models), ["models/w.bin"], "no lock left");
}

#[test]
fn the_lock_of_a_killed_download_does_not_block_the_next_one() {
    let server = FileServer::start();
    let body = data(1 << 20);
    let models = models_dir();
    let mut first = a_download_paused_halfway(&server, &models, &body);
    // Killed holding the lock: its .lock stays, its flock goes with it.
    first.kill9();
    assert!(models.join("models/w.bin.lock").exists());
    server.release();
    let mut second = run_job_in_background(&server, &models);
    let status = second.wait_exit(WAIT).expect("citadel run-job exits");
    assert!(status.success(), "{}", second.log());
    assert!(
        !second.log().contains("waiting for another job"),
        "{}",
        second.log()
    );
    assert_eq!(fs::read(models.join("models/w.bin")).unwrap(), body);
    assert_eq!(
        files_under(&models),
        ["models/w.bin"],
        "the stale lock is gone"
    );
}

#[test]
fn a_download_larger_than_the_free_space_fails_before_it_starts() {
    let server = FileServer::start();
    server.serve(
        "/huge.bin",
        Serve {
            claim_length: Some(1 << 60),
            ..Serve::file(Vec::new())
        },
    );
    let models = models_dir();
    let out = run_job(&models, json!({"url": server.url("/huge.bin")}), &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("(permanent error)"), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "not enough free space in {}",
            fs::canonicalize(&models).unwrap().join("models").display()
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&format!("{} bytes needed", 1u64 << 60)),
        "{out:?}"
    );
    assert_eq!(server.requests().len(), 1, "not retried");
    assert_eq!(
        fs::metadata(models.join("models/huge.bin.partial"))
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn bad_payloads_fail_at_once_and_say_what_to_fix() {
    let models = models_dir();
    for (payload, want) in [
        (
            json!({}),
            "needs url, or repo ('org/name') or repo_url with file_name",
        ),
        (
            json!({"url": 42}),
            "payload.url must be a string, got a number",
        ),
        (
            json!({"url": "file:///etc/passwd"}),
            "must be an http:// or https:// URL",
        ),
        (json!({"repo": "org/m"}), "needs payload.file_name"),
        (
            json!({"repo": "org", "file_name": "w"}),
            "must be 'org/name'",
        ),
        (
            json!({"url": "http://127.0.0.1:1/w", "sha256": "abc123"}),
            "64 hexadecimal digits",
        ),
        (
            json!({"url": "http://127.0.0.1:1/w", "sha256": 7}),
            "got a number",
        ),
        (
            json!({"url": "http://127.0.0.1:1/w", "model_type": {}}),
            "got an object",
        ),
    ] {
        let out = run_job(&models, payload.clone(), &[]);
        assert_eq!(out.code, Some(1), "{payload}: {out:?}");
        assert!(
            out.stderr.contains("(permanent error)"),
            "{payload}: {out:?}"
        );
        assert!(out.stderr.contains(want), "{payload}: {out:?}");
    }
    assert!(files_under(&models).is_empty());
}

#[test]
fn a_cancelled_download_stops_at_once_and_the_next_job_resumes_it() {
    let redis = RedisServer::start();
    let server = FileServer::start();
    let body = data(1 << 20);
    server.serve(
        "/w.bin",
        Serve {
            pause_at: Some(1 << 19),
            ..Serve::file(body.clone())
        },
    );
    let models = models_dir();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = download_worker(&redis, &models, &[], &[]);
    let payload = json!({"url": server.url("/w.bin"), "sha256": sha(&body)}).to_string();
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "dl-cancel", "model_download", &payload);
    wait_until("the download to pause", WAIT, || {
        (server.paused() == 1).then_some(())
    });
    redis::cmd("SET")
        .arg("job:cancelled:dl-cancel")
        .arg("1")
        .exec(&mut conn)
        .unwrap();
    // The read blocked on a silent server returns at once (the idle timeout is 60s).
    sub.wait_for("dl-cancel", "cancelled", Duration::from_secs(10));
    let kept = fs::metadata(models.join("models/w.bin.partial"))
        .unwrap()
        .len();
    assert_eq!(
        files_under(&models),
        ["models/w.bin.partial"],
        "a cancelled job's lock goes"
    );
    assert!(kept > 0 && kept <= 1 << 19, "{kept}");

    server.release();
    xadd_job(&mut conn, QUEUE, "dl-again", "model_download", &payload);
    let end = sub.wait_for("dl-again", "end", WAIT);
    assert_eq!(end["data"]["result"]["resumed_from"], kept, "{end}");
    assert_eq!(end["data"]["result"]["sha256"], sha(&body), "{end}");
    let gets = server.requests_for("GET", "/w.bin");
    assert_eq!(
        gets[1].header("range"),
        Some(format!("bytes={kept}-").as_str())
    );
    assert_eq!(files_under(&models), ["models/w.bin"], "no lock left");
}
