//! `openclaw-admin flash`: installs the agent on a device over SSH.
//!
//! Uses the system `ssh` and `scp` with `-o BatchMode=yes`, keep-alives
//! (`ServerAliveInterval=5`, `ServerAliveCountMax=3`) and a time limit per
//! step (`--step-timeout-secs`, default 300: the command is killed after it).
//! Host keys: with `--known-hosts FILE` the device's key must already be in
//! FILE (`StrictHostKeyChecking=yes`: a pinned key, e.g. from
//! `ssh-keyscan` checked out of band); without it ssh's own known_hosts is
//! used with `StrictHostKeyChecking=accept-new` (a new host's key is
//! accepted silently on first contact, a changed key is refused). On the
//! device, under the prefix (default `/opt/openclaw`):
//!
//! ```text
//! PREFIX/releases/ID/bin/openclaw-agent     the binary
//! PREFIX/releases/ID/agent.toml             broker, board, data dir (+ --agent-config)
//! PREFIX/releases/ID/board.toml             the profile, when it is a file (not built in)
//! PREFIX/releases/ID/models/...             the board's models: manifests and files
//! PREFIX/releases/ID/openclaw-agent.service the unit, as installed
//! PREFIX/current -> releases/ID             what the unit runs
//! PREFIX/data/                              the agent's state, kept across releases
//! UNIT_DIR/openclaw-agent.service           ExecStart=PREFIX/current/bin/openclaw-agent ...
//! ```
//!
//! Steps, each named in errors: `prepare` (local files, ELF architecture),
//! `connect` (device architecture, host name, current release), `stage`
//! (upload to `releases/.staging-ID`, then rename to `releases/ID`),
//! `verify` (the uploaded agent checks its own configuration, board and
//! models with `--print-config` on the device), `unit` (install the unit by
//! rename), `swap` (`current` switched by rename), `restart` (`systemctl
//! daemon-reload`, `enable`, `restart`), `heartbeat` (the server sees the
//! device online with a heartbeat newer than the newest it had when
//! `systemctl restart` returned, i.e. from the new agent), `prune` (keeps
//! the new and the previous release).
//!
//! Until `swap`, the running install is not touched: a failure there removes
//! the uploaded release and leaves the device as it was. A failure at
//! `restart` or `heartbeat` rolls back: `current` back to the previous
//! release, the previous unit file back, and a restart, itself checked by a
//! new heartbeat from the device. The local staging directory has a random
//! name and mode 0700 (another local user cannot swap the binary uploaded
//! and run as root on the device).

use super::build::{elf_machine, shell_quote, target_machine};
use super::Client;
use crate::boards::{Board, BUILTIN};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Name of the systemd unit.
pub const UNIT: &str = "openclaw-agent.service";

/// A step of [`flash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare,
    Connect,
    Stage,
    Verify,
    Unit,
    Swap,
    Restart,
    Heartbeat,
    Prune,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::Connect => "connect",
            Step::Stage => "stage",
            Step::Verify => "verify",
            Step::Unit => "unit",
            Step::Swap => "swap",
            Step::Restart => "restart",
            Step::Heartbeat => "heartbeat",
            Step::Prune => "prune",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Step::Prepare => "check the local binary, board profile and models",
            Step::Connect => "reach the device over SSH",
            Step::Stage => "upload the release to the device",
            Step::Verify => "check the uploaded agent's configuration on the device",
            Step::Unit => "install the systemd unit",
            Step::Swap => "switch `current` to the new release",
            Step::Restart => "restart the agent with systemctl",
            Step::Heartbeat => "wait for the device's heartbeat at the server",
            Step::Prune => "remove old releases",
        }
    }
}

/// A failed flash: the step, why, and what state the device was left in.
#[derive(Debug)]
pub struct FlashError {
    pub step: Step,
    pub message: String,
    /// What happened to the device's previous install.
    pub outcome: String,
}

impl fmt::Display for FlashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step `{}` failed ({}): {}\n{}",
            self.step.name(),
            self.step.what(),
            self.message,
            self.outcome
        )
    }
}

impl std::error::Error for FlashError {}

/// Options of [`flash`].
#[derive(Debug, Clone)]
pub struct FlashOptions {
    /// Board profile name or file.
    pub board: String,
    /// `USER@ADDR` (or `ADDR`).
    pub host: String,
    pub port: u16,
    /// SSH private key (`ssh -i`).
    pub identity: Option<PathBuf>,
    /// `UserKnownHostsFile` for ssh and scp (default: ssh's own).
    pub known_hosts: Option<PathBuf>,
    /// Broker the agent connects to, `mqtt://HOST:PORT`.
    pub broker: String,
    /// Server HTTP API, for the heartbeat check.
    pub http: String,
    /// The agent binary to install.
    pub binary: PathBuf,
    /// Local model directory (manifests + files), normally `models/`.
    pub models_dir: PathBuf,
    /// Extra agent configuration (TOML) merged under the generated keys.
    pub agent_config: Option<PathBuf>,
    /// A device's credentials as `openclaw-admin init --device ID` made
    /// them (`agents/ID/`: `agent.toml` with its broker password and
    /// `[mqtt.tls]`, the CA, its client certificate and key): installed
    /// under the release (`credentials/`, the key 0600), the config's
    /// `[mqtt] password` and `[mqtt.tls]` pointing there.
    pub credentials: Option<PathBuf>,
    /// API token for the server's HTTP API (the heartbeat check).
    pub token: Option<String>,
    /// Release signing keys the agent trusts for over-the-air updates
    /// (`[ota] keys`: the lines of `release keygen`'s `.pub` files).
    pub ota_keys: Vec<String>,
    /// Device id; default: the device's host name.
    pub id: Option<String>,
    /// Install prefix on the device.
    pub prefix: String,
    /// Where the unit file goes on the device.
    pub unit_dir: String,
    /// systemctl on the device.
    pub systemctl: String,
    /// How long to wait for the heartbeat.
    pub wait: Duration,
    /// Time limit of each ssh or scp command (the remote `--print-config`
    /// check runs under the device's `timeout` too).
    pub step_timeout: Duration,
    /// Print the commands instead of running them.
    pub dry_run: bool,
}

impl FlashOptions {
    /// Options with the defaults of `openclaw-admin flash`.
    pub fn new(board: &str, host: &str, broker: &str, binary: &Path) -> FlashOptions {
        FlashOptions {
            board: board.into(),
            host: host.into(),
            port: 22,
            identity: None,
            known_hosts: None,
            broker: broker.into(),
            http: "http://127.0.0.1:8080".into(),
            binary: binary.into(),
            models_dir: "models".into(),
            agent_config: None,
            credentials: None,
            token: None,
            ota_keys: Vec::new(),
            id: None,
            prefix: "/opt/openclaw".into(),
            unit_dir: "/etc/systemd/system".into(),
            systemctl: "systemctl".into(),
            wait: Duration::from_secs(60),
            step_timeout: Duration::from_secs(300),
            dry_run: false,
        }
    }
}

/// A credentials bundle read for the release.
struct Credentials {
    id: Option<String>,
    password: Option<String>,
    /// `[mqtt.tls]` with the paths where the release puts the files.
    tls: Option<toml::Table>,
    /// (name under `credentials/`, bytes, mode).
    files: Vec<(String, Vec<u8>, u32)>,
}

/// Reads `dir/agent.toml` of a bundle (`openclaw-admin init --device`):
/// its id, broker password and TLS files, which must be in `dir`.
fn credentials(dir: &Path, rel_dir: &str, broker: &str) -> Result<Credentials, String> {
    let f = dir.join("agent.toml");
    let text =
        std::fs::read_to_string(&f).map_err(|e| format!("--credentials: {}: {e}", f.display()))?;
    let t: toml::Table = text
        .parse()
        .map_err(|e| format!("--credentials: {}: {e}", f.display()))?;
    let id = match t.get("id") {
        None => None,
        Some(toml::Value::String(id)) if crate::protocol::topics::valid_device_id(id) => {
            Some(id.clone())
        }
        Some(v) => {
            return Err(format!(
                "--credentials: {}: `id` = {v} is not a valid device id \
                 (1-64 of letters, digits, - _ .)",
                f.display()
            ))
        }
    };
    let mqtt = t.get("mqtt").and_then(|m| m.as_table());
    let password = mqtt
        .and_then(|m| m.get("password"))
        .and_then(|v| v.as_str())
        .map(String::from);
    let mut files = Vec::new();
    let tls = match mqtt.and_then(|m| m.get("tls")).and_then(|v| v.as_table()) {
        None => None,
        Some(tls) => {
            if !crate::config::broker_uses_tls(broker) {
                return Err(format!(
                    "--credentials {} holds TLS files, but the broker `{broker}` is not mqtts:// \
                     (give --server mqtts://HOST:PORT)",
                    dir.display()
                ));
            }
            let mut out = toml::Table::new();
            for key in ["ca_file", "client_cert_file", "client_key_file"] {
                let Some(p) = tls.get(key).and_then(|v| v.as_str()) else {
                    continue;
                };
                // The file by its name, from the bundle itself: the paths
                // in it are where init meant it to be, not necessarily here.
                let name = Path::new(p)
                    .file_name()
                    .and_then(|n| n.to_str())
                    // Plain names only, as the release's other paths: no
                    // spaces, quotes or newlines on their way to scp and
                    // the device.
                    .filter(|n| {
                        !n.is_empty()
                            && !n.starts_with('.')
                            && n.chars()
                                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
                    })
                    .ok_or_else(|| {
                        format!(
                            "--credentials: mqtt.tls.{key} = {p:?} names no file of \
                             letters, digits and - _ . +"
                        )
                    })?
                    .to_string();
                let src = dir.join(&name);
                let data = std::fs::read(&src).map_err(|e| {
                    format!("--credentials: mqtt.tls.{key}: {}: {e}", src.display())
                })?;
                let mode = if key == "client_key_file" {
                    0o600
                } else {
                    0o644
                };
                out.insert(key.into(), format!("{rel_dir}/credentials/{name}").into());
                files.push((name, data, mode));
            }
            Some(out)
        }
    };
    if password.is_none() && tls.is_none() {
        return Err(format!(
            "--credentials: {} has neither [mqtt] password nor [mqtt.tls]",
            f.display()
        ));
    }
    Ok(Credentials {
        id,
        password,
        tls,
        files,
    })
}

/// What a successful flash did.
#[derive(Debug, Clone)]
pub struct FlashReport {
    pub release: String,
    pub previous: Option<String>,
    pub device_id: String,
    /// Files of the release, relative to `PREFIX/releases/ID`.
    pub files: Vec<String>,
    /// Every command run (or, dry run, that would run), shell-quoted.
    pub commands: Vec<String>,
    /// From the restart to the first new heartbeat.
    pub heartbeat_after: Option<Duration>,
    pub warnings: Vec<String>,
}

/// The systemd unit for an install under `prefix`.
///
/// `Type=notify`: the agent says `READY=1` once its journal is replayed and
/// its plugins are built, and pings `WATCHDOG=1` from its main loop at half
/// `WatchdogSec` (src/agent/sd_notify.rs); a loop that stops turning is
/// killed and restarted, like one that exited with an error, at most 10
/// times in 5 minutes.
pub fn unit_text(prefix: &str, board: &str) -> String {
    format!(
        "# Installed by openclaw-admin flash.\n\
         [Unit]\n\
         Description=OpenClaw edge agent (board {board})\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         StartLimitIntervalSec=300\n\
         StartLimitBurst=10\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         # Over-the-air updates: the last confirmed release counts the starts of a\n\
         # new one on trial and switches back past its limits (a binary that\n\
         # cannot start cannot stop this). `-`: no `good` release yet is no error.\n\
         ExecStartPre=-{prefix}/good/bin/openclaw-agent --ota-guard {prefix}\n\
         ExecStart={prefix}/current/bin/openclaw-agent --config {prefix}/current/agent.toml\n\
         WorkingDirectory={prefix}/data\n\
         Environment=RUST_LOG=info\n\
         # Journal replay of a large inbox and model loading happen before READY=1.\n\
         TimeoutStartSec=120\n\
         WatchdogSec=30\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec=20\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

fn valid_remote_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./+".contains(c))
        && !p.split('/').any(|s| s == "..")
}

/// The `path` key of a model manifest.
fn manifest_path(text: &str, file: &Path) -> Result<String, String> {
    let t: toml::Table = text
        .parse()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    match t.get("path") {
        Some(toml::Value::String(p)) if !p.starts_with('/') && !p.contains("..") => Ok(p.clone()),
        _ => Err(format!(
            "{}: no relative `path` of the model file",
            file.display()
        )),
    }
}

struct Runner<'a> {
    dry_run: bool,
    commands: Vec<String>,
    log: &'a mut dyn FnMut(&str),
    limit: Duration,
}

/// Runs `argv` to completion or until `limit`, then kills it.
fn run_limited(argv: &[String], limit: Duration) -> std::io::Result<Option<std::process::Output>> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    Ok(status.map(|status| std::process::Output {
        status,
        stdout,
        stderr,
    }))
}

impl Runner<'_> {
    fn run(&mut self, step: Step, argv: &[String]) -> Result<String, (Step, String)> {
        let line = argv
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        self.commands.push(line.clone());
        if self.dry_run {
            (self.log)(&format!("[{}] {line}", step.name()));
            return Ok(String::new());
        }
        (self.log)(&format!("[{}] {}", step.name(), argv[0]));
        let out = run_limited(argv, self.limit)
            .map_err(|e| (step, format!("cannot run {}: {e}", argv[0])))?
            .ok_or_else(|| {
                (
                    step,
                    format!(
                        "`{}` did not finish within {} s (--step-timeout-secs) and was killed",
                        argv[0],
                        self.limit.as_secs()
                    ),
                )
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let so = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let detail = [err, so]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            return Err((
                step,
                format!(
                    "`{}` exited with {}{}",
                    argv[0],
                    out.status,
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(":\n{detail}")
                    }
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A private local directory: a random name, mode 0700, created only if
/// nothing is there (never reused); removed on drop.
pub fn private_temp_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// `USER@HOST` or `HOST` that ssh reads as a host, not as an option.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && !h.starts_with('-')
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._-:[]%".contains(c))
}

/// The release id `current` points to, whether the link is relative
/// (`releases/ID`, as flash writes it) or absolute (`PREFIX/releases/ID`).
fn release_of_link(link: &str) -> Option<String> {
    let id = link.trim_end_matches('/').rsplit('/').next()?;
    (!id.is_empty() && id != "." && id != "..").then(|| id.to_string())
}

struct Ctx<'o> {
    o: &'o FlashOptions,
    ssh_opts: Vec<String>,
}

impl Ctx<'_> {
    fn common_opts(&self) -> Vec<String> {
        self.ssh_opts.clone()
    }

    /// `ssh ... HOST -- sh -c SCRIPT`
    fn ssh(&self, script: &str) -> Vec<String> {
        let mut a = vec!["ssh".to_string()];
        a.extend(self.common_opts());
        a.push("-p".into());
        a.push(self.o.port.to_string());
        a.push(self.o.host.clone());
        a.push("--".into());
        a.push(format!("sh -c {}", shell_quote(script)));
        a
    }

    fn scp(&self, local: &Path, remote: &str) -> Vec<String> {
        let mut a = vec!["scp".to_string(), "-q".into(), "-r".into(), "-p".into()];
        a.extend(self.common_opts());
        a.push("-P".into());
        a.push(self.o.port.to_string());
        a.push(local.display().to_string());
        a.push(format!("{}:{remote}", self.o.host));
        a
    }
}

/// Installs the agent on the device; `log` receives progress lines.
pub fn flash(o: &FlashOptions, log: &mut dyn FnMut(&str)) -> Result<FlashReport, FlashError> {
    let mut runner = Runner {
        dry_run: o.dry_run,
        commands: Vec::new(),
        log,
        limit: o.step_timeout,
    };
    let mut warnings = Vec::new();
    let fail = |step: Step, message: String, outcome: &str| FlashError {
        step,
        message,
        outcome: outcome.to_string(),
    };
    const UNTOUCHED: &str = "Nothing on the device was changed.";

    // --- prepare -----------------------------------------------------------
    let p = Step::Prepare;
    let board = Board::load(&o.board).map_err(|e| fail(p, e.to_string(), UNTOUCHED))?;
    // The name goes into the unit's Description= and the agent's config.
    if !crate::protocol::topics::valid_device_id(&board.name) {
        return Err(fail(
            p,
            format!(
                "board name {:?} is not valid (1-64 of letters, digits, - _ .)",
                board.name
            ),
            UNTOUCHED,
        ));
    }
    if !valid_host(&o.host) {
        return Err(fail(
            p,
            format!(
                "--host {:?}: USER@HOST or HOST of letters, digits and @ . _ - : [ ] %, not starting with `-`",
                o.host
            ),
            UNTOUCHED,
        ));
    }
    let builtin = BUILTIN.iter().any(|(n, _)| *n == o.board);
    if !valid_remote_path(&o.prefix) || !valid_remote_path(&o.unit_dir) {
        return Err(fail(
            p,
            format!(
                "--prefix {} / --unit-dir {}: absolute paths of letters, digits and - _ . / + only",
                o.prefix, o.unit_dir
            ),
            UNTOUCHED,
        ));
    }
    crate::config::parse_broker_url(&o.broker)
        .map_err(|m| fail(p, format!("broker {}: {m}", o.broker), UNTOUCHED))?;
    if let Some(id) = &o.id {
        if !crate::protocol::topics::valid_device_id(id) {
            return Err(fail(
                p,
                format!("`{id}` is not a valid device id (1-64 of letters, digits, - _ .)"),
                UNTOUCHED,
            ));
        }
    }
    let bin = std::fs::read(&o.binary).map_err(|e| {
        fail(
            p,
            format!(
                "agent binary {}: {e} (build it with `openclaw-admin build --board {} --release` or pass --binary)",
                o.binary.display(),
                o.board
            ),
            UNTOUCHED,
        )
    })?;
    let want = target_machine(&board.target);
    match elf_machine(&bin) {
        Some(m) if m == want => {}
        Some(m) => {
            return Err(fail(
                p,
                format!(
                    "{} is an {m} binary but board {} needs {want} ({})",
                    o.binary.display(),
                    board.name,
                    board.target
                ),
                UNTOUCHED,
            ))
        }
        None => {
            return Err(fail(
                p,
                format!("{} is not an ELF executable", o.binary.display()),
                UNTOUCHED,
            ))
        }
    }
    let extra: toml::Table = match &o.agent_config {
        None => toml::Table::new(),
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| e.to_string())
            .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
            .map_err(|e| fail(p, format!("{}: {e}", f.display()), UNTOUCHED))?,
    };

    let release = format!("{}", crate::now_ms());
    let pre = o.prefix.trim_end_matches('/').to_string();
    let rel_dir = format!("{pre}/releases/{release}");
    let staging = format!("{pre}/releases/.staging-{release}");

    // The release tree, built locally and uploaded in one scp.
    let tmp = private_temp_dir("openclaw-flash-").map_err(|e| {
        fail(
            p,
            format!("cannot create a private temporary directory: {e}"),
            UNTOUCHED,
        )
    })?;
    let local = tmp.path().join(&release);
    let mut files = Vec::new();
    let mut put = |rel: &str, data: &[u8], mode: u32| -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let path = local.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::write(&path, data).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
        files.push(rel.to_string());
        Ok(())
    };
    let prep = |e: String| fail(Step::Prepare, e, UNTOUCHED);
    put("bin/openclaw-agent", &bin, 0o755).map_err(prep)?;
    drop(bin);
    for m in &board.models {
        let mf = o.models_dir.join(format!("{m}.toml"));
        let text = std::fs::read_to_string(&mf).map_err(|e| {
            prep(format!(
                "board {} lists model `{m}`: {}: {e}",
                board.name,
                mf.display()
            ))
        })?;
        let rel = manifest_path(&text, &mf).map_err(prep)?;
        let data = std::fs::read(o.models_dir.join(&rel)).map_err(|e| {
            prep(format!(
                "model `{m}`: {}: {e} (`openclaw-admin models fetch` fetches the model files)",
                o.models_dir.join(&rel).display()
            ))
        })?;
        put(&format!("models/{m}.toml"), text.as_bytes(), 0o644).map_err(prep)?;
        put(&format!("models/{rel}"), &data, 0o644).map_err(prep)?;
    }
    let board_ref = if builtin {
        board.name.clone()
    } else {
        let text = std::fs::read_to_string(&o.board).map_err(|e| prep(e.to_string()))?;
        put("board.toml", text.as_bytes(), 0o644).map_err(prep)?;
        format!("{rel_dir}/board.toml")
    };
    let mut cfg = extra;
    let creds = match &o.credentials {
        Some(dir) => Some(credentials(dir, &rel_dir, &o.broker).map_err(prep)?),
        None => None,
    };
    if let Some(c) = &creds {
        if c.password.is_some() && c.tls.is_none() && !crate::config::broker_uses_tls(&o.broker) {
            warnings.push(format!(
                "the device's broker password goes over plain MQTT to {} (use mqtts:// and \
                 [mqtt.listen_tls])",
                o.broker
            ));
        }
        for (name, data, mode) in &c.files {
            put(&format!("credentials/{name}"), data, *mode).map_err(prep)?;
        }
    }
    // The bundle's password and certificate are its device's: the agent
    // logs in under its id, so another id could never log in (the flash
    // would fail only at `heartbeat`, after a restart and a rollback).
    if let (Some(want), Some(c)) = (&o.id, &creds) {
        if let Some(have) = c.id.as_ref().filter(|have| *have != want) {
            return Err(prep(format!(
                "--id {want} but --credentials {} is device {have}'s (its password and \
                 certificate log in only as {have}): give --id {have}, or the bundle of {want}",
                o.credentials.as_deref().unwrap_or(Path::new("")).display()
            )));
        }
    }
    let id =
        o.id.clone()
            .or_else(|| creds.as_ref().and_then(|c| c.id.clone()));
    if let Some(id) = &id {
        cfg.insert("id".into(), id.clone().into());
    }
    // The id the agent will run as (--id, the bundle's, or --agent-config's),
    // for the heartbeat check; none: the device's host name.
    let config_id = cfg.get("id").and_then(|v| v.as_str()).map(String::from);
    cfg.insert("board".into(), board_ref.into());
    cfg.insert("data_dir".into(), format!("{pre}/data").into());
    // Over-the-air updates install into this same layout.
    let mut ota = toml::Table::new();
    ota.insert("prefix".into(), pre.clone().into());
    if !o.ota_keys.is_empty() {
        for k in &o.ota_keys {
            crate::release::parse_public_key(k).map_err(|e| prep(format!("--ota-key: {e}")))?;
        }
        ota.insert("keys".into(), o.ota_keys.clone().into());
    }
    match cfg.get_mut("ota").and_then(|v| v.as_table_mut()) {
        Some(t) => t.extend(ota),
        None => {
            cfg.insert("ota".into(), toml::Value::Table(ota));
        }
    }
    let mqtt = cfg
        .entry("mqtt")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    match mqtt.as_table_mut() {
        Some(t) => {
            t.insert("broker".into(), o.broker.clone().into());
            if let Some(c) = &creds {
                if let Some(p) = &c.password {
                    t.insert("password".into(), p.clone().into());
                }
                if let Some(tls) = &c.tls {
                    t.insert("tls".into(), toml::Value::Table(tls.clone()));
                }
            }
        }
        None => return Err(prep("--agent-config: `mqtt` must be a table".into())),
    }
    if !board.models.is_empty() {
        let plugins = cfg
            .entry("plugins")
            .or_insert_with(|| toml::Value::Table(Default::default()));
        let Some(plugins) = plugins.as_table_mut() else {
            return Err(prep("--agent-config: `plugins` must be a table".into()));
        };
        let infer = plugins
            .entry("infer")
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(t) = infer.as_table_mut() {
            t.insert("models_dir".into(), format!("{rel_dir}/models").into());
        }
    }
    let agent_toml = format!(
        "# Written by openclaw-admin flash: release {release}, board {}.\n# Merged over the agent's built-in defaults (openclaw-agent --print-config).\n{}",
        board.name,
        toml::to_string(&cfg).map_err(|e| prep(e.to_string()))?
    );
    // With a password in it, for its owner only.
    let mode = if creds.is_some() { 0o600 } else { 0o644 };
    put("agent.toml", agent_toml.as_bytes(), mode).map_err(prep)?;
    let unit = unit_text(&pre, &board.name);
    put(UNIT, unit.as_bytes(), 0o644).map_err(prep)?;

    let strict = if o.known_hosts.is_some() {
        "StrictHostKeyChecking=yes"
    } else {
        "StrictHostKeyChecking=accept-new"
    };
    let mut ssh_opts: Vec<String> = [
        "-o",
        "BatchMode=yes",
        "-o",
        strict,
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(k) = &o.known_hosts {
        ssh_opts.push("-o".into());
        ssh_opts.push(format!("UserKnownHostsFile={}", k.display()));
    }
    if let Some(i) = &o.identity {
        ssh_opts.push("-i".into());
        ssh_opts.push(i.display().to_string());
        ssh_opts.push("-o".into());
        ssh_opts.push("IdentitiesOnly=yes".into());
    }
    let ctx = Ctx { o, ssh_opts };
    let q = |s: &str| shell_quote(s);
    let sc = q(&o.systemctl);
    let unit_path = format!("{}/{UNIT}", o.unit_dir.trim_end_matches('/'));

    // --- connect -----------------------------------------------------------
    let out = runner
        .run(
            Step::Connect,
            &ctx.ssh(&format!(
                "set -e; uname -m; hostname; \
                 if [ -L {cur} ]; then readlink {cur}; else echo -; fi; \
                 command -v {sc} >/dev/null || {{ echo {msg} >&2; exit 3; }}",
                cur = q(&format!("{pre}/current")),
                msg = q(&format!("{} not found on the device", o.systemctl)),
            )),
        )
        .map_err(|(s, m)| fail(s, m, UNTOUCHED))?;
    let (device_id, previous) = if o.dry_run {
        (
            config_id
                .clone()
                .unwrap_or_else(|| "<device host name>".into()),
            None,
        )
    } else {
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        if lines.len() < 3 {
            return Err(fail(
                Step::Connect,
                format!("unexpected answer from the device: {out:?}"),
                UNTOUCHED,
            ));
        }
        let machine = match lines[0] {
            "arm64" => "aarch64",
            m if m.starts_with("armv") => "arm",
            m => m,
        };
        if machine != want {
            return Err(fail(
                Step::Connect,
                format!(
                    "the device is {} but board {} is {want} ({})",
                    lines[0], board.name, board.target
                ),
                UNTOUCHED,
            ));
        }
        let id = config_id.clone().unwrap_or_else(|| lines[1].to_string());
        let prev = match lines[2] {
            "-" => None,
            l => release_of_link(l),
        };
        (id, prev)
    };

    // --- stage -------------------------------------------------------------
    let cleanup = format!("rm -rf {} {}", q(&staging), q(&rel_dir));
    let undo_stage = |runner: &mut Runner, step: Step, msg: String| -> FlashError {
        let cleaned = runner.run(step, &ctx.ssh(&cleanup)).is_ok();
        let outcome = if cleaned {
            "The running install was not touched and the upload was removed.".to_string()
        } else {
            format!("The running install was not touched; remove {staging} and {rel_dir} by hand.")
        };
        fail(step, msg, &outcome)
    };
    runner
        .run(
            Step::Stage,
            &ctx.ssh(&format!(
                "set -e; mkdir -p {rels} {data}; rm -rf {st}",
                rels = q(&format!("{pre}/releases")),
                data = q(&format!("{pre}/data")),
                st = q(&staging)
            )),
        )
        .map_err(|(s, m)| fail(s, m, UNTOUCHED))?;
    if let Err((s, m)) = runner.run(Step::Stage, &ctx.scp(&local, &staging)) {
        return Err(undo_stage(&mut runner, s, m));
    }
    if let Err((s, m)) = runner.run(
        Step::Stage,
        &ctx.ssh(&format!(
            "set -e; chmod 755 {st}/bin/openclaw-agent; mv {st} {rel}",
            st = q(&staging),
            rel = q(&rel_dir)
        )),
    ) {
        return Err(undo_stage(&mut runner, s, m));
    }

    // --- verify ------------------------------------------------------------
    // Under the device's `timeout` when it has one, so a binary that hangs
    // does not outlive the step on the device either.
    let verify = format!(
        "{rel}/bin/openclaw-agent --config {rel}/agent.toml --print-config >/dev/null",
        rel = q(&rel_dir)
    );
    let secs = o.step_timeout.as_secs().max(1);
    if let Err((s, m)) = runner.run(
        Step::Verify,
        &ctx.ssh(&format!(
            "if command -v timeout >/dev/null; then timeout -k 5 {secs} {verify}; r=$?; \
             if [ $r = 124 ] || [ $r = 137 ]; then echo \"timed out after {secs} s on the device\" >&2; fi; exit $r; \
             else {verify}; fi"
        )),
    ) {
        return Err(undo_stage(&mut runner, s, m));
    }

    // --- unit --------------------------------------------------------------
    // The previous unit is kept in the new release, for a rollback.
    let saved_unit = format!("{rel_dir}/.previous-{UNIT}");
    if let Err((s, m)) = runner.run(
        Step::Unit,
        &ctx.ssh(&format!(
            "set -e; mkdir -p {ud}; if [ -f {u} ]; then cp -p {u} {saved}; fi; \
             cp {rel}/{UNIT} {ud}/.{UNIT}.new; mv -f {ud}/.{UNIT}.new {u}",
            ud = q(&o.unit_dir),
            u = q(&unit_path),
            saved = q(&saved_unit),
            rel = q(&rel_dir)
        )),
    ) {
        return Err(undo_stage(&mut runner, s, m));
    }
    let restore_unit = format!(
        "if [ -f {saved} ]; then cp -p {saved} {ud}/.{UNIT}.new && mv -f {ud}/.{UNIT}.new {u}; else rm -f {u}; fi",
        saved = q(&saved_unit),
        ud = q(&o.unit_dir),
        u = q(&unit_path)
    );

    // --- swap --------------------------------------------------------------
    let swap_to = |target: &str| {
        format!(
            "set -e; cd {pre}; ln -sfn {t} .current.new; mv -T .current.new current",
            pre = q(&pre),
            t = q(target)
        )
    };
    if let Err((s, m)) = runner.run(
        Step::Swap,
        &ctx.ssh(&swap_to(&format!("releases/{release}"))),
    ) {
        let restored = runner.run(s, &ctx.ssh(&restore_unit)).is_ok();
        let cleaned = runner.run(s, &ctx.ssh(&cleanup)).is_ok();
        return Err(fail(
            s,
            m,
            &format!(
                "`current` was not switched; the previous unit file was {}restored and the upload {}removed.",
                if restored { "" } else { "NOT " },
                if cleaned { "" } else { "NOT " }
            ),
        ));
    }

    // --- restart and heartbeat ---------------------------------------------
    let client = Client::new(&o.http).with_token(o.token.clone());
    let baseline = |client: &Client| -> u64 {
        client
            .devices()
            .ok()
            .and_then(|d| d.into_iter().find(|d| d.id == device_id))
            .map(|d| d.last_heartbeat_ms)
            .unwrap_or(0)
    };
    let restart = format!("{sc} daemon-reload && {sc} enable {UNIT} && {sc} restart {UNIT}");
    let restarted_at = Instant::now();
    // Polls the server until the device is online with a heartbeat newer
    // than `before`, for up to `o.wait`.
    let await_heartbeat = |client: &Client, before: u64| -> Result<(), String> {
        let start = Instant::now();
        loop {
            let last_err = match client.devices() {
                Ok(d) => match d.iter().find(|d| d.id == device_id) {
                    Some(d) if d.online && d.last_heartbeat_ms > before => return Ok(()),
                    Some(d) => format!(
                        "device {device_id} is {}, last heartbeat {} ms (before restart: {before})",
                        if d.online { "online" } else { "offline" },
                        d.last_heartbeat_ms
                    ),
                    None => format!("the server does not know device {device_id}"),
                },
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= o.wait {
                return Err(format!(
                    "no heartbeat from {device_id} at {} within {} s: {last_err}",
                    o.http,
                    o.wait.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let rollback = |runner: &mut Runner, step: Step, message: String| -> FlashError {
        let outcome = match &previous {
            Some(prev) => {
                let script = format!(
                    "{}; {restore_unit}; {sc} daemon-reload && {sc} restart {UNIT}",
                    swap_to(&format!("releases/{prev}"))
                );
                match runner.run(step, &ctx.ssh(&script)) {
                    Ok(_) if runner.dry_run => format!(
                        "Rolled back: `current` points to the previous release {prev} again, its unit file is back and it was restarted."
                    ),
                    Ok(_) => {
                        // The rollback counts once the previous agent is heard.
                        let checked = await_heartbeat(&client, baseline(&client));
                        match checked {
                            Ok(()) => format!(
                                "Rolled back: `current` points to the previous release {prev} again, its unit file is back and it was restarted; its heartbeat arrived (device {device_id} online). The failed release stays in {rel_dir}."
                            ),
                            Err(e) => format!(
                                "Rolled back: `current` points to the previous release {prev} again, its unit file is back and it was restarted, BUT the rollback is unconfirmed: {e}. The failed release stays in {rel_dir}."
                            ),
                        }
                    }
                    Err((_, m)) => format!(
                        "Rolling back to the previous release {prev} FAILED too: {m}"
                    ),
                }
            }
            None => format!(
                "There was no previous install to roll back to; the new release stays installed in {rel_dir}."
            ),
        };
        fail(step, message, &outcome)
    };
    if let Err((s, m)) = runner.run(Step::Restart, &ctx.ssh(&restart)) {
        return Err(rollback(&mut runner, s, m));
    }
    // Taken after `systemctl restart` returned, when the old agent has
    // stopped: any heartbeat newer than this comes from the new one.
    let before = if o.dry_run { 0 } else { baseline(&client) };
    let mut heartbeat_after = None;
    if o.dry_run {
        (runner.log)(&format!(
            "[heartbeat] would poll {}/v1/devices until {device_id} is online with a new heartbeat (up to {} s)",
            o.http.trim_end_matches('/'),
            o.wait.as_secs()
        ));
    } else {
        (runner.log)(&format!(
            "[heartbeat] waiting for {device_id} at {}",
            o.http
        ));
        match await_heartbeat(&client, before) {
            Ok(()) => heartbeat_after = Some(restarted_at.elapsed()),
            Err(m) => return Err(rollback(&mut runner, Step::Heartbeat, m)),
        }
    }

    // --- prune: keep the new and the previous release ----------------------
    let keep = previous.clone().unwrap_or_default();
    let prune = format!(
        "cd {rels} && for d in * .staging-*; do [ -e \"$d\" ] || continue; case \"$d\" in {r}|{k}) ;; *) rm -rf -- \"$d\" ;; esac; done",
        rels = q(&format!("{pre}/releases")),
        r = q(&release),
        k = q(if keep.is_empty() { &release } else { &keep })
    );
    if let Err((_, m)) = runner.run(Step::Prune, &ctx.ssh(&prune)) {
        warnings.push(format!("could not remove old releases: {m}"));
    }

    files.sort();
    Ok(FlashReport {
        release,
        previous,
        device_id,
        files,
        commands: runner.commands,
        heartbeat_after,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_restarts_and_arms_the_watchdog() {
        let u = unit_text("/opt/openclaw", "rpi4");
        assert!(u.contains(
            "ExecStart=/opt/openclaw/current/bin/openclaw-agent --config /opt/openclaw/current/agent.toml\n"
        ));
        assert!(u.contains("Restart=on-failure\n"));
        assert!(u.contains("StartLimitBurst=10\n"));
        assert!(u.contains("\nType=notify\nNotifyAccess=main\n"));
        assert!(u.contains("\nWatchdogSec=30\n"));
    }

    #[test]
    fn hosts_are_not_options_and_links_name_their_release() {
        assert!(valid_host("pi@192.0.2.1") && valid_host("board-1.local"));
        assert!(valid_host("pi@[fe80::1%eth0]"));
        assert!(!valid_host("-oProxyCommand=reboot"));
        assert!(!valid_host("pi@host -oX=y") && !valid_host(""));
        assert_eq!(release_of_link("releases/123").as_deref(), Some("123"));
        assert_eq!(
            release_of_link("/opt/openclaw/releases/123/").as_deref(),
            Some("123")
        );
        assert_eq!(release_of_link("/"), None);
    }

    #[test]
    fn staging_dirs_are_private_and_fresh() {
        use std::os::unix::fs::PermissionsExt;
        let a = private_temp_dir("openclaw-flash-").unwrap();
        let b = private_temp_dir("openclaw-flash-").unwrap();
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    /// An `init --device` bundle: its password and TLS files go into the
    /// release (`credentials/`, the key for its owner only) and the config
    /// points there; TLS files with a plain mqtt:// broker, a file missing
    /// from the bundle, or a bundle with no credentials are refused by name.
    #[test]
    fn credentials_bundles_go_into_the_release() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        std::fs::write(
            b.join("agent.toml"),
            "id = \"pi-1\"\n[mqtt]\nbroker = \"mqtts://srv:8883\"\npassword = \"s3cret\"\n\
             [mqtt.tls]\nca_file = \"/etc/openclaw/ca.pem\"\nclient_cert_file = \"/x/client.pem\"\n\
             client_key_file = \"client.key\"\n",
        )
        .unwrap();
        for f in ["ca.pem", "client.pem", "client.key"] {
            std::fs::write(b.join(f), f).unwrap();
        }
        let c = credentials(b, "/opt/openclaw/releases/7", "mqtts://srv:8883").unwrap();
        assert_eq!(c.id.as_deref(), Some("pi-1"));
        assert_eq!(c.password.as_deref(), Some("s3cret"));
        let tls = c.tls.unwrap();
        assert_eq!(
            tls["client_key_file"].as_str(),
            Some("/opt/openclaw/releases/7/credentials/client.key")
        );
        assert_eq!(
            tls["ca_file"].as_str(),
            Some("/opt/openclaw/releases/7/credentials/ca.pem")
        );
        let key = c.files.iter().find(|(n, _, _)| n == "client.key").unwrap();
        assert_eq!((key.1.as_slice(), key.2), (&b"client.key"[..], 0o600));
        let e = credentials(b, "/r", "mqtt://srv:1883").err().unwrap();
        assert!(e.contains("not mqtts://"), "{e}");
        std::fs::remove_file(b.join("client.pem")).unwrap();
        let e = credentials(b, "/r", "mqtts://srv:8883").err().unwrap();
        assert!(
            e.contains("client_cert_file") && e.contains("client.pem"),
            "{e}"
        );
        std::fs::write(b.join("agent.toml"), "id = \"pi-1\"\n").unwrap();
        let e = credentials(b, "/r", "mqtts://srv:8883").err().unwrap();
        assert!(e.contains("neither"), "{e}");
    }

    #[test]
    fn remote_paths_are_plain() {
        assert!(valid_remote_path("/opt/openclaw"));
        assert!(!valid_remote_path("opt"));
        assert!(!valid_remote_path("/opt/open claw"));
        assert!(!valid_remote_path("/opt/$(reboot)"));
        assert!(!valid_remote_path("/opt/../etc"));
    }

    #[test]
    fn dry_run_prints_every_step_and_touches_nothing() {
        let dir = std::env::temp_dir().join(format!("openclaw-flash-dry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("agent");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[5] = 1;
        elf[18] = 183;
        std::fs::write(&bin, &elf).unwrap();
        let mut o = FlashOptions::new("rpi4", "pi@192.0.2.1", "mqtt://192.0.2.2:1883", &bin);
        o.dry_run = true;
        o.id = Some("pi-1".into());
        let mut lines = Vec::new();
        let r = flash(&o, &mut |l| lines.push(l.to_string())).unwrap();
        let all = lines.join("\n");
        for step in [
            "connect",
            "stage",
            "verify",
            "unit",
            "swap",
            "restart",
            "heartbeat",
            "prune",
        ] {
            assert!(all.contains(&format!("[{step}]")), "{step} missing:\n{all}");
        }
        assert!(all.contains("BatchMode=yes") && all.contains("StrictHostKeyChecking=accept-new"));
        assert!(all.contains("systemctl daemon-reload && systemctl enable openclaw-agent.service && systemctl restart openclaw-agent.service"), "{all}");
        assert!(all.contains("scp -q -r -p"), "{all}");
        assert_eq!(r.commands.len(), lines.len() - 1);
        assert!(r.files.contains(&"bin/openclaw-agent".to_string()));
        // An x86_64 binary for an ARM board is refused before any command.
        elf[18] = 62;
        std::fs::write(&bin, &elf).unwrap();
        let e = flash(&o, &mut |_| {}).unwrap_err();
        assert_eq!(e.step, Step::Prepare);
        assert!(e.to_string().contains("x86_64 binary"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The bundle's id is the one the agent logs in as: without --id the
    /// heartbeat check waits for it (not for the device's host name, which
    /// the agent does not use then); a different --id is refused before
    /// anything is sent, as are ids and file names that are not plain.
    #[test]
    fn a_bundle_names_the_device_and_must_agree_with_id() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("agent");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[5] = 1;
        elf[18] = 62;
        std::fs::write(&bin, &elf).unwrap();
        let bundle = dir.path().join("pi-1");
        std::fs::create_dir(&bundle).unwrap();
        std::fs::write(
            bundle.join("agent.toml"),
            "id = \"pi-1\"\n[mqtt]\npassword = \"s3cret\"\n",
        )
        .unwrap();
        let mut o = FlashOptions::new("sim", "pi@192.0.2.1", "mqtt://192.0.2.2:1883", &bin);
        o.dry_run = true;
        o.credentials = Some(bundle.clone());
        let mut lines = Vec::new();
        let r = flash(&o, &mut |l| lines.push(l.to_string())).unwrap();
        assert_eq!(r.device_id, "pi-1");
        let all = lines.join("\n");
        assert!(all.contains("until pi-1 is online"), "{all}");
        o.id = Some("pi-2".into());
        let e = flash(&o, &mut |_| {}).unwrap_err();
        assert_eq!(e.step, Step::Prepare);
        let m = e.to_string();
        assert!(m.contains("--id pi-2") && m.contains("pi-1"), "{m}");
        o.id = Some("pi-1".into());
        assert_eq!(flash(&o, &mut |_| {}).unwrap().device_id, "pi-1");
        // Not plain: an id with a topic wildcard, a file name with a quote.
        std::fs::write(
            bundle.join("agent.toml"),
            "id = \"a/#\"\n[mqtt]\npassword = \"x\"\n",
        )
        .unwrap();
        let e = credentials(&bundle, "/r", "mqtt://h:1").err().unwrap();
        assert!(e.contains("not a valid device id"), "{e}");
        std::fs::write(
            bundle.join("agent.toml"),
            "[mqtt.tls]\nca_file = \"/x/ca'$(reboot).pem\"\n",
        )
        .unwrap();
        let e = credentials(&bundle, "/r", "mqtts://h:1").err().unwrap();
        assert!(e.contains("names no file"), "{e}");
    }
}
