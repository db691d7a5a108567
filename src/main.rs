//! citadel: a node agent that turns a machine into a worker of a job fabric.
//! `main` maps the command's result to an exit code: 0 ok, 1 the operation or
//! job failed, 2 bad input (flags, settings, job JSON).

mod admin;
mod backoff;
mod child;
mod cli;
mod clip;
mod clock;
mod config;
mod events;
mod follow;
mod gateway;
mod handlers;
mod http;
mod job;
mod node;
mod observe;
mod percent;
#[cfg(test)]
mod proptests;
mod redis_cluster;
mod redis_conn;
mod redis_sentinel;
mod run_job;
mod sync;
#[cfg(test)]
mod thread_probe;
mod transport;
mod worker;

use admin::Exit;
use cli::Command;
use std::sync::Arc;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // rustls (rediss://) needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::process::exit(match run() {
        Ok(code) => code,
        Err(Exit(code, msg)) => {
            eprintln!("citadel: {msg}");
            code
        }
    });
}

fn run() -> Result<i32, Exit> {
    let cli = cli::parse(std::env::args_os().skip(1)).map_err(|e| Exit(2, e))?;
    let settings = cli.settings;
    redis_sentinel::configure(settings.sentinel_auth());
    let executor = || {
        let profile = node::profile::LiveProfile::load(&settings);
        let policy = worker::exec::RetryPolicy {
            max_retries: settings.max_retries,
            base: settings.retry_base,
            cap: settings.retry_cap,
        };
        Arc::new(worker::exec::Executor::new(
            handlers::Registry::from_settings(&settings),
            policy,
            profile,
        ))
    };
    match cli.command {
        Command::Help(text) => {
            print!("{text}");
            Ok(0)
        }
        Command::Version => {
            println!("citadel {}", events::AGENT_VERSION);
            Ok(0)
        }
        Command::Work | Command::Agent { .. } => {
            redis_sentinel::announce_master();
            transport::check(&settings).map_err(|e| Exit(2, e))?;
            // Before anything starts: a port in use stops the start (exit 2)
            // when the operator chose it; the default port taken (a second
            // worker on this host) costs this worker its listener, not its jobs.
            let listener = match observe::server::start(&settings.metrics_addr) {
                Err(e) if !settings.metrics_addr_set => {
                    log::warn!(
                        "{e}; this worker serves no /metrics (another citadel on this host holds the \
                         default port?): give each worker its own --metrics-addr"
                    );
                    None
                }
                other => other.map_err(|e| Exit(2, e))?,
            };
            if let Command::Agent { up: true } = cli.command {
                up(&settings);
            }
            admin::status::log_readiness(&settings);
            let (tx, signals) = crossbeam_channel::unbounded();
            ctrlc::set_handler(move || {
                let _ = tx.send(());
            })
            .map_err(|e| Exit(1, format!("cannot install the signal handler: {e}")))?;
            let exec = executor();
            // The first heartbeat may go out before the transport has started.
            exec.counters.set_mode(transport::first_mode(&settings));
            let heartbeat = node::heartbeat::Heartbeat::start(&settings, &exec);
            // Its gauges are only read by /metrics: no listener, no sampling.
            let sampler = listener
                .as_ref()
                .and_then(|_| observe::sampler::Sampler::start(&settings, exec.profile.clone()));
            let stopped = worker::lifecycle::run(
                settings.concurrency,
                settings.shutdown_grace,
                exec.clone(),
                signals,
                |tasks, slots| transport::start(&settings, exec, tasks, slots),
            );
            if let Some(h) = heartbeat {
                // Bounded: a heartbeat stuck on a hung Redis must not delay the exit.
                h.stop(std::time::Instant::now() + std::time::Duration::from_millis(200));
            }
            if let Some(s) = sampler {
                s.stop(std::time::Instant::now() + std::time::Duration::from_millis(100));
            }
            if let Some(l) = listener {
                l.stop();
            }
            // A shell command that did not stop in time dies with the agent.
            handlers::shell::kill_running();
            stopped?;
            Ok(0)
        }
        Command::RunJob { job } => run_job::run(&executor(), job),
        Command::Submit(s) => admin::submit::run(&settings, &s),
        Command::Follow { job_id, from } => {
            admin::submit::follow_existing(&settings, &job_id, &from)
        }
        Command::Gateway => gateway::run(settings),
        Command::Dlq(d) => admin::dlq::run(&settings, &d),
        Command::Status { json } => admin::status::run(&settings, json),
        Command::Services(s) => admin::services::run(&settings, &s),
        Command::Init(i) => admin::init::run(&settings, &i),
        Command::Service(s) => admin::init::service(&settings, &s),
    }
}

/// `citadel up`, before the agent: the configured services reconciled and
/// waited for; what is not ready is logged, not fatal.
fn up(settings: &config::Settings) {
    let wanted = node::profile::wanted_services(settings);
    if wanted.is_empty() {
        // Containers of services no longer configured still go.
        let report = node::reconcile::reconcile(settings, &[], false);
        if report.changed() || !report.failed.is_empty() {
            log::info!(
                "citadel up: services {}; none is configured any more; starting the agent",
                report.to_json()
            );
        } else {
            log::info!(
                "citadel up: no services are configured (--services, or an APPLY_DEVICE_CONFIG job); starting the agent"
            );
        }
        return;
    }
    log::info!("citadel up: bringing up services {}", wanted.join(", "));
    let report = node::reconcile::reconcile(settings, &wanted, true);
    let pairs = |v: &[(String, String)]| {
        v.iter()
            .map(|(s, why)| format!("{s} ({why})"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !report.ready.is_empty() {
        log::info!("citadel up: ready: {}", report.ready.join(", "));
    }
    if !report.not_ready.is_empty() {
        log::warn!("citadel up: not ready: {}", pairs(&report.not_ready));
    }
    if !report.failed.is_empty() {
        log::error!("citadel up: failed: {}", pairs(&report.failed));
    }
    let changed = if report.changed() {
        ""
    } else {
        " (no container changed)"
    };
    log::info!(
        "citadel up: services {}{changed}; starting the agent",
        report.to_json()
    );
}
