//! `citadel dlq`: look at, replay and purge dead letters.

use super::{connect, Exit};
use crate::cli::Dlq;
use crate::config::Settings;
use crate::redis_conn::Conn;
use crate::transport::redis_streams::dead_letter::{self, REPLAYED_FIELDS};
use crate::transport::redis_streams::entry::{parse_entries, RawEntry};

pub fn run(settings: &Settings, cmd: &Dlq) -> Result<i32, Exit> {
    let mut conn = connect(settings)?;
    let mut queues = settings.streams();
    // The tag streams of the stored device config, which the worker reads too.
    let file = settings.state_dir.join(crate::node::profile::FILE);
    if let Ok(Some(config)) = crate::node::profile::load_file(&file) {
        if settings.tag_streams {
            queues.extend(
                config
                    .custom_tags
                    .iter()
                    .map(|t| crate::node::profile::tag_stream(t, settings.on_cluster())),
            );
        }
    }
    let streams: Vec<String> = queues.iter().map(|q| dead_letter::stream_for(q)).collect();
    match cmd {
        Dlq::List { count } => {
            for s in &streams {
                let len: usize = redis::cmd("XLEN").arg(s).query(&mut conn)?;
                println!("{s}: {len} dead letter{}", if len == 1 { "" } else { "s" });
                let newest = range(&mut conn, "XREVRANGE", s, "+", "-", *count)?;
                for e in newest {
                    let f = |k: &str| field(&e, k);
                    println!(
                        "  {}  {}  job={} type={} deliveries={}  {}: {}",
                        e.id,
                        f("moved_at"),
                        f("jobId"),
                        f("type"),
                        f("deliveries"),
                        f("reason"),
                        crate::clip::clip(&f("error"), 100)
                    );
                }
            }
            Ok(0)
        }
        Dlq::Show(id) => {
            let (_, e) = find(&mut conn, &streams, id)?;
            for (k, v) in e.fields.unwrap_or_default() {
                let v = String::from_utf8_lossy(&v).into_owned();
                let pretty = (k == "payload")
                    .then(|| serde_json::from_str::<serde_json::Value>(&v).ok())
                    .flatten()
                    .and_then(|j| serde_json::to_string_pretty(&j).ok());
                println!("{k}: {}", pretty.unwrap_or(v));
            }
            Ok(0)
        }
        Dlq::Replay(Some(id)) => {
            let (stream, e) = find(&mut conn, &streams, id)?;
            replay(&mut conn, &stream, &e)?;
            Ok(0)
        }
        Dlq::Replay(None) => {
            let mut n = 0;
            for s in &streams {
                // Only the dead letters there now: a replayed job that fails
                // again while this runs is not replayed a second time.
                let Some(last) = range(&mut conn, "XREVRANGE", s, "+", "-", 1)?.pop() else {
                    continue;
                };
                loop {
                    let batch = range(&mut conn, "XRANGE", s, "-", &last.id, 100)?;
                    if batch.is_empty() {
                        break;
                    }
                    for e in &batch {
                        replay(&mut conn, s, e)?;
                        n += 1;
                    }
                }
            }
            println!("replayed {n} dead letters");
            Ok(0)
        }
        Dlq::Purge => {
            let mut n = 0usize;
            for s in &streams {
                n += redis::cmd("XLEN").arg(s).query::<usize>(&mut conn)?;
                redis::cmd("DEL").arg(s).exec(&mut conn)?;
            }
            println!("purged {n} dead letters");
            Ok(0)
        }
    }
}

/// KEYS: the queue, the dead-letter stream. ARGV: the dead letter's id,
/// then the fields to add.
const REPLAY: &str = r"
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[2], ARGV[1])
return id
";

/// Put the job back on its original queue and delete the dead letter, in
/// one script so it is never both or neither (on a cluster the queue and
/// its dead letters share a slot, so the script runs on one node).
fn replay(conn: &mut Conn, dlq: &str, e: &RawEntry) -> Result<(), Exit> {
    let queue = field(e, "original_queue");
    if queue.is_empty() {
        return Err(Exit(
            1,
            format!("dead letter {} has no original_queue; not replayed", e.id),
        ));
    }
    let mut script = redis::cmd("EVAL");
    script.arg(REPLAY).arg(2).arg(&queue).arg(dlq).arg(&e.id);
    for (k, v) in e.fields.iter().flatten() {
        if REPLAYED_FIELDS.contains(&k.as_str()) && !(v.is_empty() && k != "payload") {
            script.arg(k).arg(v);
        }
    }
    let new_id: String = script.query(conn)?;
    println!(
        "replayed {} (job {}) to {queue} as {new_id}",
        e.id,
        field(e, "jobId")
    );
    Ok(())
}

fn find(conn: &mut Conn, streams: &[String], id: &str) -> Result<(String, RawEntry), Exit> {
    for s in streams {
        let found = range(conn, "XRANGE", s, id, id, 1).map_err(|e| match e {
            Exit(_, m) if m.contains("Invalid stream ID") => {
                Exit(2, format!("'{id}' is not a stream entry ID"))
            }
            other => other,
        })?;
        if let Some(e) = found.into_iter().next() {
            return Ok((s.clone(), e));
        }
    }
    Err(Exit(
        1,
        format!("no dead letter {id} in {}", streams.join(", ")),
    ))
}

fn range(
    conn: &mut Conn,
    cmd: &str,
    s: &str,
    from: &str,
    to: &str,
    count: usize,
) -> Result<Vec<RawEntry>, Exit> {
    let v = redis::cmd(cmd)
        .arg(s)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(count)
        .query(conn)?;
    parse_entries(v).map_err(|e| Exit(1, e))
}

fn field(e: &RawEntry, name: &str) -> String {
    e.fields
        .iter()
        .flatten()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}
