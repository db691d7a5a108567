//! `echo`: returns its payload as the result. Knobs for tests and benchmarks:
//! `chunks` (emit n chunk events `chunk {i}\n`), `sleep_ms` (cancellable),
//! `fail`: `retryable` | `permanent` | `panic`.
//!
//! For the chaos and soak harnesses (scripts/chaos.sh), and only when the
//! operator sets it: `CITADEL_TEST_ECHO_RUNS=FILE` makes every run append one
//! line `{jobId} {pid} {unix ms}` to FILE (O_APPEND, one write), so that a
//! ledger outside the agent can count how often each job really ran. A job
//! cannot turn this on: the path comes from the agent's environment only.

use super::{Context, Handler};
use crate::job::{Job, JobError};
use serde_json::Value;
use std::time::Duration;

pub struct Echo;

impl Handler for Echo {
    fn run(&self, job: &Job, ctx: &mut Context<'_>) -> Result<Value, JobError> {
        let p = &job.payload;
        let chunks = knob_u64(p.get("chunks"), "chunks")?;
        let sleep_ms = knob_u64(p.get("sleep_ms"), "sleep_ms")?;
        record_run(&job.id);
        if sleep_ms > 0 {
            ctx.sleep(Duration::from_millis(sleep_ms))?;
        }
        for i in 0..chunks {
            if ctx.is_cancelled() {
                return Err(JobError::Cancelled("cancelled while streaming".into()));
            }
            ctx.chunk(&format!("chunk {i}\n"));
        }
        match p.get("fail").and_then(Value::as_str) {
            None => Ok(Value::Object(p.clone())),
            Some("retryable") => Err(JobError::Retryable(
                "echo: asked to fail (retryable)".into(),
            )),
            Some("permanent") => Err(JobError::Permanent(
                "echo: asked to fail (permanent)".into(),
            )),
            Some("panic") => panic!("echo: asked to panic"),
            Some(other) => Err(JobError::Permanent(format!(
                "echo: payload.fail must be retryable, permanent or panic, not '{other}'"
            ))),
        }
    }
}

/// Appends `{job_id} {pid} {unix ms}\n` to `CITADEL_TEST_ECHO_RUNS`, if set.
/// A failed write is logged, never a job error: it is a test aid.
fn record_run(job_id: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os("CITADEL_TEST_ECHO_RUNS") else {
        return;
    };
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let line = format!("{job_id} {} {ms}\n", std::process::id());
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        log::warn!(
            "echo: CITADEL_TEST_ECHO_RUNS {}: {e}",
            path.to_string_lossy()
        );
    }
}

fn knob_u64(v: Option<&Value>, name: &str) -> Result<u64, JobError> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().filter(|n| *n <= 1_000_000_000).ok_or_else(|| {
            JobError::Permanent(format!(
                "echo: payload.{name} must be a whole number, got {v}"
            ))
        }),
    }
}
