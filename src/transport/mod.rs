//! Transports: how jobs arrive and how their outcomes leave.

pub mod redis_streams;
