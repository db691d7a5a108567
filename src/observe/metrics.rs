//! The process's Prometheus metrics: one static registry ([`METRICS`])
//! written from the job path and read by `/metrics`.
//!
//! Hot-path cost: a job takes the per-type map's lock once when it starts
//! and once when it ends (plus once per retry); chunks touch one atomic.
//! Nothing here does I/O: Redis-derived gauges come from the sampler
//! thread (`observe::sampler`), GPU gauges from the heartbeat's last
//! sample, so a scrape never waits for Redis or nvidia-smi.
//!
//! The text format (exposition format 0.0.4) is written by hand here:
//! it is about a hundred lines for counters, gauges and fixed-bucket
//! histograms, where `prometheus-client` would add a crate and its
//! registry types for the same output.

use crate::node::gpu::Gpu;
use crate::sync::lock;
use crate::worker::exec::Outcome;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Job types kept as distinct label values; further ones count as `other`
/// (job types come from producers: the label set must stay bounded).
pub const MAX_JOB_TYPES: usize = 64;

/// Upper bounds (seconds) of the job duration and pickup latency buckets.
pub const JOB_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
/// Upper bounds (seconds) of the time-to-first-token buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The job type whose first streamed chunk is its first token.
pub const LLM_INFERENCE: &str = "llm_inference";

pub static METRICS: Metrics = Metrics::new();

/// A fixed-bucket histogram (no per-observation allocation).
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, observations ≤ its bound and above the previous one.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// What jobs of one type did.
#[derive(Clone, Debug)]
pub struct TypeStats {
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub reclaimed: u64,
    pub cancelled: u64,
    pub duration: Histogram,
    pub pickup: Histogram,
    pub ttft: Histogram,
}

impl Default for TypeStats {
    fn default() -> Self {
        TypeStats {
            started: 0,
            completed: 0,
            failed: 0,
            retried: 0,
            dead_lettered: 0,
            reclaimed: 0,
            cancelled: 0,
            duration: Histogram::new(JOB_BUCKETS),
            pickup: Histogram::new(JOB_BUCKETS),
            ttft: Histogram::new(TTFT_BUCKETS),
        }
    }
}

/// One stream as the sampler last saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSample {
    pub stream: String,
    /// Entries pending for this consumer.
    pub pending: u64,
    /// Age (now − the entry id's time) of this consumer's oldest pending
    /// entry; 0 when none.
    pub oldest_pending_seconds: f64,
}

#[derive(Default)]
struct Sampled {
    streams: Vec<StreamSample>,
    /// Dead-letter stream → length.
    dlq: Vec<(String, u64)>,
}

type SpoolLen = Box<dyn Fn() -> Option<usize> + Send>;

pub struct Metrics {
    types: Mutex<BTreeMap<String, TypeStats>>,
    in_flight: AtomicU64,
    redis_reconnects: AtomicU64,
    nexus_poll_errors: AtomicU64,
    nexus_report_errors: AtomicU64,
    chunks_published: AtomicU64,
    chunks_dropped: AtomicU64,
    /// Handler threads (0 until a worker started).
    capacity: AtomicU64,
    spool: Mutex<Option<SpoolLen>>,
    sampled: Mutex<Sampled>,
    gpus: Mutex<Vec<Gpu>>,
}

impl Metrics {
    pub const fn new() -> Self {
        Metrics {
            types: Mutex::new(BTreeMap::new()),
            in_flight: AtomicU64::new(0),
            redis_reconnects: AtomicU64::new(0),
            nexus_poll_errors: AtomicU64::new(0),
            nexus_report_errors: AtomicU64::new(0),
            chunks_published: AtomicU64::new(0),
            chunks_dropped: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
            spool: Mutex::new(None),
            sampled: Mutex::new(Sampled {
                streams: Vec::new(),
                dlq: Vec::new(),
            }),
            gpus: Mutex::new(Vec::new()),
        }
    }

    fn with_type(&self, kind: &str, f: impl FnOnce(&mut TypeStats)) {
        let mut types = lock(&self.types);
        if let Some(t) = types.get_mut(kind) {
            return f(t);
        }
        let key = if types.len() >= MAX_JOB_TYPES {
            "other"
        } else {
            kind
        };
        f(types.entry(key.to_owned()).or_default())
    }

    /// A handler starts `kind`; `pickup` is how long it waited since it
    /// was enqueued, when known.
    pub fn job_started(&self, kind: &str, pickup: Option<Duration>) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.with_type(kind, |t| {
            t.started += 1;
            if let Some(p) = pickup {
                t.pickup.observe(p.as_secs_f64());
            }
        });
    }

    /// A handler's run of `kind` ended after `took`; `first_chunk` is when
    /// (after the start) its first chunk came, if one did.
    pub fn job_finished(
        &self,
        kind: &str,
        outcome: &Outcome,
        took: Duration,
        first_chunk: Option<Duration>,
    ) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.with_type(kind, |t| {
            match outcome {
                Outcome::Success(_) => t.completed += 1,
                Outcome::Failed { .. } => t.failed += 1,
                Outcome::Cancelled(_) => t.cancelled += 1,
                Outcome::Abandoned => {}
            }
            if !matches!(outcome, Outcome::Abandoned) {
                t.duration.observe(took.as_secs_f64());
            }
            if let (LLM_INFERENCE, Some(d)) = (kind, first_chunk) {
                t.ttft.observe(d.as_secs_f64());
            }
        });
    }

    /// A job settled as cancelled without running (its cancel key was set
    /// before it started).
    pub fn cancelled_before_start(&self, kind: &str) {
        self.with_type(kind, |t| t.cancelled += 1);
    }

    pub fn retried(&self, kind: &str) {
        self.with_type(kind, |t| t.retried += 1);
    }

    pub fn dead_lettered(&self, kind: &str) {
        self.with_type(kind, |t| t.dead_lettered += 1);
    }

    pub fn reclaimed(&self, kind: &str) {
        self.with_type(kind, |t| t.reclaimed += 1);
    }

    pub fn redis_reconnected(&self) {
        self.redis_reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn nexus_poll_failed(&self) {
        self.nexus_poll_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn nexus_report_failed(&self) {
        self.nexus_report_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn chunk_published(&self) {
        self.chunks_published.fetch_add(1, Ordering::Relaxed);
    }

    pub fn chunks_dropped(&self, n: u64) {
        self.chunks_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// The number of handler threads, for the free-slots gauge.
    pub fn set_capacity(&self, n: usize) {
        self.capacity.store(n as u64, Ordering::Relaxed);
    }

    /// How to read the Nexus report spool's size (`None` once it is gone).
    pub fn set_spool(&self, len: SpoolLen) {
        *lock(&self.spool) = Some(len);
    }

    pub fn set_streams(&self, streams: Vec<StreamSample>, dlq: Vec<(String, u64)>) {
        *lock(&self.sampled) = Sampled { streams, dlq };
    }

    /// The heartbeat's last GPU sample.
    pub fn set_gpus(&self, gpus: &[Gpu]) {
        *lock(&self.gpus) = gpus.to_vec();
    }

    /// The whole registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let types = lock(&self.types).clone();
        let counter = |out: &mut String, name: &str, help: &str, get: fn(&TypeStats) -> u64| {
            header(out, name, "counter", help);
            for (kind, t) in &types {
                let _ = writeln!(out, "{name}{{type=\"{}\"}} {}", escape(kind), get(t));
            }
        };
        counter(
            &mut out,
            "citadel_jobs_started_total",
            "Jobs a handler started, by job type.",
            |t| t.started,
        );
        counter(
            &mut out,
            "citadel_jobs_completed_total",
            "Jobs that ended in success, by job type.",
            |t| t.completed,
        );
        counter(
            &mut out,
            "citadel_jobs_failed_total",
            "Jobs whose handler failed for good (after any retries), by job type.",
            |t| t.failed,
        );
        counter(
            &mut out,
            "citadel_jobs_retried_total",
            "In-process retries of a failed attempt, by job type.",
            |t| t.retried,
        );
        counter(
            &mut out,
            "citadel_jobs_dead_lettered_total",
            "Dead letters Redis took (failed, malformed, or delivered too often), by job type.",
            |t| t.dead_lettered,
        );
        counter(
            &mut out,
            "citadel_jobs_reclaimed_total",
            "Entries of dead consumers taken over (XAUTOCLAIM), by job type.",
            |t| t.reclaimed,
        );
        counter(
            &mut out,
            "citadel_jobs_cancelled_total",
            "Jobs cancelled by their producer (running or before start), by job type.",
            |t| t.cancelled,
        );
        let plain = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        };
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        plain(
            &mut out,
            "citadel_redis_reconnects_total",
            "counter",
            "Redis connections opened again by the reader or settle thread after one was lost.",
            n(&self.redis_reconnects),
        );
        plain(
            &mut out,
            "citadel_nexus_poll_errors_total",
            "counter",
            "Nexus polls that failed (no answer, a bad answer, 408/429/5xx).",
            n(&self.nexus_poll_errors),
        );
        plain(
            &mut out,
            "citadel_nexus_report_errors_total",
            "counter",
            "Report deliveries to Nexus that were refused or got no answer.",
            n(&self.nexus_report_errors),
        );
        plain(
            &mut out,
            "citadel_chunks_published_total",
            "counter",
            "Chunk events Redis took (PUBLISH), or chunks added to a Nexus report.",
            n(&self.chunks_published),
        );
        plain(
            &mut out,
            "citadel_chunks_dropped_total",
            "counter",
            "Chunk events dropped because Redis could not take them (the result keeps the whole output).",
            n(&self.chunks_dropped),
        );
        plain(
            &mut out,
            "citadel_jobs_in_flight",
            "gauge",
            "Jobs a handler is running now.",
            n(&self.in_flight),
        );
        let capacity = self.capacity.load(Ordering::Relaxed);
        if capacity > 0 {
            let busy = self.in_flight.load(Ordering::Relaxed);
            plain(
                &mut out,
                "citadel_free_slots",
                "gauge",
                "Handler threads free to run a job (handlers minus jobs in flight).",
                capacity.saturating_sub(busy).to_string(),
            );
        }
        {
            let sampled = lock(&self.sampled);
            header(
                &mut out,
                "citadel_pending_entries",
                "gauge",
                "Entries pending for this consumer, by stream (sampled every 5 s).",
            );
            for s in &sampled.streams {
                let _ = writeln!(
                    out,
                    "citadel_pending_entries{{stream=\"{}\"}} {}",
                    escape(&s.stream),
                    s.pending
                );
            }
            header(
                &mut out,
                "citadel_oldest_pending_age_seconds",
                "gauge",
                "Age of this consumer's oldest pending entry (from its id), by stream; 0 when none.",
            );
            for s in &sampled.streams {
                let _ = writeln!(
                    out,
                    "citadel_oldest_pending_age_seconds{{stream=\"{}\"}} {}",
                    escape(&s.stream),
                    s.oldest_pending_seconds
                );
            }
            header(
                &mut out,
                "citadel_dead_letter_entries",
                "gauge",
                "Length of each dead-letter stream (sampled every 5 s).",
            );
            for (stream, len) in &sampled.dlq {
                let _ = writeln!(
                    out,
                    "citadel_dead_letter_entries{{stream=\"{}\"}} {len}",
                    escape(stream)
                );
            }
        }
        if let Some(len) = lock(&self.spool).as_ref().and_then(|f| f()) {
            plain(
                &mut out,
                "citadel_nexus_spool_reports",
                "gauge",
                "Reports waiting in the Nexus spool for delivery.",
                len.to_string(),
            );
        }
        self.render_gpus(&mut out);
        let hist = |out: &mut String, name: &str, help: &str, get: fn(&TypeStats) -> &Histogram| {
            header(out, name, "histogram", help);
            for (kind, t) in &types {
                let h = get(t);
                if h.count() > 0 || name != "citadel_time_to_first_token_seconds" {
                    h.write(out, name, &format!("type=\"{}\"", escape(kind)));
                }
            }
        };
        hist(
            &mut out,
            "citadel_job_duration_seconds",
            "Handler run time of jobs that ended (retries included), by job type.",
            |t| &t.duration,
        );
        hist(
            &mut out,
            "citadel_job_pickup_latency_seconds",
            "Enqueue (the stream entry id's time) to handler start, by job type.",
            |t| &t.pickup,
        );
        hist(
            &mut out,
            "citadel_time_to_first_token_seconds",
            "llm_inference: handler start to the first streamed token.",
            |t| &t.ttft,
        );
        out
    }

    fn render_gpus(&self, out: &mut String) {
        let gpus = lock(&self.gpus).clone();
        let gauges: [GpuGauge; 5] = [
            (
                "citadel_gpu_utilization_percent",
                "GPU utilisation, from the heartbeat's last sample.",
                |g| g.utilization_percent,
            ),
            (
                "citadel_gpu_memory_used_bytes",
                "GPU memory in use, from the heartbeat's last sample.",
                |g| g.memory_used_mb.map(|m| (m as f64) * 1048576.0),
            ),
            (
                "citadel_gpu_memory_total_bytes",
                "GPU memory in all, from the heartbeat's last sample.",
                |g| g.memory_total_mb.map(|m| (m as f64) * 1048576.0),
            ),
            (
                "citadel_gpu_temperature_celsius",
                "GPU temperature, from the heartbeat's last sample.",
                |g| g.temperature_celsius,
            ),
            (
                "citadel_gpu_power_watts",
                "GPU power draw, from the heartbeat's last sample.",
                |g| g.power_watts,
            ),
        ];
        for (name, help, get) in gauges {
            header(out, name, "gauge", help);
            for g in &gpus {
                if let Some(v) = get(g) {
                    let _ = writeln!(
                        out,
                        "{name}{{gpu=\"{}\",name=\"{}\"}} {v}",
                        g.index,
                        escape(&g.name)
                    );
                }
            }
        }
    }
}

/// (metric name, help, the reading of one GPU).
type GpuGauge = (&'static str, &'static str, fn(&Gpu) -> Option<f64>);

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// How long ago a stream entry id (`<ms>-<seq>`) was made, by `now_ms`.
pub fn entry_age(id: &str, now_ms: u64) -> Option<Duration> {
    let ms: u64 = id.split('-').next()?.parse().ok()?;
    Some(Duration::from_millis(now_ms.saturating_sub(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn outcomes_and_histograms_are_counted_per_type() {
        let m = Metrics::new();
        m.job_started("echo", Some(Duration::from_millis(30)));
        m.job_finished(
            "echo",
            &Outcome::Success(Value::Null),
            Duration::from_millis(3),
            None,
        );
        m.job_started("llm_inference", None);
        m.job_finished(
            "llm_inference",
            &Outcome::Failed {
                reason: "r".into(),
                error: "e".into(),
            },
            Duration::from_secs(2),
            Some(Duration::from_millis(40)),
        );
        m.retried("llm_inference");
        m.dead_lettered("llm_inference");
        let text = m.render();
        for line in [
            "citadel_jobs_started_total{type=\"echo\"} 1",
            "citadel_jobs_completed_total{type=\"echo\"} 1",
            "citadel_jobs_failed_total{type=\"llm_inference\"} 1",
            "citadel_jobs_retried_total{type=\"llm_inference\"} 1",
            "citadel_jobs_dead_lettered_total{type=\"llm_inference\"} 1",
            "citadel_jobs_in_flight 0",
            "citadel_job_pickup_latency_seconds_bucket{type=\"echo\",le=\"0.025\"} 0",
            "citadel_job_pickup_latency_seconds_bucket{type=\"echo\",le=\"0.05\"} 1",
            "citadel_job_pickup_latency_seconds_count{type=\"llm_inference\"} 0",
            "citadel_job_duration_seconds_bucket{type=\"llm_inference\",le=\"+Inf\"} 1",
            "citadel_time_to_first_token_seconds_count{type=\"llm_inference\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(
            !text.contains("citadel_time_to_first_token_seconds_count{type=\"echo\"}"),
            "no first-token histogram for a type that streamed no token"
        );
    }

    #[test]
    fn job_types_beyond_the_cap_count_as_other() {
        let m = Metrics::new();
        for i in 0..MAX_JOB_TYPES + 5 {
            m.retried(&format!("t{i}"));
        }
        assert_eq!(lock(&m.types).len(), MAX_JOB_TYPES + 1);
        assert_eq!(lock(&m.types)["other"].retried, 5);
    }

    #[test]
    fn label_values_are_escaped_and_entry_ages_read_from_ids() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(entry_age("1000-3", 2500), Some(Duration::from_millis(1500)));
        assert_eq!(entry_age("bogus", 1), None);
    }
}
