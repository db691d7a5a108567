//! `rediss://`: the agent talks TLS to Redis (rustls with the ring provider
//! installed at start; server certificates checked against the system roots,
//! which `SSL_CERT_FILE` can point elsewhere). Runs a real TLS redis-server
//! with a throwaway CA made by `openssl`; says SKIPPED loudly where either
//! tool cannot do TLS.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{citadel_cmd, free_port, fresh_temp_dir, wait_until, Citadel};

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir`.
fn make_certs(dir: &Path) -> bool {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
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
    ]) && run(&[
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
    ]) && run(&[
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
    ])
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

fn start_tls_redis(dir: &Path) -> Option<TlsRedis> {
    let port = free_port();
    let arg = |f: &str| dir.join(f).to_string_lossy().into_owned();
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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut server = TlsRedis { child, port };
    let listening = (0..500).any(|_| {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
        false
    });
    // A redis-server built without TLS exits on --tls-port.
    (listening && matches!(server.child.try_wait(), Ok(None))).then_some(server)
}

#[test]
fn rediss_url_runs_jobs_over_tls_and_an_untrusted_server_is_refused_clearly() {
    let dir = fresh_temp_dir("tls");
    let server = if make_certs(&dir) {
        start_tls_redis(&dir)
    } else {
        None
    };
    let Some(server) = server else {
        eprintln!("SKIPPED: rediss:// test needs openssl and a redis-server built with TLS");
        return;
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
