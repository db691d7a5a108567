//! `model_download` (`DOWNLOAD_MODEL`): one model file, from a URL or a
//! Hugging Face repo, into `models-dir/<model_type>/<file>`. Owns the
//! payload, the order of the steps and the result; where files may go, the
//! lock and atomic placement are disk.rs; HTTP, resuming and progress are
//! fetch.rs; the SHA-256, on its own thread, is hash.rs.
//!
//! Steps: check the payload → resolve the place (never outside the models
//! directory) → take the file's lock (a second job for the same file waits
//! here) → if the file is there and complete (its checksum matches, or
//! without a checksum its size is the server's), answer at once → else
//! download into `<file>.partial` (resuming what is there) → verify the
//! checksum (a mismatch deletes the partial file and fails for good) →
//! fsync, rename into place.
//!
//! Result: `{path, bytes, sha256, resumed_from}`; `resumed_from` is how
//! many bytes were on disk before this job fetched anything (all of them
//! for a file that was already complete).

mod disk;
mod fetch;
mod hash;

use super::{Context, Handler};
use crate::config::Settings;
use crate::http::HttpClient;
use crate::job::{json_kind, Job, JobError};
use disk::Place;
use fetch::{shown, Fetcher};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

pub struct ModelDownload {
    models_dir: PathBuf,
    hf_url: String,
    fetcher: Fetcher,
}

impl ModelDownload {
    pub fn new(s: &Settings) -> ModelDownload {
        ModelDownload {
            models_dir: s.models_dir(),
            hf_url: s.hf_url.clone(),
            fetcher: Fetcher {
                http: HttpClient::downloads(s.download_connect_timeout),
                idle: s.download_idle_timeout,
                token_origin: fetch::origin(&s.hf_url),
                token: s.hf_token.clone(),
                max_resumes: s.download_max_resumes,
                backoff_base: s.retry_base,
                backoff_cap: s.retry_cap,
            },
        }
    }
}

impl Handler for ModelDownload {
    fn run(&self, job: &Job, ctx: &mut Context<'_>) -> Result<Value, JobError> {
        let req = Request::parse(&job.payload, &self.hf_url)?;
        let place = Place::new(&self.models_dir, &req.model_type, &req.file)?;
        let _lock = place.lock(ctx)?;
        if let Some(done) = self.already_there(&req, &place, ctx)? {
            log::info!(
                "model_download {}: {} is already complete",
                job.id,
                place.path.display()
            );
            return Ok(done);
        }
        log::info!(
            "model_download {}: {} → {}",
            job.id,
            shown(&req.url),
            place.path.display()
        );
        let got = self.fetcher.download(&req.url, &place, ctx)?;
        if let Some(want) = &req.sha256 {
            if got.sha256 != *want {
                drop(got.file);
                let _ = std::fs::remove_file(&place.partial);
                return Err(JobError::Permanent(format!(
                    "model_download: checksum mismatch for {}: expected sha256 {want}, got {} \
                     ({} bytes); the download was deleted",
                    shown(&req.url),
                    got.sha256,
                    got.bytes
                )));
            }
        }
        disk::install(got.file, &place).map_err(|e| {
            JobError::Permanent(format!(
                "model_download: cannot put {} in place: {e}",
                place.path.display()
            ))
        })?;
        Ok(result(
            &place.path,
            got.bytes,
            &got.sha256,
            got.resumed_from,
        ))
    }
}

impl ModelDownload {
    /// The result for a file that is already complete, if it is.
    fn already_there(
        &self,
        req: &Request,
        place: &Place,
        ctx: &Context<'_>,
    ) -> Result<Option<Value>, JobError> {
        let len = match std::fs::metadata(&place.path) {
            Ok(m) if m.is_file() => m.len(),
            _ => return Ok(None),
        };
        if req.sha256.is_none() {
            match self.fetcher.remote_size(&req.url, ctx)? {
                Some(size) if size == len => {}
                _ => return Ok(None),
            }
        }
        let (bytes, sha256) = disk::hash_file(&place.path).map_err(|e| {
            JobError::Permanent(format!(
                "model_download: cannot read {}: {e}",
                place.path.display()
            ))
        })?;
        if req.sha256.as_ref().is_some_and(|want| *want != sha256) {
            log::info!(
                "model_download: {} has another checksum; fetching it again",
                place.path.display()
            );
            return Ok(None);
        }
        Ok(Some(result(&place.path, bytes, &sha256, bytes)))
    }
}

fn result(path: &Path, bytes: u64, sha256: &str, resumed_from: u64) -> Value {
    json!({
        "path": path.display().to_string(),
        "bytes": bytes,
        "sha256": sha256,
        "resumed_from": resumed_from,
    })
}

/// A checked payload.
#[derive(Debug, PartialEq)]
struct Request {
    url: String,
    /// The file's name under the model type's folder (may contain `/`).
    file: String,
    model_type: String,
    /// Lower-case hex.
    sha256: Option<String>,
}

impl Request {
    fn parse(p: &Map<String, Value>, hf_url: &str) -> Result<Request, JobError> {
        let bad = |msg: String| JobError::Permanent(format!("model_download: {msg}"));
        let text = |name: &str| -> Result<Option<String>, JobError> {
            match p.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.trim().is_empty() => {
                    Err(bad(format!("payload.{name} is empty")))
                }
                Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
                Some(v) => Err(bad(format!(
                    "payload.{name} must be a string, got {}",
                    json_kind(v)
                ))),
            }
        };
        let url = text("url")?;
        let repo = text("repo")?;
        let repo_url = text("repo_url")?;
        let file_name = text("file_name")?;
        let revision = text("revision")?.unwrap_or_else(|| "main".into());
        let model_type = text("model_type")?.unwrap_or_else(|| "models".into());
        let sha256 = match text("sha256")? {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(h.to_ascii_lowercase())
            }
            Some(h) => {
                return Err(bad(format!(
                    "payload.sha256 must be 64 hexadecimal digits, got '{}'",
                    crate::clip::clip(&h, 80)
                )))
            }
            None => None,
        };
        if revision.contains(char::is_whitespace) || revision.split('/').any(|c| c == "..") {
            return Err(bad(format!(
                "payload.revision '{revision}' is not a revision"
            )));
        }
        let need_file = |source: &str| {
            file_name.clone().ok_or_else(|| {
                bad(format!(
                    "payload.{source} needs payload.file_name (the file in the repository)"
                ))
            })
        };
        let (url, file) = match (url, repo, repo_url) {
            (Some(url), None, None) => {
                http_url("url", &url).map_err(bad)?;
                let file = match file_name.clone() {
                    Some(f) => f,
                    None => last_segment(&url).ok_or_else(|| {
                        bad("payload.url ends in no file name: give payload.file_name".into())
                    })?,
                };
                (url, file)
            }
            (None, Some(repo), None) => {
                let parts: Vec<&str> = repo.split('/').collect();
                let plain = |c: &&str| {
                    !c.is_empty()
                        && *c != "."
                        && *c != ".."
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                };
                if parts.len() != 2 || !parts.iter().all(plain) {
                    return Err(bad(format!(
                        "payload.repo must be 'org/name' (letters, digits, . _ -), got '{}'",
                        crate::clip::clip(&repo, 80)
                    )));
                }
                let file = need_file("repo")?;
                (hf_file_url(hf_url, &repo, &revision, &file), file)
            }
            (None, None, Some(repo_url)) => {
                http_url("repo_url", &repo_url).map_err(bad)?;
                let file = need_file("repo_url")?;
                let base = repo_url.trim_end_matches('/');
                let url = format!(
                    "{base}/resolve/{}/{}",
                    encode(&revision, false),
                    encode(&file, true)
                );
                (url, file)
            }
            (None, None, None) => {
                return Err(bad(
                    "the payload needs url, or repo ('org/name') or repo_url with file_name".into(),
                ))
            }
            _ => return Err(bad("give only one of payload.url, repo and repo_url".into())),
        };
        Ok(Request {
            url,
            file,
            model_type,
            sha256,
        })
    }
}

/// `{hf}/{repo}/resolve/{revision}/{file}`.
fn hf_file_url(hf: &str, repo: &str, revision: &str, file: &str) -> String {
    format!(
        "{}/{repo}/resolve/{}/{}",
        hf.trim_end_matches('/'),
        encode(revision, false),
        encode(file, true)
    )
}

/// Percent-encodes all but unreserved characters (and `/` when `keep_slash`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn http_url(name: &str, url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("payload.{name} must be an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || url.contains(char::is_whitespace) {
        return Err(format!("payload.{name} names no host"));
    }
    Ok(())
}

/// The last path segment of a URL (no query), if it is not empty.
fn last_segment(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let rest = path.split_once("://")?.1;
    let (_, path) = rest.split_once('/')?;
    let last = path.rsplit('/').next()?;
    (!last.is_empty()).then(|| last.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Request, String> {
        Request::parse(v.as_object().unwrap(), "https://hf.example").map_err(|e| e.to_string())
    }

    #[test]
    fn repo_files_use_the_hugging_face_layout() {
        let r = parse(json!({"repo": "org/m", "file_name": "sub/w 1.bin"})).unwrap();
        assert_eq!(r.url, "https://hf.example/org/m/resolve/main/sub/w%201.bin");
        assert_eq!(
            (r.file.as_str(), r.model_type.as_str()),
            ("sub/w 1.bin", "models")
        );
        let r = parse(
            json!({"repo_url": "https://hf.example/org/m/", "file_name": "a.gguf",
            "revision": "refs/pr/1", "model_type": "llm"}),
        )
        .unwrap();
        assert_eq!(
            r.url,
            "https://hf.example/org/m/resolve/refs%2Fpr%2F1/a.gguf"
        );
        let r = parse(json!({"url": "http://h/x/y.bin?sig=1"})).unwrap();
        assert_eq!(r.file, "y.bin");
        let h = "AB".repeat(32);
        let r = parse(json!({"url": "http://h/y", "sha256": h})).unwrap();
        assert_eq!(r.sha256.unwrap(), "ab".repeat(32));
    }

    #[test]
    fn bad_payloads_say_what_to_fix() {
        for (p, want) in [
            (json!({}), "needs url, or repo"),
            (
                json!({"url": 5}),
                "payload.url must be a string, got a number",
            ),
            (json!({"url": "ftp://x/y"}), "http:// or https://"),
            (json!({"url": "http://h/"}), "no file name"),
            (json!({"repo": "org/m"}), "needs payload.file_name"),
            (json!({"repo": "../m", "file_name": "x"}), "'org/name'"),
            (json!({"repo": "a/b/c", "file_name": "x"}), "'org/name'"),
            (json!({"url": "http://h/y", "repo": "a/b"}), "only one of"),
            (
                json!({"url": "http://h/y", "sha256": "abc"}),
                "64 hexadecimal",
            ),
            (
                json!({"url": "http://h/y", "sha256": "g".repeat(64)}),
                "64 hexadecimal",
            ),
            (
                json!({"url": "http://h/y", "model_type": ["x"]}),
                "got an array",
            ),
            (json!({"url": "http://h/y", "file_name": ""}), "is empty"),
        ] {
            let err = parse(p.clone()).unwrap_err();
            assert!(err.contains(want), "{p}: {err}");
        }
    }
}
