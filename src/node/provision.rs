//! Provisioning: the device authorization of `citadel init` (RFC 8628 as
//! docs/PROTOCOL.md §6 has it) and the node's stored credentials.
//!
//! Owns the two requests to the auth server (`device-auth/start`,
//! `device-auth/token`), the parsing of their answers (pure functions over
//! status and body, so garbage is tested byte by byte), the poll schedule
//! (`interval`, `slow_down` +5 s, backoff on network errors and 5xx, the
//! code's expiry and the overall deadline) and merging credentials into the
//! config file (atomic, 0600 file / 0700 directory). It prints nothing:
//! `admin::init` shows what it returns. No credential (the device code, the
//! token, a Redis password) is ever put in a log line or an error message.

use crate::backoff::Backoff;
use crate::config::{Secret, Settings};
use crate::job::json_kind;
use serde_json::{json, Map, Value};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `client_id` of the start request.
pub const CLIENT_ID: &str = "citadel-cli";
/// `grant_type` of the token request (RFC 8628 §3.4).
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";
pub const START_PATH: &str = "/api/fabric/device-auth/start";
pub const TOKEN_PATH: &str = "/api/fabric/device-auth/token";
/// What `slow_down` adds to the interval (RFC 8628 §3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// RFC 8628 §3.2: without `interval`, 5 s.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// An `interval` below this is raised to it: a server saying 0 must not be
/// hammered.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait after failed polls (network errors, 5xx).
const RETRY_CAP: Duration = Duration::from_secs(60);
/// Largest answer read from the auth server.
const MAX_BODY: u64 = 1 << 20;
/// Largest token accepted (it goes into an HTTP header).
const MAX_TOKEN: usize = 4096;

/// The keys of an approval stored in the config file; `--relogin` removes
/// them all before storing the new ones. Anything else in the approval is
/// not stored (a key that is also a setting must not be set by the server).
pub const CREDENTIAL_KEYS: &[&str] = &[
    "device_api_token",
    "nexus_url",
    "redis_url",
    "api_base_url",
    "org_id",
    "node_id",
    "device_id",
];

/// A token's text checked: non-empty, at most 4096 bytes, printable ASCII
/// without spaces (it is sent as `Authorization: Bearer <token>`). The error
/// never repeats the token.
pub fn check_token(v: &str) -> Result<String, String> {
    let t = v.trim();
    if t.is_empty() {
        return Err("the token is empty".into());
    }
    if t.len() > MAX_TOKEN {
        return Err(format!(
            "the token is {} bytes long (at most {MAX_TOKEN})",
            t.len()
        ));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token has spaces, control or non-ASCII characters".into());
    }
    Ok(t.to_owned())
}

/// The answer to `device-auth/start`.
#[derive(Clone)]
pub struct DeviceCode {
    /// Secret between this node and the server: never shown.
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    /// `None`: the server gave no `expires_in`.
    pub expires_in: Option<Duration>,
    pub interval: Duration,
}

impl fmt::Debug for DeviceCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCode")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl DeviceCode {
    /// The URL to show: `verification_uri_complete` when given.
    pub fn url(&self) -> &str {
        self.verification_uri_complete
            .as_deref()
            .unwrap_or(&self.verification_uri)
    }
}

/// An approval: the credentials as they will be stored (only
/// [`CREDENTIAL_KEYS`]). `Debug` shows the keys, never the values.
#[derive(Clone, PartialEq)]
pub struct Credentials(pub Map<String, Value>);

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?})", self.0.keys().collect::<Vec<_>>())
    }
}

impl Credentials {
    pub fn get(&self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    /// Checks what the agent will read back as settings (`nexus_url`,
    /// `redis_url`, `device_api_token`): a bad one would stop every later
    /// command, so it is refused before anything is stored.
    fn check(&self) -> Result<(), String> {
        let mut s = Settings::default();
        for key in ["device_api_token", "nexus_url", "redis_url"] {
            if let Some(v) = self.get(key) {
                s.set(&key.replace('_', "-"), &v)
                    .map_err(|e| format!("its {key} is unusable: {e}"))?;
            }
        }
        Ok(())
    }
}

/// How one poll of `device-auth/token` ended.
#[derive(Debug)]
pub enum Poll {
    /// `authorization_pending`: ask again after the interval.
    Pending,
    /// `slow_down`: ask again, 5 s more apart from now on.
    SlowDown,
    Approved(Credentials),
    /// No usable answer that may change (network error, 5xx, 429): retried
    /// with backoff.
    Retry(String),
    /// The end: expired, denied, or an answer that cannot be used.
    Stop(Failure),
}

/// Why `citadel init` did not get credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// `expired_token`, or the code's `expires_in` passed.
    Expired,
    /// `access_denied`.
    Denied,
    /// The overall deadline (`init-timeout`) passed.
    TimedOut(Duration),
    /// Anything else; the message says what.
    Error(String),
}

impl Failure {
    /// A short machine-readable name (`--json`'s `reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Expired => "expired_token",
            Failure::Denied => "access_denied",
            Failure::TimedOut(_) => "timeout",
            Failure::Error(_) => "error",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Expired => f.write_str(
                "the code expired before it was approved; run 'citadel init' again for a new one",
            ),
            Failure::Denied => f.write_str(
                "the request was denied (access_denied) at the verification page; nothing was stored",
            ),
            Failure::TimedOut(d) => write!(
                f,
                "no approval within {} (--init-timeout); run 'citadel init' again",
                crate::config::format_duration(*d)
            ),
            Failure::Error(e) => f.write_str(e),
        }
    }
}

/// A body's JSON object, or what it is instead (never its text when it may
/// hold credentials: `show_body` false).
fn object(body: &str, what: &str, show_body: bool) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!(
            "the auth server's {what} is JSON but not an object ({})",
            json_kind(&other)
        )),
        Err(_) if show_body => Err(format!(
            "the auth server's {what} is not JSON: {}",
            excerpt(body)
        )),
        Err(_) => Err(format!(
            "the auth server's {what} is not JSON ({} bytes)",
            body.len()
        )),
    }
}

/// The first 200 characters of a body, on one line.
fn excerpt(body: &str) -> String {
    let printable: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let t = crate::clip::one_line(&printable, 200);
    if t.is_empty() {
        "(empty)".into()
    } else {
        t
    }
}

/// A required string field.
fn string(m: &Map<String, Value>, key: &str, what: &str) -> Result<String, String> {
    match m.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Some(Value::String(_)) => Err(format!("the auth server's {what} has an empty {key}")),
        Some(other) => Err(format!(
            "the auth server's {what} has {key} as {}, not a string",
            json_kind(other)
        )),
        None => Err(format!("the auth server's {what} has no {key}")),
    }
}

/// An optional whole number of seconds.
fn seconds(m: &Map<String, Value>, key: &str, what: &str) -> Result<Option<Duration>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(s) if s <= 86_400 * 365 => Ok(Some(Duration::from_secs(s))),
            _ => Err(format!(
                "the auth server's {what} has {key} {n}, not a whole number of seconds"
            )),
        },
        Some(other) => Err(format!(
            "the auth server's {what} has {key} as {}, not a number",
            json_kind(other)
        )),
    }
}

/// The answer to `POST device-auth/start`.
pub fn parse_start(status: u16, body: &str) -> Result<DeviceCode, String> {
    const WHAT: &str = "answer to device-auth/start";
    if !(200..300).contains(&status) {
        let detail = object(body, WHAT, true)
            .ok()
            .and_then(|m| error_text(&m))
            .unwrap_or_else(|| excerpt(body));
        return Err(format!(
            "the auth server refused to start (HTTP {status}): {detail}"
        ));
    }
    let m = object(body, WHAT, true)?;
    let uri = string(&m, "verification_uri", WHAT)?;
    check_url(&uri, "verification_uri")?;
    let complete = match m.get("verification_uri_complete") {
        None | Some(Value::Null) => None,
        Some(_) => {
            let u = string(&m, "verification_uri_complete", WHAT)?;
            check_url(&u, "verification_uri_complete")?;
            Some(u)
        }
    };
    let user_code = string(&m, "user_code", WHAT)?;
    if user_code.len() > 64 || user_code.chars().any(char::is_control) {
        return Err(format!(
            "the auth server's {WHAT} has a user_code that cannot be shown"
        ));
    }
    Ok(DeviceCode {
        device_code: Secret(string(&m, "device_code", WHAT)?),
        user_code,
        verification_uri: uri,
        verification_uri_complete: complete,
        expires_in: seconds(&m, "expires_in", WHAT)?.filter(|d| !d.is_zero()),
        interval: seconds(&m, "interval", WHAT)?
            .unwrap_or(DEFAULT_INTERVAL)
            .max(MIN_INTERVAL),
    })
}

/// A URL shown to the user must be http(s) and printable: a terminal escape
/// in it would be written to the operator's terminal.
fn check_url(u: &str, key: &str) -> Result<(), String> {
    let ok = (u.starts_with("https://") || u.starts_with("http://"))
        && u.len() <= 2048
        && !u.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the auth server's {key} is not an http(s) URL that can be shown"
        ))
    }
}

/// `error` and, when given, `error_description`, for a message.
fn error_text(m: &Map<String, Value>) -> Option<String> {
    let code = m.get("error")?.as_str()?;
    Some(match m.get("error_description").and_then(Value::as_str) {
        Some(d) => format!("{} ({})", excerpt(code), excerpt(d)),
        None => excerpt(code),
    })
}

/// The answer to one `POST device-auth/token`.
pub fn parse_token(status: u16, body: &str) -> Poll {
    const WHAT: &str = "answer to device-auth/token";
    match status {
        200..=299 => {
            let m = match object(body, "approval", false) {
                Ok(m) => m,
                Err(e) => return Poll::Stop(Failure::Error(e)),
            };
            match credentials(&m) {
                Ok(c) => Poll::Approved(c),
                Err(e) => Poll::Stop(Failure::Error(e)),
            }
        }
        429 | 500..=599 => Poll::Retry(format!("HTTP {status}: {}", excerpt(body))),
        _ => {
            let m = match object(body, WHAT, true) {
                Ok(m) => m,
                Err(e) => return Poll::Stop(Failure::Error(format!("HTTP {status}: {e}"))),
            };
            match m.get("error").and_then(Value::as_str) {
                Some("authorization_pending") => Poll::Pending,
                Some("slow_down") => Poll::SlowDown,
                Some("expired_token") => Poll::Stop(Failure::Expired),
                Some("access_denied") => Poll::Stop(Failure::Denied),
                Some(_) => Poll::Stop(Failure::Error(format!(
                    "the auth server refused the device code (HTTP {status}): {}",
                    error_text(&m).unwrap_or_default()
                ))),
                None => Poll::Stop(Failure::Error(format!(
                    "the auth server's {WHAT} (HTTP {status}) has no error code: {}",
                    excerpt(body)
                ))),
            }
        }
    }
}

/// The stored part of an approval; `device_api_token` (or RFC 6749's
/// `access_token`) is required.
fn credentials(m: &Map<String, Value>) -> Result<Credentials, String> {
    const WHAT: &str = "approval";
    let token = match (m.get("device_api_token"), m.get("access_token")) {
        (Some(_), _) => string(m, "device_api_token", WHAT)?,
        (None, Some(_)) => string(m, "access_token", WHAT)?,
        (None, None) => return Err(format!("the auth server's {WHAT} has no device_api_token")),
    };
    let token = check_token(&token).map_err(|e| format!("the auth server's {WHAT}: {e}"))?;
    let mut out = Map::new();
    out.insert("device_api_token".into(), Value::String(token));
    for key in &CREDENTIAL_KEYS[1..] {
        match m.get(*key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.trim().is_empty() => {}
            Some(v @ (Value::String(_) | Value::Number(_))) => {
                out.insert((*key).into(), v.clone());
            }
            Some(other) => {
                return Err(format!(
                    "the auth server's {WHAT} has {key} as {}, not a string",
                    json_kind(other)
                ))
            }
        }
    }
    let c = Credentials(out);
    c.check()
        .map_err(|e| format!("the auth server's {WHAT}: {e}"))?;
    Ok(c)
}

/// The auth server's HTTP side: one agent (src/http.rs's control-plane
/// setup), each request bounded by `nexus-timeout` and by the deadline.
pub struct AuthClient {
    agent: ureq::Agent,
    base: String,
    timeout: Duration,
}

impl AuthClient {
    pub fn new(base: &str, timeout: Duration) -> AuthClient {
        AuthClient {
            agent: crate::http::control_plane_agent(base, timeout),
            base: base.trim_end_matches('/').to_owned(),
            timeout,
        }
    }

    /// POST `body` as JSON to `path`: the status and the body text (or why
    /// the body could not be read: cut off, over 1 MiB, not UTF-8), or why
    /// there is no answer.
    fn post(
        &self,
        path: &str,
        body: &Value,
        deadline: Instant,
    ) -> Result<(u16, Result<String, String>), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = self.timeout.min(left).max(Duration::from_millis(1));
        let mut resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Accept", "application/json")
            .content_type("application/json")
            .send(body.to_string().as_str())
            .map_err(|e| format!("no answer: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| {
                format!("HTTP {status} with an unreadable body (at most 1 MiB of UTF-8): {e}")
            });
        Ok((status, text))
    }

    /// `POST device-auth/start`.
    pub fn start(&self, deadline: Instant) -> Result<DeviceCode, String> {
        let body = json!({
            "client_id": CLIENT_ID,
            "hostname": crate::config::hostname(),
            "machine_id": machine_id(),
        });
        let (status, text) = self
            .post(START_PATH, &body, deadline)
            .map_err(|e| format!("cannot reach the auth server at {}: {e}", self.base))?;
        let text = text.map_err(|e| format!("the auth server at {} answered {e}", self.base))?;
        parse_start(status, &text)
    }

    /// One `POST device-auth/token`.
    pub fn poll(&self, code: &DeviceCode, deadline: Instant) -> Poll {
        // client_id: RFC 8628 §3.4 asks it of a client that does not
        // authenticate (this one); PROTOCOL.md §6 leaves it out.
        let body = json!({
            "device_code": code.device_code.0,
            "grant_type": GRANT_TYPE,
            "client_id": CLIENT_ID,
        });
        match self.post(TOKEN_PATH, &body, deadline) {
            Ok((status, Ok(text))) => parse_token(status, &text),
            // A server in trouble may send anything: ask again.
            Ok((status @ (429 | 500..=599), Err(e))) => Poll::Retry(format!("HTTP {status}: {e}")),
            Ok((_, Err(e))) => Poll::Stop(Failure::Error(format!(
                "the auth server answered the token request with {e}"
            ))),
            Err(e) => Poll::Retry(e),
        }
    }
}

/// /etc/machine-id (or D-Bus's copy), if there is one.
pub fn machine_id() -> Option<String> {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty() && s.len() <= 128)
}

/// Polls until approved, expired, denied or `timeout` passed (from
/// `started`). Waits `interval` between polls (+5 s for each `slow_down`);
/// after network errors and 5xx, at least that and a growing backoff.
pub fn wait_for_approval(
    client: &AuthClient,
    code: &DeviceCode,
    started: Instant,
    timeout: Duration,
) -> Result<Credentials, Failure> {
    let deadline = started + timeout;
    let expiry = code.expires_in.map(|e| started + e);
    let stop = expiry.map_or(deadline, |e| e.min(deadline));
    let stop_reason = || {
        if expiry.is_some_and(|e| e <= deadline) {
            Failure::Expired
        } else {
            Failure::TimedOut(timeout)
        }
    };
    let mut interval = code.interval;
    let mut backoff = Backoff::new(interval, RETRY_CAP);
    let mut wait = interval;
    loop {
        let next = Instant::now() + wait;
        if next >= stop {
            std::thread::sleep(stop.saturating_duration_since(Instant::now()));
            return Err(stop_reason());
        }
        std::thread::sleep(wait);
        match client.poll(code, stop) {
            Poll::Approved(c) => return Ok(c),
            Poll::Pending => {
                backoff.reset();
                wait = interval;
            }
            Poll::SlowDown => {
                backoff.reset();
                interval += SLOW_DOWN_STEP;
                log::info!(
                    "the auth server asked to slow down: polling every {}",
                    crate::config::format_duration(interval)
                );
                wait = interval;
            }
            Poll::Retry(why) => {
                if Instant::now() >= stop {
                    return Err(stop_reason());
                }
                wait = interval.max(backoff.next_delay());
                log::warn!(
                    "auth server: {why}; asking again in {}",
                    crate::config::format_duration(Duration::from_millis(wait.as_millis() as u64))
                );
            }
            Poll::Stop(f) => return Err(f),
        }
    }
}

// ---------------------------------------------------------------------------
// The config file
// ---------------------------------------------------------------------------

/// The config file's JSON object: empty when the file does not exist or is
/// empty; an error when it is anything but an object (it is not
/// overwritten then).
pub fn read_config(path: &Path) -> Result<Map<String, Value>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(format!(
            "{} is not a JSON object; fix or move it and run 'citadel init' again (nothing was changed)",
            path.display()
        )),
    }
}

/// Whether the config already holds a device token.
pub fn is_provisioned(config: &Map<String, Value>) -> bool {
    config
        .get("device_api_token")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.trim().is_empty())
}

/// Merges `creds` into the config file at `path`, keeping every other key;
/// with `replace`, the old credential keys go first. Written atomically:
/// a temp file in the same directory (0600), fsynced, renamed over the old
/// one, the directory fsynced. The directory is created 0700 when missing.
/// As root, in a directory owned by another user (the service user's
/// `/etc/citadel`, see `node::systemd`), the file is given to that user so
/// that the service can read it.
pub fn store(path: &Path, creds: &Credentials, replace: bool) -> Result<(), String> {
    let mut config = read_config(path)?;
    if replace {
        for key in CREDENTIAL_KEYS {
            config.remove(*key);
        }
    }
    for (k, v) in &creds.0 {
        config.insert(k.clone(), v.clone());
    }
    let mut text = serde_json::to_string_pretty(&Value::Object(config))
        .map_err(|e| format!("cannot encode the config: {e}"))?;
    text.push('\n');
    write_private(path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `bytes` to `path` atomically, mode 0600, its directory 0700 if created.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.json".into());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        crate::backoff::random_u64()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let owner = std::fs::metadata(&dir)?;
        if crate::config::is_root() && owner.uid() != 0 {
            std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One line for `citadel status`: whether this node holds credentials, and
/// where; the token never, a Redis password redacted.
pub fn describe(settings: &Settings) -> String {
    let path = settings.config_file.display();
    let config = read_config(&settings.config_file).unwrap_or_default();
    if settings.device_api_token.is_none() {
        return format!("credentials: none (no device_api_token in {path}; run 'citadel init')");
    }
    let mut parts = vec!["device_api_token ***".to_owned()];
    if let Some(org) = config.get("org_id") {
        parts.push(format!(
            "org {}",
            org.as_str().map_or_else(|| org.to_string(), str::to_owned)
        ));
    }
    if let Some(n) = &settings.nexus_url {
        parts.push(format!("nexus {n}"));
    }
    if settings.redis_url_set {
        parts.push(format!(
            "redis {}",
            crate::config::redact_password(&settings.redis_url)
        ));
    }
    format!("credentials: {} (from {path})", parts.join(", "))
}

/// The URL as a QR code drawn with Unicode half blocks (two modules per
/// character), dark on light with a quiet zone; `None` when it does not fit.
pub fn qr_text(url: &str) -> Option<String> {
    let code = qrcode::QrCode::with_error_correction_level(url, qrcode::EcLevel::L).ok()?;
    let w = code.width();
    let colors = code.to_colors();
    let quiet = 2usize;
    let size = w + 2 * quiet;
    let dark = |x: usize, y: usize| -> bool {
        if x < quiet || y < quiet || x >= w + quiet || y >= w + quiet {
            return false;
        }
        colors[(y - quiet) * w + (x - quiet)] == qrcode::Color::Dark
    };
    let mut out = String::new();
    let mut y = 0;
    while y < size {
        for x in 0..size {
            // Light modules are drawn as blocks (a dark terminal shows them
            // light); dark modules as spaces.
            let top = !dark(x, y);
            let bottom = y + 1 < size && !dark(x, y + 1);
            out.push(match (top, bottom) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push('\n');
        y += 2;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"{"device_code":"dc-secret","user_code":"ABCD-EFGH","verification_uri":"https://auth.example/device","verification_uri_complete":"https://auth.example/device?code=ABCD-EFGH","expires_in":900,"interval":5}"#;

    #[test]
    fn a_start_answer_is_read_and_checked() {
        let c = parse_start(200, START).unwrap();
        assert_eq!(c.user_code, "ABCD-EFGH");
        assert_eq!(c.url(), "https://auth.example/device?code=ABCD-EFGH");
        assert_eq!(c.expires_in, Some(Duration::from_secs(900)));
        assert_eq!(c.interval, Duration::from_secs(5));
        assert!(!format!("{c:?}").contains("dc-secret"));
        let c = parse_start(
            200,
            r#"{"device_code":"d","user_code":"U","verification_uri":"http://x/d","interval":0}"#,
        )
        .unwrap();
        assert_eq!(c.url(), "http://x/d");
        assert_eq!(c.interval, MIN_INTERVAL);
        assert_eq!(c.expires_in, None);
        let cases = [
            ("not json", "not JSON: not json"),
            ("[1]", "not an object (an array)"),
            ("", "not JSON: (empty)"),
            (r#"{"user_code":"U","verification_uri":"http://x"}"#, "no device_code"),
            (
                r#"{"device_code":1,"user_code":"U","verification_uri":"http://x"}"#,
                "device_code as a number",
            ),
            (
                r#"{"device_code":"d","user_code":"U","verification_uri":"http://x","interval":"5"}"#,
                "interval as a string",
            ),
            (
                r#"{"device_code":"d","user_code":"U","verification_uri":"http://x","expires_in":-3}"#,
                "not a whole number",
            ),
            (
                r#"{"device_code":"d","user_code":"U","verification_uri":"javascript:x"}"#,
                "not an http(s) URL",
            ),
            (
                "{\"device_code\":\"d\",\"user_code\":\"U\",\"verification_uri\":\"http://x/\\u001b[2J\"}",
                "not an http(s) URL",
            ),
        ];
        for (body, want) in cases {
            let e = parse_start(200, body).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = parse_start(503, "<html>down</html>").unwrap_err();
        assert!(e.contains("HTTP 503") && e.contains("down"), "{e}");
        let e = parse_start(400, r#"{"error":"invalid_client"}"#).unwrap_err();
        assert!(e.contains("invalid_client"), "{e}");
        let huge = "x".repeat(100_000);
        assert!(parse_start(200, &huge).unwrap_err().len() < 400);
    }

    #[test]
    fn token_answers_map_to_what_the_poller_does() {
        assert!(matches!(
            parse_token(400, r#"{"error":"authorization_pending"}"#),
            Poll::Pending
        ));
        assert!(matches!(
            parse_token(400, r#"{"error":"slow_down"}"#),
            Poll::SlowDown
        ));
        assert!(matches!(
            parse_token(400, r#"{"error":"expired_token"}"#),
            Poll::Stop(Failure::Expired)
        ));
        assert!(matches!(
            parse_token(403, r#"{"error":"access_denied"}"#),
            Poll::Stop(Failure::Denied)
        ));
        assert!(matches!(parse_token(502, "bad gateway"), Poll::Retry(_)));
        assert!(matches!(parse_token(429, ""), Poll::Retry(_)));
        match parse_token(
            400,
            r#"{"error":"invalid_grant","error_description":"used"}"#,
        ) {
            Poll::Stop(Failure::Error(e)) => assert!(e.contains("invalid_grant (used)"), "{e}"),
            other => panic!("{other:?}"),
        }
        match parse_token(400, "<html>") {
            Poll::Stop(Failure::Error(e)) => assert!(e.contains("not JSON"), "{e}"),
            other => panic!("{other:?}"),
        }
        let ok = r#"{"device_api_token":"tok-123","nexus_url":"http://127.0.0.1:9/","redis_url":"redis://127.0.0.1:1","org_id":42,"allow_shell":true,"token_type":"Bearer"}"#;
        match parse_token(200, ok) {
            Poll::Approved(c) => {
                assert_eq!(c.get("device_api_token").unwrap(), "tok-123");
                assert_eq!(c.get("org_id").unwrap(), "42");
                assert!(
                    c.0.get("allow_shell").is_none(),
                    "a setting is never stored"
                );
                assert!(!format!("{c:?}").contains("tok-123"));
            }
            other => panic!("{other:?}"),
        }
        for (body, want) in [
            (r#"{"device_api_token":"secret-tok"#, "not JSON ("),
            (r#"{"nexus_url":"http://x"}"#, "no device_api_token"),
            (r#"{"device_api_token":7}"#, "as a number"),
            (r#"{"device_api_token":"a b"}"#, "spaces"),
            (
                r#"{"device_api_token":"t","redis_url":"http://nope"}"#,
                "redis_url is unusable",
            ),
            (
                r#"{"device_api_token":"t","nexus_url":["x"]}"#,
                "as an array",
            ),
        ] {
            match parse_token(200, body) {
                Poll::Stop(Failure::Error(e)) => {
                    assert!(e.contains(want), "{body}: {e}");
                    assert!(!e.contains("secret-tok"), "{e}");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        match parse_token(200, r#"{"access_token":"rfc-tok"}"#) {
            Poll::Approved(c) => assert_eq!(c.get("device_api_token").unwrap(), "rfc-tok"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tokens_are_checked_without_being_repeated() {
        assert_eq!(
            check_token(" abc.DEF-123_~+/= \n").unwrap(),
            "abc.DEF-123_~+/="
        );
        for bad in ["", "   "] {
            assert!(check_token(bad).unwrap_err().contains("empty"));
        }
        for bad in ["a\u{7}b", "tök", "two words"] {
            let e = check_token(bad).unwrap_err();
            assert!(e.contains("spaces, control or non-ASCII"), "{e}");
            assert!(!e.contains(bad), "the error repeats the token: {e}");
        }
        assert!(check_token(&"t".repeat(5000))
            .unwrap_err()
            .contains("5000 bytes"));
    }

    #[test]
    fn store_merges_keeps_other_keys_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "citadel-provision-{}-{}",
            std::process::id(),
            crate::backoff::random_u64()
        ));
        let path = dir.join("sub/config.json");
        let mut m = Map::new();
        m.insert("device_api_token".into(), json!("t1"));
        m.insert("org_id".into(), json!("o1"));
        store(&path, &Credentials(m), false).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        std::fs::write(
            &path,
            r#"{"concurrency": 8, "device_api_token": "t1", "org_id": "o1"}"#,
        )
        .unwrap();
        let mut m = Map::new();
        m.insert("device_api_token".into(), json!("t2"));
        store(&path, &Credentials(m), true).unwrap();
        let back = read_config(&path).unwrap();
        assert_eq!(back.get("concurrency"), Some(&json!(8)));
        assert_eq!(back.get("device_api_token"), Some(&json!("t2")));
        assert!(back.get("org_id").is_none(), "replaced credentials go");
        assert_eq!(mode(&path), 0o600);
        std::fs::write(&path, "[1]").unwrap();
        assert!(store(&path, &Credentials(Map::new()), false)
            .unwrap_err()
            .contains("not a JSON object"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "[1]");
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp file is left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_qr_code_is_drawn_in_half_blocks() {
        let q = qr_text("https://auth.example/device?code=ABCD-EFGH").unwrap();
        let lines: Vec<&str> = q.lines().collect();
        let width = lines[0].chars().count();
        assert!(width >= 25, "{width}");
        assert!(lines.iter().all(|l| l.chars().count() == width));
        assert_eq!(lines.len(), width.div_ceil(2));
    }
}
