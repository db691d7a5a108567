//! The pre-start cancel check of a batch of entries read together: one
//! `EXISTS` of all their cancel keys, and only when some exist one per key.
//! Among jobs read in one batch exactly the cancelled ones never start.
//! Against a real redis-server and the real `citadel work`.

mod support;

use std::time::Duration;
use support::observe::{has_ended, kinds, status};
use support::{wait_until, worker, xadd_job, RedisServer, Subscriber};

const QUEUE: &str = "jobs:v1:gpu-general";
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn of_jobs_read_together_only_the_cancelled_ones_never_start() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let jobs: Vec<String> = (0..24).map(|i| format!("pc-{i}")).collect();
    let cancelled = ["pc-2", "pc-9", "pc-10", "pc-23"];
    for job in cancelled {
        redis::cmd("SET")
            .arg(format!("job:cancelled:{job}"))
            .arg("1")
            .exec(&mut c)
            .unwrap();
    }
    for job in &jobs {
        xadd_job(&mut c, QUEUE, job, "echo", "{}");
    }
    // Pre-enqueued: the first read takes eight at once.
    let _w = worker(&redis, "pc-node", &["--concurrency", "8"]);
    for job in &jobs {
        let events = wait_until(&format!("job {job} to end"), WAIT, || {
            let events = sub.events_for(job);
            has_ended(&events).then_some(events)
        });
        if cancelled.contains(&job.as_str()) {
            assert_eq!(kinds(&events), ["cancelled"], "{job} must not start");
            assert_eq!(status(&mut c, job)["status"], "cancelled", "{job}");
        } else {
            assert_eq!(kinds(&events), ["claimed", "start", "end"], "{job}");
            assert_eq!(status(&mut c, job)["status"], "completed", "{job}");
        }
    }
}
