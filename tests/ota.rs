//! Over-the-air updates end to end: a real server, real agents in the
//! release layout `flash` makes, real `openclaw-admin release` commands.
//! Each device runs under a small supervisor that does what the unit
//! `flash` installs does under systemd: `ExecStartPre` (the guard, from
//! `good`), `ExecStart` (from `current`), and `Restart=on-failure`.
mod common;

use common::Server;
use openclaw::release::api::ReleaseView;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_openclaw-agent");
const ADMIN: &str = env!("CARGO_BIN_EXE_openclaw-admin");

fn admin(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(ADMIN)
        .arg("--server")
        .arg(&server.http)
        .args(args)
        .env_remove("OPENCLAW_TOKEN")
        .output()
        .expect("run openclaw-admin")
}

fn admin_ok(server: &Server, args: &[&str]) -> String {
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
fn server(dir: &Path) -> Server {
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
struct Seen {
    /// The release of each start (what `current` pointed to).
    starts: Vec<String>,
    /// Processes that died by SIGKILL (the fault hook fired).
    killed: u32,
    /// Output of each guard run.
    guard: Vec<String>,
}

/// One device: `PREFIX/releases/a` installed as flash would, and the
/// supervisor running it.
struct Device {
    prefix: PathBuf,
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn pub_key(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_string()
}

impl Device {
    fn install(root: &Path, id: &str, server: &Server, key: &str) -> PathBuf {
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
    fn run(prefix: &Path, kill_at: Option<&str>) -> Device {
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

    fn link(&self, name: &str) -> String {
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

fn show(server: &Server, id: &str) -> ReleaseView {
    serde_json::from_str(&admin_ok(server, &["--json", "release", "show", id])).unwrap()
}

/// Waits until every target of the release is settled; returns the view.
fn settled(server: &Server, id: &str, within: Duration) -> ReleaseView {
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

fn target_state(v: &ReleaseView, device: &str) -> (String, String) {
    let t = v.targets.iter().find(|t| t.device == device).unwrap();
    (t.state.clone(), t.message.clone())
}

/// The device as the server sees it: (online, release, "state: message").
fn device_view(server: &Server, id: &str) -> Option<(bool, Option<String>, Option<String>)> {
    let d = server.client.devices().ok()?;
    let d = d.into_iter().find(|d| d.id == id)?;
    let u = d.update.map(|u| format!("{:?}: {}", u.state, u.message));
    Some((d.online, d.release, u))
}

fn wait_running(server: &Server, id: &str, release: &str) {
    server.wait_devices(&format!("{id} running {release}"), |d| {
        d.iter()
            .any(|d| d.id == id && d.online && d.release.as_deref() == Some(release))
    });
}

/// A copy of the agent binary that is another file (another sha256): ELF
/// ignores bytes after its last section.
fn new_binary(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut b = std::fs::read(AGENT).unwrap();
    b.extend_from_slice(format!("\nopenclaw test release {name}\n").as_bytes());
    std::fs::write(&p, b).unwrap();
    p
}

/// Passes the self-check (`--print-config`), exits at every real start.
fn broken_binary(dir: &Path) -> PathBuf {
    let p = dir.join("broken");
    std::fs::write(
        &p,
        "#!/bin/sh\ncase \" $* \" in *\" --print-config \"*) exit 0;; esac\necho 'broken build: exiting at start' >&2\nexit 3\n",
    )
    .unwrap();
    p
}

fn create(server: &Server, key: &Path, binary: &Path, id: &str, counter: u64) {
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

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    server: Server,
    key: PathBuf,
}

fn rig() -> Rig {
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
    fn device(&self, id: &str, kill_at: Option<&str>) -> Device {
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

/// What a case does to the stored binary after the upload.
type Spoil = Box<dyn Fn(&Path)>;

#[test]
fn an_update_is_installed_confirmed_and_bad_ones_are_refused() {
    let r = rig();
    let dev = r.device("ota-1", None);
    assert_eq!(
        dev.link("good"),
        "a",
        "the agent marks what flash installed as good"
    );

    create(&r.server, &r.key, &new_binary(&r.root, "b"), "b", 2);
    let v = show(&r.server, "b");
    assert_eq!((v.state.as_str(), v.counter), ("new", 2));
    admin_ok(&r.server, &["release", "deploy", "b", "--devices", "ota-1"]);
    let v = settled(&r.server, "b", Duration::from_secs(60));
    assert_eq!(v.state, "done", "{v:?}");
    assert_eq!(target_state(&v, "ota-1").0, "succeeded", "{v:?}");
    wait_running(&r.server, "ota-1", "b");
    r.server.wait_devices("ota-1 confirmed b", |d| {
        d.iter().any(|d| {
            d.id == "ota-1"
                && d.update.as_ref().is_some_and(|u| {
                    u.release == "b" && u.state == openclaw::protocol::UpdateState::Confirmed
                })
        })
    });
    assert_eq!(dev.link("current"), "b");
    assert_eq!(dev.link("good"), "b");
    assert!(
        dev.prefix.join("releases/a/bin/openclaw-agent").exists(),
        "the previous release is kept"
    );
    assert_eq!(dev.seen.lock().unwrap().starts, vec!["a", "b"]);
    // Tasks still run on the new release.
    let t = r.server.wait(
        &r.server
            .submit(common::task("echo", serde_json::json!({"x": 1}))),
    );
    assert!(common::succeeded(&t), "{t:?}");

    // Each bad release is refused by the agent, which stays on b.
    let other = r.root.join("other.key");
    admin_ok(
        &r.server,
        &["release", "keygen", "--out", other.to_str().unwrap()],
    );
    let cases: Vec<(&str, u64, Spoil, &str, PathBuf)> = vec![
        (
            "downgrade",
            1,
            Box::new(|_: &Path| {}),
            "downgrade",
            r.key.clone(),
        ),
        (
            "wrongkey",
            5,
            Box::new(|_: &Path| {}),
            "not among the trusted keys",
            other.clone(),
        ),
        (
            "tampered",
            6,
            Box::new(|bin: &Path| {
                let mut b = std::fs::read(bin).unwrap();
                let n = b.len() / 2;
                b[n] ^= 0x40;
                std::fs::write(bin, b).unwrap();
            }),
            "sha256",
            r.key.clone(),
        ),
        (
            "truncated",
            7,
            Box::new(|bin: &Path| {
                let b = std::fs::read(bin).unwrap();
                std::fs::write(bin, &b[..b.len() / 3]).unwrap();
            }),
            "the manifest says",
            r.key.clone(),
        ),
    ];
    for (id, counter, spoil, why, key) in cases {
        create(&r.server, &key, &new_binary(&r.root, id), id, counter);
        spoil(&r.server.data_dir.join(format!("releases/{id}.bin")));
        admin_ok(&r.server, &["release", "deploy", id]);
        let v = settled(&r.server, id, Duration::from_secs(60));
        let (state, message) = target_state(&v, "ota-1");
        assert_eq!(state, "failed", "{id}: {v:?}");
        assert!(
            message.contains(why),
            "{id}: `{message}` should say `{why}`"
        );
        assert_eq!(
            v.state, "paused",
            "{id}: one of one failed pauses it: {v:?}"
        );
        assert_eq!(dev.link("current"), "b", "{id}");
        assert!(
            !dev.prefix.join(format!("releases/{id}")).exists(),
            "{id} was not installed"
        );
    }
    assert_eq!(
        dev.seen.lock().unwrap().starts,
        vec!["a", "b"],
        "no restart for a refused release"
    );
    let (online, release, _) = device_view(&r.server, "ota-1").unwrap();
    assert!(online && release.as_deref() == Some("b"));

    // The server refuses what it can tell is wrong before any device sees it.
    let o = admin(&r.server, &["release", "deploy", "nosuch"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no release `nosuch`"));
    let o = admin(&r.server, &["release", "deploy", "b"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("deployed already"));
    let mismatched = r.root.join("mismatched");
    std::fs::write(&mismatched, b"x").unwrap();
    let o = admin(
        &r.server,
        &[
            "release",
            "create",
            "--board",
            "sim",
            "--binary",
            mismatched.to_str().unwrap(),
            "--key",
            r.key.to_str().unwrap(),
            "--id",
            "b",
            "--counter",
            "9",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is loopback"),
        "the signed URL would be loopback: {err}"
    );
    let o = admin(
        &r.server,
        &[
            "release",
            "create",
            "--board",
            "sim",
            "--binary",
            mismatched.to_str().unwrap(),
            "--key",
            r.key.to_str().unwrap(),
            "--id",
            "b",
            "--counter",
            "9",
            "--url",
            "http://10.0.0.1:8080/v1/releases/b/binary",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("release `b` exists"),
        "{o:?}"
    );
    // The download needs the rollout's grant.
    let resp = ureq::get(&format!("{}/v1/releases/b/binary", r.server.http))
        .header("Authorization", "Bearer nope")
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

#[test]
fn a_release_that_cannot_start_is_rolled_back_and_the_canary_pauses_the_rest() {
    let r = rig();
    let devs: Vec<Device> = ["can-1", "can-2", "can-3"]
        .iter()
        .map(|id| r.device(id, None))
        .collect();
    create(&r.server, &r.key, &broken_binary(&r.root), "broken", 2);
    admin_ok(
        &r.server,
        &["release", "deploy", "broken", "--canary", "33%"],
    );
    let v = settled(&r.server, "broken", Duration::from_secs(60));
    assert_eq!(v.state, "paused", "{v:?}");
    assert!(
        v.reason.as_deref().unwrap_or("").contains("1 of 1"),
        "{v:?}"
    );
    let (state, message) = target_state(&v, "can-1");
    assert_eq!(state, "failed");
    assert!(message.contains("started 2 times"), "{message}");
    for d in ["can-2", "can-3"] {
        assert_eq!(target_state(&v, d).0, "waiting", "{v:?}");
    }
    // can-1 went to the broken release, failed twice, and is back on a.
    wait_running(&r.server, "can-1", "a");
    let c1 = &devs[0];
    assert_eq!(c1.link("current"), "a");
    assert_eq!(c1.link("good"), "a");
    let starts = c1.seen.lock().unwrap().starts.clone();
    assert_eq!(starts, vec!["a", "broken", "broken", "a"], "{starts:?}");
    // The others never heard of it.
    for d in &devs[1..] {
        assert_eq!(d.seen.lock().unwrap().starts, vec!["a"]);
        assert!(!d.prefix.join("releases/broken").exists());
    }

    // Resumed with every failure allowed: can-1 is offered it again and
    // refuses a release rolled back there; then the rest get it, and roll
    // it back too.
    admin_ok(&r.server, &["release", "deploy", "broken", "--max-failure", "100%"]);
    let v = settled(&r.server, "broken", Duration::from_secs(90));
    assert_eq!(v.state, "done", "{v:?}");
    let (state, message) = target_state(&v, "can-1");
    assert_eq!(state, "failed");
    assert!(message.contains("was rolled back here"), "{message}");
    assert_eq!(devs[0].seen.lock().unwrap().starts, vec!["a", "broken", "broken", "a"]);
    for (d, id) in devs[1..].iter().zip(["can-2", "can-3"]) {
        let (state, message) = target_state(&v, id);
        assert_eq!(state, "failed", "{id}");
        assert!(message.contains("started 2 times"), "{id}: {message}");
        wait_running(&r.server, id, "a");
        assert_eq!(d.link("current"), "a", "{id}");
    }
}

#[test]
fn sigkill_at_every_install_step_ends_on_a_working_release() {
    let r = rig();
    let mut counter = 2;
    let mut running = "a".to_string();
    for step in [
        "downloaded",
        "staged",
        "pending",
        "switched",
        "confirming",
        "confirmed-good",
    ] {
        let prefix = r.root.join("kill-1");
        let dev = if prefix.exists() {
            let d = Device::run(&prefix, Some(step));
            wait_running(&r.server, "kill-1", &running);
            d
        } else {
            r.device("kill-1", Some(step))
        };
        let id = format!("k{counter}");
        create(&r.server, &r.key, &new_binary(&r.root, &id), &id, counter);
        admin_ok(&r.server, &["release", "deploy", &id]);
        let v = settled(&r.server, &id, Duration::from_secs(90));
        assert_eq!(v.state, "done", "{step}: {v:?}");
        assert_eq!(target_state(&v, "kill-1").0, "succeeded", "{step}: {v:?}");
        wait_running(&r.server, "kill-1", &id);
        r.server
            .wait_devices(&format!("{step}: {id} confirmed"), |d| {
                d.iter().any(|d| {
                    d.id == "kill-1"
                        && d.update.as_ref().is_some_and(|u| {
                            u.release == id && u.state == openclaw::protocol::UpdateState::Confirmed
                        })
                })
            });
        // After the Confirmed report: a kill in the confirmation comes
        // after the server marked the target succeeded.
        assert_eq!(
            dev.seen.lock().unwrap().killed,
            1,
            "{step}: the hook fired once"
        );
        assert_eq!(dev.link("good"), id, "{step}");
        drop(dev);
        running = id;
        counter += 1;
    }
    // Killed while switching back: the broken release is left all the same.
    for step in ["rollback-noted", "rollback-switched"] {
        let dev = Device::run(&r.root.join("kill-1"), Some(step));
        wait_running(&r.server, "kill-1", &running);
        let id = format!("broken{counter}");
        create(&r.server, &r.key, &broken_binary(&r.root), &id, counter);
        admin_ok(&r.server, &["release", "deploy", &id]);
        let v = settled(&r.server, &id, Duration::from_secs(90));
        assert_eq!(target_state(&v, "kill-1").0, "failed", "{step}: {v:?}");
        wait_running(&r.server, "kill-1", &running);
        assert_eq!(dev.link("current"), running, "{step}");
        assert_eq!(
            dev.seen.lock().unwrap().killed,
            1,
            "{step}: the hook fired once"
        );
        drop(dev);
        counter += 1;
    }
}
