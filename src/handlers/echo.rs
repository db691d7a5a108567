//! `echo`: returns its payload as the result. Knobs for tests and benchmarks:
//! `chunks` (emit n chunk events `chunk {i}\n`), `sleep_ms` (cancellable),
//! `fail`: `retryable` | `permanent` | `panic`.

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
