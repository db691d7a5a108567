//! Status reports not yet accepted by Nexus, kept in a file of the state
//! directory so that a restart (or a crash) delivers them. Every change
//! rewrites the file atomically: a temporary file, fsync, rename, fsync of
//! the directory. A file that cannot be parsed is set aside, not deleted.

use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    /// `SUCCESS` or `FAILURE`.
    pub status: String,
    pub output: String,
}

pub struct Spool {
    path: PathBuf,
    reports: Vec<Report>,
}

impl Spool {
    pub fn open(dir: &Path) -> Result<Spool, String> {
        create_private_dir(dir)?;
        let path = dir.join("nexus-reports.json");
        let reports = match fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<Vec<Report>>(&text) {
                Ok(r) => r,
                Err(e) => {
                    let aside =
                        path.with_extension(format!("corrupt-{}", crate::clock::now_millis()));
                    log::error!(
                        "spool {} is unreadable ({e}); moved to {} and starting empty",
                        path.display(),
                        aside.display()
                    );
                    let _ = fs::rename(&path, &aside);
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        if !reports.is_empty() {
            log::info!(
                "{} status reports from an earlier run are waiting for Nexus",
                reports.len()
            );
        }
        Ok(Spool { path, reports })
    }

    pub fn push(&mut self, r: Report) {
        self.reports.retain(|old| old.id != r.id);
        self.reports.push(r);
        self.save();
    }

    pub fn front(&self) -> Option<&Report> {
        self.reports.first()
    }

    pub fn remove(&mut self, id: &str) {
        self.reports.retain(|r| r.id != id);
        self.save();
    }

    /// On a write error the reports stay in memory and are still delivered;
    /// only their survival across a restart is lost, which is logged.
    fn save(&self) {
        if let Err(e) = write_atomically(
            &self.path,
            &serde_json::to_vec(&self.reports).unwrap_or_default(),
        ) {
            log::error!("cannot write the report spool {}: {e}", self.path.display());
        }
    }
}

pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            format!(
                "cannot create the state directory {}: {e} (set --state-dir)",
                dir.display()
            )
        })
}

pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Per process, so that two agents sharing a state directory by mistake
    // never write each other's half-written file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("citadel-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn report(id: &str) -> Report {
        Report {
            id: id.into(),
            status: "SUCCESS".into(),
            output: "out".into(),
        }
    }

    #[test]
    fn reports_survive_a_reopen_until_removed() {
        let d = dir("reopen");
        let mut s = Spool::open(&d).unwrap();
        s.push(report("a"));
        s.push(report("b"));
        s.push(report("a")); // a job is reported once: the newer report wins
        let mut s = Spool::open(&d).unwrap();
        assert_eq!(s.front().unwrap().id, "b");
        s.remove("b");
        let s = Spool::open(&d).unwrap();
        assert_eq!(s.front(), Some(&report("a")));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_spool_is_set_aside() {
        let d = dir("corrupt");
        create_private_dir(&d).unwrap();
        fs::write(d.join("nexus-reports.json"), "{not json").unwrap();
        let s = Spool::open(&d).unwrap();
        assert!(s.front().is_none());
        let kept = fs::read_dir(&d).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("corrupt")
        });
        assert_eq!(kept.count(), 1);
        let _ = fs::remove_dir_all(&d);
    }
}
