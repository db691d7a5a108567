//! Outside programs run with a bound (docker, nvidia-smi, systemctl): each
//! in its own process group, killed with the agent (PR_SET_PDEATHSIG of the
//! spawning thread), and SIGKILLed — its whole group — once its deadline
//! passes or a stop comes. Reading its pipes is the caller's business.

use crate::worker::stop::StopFlag;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Spawn `cmd` as the leader of a new process group that dies with the
/// thread spawning it.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    cmd.process_group(0);
    // SAFETY: prctl(2) only sets a flag of the forked child; nothing is
    // allocated between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Wait for a child made by [`spawn`] until `deadline` or a `stop`: its
/// exit status, or `None` once its process group was killed and it was
/// reaped.
pub fn wait(child: &mut Child, deadline: Instant, stop: Option<&StopFlag>) -> Option<ExitStatus> {
    const POLL: Duration = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                let stopped = match stop {
                    Some(s) => s.sleep(POLL),
                    None => {
                        std::thread::sleep(POLL);
                        false
                    }
                };
                if !stopped {
                    continue;
                }
            }
            Ok(None) | Err(_) => {}
        }
        // SAFETY: kill(2) of the process group this child leads; no memory involved.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.wait();
        return None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_past_its_deadline_is_killed() {
        let mut child = spawn(Command::new("sleep").arg("30")).unwrap();
        let started = Instant::now();
        let status = wait(&mut child, started + Duration::from_millis(200), None);
        assert_eq!(status, None);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(child.try_wait().unwrap().is_some(), "killed and reaped");
    }

    #[test]
    fn a_stop_ends_the_wait_and_an_exit_is_its_status() {
        let stop = StopFlag::default();
        stop.set();
        let mut child = spawn(Command::new("sleep").arg("30")).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(wait(&mut child, far, Some(&stop)), None);
        let mut child = spawn(Command::new("sh").args(["-c", "exit 3"])).unwrap();
        assert_eq!(wait(&mut child, far, None).and_then(|s| s.code()), Some(3));
    }
}
