//! The disk side of `model_download`: where a file may go (never outside the
//! models directory), the lock that keeps two jobs from writing one file,
//! free space, and putting a finished file in place (fsync, atomic rename,
//! fsync of the directory). Knows nothing of HTTP or payloads.
//!
//! Paths. Names are relative and made of plain components: no `..`, no `.`,
//! no empty component, no absolute name, no backslash or NUL. Every
//! directory below the models directory is created one level at a time; one
//! that exists is resolved (symlinks followed) and must still be inside the
//! models directory, so a symlink cannot lead a download elsewhere. The
//! `.partial` and `.lock` files are opened with `O_NOFOLLOW`.
//!
//! Lock. `flock` on `<file>.lock` (held by an open file, so it is released
//! when the job's thread drops it or the process dies: a dead agent's lock
//! never blocks a later job); a second job polls for it (cancellably) and
//! then finds the file done. The job that holds the lock removes the
//! `.lock` file when it ends (done, failed, cancelled), still holding it.
//! A waiter may then get the lock of that removed file, so a lock counts
//! only when the file locked is still the one at `<file>.lock` (same
//! device and inode); otherwise it is taken again on the file now there.
//! A `.lock` left by an agent that died stays until the next job on that
//! file ends.
//!
//! Free space: `statvfs` through `libc` — std has no call for it, and
//! running `df` would parse text of a tool that may be missing.

use crate::handlers::Context;
use crate::job::JobError;
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a job waiting for another job's lock looks again.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// Where one model file goes.
#[derive(Debug)]
pub struct Place {
    /// The directory the file is in (resolved, inside the models directory).
    pub dir: PathBuf,
    pub path: PathBuf,
    pub partial: PathBuf,
    lock: PathBuf,
}

/// Checks a relative name from the payload (`what` names the field) and
/// returns its components.
pub fn components<'a>(what: &str, name: &'a str) -> Result<Vec<&'a str>, JobError> {
    let bad = |why: &str| {
        Err(JobError::Permanent(format!(
            "model_download: payload.{what} '{name}' {why}"
        )))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.starts_with('/') {
        return bad("is an absolute path (it must be relative to the models directory)");
    }
    if name.contains(['\\', '\0']) {
        return bad("contains a backslash or NUL");
    }
    let parts: Vec<&str> = name.split('/').collect();
    for p in &parts {
        match *p {
            "" => return bad("has an empty path component"),
            "." | ".." => {
                return bad("contains '.' or '..' (it must stay in the models directory)")
            }
            _ => {}
        }
    }
    Ok(parts)
}

impl Place {
    /// `models_dir/model_type/file`, creating the directories, refusing any
    /// way out of `models_dir`.
    pub fn new(models_dir: &Path, model_type: &str, file: &str) -> Result<Place, JobError> {
        let mut dirs = components("model_type", model_type)?;
        let mut file_parts = components("file_name", file)?;
        let name = file_parts.pop().unwrap_or_default();
        if name.ends_with(".partial") || name.ends_with(".lock") {
            return Err(JobError::Permanent(format!(
                "model_download: file name '{name}' ends in .partial or .lock, which this \
                 handler uses for its own files"
            )));
        }
        dirs.extend(file_parts);
        let disk = |what: &str, p: &Path, e: io::Error| {
            JobError::Permanent(format!("model_download: {what} {}: {e}", p.display()))
        };
        fs::create_dir_all(models_dir)
            .map_err(|e| disk("cannot create the models directory", models_dir, e))?;
        let root = fs::canonicalize(models_dir)
            .map_err(|e| disk("cannot resolve the models directory", models_dir, e))?;
        let escapes = |p: &Path| {
            JobError::Permanent(format!(
                "model_download: {} leads outside the models directory {}",
                p.display(),
                root.display()
            ))
        };
        let mut dir = root.clone();
        for c in dirs {
            let next = dir.join(c);
            match fs::symlink_metadata(&next) {
                Err(e) if e.kind() == ErrorKind::NotFound => match fs::create_dir(&next) {
                    Ok(()) => {}
                    // Another job made it meanwhile: checked below like any other.
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(disk("cannot create", &next, e)),
                },
                Err(e) => return Err(disk("cannot read", &next, e)),
                Ok(_) => {}
            }
            dir = continue_checked(&next, &root).map_err(|_| escapes(&next))?;
        }
        let path = dir.join(name);
        if let Ok(m) = fs::symlink_metadata(&path) {
            if m.file_type().is_symlink() {
                match fs::canonicalize(&path) {
                    Ok(target) if target.starts_with(&root) => {}
                    _ => return Err(escapes(&path)),
                }
            }
        }
        Ok(Place {
            partial: dir.join(format!("{name}.partial")),
            lock: dir.join(format!("{name}.lock")),
            dir,
            path,
        })
    }

    /// Takes this file's lock, waiting (cancellably) while another job
    /// holds it.
    pub fn lock(&self, ctx: &Context<'_>) -> Result<FileLock, JobError> {
        let mut logged = false;
        loop {
            let file = open_nofollow(&self.lock, false).map_err(|e| {
                JobError::Permanent(format!(
                    "model_download: cannot open the lock file {}: {e}",
                    self.lock.display()
                ))
            })?;
            loop {
                // SAFETY: flock on a file descriptor this function owns.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) && e.kind() != ErrorKind::Interrupted
                {
                    return Err(JobError::Permanent(format!(
                        "model_download: cannot lock {}: {e}",
                        self.lock.display()
                    )));
                }
                if !logged {
                    log::info!(
                        "model_download: waiting for another job writing {}",
                        self.path.display()
                    );
                    logged = true;
                }
                ctx.sleep(LOCK_POLL)?;
            }
            // The job before removed the file it held: lock the one there now.
            if same_file(&file, &self.lock) {
                return Ok(FileLock {
                    file,
                    path: self.lock.clone(),
                });
            }
        }
    }
}

/// Whether `path` (not followed) is the file `file` has open.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Held while a job works on a file; dropping it removes the `.lock` file
/// (while still holding it) and releases the lock.
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Only the file this lock holds: a waiter that locked it next
        // retries on whatever is at the path (see the module comment).
        if same_file(&self.file, &self.path) {
            if let Err(e) = fs::remove_file(&self.path) {
                log::debug!("model_download: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// The resolved `p`, which must be a directory inside `root`.
fn continue_checked(p: &Path, root: &Path) -> Result<PathBuf, ()> {
    match fs::canonicalize(p) {
        Ok(real) if real.starts_with(root) && real.is_dir() => Ok(real),
        _ => Err(()),
    }
}

/// Opens (creating) `path` for reading and writing, never through a symlink.
pub fn open_nofollow(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Bytes available to this (unprivileged) process on `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between libcs
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The SHA-256 of the first `len` bytes read from `r`, fed to `hasher`.
pub fn hash_prefix(r: &mut impl Read, len: u64, hasher: &mut Sha256) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// Starts writing `file`'s bytes `from..from + len` to disk without
/// waiting (`sync_file_range`), so that the fsync at the end has little
/// left to do. A hint: errors are ignored, the final fsync is what counts.
pub fn start_writeback(file: &File, from: u64, len: u64) {
    // SAFETY: a plain syscall on a descriptor `file` owns.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as _,
            len as _,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// `(size, sha256)` of a whole file.
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    hash_prefix(&mut f, len, &mut h)?;
    Ok((len, hex(&h.finalize())))
}

/// Puts a finished `.partial` in place: data on disk first, then one atomic
/// rename, then the directory entry on disk.
pub fn install(file: File, place: &Place) -> io::Result<()> {
    file.sync_all()?;
    drop(file);
    fs::rename(&place.partial, &place.path)?;
    File::open(&place.dir)?.sync_all()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain_relative_paths() {
        for ok in ["model.gguf", "onnx/model.onnx", "a-b_c.1"] {
            assert!(components("file_name", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a\0b",
        ] {
            assert!(components("file_name", bad).is_err(), "{bad:?}");
        }
    }

    /// Runs `f` with a Context of its own (no cancel, no deadline).
    fn with_ctx<T>(f: impl FnOnce(&mut Context<'_>) -> T) -> T {
        use crate::node::profile::{DeviceConfig, LiveProfile};
        let token = std::sync::Arc::new(crate::worker::cancel::CancelToken::new());
        let profile = std::sync::Arc::new(LiveProfile::new(
            &crate::config::Settings::default(),
            std::env::temp_dir().join("citadel-disk-unused-profile.json"),
            DeviceConfig::default(),
            false,
        ));
        let mut sink = |_: &str| {};
        let mut ctx = Context::new(&token, &mut sink, None, &profile);
        f(&mut ctx)
    }

    fn ino(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().ino()
    }

    /// Open descriptors of this process on `path` (not a removed file).
    fn open_on(path: &Path) -> usize {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| fs::read_link(e.path()).is_ok_and(|l| l == path))
            .count()
    }

    #[test]
    fn the_lock_file_goes_when_its_job_ends_and_a_lock_on_a_removed_file_does_not_count() {
        let base = std::env::temp_dir().join(format!(
            "citadel-disk-lock-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&base);
        let place = Place::new(&base, "m", "w.bin").unwrap();
        let lock_path = place.lock.clone();

        // One job: the .lock is there while it holds it, gone after.
        let a = with_ctx(|ctx| place.lock(ctx)).unwrap();
        assert!(lock_path.exists());
        // B waits on the file A holds.
        let waiter = {
            let place = Place::new(&base, "m", "w.bin").unwrap();
            std::thread::spawn(move || with_ctx(|ctx| place.lock(ctx)).map(|l| ino(&l.file)))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while open_on(&lock_path) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "B never opened the lock"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Meanwhile a third job (C) made a new .lock and holds it.
        let tmp = base.join("m/new.lock");
        let c = open_nofollow(&tmp, false).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        assert_eq!(unsafe { libc::flock(c.as_raw_fd(), libc::LOCK_EX) }, 0);
        fs::rename(&tmp, &lock_path).unwrap();
        // A ends: it leaves C's file alone; B must not take A's removed one.
        drop(a);
        assert!(lock_path.exists(), "A removed a .lock it did not hold");
        let c_ino = ino(&c);
        drop(c);
        let b_ino = waiter.join().unwrap().unwrap();
        assert_eq!(b_ino, c_ino, "B counted a lock on the file A removed");
        // B ended too: it removed the file it held.
        assert!(!lock_path.exists(), "B left its .lock behind");
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_symlink_out_of_the_models_dir_is_refused() {
        let base = std::env::temp_dir().join(format!("citadel-disk-{}", std::process::id()));
        let models = base.join("models");
        let outside = base.join("outside");
        fs::create_dir_all(&models).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, models.join("evil")).unwrap();
        let err = Place::new(&models, "evil", "x.bin").unwrap_err();
        assert!(
            err.message().contains("outside the models directory"),
            "{err}"
        );
        let err = Place::new(&models, "evil/sub", "x.bin").unwrap_err();
        assert!(err.message().contains("outside"), "{err}");
        assert!(!outside.join("sub").exists());
        let ok = Place::new(&models, "llm", "sub/x.bin").unwrap();
        assert!(ok.path.starts_with(fs::canonicalize(&models).unwrap()));
        let _ = fs::remove_dir_all(&base);
    }
}
