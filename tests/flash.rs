//! `openclaw-admin flash` against a real OpenSSH server on loopback.
//!
//! The "device" is a directory: the install prefix and the unit directory
//! are in a temporary folder, and `--systemctl` is a small script that
//! records its calls and, on `restart`, runs the installed unit's
//! `ExecStart` in the background (no systemd here). The agent is the host
//! build of `openclaw-agent`; its heartbeat reaches a real server.
//!
//! Needs `/usr/sbin/sshd` (Debian's openssh-server; scripts/test-arm.sh
//! installs it).
#![cfg(all(
    feature = "server",
    feature = "agent",
    feature = "admin",
    feature = "inference"
))]

mod common;

use common::{free_port, task, Server};
use openclaw::admin::flash::unit_text;
use openclaw::protocol::api::TaskState;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// An sshd on a free loopback port, as the current user, accepting one
/// throwaway client key.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    known_hosts: PathBuf,
    user: String,
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "openclaw-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(st.success());
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server (scripts/test-arm.sh does it)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let host_key = dir.join("host_key");
        let key = dir.join("client_key");
        keygen(&host_key);
        keygen(&key);
        let auth = dir.join("authorized_keys");
        std::fs::copy(dir.join("client_key.pub"), &auth).unwrap();
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            // sshd started by root insists on its privilege separation dir.
            std::fs::create_dir_all("/run/sshd").unwrap();
            std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let conf = dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {auth}\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\nLogLevel VERBOSE\n",
                hk = host_key.display(),
                pid = dir.join("sshd.pid").display(),
                auth = auth.display()
            ),
        )
        .unwrap();
        let log = dir.join("sshd.log");
        let port = free_port();
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(port.to_string())
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sshd");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "sshd exited ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sshd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The device's host key, pinned: flash with --known-hosts accepts
        // no other (StrictHostKeyChecking=yes).
        let known_hosts = dir.join("known_hosts");
        let pubkey = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {pubkey}")).unwrap();
        Sshd {
            child,
            port,
            key,
            known_hosts,
            user,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fake device: prefix, unit dir, fake systemctl and its records.
struct Device {
    prefix: PathBuf,
    unit_dir: PathBuf,
    systemctl: PathBuf,
    calls: PathBuf,
    pidfile: PathBuf,
    /// Stands in for systemd's notify socket (`NOTIFY_SOCKET`).
    notify: std::os::unix::net::UnixDatagram,
}

impl Device {
    fn new(dir: &Path) -> Device {
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let d = Device {
            prefix: dir.join("opt/openclaw"),
            unit_dir: dir.join("etc/systemd/system"),
            systemctl: dir.join("bin/systemctl"),
            calls: state.join("systemctl.calls"),
            pidfile: state.join("agent.pid"),
            notify: std::os::unix::net::UnixDatagram::bind(state.join("notify")).unwrap(),
        };
        std::fs::create_dir_all(d.systemctl.parent().unwrap()).unwrap();
        std::fs::write(
            &d.systemctl,
            format!(
                r#"#!/bin/sh
# Stand-in for systemctl: records each call; restart runs the unit's ExecStart.
echo "$*" >> {calls}
unit={unit}
pidf={pidf}
stop() {{
  if [ -f "$pidf" ]; then
    pid=$(cat "$pidf")
    kill "$pid" 2>/dev/null || true
    i=0
    while [ $i -lt 100 ] && kill -0 "$pid" 2>/dev/null && ! grep -q '^State:.*Z' /proc/"$pid"/status 2>/dev/null; do
      sleep 0.1; i=$((i+1))
    done
    rm -f "$pidf"
  fi
}}
case "$1" in
  daemon-reload|enable) ;;
  restart)
    stop
    cmd=$(sed -n 's/^ExecStart=//p' "$unit")
    wd=$(sed -n 's/^WorkingDirectory=//p' "$unit")
    cd "$wd" || exit 1
    # What systemd gives a Type=notify unit with a watchdog; a short period
    # (0.4 s, not the unit's WatchdogSec) so the test sees pings soon.
    if grep -q '^Type=notify' "$unit"; then
      export NOTIFY_SOCKET={notify} WATCHDOG_USEC=400000
    fi
    nohup $cmd >> {log} 2>&1 < /dev/null &
    echo $! > "$pidf" ;;
  stop) stop ;;
  *) echo "fake systemctl: unsupported: $*" >&2; exit 1 ;;
esac
"#,
                calls = d.calls.display(),
                unit = d.unit_dir.join("openclaw-agent.service").display(),
                pidf = d.pidfile.display(),
                log = state.join("agent.log").display(),
                notify = state.join("notify").display(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&d.systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn current(&self) -> Option<PathBuf> {
        std::fs::read_link(self.prefix.join("current")).ok()
    }

    fn releases(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.prefix.join("releases"))
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

struct Setup {
    sshd: Sshd,
    device: Device,
    board: PathBuf,
    binary: PathBuf,
    extra: PathBuf,
}

impl Setup {
    fn args(&self, broker: &str, http: &str) -> Vec<String> {
        let s = |p: &Path| p.display().to_string();
        vec![
            "--server".into(),
            broker.into(),
            "flash".into(),
            "--board".into(),
            s(&self.board),
            "--host".into(),
            format!("{}@127.0.0.1", self.sshd.user),
            "--port".into(),
            self.sshd.port.to_string(),
            "--identity".into(),
            s(&self.sshd.key),
            "--known-hosts".into(),
            s(&self.sshd.known_hosts),
            "--http".into(),
            http.into(),
            "--binary".into(),
            s(&self.binary),
            "--prefix".into(),
            s(&self.device.prefix),
            "--unit-dir".into(),
            s(&self.device.unit_dir),
            "--systemctl".into(),
            s(&self.device.systemctl),
            "--id".into(),
            "dev-1".into(),
            "--agent-config".into(),
            s(&self.extra),
            "--models-dir".into(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/models").into(),
            "--wait-secs".into(),
            "30".into(),
        ]
    }
}

/// `$VAR` if set, else cargo's build of the program. (On a machine where
/// several checkouts share one target dir, the uplifted binaries in
/// target/debug can come from another checkout; point these at deps/.)
fn program(var: &str, built: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| built.to_string())
}

fn admin(args: &[String]) -> Output {
    let out = Command::new(program(
        "OPENCLAW_TEST_ADMIN_BIN",
        env!("CARGO_BIN_EXE_openclaw-admin"),
    ))
    .args(args)
    .output()
    .expect("run openclaw-admin");
    eprintln!(
        "--- openclaw-admin {}\n{}{}",
        args.iter()
            .find(|a| *a == "--dry-run")
            .map(|_| "(dry run)")
            .unwrap_or(""),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.into(),
        None => {
            args.push(flag.into());
            args.push(value.into());
        }
    }
    args
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

#[test]
fn flash_installs_over_ssh_and_survives_failed_updates() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(&dir.path().join("ssh"));
    let server = Server::start(&dir.path().join("srv"), &[]);
    let device = Device::new(&dir.path().join("device"));

    // A board profile file with a model, for the host's architecture.
    let board = dir.path().join("flashsim.toml");
    let sim = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/boards/sim.toml"))
        .unwrap()
        .replace("name = \"sim\"", "name = \"flashsim\"")
        .replace("models = []", "models = [\"sensor_anomaly\"]");
    assert!(sim.contains("flashsim") && sim.contains("sensor_anomaly"));
    std::fs::write(&board, &sim).unwrap();
    // The host agent without its debug info (the unstripped one is ~0.5 GB).
    let binary = dir.path().join("openclaw-agent");
    let st = Command::new("strip")
        .arg("-o")
        .arg(&binary)
        .arg(program(
            "OPENCLAW_TEST_AGENT_BIN",
            env!("CARGO_BIN_EXE_openclaw-agent"),
        ))
        .status()
        .expect("strip (binutils)");
    assert!(st.success());
    let extra = dir.path().join("extra.toml");
    std::fs::write(
        &extra,
        "[mqtt]\nkeep_alive_secs = 1\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
         [agent]\nheartbeat_ms = 300\n",
    )
    .unwrap();
    let setup = Setup {
        sshd,
        device,
        board,
        binary,
        extra,
    };
    let dev = &setup.device;
    let good = setup.args(&server.broker(), &server.http);

    // --- dry run: prints the commands, touches nothing ---
    let out = admin(&[good.clone(), vec!["--dry-run".into()]].concat());
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for step in [
        "connect",
        "stage",
        "verify",
        "unit",
        "swap",
        "restart",
        "heartbeat",
    ] {
        assert!(err.contains(&format!("[{step}]")), "{step}: {err}");
    }
    assert!(
        err.contains("-o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=3"),
        "{err}"
    );
    assert!(!dev.prefix.exists() && dev.calls().is_empty());

    // --- first install ---
    let out = admin(&good);
    assert!(out.status.success(), "first flash failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("device dev-1 online"), "{stdout}");
    let first = dev.current().expect("current symlink");
    assert!(first.starts_with("releases"), "{first:?}");
    let rel = dev.prefix.join(&first);
    let rel_s = rel.display().to_string();
    let pre = dev.prefix.display().to_string();

    // The files.
    let bin = rel.join("bin/openclaw-agent");
    assert_eq!(read(&bin), read(&setup.binary), "binary differs");
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(read(rel.join("board.toml")), sim.as_bytes());
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/models");
    assert_eq!(
        read(rel.join("models/sensor_anomaly.toml")),
        read(format!("{models}/sensor_anomaly.toml"))
    );
    assert_eq!(
        read(rel.join("models/sensor/sensor_anomaly.onnx")),
        read(format!("{models}/sensor/sensor_anomaly.onnx"))
    );
    let cfg: toml::Table = std::fs::read_to_string(rel.join("agent.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cfg["id"].as_str(), Some("dev-1"));
    assert_eq!(
        cfg["board"].as_str(),
        Some(format!("{rel_s}/board.toml").as_str())
    );
    assert_eq!(
        cfg["data_dir"].as_str(),
        Some(format!("{pre}/data").as_str())
    );
    assert_eq!(
        cfg["mqtt"]["broker"].as_str(),
        Some(server.broker().as_str())
    );
    assert_eq!(cfg["mqtt"]["keep_alive_secs"].as_integer(), Some(1));
    assert_eq!(cfg["agent"]["heartbeat_ms"].as_integer(), Some(300));
    // Over-the-air updates install into this layout (keys: --ota-key).
    assert_eq!(cfg["ota"]["prefix"].as_str(), Some(pre.as_str()));
    assert_eq!(
        cfg["plugins"]["infer"]["models_dir"].as_str(),
        Some(format!("{rel_s}/models").as_str())
    );
    let unit = std::fs::read_to_string(dev.unit_dir.join("openclaw-agent.service")).unwrap();
    assert_eq!(unit, unit_text(&pre, "flashsim"));
    assert!(unit.contains(&format!(
        "\nExecStart={pre}/current/bin/openclaw-agent --config {pre}/current/agent.toml\n"
    )));
    assert!(unit.contains("\nRestart=on-failure\n") && unit.contains("\nStartLimitBurst=10\n"));
    assert!(unit.contains(&format!(
        "\nExecStartPre=-{pre}/good/bin/openclaw-agent --ota-guard {pre}\n"
    )));
    assert!(unit.contains("\nType=notify\n") && unit.contains("\nWatchdogSec=30\n"));
    assert_eq!(read(rel.join("openclaw-agent.service")), unit.as_bytes());
    assert!(dev.prefix.join("data").is_dir());
    assert_eq!(
        dev.calls(),
        [
            "daemon-reload",
            "enable openclaw-agent.service",
            "restart openclaw-agent.service"
        ]
    );

    // The agent runs from the install and works.
    let pid1 = dev.pid().expect("agent pid");
    // It speaks systemd's notify protocol: READY=1, then watchdog pings.
    dev.notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen = Vec::new();
    while !(seen.iter().any(|m: &String| m.starts_with("READY=1"))
        && seen.iter().filter(|m| m.as_str() == "WATCHDOG=1\n").count() >= 2)
    {
        let mut buf = [0u8; 512];
        let n = dev
            .notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no sd_notify message from the agent ({e}); got {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(seen[0].starts_with("READY=1\nSTATUS=agent "), "{seen:?}");
    assert!(alive(pid1));
    let exe = std::fs::read_link(format!("/proc/{pid1}/exe")).unwrap();
    assert!(exe.starts_with(&rel), "{exe:?}");
    let devices = server.client.devices().unwrap();
    let d = devices.iter().find(|d| d.id == "dev-1").unwrap();
    assert!(d.online);
    assert_eq!(d.board, "flashsim");
    assert!(
        d.capabilities.contains(&"model:sensor_anomaly".to_string()),
        "{:?}",
        d.capabilities
    );
    let mut t = task("echo", json!({"flashed": true}));
    t.target = Some("dev-1".into());
    let r = server.wait(&server.submit(t));
    assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
    assert_eq!(r.result, Some(json!({"flashed": true})));

    let untouched = |what: &str| {
        assert_eq!(
            dev.current().as_ref(),
            Some(&first),
            "{what}: current moved"
        );
        assert_eq!(dev.pid(), Some(pid1), "{what}: agent restarted");
        assert!(alive(pid1), "{what}: agent died");
        assert_eq!(
            std::fs::read_to_string(dev.unit_dir.join("openclaw-agent.service")).unwrap(),
            unit,
            "{what}: unit changed"
        );
    };

    // --- failure at `connect`: nothing listens on the port ---
    let releases = dev.releases();
    let out = admin(&with(good.clone(), "--port", &free_port().to_string()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `connect` failed"), "{err}");
    assert!(err.contains("Nothing on the device was changed"), "{err}");
    untouched("bad port");
    assert_eq!(dev.releases(), releases);

    // --- failure at `connect`: no systemctl on the device ---
    let out = admin(&with(good.clone(), "--systemctl", "/nonexistent/systemctl"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `connect` failed"), "{err}");
    assert!(
        err.contains("/nonexistent/systemctl not found on the device"),
        "{err}"
    );
    untouched("no systemctl");
    assert_eq!(dev.releases(), releases);

    // --- failure at `verify`: the agent refuses the configuration ---
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[agent]\nheartbeat_ms = 300\nturbo = true\n").unwrap();
    let out = admin(&with(
        good.clone(),
        "--agent-config",
        &bad.display().to_string(),
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `verify` failed"), "{err}");
    assert!(err.contains("turbo"), "{err}");
    assert!(err.contains("upload was removed"), "{err}");
    untouched("bad config");
    assert_eq!(dev.releases(), releases);
    assert_eq!(dev.calls().len(), 3, "systemctl was called");

    // --- failure at `connect`: the device's key is not the pinned one ---
    let other = dir.path().join("other_known_hosts");
    let other_key = dir.path().join("other_host_key");
    keygen(&other_key);
    std::fs::write(
        &other,
        format!(
            "[127.0.0.1]:{} {}",
            setup.sshd.port,
            std::fs::read_to_string(dir.path().join("other_host_key.pub")).unwrap()
        ),
    )
    .unwrap();
    let out = admin(&with(
        good.clone(),
        "--known-hosts",
        &other.display().to_string(),
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `connect` failed"), "{err}");
    assert!(err.contains("Host key verification failed"), "{err}");
    untouched("unpinned host key");
    assert_eq!(dev.releases(), releases);

    // --- refused at `prepare`: a --host ssh would read as an option ---
    let marker = dir.path().join("proxy-ran");
    let mut args = good.clone();
    let i = args.iter().position(|a| a == "--host").unwrap();
    // `--host=...`: the value itself, as a script might pass it.
    args[i] = format!("--host=-oProxyCommand=touch {}", marker.display());
    args.remove(i + 1);
    let out = admin(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step `prepare` failed") && err.contains("--host"),
        "{err}"
    );
    assert!(!marker.exists(), "ssh ran the host as an option");

    // --- refused at `prepare`: a board name that would break the unit ---
    let evil = dir.path().join("evil.toml");
    std::fs::write(
        &evil,
        sim.replace(
            "name = \"flashsim\"",
            "name = \"x\\nExecStartPre=/bin/false\"",
        ),
    )
    .unwrap();
    let out = admin(&with(good.clone(), "--board", &evil.display().to_string()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step `prepare` failed") && err.contains("board name"),
        "{err}"
    );
    untouched("bad board name");

    // --- failure at `verify` by time: a binary that never finishes is
    // stopped by the step's time limit (GNU `yes` refuses `--config`, so a
    // tiny ELF program that ignores its arguments and waits stands in) ---
    let hang_c = dir.path().join("hang.c");
    std::fs::write(
        &hang_c,
        "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n",
    )
    .unwrap();
    let hang = dir.path().join("hang");
    let cc = std::process::Command::new("cc")
        .arg("-o")
        .arg(&hang)
        .arg(&hang_c)
        .status()
        .expect("cc (build-essential) builds the stand-in for a hung agent");
    assert!(cc.success());
    let out = admin(&with(
        with(good.clone(), "--binary", hang.to_str().unwrap()),
        "--step-timeout-secs",
        "3",
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `verify` failed"), "{err}");
    assert!(
        err.contains("timed out after 3 s") || err.contains("did not finish within 3 s"),
        "{err}"
    );
    assert!(err.contains("upload was removed"), "{err}");
    untouched("hung verify");
    assert_eq!(dev.releases(), releases);

    // `current` as an absolute link (as a hand install or another tool may
    // leave it): the rollback below must still find the previous release.
    let abs = dev.prefix.join(".current.abs");
    std::os::unix::fs::symlink(&rel, &abs).unwrap();
    std::fs::rename(&abs, dev.prefix.join("current")).unwrap();

    // --- failure at `heartbeat`: the new agent cannot reach its broker;
    // the previous release is restored and restarted, and its heartbeat
    // confirms the rollback ---
    let nowhere = format!("mqtt://127.0.0.1:{}", free_port());
    let args = with(setup.args(&nowhere, &server.http), "--wait-secs", "3");
    let out = admin(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `heartbeat` failed"), "{err}");
    assert!(err.contains("no heartbeat from dev-1"), "{err}");
    assert!(err.contains("Rolled back"), "{err}");
    assert!(
        err.contains("its heartbeat arrived (device dev-1 online)"),
        "{err}"
    );
    assert_eq!(dev.current().as_ref(), Some(&first), "not rolled back");
    let pid2 = dev.pid().unwrap();
    assert_ne!(pid2, pid1);
    let exe = std::fs::read_link(format!("/proc/{pid2}/exe")).unwrap();
    assert!(exe.starts_with(&rel), "rolled back agent runs {exe:?}");
    assert_eq!(dev.calls().len(), 3 + 3 + 2, "{:?}", dev.calls());
    assert_eq!(dev.releases().len(), 2, "the failed release is kept");
    server.wait_online("dev-1");

    // --- update: a new release; the failed one is pruned ---
    let out = admin(&good);
    assert!(out.status.success(), "update failed");
    let second = dev.current().unwrap();
    assert_ne!(second, first);
    let mut expect = vec![
        first.file_name().unwrap().to_string_lossy().into_owned(),
        second.file_name().unwrap().to_string_lossy().into_owned(),
    ];
    expect.sort();
    assert_eq!(dev.releases(), expect);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("previous: {}", expect[0])),
        "{stdout}"
    );
    let pid3 = dev.pid().unwrap();
    assert!(alive(pid3) && !alive(pid2));
    let mut t = task("echo", json!({"n": 2}));
    t.target = Some("dev-1".into());
    let r = server.wait(&server.submit(t));
    assert_eq!(r.result, Some(json!({"n": 2})), "{r:?}");
}

/// Into a fleet made by `openclaw-admin init`: API tokens required, the
/// broker on mutual TLS with logins required. `flash --credentials` takes
/// the device's bundle (`agents/dev-1`): its password, the CA and its client
/// certificate go into the release, readable by their owner only where
/// secret; the installed agent logs in over TLS with its password, and the
/// heartbeat check reads the devices with the token.
#[test]
fn flash_installs_init_credentials_into_a_secured_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = d.join("site");
    let out = Command::new(program(
        "OPENCLAW_TEST_ADMIN_BIN",
        env!("CARGO_BIN_EXE_openclaw-admin"),
    ))
    .args(["--json", "init", "--dir", site.to_str().unwrap()])
    .args(["--model-path", d.join("models").to_str().unwrap()])
    .args(["--host", "localhost", "--device", "dev-1"])
    .args(["--http-port", "0", "--mqtt-port", "0"])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["admin_token"].as_str().unwrap().to_string();
    let server = Server::start(
        Path::new(v["data_dir"].as_str().unwrap()),
        &[
            "--config",
            v["server_config"].as_str().unwrap(),
            "--auth",
            "required",
        ],
    );
    let port = server.broker().rsplit(':').next().unwrap().to_string();
    let broker = format!("mqtts://localhost:{port}");

    let board = d.join("flashsim.toml");
    let sim = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/boards/sim.toml"))
        .unwrap()
        .replace("name = \"sim\"", "name = \"flashsim\"");
    std::fs::write(&board, &sim).unwrap();
    let binary = d.join("openclaw-agent");
    let st = Command::new("strip")
        .arg("-o")
        .arg(&binary)
        .arg(program(
            "OPENCLAW_TEST_AGENT_BIN",
            env!("CARGO_BIN_EXE_openclaw-agent"),
        ))
        .status()
        .expect("strip (binutils)");
    assert!(st.success());
    let extra = d.join("extra.toml");
    std::fs::write(
        &extra,
        "[mqtt]\nkeep_alive_secs = 1\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
         [agent]\nheartbeat_ms = 300\n",
    )
    .unwrap();
    let setup = Setup {
        sshd: Sshd::start(&d.join("ssh")),
        device: Device::new(&d.join("device")),
        board,
        binary,
        extra,
    };
    let bundle = site.join("agents/dev-1");
    let args = with(
        setup.args(&broker, &server.http),
        "--credentials",
        bundle.to_str().unwrap(),
    );
    let out = admin(&with(args, "--token", &token));
    assert!(out.status.success(), "flash with credentials failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("device dev-1 online"));
    let rel = setup.device.prefix.join(setup.device.current().unwrap());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&rel.join("credentials/client.key")), 0o600);
    assert_eq!(mode(&rel.join("agent.toml")), 0o600);
    let cfg = String::from_utf8(read(rel.join("agent.toml"))).unwrap();
    assert!(cfg.contains("password = "), "{cfg}");
    assert!(
        cfg.contains(&format!("{}/credentials/ca.pem", rel.display())),
        "{cfg}"
    );
}
