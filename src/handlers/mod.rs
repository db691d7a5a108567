//! The handler interface and the registry of built-in handlers.
//!
//! A handler gets a [`Job`] and a [`Context`] and returns a JSON result or a
//! classified [`JobError`]. It never sees the transport: the same handler runs
//! under Redis Streams, Nexus polling and `citadel run-job`.

mod device_config;
mod download;
mod echo;
mod extraction;
pub mod inference;
pub mod shell;

use crate::config::Settings;
use crate::job::{Job, JobError};
use crate::node::profile::LiveProfile;
use crate::worker::cancel::CancelToken;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub trait Handler: Send + Sync {
    fn run(&self, job: &Job, ctx: &mut Context<'_>) -> Result<Value, JobError>;

    /// The deadline of a job of this type that gives no `timeout_ms`, and
    /// the setting it comes from (`shell-timeout`); `None`: no deadline.
    fn default_timeout(&self) -> Option<(Duration, &'static str)> {
        None
    }
}

/// Everything a handler may use besides its job.
pub struct Context<'a> {
    token: &'a Arc<CancelToken>,
    sink: &'a mut dyn FnMut(&str),
    deadline: Option<Instant>,
    profile: &'a Arc<LiveProfile>,
}

#[allow(dead_code)]
impl<'a> Context<'a> {
    pub fn new(
        token: &'a Arc<CancelToken>,
        sink: &'a mut dyn FnMut(&str),
        deadline: Option<Instant>,
        profile: &'a Arc<LiveProfile>,
    ) -> Self {
        Context {
            token,
            sink,
            deadline,
            profile,
        }
    }

    /// Stream a piece of output (a `chunk` event in Redis mode). Empty
    /// pieces are dropped.
    pub fn chunk(&mut self, text: &str) {
        if !text.is_empty() {
            (self.sink)(text);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The token itself, to register a hook that interrupts blocking I/O.
    pub fn cancel_token(&self) -> &Arc<CancelToken> {
        self.token
    }

    /// Sleep that ends early, with `Cancelled`, when the job is cancelled.
    pub fn sleep(&self, d: Duration) -> Result<(), JobError> {
        if self.token.wait(d) {
            Err(JobError::Cancelled("cancelled while waiting".into()))
        } else {
            Ok(())
        }
    }

    /// When the job's `timeout_ms` runs out, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The node's device config (live; APPLY_DEVICE_CONFIG replaces it).
    pub fn profile(&self) -> &Arc<LiveProfile> {
        self.profile
    }
}

/// Job types and the handler serving each; a type may have aliases.
pub struct Registry {
    entries: Vec<(&'static [&'static str], Arc<dyn Handler>)>,
}

impl Registry {
    /// Every built-in handler, configured from `settings` (engine URLs and
    /// timeouts for `llm_inference`).
    pub fn from_settings(settings: &Settings) -> Registry {
        Registry {
            entries: vec![
                (&["echo"], Arc::new(echo::Echo)),
                (
                    &["APPLY_DEVICE_CONFIG", "apply_device_config"],
                    Arc::new(device_config::ApplyDeviceConfig::new(settings)),
                ),
                (
                    &["extraction", "GLINER_EXTRACTION", "EXTRACTION"],
                    Arc::new(extraction::Extraction::new(settings)),
                ),
                (
                    &["model_download", "DOWNLOAD_MODEL"],
                    Arc::new(download::ModelDownload::new(settings)),
                ),
                (
                    &["llm_inference"],
                    Arc::new(inference::Inference::new(settings)),
                ),
                (
                    &["shell_command", "SHELL_COMMAND"],
                    Arc::new(shell::Shell::new(settings)),
                ),
            ],
        }
    }

    pub fn find(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.entries
            .iter()
            .find(|(names, _)| names.contains(&kind))
            .map(|(_, h)| h.clone())
    }

    /// The canonical name of every type served, for error messages.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.entries.iter().map(|(names, _)| names[0]).collect()
    }

    pub fn unknown_type(&self, kind: &str) -> String {
        format!(
            "no handler for job type '{kind}' (this worker runs: {})",
            self.kinds().join(", ")
        )
    }
}
