//! The catalog of node services: the inference engines (and the extraction
//! service) this agent can run as Docker containers, by name, and what
//! container each one is ([`Spec`]: image, arguments, environment, the models
//! mount, GPUs, restart policy, host network) from the settings. Pure: it
//! runs no command (`docker` drives the CLI, `reconcile` decides).
//!
//! A spec's canonical JSON is hashed (SHA-256) into the container's label
//! `citadel.spec`: a container whose label differs from the wanted spec's
//! hash was made from other settings and is recreated.

use crate::config::Settings;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Every service the agent knows, by the name configs and flags use.
pub const CATALOG: &[&str] = &["vllm", "ollama", "llamacpp", "extraction"];

/// The label naming a container's service; only containers with it are
/// citadel's.
pub const SERVICE_LABEL: &str = "citadel.service";
/// The label holding the hash of the spec the container was made from.
pub const SPEC_LABEL: &str = "citadel.spec";

/// Where the models dir is mounted in every service container.
pub const MODELS_MOUNT: &str = "/models";

/// Whether `name` is in the catalog.
pub fn known(name: &str) -> bool {
    CATALOG.contains(&name)
}

/// `vllm, llamacpp` → the names, each checked against the catalog, without
/// repeats; the error names the unknown one and lists the catalog.
pub fn parse_list(v: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        check_known(name)?;
        if !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// The error for a name not in the catalog.
pub fn check_known(name: &str) -> Result<(), String> {
    if known(name) {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a service this agent runs (known: {})",
            CATALOG.join(", ")
        ))
    }
}

/// The setting naming the base URL a service serves at (the handler's URL).
pub fn url_setting(name: &str) -> &'static str {
    match name {
        "vllm" => "vllm-url",
        "ollama" => "ollama-url",
        "llamacpp" => "llamacpp-url",
        _ => "extraction-url",
    }
}

/// The base URL a service serves at: the one its handler uses.
pub fn url<'a>(settings: &'a Settings, name: &str) -> &'a str {
    match name {
        "vllm" => &settings.vllm_url,
        "ollama" => &settings.ollama_url,
        "llamacpp" => &settings.llamacpp_url,
        _ => &settings.extraction_url,
    }
}

/// The path that answers 2xx once the engine can take requests.
pub fn health_path(name: &str) -> &'static str {
    match name {
        "ollama" => "/api/tags",
        _ => "/health",
    }
}

/// The image used when `service-image` names none.
pub fn default_image(name: &str, gpus: bool) -> &'static str {
    match (name, gpus) {
        ("vllm", _) => "vllm/vllm-openai:latest",
        ("ollama", _) => "ollama/ollama:latest",
        ("llamacpp", true) => "ghcr.io/ggml-org/llama.cpp:server-cuda",
        ("llamacpp", false) => "ghcr.io/ggml-org/llama.cpp:server",
        _ => "ghcr.io/aceteam-ai/gliner2-service:latest",
    }
}

/// One service's container, as wanted.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub service: String,
    /// `citadel-<service>`.
    pub container: String,
    pub image: String,
    /// The engine's arguments (after the image).
    pub args: Vec<String>,
    /// Sorted by name.
    pub env: Vec<(String, String)>,
    /// `HOST_DIR:CONTAINER_DIR` bind mounts.
    pub mounts: Vec<String>,
    /// `--gpus all`.
    pub gpus: bool,
    /// `--ipc host` (vLLM: PyTorch shares tensors through /dev/shm).
    pub ipc_host: bool,
    /// The engine port, from the URL setting.
    pub port: u16,
    /// The address the engine listens on (`service-bind`).
    pub bind: IpAddr,
    /// The URL polled until the engine is ready.
    pub health_url: String,
}

impl Spec {
    /// The wanted container for `name` from the settings; `gpus`: the node
    /// has NVIDIA GPUs. Errors name the setting that is wrong or missing.
    pub fn build(settings: &Settings, name: &str, gpus: bool) -> Result<Spec, String> {
        check_known(name)?;
        let base = url(settings, name);
        let port = url_port(base).map_err(|e| format!("--{}: {e}", url_setting(name)))?;
        let bind = settings.service_bind;
        let listen = SocketAddr::new(bind, port).to_string();
        let extra = settings.service_args.get(name).cloned().unwrap_or_default();
        let models = std::path::absolute(settings.models_dir())
            .map_err(|e| format!("--models-dir: {}: {e}", settings.models_dir().display()))?;
        if models.to_string_lossy().contains([':', ',']) {
            return Err(format!(
                "--models-dir: {} contains ':' or ',', which a docker bind mount cannot name",
                models.display()
            ));
        }
        let mut env: Vec<(String, String)> = Vec::new();
        let mut args: Vec<String> = Vec::new();
        let host_port = |args: &mut Vec<String>| {
            args.extend([
                "--host".into(),
                bind.to_string(),
                "--port".into(),
                port.to_string(),
            ])
        };
        match name {
            "vllm" => {
                env.push(("HF_HOME".into(), format!("{MODELS_MOUNT}/huggingface")));
                // A positional model in the extra arguments comes first (`vllm serve MODEL`).
                args.extend(extra);
                host_port(&mut args);
            }
            "ollama" => {
                env.push(("OLLAMA_HOST".into(), listen));
                env.push(("OLLAMA_MODELS".into(), format!("{MODELS_MOUNT}/ollama")));
                args.push("serve".into());
                args.extend(extra);
            }
            "llamacpp" => {
                let model = settings.llamacpp_model.as_deref().ok_or(
                    "the llamacpp service needs --llamacpp-model (the GGUF file in the models dir it serves)",
                )?;
                args.extend(["-m".into(), format!("{MODELS_MOUNT}/{model}")]);
                host_port(&mut args);
                args.extend(extra);
            }
            _ => {
                env.push(("HF_HOME".into(), format!("{MODELS_MOUNT}/huggingface")));
                env.push(("HOST".into(), bind.to_string()));
                env.push(("PORT".into(), port.to_string()));
                args.extend(extra);
            }
        }
        env.sort();
        Ok(Spec {
            service: name.to_owned(),
            container: format!("citadel-{name}"),
            image: settings
                .service_images
                .get(name)
                .cloned()
                .unwrap_or_else(|| default_image(name, gpus).to_owned()),
            args,
            env,
            mounts: vec![format!("{}:{MODELS_MOUNT}", models.display())],
            gpus,
            ipc_host: name == "vllm",
            port,
            bind,
            health_url: format!("{base}{}", health_path(name)),
        })
    }

    /// The models dir on the host (the source of the first mount).
    pub fn models_dir(&self) -> PathBuf {
        let m = &self.mounts[0];
        PathBuf::from(&m[..m.len() - MODELS_MOUNT.len() - 1])
    }

    /// What the container is made from, in one canonical JSON value (keys
    /// sorted): the same settings give the same text, any change another.
    pub fn canonical(&self) -> Value {
        json!({
            "v": 1,
            "service": self.service,
            "container": self.container,
            "image": self.image,
            "args": self.args,
            "env": self.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "mounts": self.mounts,
            "gpus": self.gpus,
            "ipc_host": self.ipc_host,
            "restart": "unless-stopped",
            "network": "host",
        })
    }

    /// SHA-256 of the canonical JSON, hex: the `citadel.spec` label.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.canonical().to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The arguments of `docker run` for this spec.
    pub fn run_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            self.container.clone(),
            "--label".into(),
            format!("{SERVICE_LABEL}={}", self.service),
            "--label".into(),
            format!("{SPEC_LABEL}={}", self.hash()),
            "--restart".into(),
            "unless-stopped".into(),
            "--network".into(),
            "host".into(),
        ];
        if self.gpus {
            a.extend(["--gpus".into(), "all".into()]);
        }
        if self.ipc_host {
            a.extend(["--ipc".into(), "host".into()]);
        }
        for m in &self.mounts {
            a.extend(["-v".into(), m.clone()]);
        }
        for (k, v) in &self.env {
            a.extend(["-e".into(), format!("{k}={v}")]);
        }
        a.push(self.image.clone());
        a.extend(self.args.iter().cloned());
        a
    }
}

/// The port of an `http://HOST[:PORT]…` URL (80 / 443 when none is written).
pub fn url_port(url: &str) -> Result<u16, String> {
    let (default, rest) = if let Some(r) = url.strip_prefix("http://") {
        (80, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (443, r)
    } else {
        return Err(format!("'{url}' is not an http:// or https:// URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once("]:").map(|(_, p)| p),
        None => host_port.rsplit_once(':').map(|(_, p)| p),
    };
    match port {
        None | Some("") => Ok(default),
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "'{url}': the port must be a number from 1 to 65535, not '{p}'"
            )),
        },
    }
}

/// A value of `service-image` / `service-args`: a string, or (args only) a
/// list of words.
#[derive(Debug, Clone, PartialEq)]
pub enum Assigned {
    Text(String),
    Words(Vec<String>),
}

/// `NAME=VALUE[,NAME=VALUE…]` or a JSON object `{"NAME": VALUE, …}` (the
/// config file's form) → (name, value) pairs, each name checked against the
/// catalog. In the `=` form a comma starts a new pair only where a service
/// name and `=` follow (`vllm=--a x,y` keeps `x,y`).
pub fn parse_assignments(v: &str) -> Result<Vec<(String, Assigned)>, String> {
    let v = v.trim();
    if v.starts_with('{') {
        let obj: serde_json::Map<String, Value> = serde_json::from_str(v)
            .map_err(|e| format!("not a JSON object of NAME: VALUE: {e}"))?;
        return obj
            .into_iter()
            .map(|(name, value)| {
                check_known(&name)?;
                let value = match value {
                    Value::String(s) => Assigned::Text(s),
                    Value::Array(items) => Assigned::Words(
                        items
                            .into_iter()
                            .map(|i| match i {
                                Value::String(s) => Ok(s),
                                other => Err(format!("{name}: {other} is not a string")),
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                    other => {
                        return Err(format!(
                            "{name}: {other} is not a string (or a list of strings)"
                        ))
                    }
                };
                Ok((name, value))
            })
            .collect();
    }
    let mut starts: Vec<usize> = vec![0];
    for (i, _) in v.match_indices(',') {
        let after = v[i + 1..].trim_start();
        if CATALOG
            .iter()
            .any(|n| after.strip_prefix(n).is_some_and(|r| r.starts_with('=')))
        {
            starts.push(i + 1);
        }
    }
    starts.push(v.len() + 1);
    let mut out = Vec::new();
    for w in starts.windows(2) {
        let part = v[w[0]..w[1] - 1].trim();
        if part.is_empty() {
            continue;
        }
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not NAME=VALUE (e.g. vllm=…)"))?;
        let name = name.trim();
        check_known(name)?;
        out.push((name.to_owned(), Assigned::Text(value.trim().to_owned())));
    }
    if out.is_empty() {
        return Err("give NAME=VALUE (e.g. llamacpp=…)".into());
    }
    Ok(out)
}

/// An image reference as `docker run` takes it: one word, not a flag.
pub fn check_image(v: &Assigned) -> Result<String, String> {
    let Assigned::Text(image) = v else {
        return Err("an image is one string, not a list".into());
    };
    if image.is_empty() {
        return Err("the image is empty".into());
    }
    if image.starts_with('-') || image.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "'{image}' is not an image reference (e.g. vllm/vllm-openai:v0.8.5)"
        ));
    }
    Ok(image.clone())
}

/// Extra engine arguments: a list as is, a string split into words.
pub fn check_args(v: &Assigned) -> Result<Vec<String>, String> {
    match v {
        Assigned::Words(w) => Ok(w.clone()),
        Assigned::Text(t) => split_args(t),
    }
}

/// `--model 'a b' -x` → words: split on whitespace; single quotes keep
/// everything, double quotes keep all but `\"` and `\\`; a backslash outside
/// quotes escapes the next character.
pub fn split_args(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed ' in '{text}'")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c)
                            }
                            None => return Err(format!("unclosed \" in '{text}'")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed \" in '{text}'")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err(format!("'{text}' ends in a lone \\")),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// A GGUF file named relative to the models dir: no absolute path, no `..`.
pub fn check_model_file(v: &str) -> Result<String, String> {
    let p = std::path::Path::new(v);
    if v.is_empty() {
        return Err("must not be empty".into());
    }
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "'{v}' must be a file name inside the models dir (no absolute path, no ..)"
        ));
    }
    Ok(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_checked_against_the_catalog() {
        assert_eq!(
            parse_list("vllm, llamacpp,vllm").unwrap(),
            ["vllm", "llamacpp"]
        );
        assert!(parse_list("").unwrap().is_empty());
        let err = parse_list("vllm,tgi").unwrap_err();
        assert!(err.contains("'tgi'") && err.contains("extraction"), "{err}");
    }

    fn settings() -> Settings {
        let mut s = Settings::default();
        s.set("models-dir", "/srv/models").unwrap();
        s.set("llamacpp-model", "smol.gguf").unwrap();
        s
    }

    #[test]
    fn each_engine_serves_where_its_handler_looks() {
        let mut s = settings();
        s.set("llamacpp-url", "http://127.0.0.1:9191").unwrap();
        let l = Spec::build(&s, "llamacpp", false).unwrap();
        assert_eq!(l.container, "citadel-llamacpp");
        assert_eq!(l.image, "ghcr.io/ggml-org/llama.cpp:server");
        assert_eq!(
            l.args,
            [
                "-m",
                "/models/smol.gguf",
                "--host",
                "127.0.0.1",
                "--port",
                "9191"
            ]
        );
        assert_eq!(l.mounts, ["/srv/models:/models"]);
        assert_eq!(l.health_url, "http://127.0.0.1:9191/health");
        assert_eq!(l.models_dir(), PathBuf::from("/srv/models"));
        let g = Spec::build(&s, "llamacpp", true).unwrap();
        assert_eq!(g.image, "ghcr.io/ggml-org/llama.cpp:server-cuda");
        assert!(g.run_args().windows(2).any(|w| w == ["--gpus", "all"]));
        assert!(!l.run_args().iter().any(|a| a == "--gpus"));
        assert_ne!(g.hash(), l.hash());

        let o = Spec::build(&s, "ollama", false).unwrap();
        assert_eq!(o.port, 11434);
        assert_eq!(o.args, ["serve"]);
        assert!(o
            .env
            .contains(&("OLLAMA_HOST".into(), "127.0.0.1:11434".into())));
        assert!(o
            .env
            .contains(&("OLLAMA_MODELS".into(), "/models/ollama".into())));
        assert_eq!(o.health_url, "http://127.0.0.1:11434/api/tags");

        s.set("service-args", "vllm=--model Qwen/Qwen3-0.6B")
            .unwrap();
        s.set("service-bind", "0.0.0.0").unwrap();
        let v = Spec::build(&s, "vllm", true).unwrap();
        assert_eq!(
            v.args,
            [
                "--model",
                "Qwen/Qwen3-0.6B",
                "--host",
                "0.0.0.0",
                "--port",
                "8000"
            ]
        );
        assert!(v
            .env
            .contains(&("HF_HOME".into(), "/models/huggingface".into())));
        let run = v.run_args();
        for pair in [
            ["--restart", "unless-stopped"],
            ["--network", "host"],
            ["--ipc", "host"],
            ["-v", "/srv/models:/models"],
        ] {
            assert!(run.windows(2).any(|w| w == pair), "{pair:?} in {run:?}");
        }
        assert!(run.contains(&format!("citadel.spec={}", v.hash())));
        assert_eq!(run[run.len() - 7], "vllm/vllm-openai:latest");

        let e = Spec::build(&s, "extraction", false).unwrap();
        assert!(e.env.contains(&("PORT".into(), "8202".into())));
        assert!(e.args.is_empty());
    }

    #[test]
    fn llamacpp_needs_its_model_and_the_error_names_the_setting() {
        let err = Spec::build(&Settings::default(), "llamacpp", false).unwrap_err();
        assert!(err.contains("--llamacpp-model"), "{err}");
        let mut s = settings();
        s.set("models-dir", "/srv/a:b").unwrap();
        let err = Spec::build(&s, "vllm", false).unwrap_err();
        assert!(err.contains("--models-dir: /srv/a:b contains ':'"), "{err}");
        assert!(Spec::build(&settings(), "tgi", false)
            .unwrap_err()
            .contains("'tgi'"));
    }

    #[test]
    fn the_hash_follows_every_input() {
        let s = settings();
        let base = Spec::build(&s, "llamacpp", false).unwrap().hash();
        assert_eq!(base, Spec::build(&s, "llamacpp", false).unwrap().hash());
        assert_eq!(base.len(), 64);
        for (k, v) in [
            ("service-image", "llamacpp=other:1"),
            ("service-args", "llamacpp=-c 512"),
            ("llamacpp-model", "other.gguf"),
            ("llamacpp-url", "http://127.0.0.1:1"),
            ("models-dir", "/elsewhere"),
            ("service-bind", "0.0.0.0"),
        ] {
            let mut s = settings();
            s.set(k, v).unwrap();
            assert_ne!(
                Spec::build(&s, "llamacpp", false).unwrap().hash(),
                base,
                "{k}"
            );
        }
    }

    #[test]
    fn assignments_in_both_shapes() {
        let mut s = Settings::default();
        s.set("service-image", "vllm=a/b:1,llamacpp=c:2").unwrap();
        s.set("service-image", "ollama=o:3").unwrap();
        assert_eq!(s.service_images.len(), 3);
        assert_eq!(s.service_images["vllm"], "a/b:1");
        s.set("service-image", r#"{"vllm":"x:9"}"#).unwrap();
        assert_eq!(s.service_images["vllm"], "x:9");
        assert_eq!(s.service_images["ollama"], "o:3");
        s.set("service-args", "vllm=--a x,y --b 'c d',llamacpp=-c 256")
            .unwrap();
        assert_eq!(s.service_args["vllm"], ["--a", "x,y", "--b", "c d"]);
        assert_eq!(s.service_args["llamacpp"], ["-c", "256"]);
        s.set("service-args", r#"{"ollama":["--x","y z"]}"#)
            .unwrap();
        assert_eq!(s.service_args["ollama"], ["--x", "y z"]);
        assert_eq!(
            split_args(r#"a "b \" c" \d ''"#).unwrap(),
            ["a", "b \" c", "d", ""]
        );
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let mut s = Settings::default();
        let cases = [
            ("service-image", "vllm", "not NAME=VALUE"),
            ("service-image", "tgi=x:1", "'tgi' is not a service"),
            ("service-image", "vllm=", "the image is empty"),
            (
                "service-image",
                "vllm=--privileged",
                "not an image reference",
            ),
            ("service-image", "vllm=a b", "not an image reference"),
            ("service-image", r#"{"vllm":["a"]}"#, "one string"),
            ("service-image", "{nope", "not a JSON object"),
            ("service-image", " ", "give NAME=VALUE"),
            ("service-args", "vllm=--a 'b", "unclosed '"),
            ("service-args", r#"{"vllm":5}"#, "not a string"),
            ("service-args", r#"{"vllm":[1]}"#, "not a string"),
            ("llamacpp-model", "/abs.gguf", "inside the models dir"),
            ("llamacpp-model", "../up.gguf", "inside the models dir"),
            ("service-bind", "localhost", "not an IP address"),
            ("service-ready-timeout", "0s", "longer than 0"),
            ("docker", "", "must not be empty"),
        ];
        for (k, v, want) in cases {
            let err = s.set(k, v).unwrap_err();
            assert!(err.contains(want), "{k}={v}: {err}");
        }
        assert!(url_port("http://[::1]:99999")
            .unwrap_err()
            .contains("99999"));
        assert_eq!(url_port("http://[::1]:8080/x").unwrap(), 8080);
        assert_eq!(url_port("https://h/v1").unwrap(), 443);
        assert_eq!(url_port("http://u:p@h:81").unwrap(), 81);
    }
}
