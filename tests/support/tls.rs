//! TLS for tests (tests/tls.rs, tests/sentinel.rs): a throwaway CA and a
//! certificate for 127.0.0.1 signed by it, made with `openssl`, and a
//! redis-server that listens only on a TLS port.

use super::{free_port, wait_until};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Whether an `openssl` runs at all.
pub fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir`; panics with
/// openssl's own words when a step fails.
pub fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=citadel-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
    ]);
}

pub struct TlsRedis {
    pub child: Child,
    pub port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS redis-server on a free port; `Err(log)` when redis-server cannot do
/// TLS (a build without it exits on `--tls-port`).
pub fn start_tls_redis(dir: &Path) -> Result<TlsRedis, String> {
    let mut last_log = String::new();
    for _ in 0..3 {
        match try_start_tls_redis(dir) {
            Ok(server) => return Ok(server),
            // The port was taken between the probe and the bind: another one.
            Err(log) if log.contains("Address already in use") => last_log = log,
            // Built without TLS, it does not know the directive.
            Err(log) if log.contains("Bad directive") => return Err(log),
            Err(log) => panic!("the TLS redis-server exited:\n{log}"),
        }
    }
    panic!("no free port for the TLS redis-server:\n{last_log}");
}

pub fn try_start_tls_redis(dir: &Path) -> Result<TlsRedis, String> {
    let port = free_port();
    let arg = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let log_path = dir.join("redis.log");
    let log = std::fs::File::create(&log_path).expect("creating the redis log");
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &arg("leaf.pem"),
            "--tls-key-file",
            &arg("leaf.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &arg("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no", "--dir", &arg("")])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning redis-server");
    let mut server = TlsRedis { child, port };
    let listening = wait_until(
        "the TLS redis-server to listen or exit",
        super::REDIS_START_TIMEOUT,
        || {
            if let Ok(Some(_)) = server.child.try_wait() {
                return Some(false);
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(true)
        },
    );
    if listening {
        Ok(server)
    } else {
        Err(std::fs::read_to_string(&log_path).unwrap_or_default())
    }
}
