//! Observability of a running worker: Prometheus metrics (`metrics`, one
//! static registry the job path writes with atomics and a per-type lock
//! taken once per job), liveness of the long-running loops and readiness of
//! the transport (`alive`), the Redis-derived gauges sampled off the job
//! path (`sampler`), and the `--metrics-addr` listener serving `/metrics`,
//! `/healthz` and `/readyz` (`server`). Nothing here is on the job path
//! beyond a counter bump; nothing here can block a job.

pub mod alive;
pub mod metrics;
pub mod sampler;
pub mod server;
