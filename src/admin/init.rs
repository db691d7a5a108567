//! `citadel init` and `citadel service`: the command glue around
//! `node::provision` (device authorization, stored credentials) and
//! `node::systemd`. Owns what the operator sees: the code and URL (plain
//! text, a QR code on a terminal, or `--json` lines), the outcome, exit
//! codes. Never prints or logs a credential.

use super::Exit;
use crate::cli::{Init, Service, ServiceAction};
use crate::config::Settings;
use crate::node::provision::{self, AuthClient, Credentials, Failure};
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Read, Write};
use std::time::Instant;

/// One `--json` line on stdout, flushed at once (a reader acts on it while
/// init still waits).
fn emit(line: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub fn run(settings: &Settings, init: &Init) -> Result<i32, Exit> {
    let path = &settings.config_file;
    let config = provision::read_config(path).map_err(|e| Exit(1, e))?;
    if provision::is_provisioned(&config) && !init.relogin {
        if init.json {
            emit(json!({"event": "already_provisioned", "config": path}));
        } else {
            say(&format!(
                "this node is already provisioned (device_api_token in {}); nothing was changed \
                 (citadel init --relogin replaces the credentials)",
                path.display()
            ));
        }
        return Ok(0);
    }
    if init.token.is_some() || init.token_file.is_some() {
        let token = read_token(init)?;
        let mut m = Map::new();
        m.insert("device_api_token".into(), Value::String(token));
        if let Some(n) = &settings.nexus_url {
            m.insert("nexus_url".into(), Value::String(n.clone()));
        }
        if settings.redis_url_set {
            m.insert(
                "redis_url".into(),
                Value::String(settings.redis_url.clone()),
            );
        }
        return finish(settings, init, Credentials(m));
    }
    let Some(auth_url) = &settings.auth_url else {
        return Err(Exit(
            2,
            "citadel init needs --auth-url URL (or CITADEL_AUTH_URL, or auth_url in the config \
             file), or --token-file PATH for a token you already have"
                .into(),
        ));
    };
    let started = Instant::now();
    let deadline = started + settings.init_timeout;
    let client = AuthClient::new(auth_url, settings.nexus_timeout);
    let code = match client.start(deadline) {
        Ok(c) => c,
        Err(e) => return Err(fail(init, Failure::Error(e))),
    };
    if init.json {
        emit(json!({
            "event": "code",
            "user_code": code.user_code,
            "verification_uri": code.verification_uri,
            "verification_uri_complete": code.verification_uri_complete,
            "expires_in": code.expires_in.map(|d| d.as_secs()),
            "interval": code.interval.as_secs(),
        }));
    } else {
        let mut text = format!(
            "To authorize this node, open\n\n    {}\n\nand confirm the code  {}\n",
            code.url(),
            code.user_code
        );
        if std::io::stdout().is_terminal() {
            if let Some(qr) = provision::qr_text(code.url()) {
                text.push('\n');
                text.push_str(&qr);
            }
        }
        let within = match code.expires_in {
            Some(e) => e.min(settings.init_timeout),
            None => settings.init_timeout,
        };
        text.push_str(&format!(
            "\nWaiting for approval (at most {})…",
            crate::config::format_duration(within)
        ));
        say(&text);
    }
    match provision::wait_for_approval(&client, &code, started, settings.init_timeout) {
        Ok(creds) => finish(settings, init, creds),
        Err(f) => Err(fail(init, f)),
    }
}

/// The token of `--token` / `--token-file`, checked.
fn read_token(init: &Init) -> Result<String, Exit> {
    let text = match (&init.token, &init.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .take(64 << 10)
                .read_to_string(&mut s)
                .map_err(|e| Exit(2, format!("--token-file -: cannot read stdin: {e}")))?;
            s
        }
        (None, Some(p)) => {
            let meta = std::fs::metadata(p)
                .map_err(|e| Exit(2, format!("--token-file {}: {e}", p.display())))?;
            if meta.len() > 64 << 10 {
                return Err(Exit(
                    2,
                    format!("--token-file {}: too large for a token", p.display()),
                ));
            }
            std::fs::read_to_string(p)
                .map_err(|e| Exit(2, format!("--token-file {}: {e}", p.display())))?
        }
        (None, None) => unreachable!("read_token without --token or --token-file"),
    };
    provision::check_token(&text).map_err(|e| Exit(2, format!("--token: {e}")))
}

/// Stores the credentials and says so.
fn finish(settings: &Settings, init: &Init, creds: Credentials) -> Result<i32, Exit> {
    let path = &settings.config_file;
    if let Err(e) = provision::store(path, &creds, init.relogin) {
        return Err(fail(init, Failure::Error(e)));
    }
    let nexus = creds.get("nexus_url");
    let org = creds.get("org_id");
    let restarted = crate::node::systemd::restart_for_credentials(settings);
    if init.json {
        let service = match &restarted {
            None => json!(null),
            Some(Ok(_)) => json!({"restarted": true}),
            Some(Err(e)) => json!({"restarted": false, "error": e}),
        };
        emit(json!({
            "event": "authorized",
            "config": path,
            "org_id": org,
            "nexus_url": nexus,
            "stored": creds.0.keys().collect::<Vec<_>>(),
            "service": service,
        }));
    } else {
        let mut text = format!("Node authorized: credentials stored in {}", path.display());
        if let Some(o) = org {
            text.push_str(&format!(" (org {o})"));
        }
        if let Some(n) = nexus {
            text.push_str(&format!("; Nexus: {n}"));
        }
        match &restarted {
            Some(Ok(done)) => text.push_str(&format!("\n{done}")),
            Some(Err(e)) => text.push_str(&format!(
                "\nThe citadel service is installed, but restarting it failed ({e}): run systemctl restart citadel"
            )),
            None => {}
        }
        if restarted.is_none()
            && std::path::Path::new("/etc/systemd/system")
                .join(crate::node::systemd::UNIT_NAME)
                .exists()
        {
            text.push_str(
                "\nThe citadel service is installed: restart it to use them (systemctl restart citadel)",
            );
        }
        say(&text);
    }
    Ok(0)
}

/// The failure as the command's error (exit 1); with `--json`, also as the
/// outcome line.
fn fail(init: &Init, f: Failure) -> Exit {
    if init.json {
        emit(json!({"event": "failed", "reason": f.reason(), "message": f.to_string()}));
    }
    Exit(1, format!("init: {f}"))
}

/// `citadel service install|status|uninstall`.
pub fn service(settings: &Settings, s: &Service) -> Result<i32, Exit> {
    use crate::node::systemd;
    let lines = match s.action {
        ServiceAction::Install => systemd::install(settings, &s.request),
        ServiceAction::Uninstall => systemd::uninstall(settings, &s.request),
        ServiceAction::Status => {
            return systemd::status(settings, &s.request).map_err(|e| Exit(1, e))
        }
    }
    .map_err(|e| Exit(1, e))?;
    for l in lines {
        say(&l);
    }
    Ok(0)
}
