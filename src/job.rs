//! What a handler sees of a job, and how it says it failed.
//!
//! Errors are classified once, where they happen: a handler that knows an engine
//! is warming up says `Retryable`; one that knows the payload is wrong says
//! `Permanent`. The worker never guesses from message text.

use serde_json::{Map, Value};
use std::fmt;
use std::time::Duration;

/// A job, independent of the transport that delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    /// The job type as given (`echo`, `SHELL_COMMAND`, …).
    pub kind: String,
    pub payload: Map<String, Value>,
    pub ray_id: Option<String>,
}

impl Job {
    /// The relative deadline of the payload's `timeout_ms` (number or numeric
    /// string). A present but unusable value is an error, not "no deadline".
    pub fn timeout(&self) -> Result<Option<Duration>, String> {
        let ms = match self.payload.get("timeout_ms") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        };
        match ms {
            Some(ms) if ms.is_finite() && ms > 0.0 && ms < 1e12 => {
                Ok(Some(Duration::from_secs_f64(ms / 1000.0)))
            }
            _ => Err("payload.timeout_ms must be a positive number of milliseconds".into()),
        }
    }
}

/// How a job failed.
#[derive(Debug, Clone, PartialEq)]
pub enum JobError {
    /// Worth another try after a backoff (engine loading, 5xx, 429, refused).
    Retryable(String),
    /// Another try gives the same answer (bad payload, 4xx, disabled handler).
    Permanent(String),
    /// The handler stopped because it was told to.
    Cancelled(String),
}

impl JobError {
    pub fn message(&self) -> &str {
        match self {
            JobError::Retryable(m) | JobError::Permanent(m) | JobError::Cancelled(m) => m,
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// "a string", "an array", …: what a JSON value is, for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(payload: Value) -> Job {
        Job {
            id: "j".into(),
            kind: "echo".into(),
            payload: payload.as_object().unwrap().clone(),
            ray_id: None,
        }
    }

    #[test]
    fn timeout_ms_accepts_numbers_and_numeric_strings() {
        assert_eq!(job(json!({})).timeout(), Ok(None));
        assert_eq!(
            job(json!({"timeout_ms": 1500})).timeout(),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            job(json!({"timeout_ms": "250"})).timeout(),
            Ok(Some(Duration::from_millis(250)))
        );
        for bad in [json!("soon"), json!(-5), json!(0), json!([1]), json!(true)] {
            assert!(job(json!({ "timeout_ms": bad })).timeout().is_err());
        }
    }
}
