//! A fake extraction service for the `extraction` tests: `GET /health` and
//! `POST /extract` on 127.0.0.1:0, one request per connection (the agent
//! pools none), one thread per connection.
//!
//! `/health` answers 503 `{"detail":"loading model"}` for the first N probes
//! ([`FakeExtraction::ready_after`]; never, with `usize::MAX`), then 200.
//! `/extract` gets the one [`Answer`] it was started with, or hangs until the
//! client closes the connection. Recorded: every request's method and path
//! in order, each `/extract` body, and when the client closed a hung
//! connection. The HTTP parsing is the least that works (Content-Length
//! bodies only); it is meant to move onto the shared tests/support/http.rs.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// How often a waiting connection looks at the stop flag.
const TICK: Duration = Duration::from_millis(20);

/// What `POST /extract` is answered with.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status and body, `Content-Type: application/json`.
    Json(u16, String),
    /// This status and body, `Content-Type: text/html`.
    Text(u16, String),
    /// Nothing; the connection stays open until the client closes it.
    Hang,
}

/// One `POST /extract` as the service received it.
#[derive(Clone, Debug)]
pub struct Extract {
    pub body: Vec<u8>,
    /// When the client closed the connection of a hung answer.
    pub closed_at: Option<Instant>,
}

impl Extract {
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "/extract body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

struct State {
    answer: Answer,
    not_ready_for: AtomicUsize,
    /// `GET /health`, `POST /extract`, … in arrival order.
    requests: Mutex<Vec<String>>,
    extracts: Mutex<Vec<Extract>>,
    stop: AtomicBool,
}

/// The service; dropping it stops it and closes every connection.
pub struct FakeExtraction {
    addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeExtraction {
    /// Healthy at once; every `/extract` gets `answer`.
    pub fn start(answer: Answer) -> FakeExtraction {
        FakeExtraction::ready_after(0, answer)
    }

    /// `/health` answers 503 to the first `probes` probes, then 200.
    pub fn ready_after(probes: usize, answer: Answer) -> FakeExtraction {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(State {
            answer,
            not_ready_for: AtomicUsize::new(probes),
            requests: Mutex::new(Vec::new()),
            extracts: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let state = state.clone();
            thread::Builder::new()
                .name(format!("fake-extraction {addr}"))
                .spawn(move || {
                    for conn in listener.incoming() {
                        if state.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let state = state.clone();
                        let _ = thread::Builder::new()
                            .name("fake-extraction conn".into())
                            .spawn(move || serve(conn, &state));
                    }
                })
                .expect("spawning the fake extraction service")
        };
        FakeExtraction {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET /health`, `POST /extract`, … so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state.requests).clone()
    }

    pub fn health_probes(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| *r == "GET /health")
            .count()
    }

    pub fn extracts(&self) -> Vec<Extract> {
        lock(&self.state.extracts).clone()
    }

    /// Waits until `/extract` request `i` arrived.
    pub fn wait_extract(&self, i: usize, timeout: Duration) -> Extract {
        super::wait_until(&format!("/extract request {i}"), timeout, || {
            self.extracts().get(i).cloned()
        })
    }

    /// Waits until the client closed the connection of `/extract` request `i`.
    pub fn wait_closed(&self, i: usize, timeout: Duration) -> Instant {
        super::wait_until(
            &format!("the client to close /extract request {i}"),
            timeout,
            || self.extracts().get(i).and_then(|r| r.closed_at),
        )
    }
}

impl Drop for FakeExtraction {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, state: &State) {
    let _ = conn.set_read_timeout(Some(TICK));
    let Some((method, path, body)) = read_request(&mut conn, state) else {
        return;
    };
    lock(&state.requests).push(format!("{method} {path}"));
    let (status, content_type, text) = match (method.as_str(), path.as_str()) {
        ("GET", "/health") => {
            let not_ready = state
                .not_ready_for
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n > 0).then(|| n - 1)
                })
                .is_ok();
            if not_ready {
                (
                    503,
                    "application/json",
                    r#"{"detail":"loading model"}"#.into(),
                )
            } else {
                (200, "application/json", r#"{"status":"ok"}"#.into())
            }
        }
        ("POST", "/extract") => {
            let index = {
                let mut extracts = lock(&state.extracts);
                extracts.push(Extract {
                    body,
                    closed_at: None,
                });
                extracts.len() - 1
            };
            match &state.answer {
                Answer::Json(status, text) => (*status, "application/json", text.clone()),
                Answer::Text(status, text) => (*status, "text/html", text.clone()),
                Answer::Hang => {
                    wait_for_close(&mut conn, state);
                    lock(&state.extracts)[index].closed_at = Some(Instant::now());
                    return;
                }
            }
        }
        _ => (404, "application/json", r#"{"detail":"Not Found"}"#.into()),
    };
    let head = format!(
        "HTTP/1.1 {status} Status\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(text.as_bytes());
    let _ = conn.flush();
}

/// Reads until the client closes (EOF or error) or the service stops.
fn wait_for_close(conn: &mut TcpStream, state: &State) {
    let mut buf = [0u8; 4096];
    while let Some(n) = read_some(conn, &mut buf, state) {
        if n == 0 {
            return;
        }
    }
}

/// One read, retried over read timeouts; None on error or when stopping.
fn read_some(conn: &mut TcpStream, buf: &mut [u8], state: &State) -> Option<usize> {
    loop {
        if state.stop.load(Ordering::SeqCst) {
            return None;
        }
        match conn.read(buf) {
            Ok(n) => return Some(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return None,
        }
    }
}

/// Method, path and (Content-Length) body of the one request.
fn read_request(conn: &mut TcpStream, state: &State) -> Option<(String, String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match read_some(conn, &mut buf, state)? {
            0 => return None,
            n => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while data.len() < head_end + length {
        match read_some(conn, &mut buf, state)? {
            0 => return None,
            n => data.extend_from_slice(&buf[..n]),
        }
    }
    Some((method, path, data[head_end..head_end + length].to_vec()))
}
