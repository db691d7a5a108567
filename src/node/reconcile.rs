//! Bringing the node's service containers to a wanted set (the Docker
//! driver's one entry point for the agent, `citadel up` and `citadel
//! services`), and what it did.
//!
//! SKELETON: the interface other modules build on; the Docker driver fills
//! in `reconcile`.

use crate::config::Settings;
use serde_json::{json, Value};

/// What one reconcile did, per service name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Created and started (there was no container).
    pub started: Vec<String>,
    /// Removed and created again: its spec (image, arguments, …) changed.
    pub recreated: Vec<String>,
    /// Its container existed, stopped, with the wanted spec: started again.
    pub restarted: Vec<String>,
    /// No longer wanted: stopped and removed.
    pub stopped: Vec<String>,
    /// Running with the wanted spec: left alone.
    pub kept: Vec<String>,
    /// (service, why): this service could not be brought to what is wanted.
    pub failed: Vec<(String, String)>,
    /// Engines that answered their health URL in time.
    pub ready: Vec<String>,
    /// (service, why): running, but its engine did not answer in time.
    pub not_ready: Vec<(String, String)>,
}

impl Report {
    /// Whether any container was created, started, removed or stopped.
    pub fn changed(&self) -> bool {
        !(self.started.is_empty()
            && self.recreated.is_empty()
            && self.restarted.is_empty()
            && self.stopped.is_empty())
    }

    pub fn to_json(&self) -> Value {
        let pairs = |v: &[(String, String)]| -> Value {
            v.iter()
                .map(|(s, why)| json!({"service": s, "error": why}))
                .collect()
        };
        json!({
            "started": self.started,
            "recreated": self.recreated,
            "restarted": self.restarted,
            "stopped": self.stopped,
            "kept": self.kept,
            "failed": pairs(&self.failed),
            "ready": self.ready,
            "not_ready": pairs(&self.not_ready),
        })
    }
}

/// Bring the containers of this node's services to exactly `wanted` (names
/// from the catalog): start what is missing, recreate what changed, start
/// what stopped, stop and remove what is no longer wanted; never touch a
/// container citadel did not make. With `wait`, then wait (bounded) for the
/// engines to answer. A service that fails is in `failed`; the others are
/// still reconciled.
pub fn reconcile(_settings: &Settings, wanted: &[String], _wait: bool) -> Report {
    Report {
        failed: wanted
            .iter()
            .map(|s| (s.clone(), "the Docker driver is not built yet".to_owned()))
            .collect(),
        ..Report::default()
    }
}
