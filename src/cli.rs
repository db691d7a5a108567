//! The command line: lexopt parsing into a [`Command`] plus [`Settings`]
//! (defaults < config file < environment < flags), and the help texts.

use crate::config::{self, Settings, SETTINGS};
use lexopt::prelude::*;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Work,
    /// `citadel agent` (adaptive mode); `up` first starts configured services.
    Agent {
        up: bool,
    },
    RunJob {
        job: Option<String>,
    },
    Submit(Submit),
    /// `citadel follow JOB [--from ID]`: print an existing job's events.
    Follow {
        job_id: String,
        from: String,
    },
    /// `citadel gateway`: the OpenAI-compatible HTTP front of the fabric.
    Gateway,
    Dlq(Dlq),
    /// The operator's screen (`--json`: one JSON object).
    Status {
        json: bool,
    },
    /// `citadel services [list|start|stop|restart] [NAME]`.
    Services(Services),
    /// `citadel init`: device authorization, credentials into the config file.
    Init(Init),
    /// `citadel service install|status|uninstall`.
    Service(Service),
    Version,
    /// Print this help text and exit 0.
    Help(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Submit {
    pub kind: String,
    pub payload: String,
    pub job_id: Option<String>,
    pub ray_id: Option<String>,
    pub node: Option<String>,
    /// Send to `jobs:v1:tag:{tag}` (exclusive with `node`).
    pub tag: Option<String>,
    pub follow: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Init {
    /// Machine-readable progress lines on stdout.
    pub json: bool,
    /// Replace stored credentials.
    pub relogin: bool,
    /// `--token`: the token itself (no browser).
    pub token: Option<String>,
    /// `--token-file`: a file holding it (`-`: stdin).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ServiceAction {
    Install,
    Status,
    Uninstall,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub action: ServiceAction,
    pub request: crate::node::systemd::Request,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dlq {
    List { count: usize },
    Show(String),
    Replay(Option<String>),
    Purge,
}

/// What `citadel services` does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServicesAction {
    List,
    Start,
    Stop,
    Restart,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Services {
    pub action: ServicesAction,
    /// One service of the catalog; `None`: all (list: the catalog; start,
    /// restart: the wanted ones; stop: citadel's containers).
    pub name: Option<String>,
    pub json: bool,
}

#[derive(Debug)]
pub struct Cli {
    pub command: Command,
    pub settings: Settings,
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, String> {
    let mut p = lexopt::Parser::from_args(args);
    let mut name = None;
    let mut positional: Vec<String> = Vec::new();
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut queues: Vec<String> = Vec::new();
    // gateway: --route and --api-key repeat, like --queue.
    let mut routes: Vec<String> = Vec::new();
    let mut api_keys: Vec<String> = Vec::new();
    let mut from: Option<String> = None;
    let mut config_path: Option<PathBuf> = None;
    let mut submit = Submit {
        kind: String::new(),
        payload: "{}".into(),
        job_id: None,
        ray_id: None,
        node: None,
        tag: None,
        follow: false,
    };
    let mut all = false;
    let mut count = 20usize;
    let mut help = false;
    let mut json = false;
    let mut init = Init {
        json: false,
        relogin: false,
        token: None,
        token_file: None,
    };
    let mut service = crate::node::systemd::Request {
        root: PathBuf::from("/"),
        user: None,
        binary: None,
        up: false,
    };

    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => help = true,
            Short('V') | Long("version") if name.is_none() => name = Some("version".to_string()),
            Long("config") => config_path = Some(p.value().map_err(|e| e.to_string())?.into()),
            Long("queue") => queues.push(text(p.value())?),
            Long(f) if config::is_boolean(f) => {
                let f = f.to_owned();
                let v = match p.optional_value() {
                    Some(v) => text(Ok(v))?,
                    None => "true".into(),
                };
                flags.push((f, v));
            }
            Long(f) if SETTINGS.iter().any(|(n, _)| *n == f) => {
                let f = f.to_owned();
                flags.push((f, text(p.value())?));
            }
            Long("type") if name.as_deref() == Some("submit") => submit.kind = text(p.value())?,
            Long("payload") if name.as_deref() == Some("submit") => {
                submit.payload = text(p.value())?
            }
            Long("job-id") if name.as_deref() == Some("submit") => {
                submit.job_id = Some(text(p.value())?)
            }
            Long("ray-id") if name.as_deref() == Some("submit") => {
                submit.ray_id = Some(text(p.value())?)
            }
            Long("node") if name.as_deref() == Some("submit") => {
                submit.node = Some(text(p.value())?)
            }
            Long("tag") if name.as_deref() == Some("submit") => submit.tag = Some(text(p.value())?),
            Long("follow") | Short('f') if name.as_deref() == Some("submit") => {
                submit.follow = true
            }
            Long("all") if name.as_deref() == Some("dlq") => all = true,
            Long("from") if name.as_deref() == Some("follow") => from = Some(text(p.value())?),
            Long("listen") if name.as_deref() == Some("gateway") => {
                flags.push(("gateway-listen".into(), text(p.value())?))
            }
            Long("route") if name.as_deref() == Some("gateway") => routes.push(text(p.value())?),
            Long("api-key") if name.as_deref() == Some("gateway") => {
                api_keys.push(text(p.value())?)
            }
            Long("json") if matches!(name.as_deref(), Some("services" | "status")) => json = true,
            Long("json") if name.as_deref() == Some("init") => init.json = true,
            Long("relogin") if name.as_deref() == Some("init") => init.relogin = true,
            Long("token") if name.as_deref() == Some("init") => init.token = Some(text(p.value())?),
            Long("token-file") if name.as_deref() == Some("init") => {
                init.token_file = Some(p.value().map_err(|e| e.to_string())?.into())
            }
            Long("root") if name.as_deref() == Some("service") => {
                service.root = p.value().map_err(|e| e.to_string())?.into()
            }
            Long("user") if name.as_deref() == Some("service") => {
                service.user = Some(text(p.value())?)
            }
            Long("binary") if name.as_deref() == Some("service") => {
                service.binary = Some(p.value().map_err(|e| e.to_string())?.into())
            }
            Long("up") if name.as_deref() == Some("service") => service.up = true,
            Long("count") if name.as_deref() == Some("dlq") => {
                count = text(p.value())?
                    .parse()
                    .map_err(|_| "--count takes a whole number".to_string())?
            }
            Value(v) if name.is_none() => {
                name = Some(v.into_string().map_err(|_| "invalid command name")?)
            }
            Value(v) => positional.push(v.into_string().map_err(|_| "arguments must be UTF-8")?),
            other => {
                let cmd = name.as_deref().unwrap_or("");
                return Err(
                    format!("{} (see 'citadel {cmd} --help')", other.unexpected())
                        .replace("  ", " "),
                );
            }
        }
    }

    let name = name.unwrap_or_else(|| "help".into());
    if help || name == "help" {
        let topic = if name == "help" {
            positional.first().cloned().unwrap_or_default()
        } else {
            name
        };
        return Ok(Cli {
            command: Command::Help(help_text(&topic)?),
            settings: Settings::default(),
        });
    }

    // `citadel init` creates the config file it is told to write.
    let mut settings = Settings::load_with(config_path.as_deref(), name == "init")?;
    if !queues.is_empty() {
        flags.push(("queue".into(), queues.join(",")));
    }
    for r in routes {
        flags.push(("gateway-routes".into(), r));
    }
    for k in api_keys {
        flags.push(("gateway-api-keys".into(), k));
    }
    for (f, v) in &flags {
        settings.set(f, v).map_err(|e| format!("--{f}: {e}"))?;
    }

    let extra = |n: usize| -> Result<(), String> {
        match positional.get(n) {
            Some(v) => Err(format!(
                "unexpected argument '{v}' (see 'citadel {name} --help')"
            )),
            None => Ok(()),
        }
    };
    let command = match name.as_str() {
        "work" => {
            extra(0)?;
            Command::Work
        }
        "agent" | "up" => {
            extra(0)?;
            settings.mode = crate::config::Mode::Auto;
            Command::Agent { up: name == "up" }
        }
        "run-job" => {
            extra(1)?;
            Command::RunJob {
                job: positional.first().cloned().filter(|j| j != "-"),
            }
        }
        "submit" => {
            extra(0)?;
            if submit.kind.is_empty() {
                return Err("submit needs --type (e.g. --type echo)".into());
            }
            if submit.node.is_some() && submit.tag.is_some() {
                return Err("submit takes --node or --tag, not both".into());
            }
            if let Some(tag) = submit.tag.as_deref().filter(|t| t.is_empty()) {
                return Err(format!("--tag '{tag}': a tag cannot be empty"));
            }
            Command::Submit(submit)
        }
        "dlq" => {
            let sub = positional.first().map(String::as_str).unwrap_or("");
            let id = positional.get(1).cloned();
            let d = match (sub, id, all) {
                ("list", None, false) => Dlq::List { count },
                ("show", Some(id), false) => Dlq::Show(id),
                ("replay", Some(id), false) => Dlq::Replay(Some(id)),
                ("replay", None, true) => Dlq::Replay(None),
                ("purge", None, false) => Dlq::Purge,
                ("show", None, _) => return Err("dlq show needs a dead letter's ID".into()),
                ("replay", _, _) => {
                    return Err("dlq replay needs a dead letter's ID, or --all".into())
                }
                _ => return Err(
                    "dlq needs list, show ID, replay ID|--all or purge (see 'citadel dlq --help')"
                        .into(),
                ),
            };
            extra(2)?;
            Command::Dlq(d)
        }
        "status" => {
            extra(0)?;
            Command::Status { json }
        }
        "services" => {
            // `citadel services NAME` is `citadel services list NAME`.
            let bare_name = positional
                .first()
                .is_some_and(|p| crate::node::services::known(p));
            let action = match positional.first().map(String::as_str) {
                _ if bare_name => ServicesAction::List,
                None | Some("list") => ServicesAction::List,
                Some("start") => ServicesAction::Start,
                Some("stop") => ServicesAction::Stop,
                Some("restart") => ServicesAction::Restart,
                Some(other) => {
                    return Err(format!(
                        "services: '{other}' is not list, start, stop or restart (see 'citadel services --help')"
                    ))
                }
            };
            let at = if bare_name { 0 } else { 1 };
            let service = positional.get(at).cloned();
            if let Some(n) = &service {
                crate::node::services::check_known(n).map_err(|e| format!("services: {e}"))?;
            }
            extra(at + 1)?;
            Command::Services(Services {
                action,
                name: service,
                json,
            })
        }
        "init" => {
            extra(0)?;
            if init.token.is_some() && init.token_file.is_some() {
                return Err("init takes --token or --token-file, not both".into());
            }
            Command::Init(init)
        }
        "service" => {
            let action =
                match positional.first().map(String::as_str) {
                    Some("install") => ServiceAction::Install,
                    Some("status") => ServiceAction::Status,
                    Some("uninstall") => ServiceAction::Uninstall,
                    _ => return Err(
                        "service needs install, status or uninstall (see 'citadel service --help')"
                            .into(),
                    ),
                };
            extra(1)?;
            Command::Service(Service {
                action,
                request: service,
            })
        }
        "follow" => {
            let Some(job_id) = positional.first().cloned() else {
                return Err("follow needs a job id (see 'citadel follow --help')".into());
            };
            extra(1)?;
            Command::Follow {
                job_id,
                from: from.unwrap_or_else(|| "0".into()),
            }
        }
        "gateway" => {
            extra(0)?;
            Command::Gateway
        }
        "version" => Command::Version,
        other => return Err(format!("unknown command '{other}' (see 'citadel --help')")),
    };
    Ok(Cli { command, settings })
}

fn text(v: Result<OsString, lexopt::Error>) -> Result<String, String> {
    v.map_err(|e| e.to_string())?
        .into_string()
        .map_err(|_| "flag values must be UTF-8".to_string())
}

fn settings_help() -> String {
    let mut out = String::from(
        "\nSettings (flag / environment variable; also keys of the JSON config file):\n\
         \x20 --config PATH             config file [CITADEL_CONFIG, else /etc/citadel/config.json as root,\n\
         \x20                           else ~/.config/citadel/config.json]\n",
    );
    for (name, help) in SETTINGS {
        out.push_str(&format!(
            "  --{name:<22} {help}\n  {:<24} ${}\n",
            "",
            config::env_name(name)
        ));
    }
    out.push_str("\nDurations are written 500ms, 30s, 2m or 1h.\n");
    out
}

pub fn help_text(topic: &str) -> Result<String, String> {
    let body = match topic {
        "" => "citadel — a node agent that runs jobs from Redis Streams\n\n\
               Usage: citadel <command> [flags]\n\n\
               Commands:\n\
               \x20 work       run jobs from Redis Streams until SIGTERM/SIGINT (--mode nexus|auto)\n\
               \x20 agent      run jobs from Nexus polling or Redis Streams, adaptively\n\
               \x20 up         start the node's configured services (Docker), then the agent\n\
               \x20 run-job    run one job locally through the same handlers (no Redis)\n\
               \x20 submit     enqueue a job; --follow prints its output as it streams\n\
               \x20 follow     print a job's events from its replayable stream (events:v1:{jobId})\n\
               \x20 gateway    serve an OpenAI-compatible API whose requests become llm_inference jobs\n\
               \x20 dlq        list, show, replay or purge dead letters\n\
               \x20 status     say which inference engines (vLLM, Ollama, llama.cpp) answer\n\
               \x20 services   list, start, stop or restart the node's service containers (Docker)\n\
               \x20 init       authorize this node (device code in a browser) and store its credentials\n\
               \x20 service    install, show or uninstall the systemd service\n\
               \x20 version    print the version\n\n\
               'citadel <command> --help' describes a command and its flags.\n"
            .to_string(),
        "agent" | "up" => format!(
            "citadel {topic} — run jobs from Nexus or Redis, whichever is available\n\n\
             Usage: citadel {topic} [flags]     (citadel work --mode auto)\n\n\
             Starts polling Nexus (--nexus-url) for jobs. When a Redis URL is configured\n\
             (--redis-url, CITADEL_REDIS_URL, config file) and Redis answers, it switches\n\
             to Redis Streams; when Redis stays unreachable longer than --redis-fallback it\n\
             goes back to polling Nexus, probing Redis every --redis-probe. Jobs in flight\n\
             settle on the transport that delivered them. Every change of mode is logged and\n\
             written to {{state-dir}}/agent-status.json (see 'citadel status').\n\
             'citadel up' first brings the node's service containers (Docker) to the\n\
             configured set (the last APPLY_DEVICE_CONFIG's services, else --services),\n\
             exactly as 'citadel services start' does but also removing services no\n\
             longer wanted, and waits up to --service-ready-timeout for their engines to\n\
             answer; it logs which are ready and which not (not fatal), then runs the\n\
             agent. With no service configured it says so and runs the agent.\n{}",
            settings_help()
        ),
        "work" => format!(
            "citadel work — run jobs from Redis Streams (or Nexus: --mode)\n\n\
             Usage: citadel work [--mode redis|nexus|auto] [flags]\n\n\
             Reads the queues and this node's own stream (jobs:v1:node:{{name}}) with a\n\
             consumer group; runs up to --concurrency jobs at once; publishes events on\n\
             stream:v1:{{jobId}}, writes job:{{jobId}}:status, dead-letters failures to\n\
             dlq:v1:<queue>. At-least-once: entries are acknowledged only after their\n\
             outcome is written. SIGTERM/SIGINT: stop reading at once, finish in-flight jobs\n\
             within --shutdown-grace, exit 0; a second signal stops at once and leaves\n\
             unfinished jobs pending for another worker.\n{}",
            settings_help()
        ),
        "run-job" => "citadel run-job — run one job here, without Redis\n\n\
                      Usage: citadel run-job '<job JSON>'   (or the JSON on stdin, or '-')\n\n\
                      The job is {\"type\": \"echo\", \"payload\": {...}, \"id\": \"optional\"}. Chunks are\n\
                      printed to stdout as they stream, then the result JSON on its own line.\n\
                      Exit 0 on success, 1 when the job fails or is cancelled, 2 on bad input.\n"
            .to_string(),
        "submit" => format!(
            "citadel submit — enqueue a job on the first --queue (or a node's stream)\n\n\
             Usage: citadel submit --type TYPE [--payload JSON] [--job-id ID] [--ray-id ID]\n\
             \x20                     [--node NAME | --tag TAG] [--follow]\n\n\
             \x20 --type TYPE      job type (echo, …)\n\
             \x20 --payload JSON   the payload object [{{}}]\n\
             \x20 --job-id ID      job id [generated]\n\
             \x20 --ray-id ID      tracing id echoed in every event\n\
             \x20 --node NAME      send to jobs:v1:node:NAME instead of the queue\n\
             \x20 --tag TAG        send to jobs:v1:tag:TAG (read by every worker whose device\n\
             \x20                  config has the custom tag TAG) instead of the queue\n\
             \x20 -f, --follow     print the job's chunks as they arrive (read from its\n\
             \x20                  replayable stream events:v1:{{jobId}}, so nothing is missed\n\
             \x20                  and a lost Redis connection resumes where it was) and the\n\
             \x20                  result at the end; exit 0 on end, 1 on error or cancelled\n\n\
             Without --follow it prints the job id.\n{}",
            settings_help()
        ),
        "dlq" => format!(
            "citadel dlq — the dead-letter streams of the configured queues\n\n\
             Usage: citadel dlq list [--count N]    newest first, one line each [20]\n\
             \x20      citadel dlq show ID           every field of one dead letter\n\
             \x20      citadel dlq replay ID|--all   put the job back on its original queue\n\
             \x20      citadel dlq purge             delete every dead letter\n\n\
             Dead letters live in dlq:v1:<queue without jobs:v1:>, one per --queue and one\n\
             for this node's own stream.\n{}",
            settings_help()
        ),
        "status" => format!(
            "citadel status — one screen for an operator\n\n\
             Usage: citadel status [--json] [--state-dir DIR] [--redis-url URL] [--vllm-url URL] …\n\n\
             Prints the mode 'citadel agent' last recorded in {{state-dir}}/agent-status.json;\n\
             the node (name, device name, version); the credentials, redacted; whether Redis\n\
             and Nexus answer; per stream a worker with these settings reads (the queues,\n\
             the node's own stream, the device config's tag streams) its length, the group's\n\
             lag and pending count, the age of the oldest pending entry and each consumer\n\
             with its pending count and idle time; the dead-letter counts; each engine at its\n\
             configured URL (vLLM GET /v1/models, Ollama GET /api/tags, llama.cpp GET /health,\n\
             extraction GET /health): ready (with the models it lists), not ready (the HTTP\n\
             status and message, e.g. 503 while a model loads) or not answering (why); the\n\
             GPUs (nvidia-smi, at most --gpu-query-timeout); the configured services and\n\
             their containers. Every probe is bounded (an engine: twice\n\
             --engine-connect-timeout; Redis: --redis-timeout). Secrets are never shown.\n\
             --json prints one JSON object with stable field names (README). Always exits 0.\n{}",
            settings_help()
        ),
        "services" => format!(
            "citadel services — the node's service containers (Docker)\n\n\
             Usage: citadel services [list] [NAME] [--json]   every catalog service (or NAME)\n\
             \x20      citadel services start [NAME] [--json]   create / start NAME, or every configured one\n\
             \x20      citadel services stop [NAME] [--json]    docker stop NAME, or all of citadel's\n\
             \x20      citadel services restart [NAME] [--json] stop, then start\n\n\
             Services: vllm (vllm/vllm-openai, port of --vllm-url), ollama (ollama/ollama,\n\
             --ollama-url), llamacpp (ghcr.io/ggml-org/llama.cpp:server[-cuda], --llamacpp-url,\n\
             serves --llamacpp-model), extraction (gliner2-service, --extraction-url). Each\n\
             runs as container citadel-NAME: --network host, engine listening on\n\
             --service-bind, --restart unless-stopped, the models dir at /models, --gpus all\n\
             when nvidia-smi lists a GPU; labels citadel.service and citadel.spec (the hash\n\
             of its settings). Containers without those labels are never touched.\n\n\
             list: configured or not, the container's state, whether the engine answers\n\
             its health URL, the image. start: creates what is missing, recreates what\n\
             changed, starts what stopped (others are left as they are), then waits up to\n\
             --service-ready-timeout for the engines. --json prints one JSON value.\n\
             Exit 0 ok, 1 a service failed or did not get ready, 2 bad input.\n{}",
            settings_help()
        ),
        "init" => format!(
            "citadel init — authorize this node and store its credentials\n\n\
             Usage: citadel init [--auth-url URL] [--json] [--relogin]\n\
             \x20      citadel init --token-file PATH|- [--nexus-url URL] [--redis-url URL]\n\n\
             Asks the auth server (--auth-url) for a device code (RFC 8628), shows the code\n\
             and the URL to open (and a QR code on a terminal), then waits for someone to\n\
             approve it, polling at the server's interval (slower when asked), for at most\n\
             --init-timeout. The credentials it gets (device_api_token, nexus_url, redis_url,\n\
             org_id, …) are merged into the config file (--config; as root\n\
             /etc/citadel/config.json, else ~/.config/citadel/config.json), written\n\
             atomically with mode 0600; the token is never printed or logged. Later\n\
             commands read them from there: the agent sends the token to Nexus.\n\n\
             \x20 --json             progress as JSON lines on stdout: the code, then the outcome\n\
             \x20 --relogin          replace stored credentials (without it, a provisioned node\n\
             \x20                    says so and changes nothing)\n\
             \x20 --token TOKEN      store this token without a browser (visible in ps: prefer\n\
             \x20                    --token-file); with the --nexus-url / --redis-url in effect\n\
             \x20 --token-file PATH  the same, the token read from PATH ('-': stdin)\n\n\
             Exit 0 when stored (or already provisioned), 1 when expired, denied, timed out\n\
             or the server's answers are unusable, 2 on bad input.\n{}",
            settings_help()
        ),
        "service" => format!(
            "citadel service — the agent as an always-on systemd service\n\n\
             Usage: citadel service install [--user NAME] [--up] [--binary PATH] [--root DIR]\n\
             \x20      citadel service status\n\
             \x20      citadel service uninstall [--root DIR]\n\n\
             install writes /etc/systemd/system/citadel.service (Restart=always, ExecStart=\n\
             this binary's 'agent', or 'up' with --up), creates the system user 'citadel'\n\
             unless --user names an existing one (and adds it to the 'docker' group when\n\
             docker-managed services are configured: root-equivalent access), prepares\n\
             /etc/citadel/config.json for that user, then systemctl enable --now. Running it\n\
             again changes nothing. uninstall stops, disables and removes the unit (and the\n\
             user install created); credentials and state stay. status is systemctl status.\n\
             --root DIR writes under DIR instead of / (for tests and images). Needs root.\n{}",
            settings_help()
        ),
        "follow" => format!(
            "citadel follow — print a job's events from its replayable stream\n\n\
             Usage: citadel follow JOB_ID [--from ENTRY_ID]\n\n\
             Reads events:v1:{{JOB_ID}} with XREAD BLOCK after ENTRY_ID [0: from the first\n\
             event], prints chunks as they arrive and the result at the end, exactly as\n\
             'citadel submit --follow'. It may start long after the job did (within the\n\
             stream's lifetime, --events-ttl on the workers); a lost Redis connection is\n\
             opened again and reading goes on after the last entry seen.\n\
             Exit 0 on end, 1 on error or cancelled.\n{}",
            settings_help()
        ),
        "gateway" => format!(
            "citadel gateway — an OpenAI-compatible API over the job fabric\n\n\
             Usage: citadel gateway [--listen ADDR] [--route MODEL=BACKEND[@QUEUE]]…\n\
             \x20                      [--api-key KEY]… [--insecure-no-auth] [flags]\n\n\
             Serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models and\n\
             GET /healthz on --listen [127.0.0.1:8088]. Each completion request becomes an\n\
             llm_inference job on the model's queue (--route; without routes every model goes\n\
             to --default-backend on the first --queue); the answer is built from the job's\n\
             replayable events (events:v1:{{jobId}}): SSE chunks with stream:true, one JSON\n\
             object otherwise. No worker claims it within --gateway-claim-timeout: 503 with\n\
             Retry-After; past --gateway-job-timeout: 504; the client goes away: the job is\n\
             cancelled. With --api-key (repeatable) every request needs\n\
             'Authorization: Bearer KEY'; without keys it listens only on a loopback address\n\
             unless --insecure-no-auth. SIGTERM/SIGINT stop it.\n{}",
            settings_help()
        ),
        "version" => "citadel version — print the version\n".to_string(),
        other => return Err(format!("no help for unknown command '{other}'")),
    };
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Cli, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn flags_override_and_queue_repeats() {
        let cli = parse_args(&[
            "work",
            "--queue",
            "jobs:v1:a",
            "--queue=jobs:v1:b",
            "--claim-idle",
            "2s",
        ])
        .unwrap();
        assert_eq!(cli.command, Command::Work);
        assert_eq!(cli.settings.queues, ["jobs:v1:a", "jobs:v1:b"]);
        assert_eq!(cli.settings.claim_idle, std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_boolean_flag_stands_alone_or_takes_a_value() {
        let cli = parse_args(&["run-job", "--allow-shell", "{}"]).unwrap();
        assert!(cli.settings.allow_shell);
        assert_eq!(
            cli.command,
            Command::RunJob {
                job: Some("{}".into())
            }
        );
        let cli = parse_args(&["work", "--allow-shell=false"]).unwrap();
        assert!(!cli.settings.allow_shell);
        assert!(!parse_args(&["work"]).unwrap().settings.allow_shell);
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        assert!(parse_args(&["work", "--bogus"])
            .unwrap_err()
            .contains("--bogus"));
        assert!(parse_args(&["work", "--concurrency", "x"])
            .unwrap_err()
            .contains("--concurrency"));
        assert!(parse_args(&["fly"])
            .unwrap_err()
            .contains("unknown command"));
        assert!(parse_args(&["submit"]).unwrap_err().contains("--type"));
        assert!(parse_args(&["dlq", "replay"])
            .unwrap_err()
            .contains("--all"));
        assert!(parse_args(&["work", "--redis-url", "nope"])
            .unwrap_err()
            .contains("--redis-url: 'nope' is not a Redis URL"));
    }

    #[test]
    fn submit_goes_to_a_tag_or_a_node_not_both() {
        let cli = parse_args(&["submit", "--type", "echo", "--tag", "t1"]).unwrap();
        assert!(matches!(cli.command, Command::Submit(s) if s.tag.as_deref() == Some("t1")));
        let err =
            parse_args(&["submit", "--type", "echo", "--tag", "t1", "--node", "n"]).unwrap_err();
        assert!(err.contains("--node or --tag"), "{err}");
        assert!(parse_args(&["submit", "--type", "echo", "--tag="]).is_err());
        assert!(
            !parse_args(&["work", "--tag-streams=false"])
                .unwrap()
                .settings
                .tag_streams
        );
        assert!(
            parse_args(&["work", "--allow-ssh-control"])
                .unwrap()
                .settings
                .allow_ssh_control
        );
    }

    #[test]
    fn gateway_flags_repeat_and_follow_takes_a_job_and_an_id() {
        let cli = parse_args(&[
            "gateway",
            "--listen",
            "127.0.0.1:9000",
            "--route",
            "a=vllm",
            "--route=b=ollama@jobs:v1:b",
            "--api-key",
            "sk-12345678",
            "--api-key",
            "sk-87654321",
            "--insecure-no-auth",
        ])
        .unwrap();
        assert_eq!(cli.command, Command::Gateway);
        let s = &cli.settings;
        assert_eq!(s.gateway_listen, "127.0.0.1:9000");
        assert_eq!(s.gateway_routes.len(), 2);
        assert_eq!(s.gateway_routes[1].queue.as_deref(), Some("jobs:v1:b"));
        assert_eq!(s.gateway_api_keys.len(), 2);
        assert!(s.insecure_no_auth);
        assert!(parse_args(&["gateway", "--route", "nonsense"])
            .unwrap_err()
            .contains("--gateway-routes"));
        assert!(parse_args(&["work", "--listen", "127.0.0.1:1"]).is_err());
        assert_eq!(
            parse_args(&["follow", "j-1", "--from", "17-3"])
                .unwrap()
                .command,
            Command::Follow {
                job_id: "j-1".into(),
                from: "17-3".into()
            }
        );
        assert!(matches!(
            parse_args(&["follow", "j-1"]).unwrap().command,
            Command::Follow { from, .. } if from == "0"
        ));
        assert!(parse_args(&["follow"]).unwrap_err().contains("job id"));
    }

    #[test]
    fn every_command_has_help() {
        for topic in [
            "", "work", "agent", "up", "run-job", "submit", "dlq", "status", "services", "version",
            "init", "service", "follow", "gateway",
        ] {
            assert!(help_text(topic).is_ok());
        }
        assert!(
            matches!(parse_args(&["dlq", "--help"]).unwrap().command, Command::Help(t) if t.contains("replay"))
        );
        assert!(parse_args(&["services", "start", "tgi"])
            .unwrap_err()
            .contains("'tgi' is not a service"));
        assert!(matches!(
            parse_args(&["services", "ollama"]).unwrap().command,
            Command::Services(Services { action: ServicesAction::List, name: Some(n), .. }) if n == "ollama"
        ));
        assert!(parse_args(&["services", "frobnicate"])
            .unwrap_err()
            .contains("not list, start, stop or restart"));
        assert_eq!(
            parse_args(&["services", "--json"]).unwrap().command,
            Command::Services(Services {
                action: ServicesAction::List,
                name: None,
                json: true
            })
        );
        assert_eq!(
            parse_args(&["status", "--json"]).unwrap().command,
            Command::Status { json: true }
        );
        assert_eq!(
            parse_args(&["status"]).unwrap().command,
            Command::Status { json: false }
        );
        assert!(parse_args(&["dlq", "list", "--json"]).is_err());
        assert!(matches!(
            parse_args(&["services", "restart", "llamacpp"]).unwrap().command,
            Command::Services(Services { action: ServicesAction::Restart, name: Some(n), json: false }) if n == "llamacpp"
        ));
        assert!(matches!(
            parse_args(&["dlq", "list", "--count", "5"])
                .unwrap()
                .command,
            Command::Dlq(Dlq::List { count: 5 })
        ));
    }
}
