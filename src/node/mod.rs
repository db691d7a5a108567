//! The node itself, apart from jobs: what this machine is and how it is
//! doing. Owns the heartbeat (`heartbeat`: its thread and Redis connection),
//! GPU telemetry (`gpu`: nvidia-smi, bounded in time) and host facts (`host`:
//! /proc and statvfs). Reads the worker's counters; never touches a job.
//! Provisioning (`provision`: `citadel init`'s device authorization, the
//! stored credentials) and the systemd unit (`systemd`).

pub mod gpu;
pub mod heartbeat;
pub mod host;
#[allow(dead_code)] // skeleton until the device-config work wires it
pub mod profile;
pub mod provision;
#[allow(dead_code)] // skeleton until the Docker driver wires it
pub mod reconcile;
pub mod services;
pub mod systemd;
