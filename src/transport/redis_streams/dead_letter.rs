//! Dead letters (PROTOCOL.md §1): where they go and what they hold.

use super::entry::Entry;
use crate::clock;

/// `jobs:v1:gpu-general` → `dlq:v1:gpu-general`; a name without the prefix
/// keeps its whole name.
pub fn stream_for(queue: &str) -> String {
    format!("dlq:v1:{}", queue.strip_prefix("jobs:v1:").unwrap_or(queue))
}

/// The fields of a dead letter for `entry`, in the contract's order.
pub fn fields(
    entry: &Entry,
    reason: &str,
    error: &str,
    worker_id: &str,
) -> Vec<(&'static str, Vec<u8>)> {
    let mut f: Vec<(&'static str, Vec<u8>)> = vec![
        ("original_message_id", entry.id.clone().into_bytes()),
        ("original_queue", entry.stream.as_bytes().to_vec()),
        ("reason", reason.as_bytes().to_vec()),
        ("error", error.as_bytes().to_vec()),
        ("deliveries", entry.deliveries.to_string().into_bytes()),
        ("moved_at", clock::now_rfc3339().into_bytes()),
        ("worker_id", worker_id.as_bytes().to_vec()),
        (
            "jobId",
            entry.job_id.clone().unwrap_or_default().into_bytes(),
        ),
        ("type", entry.kind.clone().unwrap_or_default().into_bytes()),
    ];
    if let Some(at) = entry.field("enqueuedAt") {
        f.push(("enqueuedAt", at.to_vec()));
    }
    f.push((
        "payload",
        entry.field("payload").unwrap_or_default().to_vec(),
    ));
    if let Some(ray) = &entry.ray_id {
        f.push(("rayId", ray.clone().into_bytes()));
    }
    f
}

/// The fields a replay puts back on the original queue.
pub const REPLAYED_FIELDS: &[&str] = &["jobId", "type", "payload", "enqueuedAt", "rayId"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_stream_names() {
        assert_eq!(stream_for("jobs:v1:gpu-general"), "dlq:v1:gpu-general");
        assert_eq!(stream_for("jobs:v1:node:gpu-01"), "dlq:v1:node:gpu-01");
        assert_eq!(stream_for("custom"), "dlq:v1:custom");
    }
}
