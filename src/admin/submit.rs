//! `citadel submit`: XADD a job; with `--follow`, print its events as they
//! arrive, read from its replayable stream (`events:v1:{jobId}`, through
//! [`crate::follow`]). `citadel follow` prints an existing job's events.

use super::{connect, Exit};
use crate::cli::Submit;
use crate::config::Settings;
use crate::follow::{Follower, Seam};
use crate::{backoff, clock};
use serde_json::Value;
use std::io::Write;
use std::time::Duration;

pub fn run(settings: &Settings, s: &Submit) -> Result<i32, Exit> {
    match serde_json::from_str::<Value>(&s.payload) {
        Ok(Value::Object(_)) => {}
        Ok(_) => return Err(Exit(2, "--payload must be a JSON object".into())),
        Err(e) => return Err(Exit(2, format!("--payload is not valid JSON: {e}"))),
    }
    let job_id = s.job_id.clone().unwrap_or_else(|| {
        format!(
            "job-{:x}-{:08x}",
            clock::now_millis(),
            backoff::random_u64() as u32
        )
    });
    let stream = match (&s.node, &s.tag) {
        (Some(node), _) => settings.node_stream_of(node),
        (None, Some(tag)) => crate::node::profile::tag_stream(tag, settings.on_cluster()),
        (None, None) => settings.queues[0].clone(),
    };
    // On a cluster no worker could read it: say so rather than wait.
    if let Some(why) = settings.cluster_stream_problem(&stream) {
        return Err(Exit(2, why));
    }
    let mut conn = connect(settings)?;
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&stream)
        .arg("*")
        .arg("jobId")
        .arg(&job_id)
        .arg("type")
        .arg(&s.kind)
        .arg("payload")
        .arg(&s.payload)
        .arg("enqueuedAt")
        .arg(clock::now_rfc3339());
    if let Some(ray) = &s.ray_id {
        xadd.arg("rayId").arg(ray);
    }
    let mut enqueue = || -> Result<(), Exit> {
        let entry: String = xadd.query(&mut conn)?;
        log::debug!("enqueued {job_id} on {stream} as {entry}");
        Ok(())
    };
    if !s.follow {
        enqueue()?;
        println!("{job_id}");
        return Ok(0);
    }
    follow(settings, &job_id, enqueue)
}

/// Enqueue, then print the job's events from the first one on (its
/// replayable stream: nothing is missed however late the reading starts).
fn follow(
    settings: &Settings,
    job_id: &str,
    enqueue: impl FnOnce() -> Result<(), Exit>,
) -> Result<i32, Exit> {
    enqueue()?;
    print_events(settings, job_id, "0")
}

/// `citadel follow JOB [--from ID]`: print a job's events after entry `from`.
pub fn follow_existing(settings: &Settings, job_id: &str, from: &str) -> Result<i32, Exit> {
    print_events(settings, job_id, from)
}

/// Print events until the terminal one: chunks as they come, the result at
/// the end. A lost connection is opened again and reading goes on after the
/// last entry seen. When the stream stays quiet and the status hash says the
/// job settled (workers with `--events-stream=false` write no stream), that
/// is reported instead of waiting forever.
fn print_events(settings: &Settings, job_id: &str, from: &str) -> Result<i32, Exit> {
    let mut follower = Follower::new(&settings.redis_url, settings.redis_timeout, job_id, from);
    let mut out = std::io::stdout();
    let mut at_line_start = true;
    let mut retry = backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut down = false;
    let mut seam = Seam::default();
    // Settled per the status hash: the next read is the last one.
    let mut settled: Option<(i32, String)> = None;
    loop {
        let block = match settled {
            Some(_) => Duration::from_millis(1),
            None => Duration::from_secs(1),
        };
        let events = match follower.next(block) {
            Ok(e) => e,
            Err(e) => {
                if !down {
                    eprintln!(
                        "citadel: lost Redis while following {job_id} ({e}); reconnecting, \
                         going on after entry {}",
                        follower.last_id()
                    );
                }
                down = true;
                std::thread::sleep(retry.next_delay());
                continue;
            }
        };
        if down {
            eprintln!("citadel: Redis is back; following {job_id} again");
            down = false;
        }
        retry.reset();
        if events.is_empty() {
            if let Some((code, why)) = settled {
                eprintln!("{why}");
                return Ok(code);
            }
            // The settle writes the stream and the status together: one
            // more read finds the terminal event if it is there.
            settled = settled_meanwhile(settings, job_id)?;
            continue;
        }
        for read in events {
            let data = &read.event["data"];
            match read.kind() {
                _ if !seam.keep(&read) => {}
                "chunk" => {
                    let text = data["content"].as_str().unwrap_or_default();
                    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
                    at_line_start = text.ends_with('\n');
                }
                "end" => {
                    let nl = if at_line_start { "" } else { "\n" };
                    let _ = writeln!(out, "{nl}{}", data["result"]);
                    return Ok(0);
                }
                "error" => {
                    eprintln!(
                        "citadel: job {job_id} failed: {}",
                        data["error"].as_str().unwrap_or("?")
                    );
                    return Ok(1);
                }
                "cancelled" => {
                    eprintln!(
                        "citadel: job {job_id} was cancelled: {}",
                        data["reason"].as_str().unwrap_or("?")
                    );
                    return Ok(1);
                }
                _ => {}
            }
        }
    }
}

/// A job its status hash says settled: its exit code and what to say when
/// its terminal event is not in the stream; `None` while it has not.
fn settled_meanwhile(settings: &Settings, job_id: &str) -> Result<Option<(i32, String)>, Exit> {
    let mut conn = match connect(settings) {
        Ok(c) => c,
        // Unreachable: the follower says so on its next read.
        Err(_) => return Ok(None),
    };
    let status: Option<String> = redis::cmd("HGET")
        .arg(format!("job:{job_id}:status"))
        .arg("status")
        .query(&mut conn)
        .unwrap_or(None);
    Ok(match status.as_deref() {
        Some("completed") => Some((
            0,
            format!(
                "citadel: job {job_id} completed, but its events stream has no end event \
                 (workers with --events-stream=false, or it expired): result not seen"
            ),
        )),
        Some(s @ ("failed" | "cancelled")) => Some((
            1,
            format!("citadel: job {job_id} {s} (its events stream has no terminal event)"),
        )),
        _ => None,
    })
}
