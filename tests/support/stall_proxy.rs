//! A TCP proxy on 127.0.0.1 in front of a real redis-server that can hold
//! back the server's replies while still passing the client's commands on:
//! Redis runs a command, the client never hears back in time. That is the
//! case of a reply lost after the work was done (a stalled network, a proxy
//! restart), which DEBUG SLEEP or CLIENT PAUSE cannot produce on loopback:
//! there, a client that gives up resets its connection and Redis drops what
//! it had not read yet.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub struct StallProxy {
    port: u16,
    hold: Arc<Hold>,
    stop: Arc<AtomicBool>,
}

/// When replies are kept back: all of them while `on`; those of the
/// connection that sent a command containing `trigger`, for a while after.
#[derive(Default)]
struct Hold {
    on: AtomicBool,
    /// The pattern and how long a connection that sends it is held.
    trigger: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Bumped each time a trigger is set: bytes that passed before it never
    /// trigger it.
    armed: AtomicUsize,
    /// The connection that sent the trigger, and until when it is held.
    held: Mutex<Option<(u64, Instant)>>,
}

impl Hold {
    /// `bytes`: what this connection sent since the trigger was set (at
    /// most the last read and `CARRY` bytes before it).
    fn saw(&self, bytes: &[u8], conn: u64) {
        let mut trigger = self.trigger.lock().unwrap();
        if let Some((pattern, d)) = trigger.as_ref() {
            if bytes
                .windows(pattern.len())
                .any(|w| w == pattern.as_slice())
            {
                *self.held.lock().unwrap() = Some((conn, Instant::now() + *d));
                *trigger = None;
            }
        }
    }

    /// Whether replies to connection `conn` are kept back now.
    fn holding(&self, conn: u64) -> bool {
        self.on.load(Ordering::SeqCst)
            || self
                .held
                .lock()
                .unwrap()
                .is_some_and(|(c, until)| c == conn && Instant::now() < until)
    }
}

impl StallProxy {
    pub fn start(target_port: u16) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let hold = Arc::new(Hold::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hold.clone(), stop.clone());
        thread::spawn(move || {
            let mut next = 0u64;
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                            continue;
                        };
                        next += 1;
                        pipe_both(client, server, next, h.clone(), s.clone());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        StallProxy { port, hold, stop }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// While on, replies from Redis are kept back (commands still pass).
    pub fn hold_replies(&self, on: bool) {
        self.hold.on.store(on, Ordering::SeqCst);
    }

    /// The first time a client sends bytes containing `pattern`, keep every
    /// reply to that connection back for `d` from then on (the command
    /// itself still runs; other connections go on).
    pub fn hold_replies_after(&self, pattern: &str, d: Duration) {
        *self.hold.trigger.lock().unwrap() = Some((pattern.as_bytes().to_vec(), d));
        self.hold.armed.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether that has happened.
    pub fn was_triggered(&self) -> bool {
        self.hold.held.lock().unwrap().is_some()
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Connection number `conn`, both ways.
fn pipe_both(
    client: TcpStream,
    server: TcpStream,
    conn: u64,
    hold: Arc<Hold>,
    stop: Arc<AtomicBool>,
) {
    let closed = Arc::new(AtomicBool::new(false));
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (done, seen) = (closed.clone(), hold.clone());
    // Client → server: always passed on at once.
    thread::spawn(move || {
        copy(c2, s2, &seen, Some(conn), &|| false, &done);
    });
    // Server → client: kept back while held.
    thread::spawn(move || {
        let held = || hold.holding(conn) && !stop.load(Ordering::SeqCst);
        copy(server, client, &hold, None, &held, &closed);
    });
}

/// How many bytes of one read are looked at again with the next (longer
/// than any trigger pattern).
const CARRY: usize = 256;

/// Copies `from` to `to`, waiting while `held()`; with `watch` (the
/// connection's number), what passes is shown to `hold`'s trigger.
fn copy(
    mut from: TcpStream,
    mut to: TcpStream,
    hold: &Hold,
    watch: Option<u64>,
    held: &dyn Fn() -> bool,
    closed: &AtomicBool,
) {
    let mut buf = [0u8; 16 * 1024];
    // The end of the bytes before, so that a trigger pattern split across
    // two reads is still seen.
    let mut seen: Vec<u8> = Vec::new();
    let mut armed = hold.armed.load(Ordering::SeqCst);
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    while !closed.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        if let Some(conn) = watch {
            let now = hold.armed.load(Ordering::SeqCst);
            if now != armed {
                // Set since the last read: what passed before is not looked at.
                armed = now;
                seen.clear();
            }
            seen.extend_from_slice(&buf[..n]);
            hold.saw(&seen, conn);
            let keep = seen.len().saturating_sub(CARRY);
            seen.drain(..keep);
        }
        while held() && !closed.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    closed.store(true, Ordering::SeqCst);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
