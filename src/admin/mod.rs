//! The operator's commands: `submit` and `dlq` (short-lived clients of the
//! same Redis the workers use), `status`, `services` (the node's service
//! containers, through the Docker driver), `init` and `service`.

pub mod dlq;
pub mod init;
pub mod services;
pub mod status;
mod status_redis;
pub mod submit;

/// A command's failure: the message and the exit code (1 = the operation or
/// the job failed, 2 = the input was wrong).
#[derive(Debug)]
pub struct Exit(pub i32, pub String);

impl From<redis::RedisError> for Exit {
    fn from(e: redis::RedisError) -> Self {
        Exit(1, format!("Redis: {e}"))
    }
}

pub fn connect(settings: &crate::config::Settings) -> Result<crate::redis_conn::Conn, Exit> {
    crate::redis_conn::connect(
        &settings.redis_url,
        settings.redis_timeout,
        settings.redis_timeout,
    )
    .map_err(|e| {
        Exit(
            1,
            format!(
                "cannot reach Redis at {}: {e}",
                crate::config::redact_password(&settings.redis_url)
            ),
        )
    })
}
