//! The agent's HTTP client setups (ureq 3), all in this one place. For the
//! local inference engines, an [`HttpClient`]: it owns the settings every engine request shares —
//! connect timeout, no proxies, 4xx/5xx bodies readable, no redirects, no
//! idle-connection pool — and the two controls a streaming engine call needs
//! that ureq's per-phase timeouts do not give:
//!
//! - a [`ReadDeadline`] the caller moves while it reads (first token, then
//!   idle between tokens): every socket read and write is bounded by it;
//! - an agent per call, so that `Agent::shutdown()` (from a job's cancel hook)
//!   shuts down that call's socket, and only that one: a blocked read returns
//!   at once and the engine sees the connection close.
//!
//! For model downloads, [`HttpClient::downloads`]: the same per-call agents
//! and deadlines, but proxy-aware (model hosts are remote; a loopback URL
//! still goes direct) and with a larger read buffer. Redirects stay off:
//! `handlers::download` follows them itself, so that it decides which host
//! sees the token.
//!
//! For the Nexus control plane, [`control_plane_agent`]: pooled and
//! proxy-aware, since Nexus is usually remote.
//!
//! It knows nothing of engines or jobs; `handlers::inference` decides what the
//! deadlines are and what an error means.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    time::Duration as UreqDuration, Buffers, ConnectionDetails, Connector, NextTimeout,
    RustlsConnector, TcpConnector, Transport,
};
use ureq::{Agent, Timeout};

/// The shared configuration; cheap to clone, makes an agent per call.
#[derive(Debug, Clone)]
pub struct HttpClient {
    config: Config,
    /// For a loopback URL: `config` without any proxy.
    loopback: Config,
}

impl HttpClient {
    pub fn new(connect_timeout: Duration) -> HttpClient {
        let config = Agent::config_builder()
            .timeout_connect(Some(connect_timeout))
            // Engines are local: HTTP_PROXY & co. must not send 127.0.0.1 elsewhere.
            .proxy(None)
            // An engine's 4xx/5xx body says what went wrong: read it.
            .http_status_as_error(false)
            // A redirect from an engine is a misconfiguration, reported as such.
            .max_redirects(0)
            // One call per agent: a finished connection is closed, not pooled,
            // so a cancel hook that outlives its call holds no open socket.
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .user_agent(format!("citadel/{}", crate::events::AGENT_VERSION))
            .build();
        HttpClient {
            loopback: config.clone(),
            config,
        }
    }

    /// The client for model downloads: as [`HttpClient::new`], except that
    /// `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` are honoured for remote hosts
    /// and reads take up to 1 MiB at a time (fewer, larger disk writes).
    pub fn downloads(connect_timeout: Duration) -> HttpClient {
        let builder = || {
            Agent::config_builder()
                .timeout_connect(Some(connect_timeout))
                .http_status_as_error(false)
                // The caller follows redirects, deciding where the token goes.
                .max_redirects(0)
                .max_idle_connections(0)
                .max_idle_connections_per_host(0)
                .input_buffer_size(1 << 20)
                .user_agent(format!("citadel/{}", crate::events::AGENT_VERSION))
        };
        HttpClient {
            config: builder().build(),
            loopback: builder().proxy(None).build(),
        }
    }

    /// As [`HttpClient::agent`], for a call to `url`: a loopback URL never
    /// goes through a proxy.
    pub fn agent_for(&self, url: &str, deadline: Arc<ReadDeadline>) -> Agent {
        let config = if is_loopback(url) {
            &self.loopback
        } else {
            &self.config
        };
        Agent::with_parts(
            config.clone(),
            Self::connector(deadline),
            DefaultResolver::default(),
        )
    }

    /// An agent for one call whose every read and write ends by `deadline`
    /// (when it is set). `Agent::shutdown()` on a clone interrupts the call.
    pub fn agent(&self, deadline: Arc<ReadDeadline>) -> Agent {
        Agent::with_parts(
            self.config.clone(),
            Self::connector(deadline),
            DefaultResolver::default(),
        )
    }

    fn connector(deadline: Arc<ReadDeadline>) -> impl Connector<(), Out = impl Transport> {
        ().chain(TcpConnector::default())
            .chain(RustlsConnector::default())
            .chain(DeadlineConnector(deadline))
    }
}

/// The agent for a control plane (Nexus): unlike the engines' client it is
/// long-lived and pools connections, and it honours `HTTP_PROXY` & co. —
/// except for a loopback URL, which a proxy must not capture. Statuses are
/// not errors: the caller reads `Retry-After` and error bodies. Every request
/// is bounded by `timeout` as a whole.
pub fn control_plane_agent(base_url: &str, timeout: Duration) -> Agent {
    let mut config = Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .user_agent(format!("citadel/{}", crate::events::AGENT_VERSION));
    if is_loopback(base_url) {
        config = config.proxy(None);
    }
    config.build().into()
}

/// 127.0.0.0/8, ::1 or localhost.
pub fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

/// A point in time that bounds the socket I/O of one call; the caller moves it.
#[derive(Debug, Default)]
pub struct ReadDeadline {
    at: Mutex<Option<Instant>>,
    expired: AtomicBool,
}

impl ReadDeadline {
    pub fn new() -> ReadDeadline {
        ReadDeadline::default()
    }

    pub fn set(&self, at: Option<Instant>) {
        *crate::sync::lock(&self.at) = at;
    }

    /// Whether a read or write failed because this deadline passed.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::SeqCst)
    }

    fn left(&self) -> Option<Duration> {
        crate::sync::lock(&self.at).map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// `timeout` with its per-read and per-write limits lowered to what is left.
    fn bound(&self, mut timeout: NextTimeout) -> NextTimeout {
        if let Some(left) = self.left() {
            let left = UreqDuration::Exact(left);
            timeout.per_read = Some(timeout.per_read.map_or(left, |d| d.min(left)));
            timeout.per_write = Some(timeout.per_write.map_or(left, |d| d.min(left)));
        }
        timeout
    }

    /// Notes an expiry: this client never sets ureq's own per-read/per-write
    /// timeouts, so a PerRead/PerWrite timeout is this deadline.
    fn note<T>(&self, result: Result<T, ureq::Error>) -> Result<T, ureq::Error> {
        if let Err(ureq::Error::Timeout(Timeout::PerRead | Timeout::PerWrite)) = &result {
            self.expired.store(true, Ordering::SeqCst);
        }
        result
    }
}

/// Last link of the connector chain: wraps the (TCP or TLS) transport so that
/// its I/O obeys a [`ReadDeadline`].
#[derive(Debug)]
struct DeadlineConnector(Arc<ReadDeadline>);

impl<In: Transport> Connector<In> for DeadlineConnector {
    type Out = DeadlineTransport<In>;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        Ok(chained.map(|inner| DeadlineTransport {
            inner,
            deadline: self.0.clone(),
        }))
    }
}

#[derive(Debug)]
struct DeadlineTransport<T> {
    inner: T,
    deadline: Arc<ReadDeadline>,
}

impl<T: Transport> Transport for DeadlineTransport<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = self.deadline.bound(timeout);
        self.deadline
            .note(self.inner.transmit_output(amount, timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = self.deadline.bound(timeout);
        self.deadline.note(self.inner.await_input(timeout))
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thread_probe::{is_socket, ThreadProbe};
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A server that answers the headers of a stream, then sends nothing.
    fn silent_stream_server() -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                .unwrap();
            // Until the client goes away.
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        });
        (url, t)
    }

    #[test]
    fn deadline_bounds_a_blocked_read_and_can_move() {
        let (url, server) = silent_stream_server();
        let deadline = Arc::new(ReadDeadline::new());
        let agent = HttpClient::new(Duration::from_secs(1)).agent(deadline.clone());
        deadline.set(Some(Instant::now() + Duration::from_secs(5)));
        let mut body = agent.get(&url).call().unwrap().into_body().into_reader();
        let mut buf = [0u8; 16];
        assert_eq!(body.read(&mut buf).unwrap(), 3);
        deadline.set(Some(Instant::now() + Duration::from_millis(50)));
        let t0 = Instant::now();
        assert!(body.read(&mut buf).is_err());
        assert!(deadline.expired());
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        drop(body);
        server.join().unwrap();
    }

    /// The read must be blocked before the shutdown, or this would pass
    /// without testing the interruption (a shutdown that came first ends the
    /// read before it ever waits): the shutdown comes only once the reading
    /// thread is seen asleep in a call on a socket. A far deadline keeps a
    /// broken shutdown from hanging the test: it fails on `expired`.
    #[test]
    fn shutdown_interrupts_a_blocked_read() {
        let (url, server) = silent_stream_server();
        let deadline = Arc::new(ReadDeadline::new());
        let agent = HttpClient::new(Duration::from_secs(1)).agent(deadline.clone());
        let mut body = agent.get(&url).call().unwrap().into_body().into_reader();
        let mut buf = [0u8; 16];
        assert_eq!(body.read(&mut buf).unwrap(), 3);
        deadline.set(Some(Instant::now() + Duration::from_secs(20)));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            tx.send(ThreadProbe::current()).unwrap();
            body.read(&mut buf).map_err(|e| e.to_string())
        });
        let probe = rx.recv().unwrap();
        probe.wait_blocked("reading a socket", Duration::from_secs(30), is_socket);
        let t0 = Instant::now();
        agent.clone().shutdown();
        let r = reader.join().unwrap();
        assert!(!matches!(r, Ok(n) if n > 0), "{r:?}");
        assert!(
            !deadline.expired(),
            "the deadline, not the shutdown, ended the read"
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        server.join().unwrap();
    }
}
