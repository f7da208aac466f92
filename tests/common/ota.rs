//! Over-the-air update test rig: a server whose rollouts move fast, devices
//! installed in the release layout `flash` makes, each run by a supervisor
//! that does what the unit does under systemd (`ExecStartPre`, the guard
//! from `good`; `ExecStart` from `current`; `Restart=on-failure`), and the
//! `openclaw-admin release` commands (tests/ota.rs, tests/ota_hostile.rs).

use super::Server;
use openclaw::release::api::ReleaseView;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const AGENT: &str = env!("CARGO_BIN_EXE_openclaw-agent");
pub const ADMIN: &str = env!("CARGO_BIN_EXE_openclaw-admin");

pub fn admin(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(ADMIN)
        .arg("--server")
        .arg(&server.http)
        .args(args)
        .env_remove("OPENCLAW_TOKEN")
        .output()
        .expect("run openclaw-admin")
}

pub fn admin_ok(server: &Server, args: &[&str]) -> String {
    let o = admin(server, args);
    assert!(
        o.status.success(),
        "openclaw-admin {args:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A server whose rollouts move fast.
pub fn server(dir: &Path) -> Server {
    let conf = dir.join("server.toml");
    std::fs::write(
        &conf,
        "[releases]\nresend_ms = 1000\ntarget_timeout_ms = 60000\n",
    )
    .unwrap();
    Server::start(&dir.join("data"), &["--config", conf.to_str().unwrap()])
}

/// What the supervisor saw.
#[derive(Default)]
pub struct Seen {
    /// The release of each start (what `current` pointed to).
    pub starts: Vec<String>,
    /// Processes that died by SIGKILL (the fault hook fired).
    pub killed: u32,
    /// Output of each guard run.
    pub guard: Vec<String>,
}

/// One device: `PREFIX/releases/a` installed as flash would, and the
/// supervisor running it.
pub struct Device {
    pub prefix: PathBuf,
    pub stop: Arc<AtomicBool>,
    pub child: Arc<Mutex<Option<Child>>>,
    pub seen: Arc<Mutex<Seen>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

pub fn pub_key(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_string()
}

impl Device {
    pub fn install(root: &Path, id: &str, server: &Server, key: &str) -> PathBuf {
        let prefix = root.join(id);
        let rel = prefix.join("releases/a");
        std::fs::create_dir_all(rel.join("bin")).unwrap();
        std::fs::copy(AGENT, rel.join("bin/openclaw-agent")).unwrap();
        std::fs::write(
            rel.join("agent.toml"),
            format!(
                "id = \"{id}\"\nboard = \"sim\"\ndata_dir = \"{data}\"\n\
                 [mqtt]\nbroker = \"{broker}\"\nreconnect_max_ms = 500\n\
                 [agent]\nheartbeat_ms = 300\nshutdown_timeout_ms = 500\n\
                 [ota]\nprefix = \"{prefix}\"\nkeys = [\"{key}\"]\n\
                 max_starts = 2\nconfirm_timeout_ms = 30000\n",
                data = prefix.join("data").display(),
                broker = server.broker(),
                prefix = prefix.display(),
            ),
        )
        .unwrap();
        std::os::unix::fs::symlink("releases/a", prefix.join("current")).unwrap();
        prefix
    }

    /// Starts the supervisor; `kill_at` is set for the agent and guard
    /// processes until one of them dies by SIGKILL.
    pub fn run(prefix: &Path, kill_at: Option<&str>) -> Device {
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (s, c, v, p) = (
            stop.clone(),
            child.clone(),
            seen.clone(),
            prefix.to_path_buf(),
        );
        let mut kill_at = kill_at.map(String::from);
        let thread = std::thread::spawn(move || {
            use std::os::unix::process::ExitStatusExt;
            while !s.load(Ordering::SeqCst) {
                let armed = kill_at.clone();
                let env = |cmd: &mut Command| {
                    if let Some(k) = &armed {
                        cmd.env("OPENCLAW_TEST_KILL_AT", k);
                    }
                };
                // ExecStartPre=-PREFIX/good/bin/openclaw-agent --ota-guard PREFIX
                let good = p.join("good/bin/openclaw-agent");
                if good.exists() {
                    let mut g = Command::new(&good);
                    g.arg("--ota-guard").arg(&p);
                    env(&mut g);
                    if let Ok(o) = g.output() {
                        let mut seen = v.lock().unwrap();
                        seen.guard
                            .push(String::from_utf8_lossy(&o.stderr).into_owned());
                        if o.status.signal() == Some(9) {
                            seen.killed += 1;
                            kill_at = None;
                        }
                    }
                }
                let release = std::fs::read_link(p.join("current"))
                    .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
                    .unwrap_or_default();
                v.lock().unwrap().starts.push(release);
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let mut cmd = Command::new(p.join("current/bin/openclaw-agent"));
                cmd.arg("--config")
                    .arg(p.join("current/agent.toml"))
                    .current_dir(&p)
                    .env("RUST_LOG", "info,rumqttd=off")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit());
                env(&mut cmd);
                let Ok(ch) = cmd.spawn() else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                {
                    let mut slot = c.lock().unwrap();
                    if s.load(Ordering::SeqCst) {
                        // Drop ran meanwhile: nobody else will kill it.
                        let mut ch = ch;
                        let _ = ch.kill();
                        let _ = ch.wait();
                        break;
                    }
                    *slot = Some(ch);
                }
                let status = loop {
                    if let Some(ch) = c.lock().unwrap().as_mut() {
                        if let Ok(Some(st)) = ch.try_wait() {
                            break Some(st);
                        }
                    } else {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                *c.lock().unwrap() = None;
                match status {
                    // Restart=on-failure: a clean exit stops the unit.
                    Some(st) if st.success() => break,
                    Some(st) => {
                        if st.signal() == Some(9) && !s.load(Ordering::SeqCst) {
                            v.lock().unwrap().killed += 1;
                            kill_at = None;
                        }
                    }
                    None => break,
                }
                // RestartSec, shortened.
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Device {
            prefix: prefix.to_path_buf(),
            stop,
            child,
            seen,
            thread: Some(thread),
        }
    }

    pub fn link(&self, name: &str) -> String {
        std::fs::read_link(self.prefix.join(name))
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut ch) = self.child.lock().unwrap().take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn show(server: &Server, id: &str) -> ReleaseView {
    serde_json::from_str(&admin_ok(server, &["--json", "release", "show", id])).unwrap()
}

/// Waits until every target of the release is settled; returns the view.
pub fn settled(server: &Server, id: &str, within: Duration) -> ReleaseView {
    let start = Instant::now();
    loop {
        let v = show(server, id);
        if v.state != "rolling" && v.state != "new" {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "release {id} still {} after {within:?}: {v:?}",
            v.state
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn target_state(v: &ReleaseView, device: &str) -> (String, String) {
    let t = v.targets.iter().find(|t| t.device == device).unwrap();
    (t.state.clone(), t.message.clone())
}

/// The device as the server sees it: (online, release, "state: message").
pub fn device_view(server: &Server, id: &str) -> Option<(bool, Option<String>, Option<String>)> {
    let d = server.client.devices().ok()?;
    let d = d.into_iter().find(|d| d.id == id)?;
    let u = d.update.map(|u| format!("{:?}: {}", u.state, u.message));
    Some((d.online, d.release, u))
}

pub fn wait_running(server: &Server, id: &str, release: &str) {
    server.wait_devices(&format!("{id} running {release}"), |d| {
        d.iter()
            .any(|d| d.id == id && d.online && d.release.as_deref() == Some(release))
    });
}

/// A copy of the agent binary that is another file (another sha256): ELF
/// ignores bytes after its last section.
pub fn new_binary(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut b = std::fs::read(AGENT).unwrap();
    b.extend_from_slice(format!("\nopenclaw test release {name}\n").as_bytes());
    std::fs::write(&p, b).unwrap();
    p
}

/// Passes the self-check (`--print-config`), exits at every real start.
pub fn broken_binary(dir: &Path) -> PathBuf {
    let p = dir.join("broken");
    std::fs::write(
        &p,
        "#!/bin/sh\ncase \" $* \" in *\" --print-config \"*) exit 0;; esac\necho 'broken build: exiting at start' >&2\nexit 3\n",
    )
    .unwrap();
    p
}

pub fn create(server: &Server, key: &Path, binary: &Path, id: &str, counter: u64) {
    // The devices are on this machine: loopback is where they download.
    let url = format!("{}/v1/releases/{id}/binary", server.http);
    admin_ok(
        server,
        &[
            "--json",
            "release",
            "create",
            "--board",
            "sim",
            "--target",
            openclaw::agent::ota::TARGET,
            "--binary",
            binary.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--id",
            id,
            "--counter",
            &counter.to_string(),
            "--url",
            &url,
        ],
    );
}

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub server: Server,
    pub key: PathBuf,
}

pub fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let server = server(&root);
    let key = root.join("release.key");
    let out = admin_ok(
        &server,
        &["release", "keygen", "--out", key.to_str().unwrap()],
    );
    assert!(out.contains("key id"), "{out}");
    Rig {
        _dir: dir,
        root,
        server,
        key,
    }
}

impl Rig {
    pub fn device(&self, id: &str, kill_at: Option<&str>) -> Device {
        let prefix = Device::install(
            &self.root,
            id,
            &self.server,
            &pub_key(&self.root, "release.key"),
        );
        let d = Device::run(&prefix, kill_at);
        wait_running(&self.server, id, "a");
        d
    }
}
