//! Status reports not yet accepted by Nexus, one file per report in
//! `{state-dir}/nexus-spool/`, so that a restart (or a crash) delivers them.
//! This module owns that directory and `{state-dir}/nexus-rejected/`, where a
//! report Nexus will never take (the job is unknown to it) is kept for a
//! person to look at; it decides nothing about delivery (see `reporter.rs`).
//!
//! A change costs one report, never the whole spool: saving writes the
//! report's own file (temporary file, fsync, rename, fsync of the directory)
//! and removing unlinks it. The unlink is not fsynced: after a power loss a
//! delivered report may come back and be sent again, but an accepted report
//! is never lost. Files are named `{seq}-{id}.json`; the sequence number
//! keeps the order of arrival across restarts and tells a newer report of
//! the same job from an older one. A file that cannot be read is set aside
//! (`….corrupt-{ms}`), never deleted. `nexus-reports.json`, the single-file
//! spool of older versions, is migrated once at start.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    /// `SUCCESS` or `FAILURE`.
    pub status: String,
    pub output: String,
}

/// Where one spooled report is. Only its id is kept in memory, not its
/// output — unless its file could not be written.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub id: String,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    File(PathBuf),
    /// The file could not be written (disk full…): delivered from memory,
    /// lost on a restart.
    Memory(Box<Report>),
}

pub struct Spool {
    dir: PathBuf,
    rejected: PathBuf,
    next_seq: AtomicU64,
}

const LEGACY: &str = "nexus-reports.json";
const SPOOL_DIR: &str = "nexus-spool";
const REJECTED_DIR: &str = "nexus-rejected";

impl Spool {
    /// Open (creating) the spool of `state_dir`; returns it with the reports
    /// left by earlier runs, oldest first.
    pub fn open(state_dir: &Path) -> Result<(Spool, Vec<Stored>), String> {
        create_private_dir(state_dir)?;
        let dir = state_dir.join(SPOOL_DIR);
        create_private_dir(&dir)?;
        let mut found: Vec<(u64, PathBuf, String)> = Vec::new();
        let entries =
            fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.rsplit_once(".tmp.").map(|(_, pid)| pid) {
                // Half-written by a process that is gone: its report was never saved.
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let seq = name
                .split_once('-')
                .and_then(|(n, _)| n.parse::<u64>().ok());
            let (Some(seq), true) = (seq, name.ends_with(".json")) else {
                continue;
            };
            match read_report(&path) {
                Ok(r) => found.push((seq, path, r.id)),
                Err(e) => set_aside(&path, &e),
            }
        }
        found.sort_by_key(|(seq, _, _)| *seq);
        // A crash between saving a newer report of a job and removing the
        // older one leaves both: the newer wins.
        let mut newest: HashMap<String, u64> = HashMap::new();
        for (seq, _, id) in &found {
            newest.insert(id.clone(), *seq);
        }
        let mut reports = Vec::with_capacity(newest.len());
        for (seq, path, id) in found {
            if newest[&id] == seq {
                reports.push(Stored {
                    seq,
                    id,
                    place: Place::File(path),
                });
            } else {
                let _ = fs::remove_file(&path);
            }
        }
        let next = reports.last().map_or(1, |s| s.seq + 1);
        let spool = Spool {
            dir,
            rejected: state_dir.join(REJECTED_DIR),
            next_seq: AtomicU64::new(next),
        };
        spool.migrate(&state_dir.join(LEGACY), &mut reports);
        if !reports.is_empty() {
            log::info!(
                "{} status reports from an earlier run are waiting for Nexus in {}",
                reports.len(),
                spool.dir.display()
            );
        }
        Ok((spool, reports))
    }

    /// The directory of undelivered reports.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Save a report in its own file. On a write error the report is kept
    /// in memory and still delivered; only its survival across a restart is
    /// lost, which is logged.
    pub fn save(&self, report: &Report) -> Stored {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(file_name(seq, &report.id));
        let place = match write_atomically(&path, &to_json(report)) {
            Ok(()) => Place::File(path),
            Err(e) => {
                log::error!(
                    "cannot write the report of job {} to {}: {e}; it is kept in memory only",
                    report.id,
                    path.display()
                );
                Place::Memory(Box::new(report.clone()))
            }
        };
        Stored {
            seq,
            id: report.id.clone(),
            place,
        }
    }

    pub fn load(&self, stored: &Stored) -> Result<Report, String> {
        match &stored.place {
            Place::File(path) => read_report(path),
            Place::Memory(r) => Ok((**r).clone()),
        }
    }

    /// Replace a saved report by a changed one (same job, same place).
    pub fn rewrite(&self, stored: &Stored, report: Report) -> Stored {
        match &stored.place {
            Place::File(path) => match write_atomically(path, &to_json(&report)) {
                Ok(()) => stored.clone(),
                Err(e) => {
                    log::error!("cannot rewrite {}: {e}", path.display());
                    Stored {
                        place: Place::Memory(Box::new(report)),
                        ..stored.clone()
                    }
                }
            },
            Place::Memory(_) => Stored {
                place: Place::Memory(Box::new(report)),
                ..stored.clone()
            },
        }
    }

    pub fn remove(&self, stored: &Stored) {
        if let Place::File(path) = &stored.place {
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    log::error!("cannot remove the delivered report {}: {e}", path.display())
                }
                _ => {}
            }
        }
    }

    /// Move a report Nexus will never accept to the rejected store; returns
    /// the file it is kept in. On error it stays in the spool.
    pub fn reject(&self, stored: &Stored, report: &Report, why: &str) -> Result<PathBuf, String> {
        create_private_dir(&self.rejected)?;
        let path = self.rejected.join(file_name(stored.seq, &report.id));
        let body = serde_json::json!({
            "id": report.id,
            "status": report.status,
            "output": report.output,
            "rejected_at": crate::clock::now_rfc3339(),
            "reason": why,
        });
        write_atomically(&path, body.to_string().as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.remove(stored);
        Ok(path)
    }

    /// Reports of the single-file spool of older versions, if there is one,
    /// become files of this spool; then that file is removed.
    fn migrate(&self, legacy: &Path, reports: &mut Vec<Stored>) {
        let text = match fs::read_to_string(legacy) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                log::error!("cannot read the old spool {}: {e}", legacy.display());
                return;
            }
        };
        let old = match serde_json::from_str::<Vec<Report>>(&text) {
            Ok(r) => r,
            Err(e) => return set_aside(legacy, &e.to_string()),
        };
        let known: std::collections::HashSet<String> =
            reports.iter().map(|s| s.id.clone()).collect();
        let mut ok = true;
        for r in old.into_iter().filter(|r| !known.contains(&r.id)) {
            let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
            let path = self.dir.join(file_name(seq, &r.id));
            // One fsync of the directory for all of them, below.
            match write_synced(&path, &to_json(&r)) {
                Ok(()) => reports.push(Stored {
                    seq,
                    id: r.id,
                    place: Place::File(path),
                }),
                Err(e) => {
                    log::error!("cannot migrate a report to {}: {e}", path.display());
                    ok = false;
                    break;
                }
            }
        }
        if ok && sync_dir(&self.dir).is_ok() {
            let _ = fs::remove_file(legacy);
            log::info!(
                "migrated the report spool {} to {}",
                legacy.display(),
                self.dir.display()
            );
        }
    }
}

/// `{seq}-{id}.json`, the id made safe for a file name (the file's content
/// has the real one).
fn file_name(seq: u64, id: &str) -> String {
    let safe: String = id
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{seq:012}-{safe}.json")
}

fn to_json(r: &Report) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

fn read_report(path: &Path) -> Result<Report, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn set_aside(path: &Path, why: &str) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{}", crate::clock::now_millis()));
    log::error!(
        "spool file {} is unreadable ({why}); moved to {}",
        path.display(),
        Path::new(&aside).display()
    );
    let _ = fs::rename(path, &aside);
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

/// Replace `path` by `bytes` so that a crash leaves the old or the new
/// content, never a mix, and the new content survives a power loss.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_synced(path, bytes)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Temporary file, fsync, rename; the rename is durable once the directory
/// is synced.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Per process, so that two agents sharing a state directory by mistake
    // never write each other's half-written file.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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

    fn ids(stored: &[Stored]) -> Vec<&str> {
        stored.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn reports_survive_a_reopen_until_removed() {
        let d = dir("reopen");
        let (s, none) = Spool::open(&d).unwrap();
        assert!(none.is_empty());
        let a = s.save(&report("a"));
        let b = s.save(&report("b/../c d"));
        drop(s);
        let (s, found) = Spool::open(&d).unwrap();
        assert_eq!(ids(&found), ["a", "b/../c d"]);
        assert_eq!(s.load(&found[1]).unwrap(), report("b/../c d"));
        s.remove(&a);
        let c = s.save(&report("c"));
        assert!(c.seq > b.seq, "sequence numbers go on after a reopen");
        let (_, found) = Spool::open(&d).unwrap();
        assert_eq!(ids(&found), ["b/../c d", "c"]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn of_two_reports_of_one_job_the_newer_wins() {
        let d = dir("newer");
        let (s, _) = Spool::open(&d).unwrap();
        s.save(&report("a"));
        let newer = Report {
            output: "newer".into(),
            ..report("a")
        };
        s.save(&newer);
        let (s, found) = Spool::open(&d).unwrap();
        assert_eq!(ids(&found), ["a"]);
        assert_eq!(s.load(&found[0]).unwrap(), newer);
        assert_eq!(
            fs::read_dir(s.dir()).unwrap().count(),
            1,
            "the older is gone"
        );
        let _ = fs::remove_dir_all(&d);
    }

    /// (name, size, inode, mtime) of every file of the spool.
    fn listing(dir: &Path) -> std::collections::BTreeMap<String, (u64, u64, i64, i64)> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let m = e.metadata().unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, (m.len(), m.ino(), m.mtime(), m.mtime_nsec()))
            })
            .collect()
    }

    /// Saving or removing a report touches that report's file and nothing
    /// else, however many reports the spool holds.
    #[test]
    fn a_change_writes_one_report_whatever_the_spool_holds() {
        let d = dir("cost");
        let (s, _) = Spool::open(&d).unwrap();
        let mut stored = Vec::new();
        for i in 0..10_000 {
            stored.push(s.save(&report(&format!("job-{i}"))));
        }
        let before = listing(s.dir());
        assert_eq!(before.len(), 10_000);
        let one = report("one-more");
        let added = s.save(&one);
        let after = listing(s.dir());
        let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        assert_eq!(new.len(), 1, "one file per report");
        assert_eq!(
            after[new[0]].0,
            to_json(&one).len() as u64,
            "the new file is that report, nothing more"
        );
        let changed = before.iter().filter(|(k, v)| after.get(*k) != Some(v));
        assert_eq!(changed.count(), 0, "no other report was rewritten");

        s.remove(&stored[5_000]);
        s.remove(&added);
        let last = listing(s.dir());
        assert_eq!(last.len(), 9_999);
        let changed = last.iter().filter(|(k, v)| after.get(*k) != Some(v));
        assert_eq!(changed.count(), 0, "removing touched no other report");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_old_single_file_spool_is_migrated_once() {
        let d = dir("legacy");
        create_private_dir(&d).unwrap();
        let old = vec![report("x"), report("y")];
        fs::write(d.join(LEGACY), serde_json::to_vec(&old).unwrap()).unwrap();
        let (s, found) = Spool::open(&d).unwrap();
        assert_eq!(ids(&found), ["x", "y"]);
        assert_eq!(s.load(&found[0]).unwrap(), report("x"));
        assert!(!d.join(LEGACY).exists(), "migrated once, then removed");
        let (_, found) = Spool::open(&d).unwrap();
        assert_eq!(ids(&found), ["x", "y"]);
        let _ = fs::remove_dir_all(&d);
    }

    fn names_containing(dir: &Path, needle: &str) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(needle))
            .count()
    }

    #[test]
    fn unreadable_files_are_set_aside() {
        let d = dir("corrupt");
        create_private_dir(&d).unwrap();
        fs::write(d.join(LEGACY), "{not json").unwrap();
        let (s, found) = Spool::open(&d).unwrap();
        assert!(found.is_empty());
        assert_eq!(names_containing(&d, "corrupt"), 1);
        fs::write(s.dir().join("000000000007-x.json"), "[").unwrap();
        fs::write(s.dir().join("000000000008-y.json.tmp.999999999"), "[").unwrap();
        let (s, found) = Spool::open(&d).unwrap();
        assert!(found.is_empty());
        assert_eq!(names_containing(s.dir(), "corrupt"), 1);
        assert_eq!(
            names_containing(s.dir(), ".tmp."),
            0,
            "a dead writer's temp file"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_rejected_report_is_kept_with_the_reason() {
        let d = dir("rejected");
        let (s, _) = Spool::open(&d).unwrap();
        let r = report("gone");
        let stored = s.save(&r);
        let path = s.reject(&stored, &r, "HTTP 410").unwrap();
        assert!(path.starts_with(d.join(REJECTED_DIR)));
        let kept: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(kept["id"], "gone");
        assert_eq!(kept["reason"], "HTTP 410");
        let (_, found) = Spool::open(&d).unwrap();
        assert!(found.is_empty(), "no longer in the spool");
        let _ = fs::remove_dir_all(&d);
    }
}
