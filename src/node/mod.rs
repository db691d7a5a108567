//! The node itself, apart from jobs: what this machine is and how it is
//! doing. Owns the heartbeat (`heartbeat`: its thread and Redis connection),
//! GPU telemetry (`gpu`: NVML (`nvml`, feature `nvml`) or nvidia-smi,
//! bounded in time), host facts (`host`:
//! /proc and statvfs) and the device config (`profile`: its file and the
//! live copy events, heartbeat and reader use). Reads the worker's
//! counters; never touches a job. The node's service containers: the
//! catalog (`services`), the docker CLI (`docker`) and bringing them to a
//! wanted set (`reconcile`). Provisioning (`provision`: `citadel init`'s
//! device authorization, the stored credentials) and the systemd unit
//! (`systemd`).

pub mod docker;
pub mod gpu;
pub mod heartbeat;
pub mod host;
#[cfg(feature = "nvml")]
mod nvml;
pub mod profile;
pub mod provision;
pub mod reconcile;
pub mod services;
pub mod systemd;
