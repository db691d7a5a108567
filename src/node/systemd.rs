//! The agent as an always-on systemd service: `citadel service
//! install|status|uninstall`. Owns the unit's text (pure, [`unit_text`]), the
//! service user (created unless `--user` names one; in the `docker` group
//! when docker-managed services are configured), the service's config
//! directory and file (so that `citadel init` run as root writes a file the
//! service can read), and the `systemctl` calls. Every outside tool
//! (`systemctl`, `getent`, `useradd`, `usermod`, `userdel`) is the one on
//! `PATH`, so tests put fakes there; `--root DIR` prefixes every path written.
//!
//! Install twice changes nothing the second time: the unit is rewritten and
//! `daemon-reload` run only when its text changed, `enable --now` only when
//! the unit is not already enabled and active.

use crate::config::Settings;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const UNIT_NAME: &str = "citadel.service";
/// The service user created when `--user` is not given.
pub const DEFAULT_USER: &str = "citadel";
/// Where the service's config and state live (also `citadel init`'s
/// defaults as root).
pub const CONFIG_DIR: &str = "/etc/citadel";
pub const STATE_DIR: &str = "/var/lib/citadel";
/// Between automatic restarts; with at most [`START_LIMIT_BURST`] starts
/// per [`START_LIMIT_INTERVAL`], an agent that keeps failing is restarted
/// forever, 15 s apart, but never in a tight loop.
const RESTART_SEC: u64 = 15;
const START_LIMIT_INTERVAL: u64 = 120;
const START_LIMIT_BURST: u64 = 10;
/// Stop timeout beyond the shutdown grace (the agent exits within grace + 2 s).
const STOP_MARGIN: Duration = Duration::from_secs(10);
const LIMIT_NOFILE: u64 = 65536;
/// The unit's marker line for a user that `install` created (and
/// `uninstall` therefore removes).
const CREATED_USER_MARK: &str = "# citadel: created user ";
/// Most bytes kept of what one tool writes to stdout, and to stderr.
const TOOL_OUTPUT_CAP: u64 = 1 << 20;

/// What goes into the unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub binary: PathBuf,
    pub user: String,
    pub models_dir: PathBuf,
    pub shutdown_grace: Duration,
    /// `citadel up` (start the configured services first) instead of `agent`.
    pub up: bool,
    /// Whether `install` created the user.
    pub created_user: bool,
}

/// The unit file's text.
pub fn unit_text(u: &Unit) -> String {
    let stop = (u.shutdown_grace + STOP_MARGIN).as_secs().max(1);
    let command = if u.up { "up" } else { "agent" };
    let mut rw = vec![STATE_DIR.to_owned(), CONFIG_DIR.to_owned()];
    let models = u.models_dir.display().to_string();
    if !u.models_dir.starts_with(STATE_DIR) {
        // `-`: a models directory that does not exist yet does not stop the unit.
        rw.push(format!("-{models}"));
    }
    let created = if u.created_user {
        format!("{CREATED_USER_MARK}{}\n", u.user)
    } else {
        String::new()
    };
    format!(
        "# Written by `citadel service install` (citadel {version}); `citadel service uninstall`
# removes it. Edit with `systemctl edit citadel` (a drop-in), not here.
{created}[Unit]
Description=Citadel node agent (job fabric worker)
Wants=network-online.target
After=network-online.target
# Restarted forever, {RESTART_SEC} s apart; more than {START_LIMIT_BURST} starts in {START_LIMIT_INTERVAL} s (only by hand) stop it.
StartLimitIntervalSec={START_LIMIT_INTERVAL}
StartLimitBurst={START_LIMIT_BURST}

[Service]
Type=simple
ExecStart={binary} {command}
Environment=CITADEL_CONFIG={CONFIG_DIR}/config.json
Environment=CITADEL_STATE_DIR={STATE_DIR}
User={user}
Restart=always
RestartSec={RESTART_SEC}s
# SIGTERM to the agent only: it drains running jobs within --shutdown-grace
# ({grace} s) and stops its own shell jobs; what is left is killed after TimeoutStopSec.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={stop}s
StateDirectory=citadel
StateDirectoryMode=0700
ConfigurationDirectory=citadel
ConfigurationDirectoryMode=0700
NoNewPrivileges=yes
ProtectSystem=strict
PrivateTmp=yes
ReadWritePaths={rw}
LimitNOFILE={LIMIT_NOFILE}

[Install]
WantedBy=multi-user.target
",
        version = crate::events::AGENT_VERSION,
        binary = u.binary.display(),
        user = u.user,
        grace = u.shutdown_grace.as_secs(),
        rw = rw.join(" "),
    )
}

/// What `citadel service` was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `--root DIR`: prefix of every path written ("/" normally).
    pub root: PathBuf,
    /// `--user NAME`: run as this existing user instead of creating one.
    pub user: Option<String>,
    /// `--binary PATH`: ExecStart's binary (default: this executable).
    pub binary: Option<PathBuf>,
    /// `--up`: ExecStart runs `citadel up`.
    pub up: bool,
}

impl Request {
    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    pub fn unit_path(&self) -> PathBuf {
        self.path(&format!("/etc/systemd/system/{UNIT_NAME}"))
    }

    fn real_root(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// A tool from PATH, run with [`crate::child`] (its own process group, dead
/// with the agent) and killed, with whatever it started, once `limit`
/// passes; its failure says what ran.
fn tool(limit: Duration, name: &str, args: &[&str]) -> Result<std::process::Output, String> {
    log::debug!("running {name} {}", args.join(" "));
    let mut cmd = Command::new(name);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = crate::child::spawn(&mut cmd).map_err(|e| format!("cannot run {name}: {e}"))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(TOOL_OUTPUT_CAP).read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let Some(status) = crate::child::wait(&mut child, Instant::now() + limit, None) else {
        return Err(timed_out(name, args, limit));
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn timed_out(name: &str, args: &[&str], limit: Duration) -> String {
    format!(
        "{name} {} did not finish within {} (service-tool-timeout) and was killed",
        args.join(" "),
        crate::config::format_duration(limit)
    )
}

fn tool_ok(limit: Duration, name: &str, args: &[&str]) -> Result<(), String> {
    let out = tool(limit, name, args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{name} {} failed ({}): {}",
            args.join(" "),
            out.status,
            crate::clip::one_line(&String::from_utf8_lossy(&out.stderr), 300)
        ))
    }
}

/// (uid, gid) of `user`, from `getent passwd`.
fn lookup_user(limit: Duration, user: &str) -> Result<Option<(u32, u32)>, String> {
    let out = tool(limit, "getent", &["passwd", user])?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    match (
        fields.get(2).and_then(|f| f.parse().ok()),
        fields.get(3).and_then(|f| f.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(format!("getent passwd {user} gave no uid/gid: {line}")),
    }
}

fn group_exists(limit: Duration, group: &str) -> Result<bool, String> {
    Ok(tool(limit, "getent", &["group", group])?.status.success())
}

fn must_be_root(req: &Request, what: &str) -> Result<(), String> {
    if req.real_root() && !crate::config::is_root() {
        return Err(format!(
            "citadel service {what} changes /etc/systemd/system and creates users: run it as root (sudo citadel service {what})"
        ));
    }
    Ok(())
}

/// `citadel service install`: user, config directory, unit, enable --now.
/// Returns the lines to print (what it did).
pub fn install(settings: &Settings, req: &Request) -> Result<Vec<String>, String> {
    must_be_root(req, "install")?;
    let limit = settings.service_tool_timeout;
    let mut done = Vec::new();
    let binary = match &req.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
    };
    let unit_path = req.unit_path();
    let previous = std::fs::read_to_string(&unit_path).ok();
    let user = req.user.clone().unwrap_or_else(|| DEFAULT_USER.into());
    let mut created_user = previous
        .as_deref()
        .is_some_and(|t| t.contains(&format!("{CREATED_USER_MARK}{user}\n")));
    let ids = match lookup_user(limit, &user)? {
        Some(ids) => ids,
        None if req.user.is_some() => {
            return Err(format!(
                "--user {user}: no such user (create it, or leave out --user for a dedicated 'citadel' system user)"
            ))
        }
        None => {
            tool_ok(
                limit,
                "useradd",
                &[
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    STATE_DIR,
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    &user,
                ],
            )?;
            created_user = true;
            done.push(format!("created the system user '{user}'"));
            lookup_user(limit, &user)?
                .ok_or_else(|| format!("useradd ran but there is no user '{user}'"))?
        }
    };
    // Docker-managed services (configured here, or later by an
    // APPLY_DEVICE_CONFIG job): the agent talks to the Docker socket, so the
    // service user joins the docker group wherever Docker is installed.
    let docker_group = group_exists(limit, "docker")?;
    if !settings.services.is_empty() && !docker_group {
        return Err(
            "docker-managed services are configured (services), but there is no 'docker' group: install Docker first".into(),
        );
    }
    if docker_group && user != "root" {
        let groups = tool(limit, "id", &["-nG", &user])?;
        let member = String::from_utf8_lossy(&groups.stdout)
            .split_whitespace()
            .any(|g| g == "docker");
        if !member {
            tool_ok(limit, "usermod", &["-aG", "docker", &user])?;
            done.push(format!(
                "added '{user}' to the 'docker' group (Docker is installed: the node's services, \
                 set here or by an APPLY_DEVICE_CONFIG job, run as containers): this gives the \
                 service root-equivalent access to the machine through the Docker socket"
            ));
        }
    }
    // The config directory and file, the service user's: `citadel init` (as
    // root) then writes a file the service can read (see provision::store).
    let config_dir = req.path(CONFIG_DIR);
    let config_file = config_dir.join("config.json");
    ensure_private(&config_dir, &config_file, ids, &mut done)?;

    let text = unit_text(&Unit {
        binary,
        user: user.clone(),
        models_dir: settings.models_dir(),
        shutdown_grace: settings.shutdown_grace,
        up: req.up,
        created_user,
    });
    if previous.as_deref() != Some(text.as_str()) {
        if let Some(dir) = unit_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        write_file(&unit_path, text.as_bytes(), 0o644)
            .map_err(|e| format!("cannot write {}: {e}", unit_path.display()))?;
        done.push(format!("wrote {}", unit_path.display()));
        tool_ok(limit, "systemctl", &["daemon-reload"])?;
    }
    let enabled = tool(limit, "systemctl", &["is-enabled", "--quiet", UNIT_NAME])?
        .status
        .success();
    let active = tool(limit, "systemctl", &["is-active", "--quiet", UNIT_NAME])?
        .status
        .success();
    if !enabled || !active {
        tool_ok(limit, "systemctl", &["enable", "--now", UNIT_NAME])?;
        done.push(format!("enabled and started {UNIT_NAME}"));
    }
    if done.is_empty() {
        done.push(format!(
            "{UNIT_NAME} is installed, enabled and running: nothing to change"
        ));
    }
    Ok(done)
}

/// The config directory 0700 and the config file 0600 (`{}` when missing),
/// both owned by the service user.
fn ensure_private(
    dir: &Path,
    file: &Path,
    (uid, gid): (u32, u32),
    done: &mut Vec<String>,
) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(dir, e))?;
        done.push(format!("created {}", dir.display()));
    }
    if !file.exists() {
        crate::node::provision::write_private(file, b"{}\n").map_err(|e| err(file, e))?;
        done.push(format!("created {} (no settings yet)", file.display()));
    }
    for (p, mode) in [(dir, 0o700), (file, 0o600)] {
        let m = std::fs::symlink_metadata(p).map_err(|e| err(p, e))?;
        if m.uid() != uid || m.gid() != gid {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(|e| err(p, e))?;
            done.push(format!("gave {} to the service user", p.display()));
        }
        if m.permissions().mode() & 0o777 != mode {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| err(p, e))?;
            done.push(format!("set {} to mode {mode:o}", p.display()));
        }
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `citadel service uninstall`: stop, disable, remove the unit (and the
/// user `install` created). The config (credentials) and state stay.
pub fn uninstall(settings: &Settings, req: &Request) -> Result<Vec<String>, String> {
    let limit = settings.service_tool_timeout;
    must_be_root(req, "uninstall")?;
    let unit_path = req.unit_path();
    let Ok(text) = std::fs::read_to_string(&unit_path) else {
        return Ok(vec![format!(
            "{UNIT_NAME} is not installed ({} does not exist): nothing to remove",
            unit_path.display()
        )]);
    };
    let mut done = Vec::new();
    tool_ok(limit, "systemctl", &["disable", "--now", UNIT_NAME])?;
    done.push(format!("stopped and disabled {UNIT_NAME}"));
    std::fs::remove_file(&unit_path)
        .map_err(|e| format!("cannot remove {}: {e}", unit_path.display()))?;
    done.push(format!("removed {}", unit_path.display()));
    tool_ok(limit, "systemctl", &["daemon-reload"])?;
    let created = text
        .lines()
        .find_map(|l| l.strip_prefix(CREATED_USER_MARK))
        .map(str::to_owned);
    if let Some(user) = created {
        if lookup_user(limit, &user)?.is_some() {
            tool_ok(limit, "userdel", &[&user])?;
            done.push(format!(
                "removed the system user '{user}' (install created it)"
            ));
        }
    }
    done.push(format!(
        "kept {CONFIG_DIR} (credentials) and {STATE_DIR} (state, models): remove them by hand if wanted"
    ));
    Ok(done)
}

/// After `citadel init` stored new credentials: restart the installed
/// service, if it runs, so that it uses them (`systemctl try-restart`) —
/// from approval to serving with no further command. `None` when no
/// service is installed (or `systemctl` cannot tell) or this is not root.
pub fn restart_for_credentials(settings: &Settings) -> Option<Result<String, String>> {
    let limit = settings.service_tool_timeout;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let enabled = tool(limit, "systemctl", &["is-enabled", "--quiet", UNIT_NAME]).ok()?;
    if !enabled.status.success() {
        return None;
    }
    Some(
        tool_ok(limit, "systemctl", &["try-restart", UNIT_NAME])
            .map(|()| format!("restarted {UNIT_NAME}: the agent now runs with these credentials")),
    )
}

/// `citadel service status`: `systemctl status`'s own output and exit code
/// (0 running, 3 stopped, 4 unknown unit).
pub fn status(settings: &Settings, req: &Request) -> Result<i32, String> {
    let limit = settings.service_tool_timeout;
    let unit_path = req.unit_path();
    if unit_path.exists() {
        println!("unit: {}", unit_path.display());
    } else {
        println!(
            "unit: not installed ({} does not exist)",
            unit_path.display()
        );
    }
    let args = ["status", "--no-pager", UNIT_NAME];
    let mut cmd = Command::new("systemctl");
    cmd.args(args).stdin(Stdio::null());
    let mut child =
        crate::child::spawn(&mut cmd).map_err(|e| format!("cannot run systemctl: {e}"))?;
    let status = crate::child::wait(&mut child, Instant::now() + limit, None)
        .ok_or_else(|| timed_out("systemctl", &args, limit))?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_has_what_an_always_on_agent_needs() {
        let text = unit_text(&Unit {
            binary: "/usr/local/bin/citadel".into(),
            user: "citadel".into(),
            models_dir: "/data/models".into(),
            shutdown_grace: Duration::from_secs(25),
            up: false,
            created_user: true,
        });
        for line in [
            "ExecStart=/usr/local/bin/citadel agent",
            "Restart=always",
            "RestartSec=15s",
            "StartLimitBurst=10",
            "KillSignal=SIGTERM",
            "TimeoutStopSec=35s",
            "StateDirectory=citadel",
            "ConfigurationDirectory=citadel",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/citadel /etc/citadel -/data/models",
            "LimitNOFILE=65536",
            "User=citadel",
            "# citadel: created user citadel",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        let text = unit_text(&Unit {
            binary: "/opt/citadel".into(),
            user: "gpu".into(),
            models_dir: "/var/lib/citadel/models".into(),
            shutdown_grace: Duration::from_secs(60),
            up: true,
            created_user: false,
        });
        assert!(text.contains("ExecStart=/opt/citadel up\n"));
        assert!(text.contains("ReadWritePaths=/var/lib/citadel /etc/citadel\n"));
        assert!(text.contains("TimeoutStopSec=70s\n"));
        assert!(!text.contains(CREATED_USER_MARK));
    }
}
