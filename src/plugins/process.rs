//! Process plugins: plugins in any language, run as child processes that
//! speak JSON lines over stdin/stdout (protocol in docs/plugins.md).
//!
//! Each plugin folder holds a `plugin.toml`. The agent starts a process on
//! the first task, sends it `validate`, then reuses it for later tasks (up to
//! `concurrency` processes, one task at a time each). A process that dies is
//! restarted on the next task; one that times out, crashes, writes garbage
//! or an over-long line is killed and fails only that task. Memory (address
//! space) and CPU time are capped per process with setrlimit before exec;
//! the process and everything it starts are held together in a cgroup v2
//! of their own where the agent can make one (`memory.max`, `pids.max`,
//! `cgroup.kill`), or counted by the agent where it cannot (see
//! [`super::cgroup`]). The environment is cleared: `PATH`, `LANG` and
//! `HOME` are passed on, plus the manifest's `[env]`. What a plugin writes
//! to the agent's log (log messages, stderr) loses its control characters
//! and is cut to a bounded length.

use super::cgroup;
use super::util::{cfg_str_list, config_err, failed, invalid, log_safe};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, Semaphore};

/// Names a process plugin may not take.
const BUILTIN: &[&str] = &[
    "echo",
    "sysinfo",
    "infer",
    "vad",
    "file",
    "http",
    "exec",
    "transform",
    "anomaly",
    "publish",
    "process",
];

/// `plugin.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// Program to run: absolute, relative to the plugin folder (`./x`), or a
    /// name looked up in PATH (`python3`).
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub input: Schema,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "one")]
    pub concurrency: usize,
    #[serde(default = "default_memory")]
    pub max_memory_mb: u64,
    #[serde(default = "default_cpu")]
    pub max_cpu_secs: u64,
    #[serde(default = "default_line")]
    pub max_line_bytes: usize,
    /// Processes at once: the plugin's and everything it starts (counted
    /// by the agent; threads are not processes).
    #[serde(default = "default_processes")]
    pub max_processes: u64,
    /// Threads at once, over all those processes (the kernel's `pids.max`,
    /// which counts every thread; default 1024, at least `max_processes`).
    #[serde(default)]
    pub max_threads: Option<u64>,
    /// Environment variables set for the process, besides PATH, LANG and HOME.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Sent to the process in the `validate` message.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_timeout() -> u64 {
    30_000
}
fn one() -> usize {
    1
}
fn default_memory() -> u64 {
    512
}
fn default_cpu() -> u64 {
    600
}
fn default_line() -> usize {
    1 << 20
}
fn default_processes() -> u64 {
    64
}

/// The default `max_threads`: room for thread pools (a JVM, OpenBLAS, a
/// Python executor), still a bound on a thread or fork bomb.
const DEFAULT_MAX_THREADS: u64 = 1024;

/// Longest log line a plugin gets into the agent's log (bytes kept).
const LOG_LINE: usize = 1000;

/// Input schema: required fields and their types.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    #[serde(default)]
    pub required: Vec<String>,
    /// Field → `string`, `number`, `integer`, `boolean`, `array`, `object` or `any`.
    #[serde(default)]
    pub types: BTreeMap<String, String>,
}

const TYPES: &[&str] = &[
    "string", "number", "integer", "boolean", "array", "object", "any",
];

impl Schema {
    /// The manifest's declaration in the agent's form (other fields pass).
    fn declaration(&self) -> super::Schema {
        use super::schema::Kind;
        let mut s = super::Schema::object().open();
        for (f, t) in &self.types {
            let kinds: &[Kind] = match t.as_str() {
                "string" => &[Kind::String],
                "number" => &[Kind::Number],
                "integer" => &[Kind::Integer],
                "boolean" => &[Kind::Boolean],
                "array" => &[Kind::Array],
                "object" => &[Kind::Object],
                _ => &[],
            };
            s = s.field(f, super::Schema::of(kinds));
        }
        for f in &self.required {
            if !self.types.contains_key(f) {
                s = s.field(f, super::Schema::any());
            }
        }
        s.required = self.required.clone();
        s
    }

    fn check(&self, plugin: &str, input: &Value) -> Result<(), PluginError> {
        if !matches!(input, Value::Map(_)) {
            return Err(invalid(plugin, "input", "expected an object"));
        }
        for f in &self.required {
            if matches!(input.get(f), None | Some(Value::Null)) {
                return Err(invalid(plugin, f, "missing (required)"));
            }
        }
        for (f, t) in &self.types {
            let Some(v) = input.get(f) else { continue };
            let ok = match t.as_str() {
                "string" => matches!(v, Value::Str(_)),
                "number" => matches!(v, Value::Int(_) | Value::Float(_)),
                "integer" => matches!(v, Value::Int(_)),
                "boolean" => matches!(v, Value::Bool(_)),
                "array" => matches!(v, Value::List(_)),
                "object" => matches!(v, Value::Map(_)),
                _ => true,
            };
            if !ok && !matches!(v, Value::Null) {
                return Err(invalid(plugin, f, format!("expected {t}")));
            }
        }
        Ok(())
    }
}

/// What a plugin process may write on stdout.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Reply {
    Result {
        id: serde_json::Value,
        #[serde(default)]
        output: serde_json::Value,
    },
    Error {
        id: serde_json::Value,
        message: String,
    },
    Log {
        #[serde(default)]
        level: String,
        message: String,
    },
}

/// One running plugin process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    /// Result/error replies, or why the stream ended.
    replies: mpsc::Receiver<Result<Reply, String>>,
    /// Its cgroup, where the agent could make one.
    group: Option<Arc<cgroup::Group>>,
    /// The agent's count of its processes and memory, where the kernel
    /// does not enforce them.
    watchdog: Option<tokio::task::JoinHandle<()>>,
    /// Why the watchdog killed it.
    killed_for: Arc<Mutex<Option<String>>>,
    /// What the watchdog holds it to.
    limits: Limits,
}

impl Drop for Worker {
    fn drop(&mut self) {
        kill_group(self.child.id());
        if let Some(g) = &self.group {
            g.kill();
        }
        if let Some(w) = &self.watchdog {
            w.abort();
        }
    }
}

/// What the agent holds a worker to by counting.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_processes: u64,
    max_threads: u64,
    max_memory_mb: u64,
    /// The kernel enforces `max_threads` (pids.max) and `max_memory_mb`
    /// (memory.max): only processes are left to count.
    kernel: bool,
}

/// Counts the worker's processes (and, where the kernel does not, their
/// threads and resident memory) every [`cgroup::POLL`] and kills them all
/// past a limit, saying why.
async fn watch(
    group: Option<Arc<cgroup::Group>>,
    pgid: i32,
    limits: Limits,
    killed_for: Arc<Mutex<Option<String>>>,
) {
    let mut tick = tokio::time::interval(cgroup::POLL);
    loop {
        tick.tick().await;
        if over_limits(group.as_deref(), pgid, limits, &killed_for) {
            return;
        }
    }
}

/// Counts once; past a limit, records why and kills them all.
fn over_limits(
    group: Option<&cgroup::Group>,
    pgid: i32,
    limits: Limits,
    killed_for: &Mutex<Option<String>>,
) -> bool {
    let Limits {
        max_processes,
        max_threads,
        max_memory_mb,
        kernel,
    } = limits;
    let how = cgroup::mechanism("");
    let pids = match group {
        Some(g) => g.pids(),
        None => cgroup::group_members(pgid),
    };
    let why = if pids.len() as u64 > max_processes {
        // pids.max cannot count processes: the agent always does.
        let how = if kernel {
            "counted by the agent: cgroup v2 pids.max counts threads, and holds max_threads".into()
        } else {
            how
        };
        format!(
            "it and its children ran {} processes, more than max_processes ({max_processes}) ({how}); all killed",
            pids.len()
        )
    } else if kernel {
        return false;
    } else if let Some(n) = Some(cgroup::threads(&pids)).filter(|n| *n > max_threads) {
        format!(
            "it and its children ran {n} threads, more than max_threads ({max_threads}) ({how}); all killed"
        )
    } else if let Some(rss) = Some(cgroup::rss_bytes(&pids)).filter(|r| *r > max_memory_mb << 20) {
        format!(
            "it and its children used {} MiB, more than max_memory_mb ({max_memory_mb}) ({how}); all killed",
            rss >> 20
        )
    } else {
        return false;
    };
    *killed_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    match group {
        Some(g) => g.kill(),
        None => unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        },
    }
    true
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        // The process leads its own group: its children go too.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
}

/// Reads one line of at most `max` bytes (without the newline).
/// `Ok(None)` at end of stream; `Err` for an over-long line.
async fn read_line_capped(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<Vec<u8>>, String> {
    loop {
        let newline = buf.iter().position(|b| *b == b'\n');
        // A long line that arrived in one read still counts as too long.
        if newline.unwrap_or(buf.len()) > max {
            return Err(format!(
                "wrote an output line longer than max_line_bytes ({max})"
            ));
        }
        if let Some(i) = newline {
            let line = buf.drain(..=i).take(i).collect();
            return Ok(Some(line));
        }
        let mut chunk = [0u8; 16 * 1024];
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                return Ok(None);
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Logs a plugin's stderr, keeping at most 500 bytes of each line so a
/// line without an end cannot grow the agent's memory.
async fn log_stderr(name: &'static str, mut r: impl AsyncRead + Unpin) {
    const KEEP: usize = 500;
    let mut line: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut dropped = 0usize;
    let flush = |line: &mut Vec<u8>, dropped: &mut usize| {
        if !line.is_empty() {
            let more = if *dropped > 0 {
                format!(" [{dropped} more bytes]")
            } else {
                String::new()
            };
            log::warn!(
                "plugin {name} (stderr): {}{more}",
                log_safe(&String::from_utf8_lossy(line), KEEP)
            );
            line.clear();
            *dropped = 0;
        }
    };
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if b == b'\n' {
                flush(&mut line, &mut dropped);
            } else if line.len() < KEEP {
                line.push(b);
            } else {
                dropped += 1;
            }
        }
    }
    flush(&mut line, &mut dropped);
}

/// A process plugin.
pub struct ProcessPlugin {
    name: &'static str,
    dir: PathBuf,
    m: Manifest,
    idle: Mutex<Vec<Worker>>,
    slots: Semaphore,
}

impl ProcessPlugin {
    /// Loads `dir/plugin.toml`; `config` overrides keys of its `[config]`.
    pub fn load(dir: &Path, config: Option<&toml::Table>) -> Result<ProcessPlugin, PluginError> {
        let file = dir.join("plugin.toml");
        let key = format!("dirs ({})", file.display());
        let text = std::fs::read_to_string(&file)
            .map_err(|e| config_err("process", &key, e.to_string()))?;
        let mut m: Manifest =
            toml::from_str(&text).map_err(|e| config_err("process", &key, e.to_string()))?;
        let ok_name = !m.name.is_empty()
            && m.name.len() <= 64
            && m.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok_name {
            return Err(config_err(
                "process",
                &key,
                format!("name `{}`: use letters, digits, _ and -", m.name),
            ));
        }
        if BUILTIN.contains(&m.name.as_str()) {
            return Err(config_err(
                "process",
                &key,
                format!("name `{}` is taken by a built-in plugin", m.name),
            ));
        }
        let range = |k: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(config_err(
                    "process",
                    &key,
                    format!("`{k}` = {v}: expected {lo} to {hi}"),
                ))
            }
        };
        range("timeout_ms", m.timeout_ms, 1, 86_400_000)?;
        range("concurrency", m.concurrency as u64, 1, 64)?;
        range("max_memory_mb", m.max_memory_mb, 16, 1 << 20)?;
        range("max_cpu_secs", m.max_cpu_secs, 1, 1 << 30)?;
        range("max_line_bytes", m.max_line_bytes as u64, 1024, 1 << 30)?;
        range("max_processes", m.max_processes, 1, 1 << 16)?;
        let threads = *m
            .max_threads
            .get_or_insert(DEFAULT_MAX_THREADS.max(m.max_processes));
        range("max_threads", threads, 1, 1 << 20)?;
        if threads < m.max_processes {
            return Err(config_err(
                "process",
                &key,
                format!(
                    "`max_threads` = {threads} is below `max_processes` = {}: every process has a thread",
                    m.max_processes
                ),
            ));
        }
        for (k, v) in &m.env {
            let ok_name = !k.is_empty()
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !k.starts_with(|c: char| c.is_ascii_digit());
            if !ok_name || v.contains('\0') {
                return Err(config_err(
                    "process",
                    &key,
                    format!(
                        "env.{k}: a variable name is letters, digits and _, its value has no NUL"
                    ),
                ));
            }
        }
        for (f, t) in &m.input.types {
            if !TYPES.contains(&t.as_str()) {
                return Err(config_err(
                    "process",
                    &key,
                    format!(
                        "input.types.{f} = `{t}`: expected one of {}",
                        TYPES.join(", ")
                    ),
                ));
            }
        }
        if let Some(over) = config {
            for (k, v) in over {
                m.config.insert(k.clone(), v.clone());
            }
        }
        let slots = Semaphore::new(m.concurrency);
        Ok(ProcessPlugin {
            // Names live as long as the agent; a handful are leaked at start.
            name: Box::leak(m.name.clone().into_boxed_str()),
            dir: dir.to_path_buf(),
            m,
            idle: Mutex::new(Vec::new()),
            slots,
        })
    }

    fn program(&self) -> PathBuf {
        let c = Path::new(&self.m.command);
        if c.is_absolute() || !self.m.command.contains('/') {
            c.to_path_buf()
        } else {
            self.dir.join(c)
        }
    }

    fn fail(&self, message: impl Into<String>) -> PluginError {
        failed(self.name, message)
    }

    /// `max_threads`, resolved when the manifest was checked.
    fn threads(&self) -> u64 {
        self.m
            .max_threads
            .unwrap_or(DEFAULT_MAX_THREADS.max(self.m.max_processes))
    }

    /// Starts a process and runs the `validate` handshake.
    async fn start(&self) -> Result<Worker, PluginError> {
        let mut cmd = tokio::process::Command::new(self.program());
        // Nothing of the agent's environment (its secrets) but these.
        cmd.env_clear();
        for (k, default) in [
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("LANG", "C.UTF-8"),
            ("HOME", "/"),
        ] {
            cmd.env(k, std::env::var_os(k).unwrap_or_else(|| default.into()));
        }
        cmd.envs(&self.m.env);
        let group = match cgroup::hierarchy() {
            Some(_) => {
                match cgroup::Group::create(self.name, self.m.max_memory_mb << 20, self.threads()) {
                    Ok(g) => Some(Arc::new(g)),
                    Err(e) => {
                        log::warn!("plugin {}: no cgroup for this process ({e}); counting its process group instead", self.name);
                        None
                    }
                }
            }
            None => None,
        };
        let joins = group.clone();
        cmd.args(&self.m.args)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mem = self.m.max_memory_mb << 20;
        let cpu = self.m.max_cpu_secs;
        // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let as_lim = libc::rlimit {
                    rlim_cur: mem as libc::rlim_t,
                    rlim_max: mem as libc::rlim_t,
                };
                let cpu_lim = libc::rlimit {
                    rlim_cur: cpu as libc::rlim_t,
                    rlim_max: cpu as libc::rlim_t + 1,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &as_lim) != 0
                    || libc::setrlimit(libc::RLIMIT_CPU, &cpu_lim) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Into its cgroup before exec: nothing it starts is outside.
                if let Some(g) = &joins {
                    g.join_from_child()?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| self.fail(format!("cannot start `{}`: {e}", self.m.command)))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let name = self.name;
        let max = self.m.max_line_bytes;
        let (tx, replies) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut r = stdout;
            let mut buf = Vec::new();
            loop {
                let line = match read_line_capped(&mut r, &mut buf, max).await {
                    Ok(Some(l)) => l,
                    Ok(None) => {
                        let _ = tx.send(Err("exited or closed its stdout".into())).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Reply>(&line) {
                    Ok(Reply::Log { level, message }) => {
                        let lvl = match level.as_str() {
                            "error" => log::Level::Error,
                            "warn" | "warning" => log::Level::Warn,
                            "debug" => log::Level::Debug,
                            _ => log::Level::Info,
                        };
                        log::log!(lvl, "plugin {name}: {}", log_safe(&message, LOG_LINE));
                    }
                    Ok(reply) => {
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let shown = log_safe(&String::from_utf8_lossy(&line), 120);
                        let _ = tx
                            .send(Err(format!(
                                "wrote a line that is not a protocol message ({e}): {shown:?}"
                            )))
                            .await;
                        return;
                    }
                }
            }
        });
        tokio::spawn(log_stderr(name, stderr));
        let killed_for = Arc::new(Mutex::new(None));
        let limits = Limits {
            max_processes: self.m.max_processes,
            max_threads: self.threads(),
            max_memory_mb: self.m.max_memory_mb,
            kernel: group.is_some() && cgroup::hierarchy().is_some_and(|h| h.controllers),
        };
        // Always: even the kernel's pids.max counts threads, not processes.
        let watchdog = child
            .id()
            .map(|pid| tokio::spawn(watch(group.clone(), pid as i32, limits, killed_for.clone())));
        let mut w = Worker {
            child,
            stdin,
            replies,
            group,
            watchdog,
            killed_for,
            limits,
        };
        let config = serde_json::to_value(&self.m.config).unwrap_or_default();
        let msg = serde_json::json!({"type": "validate", "id": "validate", "config": config});
        let deadline = Instant::now() + Duration::from_millis(self.m.timeout_ms);
        match self
            .exchange(&mut w, msg, "validate", deadline, false, None)
            .await
        {
            Ok(Ok(serde_json::Value::Bool(false))) => {
                Err(self.fail("validate answered false: the plugin refused its config"))
            }
            Ok(Ok(_)) => Ok(w),
            Ok(Err(message)) => Err(self.fail(format!("validate: {message}"))),
            Err(PluginError::Failed { message, .. }) => {
                Err(self.fail(format!("validate: {message}")))
            }
            Err(other) => Err(other),
        }
    }

    /// Sends one message and waits for the reply with `id`: `Ok(Ok)` for a
    /// result, `Ok(Err)` for the plugin's own error answer (the process is
    /// fine), `Err` when the process is broken and must go.
    async fn exchange(
        &self,
        w: &mut Worker,
        msg: serde_json::Value,
        id: &str,
        deadline: Instant,
        tasks_deadline: bool,
        cancel: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<Result<serde_json::Value, String>, PluginError> {
        let mut line = serde_json::to_vec(&msg).unwrap_or_default();
        line.push(b'\n');
        let send = async {
            w.stdin.write_all(&line).await?;
            w.stdin.flush().await
        };
        let timeout_ms = self.m.timeout_ms;
        let never = tokio_util::sync::CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        let answer = async {
            send.await.map_err(|e| format!("stdin closed ({e})"))?;
            w.replies
                .recv()
                .await
                .unwrap_or_else(|| Err("exited".into()))
        };
        let got = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), answer) => match r {
                Ok(r) => r,
                // The deadline that expired: the task's own, when it came
                // before the manifest's `timeout_ms`.
                Err(_) => return Err(PluginError::Failed {
                    plugin: self.name.into(),
                    message: if tasks_deadline {
                        "no answer before the task's deadline (its timeout); process killed".to_string()
                    } else {
                        format!("no answer within the manifest's timeout_ms ({timeout_ms} ms); process killed")
                    },
                    retryable: false,
                }),
            },
            _ = cancel.cancelled() => return Err(PluginError::Cancelled(self.name.into())),
        };
        match got {
            Ok(Reply::Result { id: got, output }) if got == id => Ok(Ok(output)),
            Ok(Reply::Error { id: got, message }) if got == id => Ok(Err(message)),
            Ok(_) => Err(self.fail(format!(
                "answered with an id other than {id:?} (protocol error); process killed"
            ))),
            Err(why) => {
                // Give a dying process a moment so its exit status can be reported.
                let status = tokio::time::timeout(Duration::from_millis(500), w.child.wait()).await;
                let how = match status {
                    Ok(Ok(s)) => {
                        use std::os::unix::process::ExitStatusExt;
                        match (s.code(), s.signal()) {
                            (Some(c), _) => format!(" (exit code {c})"),
                            (_, Some(sig)) => format!(" (killed by signal {sig})"),
                            _ => String::new(),
                        }
                    }
                    _ => String::new(),
                };
                let limit = w
                    .killed_for
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .or_else(|| {
                        w.group
                            .as_ref()
                            .and_then(|g| g.limit_events(self.m.max_memory_mb, self.threads()))
                    })
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default();
                Err(self.fail(format!(
                    "plugin process {why}{how}{limit}; it will be restarted"
                )))
            }
        }
    }

    fn take_idle(&self) -> Option<Worker> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut w) = idle.pop() {
            // A process that died while idle is dropped and replaced.
            if matches!(w.child.try_wait(), Ok(None)) {
                return Some(w);
            }
        }
        None
    }
}

#[async_trait]
impl Plugin for ProcessPlugin {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Vec<String> {
        self.m.capabilities.clone()
    }

    fn effects(&self) -> super::Effects {
        // runs a program
        super::Effects::Always
    }

    fn input_schema(&self) -> super::Schema {
        self.m.input.declaration()
    }

    fn concurrency(&self) -> usize {
        self.m.concurrency
    }

    fn validate(&self) -> Result<(), PluginError> {
        let prog = self.program();
        let found = if prog.components().count() > 1 {
            prog.is_file()
        } else {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(&prog).is_file()))
                .unwrap_or(false)
        };
        if !found {
            return Err(config_err(
                self.name,
                "command",
                format!(
                    "`{}` not found (plugin folder {})",
                    self.m.command,
                    self.dir.display()
                ),
            ));
        }
        // The validate handshake once before any task, so a plugin that
        // refuses its config stops the agent at start like a built-in. On its
        // own thread and runtime: this may be called from inside the agent's.
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| self.fail(format!("validate: {e}")))?;
                rt.block_on(async { self.start().await.map(drop) })
            })
            .join()
            .unwrap_or_else(|_| Err(self.fail("validate panicked")))
        })
        .map_err(|e| match e {
            PluginError::Failed { message, .. } => config_err(self.name, "config", message),
            other => other,
        })
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        self.m.input.check(self.name, &task.input)?;
        let _slot = tokio::select! {
            s = self.slots.acquire() => s.map_err(|_| self.fail("shutting down"))?,
            _ = task.cancel.cancelled() => return Err(PluginError::Cancelled(self.name.into())),
        };
        let mut w = match self.take_idle() {
            Some(w) => w,
            None => self.start().await?,
        };
        let own = Instant::now() + Duration::from_millis(self.m.timeout_ms);
        let tasks_deadline = task.deadline < own;
        let deadline = task.deadline.min(own);
        let msg = serde_json::json!({
            "type": "execute",
            "id": task.id,
            "input": serde_json::Value::from(task.input.clone()),
        });
        // On a broken process `w` is dropped here, which kills its group.
        let answer = self
            .exchange(
                &mut w,
                msg,
                &task.id,
                deadline,
                tasks_deadline,
                Some(&task.cancel),
            )
            .await?;
        // What the agent counts, it counts once more at the answer: a
        // plugin that forked past its limit between two counts does not
        // get its answer through.
        if w.watchdog.is_some() {
            let pgid = w.child.id().unwrap_or(0) as i32;
            if over_limits(w.group.as_deref(), pgid, w.limits, &w.killed_for) {
                let why = w
                    .killed_for
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                return Err(self.fail(format!(
                    "plugin process: {}; it will be restarted",
                    why.unwrap_or_default()
                )));
            }
        }
        // Answered (even with an error): the process is fine; keep it.
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(w);
        match answer {
            Ok(v) => Ok(Value::from(v)),
            Err(message) => Err(PluginError::Failed {
                plugin: self.name.into(),
                message,
                retryable: false,
            }),
        }
    }
}

/// Builds the process plugins of `[plugins.process]`: `dirs` (folders whose
/// subfolders each hold a `plugin.toml`; a folder with a `plugin.toml` of its
/// own is one plugin) and `config.NAME` tables overriding a plugin's `[config]`.
pub fn build(config: &toml::Table) -> Result<Vec<Arc<dyn Plugin>>, PluginError> {
    check_keys("process", config, &["dirs", "config"])?;
    let dirs = cfg_str_list("process", config, "dirs")?;
    let overrides = match config.get("config") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => {
            return Err(config_err(
                "process",
                "config",
                "expected tables `config.NAME`",
            ))
        }
    };
    let mut folders = Vec::new();
    for d in &dirs {
        let d = PathBuf::from(d);
        if d.join("plugin.toml").is_file() {
            folders.push(d);
            continue;
        }
        let rd = std::fs::read_dir(&d)
            .map_err(|e| config_err("process", "dirs", format!("{}: {e}", d.display())))?;
        let mut subs: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("plugin.toml").is_file())
            .collect();
        subs.sort();
        folders.extend(subs);
    }
    let mut out: Vec<Arc<dyn Plugin>> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for f in folders {
        // Peek at the name to find its override table.
        let p = ProcessPlugin::load(&f, None)?;
        let over = match overrides.get(p.name) {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(_) => {
                return Err(config_err(
                    "process",
                    &format!("config.{}", p.name),
                    "expected a table",
                ))
            }
        };
        let p = if over.is_some() {
            ProcessPlugin::load(&f, over)?
        } else {
            p
        };
        if names.contains(&p.m.name) {
            return Err(config_err(
                "process",
                "dirs",
                format!("two plugins are named `{}`", p.m.name),
            ));
        }
        names.push(p.m.name.clone());
        out.push(Arc::new(p));
    }
    for k in overrides.keys() {
        if !names.contains(k) {
            return Err(config_err(
                "process",
                &format!("config.{k}"),
                "no process plugin has this name",
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    /// A shell plugin: answers `validate`, then per `execute` behaves as the
    /// input's `do` says.
    const SCRIPT: &str = r#"#!/bin/sh
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
  case "$line" in
    *'"validate"'*) echo '{"type":"result","id":"validate","output":true}' ;;
    *'"do":"ok"'*) echo '{"type":"log","level":"info","message":"hi"}'; echo "{\"type\":\"result\",\"id\":\"$id\",\"output\":{\"pid\":$$}}" ;;
    *'"do":"err"'*) echo "{\"type\":\"error\",\"id\":\"$id\",\"message\":\"bad part number\"}" ;;
    *'"do":"crash"'*) exit 3 ;;
    *'"do":"hang"'*) sleep 30 ;;
    *'"do":"garbage"'*) echo 'this is not json' ;;
    *'"do":"huge"'*) head -c 5000 /dev/zero | tr '\0' 'x'; echo ;;
  esac
done
"#;

    fn setup() -> (tempfile::TempDir, ProcessPlugin) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shp");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("run.sh"), SCRIPT).unwrap();
        std::fs::write(
            p.join("plugin.toml"),
            "name = \"shp\"\ncommand = \"/bin/sh\"\nargs = [\"run.sh\"]\ntimeout_ms = 1000\n\
             max_line_bytes = 1024\ncapabilities = [\"demo\"]\n\
             [input]\nrequired = [\"do\"]\ntypes = { do = \"string\" }\n",
        )
        .unwrap();
        let cfg: toml::Table =
            toml::from_str(&format!("dirs = [{:?}]", dir.path().display().to_string())).unwrap();
        let v = build(&cfg).unwrap();
        assert_eq!(v.len(), 1);
        v[0].validate().unwrap();
        drop(v);
        let plugin = ProcessPlugin::load(&p, None).unwrap();
        (dir, plugin)
    }

    fn ctx(id: &str, v: serde_json::Value) -> TaskContext {
        TaskContext {
            id: id.into(),
            input: Value::from(v),
            deadline: Instant::now() + Duration::from_secs(10),
            cancel: CancellationToken::new(),
            attempt: 1,
            output: Default::default(),
        }
    }

    async fn run(
        p: &ProcessPlugin,
        id: &str,
        v: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        p.execute(ctx(id, v))
            .await
            .map(serde_json::Value::from)
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn reuses_restarts_and_survives_misbehaviour() {
        let (_dir, p) = setup();
        assert_eq!(p.capabilities(), vec!["demo".to_string()]);
        let a = run(&p, "t1", json!({"do": "ok"})).await.unwrap();
        let b = run(&p, "t2", json!({"do": "ok"})).await.unwrap();
        assert_eq!(a["pid"], b["pid"], "the process is reused");
        let e = run(&p, "t3", json!({"do": "err"})).await.unwrap_err();
        assert!(e.contains("`shp`") && e.contains("bad part number"), "{e}");
        let c = run(&p, "t4", json!({"do": "ok"})).await.unwrap();
        assert_eq!(a["pid"], c["pid"], "an error answer keeps the process");
        for (what, needle) in [
            ("crash", "exit code 3"),
            ("hang", "timeout_ms"),
            ("garbage", "not a protocol message"),
            ("huge", "max_line_bytes"),
        ] {
            let started = Instant::now();
            let e = run(&p, what, json!({"do": what})).await.unwrap_err();
            assert!(e.contains("`shp`") && e.contains(needle), "{what}: {e}");
            assert!(started.elapsed() < Duration::from_secs(3), "{what}");
            let d = run(&p, &format!("after-{what}"), json!({"do": "ok"}))
                .await
                .unwrap();
            assert_ne!(d["pid"], a["pid"], "{what}: restarted");
        }
        for (input, field) in [
            (json!({}), "`do`"),
            (json!({"do": 1}), "`do`"),
            (json!([1]), "`input`"),
        ] {
            let e = run(&p, "bad", input.clone()).await.unwrap_err();
            assert!(e.contains("`shp`") && e.contains(field), "{input}: {e}");
        }
    }

    #[tokio::test]
    async fn memory_limit_applies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("plugin.toml"),
            "name = \"hog\"\ncommand = \"python3\"\nargs = [\"hog.py\"]\nmax_memory_mb = 64\ntimeout_ms = 5000\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("hog.py"),
            "import sys, json\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m['type'] == 'validate':\n        print(json.dumps({'type': 'result', 'id': m['id'], 'output': True}), flush=True)\n    else:\n        x = bytearray(200 << 20)\n        print(json.dumps({'type': 'result', 'id': m['id'], 'output': len(x)}), flush=True)\n",
        )
        .unwrap();
        let p = ProcessPlugin::load(dir.path(), None).unwrap();
        let e = run(&p, "m1", json!({})).await.unwrap_err();
        assert!(e.contains("`hog`") && e.contains("exit code 1"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_runs_that_many_processes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("plugin.toml"),
            "name = \"slow\"\ncommand = \"/bin/sh\"\nargs = [\"slow.sh\"]\nconcurrency = 2\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("slow.sh"),
            r#"read line; echo '{"type":"result","id":"validate","output":true}'
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
  sleep 1; echo "{\"type\":\"result\",\"id\":\"$id\",\"output\":$$}"
done
"#,
        )
        .unwrap();
        let p = ProcessPlugin::load(dir.path(), None).unwrap();
        let started = Instant::now();
        let (a, b, c) = tokio::join!(
            run(&p, "a", json!({})),
            run(&p, "b", json!({})),
            run(&p, "c", json!({}))
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        let took = started.elapsed();
        // Two at once, the third waits for a free process: ~2 s, not 1 or 3.
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_millis(2900),
            "{took:?}"
        );
        assert_ne!(a, b);
        assert!(c == a || c == b, "the third reuses one of the two");
    }

    #[tokio::test]
    async fn cpu_limit_kills_a_spinning_process() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("plugin.toml"),
            "name = \"spin\"\ncommand = \"/bin/sh\"\nargs = [\"spin.sh\"]\nmax_cpu_secs = 1\ntimeout_ms = 20000\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("spin.sh"),
            "read line; echo '{\"type\":\"result\",\"id\":\"validate\",\"output\":true}'\n\
             read line; while :; do :; done\n",
        )
        .unwrap();
        let p = ProcessPlugin::load(dir.path(), None).unwrap();
        let e = run(&p, "c1", json!({})).await.unwrap_err();
        // SIGXCPU at the soft limit (SIGKILL at the hard one).
        assert!(
            e.contains("`spin`") && (e.contains("signal 24") || e.contains("signal 9")),
            "{e}"
        );
    }

    #[test]
    fn validate_runs_the_handshake_with_the_config() {
        let dir = repo_example();
        let p = ProcessPlugin::load(&dir, None).unwrap();
        p.validate().unwrap();
        let over: toml::Table = toml::from_str("prefixes = 5").unwrap();
        let p = ProcessPlugin::load(&dir, Some(&over)).unwrap();
        let e = p.validate().unwrap_err().to_string();
        assert!(
            e.contains("`bom_extractor`") && e.contains("config `prefixes`"),
            "{e}"
        );
    }

    fn repo_example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/python/examples/bom_extractor")
    }

    #[test]
    fn bad_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (toml, needle) in [
            ("name = \"echo\"\ncommand = \"/bin/sh\"", "built-in"),
            ("name = \"a b\"\ncommand = \"/bin/sh\"", "name"),
            (
                "name = \"x\"\ncommand = \"/bin/sh\"\nconcurrency = 0",
                "concurrency",
            ),
            ("name = \"x\"\ncommand = \"/bin/sh\"\nfrob = 1", "frob"),
            (
                "name = \"x\"\ncommand = \"/bin/sh\"\n[input]\ntypes = { a = \"float\" }",
                "input.types.a",
            ),
        ] {
            std::fs::write(dir.path().join("plugin.toml"), toml).unwrap();
            let e = ProcessPlugin::load(dir.path(), None)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(needle), "{toml}: {e}");
        }
        std::fs::write(
            dir.path().join("plugin.toml"),
            "name = \"x\"\ncommand = \"no-such-program-here\"",
        )
        .unwrap();
        let e = ProcessPlugin::load(dir.path(), None)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
    }
}
