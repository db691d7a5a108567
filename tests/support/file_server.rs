//! A small local HTTP file server for the `model_download` tests: GET and
//! HEAD of registered paths, `Range: bytes=N-` (206 + `Content-Range`, 416
//! past the end), and per-file faults — drop the connection once at a byte,
//! ignore Range, redirect, stall, claim a huge length, pause until released,
//! pace the body. Every request is recorded (method, path, headers).
//!
//! Its HTTP handling is deliberately minimal (one request per connection,
//! `Connection: close`); it is meant to move onto the shared
//! `tests/support/http.rs` once that exists.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// What the server does for one path.
#[derive(Clone, Default)]
pub struct Serve {
    pub body: Arc<Vec<u8>>,
    /// The first GET sends this many body bytes, then closes the connection.
    pub drop_once_at: Option<u64>,
    /// Always 200 with the whole file.
    pub ignore_range: bool,
    /// Answer `302 Location: <this>` instead.
    pub redirect_to: Option<String>,
    /// Send the body up to this byte, then nothing until the client goes
    /// away (a request starting past it stalls at once).
    pub stall_at: Option<u64>,
    /// Advertise this Content-Length; send nothing until the client goes away.
    pub claim_length: Option<u64>,
    /// Send this many body bytes, then wait for [`FileServer::release`].
    pub pause_at: Option<u64>,
    /// Body in 64 KiB pieces, this long apart (a slow link, for progress).
    pub pace: Option<Duration>,
}

impl Serve {
    pub fn file(body: Vec<u8>) -> Serve {
        Serve {
            body: Arc::new(body),
            ..Serve::default()
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, Serve>>,
    requests: Mutex<Vec<Request>>,
    dropped: Mutex<Vec<String>>,
    /// Connections waiting at `pause_at`, and whether they may go on.
    paused: Mutex<(usize, bool)>,
    resumed: Condvar,
    stop: AtomicBool,
}

pub struct FileServer {
    port: u16,
    state: Arc<State>,
}

impl FileServer {
    pub fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the file server");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                thread::spawn(move || handle(conn, &st));
            }
        });
        FileServer { port, state }
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn base(&self) -> String {
        self.url("")
    }

    pub fn serve(&self, path: &str, serve: Serve) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(path.to_owned(), serve);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The requests with `method` for `path`, in order.
    pub fn requests_for(&self, method: &str, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }

    /// How many connections wait at a `pause_at`.
    pub fn paused(&self) -> usize {
        self.state.paused.lock().unwrap().0
    }

    /// Lets every paused (and future pausing) connection go on.
    pub fn release(&self) {
        self.state.paused.lock().unwrap().1 = true;
        self.state.resumed.notify_all();
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.release();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn handle(mut conn: TcpStream, st: &State) {
    let Some(req) = read_request(&conn) else {
        return;
    };
    st.requests.lock().unwrap().push(req.clone());
    let serve = st.files.lock().unwrap().get(&req.path).cloned();
    let Some(serve) = serve else {
        let _ = conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        );
        return;
    };
    if let Some(to) = &serve.redirect_to {
        let _ = write!(
            conn,
            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let len = serve.body.len() as u64;
    if let Some(claim) = serve.claim_length {
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {claim}\r\nConnection: close\r\n\r\n"
        );
        wait_for_close(&mut conn);
        return;
    }
    let from = req
        .header("range")
        .filter(|_| !serve.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    let head = match from {
        Some(from) if from >= len => {
            let _ = write!(
                conn,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        Some(from) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\n",
            len - 1,
            len - from
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"),
    };
    if conn
        .write_all(format!("{head}Accept-Ranges: bytes\r\nConnection: close\r\n\r\n").as_bytes())
        .is_err()
        || req.method == "HEAD"
    {
        return;
    }
    let start = from.unwrap_or(0);
    let first_get = {
        let mut dropped = st.dropped.lock().unwrap();
        let first = !dropped.contains(&req.path);
        if first && serve.drop_once_at.is_some() {
            dropped.push(req.path.clone());
        }
        first
    };
    let stop_at = |at: Option<u64>| at.filter(|a| *a > start && *a < len);
    let mut pos = start;
    let send = |conn: &mut TcpStream, pos: &mut u64, until: u64| -> bool {
        while *pos < until {
            let end = until.min(*pos + (64 << 10));
            if conn
                .write_all(&serve.body[*pos as usize..end as usize])
                .is_err()
            {
                return false;
            }
            *pos = end;
            if let Some(d) = serve.pace {
                thread::sleep(d);
            }
        }
        true
    };
    if let (true, Some(at)) = (first_get, stop_at(serve.drop_once_at)) {
        send(&mut conn, &mut pos, at);
        let _ = conn.flush();
        let _ = conn.shutdown(Shutdown::Both);
        return;
    }
    // A request starting at or past `stall_at` stalls at once.
    if let Some(at) = serve.stall_at.filter(|a| *a < len) {
        if send(&mut conn, &mut pos, at.max(start)) {
            wait_for_close(&mut conn);
        }
        return;
    }
    if let Some(at) = stop_at(serve.pause_at) {
        if !send(&mut conn, &mut pos, at) {
            return;
        }
        let mut p = st.paused.lock().unwrap();
        p.0 += 1;
        while !p.1 {
            p = st.resumed.wait(p).unwrap();
        }
        p.0 -= 1;
    }
    send(&mut conn, &mut pos, len);
}

fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Some(Request {
        method,
        path,
        headers,
    })
}

/// Blocks until the client closes its end (or the read fails).
fn wait_for_close(conn: &mut TcpStream) {
    let mut buf = [0u8; 256];
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}
