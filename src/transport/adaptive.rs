//! Adaptive mode (`citadel agent`): Nexus polling as the fallback, Redis
//! Streams when Redis answers. Starts polling Nexus; probes Redis (at once,
//! then every `--redis-probe`) and switches to Redis Streams when it answers;
//! while on Redis, probes it often, and falls back to Nexus when it has been
//! unreachable longer than `--redis-fallback`. A switch only changes who
//! *takes* jobs: jobs in flight settle on the transport that delivered them
//! (the Redis settle thread keeps retrying its acks; the Nexus reporter keeps
//! its spool). The mode is logged on every change and written to
//! `{state-dir}/agent-status.json` for `citadel status`.

use super::nexus::NexusPolling;
use super::redis_streams::RedisStreams;
use crate::config::Settings;
use crate::redis_conn;
use crate::sync::lock;
use crate::worker::exec::Executor;
use crate::worker::lifecycle::Transport;
use crate::worker::pool::TaskSender;
use crate::worker::slots::Slots;
use crate::worker::stop::StopFlag;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Parts {
    settings: Settings,
    exec: Arc<Executor>,
    tasks: TaskSender,
    slots: Arc<Slots>,
    nexus: NexusPolling,
    redis: Option<RedisStreams>,
    on_redis: bool,
}

pub struct Adaptive {
    parts: Arc<Mutex<Parts>>,
    stop: Arc<StopFlag>,
    supervisor: Option<JoinHandle<()>>,
}

impl Adaptive {
    pub fn start(
        settings: Settings,
        nexus_url: &str,
        exec: Arc<Executor>,
        tasks: TaskSender,
        slots: Arc<Slots>,
    ) -> Result<Self, String> {
        let nexus = NexusPolling::start(
            settings.clone(),
            nexus_url,
            exec.clone(),
            tasks.clone(),
            slots.clone(),
        )?;
        log::info!(
            "mode: nexus (polling {nexus_url}; Redis at {} is probed)",
            settings.redis_url
        );
        record_mode(&settings, &exec, "nexus");
        let parts = Arc::new(Mutex::new(Parts {
            settings,
            exec,
            tasks,
            slots,
            nexus,
            redis: None,
            on_redis: false,
        }));
        let stop = Arc::new(StopFlag::default());
        let supervisor = std::thread::Builder::new()
            .name("mode".into())
            .spawn({
                let (parts, stop) = (parts.clone(), stop.clone());
                move || supervise(&parts, &stop)
            })
            .expect("spawn mode thread");
        Ok(Adaptive {
            parts,
            stop,
            supervisor: Some(supervisor),
        })
    }
}

fn supervise(parts: &Mutex<Parts>, stop: &StopFlag) {
    let (url, timeout, probe_every, fallback) = {
        let p = lock(parts);
        let s = &p.settings;
        (
            s.redis_url.clone(),
            s.redis_timeout.min(Duration::from_secs(2)),
            s.redis_probe,
            s.redis_fallback,
        )
    };
    // While on Redis, look often enough to notice an outage well within the fallback.
    let watch_every = (fallback / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
    let mut down_since: Option<Instant> = None;
    let mut first = true;
    loop {
        let on_redis = lock(parts).on_redis;
        let wait = if first {
            Duration::ZERO
        } else if on_redis {
            watch_every
        } else {
            probe_every
        };
        first = false;
        if stop.sleep(wait) {
            return;
        }
        let up = probe(&url, timeout);
        let mut p = lock(parts);
        match (p.on_redis, up) {
            (false, true) => {
                p.nexus.pause_reading();
                let Parts {
                    settings,
                    exec,
                    tasks,
                    slots,
                    redis,
                    ..
                } = &mut *p;
                match redis {
                    Some(r) => r.resume_reading(),
                    None => {
                        *redis = Some(RedisStreams::start(
                            settings.clone(),
                            exec.clone(),
                            tasks.clone(),
                            slots.clone(),
                        ))
                    }
                }
                p.on_redis = true;
                down_since = None;
                log::info!("mode: redis (Redis at {url} answers; Nexus polling paused)");
                record_mode(&p.settings, &p.exec, "redis");
            }
            (true, true) => down_since = None,
            (true, false) => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= fallback {
                    if let Some(r) = p.redis.as_mut() {
                        r.stop_reading();
                    }
                    p.nexus.resume_reading();
                    p.on_redis = false;
                    down_since = None;
                    log::warn!(
                        "mode: nexus (Redis unreachable for {:.1}s; polling Nexus, probing Redis every {:?})",
                        since.elapsed().as_secs_f64(),
                        probe_every
                    );
                    record_mode(&p.settings, &p.exec, "nexus");
                }
            }
            (false, false) => {}
        }
    }
}

/// Does Redis answer a PING within `timeout`?
fn probe(url: &str, timeout: Duration) -> bool {
    redis_conn::connect(url, timeout, timeout)
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok()
}

impl Transport for Adaptive {
    fn stop_reading(&mut self) {
        self.stop.set();
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        let mut p = lock(&self.parts);
        p.nexus.stop_reading();
        if let Some(r) = p.redis.as_mut() {
            r.stop_reading();
        }
    }

    fn abandon(&self) {
        let p = lock(&self.parts);
        p.nexus.abandon();
        if let Some(r) = &p.redis {
            r.abandon();
        }
    }

    fn finish(mut self: Box<Self>, hard_deadline: Instant) {
        self.stop_reading();
        let Ok(parts) = Arc::try_unwrap(self.parts) else {
            log::error!("mode thread still holds the transports; exiting without settling");
            return;
        };
        let p = parts.into_inner().unwrap_or_else(|e| e.into_inner());
        Box::new(p.nexus).finish(hard_deadline);
        if let Some(r) = p.redis {
            Box::new(r).finish(hard_deadline);
        }
    }
}

/// Write the current mode to `{state-dir}/agent-status.json` (best effort),
/// and into the counters the heartbeat reports.
pub fn record_mode(settings: &Settings, exec: &Executor, mode: &'static str) {
    exec.counters.set_mode(mode);
    let status = serde_json::json!({
        "mode": mode,
        "pid": std::process::id(),
        "since": crate::clock::now_rfc3339(),
    });
    let dir = &settings.state_dir;
    let written = super::nexus::spool::create_private_dir(dir).and_then(|_| {
        super::nexus::spool::write_atomically(
            &dir.join("agent-status.json"),
            status.to_string().as_bytes(),
        )
        .map_err(|e| e.to_string())
    });
    if let Err(e) = written {
        log::debug!("cannot record the agent status in {}: {e}", dir.display());
    }
}
