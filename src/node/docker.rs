//! The Docker driver: runs the `docker` CLI (the `docker` setting; the
//! daemon is whatever `DOCKER_HOST` in the environment names, inherited)
//! with `std::process::Command`, one bounded call at a time, and turns its
//! failures into errors an operator can act on ([`DockerError`]). It reads
//! docker's answers only through `--format` templates that give exact fields
//! (`{{json .State}}`, `{{json (.Label "x")}}`), never by parsing tables.
//!
//! It decides nothing: `reconcile` says what to create, start or remove.

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for one ordinary docker command (ps, inspect, run -d, start,
/// stop, rm); `docker stop` itself gives a container 10 s before SIGKILL.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for `docker pull` (engine images are gigabytes).
pub const PULL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why a docker command did not do its job.
#[derive(Debug, Clone, PartialEq)]
pub enum DockerError {
    /// The CLI could not be started.
    Missing { cli: PathBuf, why: String },
    /// The CLI answered that the daemon is not reachable.
    DaemonDown { host: String, message: String },
    /// The daemon's socket is there, but this user may not use it.
    Denied { host: String, message: String },
    /// It ran longer than its bound and was killed.
    TimedOut { what: String, after: Duration },
    /// It failed; docker's own message.
    Failed { what: String, message: String },
}

impl std::fmt::Display for DockerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DockerError::Missing { cli, why } => write!(
                f,
                "cannot run the docker CLI '{}': {why} (install Debian's docker.io, or point --docker at the CLI)",
                cli.display()
            ),
            DockerError::DaemonDown { host, message } => write!(
                f,
                "the Docker daemon at {host} does not answer ({message}); start it (systemctl start docker) or set DOCKER_HOST"
            ),
            DockerError::Denied { host, message } => write!(
                f,
                "this agent's user may not use the Docker daemon at {host} ({message}); add the user to the 'docker' group (citadel service install does when Docker is installed) and restart the agent"
            ),
            DockerError::TimedOut { what, after } => write!(
                f,
                "docker {what} did not finish within {} and was killed (is the Docker daemon hung?)",
                crate::config::format_duration(*after)
            ),
            DockerError::Failed { what, message } => write!(f, "docker {what}: {message}"),
        }
    }
}

/// A container of citadel's, as `docker ps` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// `running`, `exited`, `created`, `restarting`, `paused`, `dead`.
    pub state: String,
    /// Its `citadel.service` label.
    pub service: String,
    /// Its `citadel.spec` label.
    pub spec: String,
    pub image: String,
}

impl Container {
    pub fn running(&self) -> bool {
        self.state == "running" || self.state == "restarting"
    }
}

/// The template `docker ps` fills in per container: one JSON object a line.
const PS_FORMAT: &str = concat!(
    r#"{"id":{{json .ID}},"name":{{json .Names}},"state":{{json .State}},"#,
    r#""service":{{json (.Label "citadel.service")}},"spec":{{json (.Label "citadel.spec")}},"#,
    r#""image":{{json .Image}}}"#
);

/// The docker CLI.
#[derive(Debug, Clone)]
pub struct Docker {
    cli: PathBuf,
}

impl Docker {
    pub fn new(cli: &Path) -> Docker {
        Docker {
            cli: cli.to_path_buf(),
        }
    }

    /// The daemon the CLI talks to, for messages.
    fn host() -> String {
        std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .map(|h| format!("DOCKER_HOST={h}"))
            .unwrap_or_else(|| {
                "unix:///var/run/docker.sock (the default; DOCKER_HOST is not set)".into()
            })
    }

    /// Runs `docker ARGS`, killed after `timeout`; its stdout, or the error.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<String, DockerError> {
        let what = args.first().copied().unwrap_or("").to_owned();
        let (code, out, err) = self.run_raw(args, timeout)?;
        if code == Some(0) {
            return Ok(out);
        }
        let message = crate::clip::one_line(err.trim(), 400);
        if err.contains("permission denied while trying to connect to the Docker daemon") {
            return Err(DockerError::Denied {
                host: Docker::host(),
                message,
            });
        }
        if err.contains("Cannot connect to the Docker daemon")
            || err.contains("Is the docker daemon running")
            || err.contains("error during connect")
        {
            return Err(DockerError::DaemonDown {
                host: Docker::host(),
                message,
            });
        }
        let message = if message.is_empty() {
            format!(
                "exited with {}",
                code.map_or("a signal".into(), |c| c.to_string())
            )
        } else {
            message
        };
        Err(DockerError::Failed { what, message })
    }

    /// (exit code, stdout, stderr) of `docker ARGS`, killed after `timeout`.
    fn run_raw(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(Option<i32>, String, String), DockerError> {
        let what = args.first().copied().unwrap_or("").to_owned();
        let mut cmd = Command::new(&self.cli);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A hung docker dies with the agent.
        let mut child = crate::child::spawn(&mut cmd).map_err(|e| DockerError::Missing {
            cli: self.cli.clone(),
            why: if e.kind() == std::io::ErrorKind::NotFound {
                "not found".into()
            } else {
                e.to_string()
            },
        })?;
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(p) = pipe {
                    let _ = p.take(4 << 20).read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
        let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
        let Some(status) = crate::child::wait(&mut child, Instant::now() + timeout, None) else {
            return Err(DockerError::TimedOut {
                what,
                after: timeout,
            });
        };
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        Ok((status.code(), out, err))
    }

    /// Every container carrying the `citadel.service` label, stopped ones too.
    pub fn managed(&self) -> Result<Vec<Container>, DockerError> {
        let out = self.run(
            &[
                "ps",
                "-a",
                "--no-trunc",
                "--filter",
                "label=citadel.service",
                "--format",
                PS_FORMAT,
            ],
            COMMAND_TIMEOUT,
        )?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let v: Value = serde_json::from_str(line).map_err(|e| DockerError::Failed {
                    what: "ps".into(),
                    message: format!("unexpected answer {line:?}: {e}"),
                })?;
                let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                Ok(Container {
                    id: field("id"),
                    name: field("name"),
                    state: field("state"),
                    service: field("service"),
                    spec: field("spec"),
                    image: field("image"),
                })
            })
            .collect()
    }

    /// The labels of the container named `name`, or `None` when there is none.
    pub fn labels_of(&self, name: &str) -> Result<Option<Value>, DockerError> {
        let (code, out, err) = self.run_raw(
            &[
                "container",
                "inspect",
                "--format",
                "{{json .Config.Labels}}",
                name,
            ],
            COMMAND_TIMEOUT,
        )?;
        if code == Some(0) {
            return Ok(Some(
                serde_json::from_str(out.trim()).unwrap_or(Value::Null),
            ));
        }
        if err.to_lowercase().contains("no such") {
            return Ok(None);
        }
        // The same call through `run` gives the classified error.
        self.run(&["container", "inspect", name], COMMAND_TIMEOUT)
            .map(|_| None)
    }

    /// Whether `image` is present locally.
    pub fn has_image(&self, image: &str) -> Result<bool, DockerError> {
        let (code, _, err) = self.run_raw(
            &["image", "inspect", "--format", "{{.Id}}", image],
            COMMAND_TIMEOUT,
        )?;
        if code == Some(0) {
            return Ok(true);
        }
        if err.to_lowercase().contains("no such image") {
            return Ok(false);
        }
        self.run(&["image", "inspect", image], COMMAND_TIMEOUT)
            .map(|_| false)
    }

    pub fn pull(&self, image: &str) -> Result<(), DockerError> {
        self.run(&["pull", "--quiet", image], PULL_TIMEOUT)
            .map(drop)
    }

    /// `docker ARGS` of a `docker run -d`: the new container's id.
    pub fn create_and_start(&self, run_args: &[String]) -> Result<String, DockerError> {
        let args: Vec<&str> = run_args.iter().map(String::as_str).collect();
        Ok(self.run(&args, COMMAND_TIMEOUT)?.trim().to_owned())
    }

    pub fn start(&self, id: &str) -> Result<(), DockerError> {
        self.run(&["start", id], COMMAND_TIMEOUT).map(drop)
    }

    pub fn stop(&self, id: &str) -> Result<(), DockerError> {
        self.run(&["stop", id], COMMAND_TIMEOUT).map(drop)
    }

    /// Stops and removes the container.
    pub fn remove(&self, id: &str) -> Result<(), DockerError> {
        self.run(&["rm", "-f", id], COMMAND_TIMEOUT).map(drop)
    }

    /// The container's `.State` (Status, Running, ExitCode, …).
    pub fn state(&self, id: &str) -> Result<Value, DockerError> {
        let out = self.run(
            &["container", "inspect", "--format", "{{json .State}}", id],
            COMMAND_TIMEOUT,
        )?;
        serde_json::from_str(out.trim()).map_err(|e| DockerError::Failed {
            what: "inspect".into(),
            message: format!("unexpected answer {out:?}: {e}"),
        })
    }

    /// The last `lines` lines the container wrote (stdout and stderr).
    pub fn logs_tail(&self, id: &str, lines: usize) -> String {
        match self.run_raw(&["logs", "--tail", &lines.to_string(), id], COMMAND_TIMEOUT) {
            Ok((_, out, err)) => format!("{out}{err}").trim().to_owned(),
            Err(e) => format!("(no logs: {e})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cli_says_what_to_install() {
        let d = Docker::new(Path::new("/nonexistent/docker"));
        let err = d.managed().unwrap_err();
        assert!(matches!(err, DockerError::Missing { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/docker")
                && text.contains("docker.io")
                && text.contains("--docker"),
            "{text}"
        );
    }

    #[test]
    fn a_hung_cli_is_killed_at_its_bound() {
        let dir = std::env::temp_dir().join(format!("citadel-docker-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("docker");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = Instant::now();
        let err = Docker::new(&script)
            .run(&["ps"], Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(err, DockerError::TimedOut { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            err.to_string().contains("did not finish within 300ms"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
