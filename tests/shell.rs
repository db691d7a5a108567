//! `shell_command` (issue 9) as a backend and an operator see it, through the
//! real binary against a real redis-server (and a fake Nexus, and
//! `citadel run-job`): chunks as output appears, `{exit_code, output}`,
//! failures, the output cap, lossy UTF-8, the scrubbed environment, and that
//! a deadline, a cancellation or the agent's shutdown leaves no process of
//! the command's group alive (checked in /proc against the pids the command
//! wrote to the workspace).

mod support;

use serde_json::{json, Value as Json};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::fake_nexus::FakeNexus;
use support::jobs::{run_to_end, terminal_event, wait_pid_gone};
use support::observe::{event_type, events_of, is_terminal, kinds_of};
use support::{
    citadel_cmd, fresh_temp_dir, wait_until, worker_with_env, xadd_job, xrange_all, Citadel,
    RedisServer, Subscriber,
};

/// Longest wait for anything a worker should do promptly (a loaded 2-core
/// machine runs these tests in parallel).
const WAIT: Duration = Duration::from_secs(20);
const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";
/// The kill grace the workers of these tests use.
const GRACE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A worker that runs shell jobs in its own fresh workspace.
struct ShellWorker {
    citadel: Citadel,
    workspace: PathBuf,
}

/// `citadel work --allow-shell` (support's [`worker_with_env`] timings) with
/// fast retries and a 1 s kill grace;
/// later flags in `extra` override these.
fn shell_worker(
    redis: &RedisServer,
    node: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> ShellWorker {
    let workspace = fresh_temp_dir("shell-ws").join("workspace");
    let ws = workspace.to_str().expect("utf-8 temp dir").to_owned();
    let grace = format!("{}ms", GRACE.as_millis());
    let mut args = vec![
        "--retry-base",
        "5ms",
        "--shutdown-grace",
        "2s",
        "--allow-shell",
        "--workspace-dir",
        &ws,
        "--shell-kill-grace",
        &grace,
    ];
    args.extend_from_slice(extra);
    ShellWorker {
        citadel: worker_with_env(redis, node, &args, env),
        workspace,
    }
}

fn submit(redis: &RedisServer, job: &str, kind: &str, payload: Json) {
    xadd_job(&mut redis.conn(), QUEUE, job, kind, &payload.to_string());
}

/// The contents of the job's chunk events so far, checking that their
/// indexes run from 0 without a gap.
fn chunks(sub: &Subscriber, job: &str) -> Vec<String> {
    events_of(sub, job, "chunk")
        .iter()
        .enumerate()
        .map(|(i, ev)| {
            assert_eq!(ev["data"]["index"], json!(i), "chunk indexes: {ev}");
            ev["data"]["content"]
                .as_str()
                .expect("chunk content")
                .to_owned()
        })
        .collect()
}

/// Waits until the job's chunks, joined, contain `needle`.
fn wait_output(sub: &Subscriber, job: &str, needle: &str) -> String {
    wait_until(&format!("{needle:?} in the chunks of {job}"), WAIT, || {
        let text = chunks(sub, job).concat();
        text.contains(needle).then_some(text)
    })
}

/// The dead letter of job `job`.
fn dead_letter(redis: &RedisServer, job: &str) -> std::collections::HashMap<String, String> {
    let mut conn = redis.conn();
    wait_until(&format!("a dead letter of {job}"), WAIT, || {
        xrange_all(&mut conn, DLQ)
            .into_iter()
            .map(|(_, f)| f)
            .find(|f| f.get("jobId").map(String::as_str) == Some(job))
    })
}

/// The shell snippet that writes the command's own pid (`$$`, the group's
/// id) to `{job}.pids` in the workspace; the `spawn` snippets append the
/// pids of background children.
fn record_leader(job: &str) -> String {
    format!("echo $$ > {job}.pids; ")
}

/// A background `sleep 100` whose pid is recorded.
fn spawn_sleeper(job: &str) -> String {
    format!("sleep 100 & echo $! >> {job}.pids; ")
}

/// A background child that ignores SIGTERM (the ignore survives exec).
fn spawn_term_ignorer(job: &str) -> String {
    format!("(trap '' TERM; exec sleep 100) & echo $! >> {job}.pids; ")
}

/// The pids the command recorded; the first is its group's id.
fn recorded_pids(workspace: &Path, job: &str) -> Vec<i32> {
    let path = workspace.join(format!("{job}.pids"));
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("pid {l:?}")))
        .collect()
}

/// (state, ppid, pgrp) of a process, if it exists.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// Every process of group `pgid` that is not a zombie (a zombie is dead; one
/// reparented to this machine's PID 1 is PID 1's to reap).
fn live_members(pgid: i32) -> Vec<i32> {
    fs::read_dir("/proc")
        .expect("reading /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(
            |&pid| matches!(proc_stat(pid), Some((s, _, g)) if g == pgid && s != 'Z' && s != 'X'),
        )
        .collect()
}

/// Checks that the recorded processes are alive and in the command's own
/// process group (led by the shell, which is not the agent's group).
fn assert_running_in_own_group(pids: &[i32], agent: u32) {
    let pgid = pids[0];
    for &pid in pids {
        let (state, _, group) =
            proc_stat(pid).unwrap_or_else(|| panic!("process {pid} is not running"));
        assert_eq!(
            group, pgid,
            "process {pid} (state {state}) is not in group {pgid}"
        );
    }
    assert_ne!(
        proc_stat(agent as i32).map(|s| s.2),
        Some(pgid),
        "the agent shares the command's group"
    );
}

/// Checks, at once, that no process of the command's group lives and that
/// the agent left no zombie of its own (the leader was reaped).
fn assert_group_gone(pids: &[i32], agent: u32) {
    let pgid = pids[0];
    let live = live_members(pgid);
    assert!(
        live.is_empty(),
        "processes of group {pgid} survived the job: {live:?}"
    );
    for &pid in pids {
        if let Some((state, ppid, group)) = proc_stat(pid) {
            assert!(
                !(ppid == agent as i32 && group == pgid),
                "process {pid} (state {state}) is still a child of the agent"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Output and results
// ---------------------------------------------------------------------------

#[test]
fn output_is_streamed_as_it_appears_and_the_result_holds_exit_code_and_output() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = shell_worker(&redis, "node-stream", &[], &[]);
    let command = "echo first; echo warn >&2; \
                   until [ -e go ]; do sleep 0.02; done; printf partial; \
                   until [ -e go2 ]; do sleep 0.02; done; echo ' rest'";
    submit(
        &redis,
        "j-stream",
        "shell_command",
        json!({ "command": command }),
    );

    // Each piece arrives while the command still runs (it waits for the
    // test's files), a partial line too.
    wait_output(&sub, "j-stream", "first\n");
    wait_output(&sub, "j-stream", "warn\n");
    assert!(!kinds_of(&sub, "j-stream").iter().any(|k| is_terminal(k)));
    fs::write(w.workspace.join("go"), "").unwrap();
    wait_output(&sub, "j-stream", "partial");
    assert!(!kinds_of(&sub, "j-stream").iter().any(|k| is_terminal(k)));
    fs::write(w.workspace.join("go2"), "").unwrap();

    let end = terminal_event(&sub, "j-stream", WAIT);
    assert_eq!(event_type(&end), "end", "{end}");
    let result = &end["data"]["result"];
    assert_eq!(result["exit_code"], json!(0), "{result}");
    let output = result["output"].as_str().expect("output string");
    let streamed = chunks(&sub, "j-stream");
    assert_eq!(
        streamed.concat(),
        output,
        "the result holds what was streamed, in order"
    );
    let mut lines: Vec<&str> = output.lines().collect();
    lines.sort();
    assert_eq!(lines, ["first", "partial rest", "warn"], "{output:?}");
    assert!(
        streamed.contains(&"partial".to_owned()),
        "partial line sent on its own: {streamed:?}"
    );
    let kinds = kinds_of(&sub, "j-stream");
    assert_eq!(kinds.first().map(String::as_str), Some("claimed"));
    assert_eq!(kinds[1], "start");
}

#[test]
fn a_failing_command_fails_for_good_with_its_exit_code_or_signal_and_its_output_tail() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = shell_worker(&redis, "node-exit", &[], &[]);
    // The alias is accepted too.
    submit(
        &redis,
        "j-exit",
        "SHELL_COMMAND",
        json!({"command": "echo line1; echo boom >&2; exit 7"}),
    );
    submit(
        &redis,
        "j-sig",
        "shell_command",
        json!({"command": "echo dying; kill -KILL $$"}),
    );

    let err = terminal_event(&sub, "j-exit", WAIT);
    assert_eq!(event_type(&err), "error", "{err}");
    assert_eq!(err["data"]["recoverable"], json!(false), "{err}");
    let msg = err["data"]["error"].as_str().unwrap();
    assert!(msg.contains("exited with code 7"), "{msg}");
    assert!(
        msg.contains("boom") && msg.contains("line1"),
        "the output's tail: {msg}"
    );
    let dl = dead_letter(&redis, "j-exit");
    assert_eq!(dl["reason"], "permanent error", "{dl:?}");
    assert_eq!(dl["deliveries"], "1", "not retried: {dl:?}");

    let err = terminal_event(&sub, "j-sig", WAIT);
    assert_eq!(event_type(&err), "error", "{err}");
    let msg = err["data"]["error"].as_str().unwrap();
    assert!(msg.contains("killed by signal 9 (SIGKILL)"), "{msg}");
    assert!(msg.contains("dying"), "{msg}");
}

#[test]
fn output_beyond_the_cap_is_cut_with_a_marker_but_still_streamed() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = shell_worker(&redis, "node-cap", &["--shell-output-cap", "1000"], &[]);
    let command =
        "i=0; while [ $i -lt 100 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done";
    submit(
        &redis,
        "j-cap",
        "shell_command",
        json!({ "command": command }),
    );

    let end = terminal_event(&sub, "j-cap", WAIT);
    assert_eq!(event_type(&end), "end", "{end}");
    let output = end["data"]["result"]["output"].as_str().unwrap();
    let full: String = (0..100)
        .map(|i| format!("line-{i}-xxxxxxxxxxxxxxxxxxxx\n"))
        .collect();
    assert_eq!(
        chunks(&sub, "j-cap").concat(),
        full,
        "every byte is streamed"
    );
    let (kept, marker) = output.split_at(1000);
    assert_eq!(kept, &full[..1000]);
    assert_eq!(
        marker,
        format!(
            "\n[output truncated: {} more bytes not kept (shell-output-cap is 1000 bytes)]\n",
            full.len() - 1000
        )
    );
}

#[test]
fn output_that_is_not_utf8_is_passed_through_lossily() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = shell_worker(&redis, "node-utf8", &[], &[]);
    // Invalid bytes, then an "é" whose two bytes come 300 ms apart (past the
    // partial-line flush): it must not be split into two replacement marks.
    let command = r"printf 'ok \377\376 end\n'; printf '\303'; sleep 0.3; printf '\251\n'";
    submit(
        &redis,
        "j-utf8",
        "shell_command",
        json!({ "command": command }),
    );

    let end = terminal_event(&sub, "j-utf8", WAIT);
    assert_eq!(event_type(&end), "end", "{end}");
    assert_eq!(
        end["data"]["result"]["output"],
        json!("ok \u{fffd}\u{fffd} end\né\n")
    );
    assert_eq!(
        chunks(&sub, "j-utf8").concat(),
        "ok \u{fffd}\u{fffd} end\né\n"
    );
}

#[test]
fn the_command_sees_a_scrubbed_environment_plus_the_jobs_env() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = shell_worker(
        &redis,
        "node-env",
        &[],
        &[
            ("CITADEL_TOKEN", "tok-123"),
            ("MY_SECRET", "s3cret"),
            ("LC_API_KEY", "k-456"),
            ("EDITOR", "vi"),
            ("LC_ALL", "C"),
        ],
    );
    submit(
        &redis,
        "j-env",
        "shell_command",
        json!({"command": "env; pwd", "env": {"JOB_VAR": "from the job", "MY_TOKEN": "job-owned"}}),
    );

    let end = terminal_event(&sub, "j-env", WAIT);
    assert_eq!(event_type(&end), "end", "{end}");
    let output = end["data"]["result"]["output"].as_str().unwrap();
    let names: Vec<&str> = output
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .collect();
    assert!(names.contains(&"PATH"), "{output}");
    assert!(output.contains("LC_ALL=C\n"), "{output}");
    assert!(output.contains("JOB_VAR=from the job\n"), "{output}");
    assert!(
        output.contains("MY_TOKEN=job-owned\n"),
        "the job's own env is passed: {output}"
    );
    for hidden in ["tok-123", "s3cret", "k-456", "EDITOR", "CITADEL_"] {
        assert!(
            !output.contains(hidden),
            "{hidden} leaked to the command: {output}"
        );
    }
    let allowed = [
        "PATH", "HOME", "LANG", "TZ", "TERM", "USER", "PWD", "SHLVL", "_", "JOB_VAR", "MY_TOKEN",
        "OLDPWD",
    ];
    for name in names {
        assert!(
            allowed.contains(&name) || name.starts_with("LC_"),
            "{name} should not be set: {output}"
        );
    }
    assert!(
        output.trim_end().ends_with("/workspace"),
        "runs in the workspace: {output}"
    );
}

// ---------------------------------------------------------------------------
// Deadlines, cancellation, shutdown: no process of the group survives
// ---------------------------------------------------------------------------

#[test]
fn a_deadline_kills_the_whole_tree_including_a_child_that_ignores_sigterm() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = shell_worker(&redis, "node-deadline", &[], &[]);
    let job = "j-deadline";
    let command = format!(
        "{}{}{}echo ready; sleep 100",
        record_leader(job),
        spawn_sleeper(job),
        spawn_term_ignorer(job)
    );
    let timeout = Duration::from_millis(1500);
    // Before the job exists, so before its deadline is armed.
    let started = Instant::now();
    submit(
        &redis,
        job,
        "shell_command",
        json!({"command": command, "timeout_ms": timeout.as_millis() as u64}),
    );
    wait_output(&sub, job, "ready\n");
    let pids = recorded_pids(&w.workspace, job);
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert_running_in_own_group(&pids, w.citadel.pid());

    let err = terminal_event(&sub, job, WAIT);
    let took = started.elapsed();
    assert_group_gone(&pids, w.citadel.pid());
    assert_eq!(event_type(&err), "error", "{err}");
    assert!(
        err["data"]["error"]
            .as_str()
            .unwrap()
            .contains("timeout_ms of 1500ms"),
        "{err}"
    );
    // The ignorer only goes with SIGKILL, one kill grace after SIGTERM.
    assert!(took >= timeout + GRACE, "ended after {took:?}");
    assert_eq!(dead_letter(&redis, job)["reason"], "deadline exceeded");
}

#[test]
fn a_job_without_timeout_ms_gets_the_shell_timeout() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = shell_worker(
        &redis,
        "node-default-timeout",
        &["--shell-timeout", "1s"],
        &[],
    );
    let job = "j-default-timeout";
    let command = format!("{}echo ready; sleep 100", record_leader(job));
    submit(&redis, job, "shell_command", json!({ "command": command }));
    wait_output(&sub, job, "ready\n");
    let pids = recorded_pids(&w.workspace, job);

    let err = terminal_event(&sub, job, WAIT);
    assert_group_gone(&pids, w.citadel.pid());
    assert_eq!(event_type(&err), "error", "{err}");
    let msg = err["data"]["error"].as_str().unwrap();
    assert!(msg.contains("1000ms (--shell-timeout"), "{msg}");
    assert_eq!(dead_letter(&redis, job)["reason"], "deadline exceeded");
}

#[test]
fn cancellation_kills_the_process_group() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    // A long kill grace: processes that obey SIGTERM must not wait for it.
    let w = shell_worker(&redis, "node-cancel", &["--shell-kill-grace", "30s"], &[]);
    let job = "j-cancel";
    // The shape `sleep 100 & sleep 100`, with the pids recorded.
    let command = format!(
        "{}{}echo ready; sleep 100",
        record_leader(job),
        spawn_sleeper(job)
    );
    submit(&redis, job, "shell_command", json!({ "command": command }));
    wait_output(&sub, job, "ready\n");
    let pids = recorded_pids(&w.workspace, job);
    assert_running_in_own_group(&pids, w.citadel.pid());

    let t0 = Instant::now();
    redis::cmd("SET")
        .arg(format!("job:cancelled:{job}"))
        .arg("1")
        .exec(&mut redis.conn())
        .expect("SET cancel key");
    let ev = terminal_event(&sub, job, WAIT);
    assert_group_gone(&pids, w.citadel.pid());
    assert_eq!(event_type(&ev), "cancelled", "{ev}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "SIGTERM was enough: {:?}",
        t0.elapsed()
    );
}

#[test]
fn cancellation_kills_a_child_that_ignores_sigterm_after_the_grace() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = shell_worker(&redis, "node-cancel-ignorer", &[], &[]);
    let job = "j-cancel-ignorer";
    let command = format!(
        "{}{}echo ready; wait",
        record_leader(job),
        spawn_term_ignorer(job)
    );
    submit(&redis, job, "shell_command", json!({ "command": command }));
    wait_output(&sub, job, "ready\n");
    let pids = recorded_pids(&w.workspace, job);
    assert_running_in_own_group(&pids, w.citadel.pid());

    let t0 = Instant::now();
    redis::cmd("SET")
        .arg(format!("job:cancelled:{job}"))
        .arg("1")
        .exec(&mut redis.conn())
        .expect("SET cancel key");
    let ev = terminal_event(&sub, job, WAIT);
    assert_group_gone(&pids, w.citadel.pid());
    assert_eq!(event_type(&ev), "cancelled", "{ev}");
    assert!(
        t0.elapsed() >= GRACE,
        "SIGKILL came only after the grace: {:?}",
        t0.elapsed()
    );
}

#[test]
fn background_processes_of_a_finished_command_do_not_outlive_it() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = shell_worker(&redis, "node-leftovers", &[], &[]);
    let job = "j-leftovers";
    // One child keeps the output pipe, one does not; the command exits 0 at once.
    let command = format!(
        "{}{}sleep 100 >/dev/null 2>&1 & echo $! >> {job}.pids; echo done",
        record_leader(job),
        spawn_sleeper(job)
    );
    submit(&redis, job, "shell_command", json!({ "command": command }));

    let end = terminal_event(&sub, job, WAIT);
    let pids = recorded_pids(&w.workspace, job);
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert_group_gone(&pids, w.citadel.pid());
    assert_eq!(event_type(&end), "end", "{end}");
    assert_eq!(end["data"]["result"]["exit_code"], json!(0));
    assert_eq!(end["data"]["result"]["output"], json!("done\n"));
}

#[test]
fn shutting_the_agent_down_kills_running_shells() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let mut w = shell_worker(&redis, "node-shutdown", &["--shutdown-grace", "300ms"], &[]);
    let job = "j-shutdown";
    let command = format!(
        "{}{}{}echo ready; sleep 100",
        record_leader(job),
        spawn_sleeper(job),
        spawn_term_ignorer(job)
    );
    submit(&redis, job, "shell_command", json!({ "command": command }));
    wait_output(&sub, job, "ready\n");
    let pids = recorded_pids(&w.workspace, job);
    assert_running_in_own_group(&pids, w.citadel.pid());

    w.citadel.sigterm();
    let status = w.citadel.wait_exit(WAIT).expect("the agent exits");
    assert!(status.success(), "{status}");
    // SIGKILL is sent by the time the agent exits; the kernel may take a
    // moment to finish the processes off.
    wait_until(
        &format!("no process of group {} after the agent exited", pids[0]),
        Duration::from_secs(5),
        || live_members(pids[0]).is_empty().then_some(()),
    );
}

#[test]
fn a_sigkilled_agent_takes_its_running_shells_with_it() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let mut w = shell_worker(&redis, "node-sigkill", &[], &[]);
    let job = "j-sigkill";
    let command = format!(
        "{}sleep 300 & echo $! >> {job}.pids; {}echo ready; wait",
        record_leader(job),
        spawn_term_ignorer(job)
    );
    submit(&redis, job, "shell_command", json!({ "command": command }));
    wait_output(&sub, job, "ready\n");
    let pids = recorded_pids(&w.workspace, job);
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert_running_in_own_group(&pids, w.citadel.pid());

    // No exit code runs: only the kernel closing the agent's pipes does.
    w.citadel.kill9();
    for &pid in &pids {
        wait_pid_gone(
            "a process of the SIGKILLed agent's shell job",
            pid as u32,
            WAIT,
        );
    }
    assert!(
        live_members(pids[0]).is_empty(),
        "group {} outlived the agent",
        pids[0]
    );
}

// ---------------------------------------------------------------------------
// Off by default; bad input
// ---------------------------------------------------------------------------

#[test]
fn shell_command_is_disabled_unless_the_node_allows_it() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = shell_worker(&redis, "node-off", &["--allow-shell=false"], &[]);
    let marker = fresh_temp_dir("shell-off").join("ran");
    let command = format!("touch {}", marker.display());
    submit(
        &redis,
        "j-off",
        "shell_command",
        json!({ "command": command }),
    );

    let err = terminal_event(&sub, "j-off", WAIT);
    assert_eq!(event_type(&err), "error", "{err}");
    assert_eq!(
        err["data"]["error"],
        json!("shell_command is disabled on this node (enable with --allow-shell)")
    );
    assert_eq!(err["data"]["recoverable"], json!(false));
    assert_eq!(dead_letter(&redis, "j-off")["reason"], "permanent error");
    assert!(!marker.exists(), "the command ran");
}

#[test]
fn bad_payloads_fail_for_good_and_say_what_is_wrong() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = shell_worker(&redis, "node-bad", &[], &[]);
    let many: serde_json::Map<String, Json> = (0..100)
        .map(|i| (format!("V{i}"), json!("x".repeat(4000))))
        .collect();
    let cases = [
        ("j-bad-missing", json!({}), "payload.command is required"),
        (
            "j-bad-type",
            json!({"command": ["echo", "hi"]}),
            "payload.command must be a string, got an array",
        ),
        (
            "j-bad-env",
            json!({"command": "true", "env": {"OK": "1", "N": 5}}),
            "payload.env.N must be a string, got a number",
        ),
        (
            "j-bad-env-kind",
            json!({"command": "true", "env": "A=1"}),
            "payload.env must be an object of strings",
        ),
        (
            "j-bad-huge-var",
            json!({"command": "true", "env": {"BIG": "x".repeat(200_000)}}),
            "payload.env.BIG is too large",
        ),
        (
            "j-bad-huge-env",
            json!({"command": "true", "env": many}),
            "payload.env is too large",
        ),
    ];
    for (job, payload, _) in &cases {
        submit(&redis, job, "shell_command", payload.clone());
    }
    for (job, _, want) in &cases {
        let err = terminal_event(&sub, job, WAIT);
        assert_eq!(event_type(&err), "error", "{job}: {err}");
        let msg = err["data"]["error"].as_str().unwrap();
        assert!(msg.contains(want), "{job}: {msg}");
        assert_eq!(err["data"]["recoverable"], json!(false), "{job}");
        assert_eq!(
            dead_letter(&redis, job)["reason"],
            "permanent error",
            "{job}"
        );
    }
}

// ---------------------------------------------------------------------------
// The same job under Nexus and run-job
// ---------------------------------------------------------------------------

#[test]
fn a_nexus_job_reports_exit_code_and_output() {
    let nexus = FakeNexus::start();
    let state = fresh_temp_dir("shell-nexus");
    let state_arg = state.to_str().unwrap().to_owned();
    let _agent = Citadel::spawn(
        &[
            "work",
            "--mode",
            "nexus",
            "--nexus-url",
            &nexus.url(),
            "--state-dir",
            &state_arg,
            "--poll-interval",
            "50ms",
            "--allow-shell",
        ],
        &[("RUST_LOG", "debug")],
    );
    nexus.push_job(
        "n-shell",
        "shell_command",
        json!({"command": "echo hi; echo there"}),
    );
    nexus.push_job(
        "n-fail",
        "shell_command",
        json!({"command": "echo oops; exit 4"}),
    );

    let ok = nexus.wait_for_report("n-shell", WAIT);
    assert_eq!(ok.status, "SUCCESS", "{ok:?}");
    let result: Json =
        serde_json::from_str(ok.output.lines().last().unwrap()).expect("result JSON");
    assert_eq!(
        result,
        json!({"exit_code": 0, "output": "hi\nthere\n"}),
        "{ok:?}"
    );
    let failed = nexus.wait_for_report("n-fail", WAIT);
    assert_eq!(failed.status, "FAILURE", "{failed:?}");
    assert!(failed.output.contains("exited with code 4"), "{failed:?}");
    assert!(
        state.join("workspace").is_dir(),
        "the default workspace is {{state-dir}}/workspace"
    );
}

#[test]
fn run_job_runs_a_shell_command_when_allowed() {
    let job = r#"{"type":"shell_command","payload":{"command":"echo hi"}}"#;
    let mut cmd = citadel_cmd(&["run-job", "--allow-shell", job]);
    cmd.env("CITADEL_REDIS_URL", "redis://127.0.0.1:1/");
    let out = run_to_end(&mut cmd, WAIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "hi\n{\"exit_code\":0,\"output\":\"hi\\n\"}\n");

    let mut cmd = citadel_cmd(&["run-job", job]);
    cmd.env("CITADEL_REDIS_URL", "redis://127.0.0.1:1/");
    let out = run_to_end(&mut cmd, WAIT);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("shell_command is disabled on this node (enable with --allow-shell)"),
        "{out:?}"
    );

    // The environment variable enables it too.
    let mut cmd = citadel_cmd(&[
        "run-job",
        r#"{"type":"shell_command","payload":{"command":"exit 3"}}"#,
    ]);
    cmd.env("CITADEL_ALLOW_SHELL", "true");
    let out = run_to_end(&mut cmd, WAIT);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("exited with code 3"), "{out:?}");
}
