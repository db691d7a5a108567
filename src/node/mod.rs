//! The node itself, apart from jobs: what this machine is and how it is
//! doing. Owns the heartbeat (`heartbeat`: its thread and Redis connection),
//! GPU telemetry (`gpu`: nvidia-smi, bounded in time) and host facts (`host`:
//! /proc and statvfs). Reads the worker's counters; never touches a job.
//! The node's service containers: the catalog (`services`), the docker CLI
//! (`docker`) and bringing them to a wanted set (`reconcile`).

pub mod docker;
pub mod gpu;
pub mod heartbeat;
pub mod host;
#[allow(dead_code)] // skeleton until the device-config work wires it
pub mod profile;
pub mod reconcile;
pub mod services;
