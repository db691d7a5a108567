//! scripts/install.sh and `citadel service`, into a temp `--root` with fake
//! `systemctl`, `getent`, `useradd`, `usermod` and `userdel` on PATH that
//! record their calls (and keep just enough state: users, enabled/active):
//! install, install again (nothing changes), uninstall (only its files go);
//! a `dist/` tarball checked against SHA256SUMS; no root and no sudo; the
//! unit through `systemd-analyze verify`.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::jobs::{wait_for_pid_file, wait_pid_gone};
use support::{citadel_bin, fresh_temp_dir, skip_unless_ci};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A bin directory of fakes recording to `calls` under `state`.
struct Fakes {
    dir: PathBuf,
    state: PathBuf,
}

const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
echo "systemctl $*" >>"$FAKE_STATE/calls"
case "$1" in
is-enabled) [ -f "$FAKE_STATE/enabled" ] ;;
is-active) [ -f "$FAKE_STATE/active" ] ;;
enable) touch "$FAKE_STATE/enabled"; [ "$2" = --now ] && touch "$FAKE_STATE/active"; exit 0 ;;
disable) rm -f "$FAKE_STATE/enabled"; [ "$2" = --now ] && rm -f "$FAKE_STATE/active"; exit 0 ;;
status) if [ -f "$FAKE_STATE/active" ]; then echo "active (running)"; exit 0; else echo inactive; exit 3; fi ;;
*) exit 0 ;;
esac
"#;

const FAKE_GETENT: &str = r#"#!/bin/sh
echo "getent $*" >>"$FAKE_STATE/calls"
if [ "$1" = passwd ] && [ -f "$FAKE_STATE/user-$2" ]; then
    echo "$2:x:$(id -u):$(id -g)::/var/lib/citadel:/usr/sbin/nologin"; exit 0
fi
[ "$1" = group ] && [ "$2" = docker ] && [ -f "$FAKE_STATE/group-docker" ] && { echo "docker:x:999:"; exit 0; }
exit 2
"#;

const FAKE_USERADD: &str = r#"#!/bin/sh
echo "useradd $*" >>"$FAKE_STATE/calls"
for last; do :; done
touch "$FAKE_STATE/user-$last"
"#;

const FAKE_USERDEL: &str = r#"#!/bin/sh
echo "userdel $*" >>"$FAKE_STATE/calls"
rm -f "$FAKE_STATE/user-$1"
"#;

const FAKE_USERMOD: &str = r#"#!/bin/sh
echo "usermod $*" >>"$FAKE_STATE/calls"
"#;

impl Fakes {
    fn new() -> Fakes {
        let base = fresh_temp_dir("install-fakes");
        let dir = base.join("bin");
        let state = base.join("state");
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&state).unwrap();
        for (name, text) in [
            ("systemctl", FAKE_SYSTEMCTL),
            ("getent", FAKE_GETENT),
            ("useradd", FAKE_USERADD),
            ("userdel", FAKE_USERDEL),
            ("usermod", FAKE_USERMOD),
        ] {
            let p = dir.join(name);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Fakes { dir, state }
    }

    fn path_env(&self) -> String {
        format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap())
    }

    /// The calls recorded so far, and forget them.
    fn take_calls(&self) -> Vec<String> {
        let p = self.state.join("calls");
        let text = fs::read_to_string(&p).unwrap_or_default();
        let _ = fs::remove_file(&p);
        text.lines().map(str::to_owned).collect()
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PATH", self.path_env())
            .env("FAKE_STATE", &self.state)
            .env_remove("CITADEL_CONFIG")
            .env("RUST_LOG", "warn");
        cmd
    }
}

fn install_sh(fakes: &Fakes, args: &[&str]) -> Output {
    let script = repo().join("scripts/install.sh");
    fakes
        .command("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("running scripts/install.sh")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every path under `root` with its mode and content (files) or `dir`.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let meta = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(root, &p, out);
            } else {
                let bytes = fs::read(&p).unwrap();
                let sum = bytes
                    .iter()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64));
                out.insert(
                    rel,
                    format!(
                        "file {mode:o} {} {sum:x} {:?}",
                        bytes.len(),
                        meta.modified().unwrap()
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn a_root() -> PathBuf {
    let root = fresh_temp_dir("install-root");
    // What was there before, which nothing may touch.
    fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    fs::write(root.join("usr/local/bin/other-tool"), "#!/bin/sh\n").unwrap();
    fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    fs::write(root.join("etc/systemd/system/other.service"), "[Unit]\n").unwrap();
    fs::write(root.join("etc/hostname"), "node\n").unwrap();
    root
}

#[test]
fn install_twice_changes_nothing_and_uninstall_removes_only_its_files() {
    let fakes = Fakes::new();
    let root = a_root();
    let before = snapshot(&root);
    let r = root.to_str().unwrap();
    let bin = citadel_bin();

    let out = install_sh(&fakes, &["--binary", bin, "--root", r, "--service"]);
    assert!(out.status.success(), "{}", text(&out));
    let installed = root.join("usr/local/bin/citadel");
    assert_eq!(fs::read(&installed).unwrap(), fs::read(bin).unwrap());
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let unit = fs::read_to_string(root.join("etc/systemd/system/citadel.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/citadel agent\n"),
        "{unit}"
    );
    assert!(unit.contains("User=citadel\n"), "{unit}");
    let config = root.join("etc/citadel/config.json");
    assert_eq!(fs::read_to_string(&config).unwrap().trim(), "{}");
    assert_eq!(
        fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(config.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let calls = fakes.take_calls();
    let systemctl: Vec<&String> = calls
        .iter()
        .filter(|c| c.starts_with("systemctl"))
        .collect();
    assert_eq!(
        systemctl,
        [
            "systemctl daemon-reload",
            "systemctl is-enabled --quiet citadel.service",
            "systemctl is-active --quiet citadel.service",
            "systemctl enable --now citadel.service"
        ],
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("useradd --system") && c.ends_with(" citadel")),
        "{calls:?}"
    );
    let after_first = snapshot(&root);

    // Again: nothing changes, nothing is reloaded or enabled, no user made.
    let out = install_sh(&fakes, &["--binary", bin, "--root", r, "--service"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("unchanged"), "{}", text(&out));
    assert!(text(&out).contains("nothing to change"), "{}", text(&out));
    assert_eq!(
        snapshot(&root),
        after_first,
        "the second install changed files"
    );
    let calls = fakes.take_calls();
    assert!(
        !calls.iter().any(|c| c.contains("daemon-reload")
            || c.contains("enable --now")
            || c.starts_with("useradd")),
        "{calls:?}"
    );

    // citadel service status passes systemctl's answer through.
    let out = fakes
        .command(bin)
        .args(["service", "status", "--root", r])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("active (running)"), "{}", text(&out));
    fakes.take_calls();

    // Uninstall: the unit, the binary, the manifest and the dirs it made go;
    // what was there before stays, and so does the config (credentials).
    let out = install_sh(&fakes, &["--uninstall", "--root", r]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = fakes.take_calls();
    assert!(
        calls.contains(&"systemctl disable --now citadel.service".to_owned()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"systemctl daemon-reload".to_owned()),
        "{calls:?}"
    );
    assert!(calls.contains(&"userdel citadel".to_owned()), "{calls:?}");
    let mut after = snapshot(&root);
    for kept in ["etc/citadel", "etc/citadel/config.json"] {
        assert!(after.remove(kept).is_some(), "{kept} is kept");
    }
    assert_eq!(after, before, "uninstall left or removed something else");

    // Uninstalling again: nothing to do.
    let out = install_sh(&fakes, &["--uninstall", "--root", r]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to remove"), "{}", text(&out));
}

#[test]
fn a_dist_tarball_is_installed_only_when_it_matches_sha256sums() {
    let fakes = Fakes::new();
    let root = a_root();
    let r = root.to_str().unwrap();
    let arch = std::env::consts::ARCH;
    let dist = fresh_temp_dir("install-dist");
    let name = format!("citadel-9.9.9-{arch}-linux-musl");
    fs::create_dir_all(dist.join(&name)).unwrap();
    fs::copy(citadel_bin(), dist.join(&name).join("citadel")).unwrap();
    let tarball = format!("{name}.tar.gz");
    let ok = Command::new("tar")
        .args(["-czf", &tarball, &name])
        .current_dir(&dist)
        .status()
        .unwrap();
    assert!(ok.success());
    fs::remove_dir_all(dist.join(&name)).unwrap();
    let sums = Command::new("sha256sum")
        .arg(&tarball)
        .current_dir(&dist)
        .output()
        .unwrap();
    fs::write(dist.join("SHA256SUMS"), &sums.stdout).unwrap();
    let d = dist.to_str().unwrap();

    // A wrong checksum: refused, nothing installed.
    let good = String::from_utf8(sums.stdout).unwrap();
    fs::write(
        dist.join("SHA256SUMS"),
        format!("{}{}", "0".repeat(64), &good[64..]),
    )
    .unwrap();
    let before = snapshot(&root);
    let out = install_sh(&fakes, &["--dist", d, "--root", r]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("does not match its SHA-256"),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&root), before);

    fs::write(dist.join("SHA256SUMS"), &good).unwrap();
    let out = install_sh(
        &fakes,
        &["--dist", d, "--root", r, "--prefix", "/opt/citadel"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("verified"), "{}", text(&out));
    assert_eq!(
        fs::read(root.join("opt/citadel/bin/citadel")).unwrap(),
        fs::read(citadel_bin()).unwrap()
    );
    assert!(fakes.take_calls().is_empty(), "no --service: no systemctl");
    let out = install_sh(
        &fakes,
        &["--uninstall", "--root", r, "--prefix", "/opt/citadel"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        snapshot(&root),
        before,
        "the created /opt/citadel tree is gone"
    );
}

#[test]
fn without_root_it_goes_through_sudo_or_says_what_it_needs() {
    let fakes = Fakes::new();
    let root = a_root();
    let r = root.to_str().unwrap();
    // A copy uid 65534 can read and run.
    let bin_dir = fresh_temp_dir("install-bin");
    fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.join("citadel");
    fs::copy(citadel_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    // The script too: the checkout may be under a home only root can enter.
    let script = bin_dir.join("install.sh");
    fs::copy(repo().join("scripts/install.sh"), &script).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |sudo: &str| {
        let mut cmd = fakes.command("setpriv");
        cmd.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "bash",
        ])
        .arg(&script)
        .args(["--binary", bin.to_str().unwrap(), "--root", r, "--service"])
        .env("CITADEL_INSTALL_SUDO", sudo);
        cmd.output()
    };
    let Ok(out) = as_nobody("/nonexistent/sudo") else {
        skip_unless_ci(
            "without_root_it_goes_through_sudo_or_says_what_it_needs",
            "no setpriv",
        );
        return;
    };
    if String::from_utf8_lossy(&out.stderr).contains("setpriv:") {
        // Not root here: setpriv cannot switch users.
        skip_unless_ci(
            "without_root_it_goes_through_sudo_or_says_what_it_needs",
            "setpriv cannot switch to uid 65534 (the tests do not run as root)",
        );
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("root is needed"), "{t}");
    assert!(t.contains("no sudo"), "{t}");
    assert!(t.contains("--prefix"), "{t}");
    assert!(!root.join("usr/local/bin/citadel").exists());

    // With a sudo: it re-runs itself through it with the same arguments.
    let fake_sudo = fakes.dir.join("fake-sudo");
    let record = fresh_temp_dir("install-sudo");
    fs::set_permissions(&record, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(
        &fake_sudo,
        format!("#!/bin/sh\necho \"$@\" >{}/sudo-args\n", record.display()),
    )
    .unwrap();
    fs::set_permissions(&fake_sudo, fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody(fake_sudo.to_str().unwrap()).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("running it through sudo"),
        "{}",
        text(&out)
    );
    let args = fs::read_to_string(record.join("sudo-args")).unwrap();
    assert!(
        args.starts_with("-- env CITADEL_INSTALL_VIA_SUDO=1 bash ")
            && args.contains("/install.sh --binary ")
            && args.trim_end().ends_with(&format!("--root {r} --service")),
        "{args}"
    );
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_unless_ci(
            "the_unit_passes_systemd_analyze_verify",
            "systemd-analyze is missing (Debian package systemd)",
        );
        return;
    }
    let fakes = Fakes::new();
    let root = a_root();
    let r = root.to_str().unwrap();
    let out = fakes
        .command(citadel_bin())
        .args(["service", "install", "--root", r, "--binary", citadel_bin()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let unit = root.join("etc/systemd/system/citadel.service");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let t = text(&out);
    // Messages about other units of this machine (not ours) are not ours to fix.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("citadel.service"))
        .collect();
    assert!(out.status.success(), "{t}");
    assert!(
        ours.is_empty(),
        "systemd-analyze verify complains: {ours:?}\n{t}"
    );
    let text = fs::read_to_string(&unit).unwrap();
    for want in [
        "Restart=always",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=35s",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LimitNOFILE=65536",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}

#[test]
fn docker_managed_services_put_the_service_user_in_the_docker_group() {
    let fakes = Fakes::new();
    fs::write(fakes.state.join("group-docker"), "").unwrap();
    fs::write(fakes.state.join("user-gpu"), "").unwrap();
    let root = a_root();
    let r = root.to_str().unwrap();
    let out = fakes
        .command(citadel_bin())
        .args([
            "service",
            "install",
            "--root",
            r,
            "--user",
            "gpu",
            "--up",
            "--services",
            "vllm",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("root-equivalent"), "{}", text(&out));
    let calls = fakes.take_calls();
    assert!(
        calls.contains(&"usermod -aG docker gpu".to_owned()),
        "{calls:?}"
    );
    assert!(!calls.iter().any(|c| c.starts_with("useradd")), "{calls:?}");
    let unit = fs::read_to_string(root.join("etc/systemd/system/citadel.service")).unwrap();
    assert!(
        unit.contains("User=gpu\n") && unit.contains(" up\n"),
        "{unit}"
    );

    // Docker installed, no services configured yet (a config job may bring
    // them): the service user still joins the docker group.
    fs::write(fakes.state.join("user-gpu2"), "").unwrap();
    let out = fakes
        .command(citadel_bin())
        .args(["service", "install", "--root", r, "--user", "gpu2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let calls = fakes.take_calls();
    assert!(
        calls.contains(&"usermod -aG docker gpu2".to_owned()),
        "{calls:?}"
    );

    // --user naming nobody: a clear error.
    let out = fakes
        .command(citadel_bin())
        .args(["service", "install", "--root", r, "--user", "ghost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--user ghost: no such user"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_hung_tool_is_killed_at_service_tool_timeout_with_an_error_naming_it() {
    let fakes = Fakes::new();
    // systemctl daemon-reload hangs; the sleep it started records its pid.
    fs::write(
        fakes.dir.join("systemctl"),
        FAKE_SYSTEMCTL.replacen(
            "case \"$1\" in\n",
            "case \"$1\" in\ndaemon-reload) sleep 300 & echo $! >\"$FAKE_STATE/hung-pid\"; wait ;;\n",
            1,
        ),
    )
    .unwrap();
    let root = a_root();
    let r = root.to_str().unwrap();
    let out = fakes
        .command(citadel_bin())
        .args(["service", "install", "--root", r, "--binary", citadel_bin()])
        .args(["--service-tool-timeout", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(
            "systemctl daemon-reload did not finish within 1s (service-tool-timeout) and was killed"
        ),
        "{}",
        text(&out)
    );
    // What the hung tool started went with it (its whole process group).
    let hung = wait_for_pid_file(&fakes.state.join("hung-pid"), Duration::from_secs(5));
    wait_pid_gone("the hung tool's sleep", hung, Duration::from_secs(10));
    let calls = fakes.take_calls();
    assert!(
        !calls.iter().any(|c| c.contains("enable --now")),
        "nothing ran after the hung tool: {calls:?}"
    );
}
