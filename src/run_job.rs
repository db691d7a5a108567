//! `citadel run-job`: one job through the same executor the workers use,
//! with no Redis. Chunks go to stdout as they stream; then the result.

use crate::admin::Exit;
use crate::job::Job;
use crate::worker::cancel::{CancelReason, CancelToken};
use crate::worker::exec::{Executor, Outcome};
use serde_json::Value;
use std::io::{Read, Write};
use std::sync::Arc;

pub fn run(exec: &Executor, input: Option<String>) -> Result<i32, Exit> {
    let text = match input {
        Some(t) => t,
        None => {
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .map_err(|e| Exit(2, format!("cannot read the job from stdin: {e}")))?;
            t
        }
    };
    let job = parse(&text).map_err(|e| Exit(2, e))?;
    if exec.registry.find(&job.kind).is_none() {
        return Err(Exit(2, exec.registry.unknown_type(&job.kind)));
    }
    let token = Arc::new(CancelToken::new());
    let t = token.clone();
    let _ = ctrlc::set_handler(move || t.cancel(CancelReason::Requested));

    let mut out = std::io::stdout();
    let mut at_line_start = true;
    let outcome = exec.execute(&job, &token, &mut |chunk| {
        let _ = out.write_all(chunk.as_bytes()).and_then(|_| out.flush());
        at_line_start = chunk.ends_with('\n');
    });
    let mut out = std::io::stdout();
    if !at_line_start {
        let _ = writeln!(out);
    }
    match outcome {
        Outcome::Success(v) => {
            let _ = writeln!(out, "{v}");
            Ok(0)
        }
        Outcome::Failed { reason, error } => Err(Exit(
            1,
            format!("job {} failed ({reason}): {error}", job.id),
        )),
        Outcome::Cancelled(r) => Err(Exit(1, format!("job {} cancelled: {r}", job.id))),
        Outcome::Abandoned => Err(Exit(1, format!("job {} abandoned", job.id))),
    }
}

/// `{"type": "...", "payload": {...}, "id"|"jobId": "..."}`.
fn parse(text: &str) -> Result<Job, String> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("the job is not valid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("the job must be a JSON object with type and payload")?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or("the job has no \"type\" string")?
        .to_owned();
    let payload = match obj.get("payload") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("the job's \"payload\" must be a JSON object".into()),
    };
    let id = obj
        .get("id")
        .or_else(|| obj.get("jobId"))
        .and_then(Value::as_str)
        .unwrap_or("local")
        .to_owned();
    let ray_id = obj.get("rayId").and_then(Value::as_str).map(str::to_owned);
    let job = Job {
        id,
        kind,
        payload,
        ray_id,
    };
    job.timeout()?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn job_json_is_checked() {
        let job = parse(r#"{"type":"echo","payload":{"a":1},"id":"x"}"#).unwrap();
        assert_eq!((job.kind.as_str(), job.id.as_str()), ("echo", "x"));
        assert!(parse("nope").unwrap_err().contains("not valid JSON"));
        assert!(parse("[]").unwrap_err().contains("JSON object"));
        assert!(parse(r#"{"payload":{}}"#).unwrap_err().contains("type"));
        assert!(parse(r#"{"type":"echo","payload":"x"}"#)
            .unwrap_err()
            .contains("payload"));
        assert!(parse(r#"{"type":"echo","payload":{"timeout_ms":"x"}}"#)
            .unwrap_err()
            .contains("timeout_ms"));
    }
}
