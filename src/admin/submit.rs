//! `citadel submit`: XADD a job; with `--follow`, subscribe to its events
//! first (Pub/Sub has no replay) and print chunks as they arrive.

use super::{connect, Exit};
use crate::cli::Submit;
use crate::config::Settings;
use crate::{backoff, clock, events};
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
        (Some(node), _) => format!("jobs:v1:node:{node}"),
        (None, Some(tag)) => crate::node::profile::tag_stream(tag),
        (None, None) => settings.queues[0].clone(),
    };
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

/// Subscribe, enqueue, then print events until the terminal one. If the
/// subscription drops, subscribe again and look at the status hash, so an end
/// missed meanwhile is not waited for forever.
fn follow(
    settings: &Settings,
    job_id: &str,
    enqueue: impl FnOnce() -> Result<(), Exit>,
) -> Result<i32, Exit> {
    let mut enqueue = Some(enqueue);
    let mut out = std::io::stdout();
    let mut at_line_start = true;
    loop {
        let mut conn = connect(settings)?;
        let mut pubsub = conn.as_pubsub();
        pubsub.set_read_timeout(Some(Duration::from_secs(1)))?;
        pubsub.subscribe(events::channel(job_id))?;
        match enqueue.take() {
            Some(enqueue) => enqueue()?,
            None => {
                if let Some(code) = settled_meanwhile(settings, job_id)? {
                    return Ok(code);
                }
            }
        }
        loop {
            let msg = match pubsub.get_message() {
                Ok(m) => m,
                Err(e) if e.is_timeout() => continue,
                Err(e) => {
                    eprintln!("citadel: lost the event subscription ({e}); reconnecting");
                    std::thread::sleep(Duration::from_millis(500));
                    break;
                }
            };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(ev) = serde_json::from_str::<Value>(&payload) else {
                continue;
            };
            let data = &ev["data"];
            match ev["type"].as_str().unwrap_or_default() {
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

fn settled_meanwhile(settings: &Settings, job_id: &str) -> Result<Option<i32>, Exit> {
    let mut conn = connect(settings)?;
    let status: Option<String> = redis::cmd("HGET")
        .arg(format!("job:{job_id}:status"))
        .arg("status")
        .query(&mut conn)?;
    Ok(match status.as_deref() {
        Some("completed") => {
            eprintln!(
                "citadel: job {job_id} completed while the subscription was down (result not seen)"
            );
            Some(0)
        }
        Some(s @ ("failed" | "cancelled")) => {
            eprintln!("citadel: job {job_id} {s} while the subscription was down");
            Some(1)
        }
        _ => None,
    })
}
