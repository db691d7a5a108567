//! A PRIVATE Docker daemon per test (Debian's `dockerd`: its own data root,
//! exec root, socket and pidfile in a short temp dir; no bridge, no
//! iptables), the `docker` CLI pointed at it through `DOCKER_HOST`, and test
//! images made locally with `docker import` (nothing is pulled): a static
//! busybox "engine" that serves `/health` on the port its arguments (or
//! environment) name and publishes what it was started with.
//!
//! Dropping the daemon removes its containers, stops it by pid (SIGTERM,
//! then SIGKILL) and removes its dir. Where dockerd cannot start, the test
//! is skipped loudly (`skip_unless_ci`: a failure under CI=true).

use super::{skip_unless_ci, wait_until, POLL};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a private dockerd may take to answer `docker version`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The static busybox the test images are made of.
pub const BUSYBOX: &str = "/bin/busybox";

/// The test engine's entrypoint: the port and host from `--port`/`--host`,
/// else `PORT`/`HOST`, else `OLLAMA_HOST=H:P`; serves /www with busybox
/// httpd, where `args` holds its arguments one per line, `env` its
/// environment and `marker` the models dir's `marker` file.
const ENGINE_SH: &str = r#"#!/bin/sh
port=${PORT:-}
host=${HOST:-0.0.0.0}
case "$OLLAMA_HOST" in *:*) host=${OLLAMA_HOST%:*}; port=${OLLAMA_HOST##*:};; esac
mkdir -p /www/api
for a in "$@"; do printf '%s\n' "$a"; done > /www/args
env | sort > /www/env
cat /models/marker > /www/marker 2>/dev/null
while [ $# -gt 0 ]; do
    case "$1" in
    --port) port=$2; shift ;;
    --host) host=$2; shift ;;
    esac
    shift
done
echo '{"status":"ok"}' > /www/health
echo '{"models":[]}' > /www/api/tags
echo "test engine listening on $host:$port"
exec httpd -f -p "$host:$port" -h /www
"#;

/// A running private dockerd.
pub struct DockerDaemon {
    dir: PathBuf,
    child: Option<Child>,
    host: String,
}

/// A short fresh dir (unix socket paths must stay under 108 bytes).
fn short_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = PathBuf::from(format!("/tmp/cdk-{}-{n}-{nanos:x}", std::process::id()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// The `docker` CLI on PATH, as an absolute path (for wrappers).
pub fn docker_cli() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("docker"))
        .find(|p| p.is_file())
}

fn dockerd() -> Option<PathBuf> {
    ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|d| d.join("dockerd"))
                .find(|p| p.is_file())
        })
}

/// Writes an executable script.
pub fn write_script(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

impl DockerDaemon {
    /// A private daemon, or `None` (reported as skipped; a failure under
    /// CI=true) where one cannot run here.
    pub fn start(test: &str) -> Option<DockerDaemon> {
        let Some(dockerd) = dockerd() else {
            skip_unless_ci(
                test,
                "dockerd is not installed (Debian: apt-get install docker.io)",
            );
            return None;
        };
        if docker_cli().is_none() {
            skip_unless_ci(test, "the docker CLI is not on PATH (Debian: docker.io)");
            return None;
        }
        if !Path::new(BUSYBOX).is_file() {
            skip_unless_ci(
                test,
                "no static busybox at /bin/busybox (Debian: busybox-static)",
            );
            return None;
        }
        let dir = short_dir();
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        let host = format!("unix://{}/docker.sock", dir.display());
        let spawned = Command::new(&dockerd)
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .args(["-H", &host])
            .arg("--pidfile")
            .arg(dir.join("pid"))
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                skip_unless_ci(test, &format!("cannot run {}: {e}", dockerd.display()));
                let _ = fs::remove_dir_all(&dir);
                return None;
            }
        };
        let mut d = DockerDaemon {
            dir,
            child: Some(child),
            host,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if d.docker(&["version", "--format", "{{.Server.Version}}"])
                .status
                .success()
            {
                return Some(d);
            }
            let exited = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                let log = fs::read_to_string(d.dir.join("dockerd.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(8).collect::<Vec<_>>().join(" | ");
                skip_unless_ci(
                    test,
                    &format!("a private dockerd did not start ({exited:?}): {tail}"),
                );
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `unix://…/docker.sock`, for DOCKER_HOST.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The daemon's own dir (for test files beside it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `docker` command against this daemon.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.args(args).env("DOCKER_HOST", &self.host);
        c
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running docker {args:?}: {e}"))
    }

    /// `docker ARGS`' stdout (trimmed); panics with its stderr on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker container inspect --format FORMAT NAME`.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["container", "inspect", "--format", format, name])
    }

    /// `docker import`s `rootfs` as `tag` with `changes` (`ENTRYPOINT [...]`).
    pub fn import(&self, rootfs: &Path, tag: &str, changes: &[&str]) {
        let mut args: Vec<String> = vec!["import".into()];
        for c in changes {
            args.push("--change".into());
            args.push((*c).into());
        }
        args.push("-".into());
        args.push(tag.into());
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("running tar");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self
            .cmd(&refs)
            .stdin(tar.stdout.take().unwrap())
            .output()
            .expect("running docker import");
        assert!(tar.wait().unwrap().success(), "tar of {}", rootfs.display());
        assert!(
            out.status.success(),
            "docker import {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A busybox root fs in the daemon's dir with `files` (path, content,
    /// executable) added.
    fn busybox_rootfs(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = self.dir.join("rootfs").join(name);
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "httpd", "cat", "env", "sort", "mkdir", "echo", "sleep", "printf",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        for (path, text) in files {
            write_script(&root.join(path.trim_start_matches('/')), text);
        }
        root
    }

    /// The test engine image (see `ENGINE_SH`) as `tag`.
    pub fn engine_image(&self, tag: &str) {
        let root =
            self.busybox_rootfs(&tag.replace(['/', ':'], "_"), &[("/bin/engine", ENGINE_SH)]);
        self.import(
            &root,
            tag,
            &[r#"ENTRYPOINT ["/bin/engine"]"#, "ENV PATH=/bin"],
        );
    }

    /// An image whose entrypoint says `message` on stderr and exits `code`.
    pub fn exiting_image(&self, tag: &str, message: &str, code: i32) {
        let script = format!("#!/bin/sh\necho '{message}' >&2\nexit {code}\n");
        let root = self.busybox_rootfs(&tag.replace(['/', ':'], "_"), &[("/bin/engine", &script)]);
        self.import(
            &root,
            tag,
            &[r#"ENTRYPOINT ["/bin/engine"]"#, "ENV PATH=/bin"],
        );
    }

    /// Every container's id (running or not).
    pub fn all_ids(&self) -> Vec<String> {
        self.ok(&["ps", "-aq", "--no-trunc"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        let ids = self.all_ids_quiet();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = self
                .cmd(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(POLL);
            }
        }
        if thread::panicking() {
            let log = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "--- dockerd log (tail, newest first) ---");
            for l in tail {
                let _ = writeln!(err, "{l}");
            }
        }
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Detaches what a stopped dockerd left mounted under `dir` (its network
/// namespace file under the exec root), so the dir can be removed.
fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2(2) with a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl DockerDaemon {
    fn all_ids_quiet(&self) -> Vec<String> {
        match self
            .cmd(&["ps", "-aq", "--no-trunc"])
            .stderr(Stdio::null())
            .output()
        {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Waits until `GET url` answers 200 and returns its body.
pub fn http_get(url: &str, timeout: Duration) -> String {
    let agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .new_agent();
    wait_until(&format!("GET {url} to answer 200"), timeout, || {
        let mut r = agent.get(url).call().ok()?;
        (r.status().as_u16() == 200).then(|| r.body_mut().read_to_string().unwrap_or_default())
    })
}
