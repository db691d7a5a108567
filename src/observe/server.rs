//! The observability listener (`--metrics-addr`, default 127.0.0.1:9464,
//! empty = off): `GET /metrics` (Prometheus text), `GET /healthz`,
//! `GET /readyz`. HTTP is `tiny_http`'s (the later OpenAI-compatible front
//! shares it); nothing here parses HTTP.
//!
//! It must never disturb jobs: answers are built from atomics and small
//! locked copies (no Redis, no nvidia-smi), on [`ANSWER_THREADS`] threads.
//! tiny_http itself has no socket timeouts, no size limits and a thread per
//! connection, so it listens only on a Unix socket in a private directory,
//! and the TCP side is a small byte pump in front of it (it copies bytes
//! both ways and reads none of them): at most [`MAX_CONNECTIONS`] at once
//! (more are closed at once), a connection quiet for [`CLIENT_TIMEOUT`]
//! (half a request, then a stall) or open longer than
//! [`CONNECTION_LIFETIME`] is closed, and one that sends more than
//! [`MAX_REQUEST_BYTES`] is cut off. Within those bounds tiny_http answers
//! what it reads: headers over [`MAX_HEADER_BYTES`] get 431, an unknown
//! path 404, a method other than GET/HEAD 405, a malformed request 400.

use super::{alive, metrics::METRICS};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response, Server};

/// Threads answering requests (they build and write the answers).
pub const ANSWER_THREADS: usize = 2;
/// TCP connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection with no byte from the client for this long is closed.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection stays open longer (a client dripping bytes slowly).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Bytes a client may send on one connection (requests have no body here).
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Larger request headers (all names and values together) get 431.
pub const MAX_HEADER_BYTES: usize = 16 << 10;

pub struct Listener {
    server: Arc<Server>,
    threads: Vec<JoinHandle<()>>,
    socket_dir: PathBuf,
}

/// Listen on `--metrics-addr`; `Ok(None)` when it is empty (off). An
/// address that cannot be bound (in use, not this host's) is an error
/// naming the setting: the operator asked for this listener.
pub fn start(addr: &str) -> Result<Option<Listener>, String> {
    if addr.is_empty() {
        log::info!("metrics: off (--metrics-addr is empty)");
        return Ok(None);
    }
    let tcp = TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on --metrics-addr {addr}: {e}"))?;
    let bound = tcp
        .local_addr()
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    let socket_dir = private_dir().map_err(|e| {
        format!("--metrics-addr {addr}: cannot make the listener's private socket directory: {e}")
    })?;
    let socket = socket_dir.join("http.sock");
    let unix = UnixListener::bind(&socket).map_err(|e| {
        format!(
            "--metrics-addr {addr}: cannot bind {}: {e}",
            socket.display()
        )
    })?;
    let server = Arc::new(
        Server::from_listener(unix, None)
            .map_err(|e| format!("cannot serve on --metrics-addr {addr}: {e}"))?,
    );
    let threads: Vec<JoinHandle<()>> = (0..ANSWER_THREADS)
        .map(|i| {
            let server = server.clone();
            spawn(&format!("metrics-http-{i}"), move || {
                while let Ok(rq) = server.recv() {
                    answer(rq);
                }
            })
        })
        .collect();
    // Never joined: it blocks in accept(2) until the process ends.
    let _ = spawn("metrics-accept", move || accept(tcp, socket));
    log::info!("metrics: http://{bound}/metrics, /healthz, /readyz");
    Ok(Some(Listener {
        server,
        threads,
        socket_dir,
    }))
}

impl Listener {
    /// Stop answering; returns once the answering threads ended.
    pub fn stop(self) {
        let Listener {
            server,
            threads,
            socket_dir,
        } = self;
        for _ in 0..ANSWER_THREADS {
            server.unblock();
        }
        for t in threads {
            let _ = t.join();
        }
        // tiny_http's drop connects to its socket to end its accept loop.
        drop(server);
        let _ = std::fs::remove_dir_all(&socket_dir);
    }
}

/// A fresh directory only this user can enter, for the Unix socket.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "citadel-metrics-{}-{nanos:08x}",
        std::process::id()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn metrics thread")
}

fn accept(tcp: TcpListener, socket: PathBuf) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in tcp.incoming() {
        let Ok(conn) = conn else {
            // EMFILE and the like: do not spin.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            log::debug!("metrics: {MAX_CONNECTIONS} connections open; one more closed");
            continue;
        }
        let (open, socket) = (open.clone(), socket.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                pump(conn, &socket);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            log::debug!("metrics: cannot start a connection thread");
        }
    }
}

/// Copy bytes between the client and tiny_http until either side ends, the
/// client goes quiet, the connection gets too old or sends too much.
fn pump(client: TcpStream, socket: &std::path::Path) {
    let Ok(inner) = UnixStream::connect(socket) else {
        return;
    };
    let until = Instant::now() + CONNECTION_LIFETIME;
    let _ = client.set_write_timeout(Some(CLIENT_TIMEOUT));
    let _ = inner.set_read_timeout(Some(CONNECTION_LIFETIME));
    let (Ok(mut client_out), Ok(mut inner_in)) = (client.try_clone(), inner.try_clone()) else {
        return;
    };
    std::thread::scope(|s| {
        // tiny_http → client.
        s.spawn(|| {
            let _ = std::io::copy(&mut inner_in, &mut client_out);
            let _ = client_out.shutdown(Shutdown::Both);
        });
        // client → tiny_http.
        let (mut from, mut to) = (&client, &inner);
        let mut buf = [0u8; 8192];
        let mut sent = 0u64;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || sent > MAX_REQUEST_BYTES {
                let _ = client.shutdown(Shutdown::Both);
                let _ = inner.shutdown(Shutdown::Both);
                break;
            }
            let _ = from.set_read_timeout(Some(left.min(CLIENT_TIMEOUT)));
            match from.read(&mut buf) {
                Ok(0) => {
                    // The client is done sending: tiny_http still answers.
                    let _ = inner.shutdown(Shutdown::Write);
                    break;
                }
                Ok(n) => {
                    sent += n as u64;
                    if to.write_all(&buf[..n]).is_err() {
                        let _ = client.shutdown(Shutdown::Both);
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Quiet too long, or gone: both sides end.
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = inner.shutdown(Shutdown::Both);
                    break;
                }
            }
        }
    });
}

/// (status, content type, body) of a request.
fn route(method: &Method, url: &str, header_bytes: usize) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if header_bytes > MAX_HEADER_BYTES {
        return (
            431,
            TEXT,
            format!("request headers over {MAX_HEADER_BYTES} bytes\n"),
        );
    }
    let path = url.split('?').next().unwrap_or_default();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return (
            404,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        );
    }
    if !matches!(method, Method::Get | Method::Head) {
        return (405, TEXT, format!("{method} is not allowed: use GET\n"));
    }
    match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            METRICS.render(),
        ),
        "/healthz" => match alive::wedged() {
            w if w.is_empty() => (200, TEXT, "ok\n".into()),
            w => (503, TEXT, format!("wedged: {}\n", w.join(", "))),
        },
        _ => match alive::readiness() {
            Ok(()) => (200, TEXT, "ready\n".into()),
            Err(why) => (503, TEXT, format!("not ready: {why}\n")),
        },
    }
}

fn answer(rq: Request) {
    let header_bytes: usize = rq
        .headers()
        .iter()
        .map(|h| h.field.as_str().as_str().len() + h.value.as_str().len() + 4)
        .sum();
    let (status, content_type, body) = route(rq.method(), rq.url(), header_bytes);
    let mut response = Response::from_string(body).with_status_code(status);
    if let Ok(h) = Header::from_bytes("Content-Type", content_type) {
        response = response.with_header(h);
    }
    if status == 405 {
        if let Ok(h) = Header::from_bytes("Allow", "GET, HEAD") {
            response = response.with_header(h);
        }
    }
    if let Err(e) = rq.respond(response) {
        log::debug!("metrics: answer not delivered: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_by_path_then_method() {
        assert_eq!(route(&Method::Get, "/nope", 10).0, 404);
        assert_eq!(route(&Method::Post, "/nope", 10).0, 404);
        assert_eq!(route(&Method::Post, "/metrics", 10).0, 405);
        assert_eq!(route(&Method::Get, "/metrics", MAX_HEADER_BYTES + 1).0, 431);
        let (status, kind, body) = route(&Method::Get, "/metrics?x=1", 10);
        assert_eq!(
            (status, kind),
            (200, "text/plain; version=0.0.4; charset=utf-8")
        );
        assert!(
            body.contains("# TYPE citadel_jobs_in_flight gauge"),
            "{body}"
        );
    }
}
