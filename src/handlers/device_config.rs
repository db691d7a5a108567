//! `APPLY_DEVICE_CONFIG`: validate the payload's `config` whole, store it and
//! make it live (`node::profile`), then act on it: reconcile the node's
//! services (`node::reconcile`, the Docker driver) when `autoStartServices`
//! is on and services were named, and start/stop the ssh unit through
//! `systemctl` when the node allows it (`allow-ssh-control`).
//!
//! Any invalid field fails the job permanently and changes nothing. Once the
//! config is stored, a failed service or ssh change does not undo it: a
//! failed service fails the job (saying the config was applied); an ssh
//! failure is reported in the result. Only validation, diff and store are
//! serialized with other config jobs; the slow part (reconcile, systemctl)
//! takes its own lock, so no other job type waits for it.

use super::{Context, Handler};
use crate::config::Settings;
use crate::job::{Job, JobError};
use crate::node::profile::{self, Applied, DeviceConfig, Update};
use crate::node::reconcile::{self, Report};
use serde_json::{json, Value};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for `systemctl start|stop`.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ApplyDeviceConfig {
    settings: Settings,
}

impl ApplyDeviceConfig {
    pub fn new(settings: &Settings) -> Self {
        ApplyDeviceConfig {
            settings: settings.clone(),
        }
    }
}

impl Handler for ApplyDeviceConfig {
    fn run(&self, job: &Job, ctx: &mut Context<'_>) -> Result<Value, JobError> {
        let config = profile::config_of(&job.payload).map_err(JobError::Permanent)?;
        let update = profile::parse_update(&config).map_err(JobError::Permanent)?;
        let live = ctx.profile().clone();
        // Storing can fail for a full or read-only disk: worth another try.
        let applied = live.apply(&update).map_err(JobError::Retryable)?;
        if !applied.changes.is_empty() {
            log::info!(
                "job {}: device config applied, changed {}",
                job.id,
                changed_fields(&applied)
            );
        }
        // Acting goes by the config live now, under its own lock: of two
        // config jobs, the one acting last acts on the newer config, so the
        // node never ends up running what an older config asked for.
        let _one = crate::sync::lock(&live.actions);
        let now = live.now();
        let services = wants_reconcile(&update, &now.config)
            .then(|| reconcile::reconcile(&self.settings, &now.config.services, true));
        let ssh = update
            .ssh_enabled
            .map(|asked| self.ssh(now.config.ssh_enabled.unwrap_or(asked)));
        let result = result_json(&applied, &update, services.as_ref(), ssh);
        match services.as_ref().filter(|r| !r.failed.is_empty()) {
            None => Ok(result),
            Some(r) => Err(JobError::Permanent(format!(
                "the device config was applied ({}), but services failed: {}",
                result["message"].as_str().unwrap_or_default(),
                r.failed
                    .iter()
                    .map(|(s, why)| format!("{s}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }
}

/// Services are reconciled when the config (as live now) starts them
/// automatically and this payload named the services or turned that on.
fn wants_reconcile(u: &Update, now: &DeviceConfig) -> bool {
    now.auto_start_services && (u.services.is_some() || u.auto_start_services == Some(true))
}

impl ApplyDeviceConfig {
    /// The ssh outcome for the result.
    fn ssh(&self, on: bool) -> Value {
        let s = &self.settings;
        if !s.allow_ssh_control {
            return json!({
                "enabled": on,
                "action": "none",
                "note": "recorded only: this node does not allow ssh control (allow-ssh-control is off)",
            });
        }
        let verb = if on { "start" } else { "stop" };
        match systemctl(verb, &s.ssh_unit, SYSTEMCTL_TIMEOUT) {
            Ok(()) => {
                json!({"enabled": on, "action": format!("systemctl {verb} {}", s.ssh_unit), "ok": true})
            }
            Err(e) => {
                log::warn!(
                    "sshEnabled {on}: systemctl {verb} {} failed: {e}",
                    s.ssh_unit
                );
                json!({"enabled": on, "action": format!("systemctl {verb} {}", s.ssh_unit), "ok": false, "error": e})
            }
        }
    }
}

/// Run `systemctl VERB UNIT` (from PATH), killed past `timeout`; the error
/// carries its exit status and the start of what it wrote to stderr.
fn systemctl(verb: &str, unit: &str, timeout: Duration) -> Result<(), String> {
    let mut cmd = Command::new("systemctl");
    cmd.arg(verb)
        .arg(unit)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child =
        crate::child::spawn(&mut cmd).map_err(|e| format!("cannot run systemctl: {e}"))?;
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.by_ref().take(4096).read_to_string(&mut text);
            text
        })
    });
    let Some(status) = crate::child::wait(&mut child, Instant::now() + timeout, None) else {
        return Err(format!(
            "systemctl {verb} {unit} did not finish within {} and was killed",
            crate::config::format_duration(timeout)
        ));
    };
    if status.success() {
        return Ok(());
    }
    // A child of systemctl still holding the pipe is not waited for.
    let said = stderr
        .filter(|t| {
            let until = Instant::now() + Duration::from_millis(200);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            t.is_finished()
        })
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    let said = said.trim();
    Err(if said.is_empty() {
        format!("systemctl {verb} {unit} failed ({status})")
    } else {
        format!("systemctl {verb} {unit} failed ({status}): {said}")
    })
}

fn changed_fields(applied: &Applied) -> String {
    applied
        .changes
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the job did, for its result.
fn result_json(
    applied: &Applied,
    update: &Update,
    services: Option<&Report>,
    ssh: Option<Value>,
) -> Value {
    let mut message = if applied.changes.is_empty() {
        String::new()
    } else {
        format!("changed {}", changed_fields(applied))
    };
    if let Some(r) = services.filter(|r| r.changed()) {
        let mut parts = Vec::new();
        for (what, names) in [
            ("started", &r.started),
            ("recreated", &r.recreated),
            ("restarted", &r.restarted),
            ("stopped", &r.stopped),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what} {}", names.join(", ")));
            }
        }
        if !message.is_empty() {
            message.push_str("; ");
        }
        message.push_str(&format!("services: {}", parts.join("; ")));
    }
    if message.is_empty() {
        message = "no changes".into();
    }
    json!({
        "message": message,
        "changed": applied.changes,
        "unknown_fields": update.unknown,
        "config": applied.new.to_json(),
        "services": services.map(Report::to_json),
        "ssh": ssh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(old: DeviceConfig, u: &Update) -> Applied {
        let new = old.with(u);
        Applied {
            changes: new.changes_from(&old),
            new,
        }
    }

    #[test]
    fn the_message_says_what_changed_or_no_changes() {
        let u = Update {
            device_name: Some("d".into()),
            unknown: vec!["x".into()],
            ..Update::default()
        };
        let a = applied(DeviceConfig::default(), &u);
        let r = result_json(&a, &u, None, None);
        assert_eq!(r["message"], "changed deviceName");
        assert_eq!(r["changed"]["deviceName"], json!({"old": null, "new": "d"}));
        assert_eq!(r["unknown_fields"], json!(["x"]));
        let again = applied(a.new.clone(), &u);
        let kept = Report {
            kept: vec!["vllm".into()],
            ..Report::default()
        };
        let r = result_json(&again, &u, Some(&kept), None);
        assert_eq!(r["message"], "no changes");
        assert_eq!(r["services"]["kept"], json!(["vllm"]));
        let started = Report {
            started: vec!["vllm".into()],
            ..Report::default()
        };
        let r = result_json(&again, &u, Some(&started), None);
        assert_eq!(r["message"], "services: started vllm");
    }

    #[test]
    fn services_are_reconciled_only_when_auto_start_is_on_and_named() {
        let named = Update {
            services: Some(vec!["vllm".into()]),
            ..Update::default()
        };
        assert!(!wants_reconcile(
            &named,
            &DeviceConfig::default().with(&named)
        ));
        let on = Update {
            auto_start_services: Some(true),
            ..named.clone()
        };
        assert!(wants_reconcile(&on, &DeviceConfig::default().with(&on)));
        let other = Update {
            alert_on_offline: Some(true),
            ..Update::default()
        };
        let auto = DeviceConfig {
            auto_start_services: true,
            ..DeviceConfig::default()
        };
        assert!(!wants_reconcile(&other, &auto.with(&other)));
    }
}
