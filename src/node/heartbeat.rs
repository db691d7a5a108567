//! The node heartbeat (PROTOCOL.md §5): every `--heartbeat-interval`, the
//! first at start, `XADD node:status:stream MAXLEN ~ 10000 * nodeId <name>
//! timestamp <rfc3339> payload <json>`, then `PUBLISH node:status:{name}
//! <json>`.
//!
//! It has its own thread and its own Redis connection with bounded timeouts,
//! and shares nothing with the job path but the executor's counters (read
//! only): a Redis outage delays no job because of it. An outage is logged
//! once (`backoff::Outage`) and the next beat simply tries again. It runs
//! wherever a Redis URL is configured; Nexus polling without one has no
//! heartbeat. A stop wakes it at once.
//!
//! Each beat also lists the local inference engines and the models they
//! serve (`engines`: each engine's model list, asked at its URL, bounded by
//! the engine connect timeout), which `citadel gateway` offers on
//! `GET /v1/models`.
//!
//! What it says of the node comes from the live device config
//! (`profile`): the device name and tags, the alert switches; while the
//! config has `healthMonitoringEnabled` false no beat is sent (the thread
//! keeps its cadence and sends again once it is true). Its stream field
//! `nodeId` and its channel stay the node name.

use super::gpu::{Gpu, GpuReader, GpuSource};
use super::host::HostReader;
use crate::admin::status::Readiness;
use crate::backoff::Outage;
use crate::config::{Mode, Settings};
use crate::events::AGENT_VERSION;
use crate::handlers::inference::Backend;
use crate::node::profile::{LiveProfile, Snapshot};
use crate::redis_conn::Conn;
use crate::redis_conn::{self, Fault};
use crate::worker::counters::Counters;
use crate::worker::exec::Executor;
use crate::worker::stop::StopFlag;
use serde_json::{json, Value};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const STREAM: &str = "node:status:stream";
pub const STREAM_MAXLEN: u64 = 10_000;

/// The Pub/Sub channel of a node's heartbeats.
pub fn channel(node_name: &str) -> String {
    format!("node:status:{node_name}")
}

/// The running heartbeat thread.
pub struct Heartbeat {
    stop: Arc<StopFlag>,
    thread: JoinHandle<()>,
}

/// The Redis URL heartbeats go to, or why there are none.
fn target(settings: &Settings) -> Result<&str, &'static str> {
    let nexus_only = match settings.mode {
        Mode::Redis => false,
        Mode::Nexus => true,
        Mode::Auto => settings.nexus_url.is_some(),
    };
    if settings.heartbeat_interval.is_zero() {
        Err("off (--heartbeat-interval 0)")
    } else if nexus_only && !settings.redis_url_set {
        Err("none (Nexus polling without a configured Redis URL)")
    } else {
        Ok(&settings.redis_url)
    }
}

impl Heartbeat {
    /// Start beating, if this configuration has a heartbeat (logged either way).
    pub fn start(settings: &Settings, exec: &Executor) -> Option<Heartbeat> {
        let url = match target(settings) {
            Ok(url) => url.to_owned(),
            Err(why) => {
                log::info!("heartbeat: {why}");
                return None;
            }
        };
        log::info!(
            "heartbeat: every {} to {STREAM} and {}",
            crate::config::format_duration(settings.heartbeat_interval),
            channel(&settings.node_name)
        );
        let stop = Arc::new(StopFlag::default());
        let beat = Beat {
            url,
            settings: settings.clone(),
            profile: exec.profile.clone(),
            counters: exec.counters.clone(),
            started: Instant::now(),
            conn: None,
            outage: Outage::new("heartbeat", "Redis", Duration::from_secs(30)),
            host: HostReader::default(),
        };
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn({
                let stop = stop.clone();
                move || beat.run(&stop)
            })
            .expect("spawn heartbeat thread");
        Some(Heartbeat { stop, thread })
    }

    /// Stop beating; waits for the thread until `deadline` at most (a beat
    /// stuck in a Redis call or nvidia-smi is left to end by its timeout).
    pub fn stop(self, deadline: Instant) {
        self.stop.set();
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        } else {
            log::debug!("heartbeat: a beat is still waiting; not waiting for it");
        }
    }
}

struct Beat {
    url: String,
    settings: Settings,
    profile: Arc<LiveProfile>,
    counters: Arc<Counters>,
    started: Instant,
    conn: Option<Conn>,
    outage: Outage,
    host: HostReader,
}

impl Beat {
    fn run(mut self, stop: &StopFlag) {
        let interval = self.settings.heartbeat_interval;
        let mut gpus = GpuReader::new(
            GpuSource::detect(
                &self.settings.gpu_telemetry,
                self.settings.gpu_query_timeout,
            ),
            self.settings.gpu_query_timeout,
        );
        let mut next = Instant::now();
        let mut paused = false;
        let s = &self.settings;
        // Its longest legitimate turn: the interval, nvidia-smi, a send.
        let beat = crate::observe::alive::Beat::new(
            "heartbeat",
            interval
                + s.gpu_query_timeout
                + s.engine_connect_timeout * 2
                + s.redis_timeout * 3
                + Duration::from_secs(30),
        );
        loop {
            beat.tick();
            if stop.sleep(next.saturating_duration_since(Instant::now())) {
                return;
            }
            // A beat that took longer than the interval is not caught up.
            next = (next + interval).max(Instant::now());
            let profile = self.profile.now();
            if !profile.config.health_monitoring_enabled {
                if !std::mem::replace(&mut paused, true) {
                    log::info!(
                        "heartbeat: paused (the device config has healthMonitoringEnabled false)"
                    );
                }
                log::debug!("heartbeat: beat skipped (healthMonitoringEnabled false)");
                continue;
            }
            if std::mem::take(&mut paused) {
                log::info!("heartbeat: resumed (healthMonitoringEnabled true)");
            }
            let gpus = gpus.read(stop);
            if stop.is_set() {
                return;
            }
            crate::observe::metrics::METRICS.set_gpus(&gpus);
            let engines = crate::admin::status::probe_models(&self.settings);
            if stop.is_set() {
                return;
            }
            let host = self.host.read(&self.settings.state_dir);
            let timestamp = crate::clock::now_rfc3339();
            let body = payload(
                &profile,
                &self.settings,
                &timestamp,
                self.started.elapsed(),
                Readings {
                    host,
                    gpus: &gpus,
                    engines: &engines,
                },
                self.counters.snapshot(),
            );
            match self.send(&timestamp, &body.to_string()) {
                Ok(()) => self.outage.recovered(),
                Err(e) => {
                    if redis_conn::fault(&e) == Fault::Reconnect {
                        self.conn = None;
                    }
                    // The next beat is the retry; the backoff is not used.
                    let _ = self.outage.failed_as(redis_conn::describe(&e), &e);
                }
            }
        }
    }

    fn send(&mut self, timestamp: &str, json: &str) -> redis::RedisResult<()> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let t = self.settings.redis_timeout;
                self.conn.insert(redis_conn::connect(&self.url, t, t)?)
            }
        };
        let name = &self.settings.node_name;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAXLEN)
            .arg("*")
            .arg("nodeId")
            .arg(name)
            .arg("timestamp")
            .arg(timestamp)
            .arg("payload")
            .arg(json);
        let publish = redis::cmd("PUBLISH").arg(channel(name)).arg(json).clone();
        for reply in conn.send_all(&[xadd, publish])? {
            if let redis::Value::ServerError(e) = reply {
                return Err(e.into());
            }
        }
        Ok(())
    }
}

/// What a beat read of the machine: host figures (merged into the top
/// level), GPUs, and the local engines' answers.
struct Readings<'a> {
    host: Value,
    gpus: &'a [Gpu],
    engines: &'a [(Backend, Readiness)],
}

/// The heartbeat's JSON. `nodeId` is the node name; `nodeName` and `tags`
/// come from the device config, as do the alert switches (`monitoring`),
/// recorded for whoever watches the beats.
fn payload(
    profile: &Snapshot,
    settings: &Settings,
    timestamp: &str,
    uptime: Duration,
    read: Readings<'_>,
    worker: Value,
) -> Value {
    let Readings {
        host,
        gpus,
        engines,
    } = read;
    let mode = match settings.mode {
        Mode::Redis => "redis",
        Mode::Nexus => "nexus",
        Mode::Auto => "auto",
    };
    let (node, c) = (&profile.facts, &profile.config);
    let alerts = if c.alert_on_high_temp {
        high_temp_alerts(gpus, settings.gpu_high_temp)
    } else {
        Vec::new()
    };
    let mut body = json!({
        "version": "1.0",
        "agent_version": AGENT_VERSION,
        "timestamp": timestamp,
        "nodeId": node.node_id,
        "nodeName": node.node_name,
        "tags": node.tags,
        "monitoring": {
            "healthMonitoringEnabled": c.health_monitoring_enabled,
            "alertOnOffline": c.alert_on_offline,
            "alertOnHighTemp": c.alert_on_high_temp,
        },
        "hostname": crate::config::hostname(),
        "uptime_seconds": uptime.as_secs(),
        "mode": mode,
        "concurrency": settings.concurrency,
        "gpus": gpus,
        "engines": engines
            .iter()
            .map(|(b, r)| r.to_json(b.name(), b.url(settings)))
            .collect::<Vec<_>>(),
        "worker": worker,
        "alerts": alerts,
    });
    if let (Value::Object(b), Value::Object(h)) = (&mut body, host) {
        b.extend(h);
    }
    body
}

/// One `gpu_high_temperature` alert per GPU at or above `threshold` °C
/// (a GPU without a temperature reading raises none).
fn high_temp_alerts(gpus: &[Gpu], threshold: f64) -> Vec<Value> {
    gpus.iter()
        .filter_map(|g| {
            let t = g.temperature_celsius.filter(|t| *t >= threshold)?;
            Some(json!({
                "type": "gpu_high_temperature",
                "gpu": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "temperature_celsius": t,
                "threshold_celsius": threshold,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nexus_polling_without_a_redis_url_has_no_heartbeat() {
        let mut s = Settings::default();
        assert_eq!(target(&s), Ok("redis://127.0.0.1:6379"));
        s.set("mode", "auto").unwrap();
        assert_eq!(
            target(&s),
            Ok("redis://127.0.0.1:6379"),
            "auto without Nexus is Redis"
        );
        s.set("nexus-url", "http://127.0.0.1:1").unwrap();
        assert!(target(&s).unwrap_err().contains("Nexus polling"));
        s.set("mode", "nexus").unwrap();
        assert!(target(&s).is_err());
        s.set("redis-url", "redis://127.0.0.1:7").unwrap();
        assert_eq!(target(&s), Ok("redis://127.0.0.1:7"));
        s.set("heartbeat-interval", "0").unwrap();
        assert!(target(&s).unwrap_err().contains("off"));
    }

    #[test]
    fn the_payload_carries_node_host_gpus_and_worker() {
        let mut s = Settings::default();
        s.set("node-name", "n1").unwrap();
        let config = crate::node::profile::DeviceConfig {
            device_name: Some("dev-1".into()),
            custom_tags: vec!["t1".into()],
            alert_on_high_temp: true,
            ..Default::default()
        };
        let live = LiveProfile::new(&s, "unused".into(), config, true);
        let host = json!({"cpu": {"cores": 2}, "memory": {}, "disk": {}});
        let body = payload(
            &live.now(),
            &s,
            "2026-01-20T10:00:01.123Z",
            Duration::from_secs(61),
            Readings {
                host,
                gpus: &[],
                engines: &[
                    (Backend::Vllm, Readiness::Ready(vec!["m-1".into()])),
                    (Backend::Ollama, Readiness::Down("refused".into())),
                ],
            },
            json!({"processed": 0}),
        );
        assert_eq!(body["engines"][0]["name"], "vllm");
        assert_eq!(body["engines"][0]["state"], "ready");
        assert_eq!(body["engines"][0]["models"], json!(["m-1"]));
        assert_eq!(body["engines"][1]["state"], "down");
        assert_eq!(body["nodeId"], "n1");
        assert_eq!(body["nodeName"], "dev-1");
        assert_eq!(body["tags"], json!(["t1"]));
        assert_eq!(body["monitoring"]["alertOnHighTemp"], true);
        assert_eq!(body["monitoring"]["alertOnOffline"], false);
        assert_eq!(body["uptime_seconds"], 61);
        assert_eq!(body["mode"], "redis");
        assert_eq!(body["cpu"]["cores"], 2);
        assert_eq!(body["worker"]["processed"], 0);
        assert_eq!(body["version"], "1.0");
        assert_eq!(body["alerts"], json!([]));
    }

    #[test]
    fn a_gpu_at_or_above_the_threshold_raises_one_alert() {
        let gpu = |index, t| Gpu {
            index,
            name: "NVIDIA H200".into(),
            uuid: Some(format!("GPU-{index}")),
            memory_used_mb: None,
            memory_total_mb: None,
            utilization_percent: None,
            temperature_celsius: t,
            power_watts: None,
            driver: None,
        };
        let alerts = high_temp_alerts(
            &[
                gpu(0, Some(84.9)),
                gpu(1, Some(85.0)),
                gpu(2, None),
                gpu(3, Some(97.0)),
            ],
            85.0,
        );
        let at: Vec<u64> = alerts.iter().map(|a| a["gpu"].as_u64().unwrap()).collect();
        assert_eq!(at, [1, 3]);
        assert_eq!(alerts[1]["temperature_celsius"], 97.0);
        assert_eq!(alerts[1]["threshold_celsius"], 85.0);
        assert_eq!(alerts[1]["type"], "gpu_high_temperature");
    }
}
