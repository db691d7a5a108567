//! `rediss://`: the agent talks TLS to Redis (rustls with the ring provider
//! installed at start; server certificates checked against the system roots,
//! which `SSL_CERT_FILE` can point elsewhere). Runs a real TLS redis-server
//! with a throwaway CA made by `openssl` (scripts/deps.sh installs it). Where
//! `openssl` is missing or `redis-server` was built without TLS it says
//! SKIPPED loudly, and under `CI=true` it fails instead.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{citadel_cmd, free_port, fresh_temp_dir, skip_unless_ci, wait_until, Citadel};

const TEST: &str = "rediss_url_runs_jobs_over_tls_and_an_untrusted_server_is_refused_clearly";

/// Whether an `openssl` runs at all.
fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir`; panics with
/// openssl's own words when a step fails.
fn make_certs(dir: &Path) {
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

struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS redis-server on a free port; `Err(log)` when redis-server cannot do
/// TLS (a build without it exits on `--tls-port`).
fn start_tls_redis(dir: &Path) -> Result<TlsRedis, String> {
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

fn try_start_tls_redis(dir: &Path) -> Result<TlsRedis, String> {
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
        support::REDIS_START_TIMEOUT,
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

#[test]
fn rediss_url_runs_jobs_over_tls_and_an_untrusted_server_is_refused_clearly() {
    if !have_openssl() {
        skip_unless_ci(
            TEST,
            "openssl is not installed (scripts/deps.sh installs it; apt-get install openssl)",
        );
        return;
    }
    let dir = fresh_temp_dir("tls");
    make_certs(&dir);
    let server = match start_tls_redis(&dir) {
        Ok(server) => server,
        Err(log) => {
            skip_unless_ci(
                TEST,
                &format!(
                    "this redis-server cannot do TLS (it exited on --tls-port): {}",
                    log.trim()
                ),
            );
            return;
        }
    };
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    let ca = dir.join("ca.pem").to_string_lossy().into_owned();

    // Trusted through SSL_CERT_FILE: a job runs end to end over TLS.
    let _w = Citadel::spawn(
        &["work", "--node-name", "tls-node"],
        &[
            ("CITADEL_REDIS_URL", &url),
            ("SSL_CERT_FILE", &ca),
            ("RUST_LOG", "info"),
        ],
    );
    let out = wait_until("a job over TLS", Duration::from_secs(20), || {
        let out = citadel_cmd(&[
            "submit",
            "--type",
            "echo",
            "--payload",
            r#"{"chunks":1}"#,
            "--follow",
        ])
        .env("CITADEL_REDIS_URL", &url)
        .env("SSL_CERT_FILE", &ca)
        .output()
        .unwrap();
        out.status.success().then_some(out)
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "chunk 0\n{\"chunks\":1}\n"
    );

    // Not trusted (system roots only): a one-line certificate error, exit 1.
    let out = citadel_cmd(&["submit", "--type", "echo", "--redis-timeout", "2s"])
        .env("CITADEL_REDIS_URL", &url)
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
