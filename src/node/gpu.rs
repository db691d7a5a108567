//! GPU telemetry for the heartbeat. The source is decided here, once at
//! start ([`GpuSource::detect`], one log line saying which and why):
//! NVML when this binary is built with the `nvml` feature (the default,
//! glibc builds) and `libnvidia-ml.so` loads; else `nvidia-smi` when it is
//! on PATH (always the case for the static musl release builds, which are
//! built without the feature: a static binary cannot dlopen); else none (an
//! empty list, not an error). `--gpu-telemetry nvidia-smi` skips NVML.
//!
//! `nvidia-smi` runs with a bounded time: one that does not answer within
//! `gpu-query-timeout` is killed (its whole process group), logged once, and
//! the last known GPUs are reported meanwhile. The parser is pure.

use crate::worker::stop::StopFlag;
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The fields asked of nvidia-smi, in the order [`parse_nvidia_smi`] reads them.
pub const QUERY: &str = "index,name,uuid,memory.used,memory.total,utilization.gpu,\
                         temperature.gpu,power.draw,driver_version";

/// One GPU as the heartbeat reports it; a field the driver does not report
/// (`[N/A]`, `[Not Supported]`) is null.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub memory_used_mb: Option<u64>,
    pub memory_total_mb: Option<u64>,
    pub utilization_percent: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub driver: Option<String>,
}

/// The output of `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits`:
/// one GPU per line. A line that is not such a record (a warning, garbage,
/// a missing index) is skipped.
pub fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Gpu> {
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() != 9 {
        return None;
    }
    let text = |s: &str| (!unknown(s)).then(|| s.to_owned());
    let int = |s: &str| {
        text(s)
            .and_then(|s| s.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    let num = |s: &str| text(s).and_then(|s| s.parse::<f64>().ok());
    Some(Gpu {
        index: f[0].parse().ok()?,
        name: text(f[1])?,
        uuid: text(f[2]),
        memory_used_mb: int(f[3]),
        memory_total_mb: int(f[4]),
        utilization_percent: num(f[5]),
        temperature_celsius: num(f[6]),
        power_watts: num(f[7]),
        driver: text(f[8]),
    })
}

/// `[N/A]`, `[Not Supported]`, `N/A`, `[Unknown Error]`, empty.
fn unknown(s: &str) -> bool {
    s.is_empty() || s.starts_with('[') || s.eq_ignore_ascii_case("n/a")
}

/// Where GPU facts come from, decided once.
pub enum GpuSource {
    #[cfg(feature = "nvml")]
    Nvml(super::nvml::NvmlSampler),
    NvidiaSmi(PathBuf),
    None,
}

impl GpuSource {
    /// NVML (unless `telemetry` is `nvidia-smi`), else `nvidia-smi` on
    /// PATH, else none; logs the choice and why NVML is not used.
    pub fn detect(telemetry: &str, timeout: Duration) -> GpuSource {
        let why_not_nvml = match telemetry {
            "nvidia-smi" => "NVML not tried: --gpu-telemetry nvidia-smi".to_owned(),
            _ => match nvml(timeout) {
                Ok(source) => return source,
                Err(e) => e,
            },
        };
        match find_on_path("nvidia-smi") {
            Some(path) => {
                log::info!(
                    "GPU telemetry: {} (nvidia-smi; {why_not_nvml})",
                    path.display()
                );
                GpuSource::NvidiaSmi(path)
            }
            None => {
                log::info!(
                    "GPU telemetry: none (no nvidia-smi on PATH; {why_not_nvml}); heartbeats list no GPUs"
                );
                GpuSource::None
            }
        }
    }
}

#[cfg(feature = "nvml")]
fn nvml(timeout: Duration) -> Result<GpuSource, String> {
    let sampler = super::nvml::NvmlSampler::start(timeout)?;
    log::info!("GPU telemetry: NVML ({})", sampler.description);
    Ok(GpuSource::Nvml(sampler))
}

#[cfg(not(feature = "nvml"))]
fn nvml(_: Duration) -> Result<GpuSource, String> {
    Err("NVML not built in (this binary has no `nvml` feature)".into())
}

/// Whether this node has NVIDIA GPUs (for `--gpus all` on service
/// containers): `nvidia-smi` on PATH lists at least one within `timeout`.
/// No nvidia-smi: `Some(false)`; a failing or hung one: `None` (unknown).
pub fn nvidia_gpus_present(timeout: Duration) -> Option<bool> {
    let Some(path) = find_on_path("nvidia-smi") else {
        return Some(false);
    };
    match run_nvidia_smi(&path, timeout, &StopFlag::default()) {
        Ok(gpus) => Some(!gpus.is_empty()),
        Err(e) => {
            log::warn!("services: cannot tell whether this node has GPUs: {e}");
            None
        }
    }
}

/// The GPUs now, for `citadel status`: `Ok(None)` without nvidia-smi on
/// PATH, else what it reports within `timeout` (killed past it). Logs
/// nothing.
pub fn query(timeout: Duration) -> Result<Option<Vec<Gpu>>, String> {
    match find_on_path("nvidia-smi") {
        None => Ok(None),
        Some(path) => run_nvidia_smi(&path, timeout, &StopFlag::default()).map(Some),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Reads the GPUs for each heartbeat, keeping the last answer for when the
/// source fails.
pub struct GpuReader {
    source: GpuSource,
    timeout: Duration,
    last: Vec<Gpu>,
    failing: bool,
}

impl GpuReader {
    pub fn new(source: GpuSource, timeout: Duration) -> Self {
        GpuReader {
            source,
            timeout,
            last: Vec::new(),
            failing: false,
        }
    }

    /// The GPUs now; on a failure of the source, the last known ones (the
    /// first failure of a run of them is logged as a warning).
    /// A `stop` ends a run of nvidia-smi at once (it is killed).
    pub fn read(&mut self, stop: &StopFlag) -> Vec<Gpu> {
        let (result, what) = match &mut self.source {
            GpuSource::None => return Vec::new(),
            #[cfg(feature = "nvml")]
            GpuSource::Nvml(sampler) => (sampler.read(self.timeout), "NVML"),
            GpuSource::NvidiaSmi(path) => (run_nvidia_smi(path, self.timeout, stop), "nvidia-smi"),
        };
        if stop.is_set() {
            return self.last.clone();
        }
        match result {
            Ok(gpus) => {
                if std::mem::take(&mut self.failing) {
                    log::info!("GPU telemetry: {what} answers again");
                }
                self.last = gpus;
            }
            Err(e) if !self.failing => {
                self.failing = true;
                log::warn!("GPU telemetry: {e}; reporting the last known GPUs until it answers");
            }
            Err(e) => log::debug!("GPU telemetry: still failing: {e}"),
        }
        self.last.clone()
    }
}

/// Run nvidia-smi, killing it (and whatever it started) past `timeout` or
/// at a `stop`.
fn run_nvidia_smi(path: &Path, timeout: Duration, stop: &StopFlag) -> Result<Vec<Gpu>, String> {
    let mut cmd = Command::new(path);
    cmd.arg(format!("--query-gpu={QUERY}"))
        .arg("--format=csv,noheader,nounits")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // The child dies with the heartbeat thread (the agent): a hung
    // nvidia-smi never outlives it.
    let mut child =
        crate::child::spawn(&mut cmd).map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let Some(status) = crate::child::wait(&mut child, Instant::now() + timeout, Some(stop)) else {
        return Err(format!(
            "nvidia-smi did not answer within {} and was killed",
            crate::config::format_duration(timeout)
        ));
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        // The output of a few GPUs fits in the pipe; a child of nvidia-smi
        // still holding the pipe is not waited for beyond its exit.
        let _ = stdout.read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!("nvidia-smi failed ({status})"));
    }
    Ok(parse_nvidia_smi(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "0, NVIDIA H200, GPU-3f1c2a9e-77aa-4b1e-9c55-0d1e2f3a4b5c, 1024, 143771, 37, 41, 118.52, 580.65.06\n";

    #[test]
    fn one_gpu_has_every_field() {
        let gpus = parse_nvidia_smi(ONE);
        assert_eq!(
            gpus,
            [Gpu {
                index: 0,
                name: "NVIDIA H200".into(),
                uuid: Some("GPU-3f1c2a9e-77aa-4b1e-9c55-0d1e2f3a4b5c".into()),
                memory_used_mb: Some(1024),
                memory_total_mb: Some(143771),
                utilization_percent: Some(37.0),
                temperature_celsius: Some(41.0),
                power_watts: Some(118.52),
                driver: Some("580.65.06".into()),
            }]
        );
    }

    #[test]
    fn eight_gpus_keep_their_order() {
        let text: String = (0..8)
            .map(|i| {
                format!(
                    "{i}, NVIDIA A100-SXM4-80GB, GPU-{i:08}, {}, 81920, {}, 30, 65.1, 550.54.15\n",
                    i * 100,
                    i * 10
                )
            })
            .collect();
        let gpus = parse_nvidia_smi(&text);
        assert_eq!(gpus.len(), 8);
        for (i, g) in gpus.iter().enumerate() {
            assert_eq!(g.index, i as u32);
            assert_eq!(g.memory_used_mb, Some(i as u64 * 100));
            assert_eq!(g.utilization_percent, Some(i as f64 * 10.0));
            assert_eq!(g.memory_total_mb, Some(81920));
        }
    }

    #[test]
    fn not_available_fields_become_null() {
        let text = "0, Tesla T4, GPU-1, [N/A], 15360, [Not Supported], 38, [N/A], 535.0\n\
                    1, Tesla T4, [N/A], 1, 2, 3, 4, 5, [Not Supported]\n";
        let gpus = parse_nvidia_smi(text);
        assert_eq!(
            (gpus[1].uuid.as_deref(), gpus[1].driver.as_deref()),
            (None, None)
        );
        let g = &gpus[0];
        assert_eq!(g.memory_used_mb, None);
        assert_eq!(g.memory_total_mb, Some(15360));
        assert_eq!(g.utilization_percent, None);
        assert_eq!(g.temperature_celsius, Some(38.0));
        assert_eq!(g.power_watts, None);
        let json = serde_json::to_value(g).unwrap();
        assert!(json["power_watts"].is_null() && json["memory_used_mb"].is_null());
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let text = format!(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n\n\
             x, name, uuid, 1, 2, 3, 4, 5, 6\n1, 2, 3\n{ONE}0, , GPU-2, 1, 2, 3, 4, 5, 6\n"
        );
        let gpus = parse_nvidia_smi(&text);
        assert_eq!(gpus.len(), 1, "{gpus:?}");
        assert_eq!(gpus[0].name, "NVIDIA H200");
        assert!(parse_nvidia_smi("").is_empty());
    }
}
