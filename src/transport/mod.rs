//! Transports: how jobs arrive and how their outcomes leave. Each feeds the
//! shared handler pool, holding one of its slots per job it has taken.

pub mod adaptive;
pub mod nexus;
pub mod redis_streams;

use crate::config::{Mode, Settings};
use crate::worker::exec::Executor;
use crate::worker::lifecycle::Transport;
use crate::worker::pool::TaskSender;
use crate::worker::slots::Slots;
use std::sync::Arc;

/// Settings a mode cannot run without, checked before anything starts.
pub fn check(settings: &Settings) -> Result<(), String> {
    if settings.mode == Mode::Nexus && settings.nexus_url.is_none() {
        return Err("--mode nexus needs --nexus-url (or CITADEL_NEXUS_URL)".into());
    }
    if settings.mode != Mode::Nexus {
        if let Some(why) = settings.cluster_queue_problem() {
            return Err(why);
        }
    }
    Ok(())
}

/// Where [`start`] takes jobs from first: `redis` or `nexus` (auto mode
/// starts on Nexus when it has a Nexus URL).
pub fn first_mode(settings: &Settings) -> &'static str {
    match (settings.mode, &settings.nexus_url) {
        (Mode::Redis, _) | (Mode::Auto, None) => "redis",
        (Mode::Nexus, _) | (Mode::Auto, Some(_)) => "nexus",
    }
}

/// The transport of `settings.mode`. Auto mode without a Nexus URL is Redis
/// Streams alone; without a configured Redis URL, Nexus polling alone.
pub fn start(
    settings: &Settings,
    exec: Arc<Executor>,
    tasks: TaskSender,
    slots: Arc<Slots>,
) -> Result<Box<dyn Transport>, String> {
    let s = settings.clone();
    let redis_only = |s: Settings| -> Box<dyn Transport> {
        Box::new(redis_streams::RedisStreams::start(
            s,
            exec.clone(),
            tasks.clone(),
            slots.clone(),
        ))
    };
    let nexus_only = |s: Settings, url: &str| -> Result<Box<dyn Transport>, String> {
        log::info!("mode: nexus (polling {url})");
        adaptive::record_mode(&s, &exec, "nexus");
        Ok(Box::new(nexus::NexusPolling::start(
            s,
            url,
            exec.clone(),
            tasks.clone(),
            slots.clone(),
        )?))
    };
    let url = settings.nexus_url.as_deref();
    match settings.mode {
        Mode::Redis => Ok(redis_only(s)),
        Mode::Nexus => nexus_only(s, url.ok_or("--mode nexus needs --nexus-url")?),
        Mode::Auto => match url {
            None => {
                log::info!("mode: redis (no Nexus URL configured: Redis Streams only)");
                Ok(redis_only(s))
            }
            Some(url) if !settings.redis_url_set => {
                log::info!("no Redis URL configured: Nexus polling only");
                nexus_only(s, url)
            }
            Some(url) => Ok(Box::new(adaptive::Adaptive::start(
                s,
                url,
                exec.clone(),
                tasks.clone(),
                slots.clone(),
            )?)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_mode_is_where_start_takes_jobs_from() {
        let mut s = Settings::default();
        assert_eq!(first_mode(&s), "redis");
        s.set("mode", "auto").unwrap();
        assert_eq!(first_mode(&s), "redis", "auto without a Nexus URL");
        s.set("nexus-url", "http://127.0.0.1:1").unwrap();
        assert_eq!(first_mode(&s), "nexus", "auto starts polling Nexus");
        s.set("mode", "nexus").unwrap();
        assert_eq!(first_mode(&s), "nexus");
    }
}
