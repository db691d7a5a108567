//! Dead letters as the tests judge them (PROTOCOL.md §1): the fields the
//! dead letter of a whole job entry carries, finding the dead letter of an
//! entry, and the one assertion of all its fields.
#![allow(dead_code)]

use super::observe::assert_rfc3339_ms;
use std::collections::{BTreeSet, HashMap};

/// Every field a dead letter carries when its entry had all of them.
pub const FIELDS: &[&str] = &[
    "original_message_id",
    "original_queue",
    "reason",
    "error",
    "deliveries",
    "moved_at",
    "worker_id",
    "jobId",
    "type",
    "enqueuedAt",
    "payload",
    "rayId",
];

/// The dead letter of entry `entry_id` among `letters` (a dead-letter
/// stream's XRANGE); panics with them all if there is none.
pub fn of_entry(
    letters: &[(String, HashMap<String, String>)],
    entry_id: &str,
) -> HashMap<String, String> {
    letters
        .iter()
        .find(|(_, f)| f.get("original_message_id").map(String::as_str) == Some(entry_id))
        .map(|(_, f)| f.clone())
        .unwrap_or_else(|| panic!("no dead letter for entry {entry_id} in {letters:?}"))
}

/// What the dead letter of a job entry that had every field must say.
pub struct Expected<'a> {
    /// The entry's id on its queue.
    pub entry_id: &'a str,
    pub queue: &'a str,
    pub reason: &'a str,
    /// Text the (non-empty) `error` must contain.
    pub error_has: &'a str,
    pub deliveries: &'a str,
    /// The consumer that moved it.
    pub worker: &'a str,
    pub job: &'a str,
    pub job_type: &'a str,
    /// Exactly as enqueued.
    pub payload: &'a str,
    pub enqueued_at: &'a str,
    pub ray: &'a str,
}

/// Checks that `dl` has exactly [`FIELDS`], each as `want` says, and a
/// `moved_at` in RFC 3339 UTC with milliseconds.
#[track_caller]
pub fn assert_whole(dl: &HashMap<String, String>, want: &Expected) {
    assert_eq!(
        dl.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        FIELDS.iter().copied().collect::<BTreeSet<_>>(),
        "dead letter fields: {dl:?}"
    );
    let field = |k: &str| dl[k].as_str();
    assert_eq!(field("original_message_id"), want.entry_id, "{dl:?}");
    assert_eq!(field("original_queue"), want.queue, "{dl:?}");
    assert_eq!(field("reason"), want.reason, "{dl:?}");
    assert!(!field("error").is_empty(), "empty error: {dl:?}");
    assert!(
        field("error").contains(want.error_has),
        "the error must say {:?}: {dl:?}",
        want.error_has
    );
    assert_eq!(field("deliveries"), want.deliveries, "{dl:?}");
    assert_rfc3339_ms("moved_at", field("moved_at"));
    assert_eq!(field("worker_id"), want.worker, "{dl:?}");
    assert_eq!(field("jobId"), want.job, "{dl:?}");
    assert_eq!(field("type"), want.job_type, "{dl:?}");
    assert_eq!(field("enqueuedAt"), want.enqueued_at, "{dl:?}");
    assert_eq!(
        field("payload"),
        want.payload,
        "payload must be unchanged: {dl:?}"
    );
    assert_eq!(field("rayId"), want.ray, "{dl:?}");
}
