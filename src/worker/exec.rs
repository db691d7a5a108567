//! Running one job to its outcome, the same under every transport: deadline,
//! in-process retries with backoff for retryable errors and for panics (a
//! caught panic is an attempt that failed), and no retry once output was
//! streamed (a subscriber cannot take chunks back).

use super::cancel::{CancelReason, CancelToken};
use super::counters::Counters;
use super::watchdog::Watchdog;
use crate::backoff::full_jitter;
use crate::handlers::{Context, Registry};
use crate::job::{Job, JobError};
use crate::node::profile::LiveProfile;
use serde_json::Value;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a run of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    /// The job failed for good: `reason` is the short dead-letter reason.
    Failed {
        reason: String,
        error: String,
    },
    /// A producer cancelled it.
    Cancelled(String),
    /// No outcome from this run: the worker is stopping, or another worker
    /// owns the job now. It must stay pending, to be delivered again.
    Abandoned,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success(_) => "completed",
            Outcome::Failed { .. } => "failed",
            Outcome::Cancelled(_) => "cancelled",
            Outcome::Abandoned => "abandoned",
        }
    }
}

pub struct RetryPolicy {
    pub max_retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

pub struct Executor {
    pub registry: Registry,
    pub policy: RetryPolicy,
    /// The device config: event meta, and what APPLY_DEVICE_CONFIG changes.
    pub profile: Arc<LiveProfile>,
    /// What this process has run, for the heartbeat.
    pub counters: Arc<Counters>,
    watchdog: Watchdog,
}

impl Executor {
    pub fn new(registry: Registry, policy: RetryPolicy, profile: Arc<LiveProfile>) -> Self {
        Executor {
            registry,
            policy,
            profile,
            counters: Arc::default(),
            watchdog: Watchdog::start(),
        }
    }

    pub fn execute(
        &self,
        job: &Job,
        token: &Arc<CancelToken>,
        sink: &mut dyn FnMut(&str),
    ) -> Outcome {
        let Some(handler) = self.registry.find(&job.kind) else {
            return failed("permanent error", self.registry.unknown_type(&job.kind));
        };
        let limit = match job.timeout() {
            Ok(Some(t)) => Some((t, None)),
            Ok(None) => handler.default_timeout().map(|(t, from)| (t, Some(from))),
            Err(e) => return failed("permanent error", e),
        };
        let deadline = limit.map(|(t, _)| Instant::now() + t);
        if let Some(at) = deadline {
            self.watchdog.arm(at, token);
        }
        let mut attempt = 0;
        let mut streamed = 0u64;
        loop {
            if token.is_cancelled() {
                return cancelled(token, limit, "cancelled before start".into());
            }
            let result = {
                let mut counted = |text: &str| {
                    streamed += 1;
                    sink(text)
                };
                let mut ctx = Context::new(token, &mut counted, deadline, &self.profile);
                catch_unwind(AssertUnwindSafe(|| handler.run(job, &mut ctx)))
            };
            let (err, panicked) = match result {
                Ok(Ok(v)) => return Outcome::Success(v),
                Ok(Err(e)) => (e, None),
                Err(panic) => {
                    let msg = panic_message(&panic);
                    (
                        JobError::Retryable(format!("handler panicked: {msg}")),
                        Some(msg),
                    )
                }
            };
            if token.is_cancelled() {
                return cancelled(token, limit, err.message().to_owned());
            }
            let e = match err {
                JobError::Permanent(e) => return failed("permanent error", e),
                JobError::Cancelled(e) => return Outcome::Cancelled(e),
                JobError::Retryable(e) => e,
            };
            let reason = |otherwise: &str| match &panicked {
                Some(msg) => format!("handler panicked: {msg}"),
                None => otherwise.to_owned(),
            };
            if streamed > 0 {
                return failed(
                    &reason("permanent error"),
                    format!("{e} (not retried: {streamed} chunks were already streamed)"),
                );
            }
            if attempt >= self.policy.max_retries {
                return failed(
                    &reason("retries exhausted"),
                    format!("{e} (gave up after {} attempts)", attempt + 1),
                );
            }
            let wait = full_jitter(attempt, self.policy.base, self.policy.cap);
            log::info!(
                "job {} attempt {} failed ({e}); retrying in {}ms",
                job.id,
                attempt + 1,
                wait.as_millis()
            );
            attempt += 1;
            crate::observe::metrics::METRICS.retried(&job.kind);
            if token.wait(wait) {
                return cancelled(token, limit, e);
            }
        }
    }
}

fn failed(reason: &str, error: String) -> Outcome {
    Outcome::Failed {
        reason: reason.to_owned(),
        error,
    }
}

/// The deadline a job ran under: its `timeout_ms`, or its type's default
/// and the setting that default comes from.
type Limit = Option<(Duration, Option<&'static str>)>;

/// The outcome of a job whose token was cancelled, by why it was.
fn cancelled(token: &CancelToken, limit: Limit, detail: String) -> Outcome {
    match token.reason() {
        Some(CancelReason::Deadline) => failed(
            "deadline exceeded",
            match limit {
                Some((t, Some(setting))) => format!(
                    "job exceeded the default timeout of its type, {}ms (--{setting}; it gave no timeout_ms)",
                    t.as_millis()
                ),
                Some((t, None)) => format!("job exceeded its timeout_ms of {}ms", t.as_millis()),
                None => "job exceeded its deadline".into(),
            },
        ),
        Some(CancelReason::Shutdown | CancelReason::LeaseLost) => Outcome::Abandoned,
        _ => Outcome::Cancelled(if detail.is_empty() {
            "cancelled".into()
        } else {
            detail
        }),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic".into());
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use serde_json::json;

    fn executor(max_retries: u32) -> Executor {
        let settings = Settings::default();
        let path = settings.state_dir.join("unused-device-config.json");
        let profile = Arc::new(LiveProfile::new(
            &settings,
            path,
            crate::node::profile::DeviceConfig::default(),
            true,
        ));
        let policy = RetryPolicy {
            max_retries,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(1),
        };
        Executor::new(Registry::from_settings(&settings), policy, profile)
    }

    fn run(exec: &Executor, payload: serde_json::Value) -> (Outcome, usize) {
        let job = Job {
            id: "j".into(),
            kind: "echo".into(),
            payload: payload.as_object().unwrap().clone(),
            ray_id: None,
        };
        let mut chunks = 0;
        let token = Arc::new(CancelToken::new());
        let outcome = exec.execute(&job, &token, &mut |_| chunks += 1);
        (outcome, chunks)
    }

    #[test]
    fn a_panic_is_a_failed_attempt_retried_then_dead_lettered_with_its_message() {
        let (outcome, _) = run(&executor(2), json!({"fail": "panic"}));
        let Outcome::Failed { reason, error } = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(reason, "handler panicked: echo: asked to panic");
        assert!(error.contains("gave up after 3 attempts"), "{error}");
    }

    #[test]
    fn nothing_is_retried_once_a_chunk_was_streamed() {
        let exec = executor(5);
        let (outcome, chunks) = run(&exec, json!({"chunks": 2, "fail": "retryable"}));
        assert_eq!(chunks, 2, "one attempt only");
        let Outcome::Failed { reason, error } = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(reason, "permanent error");
        assert!(
            error.contains("not retried: 2 chunks were already streamed"),
            "{error}"
        );

        let (outcome, chunks) = run(&exec, json!({"chunks": 1, "fail": "panic"}));
        assert_eq!(chunks, 1, "one attempt only");
        assert!(
            matches!(&outcome, Outcome::Failed { reason, .. } if reason.starts_with("handler panicked")),
            "{outcome:?}"
        );
        let (outcome, chunks) = run(&exec, json!({"fail": "retryable"}));
        assert_eq!(chunks, 0);
        assert!(
            matches!(&outcome, Outcome::Failed { error, .. } if error.contains("after 6 attempts")),
            "{outcome:?}"
        );
    }
}
