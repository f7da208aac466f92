//! `exec`: runs commands from the config's allow-list, never a shell.
//!
//! Each command is a program plus argument templates; `{input.FIELD}` in a
//! template is replaced by that field of the task input (a string, number or
//! bool; never one whose text starts with `-`, so no value becomes an
//! option: `-1` is refused like `-rf`). The process gets its own process
//! group, a clean environment, a timeout and capped output (the rest is
//! drained and dropped, and the result says so).
//!
//! The child is held by a guard whose drop kills its whole process group
//! and stops the output readers, so however the run ends (the command's
//! own timeout, the task's deadline, a cancel, the agent dropping the
//! plugin's future) nothing it started keeps running under the group, and
//! the agent stops reading a process that escaped the group (`setsid`):
//! that one gets EPIPE on its next write. Where the agent can make cgroups
//! (see `cgroup.rs`) each command also runs in one of its own, and the
//! guard's `cgroup.kill` reaches such a process too. After a normal exit the
//! group is killed too (children left behind), and output still open is read
//! for at most a moment, so a grandchild holding the pipe cannot hold the
//! result.

use super::schema::Schema;
use super::util::{cfg_str, cfg_str_list, cfg_u64, config_err, failed, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// After the command exits, how long output still open (a grandchild
/// holding the pipe) is read before the readers are stopped.
const DRAIN: Duration = Duration::from_millis(300);

const NAME: &str = "exec";

/// One allowlisted command.
#[derive(Debug, Clone)]
struct Command {
    program: PathBuf,
    args: Vec<String>,
    cwd: Option<PathBuf>,
    timeout_ms: u64,
}

/// The exec plugin.
#[derive(Debug)]
pub struct Exec {
    commands: BTreeMap<String, Command>,
    max_output_bytes: usize,
}

impl Exec {
    /// Config keys: `timeout_ms` (default 30000), `max_output_bytes` (per
    /// stream, default 64 KiB), and `commands.NAME` tables with `program`
    /// (required), `args` (templates), `cwd`, `timeout_ms`.
    pub fn from_config(config: &toml::Table) -> Result<Exec, PluginError> {
        check_keys(
            NAME,
            config,
            &["commands", "timeout_ms", "max_output_bytes"],
        )?;
        let default_timeout = cfg_u64(NAME, config, "timeout_ms", 30_000, 1, 86_400_000)?;
        let max_output_bytes =
            cfg_u64(NAME, config, "max_output_bytes", 64 << 10, 1, 64 << 20)? as usize;
        let mut commands = BTreeMap::new();
        match config.get("commands") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, c) in t {
                    let key = format!("commands.{name}");
                    let c = match c {
                        toml::Value::Table(c) => c,
                        _ => return Err(config_err(NAME, &key, "expected a table")),
                    };
                    for k in c.keys() {
                        if !["program", "args", "cwd", "timeout_ms"].contains(&k.as_str()) {
                            return Err(config_err(
                                NAME,
                                &format!("{key}.{k}"),
                                "unknown key (known: program, args, cwd, timeout_ms)",
                            ));
                        }
                    }
                    let program = cfg_str(NAME, c, "program")
                        .map_err(|_| {
                            config_err(NAME, &format!("{key}.program"), "expected a string")
                        })?
                        .ok_or_else(|| config_err(NAME, &format!("{key}.program"), "required"))?;
                    let args = cfg_str_list(NAME, c, "args").map_err(|_| {
                        config_err(NAME, &format!("{key}.args"), "expected a list of strings")
                    })?;
                    let cwd = cfg_str(NAME, c, "cwd")
                        .map_err(|_| config_err(NAME, &format!("{key}.cwd"), "expected a string"))?
                        .map(PathBuf::from);
                    let timeout_ms = cfg_u64(NAME, c, "timeout_ms", default_timeout, 1, 86_400_000)
                        .map_err(|_| {
                            config_err(
                                NAME,
                                &format!("{key}.timeout_ms"),
                                "expected a positive integer",
                            )
                        })?;
                    commands.insert(
                        name.clone(),
                        Command {
                            program: PathBuf::from(program),
                            args,
                            cwd,
                            timeout_ms,
                        },
                    );
                }
            }
            Some(_) => {
                return Err(config_err(
                    NAME,
                    "commands",
                    "expected tables `commands.NAME`",
                ))
            }
        }
        Ok(Exec {
            commands,
            max_output_bytes,
        })
    }
}

/// Fills `{input.FIELD}` placeholders from the task input.
fn fill(template: &str, input: &Input) -> Result<String, PluginError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{input.") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 7..];
        let end = after.find('}').ok_or_else(|| {
            failed(
                NAME,
                format!("argument template `{template}` has no closing `}}`"),
            )
        })?;
        let field = &after[..end];
        let v = match input.get(field) {
            Some(Value::Str(s)) => {
                if s.contains('\0') {
                    return Err(input.err(field, "must not contain NUL"));
                }
                s.clone()
            }
            Some(Value::Int(i)) => i.to_string(),
            Some(Value::Float(f)) => f.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(_) => return Err(input.err(field, "expected a string, number or bool")),
            None => return Err(input.err(field, "missing (used by the command's arguments)")),
        };
        // A value that looks like an option changes what the program does,
        // whatever its JSON type: `ls {input.path}` with -1 is `ls -1`, and
        // `kill -TERM {input.pid}` with -1 signals every process. Leading
        // whitespace is looked through: strtol skips it, so `kill " -1"` is
        // `kill -1` too.
        if v.trim_start().starts_with('-') {
            return Err(input.err(
                field,
                format!("must not start with `-`, even after spaces (got `{v}`): a value never becomes an option"),
            ));
        }
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Output kept from one stream, and whether some was dropped.
type Captured = Arc<Mutex<(Vec<u8>, bool)>>;

/// Reads up to `limit` bytes into `into` and drains the rest so the child
/// never blocks, until the stream ends (or the reader is aborted).
async fn read_capped(mut r: impl AsyncRead + Unpin, limit: usize, into: Captured) {
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut c = into.lock().unwrap_or_else(|p| p.into_inner());
                let room = limit.saturating_sub(c.0.len());
                if n > room {
                    c.1 = true;
                }
                c.0.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn take(c: &Captured) -> (Vec<u8>, bool) {
    std::mem::take(&mut *c.lock().unwrap_or_else(|p| p.into_inner()))
}

/// A started command. Dropped, however the run ends, it kills the whole
/// process group and stops the tasks feeding and reading the child.
struct Running {
    pgid: Option<u32>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The command's cgroup where the agent can make one: its kill reaches
    /// what left the process group too.
    group: Option<Arc<super::cgroup::Group>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        kill_group(self.pgid);
        if let Some(g) = &self.group {
            g.kill();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        // The child leads its own group: this reaches its children too.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
}

#[async_trait]
impl Plugin for Exec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Runs a command from the device's allow-list (never a shell) and returns its exit code and output.".into()
    }

    fn effects(&self) -> super::Effects {
        // One table, which the server also holds catalogs to.
        crate::schema::builtin_effects("exec").unwrap_or(super::Effects::Always)
    }

    fn input_schema(&self) -> Schema {
        let names: Vec<&str> = self.commands.keys().map(String::as_str).collect();
        // Other fields feed the commands' `{input.FIELD}` templates.
        Schema::object()
            .req(
                "command",
                Schema::enumeration(&names).desc("a configured command"),
            )
            .field("stdin", Schema::string())
            .open()
    }

    fn concurrency(&self) -> usize {
        4
    }

    fn capabilities(&self) -> Vec<String> {
        self.commands.keys().map(|c| format!("exec:{c}")).collect()
    }

    fn validate(&self) -> Result<(), PluginError> {
        for (name, c) in &self.commands {
            if !c.program.is_absolute() {
                return Err(config_err(
                    NAME,
                    &format!("commands.{name}.program"),
                    format!(
                        "`{}` must be an absolute path (no PATH lookup)",
                        c.program.display()
                    ),
                ));
            }
            if !c.program.is_file() {
                return Err(config_err(
                    NAME,
                    &format!("commands.{name}.program"),
                    format!("`{}` does not exist", c.program.display()),
                ));
            }
            if let Some(cwd) = &c.cwd {
                if !cwd.is_dir() {
                    return Err(config_err(
                        NAME,
                        &format!("commands.{name}.cwd"),
                        format!("`{}` is not a folder", cwd.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let input = Input::new(NAME, &task.input)?;
        let name = input.str("command")?;
        let cmd = self.commands.get(name).ok_or_else(|| {
            input.err(
                "command",
                format!(
                    "`{name}` is not an allowed command (configured: {})",
                    self.commands.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        let args = cmd
            .args
            .iter()
            .map(|a| fill(a, &input))
            .collect::<Result<Vec<_>, _>>()?;
        let stdin = input.opt_str("stdin")?.map(|s| s.as_bytes().to_vec());
        let mut c = tokio::process::Command::new(&cmd.program);
        c.args(&args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(cwd) = &cmd.cwd {
            c.current_dir(cwd);
        }
        let group = super::cgroup::hierarchy()
            .and_then(|_| super::cgroup::Group::create("exec", u64::MAX, u64::MAX).ok())
            .map(Arc::new);
        if let Some(g) = group.clone() {
            // SAFETY: only open/write/close between fork and exec.
            unsafe {
                c.pre_exec(move || g.join_from_child());
            }
        }
        let started = Instant::now();
        let mut child = c.spawn().map_err(|e| {
            failed(
                NAME,
                format!(
                    "command `{name}`: cannot start {}: {e}",
                    cmd.program.display()
                ),
            )
        })?;
        let mut running = Running {
            pgid: child.id(),
            tasks: Vec::new(),
            group,
        };
        if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
            running.tasks.push(tokio::spawn(async move {
                let _ = w.write_all(&data).await;
            }));
        }
        let (out, err): (Captured, Captured) = Default::default();
        running.tasks.push(tokio::spawn(read_capped(
            child.stdout.take().unwrap(),
            self.max_output_bytes,
            out.clone(),
        )));
        running.tasks.push(tokio::spawn(read_capped(
            child.stderr.take().unwrap(),
            self.max_output_bytes,
            err.clone(),
        )));
        let timeout = Duration::from_millis(cmd.timeout_ms);
        let status = tokio::select! {
            s = child.wait() => s.map_err(|e| failed(NAME, format!("command `{name}`: {e}")))?,
            _ = tokio::time::sleep(timeout) => {
                drop(running);
                let _ = child.wait().await;
                return Err(PluginError::Failed {
                    plugin: NAME.into(),
                    message: format!("command `{name}` did not finish within timeout_ms ({} ms); killed", cmd.timeout_ms),
                    retryable: false,
                });
            }
            _ = task.cancel.cancelled() => {
                drop(running);
                let _ = child.wait().await;
                return Err(PluginError::Cancelled(NAME.into()));
            }
        };
        // Children left behind go with the group; one that left the group
        // may hold the pipes: read for a moment, then stop reading.
        kill_group(running.pgid);
        // Reaped: the group id may be reused from here on.
        running.pgid = None;
        let tasks = &mut running.tasks;
        let drained = async {
            for t in tasks.iter_mut() {
                let _ = t.await;
            }
        };
        let _ = tokio::time::timeout(DRAIN, drained).await;
        drop(running);
        let (stdout, stdout_truncated) = take(&out);
        let (stderr, stderr_truncated) = take(&err);
        use std::os::unix::process::ExitStatusExt;
        Ok(map(vec![
            ("command", Value::Str(name.into())),
            (
                "exit_code",
                status.code().map_or(Value::Null, |c| Value::Int(c as i64)),
            ),
            (
                "signal",
                status
                    .signal()
                    .map_or(Value::Null, |s| Value::Int(s as i64)),
            ),
            ("success", Value::Bool(status.success())),
            (
                "stdout",
                Value::Str(String::from_utf8_lossy(&stdout).into_owned()),
            ),
            (
                "stderr",
                Value::Str(String::from_utf8_lossy(&stderr).into_owned()),
            ),
            ("stdout_truncated", Value::Bool(stdout_truncated)),
            ("stderr_truncated", Value::Bool(stderr_truncated)),
            (
                "elapsed_ms",
                Value::Int(started.elapsed().as_millis() as i64),
            ),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    fn plugin() -> Exec {
        let t: toml::Table = toml::from_str(
            r#"
            max_output_bytes = 100
            [commands.echo]
            program = "/bin/echo"
            args = ["hello", "{input.who}", "n={input.n}"]
            [commands.sh]
            program = "/bin/sh"
            args = ["-c", "{input.script}"]
            timeout_ms = 500
            [commands.cat]
            program = "/bin/cat"
            "#,
        )
        .unwrap();
        let e = Exec::from_config(&t).unwrap();
        e.validate().unwrap();
        e
    }

    fn ctx(v: serde_json::Value) -> TaskContext {
        TaskContext {
            id: "t".into(),
            input: Value::from(v),
            deadline: Instant::now() + Duration::from_secs(10),
            cancel: CancellationToken::new(),
            attempt: 1,
            output: Default::default(),
        }
    }

    async fn run(p: &Exec, v: serde_json::Value) -> Result<serde_json::Value, String> {
        p.execute(ctx(v))
            .await
            .map(serde_json::Value::from)
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn runs_templates_and_reports_exit_codes() {
        let p = plugin();
        let r = run(
            &p,
            json!({"command": "echo", "who": "world; rm -rf /", "n": 3}),
        )
        .await
        .unwrap();
        assert_eq!(r["stdout"], "hello world; rm -rf / n=3\n");
        assert_eq!(r["exit_code"], 0);
        let r = run(
            &p,
            json!({"command": "sh", "script": "echo oops >&2; exit 7"}),
        )
        .await
        .unwrap();
        assert_eq!(r["exit_code"], 7);
        assert_eq!(r["stderr"], "oops\n");
        assert_eq!(r["success"], false);
        let r = run(&p, json!({"command": "cat", "stdin": "piped"}))
            .await
            .unwrap();
        assert_eq!(r["stdout"], "piped");
    }

    #[tokio::test]
    async fn truncates_output_and_kills_on_timeout() {
        let p = plugin();
        let r = run(
            &p,
            json!({"command": "sh", "script": "yes | head -c 100000"}),
        )
        .await
        .unwrap();
        assert_eq!(r["stdout"].as_str().unwrap().len(), 100);
        assert_eq!(r["stdout_truncated"], true);
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let started = Instant::now();
        let e = run(
            &p,
            json!({"command": "sh", "script": format!("sleep 2; touch {}", marker.display())}),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("`exec`") && e.contains("timeout_ms") && e.contains("killed"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "the process group was not killed");
    }

    #[tokio::test]
    async fn bad_input_and_config_name_the_field() {
        let p = plugin();
        for (input, field) in [
            (json!({}), "`command`"),
            (json!({"command": "rm"}), "`command`"),
            (json!({"command": "echo", "n": 1}), "`who`"),
            (json!({"command": "echo", "who": "-rf", "n": 1}), "`who`"),
            (json!({"command": "echo", "who": "x", "n": -1}), "`n`"),
            (json!({"command": "echo", "who": -2.5, "n": 1}), "`who`"),
            (json!({"command": "echo", "who": [1], "n": 1}), "`who`"),
            (json!({"command": "cat", "stdin": 5}), "`stdin`"),
        ] {
            let e = run(&p, input.clone()).await.unwrap_err();
            assert!(e.contains("`exec`") && e.contains(field), "{input}: {e}");
        }
        for (cfg, key) in [
            ("[commands.x]\nprogram = \"ls\"", "commands.x.program"),
            ("[commands.x]\nprogram = \"/no/such\"", "commands.x.program"),
            ("[commands.x]\nprog = \"/bin/ls\"", "commands.x.prog"),
            ("[commands.x]\nargs = []", "commands.x.program"),
        ] {
            let e = Exec::from_config(&toml::from_str(cfg).unwrap())
                .and_then(|e| e.validate().map(|_| e))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{cfg}: {e}");
        }
    }
}
