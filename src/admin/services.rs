//! `citadel services [list|start|stop|restart] [NAME] [--json]`: the
//! operator's view of the node's service containers and the hand controls.
//! What to run comes from `node::profile::wanted_services`; every docker
//! action goes through `node::reconcile`. Exit 0 ok, 1 a service failed (or
//! did not get ready), 2 bad input (checked by the CLI).

use super::Exit;
use crate::cli::{Services, ServicesAction};
use crate::config::Settings;
use crate::node::docker::Docker;
use crate::node::reconcile::{self, Options, Report};
use crate::node::services::{self, Spec, CATALOG};
use serde_json::{json, Value};
use std::time::Duration;

pub fn run(settings: &Settings, cmd: &Services) -> Result<i32, Exit> {
    let wanted = crate::node::profile::wanted_services(settings);
    let named: Vec<String> = cmd.name.iter().cloned().collect();
    let report = match cmd.action {
        ServicesAction::List => return list(settings, &wanted, cmd),
        ServicesAction::Stop => reconcile::stop(settings, &named),
        ServicesAction::Start | ServicesAction::Restart => {
            let names = if named.is_empty() { wanted } else { named };
            if names.is_empty() {
                println!(
                    "no services are configured (--services, or an APPLY_DEVICE_CONFIG job); nothing to start"
                );
                return Ok(0);
            }
            if cmd.action == ServicesAction::Restart {
                let stopped = reconcile::stop(settings, &names);
                if !stopped.failed.is_empty() {
                    return finish(&stopped, cmd.json);
                }
            }
            reconcile::apply(
                settings,
                &names,
                Options {
                    remove_unwanted: false,
                    wait: true,
                },
            )
        }
    };
    finish(&report, cmd.json)
}

/// Prints the report; exit 1 when something failed or did not get ready.
fn finish(report: &Report, json: bool) -> Result<i32, Exit> {
    if json {
        println!("{}", report.to_json());
    } else {
        let mut lines = Vec::new();
        for (list, what) in [
            (&report.started, "started"),
            (&report.recreated, "recreated (its settings changed)"),
            (&report.restarted, "started again"),
            (&report.kept, "unchanged"),
            (&report.stopped, "stopped"),
            (&report.ready, "ready"),
        ] {
            lines.extend(list.iter().map(|s| format!("{s}: {what}")));
        }
        for (s, why) in &report.not_ready {
            lines.push(format!("{s}: not ready: {why}"));
        }
        for (s, why) in &report.failed {
            lines.push(format!("{s}: failed: {why}"));
        }
        if lines.is_empty() {
            lines.push("nothing to do".into());
        }
        println!("{}", lines.join("\n"));
    }
    let failed = !(report.failed.is_empty() && report.not_ready.is_empty());
    Ok(if failed { 1 } else { 0 })
}

/// One row per catalog service (or the one named).
fn list(settings: &Settings, wanted: &[String], cmd: &Services) -> Result<i32, Exit> {
    let docker = Docker::new(&settings.docker);
    let containers = docker.managed().map_err(|e| Exit(1, e.to_string()))?;
    let gpus = crate::node::gpu::nvidia_gpus_present(settings.gpu_query_timeout).unwrap_or(false);
    let names: Vec<&str> = match &cmd.name {
        Some(n) => vec![n.as_str()],
        None => CATALOG.to_vec(),
    };
    let client = crate::http::HttpClient::new(settings.engine_connect_timeout);
    let rows: Vec<Value> = std::thread::scope(|s| {
        let probes: Vec<_> = names
            .iter()
            .map(|&name| {
                let client = &client;
                let url = format!(
                    "{}{}",
                    services::url(settings, name),
                    services::health_path(name)
                );
                let budget = settings.engine_connect_timeout.min(Duration::from_secs(2)) * 2;
                (
                    name,
                    url.clone(),
                    s.spawn(move || crate::admin::status::probe(client, &url, budget)),
                )
            })
            .collect();
        probes
            .into_iter()
            .map(|(name, health_url, probe)| {
                let health = probe.join().unwrap_or_else(|_| {
                    crate::admin::status::Readiness::Down("probe panicked".into())
                });
                let c = containers.iter().find(|c| c.service == name);
                let spec = Spec::build(settings, name, gpus);
                let image = c
                    .map(|c| c.image.clone())
                    .or_else(|| spec.as_ref().ok().map(|s| s.image.clone()));
                json!({
                    "service": name,
                    "configured": wanted.iter().any(|w| w == name),
                    "container": c.map(|c| c.name.clone()),
                    "id": c.map(|c| c.id.clone()),
                    "state": c.map_or("none".to_owned(), |c| c.state.clone()),
                    "healthy": matches!(health, crate::admin::status::Readiness::Ready(_)),
                    "health": health.describe(),
                    "health_url": health_url,
                    "url": services::url(settings, name),
                    "image": image,
                    "up_to_date": match (c, &spec) {
                        (Some(c), Ok(spec)) => Value::Bool(c.spec == spec.hash()),
                        _ => Value::Null,
                    },
                    "error": spec.err(),
                })
            })
            .collect()
    });
    if cmd.json {
        println!("{}", Value::Array(rows));
        return Ok(0);
    }
    println!(
        "{:<11} {:<10} {:<18} {:<10} {:<26} IMAGE",
        "SERVICE", "CONFIGURED", "CONTAINER", "STATE", "HEALTH"
    );
    for r in &rows {
        let text = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        let mut state = text("state");
        if r["up_to_date"] == Value::Bool(false) {
            state.push_str(" (old settings)");
        }
        println!(
            "{:<11} {:<10} {:<18} {:<10} {:<26} {}",
            text("service"),
            if r["configured"] == Value::Bool(true) {
                "yes"
            } else {
                "no"
            },
            text("container"),
            state,
            crate::clip::clip(&text("health"), 26),
            text("image"),
        );
        if let Some(e) = r["error"].as_str() {
            if r["configured"] == Value::Bool(true) {
                println!("{:<11} cannot run: {e}", "");
            }
        }
    }
    Ok(0)
}
