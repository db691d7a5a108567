//! Host facts for the heartbeat, read from `/proc` and `statvfs(3)`: CPU
//! (cores, load, busy share since the last reading), memory and the disk
//! that holds the state directory. Parsers are pure; a fact that cannot be
//! read is null, never an error.

use serde_json::{json, Value};
use std::path::Path;

/// Keeps the previous `/proc/stat` totals so that CPU use covers the time
/// between two heartbeats.
#[derive(Default)]
pub struct HostReader {
    last_cpu: Option<CpuTimes>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

impl HostReader {
    /// `{cpu, memory, disk, host_uptime_seconds}` of this machine; the disk
    /// is the one holding `disk_path`.
    pub fn read(&mut self, disk_path: &Path) -> Value {
        let now = read("/proc/stat").and_then(|t| parse_stat(&t));
        let usage = match (self.last_cpu, now) {
            (Some(a), Some(b)) => usage_percent(a, b),
            _ => None,
        };
        if now.is_some() {
            self.last_cpu = now;
        }
        let load = read("/proc/loadavg").and_then(|t| parse_loadavg(&t));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mem = read("/proc/meminfo").map(|t| parse_meminfo(&t));
        let host_uptime = read("/proc/uptime").and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|s| s.parse::<f64>().ok())
                .map(|s| s as u64)
        });
        json!({
            "cpu": {
                "cores": cores,
                "usage_percent": usage,
                "load_1m": load.map(|l| l[0]),
                "load_5m": load.map(|l| l[1]),
                "load_15m": load.map(|l| l[2]),
            },
            "memory": mem.unwrap_or_else(|| json!({
                "total_mb": null, "available_mb": null, "used_mb": null
            })),
            "disk": disk(disk_path),
            "host_uptime_seconds": host_uptime,
        })
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The `cpu` line of `/proc/stat`: busy (all but idle and iowait) and total jiffies.
pub fn parse_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map_while(|s| s.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is within user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

fn usage_percent(a: CpuTimes, b: CpuTimes) -> Option<f64> {
    let total = b.total.checked_sub(a.total)?;
    let busy = b.busy.checked_sub(a.busy)?;
    (total > 0).then(|| (busy as f64 * 1000.0 / total as f64).round() / 10.0)
}

pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// `{total_mb, available_mb, used_mb}` from `/proc/meminfo` (kB values).
pub fn parse_meminfo(text: &str) -> Value {
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    let total = kb("MemTotal").map(|k| k / 1024);
    let available = kb("MemAvailable").map(|k| k / 1024);
    let used = match (total, available) {
        (Some(t), Some(a)) => Some(t.saturating_sub(a)),
        _ => None,
    };
    json!({"total_mb": total, "available_mb": available, "used_mb": used})
}

/// `{path, total_mb, available_mb, used_mb}` of the filesystem holding
/// `path` (or its nearest existing parent).
fn disk(path: &Path) -> Value {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let stats = statvfs(existing);
    let mb = |blocks: u64, frsize: u64| blocks.saturating_mul(frsize) / (1 << 20);
    let (total, avail, used) = match stats {
        Some(st) => {
            #[allow(clippy::unnecessary_cast)] // the field types differ between libcs
            let (f, blocks, free, avail) = (
                st.f_frsize as u64,
                st.f_blocks as u64,
                st.f_bfree as u64,
                st.f_bavail as u64,
            );
            (
                Some(mb(blocks, f)),
                Some(mb(avail, f)),
                Some(mb(blocks.saturating_sub(free), f)),
            )
        }
        None => (None, None, None),
    };
    json!({
        "path": existing.display().to_string(),
        "total_mb": total,
        "available_mb": avail,
        "used_mb": used,
    })
}

fn statvfs(path: &Path) -> Option<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then_some(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_use_is_the_busy_share_between_two_readings() {
        let a = parse_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_stat("cpu  200 0 200 800 100 0 0 0 0 0\n").unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 200,
                total: 1000
            }
        );
        assert_eq!(usage_percent(a, b), Some(66.7));
        assert_eq!(usage_percent(b, a), None, "counters that went back");
        assert_eq!(parse_stat("intr 1 2"), None);
    }

    #[test]
    fn load_and_memory_parse_from_proc() {
        assert_eq!(
            parse_loadavg("0.50 1.25 2.00 3/456 7890\n"),
            Some([0.5, 1.25, 2.0])
        );
        assert_eq!(parse_loadavg("garbage"), None);
        let mem = parse_meminfo(
            "MemTotal:       16384000 kB\nMemFree: 1 kB\nMemAvailable:    8192000 kB\n",
        );
        assert_eq!(
            mem,
            json!({"total_mb": 16000, "available_mb": 8000, "used_mb": 8000})
        );
        assert!(parse_meminfo("")["total_mb"].is_null());
    }

    #[test]
    fn this_machine_reports_memory_and_disk() {
        let facts = HostReader::default().read(Path::new("/nonexistent/dir"));
        assert!(facts["memory"]["total_mb"].as_u64().unwrap() > 0, "{facts}");
        assert_eq!(facts["disk"]["path"], "/");
        assert!(facts["disk"]["total_mb"].as_u64().unwrap() > 0, "{facts}");
        assert!(facts["cpu"]["cores"].as_u64().unwrap() >= 1);
    }
}
