//! The node's device config (what an APPLY_DEVICE_CONFIG job set): device
//! name, custom tags, monitoring switches, sshEnabled and the services it
//! should run.
//!
//! Owns the config's type and its validation ([`parse_update`]: all of a
//! payload is checked before anything changes), its file
//! `{state_dir}/device-config.json` (written atomically, mode 0600, read at
//! start), and the live copy the running agent reads ([`LiveProfile`]: event
//! meta, the heartbeat, the reader's tag streams). It runs no service and no
//! command: `handlers::device_config` does, after [`LiveProfile::apply`].
//!
//! Absent fields (and `null`) keep their current value: a partial config
//! changes only what it names.

use crate::config::Settings;
use crate::events::NodeFacts;
use crate::job::json_kind;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The file, in the state directory.
pub const FILE: &str = "device-config.json";
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_TAGS: usize = 100;
pub const MAX_TAG_LEN: usize = 64;

/// The stream a tag's jobs are sent to.
/// On a Redis Cluster the tag is a hash tag, so the stream and its dead
/// letters share a slot (see `redis_cluster`).
pub fn tag_stream(tag: &str, cluster: bool) -> String {
    if cluster {
        format!("jobs:v1:tag:{{{tag}}}")
    } else {
        format!("jobs:v1:tag:{tag}")
    }
}

/// The node's device config. [`Default`] is a node no config job reached.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// `None`: none set; events and heartbeats name the node by its node name.
    pub device_name: Option<String>,
    pub services: Vec<String>,
    pub auto_start_services: bool,
    /// `None`: never set (ssh is left as the machine has it).
    pub ssh_enabled: Option<bool>,
    pub custom_tags: Vec<String>,
    /// False: no heartbeats.
    pub health_monitoring_enabled: bool,
    pub alert_on_offline: bool,
    pub alert_on_high_temp: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            device_name: None,
            services: Vec::new(),
            auto_start_services: false,
            ssh_enabled: None,
            custom_tags: Vec::new(),
            health_monitoring_enabled: true,
            alert_on_offline: false,
            alert_on_high_temp: false,
        }
    }
}

/// The fields a config names, each checked; `None`: absent (keep).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Update {
    pub device_name: Option<String>,
    pub services: Option<Vec<String>>,
    pub auto_start_services: Option<bool>,
    pub ssh_enabled: Option<bool>,
    pub custom_tags: Option<Vec<String>>,
    pub health_monitoring_enabled: Option<bool>,
    pub alert_on_offline: Option<bool>,
    pub alert_on_high_temp: Option<bool>,
    /// Fields this agent does not know, ignored (sorted).
    pub unknown: Vec<String>,
}

/// The payload's `config`: an object, or a JSON string holding one.
pub fn config_of(payload: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    match payload.get("config") {
        None | Some(Value::Null) => {
            Err("config: missing (the payload needs a config object)".into())
        }
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(other) => Err(format!(
                "config: the JSON string holds {}, not an object",
                json_kind(&other)
            )),
            Err(e) => Err(format!("config: a string that is not JSON ({e})")),
        },
        Some(other) => Err(format!(
            "config: must be an object or a JSON string of one, not {}",
            json_kind(other)
        )),
    }
}

/// Check every field of `config`; the error names each bad field
/// (`config.customTags[3]: …`), several joined with `; `.
pub fn parse_update(config: &Map<String, Value>) -> Result<Update, String> {
    let mut u = Update::default();
    let mut errors: Vec<String> = Vec::new();
    for (key, value) in config {
        if value.is_null() {
            if !FIELDS.contains(&key.as_str()) {
                u.unknown.push(key.clone());
            }
            continue;
        }
        let field = format!("config.{key}");
        let result = match key.as_str() {
            "deviceName" => device_name(value).map(|v| u.device_name = Some(v)),
            "services" => services(value, &field).map(|v| u.services = Some(v)),
            "customTags" => tags(value, &field).map(|v| u.custom_tags = Some(v)),
            "autoStartServices" => boolean(value).map(|v| u.auto_start_services = Some(v)),
            "sshEnabled" => boolean(value).map(|v| u.ssh_enabled = Some(v)),
            "healthMonitoringEnabled" => {
                boolean(value).map(|v| u.health_monitoring_enabled = Some(v))
            }
            "alertOnOffline" => boolean(value).map(|v| u.alert_on_offline = Some(v)),
            "alertOnHighTemp" => boolean(value).map(|v| u.alert_on_high_temp = Some(v)),
            _ => {
                u.unknown.push(key.clone());
                Ok(())
            }
        };
        if let Err(e) = result {
            // A list's own errors already name their element.
            errors.push(if e.starts_with(&field) {
                e
            } else {
                format!("{field}: {e}")
            });
        }
    }
    if errors.is_empty() {
        Ok(u)
    } else {
        Err(errors.join("; "))
    }
}

/// The fields of a device config, as payloads and the file spell them.
pub const FIELDS: &[&str] = &[
    "deviceName",
    "services",
    "autoStartServices",
    "sshEnabled",
    "customTags",
    "healthMonitoringEnabled",
    "alertOnOffline",
    "alertOnHighTemp",
];

fn boolean(v: &Value) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| {
        format!(
            "must be true or false (a JSON boolean), not {}",
            json_kind(v)
        )
    })
}

/// `[A-Za-z0-9._-]`, 1–64 characters.
fn device_name(v: &Value) -> Result<String, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("must be a string, not {}", json_kind(v)))?;
    if s.is_empty() || s.chars().count() > MAX_NAME_LEN {
        return Err(format!(
            "must be 1 to {MAX_NAME_LEN} characters long, not {}",
            s.chars().count()
        ));
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed (letters, digits, '.', '_' and '-' only)"
        )),
        None => Ok(s.to_owned()),
    }
}

/// An array of catalog names, repeats dropped.
fn services(v: &Value, field: &str) -> Result<Vec<String>, String> {
    let items = v
        .as_array()
        .ok_or_else(|| format!("must be an array of service names, not {}", json_kind(v)))?;
    let mut out: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let name = item
            .as_str()
            .ok_or_else(|| format!("{field}[{i}]: must be a string, not {}", json_kind(item)))?;
        if !crate::node::services::known(name) {
            return Err(format!(
                "{field}[{i}]: '{name}' is not a service this agent runs (known: {})",
                crate::node::services::CATALOG.join(", ")
            ));
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// At most 100 tags of 1–64 characters of `[A-Za-z0-9._:-]` (a tag is part
/// of the Redis key `jobs:v1:tag:{tag}`: no whitespace, control characters,
/// `{}` hash-tag braces or glob characters), repeats dropped.
fn tags(v: &Value, field: &str) -> Result<Vec<String>, String> {
    let items = v
        .as_array()
        .ok_or_else(|| format!("must be an array of strings, not {}", json_kind(v)))?;
    if items.len() > MAX_TAGS {
        return Err(format!(
            "{} tags, at most {MAX_TAGS} are allowed",
            items.len()
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let tag = item
            .as_str()
            .ok_or_else(|| format!("{field}[{i}]: must be a string, not {}", json_kind(item)))?;
        let len = tag.chars().count();
        if len == 0 || len > MAX_TAG_LEN {
            return Err(format!(
                "{field}[{i}]: must be 1 to {MAX_TAG_LEN} characters long, not {len}"
            ));
        }
        if let Some(c) = tag
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._:-".contains(*c)))
        {
            return Err(format!(
                "{field}[{i}]: {c:?} is not allowed in a tag (letters, digits, '.', '_', ':' and '-' only)"
            ));
        }
        if !out.iter().any(|t| t == tag) {
            out.push(tag.to_owned());
        }
    }
    Ok(out)
}

impl DeviceConfig {
    /// This config with what `u` names.
    pub fn with(&self, u: &Update) -> DeviceConfig {
        DeviceConfig {
            device_name: u.device_name.clone().or_else(|| self.device_name.clone()),
            services: u.services.clone().unwrap_or_else(|| self.services.clone()),
            auto_start_services: u.auto_start_services.unwrap_or(self.auto_start_services),
            ssh_enabled: u.ssh_enabled.or(self.ssh_enabled),
            custom_tags: u
                .custom_tags
                .clone()
                .unwrap_or_else(|| self.custom_tags.clone()),
            health_monitoring_enabled: u
                .health_monitoring_enabled
                .unwrap_or(self.health_monitoring_enabled),
            alert_on_offline: u.alert_on_offline.unwrap_or(self.alert_on_offline),
            alert_on_high_temp: u.alert_on_high_temp.unwrap_or(self.alert_on_high_temp),
        }
    }

    /// The file's form (every field, payload spelling).
    pub fn to_json(&self) -> Value {
        json!({
            "deviceName": self.device_name,
            "services": self.services,
            "autoStartServices": self.auto_start_services,
            "sshEnabled": self.ssh_enabled,
            "customTags": self.custom_tags,
            "healthMonitoringEnabled": self.health_monitoring_enabled,
            "alertOnOffline": self.alert_on_offline,
            "alertOnHighTemp": self.alert_on_high_temp,
        })
    }

    /// What differs from `old`, field by field: `{old, new}`; for the tags
    /// (up to 100) `{added, removed}` instead.
    pub fn changes_from(&self, old: &DeviceConfig) -> Map<String, Value> {
        let mut out = Map::new();
        let (a, b) = (old.to_json(), self.to_json());
        for field in FIELDS {
            if a[field] == b[field] {
                continue;
            }
            let change = if *field == "customTags" {
                let added: Vec<&String> = self
                    .custom_tags
                    .iter()
                    .filter(|t| !old.custom_tags.contains(t))
                    .collect();
                let removed: Vec<&String> = old
                    .custom_tags
                    .iter()
                    .filter(|t| !self.custom_tags.contains(t))
                    .collect();
                json!({"added": added, "removed": removed})
            } else {
                json!({"old": a[field], "new": b[field]})
            };
            out.insert((*field).to_owned(), change);
        }
        out
    }
}

/// The stored config at `path`: `Ok(None)` when there is none; `Err` (with
/// why) when it cannot be read or is not a valid config.
pub fn load_file(path: &Path) -> Result<Option<DeviceConfig>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let obj: Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| format!("not a JSON object: {e}"))?;
    let update = parse_update(&obj)?;
    Ok(Some(DeviceConfig::default().with(&update)))
}

/// Replace the file at `path` by `config`: a temporary file in the same
/// directory (mode 0600), fsync, rename, fsync of the directory. A crash
/// leaves the old config or the new one, never a mix.
pub fn store_file(path: &Path, config: &DeviceConfig) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    // Per process and write: two writers never share a temporary file.
    static N: AtomicU64 = AtomicU64::new(0);
    tmp.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // A file left by an earlier crash keeps its old mode: set it.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut text = serde_json::to_vec_pretty(&config.to_json())?;
        text.push(b'\n');
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// The services this node should run, as `citadel up` and `citadel
/// services` see them: those of the stored device config when it has
/// `autoStartServices` true, else the `services` setting.
pub fn wanted_services(settings: &Settings) -> Vec<String> {
    match load_file(&settings.state_dir.join(FILE)) {
        Ok(Some(c)) if c.auto_start_services => c.services,
        _ => settings.services.clone(),
    }
}

/// The device config as the running agent sees it now.
#[derive(Debug)]
pub struct Snapshot {
    pub config: DeviceConfig,
    /// `data.meta` of events: node id, device name (else node name), tags.
    pub facts: Arc<NodeFacts>,
    /// `jobs:v1:tag:{tag}` of each tag (none with `--tag-streams=false`).
    pub tag_streams: Vec<Arc<str>>,
}

/// What one [`LiveProfile::apply`] did.
#[derive(Debug)]
pub struct Applied {
    pub new: DeviceConfig,
    /// Field → `{old, new}` (tags: `{added, removed}`); empty: nothing changed.
    pub changes: Map<String, Value>,
}

/// The live, shared device config: read on every event (a lock-free-ish
/// read: an `RwLock` read and an `Arc` clone), replaced whole by a config
/// job. [`LiveProfile::generation`] changes with every replacement, so a
/// reader can tell cheaply that it must look again.
pub struct LiveProfile {
    node_id: String,
    path: PathBuf,
    tag_streams: bool,
    /// Tag streams named for a Redis Cluster.
    cluster: bool,
    current: RwLock<Arc<Snapshot>>,
    generation: AtomicU64,
    /// One apply at a time: diff, store and swap are one step.
    applying: Mutex<()>,
    /// Whether the file holds the live config (false after a corrupt file).
    stored: Mutex<bool>,
    /// One reconcile / ssh change at a time (held by the handler, not here).
    pub actions: Mutex<()>,
}

impl LiveProfile {
    /// The stored config of this node, or the default one. A file that
    /// cannot be read or is not a valid config is logged (naming it) and
    /// the agent runs with its settings.
    pub fn load(settings: &Settings) -> Arc<LiveProfile> {
        let path = settings.state_dir.join(FILE);
        let (config, stored) = match load_file(&path) {
            Ok(Some(c)) => {
                log::info!(
                    "device config: {} (device name {}, {} tag(s))",
                    path.display(),
                    c.device_name.as_deref().unwrap_or("not set"),
                    c.custom_tags.len()
                );
                (c, true)
            }
            Ok(None) => (DeviceConfig::default(), true),
            Err(e) => {
                log::warn!(
                    "device config {} is not usable ({e}); running with the settings until an \
                     APPLY_DEVICE_CONFIG job replaces it",
                    path.display()
                );
                (DeviceConfig::default(), false)
            }
        };
        Arc::new(LiveProfile::new(settings, path, config, stored))
    }

    /// A profile holding `config`, stored at `path` when changed.
    pub fn new(settings: &Settings, path: PathBuf, config: DeviceConfig, stored: bool) -> Self {
        let node_id = settings.node_name.clone();
        let cluster = settings.on_cluster();
        let snap = snapshot(&node_id, settings.tag_streams, cluster, config);
        LiveProfile {
            node_id,
            path,
            tag_streams: settings.tag_streams,
            cluster,
            current: RwLock::new(Arc::new(snap)),
            generation: AtomicU64::new(0),
            applying: Mutex::new(()),
            stored: Mutex::new(stored),
            actions: Mutex::new(()),
        }
    }

    /// The config now.
    pub fn now(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The event meta now.
    pub fn facts(&self) -> Arc<NodeFacts> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .facts
            .clone()
    }

    /// Changes with every replacement of the config.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Apply a checked update: store the new config (if it differs, or the
    /// file does not hold the live one), then make it live. Nothing changes
    /// when storing fails.
    pub fn apply(&self, update: &Update) -> Result<Applied, String> {
        let _one = crate::sync::lock(&self.applying);
        let old = self.now().config.clone();
        let new = old.with(update);
        let changes = new.changes_from(&old);
        let mut stored = crate::sync::lock(&self.stored);
        if !changes.is_empty() || !*stored {
            store_file(&self.path, &new)
                .map_err(|e| format!("cannot store {}: {e}", self.path.display()))?;
            *stored = true;
        }
        if !changes.is_empty() {
            let snap = Arc::new(snapshot(
                &self.node_id,
                self.tag_streams,
                self.cluster,
                new.clone(),
            ));
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = snap;
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Applied { new, changes })
    }
}

fn snapshot(node_id: &str, tag_streams: bool, cluster: bool, config: DeviceConfig) -> Snapshot {
    let name = config.device_name.as_deref().unwrap_or(node_id);
    let facts = Arc::new(NodeFacts::new(node_id, name, &config.custom_tags));
    let tag_streams = if tag_streams {
        config
            .custom_tags
            .iter()
            .map(|t| Arc::from(tag_stream(t, cluster)))
            .collect()
    } else {
        Vec::new()
    };
    Snapshot {
        config,
        facts,
        tag_streams,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(v: Value) -> Result<Update, String> {
        parse_update(v.as_object().unwrap())
    }

    #[test]
    fn a_whole_config_parses_and_unknown_fields_are_listed() {
        let u = update(json!({
            "deviceName": "rack-3.gpu_01", "services": ["vllm", "llamacpp", "vllm"],
            "autoStartServices": true, "sshEnabled": false, "customTags": ["a100", "eu:west"],
            "healthMonitoringEnabled": false, "alertOnOffline": true, "alertOnHighTemp": true,
            "wizardStep": 4, "colour": null
        }))
        .unwrap();
        assert_eq!(u.device_name.as_deref(), Some("rack-3.gpu_01"));
        assert_eq!(u.services.as_deref().unwrap(), ["vllm", "llamacpp"]);
        assert_eq!(u.custom_tags.as_deref().unwrap(), ["a100", "eu:west"]);
        assert_eq!(u.unknown, ["colour", "wizardStep"]);
        let c = DeviceConfig::default().with(&u);
        assert!(!c.health_monitoring_enabled && c.alert_on_high_temp && c.auto_start_services);
        assert_eq!(c.ssh_enabled, Some(false));
    }

    #[test]
    fn absent_and_null_fields_keep_the_current_value() {
        let base = DeviceConfig::default().with(
            &update(json!({"deviceName": "a", "customTags": ["t1"], "alertOnOffline": true}))
                .unwrap(),
        );
        let next = base.with(&update(json!({"customTags": ["t2"], "deviceName": null})).unwrap());
        assert_eq!(next.device_name.as_deref(), Some("a"));
        assert!(next.alert_on_offline);
        assert_eq!(next.custom_tags, ["t2"]);
        let changes = next.changes_from(&base);
        assert_eq!(
            Value::Object(changes),
            json!({"customTags": {"added": ["t2"], "removed": ["t1"]}})
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let long = "x".repeat(65);
        let cases = [
            (
                json!({"deviceName": ""}),
                "config.deviceName: must be 1 to 64",
            ),
            (
                json!({"deviceName": long}),
                "config.deviceName: must be 1 to 64",
            ),
            (
                json!({"deviceName": "a b"}),
                "config.deviceName: ' ' is not allowed",
            ),
            (
                json!({"deviceName": "../x"}),
                "config.deviceName: '/' is not allowed",
            ),
            (
                json!({"deviceName": 7}),
                "config.deviceName: must be a string",
            ),
            (
                json!({"services": ["vllm", "tgi"]}),
                "config.services[1]: 'tgi' is not",
            ),
            (
                json!({"services": "vllm"}),
                "config.services: must be an array",
            ),
            (
                json!({"autoStartServices": "yes"}),
                "config.autoStartServices: must be true or false",
            ),
            (
                json!({"sshEnabled": "true"}),
                "config.sshEnabled: must be true or false",
            ),
            (
                json!({"customTags": "t1"}),
                "config.customTags: must be an array",
            ),
            (
                json!({"customTags": ["a", "b", "c", 4]}),
                "config.customTags[3]: must be a string",
            ),
            (
                json!({"customTags": [long]}),
                "config.customTags[0]: must be 1 to 64",
            ),
            (
                json!({"customTags": ["a b"]}),
                "config.customTags[0]: ' ' is not allowed",
            ),
            (
                json!({"customTags": ["{x}"]}),
                "config.customTags[0]: '{' is not allowed",
            ),
            (
                json!({"customTags": ["a\n"]}),
                "config.customTags[0]: '\\n' is not allowed",
            ),
            (
                json!({"customTags": [""]}),
                "config.customTags[0]: must be 1 to 64",
            ),
        ];
        for (config, want) in cases {
            let err = update(config.clone()).unwrap_err();
            assert!(err.contains(want), "{config}: {err}");
        }
        let many: Vec<String> = (0..10_000).map(|i| format!("t{i}")).collect();
        let err = update(json!({ "customTags": many })).unwrap_err();
        assert!(
            err.contains("config.customTags: 10000 tags, at most 100"),
            "{err}"
        );
        let hundred: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        assert_eq!(
            update(json!({ "customTags": hundred }))
                .unwrap()
                .custom_tags
                .unwrap()
                .len(),
            100
        );
        let err = update(json!({"deviceName": "", "alertOnOffline": 1})).unwrap_err();
        assert!(
            err.contains("config.alertOnOffline") && err.contains("config.deviceName"),
            "{err}"
        );
    }

    #[test]
    fn config_is_an_object_or_a_json_string_of_one() {
        let of = |p: Value| config_of(p.as_object().unwrap());
        assert_eq!(of(json!({"config": {"a": 1}})).unwrap()["a"], 1);
        assert_eq!(of(json!({"config": "{\"a\": 1}"})).unwrap()["a"], 1);
        for (p, want) in [
            (json!({}), "config: missing"),
            (
                json!({"config": "{nope"}),
                "config: a string that is not JSON",
            ),
            (
                json!({"config": "[1]"}),
                "config: the JSON string holds an array",
            ),
            (
                json!({"config": 3}),
                "config: must be an object or a JSON string of one, not a number",
            ),
        ] {
            let err = of(p.clone()).unwrap_err();
            assert!(err.contains(want), "{p}: {err}");
        }
    }

    #[test]
    fn the_file_is_written_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("citadel-profile-{}", std::process::id()));
        let path = dir.join("sub").join(FILE);
        let c = DeviceConfig {
            device_name: Some("n1".into()),
            custom_tags: vec!["t".into()],
            ssh_enabled: Some(true),
            ..DeviceConfig::default()
        };
        store_file(&path, &c).unwrap();
        store_file(&path, &c).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_file(&path).unwrap(), Some(c));
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left");
        std::fs::write(&path, "{not json").unwrap();
        assert!(load_file(&path).unwrap_err().contains("not a JSON object"));
        std::fs::write(&path, r#"{"deviceName": "a b"}"#).unwrap();
        assert!(load_file(&path).unwrap_err().contains("config.deviceName"));
        assert_eq!(load_file(&dir.join("none")).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_live_copy_changes_at_once_and_only_on_a_change() {
        let dir = std::env::temp_dir().join(format!("citadel-live-{}", std::process::id()));
        let mut s = Settings::default();
        s.set("node-name", "node-7").unwrap();
        s.set("state-dir", dir.to_str().unwrap()).unwrap();
        let live = LiveProfile::new(&s, dir.join(FILE), DeviceConfig::default(), true);
        assert_eq!(live.facts().node_name, "node-7");
        let g = live.generation();
        let u = update(json!({"deviceName": "dev", "customTags": ["t1"]})).unwrap();
        let applied = live.apply(&u).unwrap();
        assert_eq!(applied.changes.len(), 2);
        let facts = live.facts();
        assert_eq!(
            (facts.node_id.as_str(), facts.node_name.as_str()),
            ("node-7", "dev")
        );
        assert_eq!(&*live.now().tag_streams[0], "jobs:v1:tag:t1");
        assert_ne!(live.generation(), g);
        let g = live.generation();
        assert!(live.apply(&u).unwrap().changes.is_empty());
        assert_eq!(
            live.generation(),
            g,
            "the same config again changes nothing"
        );
        assert_eq!(wanted_services(&s), Vec::<String>::new());
        let u = update(json!({"services": ["ollama"], "autoStartServices": true})).unwrap();
        live.apply(&u).unwrap();
        assert_eq!(wanted_services(&s), ["ollama"]);
        s.set("tag-streams", "false").unwrap();
        let off = LiveProfile::load(&s);
        assert_eq!(off.facts().tags, ["t1"]);
        assert!(off.now().tag_streams.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
