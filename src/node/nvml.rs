//! GPU telemetry through NVML (`nvml-wrapper`, cargo feature `nvml`, on by
//! default; the static musl release builds leave it out, since a static
//! binary cannot dlopen `libnvidia-ml.so`). The library is loaded and every
//! NVML call made on one thread of its own ("nvml"): a driver call that
//! hangs can stall only that thread, and the heartbeat waits for an answer
//! at most `gpu-query-timeout` (then reports the last known GPUs, as with a
//! hung nvidia-smi). Loading fails cleanly where there is no driver library
//! (this is when `gpu.rs` falls back to nvidia-smi).

use super::gpu::Gpu;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use std::time::Duration;

/// The NVML thread, asked for a sample at a time.
pub struct NvmlSampler {
    ask: Sender<()>,
    answers: Receiver<Vec<Gpu>>,
    /// A request is out whose answer has not come yet.
    waiting: bool,
    /// `driver 580.65.06, 8 GPUs`, for the start-up log line.
    pub description: String,
}

impl NvmlSampler {
    /// Load NVML (within `timeout`); the error says why it is not used.
    pub fn start(timeout: Duration) -> Result<NvmlSampler, String> {
        let (ask, asked) = crossbeam_channel::bounded::<()>(1);
        let (answer, answers) = crossbeam_channel::bounded::<Vec<Gpu>>(1);
        let (ready_tx, ready) = crossbeam_channel::bounded::<Result<String, String>>(1);
        std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || {
                let nvml = match Nvml::init() {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("NVML did not load: {e}")));
                        return;
                    }
                };
                let driver = nvml.sys_driver_version().ok();
                let count = nvml.device_count().unwrap_or(0);
                let _ = ready_tx.send(Ok(format!(
                    "driver {}, {count} GPUs",
                    driver.as_deref().unwrap_or("unknown")
                )));
                for () in asked {
                    if answer.send(sample(&nvml, driver.as_deref())).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start the NVML thread: {e}"))?;
        match ready.recv_timeout(timeout) {
            Ok(Ok(description)) => Ok(NvmlSampler {
                ask,
                answers,
                waiting: false,
                description,
            }),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "NVML did not initialise within {}",
                crate::config::format_duration(timeout)
            )),
            Err(RecvTimeoutError::Disconnected) => Err("the NVML thread ended".into()),
        }
    }

    /// The GPUs now, or why there is no answer within `timeout` (a call
    /// still hanging from before is waited for, not asked again).
    pub fn read(&mut self, timeout: Duration) -> Result<Vec<Gpu>, String> {
        if !self.waiting {
            self.ask
                .send(())
                .map_err(|_| "the NVML thread ended".to_string())?;
            self.waiting = true;
        }
        match self.answers.recv_timeout(timeout) {
            Ok(gpus) => {
                self.waiting = false;
                Ok(gpus)
            }
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "NVML did not answer within {}",
                crate::config::format_duration(timeout)
            )),
            Err(RecvTimeoutError::Disconnected) => Err("the NVML thread ended".into()),
        }
    }
}

/// Every GPU NVML lists, in the fields of nvidia-smi's query; a reading
/// NVML cannot give is null.
fn sample(nvml: &Nvml, driver: Option<&str>) -> Vec<Gpu> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let mem = d.memory_info().ok();
            Some(Gpu {
                index: d.index().unwrap_or(i),
                name: d.name().ok()?,
                uuid: d.uuid().ok(),
                memory_used_mb: mem.as_ref().map(|m| m.used / (1 << 20)),
                memory_total_mb: mem.as_ref().map(|m| m.total / (1 << 20)),
                utilization_percent: d.utilization_rates().ok().map(|u| u.gpu as f64),
                temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok().map(|t| t as f64),
                // Milliwatts.
                power_watts: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
                driver: driver.map(str::to_owned),
            })
        })
        .collect()
}
