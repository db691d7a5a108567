//! Stream entries: parsing Redis replies into entries, and an entry's fields
//! into a [`Job`] or the reason it is malformed. Pure functions over values.

use crate::handlers::Registry;
use crate::job::Job;
use crate::worker::cancel::{CancelReason, CancelToken};
use redis::Value;
use serde_json::Value as Json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// One entry as Redis returned it; `fields` is `None` when the entry was
/// deleted while it was still pending.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

/// An entry this worker holds (running, or on its way to be settled).
pub struct Entry {
    pub stream: Arc<str>,
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
    /// Redis's delivery count for this entry when it was read.
    pub deliveries: u64,
    pub job_id: Option<String>,
    pub kind: Option<String>,
    pub ray_id: Option<String>,
    pub token: Arc<CancelToken>,
    /// Set when another consumer turned out to own this entry (a lost
    /// lease): nothing more of it is published or settled here.
    pub lost: AtomicBool,
    /// The index of its next chunk event, when chunks are coalesced (the
    /// settle thread numbers them as it sends them).
    pub next_chunk: AtomicU64,
}

impl Entry {
    pub fn new(stream: Arc<str>, raw: RawEntry, deliveries: u64) -> Entry {
        let fields = raw.fields.unwrap_or_default();
        let text = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let (job_id, kind, ray_id) = (text("jobId"), text("type"), text("rayId"));
        Entry {
            stream,
            id: raw.id,
            fields,
            deliveries,
            job_id,
            kind,
            ray_id,
            token: Arc::new(CancelToken::new()),
            lost: AtomicBool::new(false),
            next_chunk: AtomicU64::new(0),
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Another consumer owns this entry now: stop its run here and publish
    /// or settle nothing more of it.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.token.cancel(CancelReason::LeaseLost);
    }

    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The job in this entry, or why it is malformed. Fills in `kind` and
    /// `ray_id` from the payload where the entry's own fields lack them.
    pub fn parse(&mut self, registry: &Registry, max_size: usize) -> Result<Job, String> {
        let size: usize = self.fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > max_size {
            return Err(format!(
                "entry is {size} bytes, over the max-job-size of {max_size} bytes"
            ));
        }
        let id = self.job_id.clone().ok_or("entry has no jobId field")?;
        let payload = self.field("payload").ok_or("entry has no payload field")?;
        let payload = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8 text")?;
        let payload = match serde_json::from_str::<Json>(payload) {
            Ok(Json::Object(m)) => m,
            Ok(other) => {
                return Err(format!(
                    "payload is not a JSON object (it is {})",
                    crate::job::json_kind(&other)
                ))
            }
            Err(e) => return Err(format!("payload is not valid JSON: {e}")),
        };
        let from_payload = |key: &str| payload.get(key).and_then(Json::as_str).map(str::to_owned);
        if self.kind.is_none() {
            self.kind = from_payload("type");
        }
        if self.ray_id.is_none() {
            self.ray_id = from_payload("rayId");
        }
        let kind = self
            .kind
            .clone()
            .ok_or("entry has no type (no type field, no payload.type)")?;
        if registry.find(&kind).is_none() {
            return Err(registry.unknown_type(&kind));
        }
        let job = Job {
            id,
            kind,
            payload,
            ray_id: self.ray_id.clone(),
        };
        job.timeout()?;
        Ok(job)
    }
}

/// XREADGROUP's reply: `[[stream, [[id, [k, v, …]], …]], …]`, or nil.
pub fn parse_read_reply(v: Value) -> Result<Vec<(String, Vec<RawEntry>)>, String> {
    let streams = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(a) => a,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        other => return Err(format!("unexpected XREADGROUP reply: {other:?}")),
    };
    streams
        .into_iter()
        .map(|s| match s {
            Value::Array(mut pair) if pair.len() == 2 => {
                let entries = parse_entries(pair.pop().unwrap_or(Value::Nil))?;
                let name = text(pair.pop().unwrap_or(Value::Nil))?;
                Ok((name, entries))
            }
            other => Err(format!("unexpected stream in XREADGROUP reply: {other:?}")),
        })
        .collect()
}

/// A list of entries, as in XRANGE or XAUTOCLAIM's second element.
pub fn parse_entries(v: Value) -> Result<Vec<RawEntry>, String> {
    let items = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(a) => a,
        other => return Err(format!("unexpected entry list: {other:?}")),
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Array(mut pair) if pair.len() == 2 => {
                let fields = pair.pop().unwrap_or(Value::Nil);
                let id = text(pair.pop().unwrap_or(Value::Nil))?;
                let fields = match fields {
                    Value::Nil => None,
                    Value::Array(kv) => Some(parse_fields(kv)?),
                    Value::Map(m) => Some(
                        m.into_iter()
                            .map(|(k, v)| Ok((text(k)?, bytes(v)?)))
                            .collect::<Result<_, String>>()?,
                    ),
                    other => return Err(format!("unexpected entry fields: {other:?}")),
                };
                Ok(RawEntry { id, fields })
            }
            other => Err(format!("unexpected entry: {other:?}")),
        })
        .collect()
}

/// The reply of the reader's checked read (`scripts::CHECKED_READ`): the
/// entries, then per entry whether its job's cancel key exists. One flag
/// per entry, or it is not this script's reply.
pub fn parse_checked_read(v: Value) -> Result<(Vec<RawEntry>, Vec<bool>), String> {
    let unexpected = |v: &dyn std::fmt::Debug| format!("unexpected checked-read reply: {v:?}");
    let Value::Array(mut parts) = v else {
        return Err(unexpected(&v));
    };
    if parts.len() != 2 {
        return Err(unexpected(&parts));
    }
    let flags = match parts.pop() {
        Some(Value::Array(flags)) => flags,
        other => return Err(unexpected(&other)),
    };
    let raws = parse_entries(parts.pop().unwrap_or(Value::Nil))?;
    let cancelled = flags
        .into_iter()
        .map(|f| match f {
            Value::Int(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        })
        .collect::<Result<Vec<bool>, String>>()?;
    if cancelled.len() != raws.len() {
        return Err(format!(
            "checked read returned {} entries and {} cancel flags",
            raws.len(),
            cancelled.len()
        ));
    }
    Ok((raws, cancelled))
}

fn parse_fields(kv: Vec<Value>) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::with_capacity(kv.len() / 2);
    let mut it = kv.into_iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or("odd number of entry fields")?;
        out.push((text(k)?, bytes(v)?));
    }
    Ok(out)
}

pub fn bytes(v: Value) -> Result<Vec<u8>, String> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

pub fn text(v: Value) -> Result<String, String> {
    bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(fields: &[(&str, &str)]) -> Entry {
        let raw = RawEntry {
            id: "1-0".into(),
            fields: Some(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
            ),
        };
        Entry::new("jobs:v1:q".into(), raw, 1)
    }

    #[test]
    fn checked_read_reply_pairs_each_entry_with_its_flag() {
        let e =
            |id: &str| Value::Array(vec![bulk(id), Value::Array(vec![bulk("jobId"), bulk(id)])]);
        let reply = Value::Array(vec![
            Value::Array(vec![e("1-0"), e("2-0")]),
            Value::Array(vec![Value::Int(0), Value::Int(1)]),
        ]);
        let (raws, cancelled) = parse_checked_read(reply).unwrap();
        assert_eq!(
            raws.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["1-0", "2-0"]
        );
        assert_eq!(cancelled, [false, true]);
        let empty = Value::Array(vec![Value::Array(vec![]), Value::Array(vec![])]);
        assert_eq!(parse_checked_read(empty).unwrap(), (vec![], vec![]));
    }

    #[test]
    fn a_garbled_checked_read_reply_is_an_error_not_a_partial_batch() {
        let e = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("jobId"), bulk("j")]),
        ]);
        for bad in [
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![Value::Array(vec![e.clone()])]),
            // One flag short: an entry would be taken with no cancel check.
            Value::Array(vec![
                Value::Array(vec![e.clone(), e.clone()]),
                Value::Array(vec![Value::Int(0)]),
            ]),
            Value::Array(vec![
                Value::Array(vec![e.clone()]),
                Value::Array(vec![bulk("yes")]),
            ]),
            Value::Array(vec![Value::Array(vec![e.clone()]), Value::Int(0)]),
            Value::Array(vec![Value::Int(7), Value::Array(vec![])]),
        ] {
            assert!(
                parse_checked_read(bad.clone()).is_err(),
                "{bad:?} was taken"
            );
        }
    }

    #[test]
    fn read_reply_with_a_deleted_entry() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("jobId"), bulk("j")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let parsed = parse_read_reply(reply).unwrap();
        assert_eq!(parsed[0].0, "s");
        assert_eq!(
            parsed[0].1[0].fields.as_ref().unwrap()[0],
            ("jobId".into(), b"j".to_vec())
        );
        assert_eq!(
            parsed[0].1[1],
            RawEntry {
                id: "2-0".into(),
                fields: None
            }
        );
        assert!(parse_read_reply(Value::Nil).unwrap().is_empty());
        assert!(parse_read_reply(Value::Int(3)).is_err());
        assert!(parse_entries(Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("k")])
        ])]))
        .is_err());
    }

    #[test]
    fn a_good_entry_becomes_a_job() {
        let reg = Registry::from_settings(&crate::config::Settings::default());
        let mut e = entry(&[
            ("jobId", "j1"),
            ("payload", r#"{"type":"echo","rayId":"r9","x":1}"#),
        ]);
        let job = e.parse(&reg, 1000).unwrap();
        assert_eq!((job.id.as_str(), job.kind.as_str()), ("j1", "echo"));
        assert_eq!(job.ray_id.as_deref(), Some("r9"));
        assert_eq!(job.payload["x"], 1);
    }

    #[test]
    fn each_kind_of_malformed_entry_says_why() {
        let reg = Registry::from_settings(&crate::config::Settings::default());
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("type", "echo"), ("payload", "{}")], "no jobId"),
            (&[("jobId", "j"), ("type", "echo")], "no payload"),
            (
                &[("jobId", "j"), ("type", "echo"), ("payload", "{nope")],
                "not valid JSON",
            ),
            (
                &[("jobId", "j"), ("type", "echo"), ("payload", "[1]")],
                "not a JSON object (it is an array)",
            ),
            (&[("jobId", "j"), ("payload", "{}")], "no type"),
            (
                &[("jobId", "j"), ("type", "teleport"), ("payload", "{}")],
                "no handler for job type 'teleport'",
            ),
            (
                &[
                    ("jobId", "j"),
                    ("type", "echo"),
                    ("payload", r#"{"timeout_ms":"x"}"#),
                ],
                "timeout_ms",
            ),
            (
                &[
                    ("jobId", "j"),
                    ("type", "echo"),
                    ("payload", &"x".repeat(2000)),
                ],
                "over the max-job-size",
            ),
        ];
        for (fields, want) in cases {
            let err = entry(fields).parse(&reg, 1024).unwrap_err();
            assert!(err.contains(want), "{fields:?}: {err}");
        }
    }
}
