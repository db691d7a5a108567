//! Running one job to its outcome, the same under every transport: deadline,
//! in-process retries with backoff for retryable errors, and a caught panic.

use super::cancel::{CancelReason, CancelToken};
use super::watchdog::Watchdog;
use crate::backoff::full_jitter;
use crate::events::NodeFacts;
use crate::handlers::{Context, Registry};
use crate::job::{Job, JobError};
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
        reason: &'static str,
        error: String,
    },
    /// A producer cancelled it.
    Cancelled(String),
    /// The worker is stopping and gave up on it: it must stay pending.
    Abandoned,
    /// The handler panicked: treated like a crash of the worker on this job.
    Crashed(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success(_) => "completed",
            Outcome::Failed { .. } => "failed",
            Outcome::Cancelled(_) => "cancelled",
            Outcome::Abandoned => "abandoned",
            Outcome::Crashed(_) => "crashed",
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
    pub node: NodeFacts,
    watchdog: Watchdog,
}

impl Executor {
    pub fn new(registry: Registry, policy: RetryPolicy, node: NodeFacts) -> Self {
        Executor {
            registry,
            policy,
            node,
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
        let deadline = match job.timeout() {
            Ok(t) => t.map(|t| Instant::now() + t),
            Err(e) => return failed("permanent error", e),
        };
        if let Some(at) = deadline {
            self.watchdog.arm(at, token);
        }
        let mut attempt = 0;
        loop {
            if token.is_cancelled() {
                return cancelled(token, job, "cancelled before start".into());
            }
            let mut ctx = Context::new(token, sink, deadline, &self.node);
            let result = catch_unwind(AssertUnwindSafe(|| handler.run(job, &mut ctx)));
            let err = match result {
                Ok(Ok(v)) => return Outcome::Success(v),
                Err(panic) => return Outcome::Crashed(panic_message(&panic)),
                Ok(Err(e)) => e,
            };
            if token.is_cancelled() {
                return cancelled(token, job, err.message().to_owned());
            }
            match err {
                JobError::Permanent(e) => return failed("permanent error", e),
                JobError::Cancelled(e) => return Outcome::Cancelled(e),
                JobError::Retryable(e) if attempt >= self.policy.max_retries => {
                    return failed(
                        "retries exhausted",
                        format!("{e} (gave up after {} attempts)", attempt + 1),
                    )
                }
                JobError::Retryable(e) => {
                    let wait = full_jitter(attempt, self.policy.base, self.policy.cap);
                    log::info!(
                        "job {} attempt {} failed ({e}); retrying in {}ms",
                        job.id,
                        attempt + 1,
                        wait.as_millis()
                    );
                    attempt += 1;
                    if token.wait(wait) {
                        return cancelled(token, job, e);
                    }
                }
            }
        }
    }
}

fn failed(reason: &'static str, error: String) -> Outcome {
    Outcome::Failed { reason, error }
}

/// The outcome of a job whose token was cancelled, by why it was.
fn cancelled(token: &CancelToken, job: &Job, detail: String) -> Outcome {
    match token.reason() {
        Some(CancelReason::Deadline) => {
            let limit = job.timeout().ok().flatten().unwrap_or_default();
            failed(
                "deadline exceeded",
                format!("job exceeded its timeout_ms of {}ms", limit.as_millis()),
            )
        }
        Some(CancelReason::Shutdown) => Outcome::Abandoned,
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
    format!("handler panicked: {msg}")
}
