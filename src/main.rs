//! citadel: a node agent that turns a machine into a worker of a job fabric.
//! `main` maps the command's result to an exit code: 0 ok, 1 the operation or
//! job failed, 2 bad input (flags, settings, job JSON).

mod admin;
mod backoff;
mod cli;
mod clip;
mod clock;
mod config;
mod events;
mod handlers;
mod http;
mod job;
mod node;
mod redis_conn;
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
    let executor = || {
        let node = events::NodeFacts {
            node_id: settings.node_name.clone(),
            node_name: settings.node_name.clone(),
        };
        let policy = worker::exec::RetryPolicy {
            max_retries: settings.max_retries,
            base: settings.retry_base,
            cap: settings.retry_cap,
        };
        Arc::new(worker::exec::Executor::new(
            handlers::Registry::from_settings(&settings),
            policy,
            node,
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
            if let Command::Agent { up: true } = cli.command {
                println!(
                    "citadel up: no services are configured to start (the Docker driver is not \
                     part of this build); starting the agent"
                );
            }
            transport::check(&settings).map_err(|e| Exit(2, e))?;
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
            // A shell command that did not stop in time dies with the agent.
            handlers::shell::kill_running();
            stopped?;
            Ok(0)
        }
        Command::RunJob { job } => run_job::run(&executor(), job),
        Command::Submit(s) => admin::submit::run(&settings, &s),
        Command::Dlq(d) => admin::dlq::run(&settings, &d),
        Command::Status => admin::status::run(&settings),
        Command::Init(i) => admin::init::run(&settings, &i),
        Command::Service(s) => admin::init::service(&settings, &s),
    }
}
