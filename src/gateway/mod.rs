//! `citadel gateway`: an OpenAI-compatible HTTP API over the job fabric.
//! Each completion request becomes an `llm_inference` job on a queue; its
//! answer is read from the job's replayable events (`events:v1:{jobId}`).
//!
//! front.rs owns the TCP side (limits, slow clients, who left); tiny_http
//! parses HTTP behind it on a private Unix socket; server.rs answers one
//! request; openai.rs holds the OpenAI shapes, sse.rs the stream framing.
//! This file starts and stops the pieces.

mod front;
mod models;
mod openai;
#[cfg(test)]
mod proptests;
mod server;
mod sse;

use crate::admin::Exit;
use crate::config::Settings;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Stack of each answering thread (they hold no large buffers).
const STACK_BYTES: usize = 1 << 20;

/// Serve until SIGTERM/SIGINT; the jobs still being answered then are
/// cancelled.
pub fn run(settings: Settings) -> Result<i32, Exit> {
    let addr = settings.gateway_listen.clone();
    check_exposure(&settings)?;
    // On a cluster, a queue no worker can read would only time out. The
    // first --queue is used without routes and by routes without @QUEUE.
    let routes = &settings.gateway_routes;
    let default_used = routes.is_empty() || routes.iter().any(|r| r.queue.is_none());
    let default = settings.queues.first().filter(|_| default_used);
    let routed = routes.iter().filter_map(|r| r.queue.as_ref());
    for q in routed.chain(default) {
        if let Some(why) = settings.cluster_stream_problem(q) {
            return Err(Exit(2, why));
        }
    }
    let tcp = TcpListener::bind(&addr)
        .map_err(|e| Exit(2, format!("cannot listen on --listen {addr}: {e}")))?;
    let bound = tcp
        .local_addr()
        .map_err(|e| Exit(2, format!("--listen {addr}: {e}")))?;
    let dir = private_dir().map_err(|e| {
        Exit(
            1,
            format!("gateway: cannot make its private socket directory: {e}"),
        )
    })?;
    let socket = dir.join("http.sock");
    let unix = UnixListener::bind(&socket)
        .map_err(|e| Exit(1, format!("gateway: cannot bind {}: {e}", socket.display())))?;
    let http = Arc::new(
        tiny_http::Server::from_listener(unix, None)
            .map_err(|e| Exit(1, format!("gateway: cannot serve: {e}")))?,
    );
    let limits = front::Limits {
        max_connections: settings.gateway_max_connections,
        client_timeout: settings.gateway_client_timeout,
        max_body: settings.gateway_max_body,
    };
    let threads = settings.gateway_max_connections;
    let gw = Arc::new(server::Gateway::new(settings));
    for i in 0..threads {
        let (http, gw) = (http.clone(), gw.clone());
        std::thread::Builder::new()
            .name(format!("gateway-{i}"))
            .stack_size(STACK_BYTES)
            .spawn(move || {
                while let Ok(rq) = http.recv() {
                    // One bad request must not take a thread with it.
                    let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        server::answer(&gw, rq)
                    }));
                    if answered.is_err() {
                        log::error!("gateway: answering a request panicked");
                    }
                }
            })
            .map_err(|e| Exit(1, format!("gateway: cannot start its threads: {e}")))?;
    }
    std::thread::Builder::new()
        .name("gateway-accept".into())
        .spawn(move || front::accept(tcp, socket, limits))
        .map_err(|e| Exit(1, format!("gateway: cannot start: {e}")))?;
    let (tx, signals) = crossbeam_channel::bounded(1);
    ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    })
    .map_err(|e| Exit(1, format!("cannot install the signal handler: {e}")))?;
    log::info!(
        "gateway: listening on http://{bound} (POST /v1/chat/completions, /v1/completions; GET /v1/models, /healthz); {} API key(s)",
        gw.settings.gateway_api_keys.len()
    );
    let _ = signals.recv();
    let live = gw.live_jobs();
    log::info!(
        "gateway: stopping; cancelling {} job(s) being answered",
        live.len()
    );
    for id in live {
        server::cancel(&gw.settings, &id, "the gateway stopped");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Answering threads may be mid-stream: the process ends under them.
    std::thread::sleep(Duration::from_millis(10));
    Ok(0)
}

/// Without API keys only a loopback address, unless --insecure-no-auth.
fn check_exposure(s: &Settings) -> Result<(), Exit> {
    if !s.gateway_api_keys.is_empty() || s.insecure_no_auth {
        return Ok(());
    }
    let addrs: Vec<_> = s
        .gateway_listen
        .to_socket_addrs()
        .map_err(|e| Exit(2, format!("--listen {}: {e}", s.gateway_listen)))?
        .collect();
    if addrs.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    Err(Exit(
        2,
        format!(
            "refusing to serve --listen {} without API keys: anyone who reaches it could run jobs; \
             give --api-key KEY (or CITADEL_GATEWAY_API_KEYS), or --insecure-no-auth",
            s.gateway_listen
        ),
    ))
}

/// A fresh directory only this user can enter, for the Unix socket.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "citadel-gateway-{}-{:08x}",
        std::process::id(),
        crate::backoff::random_u64() as u32
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}
