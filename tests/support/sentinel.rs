//! A Redis Sentinel setup for tests: a master and a replica (two
//! [`RedisServer`]s) watched by sentinels (`redis-server CONF --sentinel`),
//! each on a free loopback port with its own config file in its own temp dir
//! (sentinels rewrite their config). Everything announces 127.0.0.1, and the
//! timings are short (down after 1.5 s, failover timeout 5 s), so a failover
//! takes a few seconds. Dropping it kills every process by its pid.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    free_port, fresh_temp_dir, open_log, read_log, tail, wait_until, RedisServer, POLL,
    REDIS_START_TIMEOUT,
};

/// The master name every sentinel here monitors.
pub const MASTER_NAME: &str = "citadel-test";

/// How the sentinels are told about the master (`sentinel …` lines beyond
/// monitor and the timings), and the sentinels' own password.
#[derive(Clone, Default)]
pub struct SentinelOptions {
    /// `requirepass` of the sentinels themselves (and `sentinel sentinel-pass`,
    /// so they can talk to each other).
    pub sentinel_password: Option<String>,
    /// The data nodes' password (`sentinel auth-pass`).
    pub data_password: Option<String>,
    /// Certificates (support::tls::make_certs) for talking TLS to the
    /// master (`tls-replication yes`).
    pub tls_dir: Option<PathBuf>,
    /// Listen on a TLS port only (needs `tls_dir`); otherwise plain.
    pub tls_only: bool,
    /// More lines for the sentinels' config file (e.g. ACL `user` lines).
    pub extra_conf: Vec<String>,
}

/// One sentinel process.
pub struct Sentinel {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    password: Option<String>,
}

impl Sentinel {
    /// A sentinel on a free port monitoring `127.0.0.1:master_port` with
    /// `quorum`; waits until it answers PING.
    pub fn start(master_port: u16, quorum: usize, opts: &SentinelOptions) -> Sentinel {
        let mut last = String::new();
        for _ in 0..5 {
            match Sentinel::try_start(free_port(), master_port, quorum, opts) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("could not start a sentinel: {last}");
    }

    /// [`Sentinel::start`] on the given port (one a worker already names).
    pub fn start_on(
        port: u16,
        master_port: u16,
        quorum: usize,
        opts: &SentinelOptions,
    ) -> Sentinel {
        Sentinel::try_start(port, master_port, quorum, opts)
            .unwrap_or_else(|e| panic!("could not start a sentinel on port {port}: {e}"))
    }

    fn try_start(
        port: u16,
        master_port: u16,
        quorum: usize,
        opts: &SentinelOptions,
    ) -> Result<Sentinel, String> {
        let dir = fresh_temp_dir("sentinel");
        let log = dir.join("sentinel.log");
        let conf = dir.join("sentinel.conf");
        let mut text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\n\
             sentinel announce-ip 127.0.0.1\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1500\n\
             sentinel failover-timeout {MASTER_NAME} 5000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir = dir.display()
        );
        if let Some(pw) = &opts.sentinel_password {
            text.push_str(&format!("requirepass {pw}\nsentinel sentinel-pass {pw}\n"));
        }
        if let Some(pw) = &opts.data_password {
            text.push_str(&format!("sentinel auth-pass {MASTER_NAME} {pw}\n"));
        }
        for line in &opts.extra_conf {
            text.push_str(line);
            text.push('\n');
        }
        if let Some(certs) = &opts.tls_dir {
            let f = |name: &str| certs.join(name).display().to_string();
            text.push_str(&format!(
                "tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\ntls-replication yes\n",
                f("leaf.pem"),
                f("leaf.key"),
                f("ca.pem")
            ));
            if opts.tls_only {
                text = text.replacen(
                    &format!("port {port}\n"),
                    &format!("port 0\ntls-port {port}\n"),
                    1,
                );
            }
        }
        fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let file = open_log(&log);
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("cloning log handle"))
            .stderr(file)
            .spawn()
            .map_err(|e| format!("spawning redis-server --sentinel: {e}"))?;
        let mut s = Sentinel {
            port,
            dir,
            log,
            child: Some(child),
            password: opts.sentinel_password.clone(),
        };
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                s.child = None;
                return Err(format!("exited with {status}:\n{}", tail(&s.log_text())));
            }
            // A TLS-only one (the harness speaks no TLS) is up once it listens.
            let up = if opts.tls_only {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            } else {
                s.try_conn(Duration::from_millis(200))
                    .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
            };
            if up {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                s.kill();
                return Err(format!(
                    "no PONG within {REDIS_START_TIMEOUT:?}:\n{}",
                    tail(&s.log_text())
                ));
            }
            thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    fn try_conn(&self, timeout: Duration) -> Option<redis::Connection> {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        let url = format!("redis://{auth}127.0.0.1:{}/", self.port);
        let conn = redis::Client::open(url)
            .ok()?
            .get_connection_with_timeout(timeout)
            .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        conn.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(conn)
    }

    /// The master's port as this sentinel names it now.
    pub fn master_port(&self) -> Option<u16> {
        let mut c = self.try_conn(Duration::from_secs(1))?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query(&mut c)
            .ok()?;
        addr.map(|(_, p)| p)
    }

    /// How many other sentinels and replicas this one knows of.
    fn peers(&self) -> Option<(usize, usize)> {
        let mut c = self.try_conn(Duration::from_secs(1))?;
        let sentinels: Vec<redis::Value> = redis::cmd("SENTINEL")
            .arg("sentinels")
            .arg(MASTER_NAME)
            .query(&mut c)
            .ok()?;
        let replicas: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(MASTER_NAME)
            .query(&mut c)
            .ok()?;
        let up = replicas
            .iter()
            .filter(|r| r.get("flags").is_some_and(|f| f == "slave"))
            .count();
        Some((sentinels.len(), up))
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "--- sentinel :{} log (tail) ---\n{}\n--- end of sentinel log ---",
                self.port,
                tail(&self.log_text())
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A master, a replica and `n` sentinels that know each other.
pub struct SentinelSet {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    /// Master, replica, `n` sentinels with quorum `n / 2 + 1`; returns once
    /// the replica is in sync and every sentinel knows the others and the
    /// replica (so that a failover can happen).
    pub fn start(n: usize) -> SentinelSet {
        SentinelSet::start_with(n, &SentinelOptions::default())
    }

    pub fn start_with(n: usize, opts: &SentinelOptions) -> SentinelSet {
        // requirepass is set once a server answers (RedisServer waits for a
        // PING without a password).
        let pw = opts.data_password.clone();
        let require = |port: u16| {
            if let Some(pw) = &pw {
                let mut c = data_conn(port, None).expect("connecting to set requirepass");
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("requirepass")
                    .arg(pw)
                    .query(&mut c)
                    .expect("CONFIG SET requirepass");
            }
        };
        let master = RedisServer::start();
        require(master.port());
        let master_port = master.port().to_string();
        let mut args = vec![
            "--replicaof",
            "127.0.0.1",
            &master_port,
            "--replica-announce-ip",
            "127.0.0.1",
        ];
        if let Some(pw) = &opts.data_password {
            args.extend_from_slice(&["--masterauth", pw]);
        }
        let replica = RedisServer::start_with(&args);
        wait_until("the replica in sync", Duration::from_secs(30), || {
            let mut c = data_conn(replica.port(), None)?;
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
            info.contains("master_link_status:up").then_some(())
        });
        require(replica.port());
        if let Some(pw) = &opts.data_password {
            // The master must reach the promoted replica too, after a failover.
            let mut c = data_conn(master.port(), Some(pw)).expect("master");
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("masterauth")
                .arg(pw)
                .query(&mut c)
                .expect("CONFIG SET masterauth");
        }
        let quorum = n / 2 + 1;
        let sentinels: Vec<Sentinel> = (0..n)
            .map(|_| Sentinel::start(master.port(), quorum, opts))
            .collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
        };
        set.wait_known(n);
        set
    }

    /// Until every sentinel knows the `n - 1` others and one live replica.
    pub fn wait_known(&self, n: usize) {
        wait_until(
            "the sentinels to know each other and the replica",
            Duration::from_secs(60),
            || {
                self.sentinels
                    .iter()
                    .all(|s| s.peers() == Some((n - 1, 1)))
                    .then_some(())
            },
        );
    }

    /// `redis+sentinel://127.0.0.1:P1,…/citadel-test`, with `userinfo@` if
    /// given.
    pub fn url(&self, userinfo: Option<&str>) -> String {
        sentinel_url(
            &self
                .sentinels
                .iter()
                .map(Sentinel::port)
                .collect::<Vec<_>>(),
            userinfo,
        )
    }

    /// Until every sentinel names `port` as the master.
    pub fn wait_master(&self, port: u16, timeout: Duration) {
        wait_until(
            &format!("every sentinel to name 127.0.0.1:{port} as the master"),
            timeout,
            || {
                self.sentinels
                    .iter()
                    .all(|s| s.master_port() == Some(port))
                    .then_some(())
            },
        );
    }
}

/// The Sentinel URL naming sentinels on these loopback ports.
pub fn sentinel_url(ports: &[u16], userinfo: Option<&str>) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    format!("redis+sentinel://{auth}{}/{MASTER_NAME}", hosts.join(","))
}

/// A connection to a data node on `port`, with its password if any.
pub fn data_conn(port: u16, password: Option<&str>) -> Option<redis::Connection> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let conn = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/"))
        .ok()?
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    Some(conn)
}
