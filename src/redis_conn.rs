//! The one Redis connection helper: timeouts on every socket, and a test for
//! "this error means the connection is gone".

use redis::{Client, Connection, RedisError, RedisResult};
use std::time::Duration;

/// Open a connection with a connect timeout and read/write timeouts.
/// `read_timeout` must exceed any BLOCK this connection will be used for.
pub fn connect(url: &str, timeout: Duration, read_timeout: Duration) -> RedisResult<Connection> {
    let client = Client::open(url)?;
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(read_timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// True when the connection cannot be used any more (or the server is not
/// ready): drop it and reconnect. False for a command's own error.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(e.code(), Some("LOADING" | "MASTERDOWN" | "TRYAGAIN"))
}
