//! `rediss://`: the agent talks TLS to Redis (rustls with the ring provider
//! installed at start; server certificates checked against the system roots,
//! which `SSL_CERT_FILE` can point elsewhere). Runs a real TLS redis-server
//! with a throwaway CA made by `openssl` (scripts/deps.sh installs it). Where
//! `openssl` is missing or `redis-server` was built without TLS it says
//! SKIPPED loudly, and under `CI=true` it fails instead.

mod support;

use std::time::Duration;
use support::tls::{have_openssl, make_certs, start_tls_redis};
use support::{citadel_cmd, fresh_temp_dir, skip_unless_ci, wait_until, Citadel};

const TEST: &str = "rediss_url_runs_jobs_over_tls_and_an_untrusted_server_is_refused_clearly";

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
