//! The metrics sampler: a thread that, every [`SAMPLE_EVERY`], asks Redis
//! for this consumer's pending entries (count and oldest age) on every
//! stream it reads and for the length of each dead-letter stream, and
//! stores them for `/metrics`. A scrape never waits for Redis; a Redis that
//! does not answer only leaves the last sample in place (logged at debug:
//! the reader and settle threads already report outages).
//!
//! Own connection, bounded timeouts; shares nothing with the job path. It
//! runs only while the metrics listener is on (nobody else reads it).

use super::alive::Beat;
use super::metrics::{entry_age, StreamSample, METRICS};
use crate::config::{Mode, Settings};
use crate::node::profile::LiveProfile;
use crate::redis_conn;
use crate::redis_conn::Conn;
use crate::transport::redis_streams::dead_letter;
use crate::worker::stop::StopFlag;
use redis::{RedisResult, Value};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An idle worker costs Redis two commands per stream per sample (XPENDING,
/// XLEN of its dead-letter stream; a third, XPENDING of the oldest entry,
/// only while entries are pending).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

pub struct Sampler {
    stop: Arc<StopFlag>,
    thread: JoinHandle<()>,
}

/// Whether this configuration reads Redis Streams at all.
fn reads_redis(s: &Settings) -> bool {
    match s.mode {
        Mode::Redis => true,
        Mode::Nexus => false,
        Mode::Auto => s.redis_url_set || s.nexus_url.is_none(),
    }
}

impl Sampler {
    pub fn start(settings: &Settings, profile: Arc<LiveProfile>) -> Option<Sampler> {
        if !reads_redis(settings) {
            return None;
        }
        let settings = settings.clone();
        let stop = Arc::new(StopFlag::default());
        let thread = std::thread::Builder::new()
            .name("metrics-sampler".into())
            .spawn({
                let stop = stop.clone();
                move || run(&settings, &profile, &stop)
            })
            .expect("spawn sampler thread");
        Some(Sampler { stop, thread })
    }

    /// Stop sampling; waits until `deadline` at most.
    pub fn stop(self, deadline: Instant) {
        self.stop.set();
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn run(settings: &Settings, profile: &LiveProfile, stop: &StopFlag) {
    let beat = Beat::new(
        "metrics-sampler",
        SAMPLE_EVERY + settings.redis_timeout * 4 + Duration::from_secs(30),
    );
    let mut conn: Option<Conn> = None;
    loop {
        beat.tick();
        let mut streams = settings.streams();
        for t in profile.now().tag_streams.iter() {
            if !streams.iter().any(|s| **s == **t) {
                streams.push(t.to_string());
            }
        }
        let result = match conn.as_mut() {
            Some(c) => sample(c, settings, &streams),
            None => {
                let t = settings.redis_timeout;
                redis_conn::connect(&settings.redis_url, t, t).and_then(|mut c| {
                    let r = sample(&mut c, settings, &streams);
                    conn = Some(c);
                    r
                })
            }
        };
        match result {
            Ok((pending, dlq)) => METRICS.set_streams(pending, dlq),
            Err(e) => {
                log::debug!("metrics sampler: {e}");
                conn = None;
            }
        }
        if stop.sleep(SAMPLE_EVERY) {
            return;
        }
    }
}

type Sample = (Vec<StreamSample>, Vec<(String, u64)>);

fn sample(conn: &mut Conn, s: &Settings, streams: &[String]) -> RedisResult<Sample> {
    let now = crate::clock::now_millis();
    let mut out = Vec::with_capacity(streams.len());
    let mut dlq = Vec::with_capacity(streams.len());
    for stream in streams {
        let (pending, oldest) = consumer_pending(conn, stream, &s.group, s.consumer())?;
        out.push(StreamSample {
            stream: stream.clone(),
            pending,
            oldest_pending_seconds: oldest
                .and_then(|id| entry_age(&id, now))
                .map_or(0.0, |d| d.as_secs_f64()),
        });
        let name = dead_letter::stream_for(stream);
        let len: u64 = redis::cmd("XLEN").arg(&name).query(conn)?;
        dlq.push((name, len));
    }
    Ok((out, dlq))
}

/// This consumer's pending count on `stream` and its oldest pending id
/// (`XPENDING stream group - + 1 consumer` gives the oldest first; the
/// summary form gives the per-consumer counts). No group yet: nothing.
pub fn consumer_pending(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
) -> RedisResult<(u64, Option<String>)> {
    let summary: RedisResult<Value> = redis::cmd("XPENDING").arg(stream).arg(group).query(conn);
    let summary = match summary {
        Ok(v) => v,
        Err(e) if e.code() == Some("NOGROUP") => return Ok((0, None)),
        Err(e) => return Err(e),
    };
    let mut count = 0;
    if let Value::Array(parts) = &summary {
        if let Some(Value::Array(consumers)) = parts.get(3) {
            for c in consumers {
                if let Value::Array(pair) = c {
                    if let (Some(name), Some(n)) = (pair.first(), pair.get(1)) {
                        if text(name).as_deref() == Some(consumer) {
                            count = text(n).and_then(|n| n.parse().ok()).unwrap_or(0);
                        }
                    }
                }
            }
        }
    }
    if count == 0 {
        return Ok((0, None));
    }
    let rows: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1)
        .arg(consumer)
        .query(conn)?;
    Ok((count, first_pending_id(&rows)))
}

/// The id of the first row of an `XPENDING … - + 1` reply.
pub fn first_pending_id(reply: &Value) -> Option<String> {
    match reply {
        Value::Array(rows) => rows.first().and_then(|r| match r {
            Value::Array(cols) => cols.first().and_then(text),
            _ => None,
        }),
        _ => None,
    }
}

/// A bulk or simple string, or an integer, as text.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}
