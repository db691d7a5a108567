//! Settings: defaults < config file < `CITADEL_*` environment < flags.
//!
//! Every setting has one name (`claim-idle`), used as the flag (`--claim-idle`),
//! the environment variable (`CITADEL_CLAIM_IDLE`) and the config-file key
//! (`claim_idle` or `claim-idle`). [`Settings::set`] is the one place that
//! parses a value, whichever layer it came from.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// (name, help) of every setting, in the order `--help` shows them.
pub const SETTINGS: &[(&str, &str)] = &[
    (
        "redis-url",
        "Redis URL (redis://, rediss://, redis+sentinel://SENTINEL,…/MASTER-NAME, or redis+cluster://NODE,NODE,…) [redis://127.0.0.1:6379]",
    ),
    (
        "queue",
        "job stream to read; repeat, or comma-separate, for several [jobs:v1:gpu-general]",
    ),
    ("group", "consumer group [workers]"),
    ("consumer", "consumer name, stable per node [the node name]"),
    (
        "node-name",
        "this node's name: the consumer default and jobs:v1:node:{name} [hostname]",
    ),
    ("concurrency", "handler threads = jobs run at once [4]"),
    (
        "claim-idle",
        "an entry idle this long belongs to a dead worker and is reclaimed [30s]",
    ),
    (
        "max-deliveries",
        "an entry delivered more often than this is dead-lettered [5]",
    ),
    (
        "max-retries",
        "in-process retries of a retryable error before the job fails [3]",
    ),
    (
        "retry-base",
        "first retry backoff ceiling, doubling per retry [500ms]",
    ),
    ("retry-cap", "largest retry backoff [30s]"),
    (
        "shutdown-grace",
        "on SIGTERM/SIGINT, how long in-flight jobs may take to finish [25s]",
    ),
    ("block", "longest single XREADGROUP BLOCK [5s]"),
    (
        "cancel-poll",
        "how often running jobs' cancel keys are checked (at most 1s) [500ms]",
    ),
    ("status-ttl", "lifetime of job:{id}:status hashes [24h]"),
    (
        "dlq-maxlen",
        "approximate cap of each dead-letter stream [10000]",
    ),
    (
        "max-job-size",
        "largest stream entry accepted, in bytes [1048576]",
    ),
    (
        "allow-shell",
        "run shell_command jobs on this node (a bare --allow-shell means true) [false]",
    ),
    (
        "workspace-dir",
        "working directory of shell_command jobs, created 0700 [{state-dir}/workspace]",
    ),
    (
        "shell-timeout",
        "deadline of a shell_command job that gives no timeout_ms [10m]",
    ),
    (
        "shell-kill-grace",
        "a stopped shell command's process group gets SIGKILL this long after SIGTERM [5s]",
    ),
    (
        "shell-output-cap",
        "most bytes of shell output kept in the job's result, in bytes [1048576]",
    ),
    ("redis-timeout", "Redis connect and command timeout [5s]"),
    (
        "vllm-url",
        "base URL of the vLLM engine (llm_inference) [http://127.0.0.1:8000]",
    ),
    (
        "ollama-url",
        "base URL of the Ollama engine (llm_inference) [http://127.0.0.1:11434]",
    ),
    (
        "llamacpp-url",
        "base URL of the llama.cpp server (llm_inference) [http://127.0.0.1:8080]",
    ),
    (
        "extraction-url",
        "base URL of the node's extraction service (extraction) [http://127.0.0.1:8202]",
    ),
    (
        "extraction-ready-timeout",
        "longest wait for the extraction service's GET /health to answer 2xx [60s]",
    ),
    (
        "extraction-timeout",
        "longest wait for the extraction service's answer to POST /extract [2m]",
    ),
    (
        "extraction-max-bytes",
        "largest extraction request (text and schema as JSON), in bytes [1048576]",
    ),
    (
        "engine-connect-timeout",
        "longest wait for an engine to accept a connection [5s]",
    ),
    (
        "engine-first-token-timeout",
        "longest wait from request to first token (stream:false: to the whole answer) [2m]",
    ),
    (
        "engine-idle-timeout",
        "longest silence between two tokens of a stream [30s]",
    ),
    // model_download
    ("models-dir", "where model_download puts model files [{state-dir}/models]"),
    ("hf-url", "Hugging Face base URL for model_download repo files [https://huggingface.co]"),
    ("hf-token", "bearer token for gated Hugging Face repos, sent to the hf-url host only [none]"),
    ("download-connect-timeout", "longest wait for a download server to accept a connection [10s]"),
    ("download-idle-timeout", "longest silence of a download server before the download counts as broken [60s]"),
    (
        "download-max-resumes",
        "resumes (Range requests) within one attempt after a download broke off mid-file [5]",
    ),
    ("mode", "where jobs come from: redis, nexus or auto (citadel agent) [redis]"),
    ("nexus-url", "Nexus control plane base URL (Nexus polling) [none]"),
    ("nexus-token", "bearer token sent to Nexus [none]"),
    ("poll-interval", "how often Nexus is asked for a job while idle (jittered) [5s]"),
    ("nexus-timeout", "longest single request to Nexus [10s]"),
    ("nexus-retry-cap", "largest backoff between failed Nexus requests [60s]"),
    (
        "nexus-gone-after-attempts",
        "a report Nexus answers 404 this many times in a row (over --nexus-gone-after) is given up, kept in {state-dir}/nexus-rejected [5]",
    ),
    (
        "nexus-gone-after",
        "a report is given up on 404s only when they span at least this long [5m]",
    ),
    (
        "nexus-report-max-output",
        "on HTTP 413 a report's output is cut to this many bytes (marked) and sent again; at least 1024 [262144]",
    ),
    (
        "nexus-spool-max",
        "most undelivered reports kept; when reached, no Nexus job is taken until Nexus accepts some [1000]",
    ),
    ("state-dir", "where the report spool and the agent status live [/var/lib/citadel as root, else ~/.local/state/citadel]"),
    ("redis-fallback", "auto mode: Redis unreachable this long → poll Nexus instead [30s]"),
    ("redis-probe", "auto mode: how often Redis is probed while polling Nexus [30s]"),
    // node heartbeat
    (
        "heartbeat-interval",
        "how often the node heartbeat goes to node:status:stream and node:status:{name}; 0 turns it off [30s]",
    ),
    (
        "gpu-query-timeout",
        "longest wait for nvidia-smi to report the GPUs; a slower one is killed [5s]",
    ),
    // node services (Docker)
    (
        "services",
        "services 'citadel up' starts when no APPLY_DEVICE_CONFIG set them: comma-separated, of vllm, ollama, llamacpp, extraction [none]",
    ),
    ("docker", "path of the docker CLI; DOCKER_HOST in the environment picks the daemon [docker from PATH]"),
    (
        "service-image",
        "NAME=IMAGE: the image of a node service; repeat (or comma-separate) for several; config key service_images, an object [the engines' official images]",
    ),
    (
        "service-args",
        "NAME=ARGS: extra arguments of a service's engine (split on spaces, quotes group); repeat for several; config key service_args, an object [none]",
    ),
    (
        "llamacpp-model",
        "the GGUF file in the models dir that the llamacpp service serves (needed by that service) [none]",
    ),
    (
        "service-bind",
        "address the service containers' engines listen on (0.0.0.0: every interface) [127.0.0.1]",
    ),
    (
        "service-ready-timeout",
        "longest wait for a started service's engine to answer its health URL [5m]",
    ),
    // device config
    (
        "tag-streams",
        "also read jobs:v1:tag:{tag} for each custom tag of the device config (APPLY_DEVICE_CONFIG) [true]",
    ),
    (
        "allow-ssh-control",
        "let APPLY_DEVICE_CONFIG's sshEnabled start/stop the ssh service through systemctl [false]",
    ),
    ("ssh-unit", "the systemd unit sshEnabled starts and stops [ssh]"),
    // provisioning
    (
        "auth-url",
        "device-authorization server base URL for 'citadel init' (POST {auth-url}/api/fabric/device-auth/…) [none]",
    ),
    (
        "init-timeout",
        "longest 'citadel init' waits for its code to be approved [10m]",
    ),
    (
        "device-api-token",
        "this node's credential, stored by 'citadel init'; the Nexus bearer token when --nexus-token is not set [none]",
    ),
    // observability
    (
        "metrics-addr",
        "address of the /metrics, /healthz and /readyz listener; empty turns it off; a port in use stops the start (exit 2) [127.0.0.1:9464]",
    ),
    (
        "gpu-high-temp",
        "a GPU at or above this many °C adds a heartbeat alert when the device config's alertOnHighTemp is on [85]",
    ),
    (
        "gpu-telemetry",
        "where heartbeat GPU figures come from: auto (NVML when built in and the driver library loads, else nvidia-smi) or nvidia-smi [auto]",
    ),
    // events stream
    (
        "events-stream",
        "also append every job event to the replayable stream events:v1:{jobId}; false = Pub/Sub only [true]",
    ),
    (
        "events-maxlen",
        "approximate cap (MAXLEN ~) of each events:v1:{jobId} stream [10000]",
    ),
    (
        "events-ttl",
        "how long an events:v1:{jobId} stream is kept after the job's terminal event [1h]",
    ),
    // Redis Sentinel
    (
        "sentinel-username",
        "ACL user for the sentinels of a redis+sentinel:// URL (the URL's user is the data nodes') [none]",
    ),
    (
        "sentinel-password",
        "password for the sentinels of a redis+sentinel:// URL (the URL's password is the data nodes') [none]",
    ),
    (
        "sentinel-tls",
        "TLS to the sentinels: auto (as the URL: rediss+sentinel:// means TLS), true or false [auto]",
    ),
    // gateway
    (
        "gateway-listen",
        "address 'citadel gateway' serves the OpenAI API on (flag alias --listen) [127.0.0.1:8088]",
    ),
    (
        "gateway-routes",
        "MODEL=BACKEND[@QUEUE]: the engine kind and queue of a model; repeat (--route) or comma-separate; config key routes, an object; with any, an unrouted model is a 404 [none]",
    ),
    (
        "default-backend",
        "engine kind of every model when no route is configured: vllm, ollama or llamacpp (sent on the first --queue) [vllm]",
    ),
    (
        "gateway-api-keys",
        "API keys the gateway accepts as 'Authorization: Bearer KEY'; repeat (--api-key) or comma-separate [none]",
    ),
    (
        "insecure-no-auth",
        "let the gateway listen on a non-loopback address without API keys [false]",
    ),
    (
        "gateway-claim-timeout",
        "a gateway job no worker claimed within this long is withdrawn and answered 503 with Retry-After [10s]",
    ),
    (
        "gateway-job-timeout",
        "deadline of a gateway job (its timeout_ms); past it the answer is 504 [10m]",
    ),
    (
        "gateway-keepalive",
        "how often a streaming answer sends an SSE comment while no token comes [10s]",
    ),
    (
        "gateway-client-timeout",
        "a client must send a whole request within this long, and an idle keep-alive connection is closed after it [10s]",
    ),
    (
        "gateway-max-body",
        "largest request body the gateway reads, in bytes; larger gets 413 [4194304]",
    ),
    (
        "gateway-max-connections",
        "connections the gateway serves at once (one thread each); more are answered 503 [256]",
    ),
    // leftovers
    (
        "service-tool-timeout",
        "longest run of each tool `citadel service` starts (systemctl, getent, useradd, …); then it is killed [60s]",
    ),
    // performance
    (
        "coalesce-chunks",
        "merge the chunk events of one job that wait to be sent together into one chunk event (content joined, one index) [false]",
    ),
    (
        "chunk-hold",
        "with coalesce-chunks: how long a batch of only chunk events may wait for more tokens of its streams, at most 100ms [0s]",
    ),
];

/// Where jobs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redis,
    Nexus,
    Auto,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub redis_url: String,
    pub queues: Vec<String>,
    pub group: String,
    pub consumer: Option<String>,
    pub node_name: String,
    pub concurrency: usize,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
    pub max_retries: u32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub shutdown_grace: Duration,
    pub block: Duration,
    pub cancel_poll: Duration,
    pub status_ttl: Duration,
    pub dlq_maxlen: u64,
    pub max_job_size: usize,
    pub allow_shell: bool,
    /// `None`: `{state_dir}/workspace` (see [`Settings::workspace_dir`]).
    pub workspace_dir: Option<PathBuf>,
    pub shell_timeout: Duration,
    pub shell_kill_grace: Duration,
    pub shell_output_cap: usize,
    pub redis_timeout: Duration,
    pub vllm_url: String,
    pub ollama_url: String,
    pub llamacpp_url: String,
    pub extraction_url: String,
    pub extraction_ready_timeout: Duration,
    pub extraction_timeout: Duration,
    pub extraction_max_bytes: usize,
    pub engine_connect_timeout: Duration,
    pub engine_first_token_timeout: Duration,
    pub engine_idle_timeout: Duration,
    // model_download
    /// `None`: `{state_dir}/models` (see [`Settings::models_dir`]).
    pub models_dir: Option<PathBuf>,
    pub hf_url: String,
    pub hf_token: Option<Secret>,
    pub download_connect_timeout: Duration,
    pub download_idle_timeout: Duration,
    pub download_max_resumes: u32,
    pub mode: Mode,
    /// Whether a Redis URL was given (file, environment, flag), not defaulted.
    pub redis_url_set: bool,
    pub nexus_url: Option<String>,
    pub nexus_token: Option<String>,
    pub poll_interval: Duration,
    pub nexus_timeout: Duration,
    pub nexus_retry_cap: Duration,
    pub nexus_gone_after_attempts: u32,
    pub nexus_gone_after: Duration,
    pub nexus_report_max_output: usize,
    pub nexus_spool_max: usize,
    pub state_dir: std::path::PathBuf,
    pub redis_fallback: Duration,
    pub redis_probe: Duration,
    // node heartbeat
    /// Zero: no heartbeat.
    pub heartbeat_interval: Duration,
    pub gpu_query_timeout: Duration,
    // node services (Docker)
    /// Names from [`crate::node::services::CATALOG`].
    pub services: Vec<String>,
    /// The docker CLI (`docker`: found on PATH).
    pub docker: PathBuf,
    /// Service name → image, over the catalog's defaults.
    pub service_images: std::collections::BTreeMap<String, String>,
    /// Service name → extra engine arguments.
    pub service_args: std::collections::BTreeMap<String, Vec<String>>,
    pub llamacpp_model: Option<String>,
    pub service_bind: std::net::IpAddr,
    pub service_ready_timeout: Duration,
    // device config
    /// Read `jobs:v1:tag:{tag}` for each custom tag.
    pub tag_streams: bool,
    /// sshEnabled may run `systemctl start|stop {ssh_unit}`.
    pub allow_ssh_control: bool,
    pub ssh_unit: String,
    // provisioning
    pub auth_url: Option<String>,
    pub init_timeout: Duration,
    pub device_api_token: Option<Secret>,
    /// The config file these settings were read from, or would have been
    /// had it existed (`citadel init` writes its credentials there).
    pub config_file: PathBuf,
    // observability
    /// Empty: no listener.
    pub metrics_addr: String,
    /// Whether `metrics-addr` was given (file, environment, flag), not defaulted.
    pub metrics_addr_set: bool,
    pub gpu_high_temp: f64,
    /// `auto` or `nvidia-smi`.
    pub gpu_telemetry: String,
    // events stream
    pub events_stream: bool,
    pub events_maxlen: u64,
    pub events_ttl: Duration,
    // Redis Sentinel
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<Secret>,
    /// `None`: like the data nodes (the URL's scheme).
    pub sentinel_tls: Option<bool>,
    // gateway
    pub gateway_listen: String,
    /// Model → where its jobs go, in the order given.
    pub gateway_routes: Vec<GatewayRoute>,
    pub default_backend: String,
    pub gateway_api_keys: Vec<Secret>,
    pub insecure_no_auth: bool,
    pub gateway_claim_timeout: Duration,
    pub gateway_job_timeout: Duration,
    pub gateway_keepalive: Duration,
    pub gateway_client_timeout: Duration,
    pub gateway_max_body: usize,
    pub gateway_max_connections: usize,
    // leftovers
    /// Limit of each outside tool `citadel service` runs.
    pub service_tool_timeout: Duration,
    // performance
    pub coalesce_chunks: bool,
    pub chunk_hold: Duration,
}

/// `MODEL=BACKEND[@QUEUE]`: a model the gateway serves, the engine kind its
/// jobs name and the queue they go to (`None`: the first `--queue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRoute {
    pub model: String,
    pub backend: String,
    pub queue: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            redis_url: "redis://127.0.0.1:6379".into(),
            queues: vec!["jobs:v1:gpu-general".into()],
            group: "workers".into(),
            consumer: None,
            node_name: hostname(),
            concurrency: 4,
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            max_retries: 3,
            retry_base: Duration::from_millis(500),
            retry_cap: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(25),
            block: Duration::from_secs(5),
            cancel_poll: Duration::from_millis(500),
            status_ttl: Duration::from_secs(24 * 3600),
            dlq_maxlen: 10_000,
            max_job_size: 1 << 20,
            allow_shell: false,
            workspace_dir: None,
            shell_timeout: Duration::from_secs(600),
            shell_kill_grace: Duration::from_secs(5),
            shell_output_cap: 1 << 20,
            redis_timeout: Duration::from_secs(5),
            vllm_url: "http://127.0.0.1:8000".into(),
            ollama_url: "http://127.0.0.1:11434".into(),
            llamacpp_url: "http://127.0.0.1:8080".into(),
            extraction_url: "http://127.0.0.1:8202".into(),
            extraction_ready_timeout: Duration::from_secs(60),
            extraction_timeout: Duration::from_secs(120),
            extraction_max_bytes: 1 << 20,
            engine_connect_timeout: Duration::from_secs(5),
            engine_first_token_timeout: Duration::from_secs(120),
            engine_idle_timeout: Duration::from_secs(30),
            models_dir: None,
            hf_url: "https://huggingface.co".into(),
            hf_token: None,
            download_connect_timeout: Duration::from_secs(10),
            download_idle_timeout: Duration::from_secs(60),
            download_max_resumes: 5,
            mode: Mode::Redis,
            redis_url_set: false,
            nexus_url: None,
            nexus_token: None,
            poll_interval: Duration::from_secs(5),
            nexus_timeout: Duration::from_secs(10),
            nexus_retry_cap: Duration::from_secs(60),
            nexus_gone_after_attempts: 5,
            nexus_gone_after: Duration::from_secs(300),
            nexus_report_max_output: 256 << 10,
            nexus_spool_max: 1000,
            state_dir: default_state_dir(),
            redis_fallback: Duration::from_secs(30),
            redis_probe: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(30),
            gpu_query_timeout: Duration::from_secs(5),
            services: Vec::new(),
            docker: "docker".into(),
            service_images: Default::default(),
            service_args: Default::default(),
            llamacpp_model: None,
            service_bind: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            service_ready_timeout: Duration::from_secs(300),
            // device config
            tag_streams: true,
            allow_ssh_control: false,
            ssh_unit: "ssh".into(),
            // provisioning
            auth_url: None,
            init_timeout: Duration::from_secs(600),
            device_api_token: None,
            config_file: default_config_file(),
            // observability
            metrics_addr: "127.0.0.1:9464".into(),
            metrics_addr_set: false,
            gpu_high_temp: 85.0,
            gpu_telemetry: "auto".into(),
            // events stream
            events_stream: true,
            events_maxlen: 10_000,
            events_ttl: Duration::from_secs(3600),
            // Redis Sentinel
            sentinel_username: None,
            sentinel_password: None,
            sentinel_tls: None,
            // gateway
            gateway_listen: "127.0.0.1:8088".into(),
            gateway_routes: Vec::new(),
            default_backend: "vllm".into(),
            gateway_api_keys: Vec::new(),
            insecure_no_auth: false,
            gateway_claim_timeout: Duration::from_secs(10),
            gateway_job_timeout: Duration::from_secs(600),
            gateway_keepalive: Duration::from_secs(10),
            gateway_client_timeout: Duration::from_secs(10),
            gateway_max_body: 4 << 20,
            gateway_max_connections: 256,
            // leftovers
            service_tool_timeout: Duration::from_secs(60),
            // performance
            coalesce_chunks: false,
            chunk_hold: Duration::ZERO,
        }
    }
}

impl Settings {
    /// Defaults, then the config file, then `CITADEL_*` variables. Flags are
    /// applied by the caller with [`Settings::set`] afterwards.
    /// With `missing_ok`, a file named by the flag or the variable that does
    /// not exist yet is no settings (`citadel init` creates it).
    pub fn load_with(config_flag: Option<&Path>, missing_ok: bool) -> Result<Settings, String> {
        let mut s = Settings::default();
        let (path, must_exist) = match config_flag {
            Some(p) => (p.to_path_buf(), !missing_ok),
            None => match std::env::var_os("CITADEL_CONFIG") {
                Some(p) if !p.is_empty() => (PathBuf::from(p), !missing_ok),
                _ => (default_config_file(), false),
            },
        };
        s.config_file = path.clone();
        match std::fs::read_to_string(&path) {
            Ok(text) => s
                .apply_file(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if must_exist || e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot read config file {}: {e}", path.display()))
            }
            Err(_) => {}
        }
        for (name, _) in SETTINGS {
            let var = env_name(name);
            if let Ok(v) = std::env::var(&var) {
                s.set(name, &v).map_err(|e| format!("{var}: {e}"))?;
            }
        }
        Ok(s)
    }

    /// A config file is one JSON object of settings. Keys this agent does not
    /// know (credentials stored by provisioning, say) are left for others.
    fn apply_file(&mut self, text: &str) -> Result<(), String> {
        if text.trim().is_empty() {
            return Ok(());
        }
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
        for (key, value) in obj {
            let name = key.replace('_', "-");
            // The flag is singular (one NAME=IMAGE each), the file's object plural.
            let name = match name.as_str() {
                "service-images" => "service-image".to_owned(),
                // gateway: the issue's config key for --route.
                "routes" => "gateway-routes".to_owned(),
                _ => name,
            };
            if !SETTINGS.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let text = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            self.set(&name, &text).map_err(|e| format!("{key}: {e}"))?;
        }
        Ok(())
    }

    /// Set one setting from its text form; the error says what is accepted.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let v = value.trim();
        match name {
            "redis-url" => {
                check_redis_url(v)?;
                self.redis_url = v.to_owned();
                self.redis_url_set = true;
            }
            "queue" => {
                let queues: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|q| !q.is_empty())
                    .map(str::to_owned)
                    .collect();
                if queues.is_empty() {
                    return Err("at least one queue is needed".into());
                }
                self.queues = queues;
            }
            "group" => self.group = non_empty(v)?,
            "consumer" => self.consumer = Some(non_empty(v)?),
            "node-name" => self.node_name = non_empty(v)?,
            "concurrency" => {
                self.concurrency = number(v)?;
                if self.concurrency == 0 || self.concurrency > 4096 {
                    return Err(format!("'{v}' is not between 1 and 4096"));
                }
            }
            "claim-idle" => self.claim_idle = positive(parse_duration(v)?)?,
            "max-deliveries" => {
                self.max_deliveries = number(v)?;
                if self.max_deliveries == 0 {
                    return Err("must be at least 1 (0 would dead-letter every job unrun)".into());
                }
            }
            "max-retries" => self.max_retries = number(v)?,
            "retry-base" => self.retry_base = parse_duration(v)?,
            "retry-cap" => self.retry_cap = parse_duration(v)?,
            "shutdown-grace" => self.shutdown_grace = parse_duration(v)?,
            "block" => self.block = positive(parse_duration(v)?)?,
            "cancel-poll" => {
                self.cancel_poll = positive(parse_duration(v)?)?.min(Duration::from_secs(1))
            }
            "status-ttl" => {
                self.status_ttl = positive(parse_duration(v)?)?.max(Duration::from_secs(1))
            }
            "dlq-maxlen" => self.dlq_maxlen = number(v)?,
            "max-job-size" => {
                self.max_job_size = number(v)?;
                if self.max_job_size < 64 {
                    return Err(format!(
                        "'{v}' bytes is too small for any job entry (at least 64)"
                    ));
                }
            }
            "allow-shell" => self.allow_shell = boolean(v)?,
            "workspace-dir" => self.workspace_dir = Some(non_empty(v)?.into()),
            "shell-timeout" => self.shell_timeout = positive(parse_duration(v)?)?,
            "shell-kill-grace" => self.shell_kill_grace = parse_duration(v)?,
            "shell-output-cap" => self.shell_output_cap = number(v)?,
            "redis-timeout" => self.redis_timeout = positive(parse_duration(v)?)?,
            "vllm-url" => self.vllm_url = http_url(v)?,
            "ollama-url" => self.ollama_url = http_url(v)?,
            "llamacpp-url" => self.llamacpp_url = http_url(v)?,
            "extraction-url" => self.extraction_url = http_url(v)?,
            "extraction-ready-timeout" => {
                self.extraction_ready_timeout = positive(parse_duration(v)?)?
            }
            "extraction-timeout" => self.extraction_timeout = positive(parse_duration(v)?)?,
            "extraction-max-bytes" => {
                self.extraction_max_bytes = number(v)?;
                if self.extraction_max_bytes == 0 {
                    return Err("must be at least 1 (0 would refuse every extraction)".into());
                }
            }
            "engine-connect-timeout" => self.engine_connect_timeout = positive(parse_duration(v)?)?,
            "engine-first-token-timeout" => {
                self.engine_first_token_timeout = positive(parse_duration(v)?)?
            }
            "engine-idle-timeout" => self.engine_idle_timeout = positive(parse_duration(v)?)?,
            "models-dir" => self.models_dir = Some(non_empty(v)?.into()),
            "hf-url" => self.hf_url = http_url(v)?,
            "hf-token" => self.hf_token = Some(Secret(non_empty(v)?)),
            "download-connect-timeout" => {
                self.download_connect_timeout = positive(parse_duration(v)?)?
            }
            "download-idle-timeout" => self.download_idle_timeout = positive(parse_duration(v)?)?,
            "download-max-resumes" => self.download_max_resumes = number(v)?,
            "mode" => {
                self.mode = match v {
                    "redis" => Mode::Redis,
                    "nexus" => Mode::Nexus,
                    "auto" => Mode::Auto,
                    _ => return Err(format!("'{v}' is not a mode (redis, nexus or auto)")),
                }
            }
            "nexus-url" => self.nexus_url = Some(http_url(v)?),
            "nexus-token" => self.nexus_token = Some(non_empty(v)?),
            "poll-interval" => self.poll_interval = positive(parse_duration(v)?)?,
            "nexus-timeout" => self.nexus_timeout = positive(parse_duration(v)?)?,
            "nexus-retry-cap" => self.nexus_retry_cap = positive(parse_duration(v)?)?,
            "nexus-gone-after-attempts" => {
                self.nexus_gone_after_attempts = number::<u32>(v)?.max(1)
            }
            "nexus-gone-after" => self.nexus_gone_after = parse_duration(v)?,
            "nexus-report-max-output" => {
                self.nexus_report_max_output = number::<usize>(v)?.max(1024)
            }
            "nexus-spool-max" => {
                self.nexus_spool_max = number(v)?;
                if self.nexus_spool_max == 0 {
                    return Err("must be at least 1".into());
                }
            }
            "state-dir" => self.state_dir = non_empty(v)?.into(),
            "redis-fallback" => self.redis_fallback = positive(parse_duration(v)?)?,
            "redis-probe" => self.redis_probe = positive(parse_duration(v)?)?,
            "heartbeat-interval" => self.heartbeat_interval = parse_duration(v)?,
            "gpu-query-timeout" => self.gpu_query_timeout = positive(parse_duration(v)?)?,
            "services" => self.services = crate::node::services::parse_list(v)?,
            "docker" => self.docker = non_empty(v)?.into(),
            "service-image" | "service-images" => {
                for (name, value) in crate::node::services::parse_assignments(v)? {
                    let image = crate::node::services::check_image(&value)
                        .map_err(|e| format!("{name}: {e}"))?;
                    self.service_images.insert(name, image);
                }
            }
            "service-args" => {
                for (name, args) in crate::node::services::parse_assignments(v)? {
                    let words = crate::node::services::check_args(&args)
                        .map_err(|e| format!("{name}: {e}"))?;
                    self.service_args.insert(name, words);
                }
            }
            "llamacpp-model" => {
                self.llamacpp_model = Some(crate::node::services::check_model_file(v)?)
            }
            "service-bind" => {
                self.service_bind = v.parse().map_err(|_| {
                    format!(
                    "'{v}' is not an IP address (e.g. 127.0.0.1, or 0.0.0.0 for every interface)"
                )
                })?
            }
            "service-ready-timeout" => self.service_ready_timeout = positive(parse_duration(v)?)?,
            // device config
            "tag-streams" => self.tag_streams = boolean(v)?,
            "allow-ssh-control" => self.allow_ssh_control = boolean(v)?,
            "ssh-unit" => self.ssh_unit = unit_name(v)?,
            // provisioning
            "auth-url" => self.auth_url = Some(http_url(v)?),
            "init-timeout" => self.init_timeout = positive(parse_duration(v)?)?,
            "device-api-token" => {
                self.device_api_token = Some(Secret(crate::node::provision::check_token(v)?))
            }
            // observability
            "metrics-addr" => {
                self.metrics_addr = metrics_addr(v)?;
                self.metrics_addr_set = true;
            }
            "gpu-high-temp" => {
                self.gpu_high_temp = number::<f64>(v)?;
                if !(self.gpu_high_temp.is_finite() && self.gpu_high_temp > 0.0) {
                    return Err("must be a positive number of °C".into());
                }
            }
            "gpu-telemetry" => match v {
                "auto" | "nvidia-smi" => self.gpu_telemetry = v.to_owned(),
                _ => return Err(format!("'{v}' is not auto or nvidia-smi")),
            },
            // events stream
            "events-stream" => self.events_stream = boolean(v)?,
            "events-maxlen" => {
                self.events_maxlen = number(v)?;
                if self.events_maxlen == 0 {
                    return Err(
                        "must be at least 1 (turn the stream off with events-stream=false)".into(),
                    );
                }
            }
            "events-ttl" => self.events_ttl = positive(parse_duration(v)?)?,
            // Redis Sentinel
            "sentinel-username" => self.sentinel_username = Some(non_empty(v)?),
            "sentinel-password" => self.sentinel_password = Some(Secret(non_empty(v)?)),
            "sentinel-tls" => {
                self.sentinel_tls = match v {
                    "auto" => None,
                    _ => Some(boolean(v).map_err(|_| format!("'{v}' is not auto, true or false"))?),
                }
            }
            // gateway
            "gateway-listen" => self.gateway_listen = listen_addr(v)?,
            "gateway-routes" => {
                // The config file's object {"MODEL": "BACKEND[@QUEUE]"} arrives as its JSON text.
                let items: Vec<String> = if v.starts_with('{') {
                    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(v)
                        .map_err(|e| {
                        format!("not a JSON object of MODEL: BACKEND[@QUEUE]: {e}")
                    })?;
                    obj.into_iter()
                        .map(|(model, target)| match target {
                            serde_json::Value::String(t) => Ok(format!("{model}={t}")),
                            other => {
                                Err(format!("{model}: {other} is not a string BACKEND[@QUEUE]"))
                            }
                        })
                        .collect::<Result<_, String>>()?
                } else {
                    v.split(',').map(str::to_owned).collect()
                };
                for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
                    let route = gateway_route(item)?;
                    self.gateway_routes.retain(|r| r.model != route.model);
                    self.gateway_routes.push(route);
                }
            }
            "default-backend" => self.default_backend = backend_name(v)?,
            "gateway-api-keys" => {
                for key in v.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                    if key.len() < 8 || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(
                            "an API key must be at least 8 characters, without spaces".into()
                        );
                    }
                    self.gateway_api_keys.push(Secret(key.to_owned()));
                }
            }
            "insecure-no-auth" => self.insecure_no_auth = boolean(v)?,
            "gateway-claim-timeout" => self.gateway_claim_timeout = positive(parse_duration(v)?)?,
            "gateway-job-timeout" => self.gateway_job_timeout = positive(parse_duration(v)?)?,
            "gateway-keepalive" => self.gateway_keepalive = positive(parse_duration(v)?)?,
            "gateway-client-timeout" => self.gateway_client_timeout = positive(parse_duration(v)?)?,
            "gateway-max-body" => {
                self.gateway_max_body = number(v)?;
                if self.gateway_max_body < 1024 {
                    return Err(format!(
                        "'{v}' bytes is too small for a request (at least 1024)"
                    ));
                }
            }
            "gateway-max-connections" => {
                self.gateway_max_connections = number(v)?;
                if self.gateway_max_connections == 0 || self.gateway_max_connections > 65536 {
                    return Err(format!("'{v}' is not between 1 and 65536"));
                }
            }
            // leftovers
            "service-tool-timeout" => self.service_tool_timeout = positive(parse_duration(v)?)?,
            // performance
            "coalesce-chunks" => self.coalesce_chunks = boolean(v)?,
            "chunk-hold" => self.chunk_hold = parse_duration(v)?.min(Duration::from_millis(100)),
            _ => return Err(format!("unknown setting '{name}'")),
        }
        Ok(())
    }

    /// Where model_download puts files: `models-dir`, else `{state-dir}/models`.
    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("models"))
    }

    pub fn consumer(&self) -> &str {
        self.consumer.as_deref().unwrap_or(&self.node_name)
    }

    /// Where shell_command jobs run: `--workspace-dir`, else
    /// `{state-dir}/workspace`.
    pub fn workspace_dir(&self) -> PathBuf {
        self.workspace_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("workspace"))
    }

    /// This node's own stream, read besides the queues.
    /// The node's own stream; on a Redis Cluster its name is a hash tag
    /// (so its dead letters share its slot).
    pub fn node_stream(&self) -> String {
        self.node_stream_of(&self.node_name)
    }

    /// The own stream of node `name` (see [`Settings::node_stream`]).
    pub fn node_stream_of(&self, name: &str) -> String {
        if self.on_cluster() {
            format!("jobs:v1:node:{{{name}}}")
        } else {
            format!("jobs:v1:node:{name}")
        }
    }

    /// Whether the Redis URL names a cluster (`redis+cluster://`).
    pub fn on_cluster(&self) -> bool {
        crate::redis_cluster::is_cluster_url(&self.redis_url)
    }

    /// On a Redis Cluster, why the queues cannot be read (each must share
    /// its slot with its dead letters); `None` elsewhere or when they can.
    pub fn cluster_queue_problem(&self) -> Option<String> {
        self.queues
            .iter()
            .find_map(|q| self.cluster_stream_problem(q))
    }

    /// On a Redis Cluster, why no worker can read `stream` (see
    /// `redis_cluster::stream_problem`); `None` elsewhere or when one can.
    pub fn cluster_stream_problem(&self, stream: &str) -> Option<String> {
        if !self.on_cluster() {
            return None;
        }
        crate::redis_cluster::stream_problem(
            stream,
            &crate::transport::redis_streams::dead_letter::stream_for(stream),
        )
    }

    /// Every stream a worker reads: the queues, then the node's own stream.
    pub fn streams(&self) -> Vec<String> {
        let mut streams = self.queues.clone();
        let node = self.node_stream();
        if !streams.contains(&node) {
            streams.push(node);
        }
        streams
    }
}

impl Settings {
    /// The bearer token for Nexus: `nexus-token`, else the stored
    /// `device-api-token`.
    /// How the sentinels of a `redis+sentinel://` URL are reached.
    pub fn sentinel_auth(&self) -> crate::redis_sentinel::SentinelAuth {
        crate::redis_sentinel::SentinelAuth {
            username: self.sentinel_username.clone(),
            password: self.sentinel_password.clone(),
            tls: self.sentinel_tls,
        }
    }

    pub fn nexus_bearer(&self) -> Option<&str> {
        self.nexus_token
            .as_deref()
            .or(self.device_api_token.as_ref().map(|t| t.0.as_str()))
    }
}

/// The config file when neither `--config` nor `CITADEL_CONFIG` names one:
/// `/etc/citadel/config.json` for root, else
/// `$XDG_CONFIG_HOME/citadel/config.json` or `~/.config/citadel/config.json`.
pub fn default_config_file() -> PathBuf {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    match (is_root(), std::env::var_os("XDG_CONFIG_HOME"), home) {
        (true, _, _) => "/etc/citadel/config.json".into(),
        (_, Some(x), _) if !x.is_empty() => PathBuf::from(x).join("citadel/config.json"),
        (_, _, Some(h)) => PathBuf::from(h).join(".config/citadel/config.json"),
        _ => "/etc/citadel/config.json".into(),
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A credential: its `Debug` never shows it, so no `{:?}` of the settings
/// can log it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `claim-idle` → `CITADEL_CLAIM_IDLE`.
pub fn env_name(name: &str) -> String {
    format!("CITADEL_{}", name.replace('-', "_").to_uppercase())
}

/// `500ms`, `30s`, `2m`, `1h`; a bare number is seconds. Decimal text is
/// read exactly (to the nanosecond, further digits dropped), not through
/// f64: `13249987083ms` is that many milliseconds, not 13249987.083000001 s.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let not_a_duration = || format!("'{text}' is not a duration (write 500ms, 30s, 2m or 1h)");
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(not_a_duration());
    }
    let nanos_per_unit: u128 = match unit.trim() {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(format!("'{text}' has an unknown unit (use ms, s, m or h)")),
    };
    let out_of_range = || format!("'{text}' is out of range");
    // Below 1e9 s (as before): more than 30 integer digits is out of range.
    let int = int.trim_start_matches('0');
    if int.len() > 30 {
        return Err(out_of_range());
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| not_a_duration())?
    };
    // 18 fractional digits are past a nanosecond for every unit.
    let frac = &frac[..frac.len().min(18)];
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| not_a_duration())?
    };
    let nanos = int * nanos_per_unit + frac_value * nanos_per_unit / 10u128.pow(frac.len() as u32);
    if nanos >= 1_000_000_000 * 1_000_000_000 {
        return Err(out_of_range());
    }
    let nanos = nanos as u64;
    Ok(Duration::new(
        nanos / 1_000_000_000,
        (nanos % 1_000_000_000) as u32,
    ))
}

fn number<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("'{v}' is not a whole number"))
}

/// Settings that are on or off. As flags they may stand alone
/// (`--allow-shell` = `--allow-shell=true`).
pub fn is_boolean(name: &str) -> bool {
    matches!(
        name,
        "allow-shell"
            | "tag-streams"
            | "allow-ssh-control"
            | "insecure-no-auth"
            | "events-stream"
            | "coalesce-chunks"
    )
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off` (any case).
fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("'{v}' is not a boolean (write true or false)")),
    }
}

fn positive(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        Err("must be longer than 0".into())
    } else {
        Ok(d)
    }
}

/// An engine's base URL: `http://` or `https://` and a host; kept without a
/// trailing `/` so that API paths can be appended.
fn http_url(v: &str) -> Result<String, String> {
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or_else(|| format!("'{v}' is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || v.contains(char::is_whitespace) {
        return Err(format!("'{v}' has no host"));
    }
    Ok(v.trim_end_matches('/').to_owned())
}

/// The forms of Redis URL accepted, for error messages.
const REDIS_URL_FORMS: &str =
    "write redis://HOST[:PORT][/DB], rediss://… for TLS, or unix:///PATH/TO/SOCKET";

/// Whether `v` is a Redis URL the client can open; if not, what is wrong,
/// in plain words (the client's own errors name an error kind, not the
/// mistake). A password in the URL is not repeated in the message.
fn check_redis_url(v: &str) -> Result<(), String> {
    let shown = redact_password(v);
    let wrong = |what: &str| {
        Err(format!(
            "'{shown}' is not a Redis URL: {what} ({REDIS_URL_FORMS})"
        ))
    };
    let Some((scheme, rest)) = v.split_once("://") else {
        return if v.is_empty() {
            Err(format!("the Redis URL is empty ({REDIS_URL_FORMS})"))
        } else {
            wrong("it does not start with redis://")
        };
    };
    match scheme.to_ascii_lowercase().as_str() {
        // The schemes the redis crate opens (valkey* are its aliases).
        "redis" | "rediss" | "valkey" | "valkeys" => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = match host_port.strip_prefix('[') {
                Some(v6) => match v6.split_once(']') {
                    Some((h, "")) => (h, None),
                    Some((h, p)) if p.starts_with(':') => (h, Some(&p[1..])),
                    _ => return wrong("its IPv6 host is not closed with ]"),
                },
                None => match host_port.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (host_port, None),
                },
            };
            if host.is_empty() {
                return wrong("it names no host");
            }
            if host == "0.0.0.0" || host == "::" {
                return wrong(&format!(
                    "{host} is an address to listen on, not one to connect to"
                ));
            }
            match port {
                Some(p) if !p.is_empty() && !matches!(p.parse::<u16>(), Ok(1..)) => {
                    return wrong(&format!(
                        "the port must be a number from 1 to 65535, not '{p}'"
                    ))
                }
                _ => {}
            }
            let path = tail.split(['?', '#']).next().unwrap_or_default();
            let db = path.trim_matches('/');
            if !db.is_empty() && db.parse::<u32>().is_err() {
                return wrong(&format!(
                    "the database after the host must be a number (/0, /1, …), not '{db}'"
                ));
            }
        }
        "unix" | "redis+unix" | "valkey+unix" => {
            if !rest.starts_with('/') || rest.len() < 2 {
                return wrong("it names no socket path");
            }
        }
        // Resolved through the sentinels at every connect (redis_sentinel).
        "redis+sentinel" | "rediss+sentinel" => {
            return match crate::redis_sentinel::SentinelUrl::parse(v) {
                Ok(_) => Ok(()),
                Err(what) => Err(format!(
                    "'{shown}' is not a Redis Sentinel URL: {what} (write {})",
                    crate::redis_sentinel::FORM
                )),
            };
        }
        // Each command goes to the node serving its key (redis_cluster).
        "redis+cluster" | "rediss+cluster" => {
            return match crate::redis_cluster::seed_urls(v) {
                Ok(_) => Ok(()),
                Err(what) => Err(format!(
                    "'{shown}' is not a Redis Cluster URL: {what} (write {})",
                    crate::redis_cluster::FORM
                )),
            };
        }
        other => return wrong(&format!("{other}:// is not a Redis scheme")),
    }
    // The client's own parser has the last word (query options, fragments).
    match redis::Client::open(v) {
        Ok(_) => Ok(()),
        Err(_) => wrong("the Redis client cannot read it"),
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub fn redact_password(v: &str) -> String {
    let Some((scheme, rest)) = v.split_once("://") else {
        return v.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((user_info, _)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            let at = user_info.len();
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        _ => v.to_owned(),
    }
}

/// `HOST:PORT` the metrics listener binds (an IP or `localhost`), or empty
/// for none.
fn metrics_addr(v: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    let v = v.trim();
    if v.is_empty() {
        return Ok(String::new());
    }
    let ok = v.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && port.parse::<u16>().is_ok() && v.to_socket_addrs().is_ok()
    });
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "'{v}' is not HOST:PORT (e.g. 127.0.0.1:9464, 0.0.0.0:9464; empty turns the listener off)"
        ))
    }
}

/// `HOST:PORT` a listener binds (an IP or `localhost`).
fn listen_addr(v: &str) -> Result<String, String> {
    match metrics_addr(v) {
        Ok(a) if !a.is_empty() => Ok(a),
        _ => Err(format!(
            "'{v}' is not HOST:PORT (e.g. 127.0.0.1:8088, 0.0.0.0:8088)"
        )),
    }
}

/// An engine kind a job may name.
fn backend_name(v: &str) -> Result<String, String> {
    let name = v.to_ascii_lowercase();
    match name.as_str() {
        "vllm" | "ollama" | "llamacpp" => Ok(name),
        _ => Err(format!(
            "'{v}' is not an engine kind (vllm, ollama or llamacpp)"
        )),
    }
}

/// `MODEL=BACKEND[@QUEUE]`.
fn gateway_route(v: &str) -> Result<GatewayRoute, String> {
    let wrong =
        || format!("'{v}' is not MODEL=BACKEND[@QUEUE] (e.g. llama3=vllm@jobs:v1:gpu-a100)");
    let (model, target) = v.split_once('=').ok_or_else(wrong)?;
    let (backend, queue) = match target.split_once('@') {
        Some((b, q)) => (b, Some(q.trim())),
        None => (target, None),
    };
    let model = model.trim();
    if model.is_empty() || queue.is_some_and(str::is_empty) {
        return Err(wrong());
    }
    Ok(GatewayRoute {
        model: model.to_owned(),
        backend: backend_name(backend.trim()).map_err(|e| format!("{v}: {e}"))?,
        queue: queue.map(str::to_owned),
    })
}

/// A systemd unit name: letters, digits and `@._:-` (nothing a shell or
/// systemctl would read as an option).
fn unit_name(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && !v.starts_with('-')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._:-".contains(c));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "'{v}' is not a systemd unit name (letters, digits and @._:-)"
        ))
    }
}

fn non_empty(v: &str) -> Result<String, String> {
    if v.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(v.to_owned())
    }
}

/// `/var/lib/citadel` for root, else `$XDG_STATE_HOME/citadel` or
/// `~/.local/state/citadel`.
fn default_state_dir() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    let is_root = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    match (is_root, std::env::var_os("XDG_STATE_HOME"), home) {
        (Ok(true), _, _) => "/var/lib/citadel".into(),
        (_, Some(x), _) if !x.is_empty() => PathBuf::from(x).join("citadel"),
        (_, _, Some(h)) => PathBuf::from(h).join(".local/state/citadel"),
        _ => "/var/lib/citadel".into(),
    }
}

/// This machine's hostname.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "citadel-node".into())
}

/// `500ms`, `30s`, `2m`: a duration as settings are written (and read back
/// by [`parse_duration`]), for messages that name a setting's value.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        for bad in [
            "",
            "s",
            "10x",
            "-1s",
            "1e400s",
            "ten",
            ".",
            "1.2.3s",
            "1000000000s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    /// Found by proptests::a_formatted_duration_round_trips: through f64,
    /// `13249987083ms` read back as 13249987.083000001 s.
    #[test]
    fn durations_are_read_exactly_not_through_f64() {
        assert_eq!(
            parse_duration("13249987083ms").unwrap(),
            Duration::from_millis(13_249_987_083)
        );
        assert_eq!(parse_duration("0.1s").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration(".5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5.s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("0.0000000019s").unwrap(),
            Duration::from_nanos(1)
        );
        assert_eq!(
            parse_duration("999999999.999999999s").unwrap(),
            Duration::new(999_999_999, 999_999_999)
        );
    }

    #[test]
    fn every_setting_has_a_parser_and_an_env_name() {
        let mut s = Settings::default();
        for (name, _) in SETTINGS {
            let value = match *name {
                "redis-url" => "redis://127.0.0.1:1",
                "mode" => "auto",
                n if n.ends_with("-url") => "http://127.0.0.1:1/",
                "queue" | "group" | "consumer" | "node-name" => "x",
                "services" => "vllm,llamacpp",
                "service-image" => "vllm=registry.local/vllm:1",
                "service-args" => "vllm=--model m",
                "service-bind" => "127.0.0.1",
                "max-job-size" | "shell-output-cap" => "4096",
                "allow-shell" | "tag-streams" | "allow-ssh-control" | "events-stream"
                | "coalesce-chunks" => "true",
                "ssh-unit" => "sshd.service",
                "metrics-addr" => "127.0.0.1:0",
                "gpu-high-temp" => "90",
                "gpu-telemetry" => "nvidia-smi",
                "sentinel-tls" => "true",
                // gateway
                "gateway-listen" => "127.0.0.1:0",
                "gateway-routes" => "m=vllm@jobs:v1:x",
                "default-backend" => "llamacpp",
                "gateway-api-keys" => "sk-test-1234",
                "insecure-no-auth" => "true",
                "gateway-max-body" => "4096",
                n if n.contains("retries")
                    || n.contains("max")
                    || n.ends_with("-attempts")
                    || n == "concurrency" =>
                {
                    "3"
                }
                _ => "2s",
            };
            s.set(name, value).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(env_name("claim-idle"), "CITADEL_CLAIM_IDLE");
    }

    #[test]
    fn bad_values_are_rejected_with_the_reason() {
        let mut s = Settings::default();
        assert!(s
            .set("redis-url", "not a url")
            .unwrap_err()
            .contains("is not a Redis URL"));
        assert!(s.set("concurrency", "0").is_err());
        assert!(s
            .set("max-deliveries", "0")
            .unwrap_err()
            .contains("at least 1"));
        assert!(s
            .set("max-job-size", "10")
            .unwrap_err()
            .contains("too small"));
        assert!(s
            .set("concurrency", "many")
            .unwrap_err()
            .contains("whole number"));
        assert!(s.set("claim-idle", "0s").is_err());
        assert!(s.set("queue", " , ").is_err());
        assert!(s.set("bogus", "1").unwrap_err().contains("unknown setting"));
        assert!(s
            .set("vllm-url", "127.0.0.1:8000")
            .unwrap_err()
            .contains("not an http"));
        assert!(s
            .set("ollama-url", "http://")
            .unwrap_err()
            .contains("no host"));
        assert!(s.set("engine-idle-timeout", "0s").is_err());
        assert!(s
            .set("allow-shell", "maybe")
            .unwrap_err()
            .contains("not a boolean"));
        for (text, want) in [("true", true), ("0", false), ("ON", true), ("no", false)] {
            s.set("allow-shell", text).unwrap();
            assert_eq!(s.allow_shell, want, "{text}");
        }
        s.set("llamacpp-url", "http://127.0.0.1:8081/").unwrap();
        assert_eq!(s.llamacpp_url, "http://127.0.0.1:8081");
        assert!(s
            .set("events-maxlen", "0")
            .unwrap_err()
            .contains("events-stream=false"));
        assert!(s.set("events-maxlen", "-5").is_err());
        assert!(s.set("events-ttl", "0s").is_err());
        assert!(s.set("events-stream", "sometimes").is_err());
    }

    #[test]
    fn allow_shell_is_off_by_default_and_a_json_boolean_in_the_file() {
        let mut s = Settings::default();
        assert!(!s.allow_shell);
        s.apply_file(r#"{"allow_shell": true}"#).unwrap();
        assert!(s.allow_shell);
        s.apply_file(r#"{"allow-shell": "off"}"#).unwrap();
        assert!(!s.allow_shell);
        assert_eq!(s.workspace_dir(), s.state_dir.join("workspace"));
    }

    #[test]
    fn config_file_layers_under_the_environment() {
        let mut s = Settings::default();
        s.apply_file(r#"{"queue":["jobs:v1:a","jobs:v1:b"],"claim_idle":"2s","concurrency":8,"device_api_token":"t"}"#)
            .unwrap();
        assert_eq!(s.queues, ["jobs:v1:a", "jobs:v1:b"]);
        assert_eq!(s.claim_idle, Duration::from_secs(2));
        assert_eq!(s.concurrency, 8);
        assert!(s
            .apply_file("[1,2]")
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(s.apply_file(r#"{"concurrency":"x"}"#).is_err());
    }

    #[test]
    fn bad_redis_urls_say_in_plain_words_what_is_wrong() {
        let cases = [
            ("nonsense", "it does not start with redis://"),
            ("http://x", "http:// is not a Redis scheme"),
            ("redis://:99999", "it names no host"),
            ("redis://", "it names no host"),
            (
                "redis://h:99999",
                "the port must be a number from 1 to 65535, not '99999'",
            ),
            ("redis://h:0", "not '0'"),
            ("redis://h:abc", "not 'abc'"),
            (
                "redis://h/x",
                "the database after the host must be a number",
            ),
            ("redis://0.0.0.0:6379", "an address to listen on"),
            ("redis://[::1:6379", "not closed with ]"),
            ("unix://", "it names no socket path"),
            ("rediss://h#verify", "the Redis client cannot read it"),
            ("", "the Redis URL is empty"),
        ];
        for (url, want) in cases {
            let err = check_redis_url(url).unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains("InvalidClientConfig"), "{url}: {err}");
            assert!(
                err.contains("write redis://HOST[:PORT][/DB]"),
                "{url}: {err}"
            );
        }
        let err = check_redis_url("redis://u:s3cret@h:99999").unwrap_err();
        assert!(err.contains("'redis://u:***@h:99999'"), "{err}");
        for good in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1:6379/",
            "redis://queue-host",
            "rediss://user:pw@queue-host:6380/2",
            "redis://:pw@h:6379/0?protocol=resp3",
            "rediss://h:6380/#insecure",
            "redis://[::1]:6379",
            "unix:///run/redis.sock",
            "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster",
            "rediss+sentinel://app:pw@[::1]:26379,s2/mymaster/3",
        ] {
            assert_eq!(check_redis_url(good), Ok(()), "{good}");
        }
        let err = check_redis_url("redis+sentinel://u:s3cret@h1,,h2/m").unwrap_err();
        assert!(err.contains("'redis+sentinel://u:***@h1,,h2/m'"), "{err}");
        assert!(
            err.contains("is not a Redis Sentinel URL: it names no sentinel host"),
            "{err}"
        );
        assert!(err.contains("(write redis+sentinel://"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn service_images_and_args_are_objects_in_the_file() {
        let mut s = Settings::default();
        s.apply_file(
            r#"{"service_images": {"vllm": "a/vllm:1", "llamacpp": "b:2"},
                "service_args": {"vllm": ["--model", "m"], "llamacpp": "-c 512"},
                "service_bind": "0.0.0.0", "service_ready_timeout": "90s"}"#,
        )
        .unwrap();
        assert_eq!(s.service_images["vllm"], "a/vllm:1");
        assert_eq!(s.service_images["llamacpp"], "b:2");
        assert_eq!(s.service_args["vllm"], ["--model", "m"]);
        assert_eq!(s.service_args["llamacpp"], ["-c", "512"]);
        assert_eq!(s.service_bind.to_string(), "0.0.0.0");
        assert_eq!(s.service_ready_timeout, Duration::from_secs(90));
        // The flag's own name works in the file too; a later flag merges.
        s.apply_file(r#"{"service-image": "ollama=o:3"}"#).unwrap();
        s.set("service-image", "vllm=c:4").unwrap();
        assert_eq!(s.service_images.len(), 3);
        assert_eq!(s.service_images["vllm"], "c:4");
        let err = s
            .apply_file(r#"{"service_images": {"tgi": "x"}}"#)
            .unwrap_err();
        assert!(
            err.starts_with("service_images: 'tgi' is not a service"),
            "{err}"
        );
    }

    #[test]
    fn gateway_routes_read_from_flags_and_the_file_and_bad_ones_are_named() {
        let mut s = Settings::default();
        s.set("gateway-routes", "llama3=vllm@jobs:v1:a100, tiny=llamacpp")
            .unwrap();
        s.apply_file(r#"{"routes": {"qwen": "ollama@jobs:v1:b", "tiny": "vllm"}}"#)
            .unwrap();
        let got: Vec<(&str, &str, Option<&str>)> = s
            .gateway_routes
            .iter()
            .map(|r| (r.model.as_str(), r.backend.as_str(), r.queue.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("llama3", "vllm", Some("jobs:v1:a100")),
                ("qwen", "ollama", Some("jobs:v1:b")),
                ("tiny", "vllm", None),
            ]
        );
        for bad in ["nomodel", "=vllm", "m=tgi", "m=vllm@"] {
            assert!(s.set("gateway-routes", bad).is_err(), "{bad}");
        }
        assert!(s
            .set("gateway-api-keys", "short")
            .unwrap_err()
            .contains("at least 8"));
        assert!(s.set("gateway-listen", "nope").is_err());
        s.set("gateway-api-keys", "sk-aaaaaaaa,sk-bbbbbbbb")
            .unwrap();
        assert_eq!(s.gateway_api_keys.len(), 2);
        assert!(!format!("{s:?}").contains("sk-aaaaaaaa"), "keys never show");
    }

    #[test]
    fn node_stream_is_read_besides_the_queues() {
        let mut s = Settings::default();
        s.set("node-name", "gpu-01").unwrap();
        assert_eq!(s.streams(), ["jobs:v1:gpu-general", "jobs:v1:node:gpu-01"]);
        assert_eq!(s.consumer(), "gpu-01");
    }
}
