//! Bringing the node's service containers to a wanted set (the Docker
//! driver's one entry point for the agent, `citadel up` and `citadel
//! services`), and what it did.
//!
//! Containers are found by their `citadel.service` label and compared by
//! their `citadel.spec` label (the hash of [`Spec`]): the same hash running
//! is left alone (no mutating docker command), stopped is started, another
//! hash is removed and made again, none is made (after checking the name,
//! the port and the image). Containers without citadel's label are never
//! touched. One service failing does not stop the others. Each action is
//! logged once, at info.

use crate::config::{format_duration, Settings};
use crate::node::docker::{Container, Docker};
use crate::node::services::{self, Spec, SERVICE_LABEL};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

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

/// What [`apply`] does besides bringing `wanted` up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Stop and remove citadel's containers of services not in `wanted`.
    pub remove_unwanted: bool,
    /// Wait (bounded by `service-ready-timeout`) for the engines to answer.
    pub wait: bool,
}

/// Bring the containers of this node's services to exactly `wanted` (names
/// from the catalog): start what is missing, recreate what changed, start
/// what stopped, stop and remove what is no longer wanted; never touch a
/// container citadel did not make. With `wait`, then wait (bounded) for the
/// engines to answer. A service that fails is in `failed`; the others are
/// still reconciled.
pub fn reconcile(settings: &Settings, wanted: &[String], wait: bool) -> Report {
    apply(
        settings,
        wanted,
        Options {
            remove_unwanted: true,
            wait,
        },
    )
}

/// [`reconcile`], choosing whether services not in `wanted` are removed
/// (`citadel services start NAME` leaves them).
pub fn apply(settings: &Settings, wanted: &[String], opts: Options) -> Report {
    let docker = Docker::new(&settings.docker);
    let mut report = Report::default();
    let existing = match docker.managed() {
        Ok(c) => c,
        // Nothing wanted and no Docker here: nothing to do, nothing to say.
        Err(e) if wanted.is_empty() => {
            log::debug!("services: none wanted; docker: {e}");
            return report;
        }
        Err(e) => {
            log::error!("services: {e}");
            for name in wanted {
                report.failed.push((name.clone(), e.to_string()));
            }
            return report;
        }
    };
    if opts.remove_unwanted {
        for c in existing.iter().filter(|c| !wanted.contains(&c.service)) {
            match docker.remove(&c.id) {
                Ok(()) => {
                    log::info!(
                        "services: {}: stopped and removed container {} (no longer wanted)",
                        c.service,
                        c.name
                    );
                    if !report.stopped.contains(&c.service) {
                        report.stopped.push(c.service.clone());
                    }
                }
                Err(e) => {
                    log::error!(
                        "services: {}: cannot remove container {}: {e}",
                        c.service,
                        c.name
                    );
                    report.failed.push((c.service.clone(), e.to_string()));
                }
            }
        }
    }
    // Unknown (nvidia-smi failing): new containers get no GPUs, and an
    // existing one is not recreated for it.
    let gpus = if wanted.is_empty() {
        Some(false)
    } else {
        crate::node::gpu::nvidia_gpus_present(settings.gpu_query_timeout)
    };
    let mut up: Vec<(Spec, String)> = Vec::new();
    for name in wanted {
        match ensure(&docker, settings, name, gpus, &existing) {
            Ok((action, spec, id)) => {
                let list = match action {
                    Action::Kept => &mut report.kept,
                    Action::Restarted => &mut report.restarted,
                    Action::Recreated => &mut report.recreated,
                    Action::Started => &mut report.started,
                };
                list.push(name.clone());
                up.push((spec, id));
            }
            Err(e) => {
                log::error!("services: {name}: {e}");
                report.failed.push((name.clone(), e));
            }
        }
    }
    if opts.wait && !up.is_empty() {
        let deadline = Instant::now() + settings.service_ready_timeout;
        let results: Vec<(String, Result<(), String>)> = std::thread::scope(|s| {
            let waits: Vec<_> = up
                .iter()
                .map(|(spec, id)| {
                    let docker = &docker;
                    (
                        spec.service.clone(),
                        s.spawn(move || wait_ready(docker, settings, spec, id, deadline)),
                    )
                })
                .collect();
            waits
                .into_iter()
                .map(|(name, t)| {
                    (
                        name,
                        t.join()
                            .unwrap_or_else(|_| Err("the readiness wait panicked".into())),
                    )
                })
                .collect()
        });
        for (name, r) in results {
            match r {
                Ok(()) => report.ready.push(name),
                Err(e) => report.not_ready.push((name, e)),
            }
        }
    }
    report
}

/// `docker stop` citadel's containers of `only` (all of them when empty);
/// they stay, stopped, until a reconcile starts them again. Listed in
/// `stopped`.
pub fn stop(settings: &Settings, only: &[String]) -> Report {
    let docker = Docker::new(&settings.docker);
    let mut report = Report::default();
    let existing = match docker.managed() {
        Ok(c) => c,
        Err(e) => {
            let names: Vec<String> = if only.is_empty() {
                vec!["docker".into()]
            } else {
                only.to_vec()
            };
            for name in names {
                report.failed.push((name, e.to_string()));
            }
            return report;
        }
    };
    for c in existing
        .iter()
        .filter(|c| only.is_empty() || only.contains(&c.service))
    {
        if !c.running() {
            report.kept.push(c.service.clone());
            continue;
        }
        match docker.stop(&c.id) {
            Ok(()) => {
                log::info!("services: {}: stopped container {}", c.service, c.name);
                report.stopped.push(c.service.clone());
            }
            Err(e) => report.failed.push((c.service.clone(), e.to_string())),
        }
    }
    report
}

enum Action {
    Kept,
    Restarted,
    Recreated,
    Started,
}

/// Brings one service to its spec; the action taken, the spec and the
/// container's id.
fn ensure(
    docker: &Docker,
    settings: &Settings,
    name: &str,
    gpus: Option<bool>,
    existing: &[Container],
) -> Result<(Action, Spec, String), String> {
    let mine: Vec<&Container> = existing.iter().filter(|c| c.service == name).collect();
    let mut spec = Spec::build(settings, name, gpus.unwrap_or(false))?;
    if gpus.is_none() {
        let with_gpus = Spec::build(settings, name, true)?;
        if mine.iter().any(|c| c.spec == with_gpus.hash()) {
            spec = with_gpus;
        }
    }
    let hash = spec.hash();
    let current = mine
        .iter()
        .find(|c| c.spec == hash)
        .or(mine.first())
        .copied();
    // A second container of the same service (made by hand from a copy?) goes.
    for extra in mine
        .iter()
        .filter(|c| Some(c.id.as_str()) != current.map(|c| c.id.as_str()))
    {
        docker.remove(&extra.id).map_err(|e| e.to_string())?;
        log::info!(
            "services: {name}: removed the extra container {}",
            extra.name
        );
    }
    match current {
        Some(c) if c.spec == hash && c.running() => {
            log::info!(
                "services: {name}: container {} is running as wanted; kept",
                c.name
            );
            Ok((Action::Kept, spec, c.id.clone()))
        }
        Some(c) if c.spec == hash => {
            docker.start(&c.id).map_err(|e| e.to_string())?;
            log::info!(
                "services: {name}: container {} was {}; started it again",
                c.name,
                c.state
            );
            Ok((Action::Restarted, spec, c.id.clone()))
        }
        Some(c) => {
            docker.remove(&c.id).map_err(|e| e.to_string())?;
            let id = create(docker, &spec)?;
            log::info!(
                "services: {name}: its settings changed; recreated container {} ({})",
                spec.container,
                spec.image
            );
            Ok((Action::Recreated, spec, id))
        }
        None => {
            let id = create(docker, &spec)?;
            log::info!(
                "services: {name}: started container {} ({}) serving on {}:{}",
                spec.container,
                spec.image,
                spec.bind,
                spec.port
            );
            Ok((Action::Started, spec, id))
        }
    }
}

/// `docker run -d` of the spec, after checking that its name is not taken,
/// its port is free and its image is here (else pulled).
fn create(docker: &Docker, spec: &Spec) -> Result<String, String> {
    let name = &spec.service;
    if let Some(labels) = docker
        .labels_of(&spec.container)
        .map_err(|e| e.to_string())?
    {
        return Err(match labels.get(SERVICE_LABEL).and_then(Value::as_str) {
            None => format!(
                "the container name {} is taken by a container citadel did not make (no {SERVICE_LABEL} label);                  it is left alone: rename or remove it to let citadel run {name}",
                spec.container
            ),
            Some(other) => format!(
                "the container name {} is taken by citadel's container of service '{other}'",
                spec.container
            ),
        });
    }
    if let Err(e) = std::net::TcpListener::bind((spec.bind, spec.port)) {
        return Err(format!(
            "port {} (from --{}) is taken by another process ({e}); the {name} container would not be reachable there",
            spec.port,
            services::url_setting(name)
        ));
    }
    let present = docker.has_image(&spec.image).map_err(|e| e.to_string())?;
    if !present {
        log::info!("services: {name}: pulling image {}", spec.image);
        docker.pull(&spec.image).map_err(|e| {
            format!(
                "image {} is not on this node and pulling it failed: {e} (set --service-image {name}=IMAGE to use another)",
                spec.image
            )
        })?;
    }
    let models = spec.models_dir();
    std::fs::create_dir_all(&models)
        .map_err(|e| format!("--models-dir: cannot create {}: {e}", models.display()))?;
    match docker.create_and_start(&spec.run_args()) {
        Ok(id) => Ok(id),
        Err(e) => {
            // `run` may have created the container before failing to start it.
            let _ = docker.remove(&spec.container);
            Err(format!("cannot start container {}: {e}", spec.container))
        }
    }
}

/// Polls the engine's health URL until 2xx (Ok) or `deadline`; a container
/// that exits meanwhile is not ready, with its exit code and last lines.
fn wait_ready(
    docker: &Docker,
    settings: &Settings,
    spec: &Spec,
    id: &str,
    deadline: Instant,
) -> Result<(), String> {
    let name = &spec.service;
    let started = Instant::now();
    let client = crate::http::HttpClient::new(Duration::from_secs(2));
    loop {
        let last = crate::admin::status::probe(&client, &spec.health_url, Duration::from_secs(2));
        if let crate::admin::status::Readiness::Ready(_) = last {
            log::info!(
                "services: {name}: ready at {} after {}",
                spec.health_url,
                format_duration(Duration::from_millis(started.elapsed().as_millis() as u64))
            );
            return Ok(());
        }
        if let Ok(state) = docker.state(id) {
            let status = state.get("Status").and_then(Value::as_str).unwrap_or("");
            if matches!(status, "exited" | "dead" | "restarting") {
                let code = state.get("ExitCode").and_then(Value::as_i64).unwrap_or(-1);
                let logs = crate::clip::clip(&docker.logs_tail(id, 10), 2000);
                let why = format!(
                    "the container exited with code {code} ({status}); its last lines: {}",
                    if logs.is_empty() {
                        "(none)".into()
                    } else {
                        logs
                    }
                );
                log::warn!("services: {name}: not ready: {why}");
                return Err(why);
            }
        }
        if Instant::now() >= deadline {
            let why = format!(
                "its engine did not answer {} within {} (--service-ready-timeout): {}",
                spec.health_url,
                format_duration(settings.service_ready_timeout),
                last.describe()
            );
            log::warn!("services: {name}: not ready: {why}");
            return Err(why);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(spec: &Spec) -> Container {
        Container {
            id: "abc".into(),
            name: spec.container.clone(),
            state: "running".into(),
            service: spec.service.clone(),
            spec: spec.hash(),
            image: spec.image.clone(),
        }
    }

    /// No docker CLI: any docker call fails, so only a decision that needs
    /// none succeeds.
    fn no_docker() -> Docker {
        Docker::new(std::path::Path::new("/nonexistent/docker"))
    }

    #[test]
    fn a_running_container_with_the_wanted_spec_needs_no_docker_call() {
        let mut s = Settings::default();
        s.set("llamacpp-model", "m.gguf").unwrap();
        s.set("models-dir", "/srv/models").unwrap();
        let spec = Spec::build(&s, "llamacpp", false).unwrap();
        let (action, kept, id) =
            ensure(&no_docker(), &s, "llamacpp", Some(false), &[running(&spec)]).unwrap();
        assert!(matches!(action, Action::Kept));
        assert_eq!((kept, id.as_str()), (spec, "abc"));
    }

    #[test]
    fn gpus_unknown_keep_a_gpu_container_but_known_absent_recreate_it() {
        let mut s = Settings::default();
        s.set("llamacpp-model", "m.gguf").unwrap();
        s.set("models-dir", "/srv/models").unwrap();
        let gpu = Spec::build(&s, "llamacpp", true).unwrap();
        let existing = [running(&gpu)];
        let (action, spec, _) = ensure(&no_docker(), &s, "llamacpp", None, &existing).unwrap();
        assert!(matches!(action, Action::Kept));
        assert!(spec.gpus);
        // Known to have no GPUs: the container must be made again (here the
        // missing CLI makes that fail, which shows a docker call was needed).
        let err = ensure(&no_docker(), &s, "llamacpp", Some(false), &existing)
            .err()
            .unwrap();
        assert!(err.contains("/nonexistent/docker"), "{err}");
    }
}
