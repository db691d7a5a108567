//! The process group of one shell command: signalling it as a whole
//! (kill(2) with a negative pid), telling whether any of it still lives
//! (`/proc`), and reaping its leader.
//!
//! The leader (`/bin/sh`) is reaped only after the rest of its group is
//! gone: until then its pid, which is the group's id, cannot be taken by
//! another process, so a signal to the group never reaches a stranger.
//! Its exit is awaited with `waitid(WNOWAIT)`, which leaves it a zombie.
//! Every group not yet reaped is known here, so that the agent can kill
//! what is left of them before it exits ([`kill_all`]).
//!
//! An agent that is SIGKILLed runs no exit code: each group is watched by
//! a [`Reaper`], a tiny `/bin/sh` outside it that holds the read end of a
//! pipe from the agent and SIGKILLs the group when that pipe closes —
//! which the kernel does when the agent dies, however it dies. The leader
//! also gets PR_SET_PDEATHSIG (SIGKILL). A group reaped normally stops its
//! reaper first (before its id may be reused).

use crate::sync::lock;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, Weak};

pub use libc::{SIGKILL, SIGTERM};

/// Every group started, until it is reaped (dead ones are dropped lazily).
static GROUPS: Mutex<Vec<Weak<Group>>> = Mutex::new(Vec::new());

/// The reaper's script: the group id comes first on stdin; end of input
/// (the agent is gone, or it closed the pipe) kills the group. Terminal
/// signals are ignored: only the pipe, or the agent's SIGKILL, ends it.
const REAPER_SCRIPT: &str =
    "trap '' INT TERM HUP QUIT; read pgid || exit 0; read _; kill -9 -\"$pgid\"";

/// A `/bin/sh` that SIGKILLs one process group once the agent dies (see
/// the module comment). Killed and reaped when dropped.
pub struct Reaper {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Reaper {
    /// Starts a reaper, before the command it is to watch.
    pub fn start() -> io::Result<Reaper> {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("citadel-shell-reaper")
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take();
        Ok(Reaper { child, pipe })
    }

    /// Hands it the group to kill when the agent dies.
    fn watch(&mut self, pgid: i32) -> io::Result<()> {
        let pipe = self
            .pipe
            .as_mut()
            .ok_or_else(|| io::Error::other("the reaper has no stdin"))?;
        pipe.write_all(format!("{pgid}\n").as_bytes())?;
        pipe.flush()
    }
}

impl Drop for Reaper {
    /// SIGKILL first: closing the pipe would make it kill the group.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets PR_SET_PDEATHSIG (SIGKILL) on the command about to be spawned: its
/// leader dies with the spawning thread.
pub fn die_with_agent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl(2) only sets a flag of the forked child; nothing is
    // allocated between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A running command's process group, led by the `/bin/sh` it started as.
pub struct Group {
    pgid: i32,
    /// True once the leader is reaped: its pid may name someone else then.
    reaped: Mutex<bool>,
    /// Kills the group if the agent dies first; stopped before the reap.
    reaper: Mutex<Option<Reaper>>,
}

impl Group {
    /// The group of `child`, spawned with `process_group(0)`, watched by
    /// `reaper`. When the reaper cannot be told the group, the group is
    /// SIGKILLed and the error returned (reap `child` then).
    pub fn of(child: &Child, mut reaper: Reaper) -> io::Result<Arc<Group>> {
        let pgid = child.id() as i32;
        if let Err(e) = reaper.watch(pgid) {
            // SAFETY: kill(2) of the group whose unreaped leader is `child`.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            return Err(e);
        }
        let group = Arc::new(Group {
            pgid,
            reaped: Mutex::new(false),
            reaper: Mutex::new(Some(reaper)),
        });
        let mut groups = lock(&GROUPS);
        groups.retain(|g| g.upgrade().is_some_and(|g| !*lock(&g.reaped)));
        groups.push(Arc::downgrade(&group));
        Ok(group)
    }

    pub fn id(&self) -> i32 {
        self.pgid
    }

    /// Sends `sig` to every process of the group (none once it is reaped).
    pub fn signal(&self, sig: libc::c_int) {
        let reaped = lock(&self.reaped);
        if !*reaped {
            // SAFETY: kill(2) has no memory effects; the group id is pinned
            // by the unreaped leader (see the module comment).
            unsafe {
                libc::kill(-self.pgid, sig);
            }
        }
    }

    /// Whether a process of the group other than a zombie still exists
    /// (the leader counts while it runs). An unreadable `/proc` is an error.
    pub fn alive(&self) -> io::Result<bool> {
        for entry in std::fs::read_dir("/proc")? {
            let name = entry?.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            // A process may end while we look: an unreadable stat is gone.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            if let Some((state, pgrp)) = state_and_group(&stat) {
                if pgrp == self.pgid && !matches!(state, 'Z' | 'X') {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Reaps the leader, which has exited (see [`wait_exited`]); no signal
    /// is sent to the group afterwards.
    pub fn reap(&self, child: &mut Child) -> io::Result<ExitStatus> {
        let mut reaped = lock(&self.reaped);
        // While the group id is still pinned by the unreaped leader.
        drop(lock(&self.reaper).take());
        let status = child.wait();
        *reaped = true;
        status
    }
}

/// SIGKILLs every group not yet reaped; returns how many there were.
pub fn kill_all() -> usize {
    let groups = lock(&GROUPS);
    let mut n = 0;
    for group in groups.iter().filter_map(Weak::upgrade) {
        if !*lock(&group.reaped) {
            group.signal(SIGKILL);
            n += 1;
        }
    }
    n
}

/// The state letter and process group of a `/proc/{pid}/stat` line:
/// `pid (comm) state ppid pgrp …`, where comm may hold spaces and `)`.
fn state_and_group(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Blocks until process `pid` (a child of this process) has exited,
/// without reaping it.
pub fn wait_exited(pid: u32) -> io::Result<()> {
    loop {
        // SAFETY: waitid writes only into `info`, a zeroed siginfo_t we own.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `SIGKILL`, `SIGTERM`, …: a signal's name, for messages.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        assert_eq!(
            state_and_group("42 (a) b) c) S 1 4242 4242 0 -1"),
            Some(('S', 4242))
        );
        assert_eq!(state_and_group("42 (sleep) Z 1 7 7"), Some(('Z', 7)));
        assert_eq!(state_and_group("garbage"), None);
        assert_eq!(signal_name(9), "signal 9 (SIGKILL)");
        assert_eq!(signal_name(77), "signal 77");
    }
}
