//! The Nexus control plane's HTTP API (PROTOCOL.md §3): take the next job,
//! report a job's outcome. One request per call, no retries here: the
//! poller and the reporter decide what a failure means. Each of them has its
//! own client, so that one can be interrupted without the other.

use crate::config::Settings;
use crate::job::Job;
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// Largest response body read from Nexus.
const MAX_BODY: u64 = 16 << 20;

pub struct NexusClient {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

#[derive(Debug)]
pub enum NexusError {
    /// No answer: refused, reset, timed out.
    Unreachable(String),
    /// An answer that is not what the API promises (5xx, garbage).
    Bad(String),
    /// 408/429/503: come back later, after `Retry-After` when given.
    Busy {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 401/403: the token is wrong (rotated, revoked).
    Token(u16),
    /// Another 4xx on a report: about this report (404, 410, 413…).
    Refused(u16, String),
}

impl fmt::Display for NexusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NexusError::Unreachable(e) => write!(f, "no answer: {e}"),
            NexusError::Bad(e) => f.write_str(e),
            NexusError::Busy {
                status,
                retry_after: Some(d),
            } => {
                write!(f, "HTTP {status}, retry after {}s", d.as_secs())
            }
            NexusError::Busy {
                status,
                retry_after: None,
            } => write!(f, "HTTP {status}"),
            NexusError::Token(status) => write!(f, "HTTP {status}: Nexus rejected the token"),
            NexusError::Refused(status, body) => write!(f, "HTTP {status}: {body}"),
        }
    }
}

impl NexusClient {
    pub fn new(settings: &Settings, base: &str) -> Self {
        NexusClient {
            agent: crate::http::control_plane_agent(base, settings.nexus_timeout),
            base: base.trim_end_matches('/').to_owned(),
            token: settings.nexus_bearer().map(str::to_owned),
        }
    }

    /// `GET /api/v1/jobs/next`: the job's JSON text, or `None` (204).
    pub fn next_job(&self) -> Result<Option<String>, NexusError> {
        let mut req = self.agent.get(format!("{}/api/v1/jobs/next", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(transport_error)?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(&resp);
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string();
        match status {
            204 => Ok(None),
            200 => body
                .map(Some)
                .map_err(|e| NexusError::Bad(format!("unreadable job body: {e}"))),
            429 | 503 => Err(NexusError::Busy {
                status,
                retry_after,
            }),
            401 | 403 => Err(NexusError::Token(status)),
            _ => Err(NexusError::Bad(format!(
                "HTTP {status} from jobs/next: {}",
                excerpt(&body.unwrap_or_default())
            ))),
        }
    }

    /// `POST /api/v1/jobs/{id}/status`, taking at most `timeout`; Ok once
    /// Nexus accepted it (2xx).
    pub fn report(
        &self,
        id: &str,
        status: &str,
        output: &str,
        timeout: Duration,
    ) -> Result<(), NexusError> {
        let url = format!(
            "{}/api/v1/jobs/{}/status",
            self.base,
            crate::percent::encode(id)
        );
        let mut req = self
            .agent
            .post(url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .content_type("application/json");
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let body = serde_json::json!({ "status": status, "output": output }).to_string();
        let mut resp = req.send(body.as_str()).map_err(transport_error)?;
        let code = resp.status().as_u16();
        let retry_after = retry_after(&resp);
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .unwrap_or_default();
        match code {
            200..=299 => Ok(()),
            408 | 429 | 503 => Err(NexusError::Busy {
                status: code,
                retry_after,
            }),
            401 | 403 => Err(NexusError::Token(code)),
            400..=499 => Err(NexusError::Refused(code, excerpt(&text))),
            _ => Err(NexusError::Bad(format!(
                "HTTP {code} from jobs/status: {}",
                excerpt(&text)
            ))),
        }
    }

    /// End the request in progress at once (it fails) and refuse new ones.
    pub fn interrupt(&self) {
        self.agent.clone().shutdown();
    }
}

/// A job as Nexus sends it: `{"id","type","payload":{…}}`. A bad one is
/// `Err((id if known, reason))`.
pub fn parse_job(body: &str) -> Result<Job, (Option<String>, String)> {
    let v: Value = serde_json::from_str(body).map_err(|e| {
        (
            None,
            format!("job is not valid JSON: {e}; body: {}", excerpt(body)),
        )
    })?;
    let Value::Object(obj) = v else {
        return Err((None, format!("job is not a JSON object: {}", excerpt(body))));
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err((None, format!("job has no id: {}", excerpt(body)))),
    };
    let kind = match obj.get("type").and_then(Value::as_str) {
        Some(k) if !k.is_empty() => k.to_owned(),
        _ => return Err((Some(id), "job has no type".into())),
    };
    let payload = match obj.get("payload") {
        Some(Value::Object(m)) => m.clone(),
        None | Some(Value::Null) => Default::default(),
        Some(other) => {
            return Err((
                Some(id),
                format!(
                    "job payload is not a JSON object (it is {})",
                    crate::job::json_kind(other)
                ),
            ))
        }
    };
    let ray_id = payload
        .get("rayId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let job = Job {
        id: id.clone(),
        kind,
        payload,
        ray_id,
    };
    job.timeout().map_err(|e| (Some(id), e))?;
    Ok(job)
}

fn transport_error(e: ureq::Error) -> NexusError {
    NexusError::Unreachable(e.to_string())
}

fn retry_after(resp: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    let v = resp.headers().get("retry-after")?.to_str().ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

fn excerpt(s: &str) -> String {
    crate::clip::clip(s.trim(), 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_parse_and_bad_ones_say_why() {
        let job = parse_job(r#"{"id":"n-1","type":"echo","payload":{"a":[1,{"b":null}],"n":2.5}}"#)
            .unwrap();
        assert_eq!((job.id.as_str(), job.kind.as_str()), ("n-1", "echo"));
        assert_eq!(job.payload["n"], 2.5);
        assert_eq!(parse_job(r#"{"id":7,"type":"echo"}"#).unwrap().id, "7");
        let cases = [
            ("garbage", None, "not valid JSON"),
            ("[1]", None, "not a JSON object"),
            (r#"{"type":"echo"}"#, None, "no id"),
            (r#"{"id":"x","payload":{}}"#, Some("x"), "no type"),
            (
                r#"{"id":"x","type":"echo","payload":[1]}"#,
                Some("x"),
                "not a JSON object (it is an array)",
            ),
            (
                r#"{"id":"x","type":"echo","payload":{"timeout_ms":"soon"}}"#,
                Some("x"),
                "timeout_ms",
            ),
        ];
        for (body, id, why) in cases {
            let (got_id, reason) = parse_job(body).unwrap_err();
            assert_eq!(got_id.as_deref(), id, "{body}");
            assert!(reason.contains(why), "{body}: {reason}");
        }
    }

    #[test]
    fn loopback_urls_and_path_segments() {
        use crate::http::is_loopback;
        for url in [
            "http://127.0.0.1:8080/x",
            "http://localhost",
            "https://u:p@127.0.0.2",
            "http://[::1]:9/",
        ] {
            assert!(is_loopback(url), "{url}");
        }
        for url in [
            "https://nexus.example.com",
            "http://10.0.0.1:80",
            "http://localhost.evil",
        ] {
            assert!(!is_loopback(url), "{url}");
        }
        assert_eq!(crate::percent::encode("a b/c?d"), "a%20b%2Fc%3Fd");
    }
}
