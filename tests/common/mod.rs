//! Test harness: real server, agent and mosquitto processes on loopback.
#![allow(dead_code)]

pub mod golden;
pub mod ota;

use openclaw::admin::Client;
use openclaw::protocol::api::{DeviceView, SubmitRequest, TaskState, TaskView};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A free loopback port: bound on 127.0.0.1:0, then released for a child
/// process that needs a concrete number (mosquitto, a restart on the same port).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kill(child: &mut Child) {
    // SIGKILL: no goodbye, like a power cut.
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `openclaw-server` process.
pub struct Server {
    child: Child,
    pub http: String,
    pub http_port: u16,
    pub mqtt_port: u16,
    pub data_dir: PathBuf,
    pub client: Client,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server with the embedded broker on free ports.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::spawn(data_dir, 0, Some(0), extra)
    }

    /// Starts a server using an external broker.
    pub fn start_with_broker(data_dir: &Path, broker_port: u16, extra: &[&str]) -> Server {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.push("--broker".into());
        args.push(format!("mqtt://127.0.0.1:{broker_port}"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut s = Self::spawn(data_dir, 0, None, &refs);
        s.mqtt_port = broker_port;
        s
    }

    fn spawn(data_dir: &Path, http_port: u16, mqtt_port: Option<u16>, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_openclaw-server"));
        cmd.arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(http_port.to_string())
            .arg("--data-dir")
            .arg(data_dir);
        if let Some(p) = mqtt_port {
            cmd.arg("--mqtt-port").arg(p.to_string());
        }
        // Loopback, so tests without `--auth required` need no token.
        if !extra.contains(&"--auth") {
            cmd.args(["--auth", "off"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info,rumqttd=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn openclaw-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server printed no ready line within 30 s");
        assert!(line.starts_with("openclaw-server ready"), "{line}");
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .to_string()
        };
        let http = field("http=");
        let mqtt = field("mqtt=");
        let http_port = http.rsplit(':').next().unwrap().parse().unwrap();
        let mqtt_port = mqtt.rsplit(':').next().unwrap().parse().unwrap();
        let url = format!("http://{http}");
        Server {
            child,
            client: Client::new(&url),
            http: url,
            http_port,
            mqtt_port,
            data_dir: data_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Waits up to `within` for the server process to end on its own.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// SIGKILLs and starts it again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.kill();
        let extra: Vec<String> = self.extra.clone();
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let embedded = !refs.contains(&"--broker");
        let next = Self::spawn(
            &self.data_dir.clone(),
            self.http_port,
            embedded.then_some(self.mqtt_port),
            &refs,
        );
        let old = std::mem::replace(self, next);
        drop(old); // already killed and reaped
    }

    pub fn broker(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// Submits and returns the task id.
    pub fn submit(&self, req: SubmitRequest) -> String {
        self.client.submit(&req).expect("submit").id
    }

    /// Waits for a terminal state.
    pub fn wait(&self, id: &str) -> TaskView {
        let t = self
            .client
            .wait(id, Duration::from_secs(60))
            .expect("wait for task");
        assert!(t.state.is_terminal(), "task {id} still {:?}", t.state);
        t
    }

    /// Waits until `pred` holds for the device list.
    pub fn wait_devices(&self, what: &str, pred: impl Fn(&[DeviceView]) -> bool) {
        let start = Instant::now();
        loop {
            if let Ok(d) = self.client.devices() {
                if pred(&d) {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting: {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_online(&self, id: &str) {
        self.wait_devices(&format!("{id} online"), |d| {
            d.iter().any(|d| d.id == id && d.online)
        });
    }

    pub fn wait_offline(&self, id: &str) {
        self.wait_devices(&format!("{id} offline"), |d| {
            d.iter().any(|d| d.id == id && !d.online)
        });
    }

    /// Waits for a workflow run to end (long polls); its view.
    pub fn workflow_end(&self, id: &str, within: Duration) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let v = self.client.workflow_get(id, Some(5000)).unwrap();
            if v["state"] != "running" {
                return v;
            }
            assert!(t.elapsed() < within, "run {id} still running: {v:#}");
        }
    }

    /// Waits until `pred` holds for a workflow run's view.
    pub fn workflow_until(
        &self,
        id: &str,
        what: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t = Instant::now();
        loop {
            if let Ok(v) = self.client.workflow_get(id, None) {
                if pred(&v) {
                    return v;
                }
                assert!(t.elapsed() < within, "timed out waiting for {what}: {v:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A running `openclaw-agent` process.
pub struct Agent {
    child: Child,
    pub id: String,
}

impl Agent {
    /// Starts an agent with fast heartbeats; `config` is extra TOML.
    pub fn start(dir: &Path, id: &str, broker: &str, config: &str) -> Agent {
        Self::start_with(dir, id, broker, config, &[])
    }

    /// Like [`Agent::start`], the binary run through `prefix` (e.g.
    /// `ip netns exec NAME`, which execs it: the child is the agent).
    pub fn start_with(dir: &Path, id: &str, broker: &str, config: &str, prefix: &[&str]) -> Agent {
        Self::spawn(dir, id, broker, config, prefix, "sim")
    }

    /// Like [`Agent::start`], on board profile `board` (`pc`: a heavy node).
    pub fn start_on(dir: &Path, id: &str, broker: &str, config: &str, board: &str) -> Agent {
        Self::spawn(dir, id, broker, config, &[], board)
    }

    /// Starts an agent that logs in to the broker with this password.
    pub fn start_with_login(dir: &Path, id: &str, broker: &str, password: &str) -> Agent {
        let mqtt = format!("password = {password:?}\n");
        Self::spawn_full(dir, id, broker, "", &[], "sim", &mqtt)
    }

    fn spawn(
        dir: &Path,
        id: &str,
        broker: &str,
        config: &str,
        prefix: &[&str],
        board: &str,
    ) -> Agent {
        Self::spawn_full(dir, id, broker, config, prefix, board, "")
    }

    fn spawn_full(
        dir: &Path,
        id: &str,
        broker: &str,
        config: &str,
        prefix: &[&str],
        board: &str,
        mqtt: &str,
    ) -> Agent {
        let data = dir.join(format!("agent-{id}"));
        std::fs::create_dir_all(&data).unwrap();
        let cfg = data.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "[mqtt]\n{mqtt}keep_alive_secs = 1\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
                 [agent]\nheartbeat_ms = 300\nresult_resend_ms = 500\n{config}\n"
            ),
        )
        .unwrap();
        let bin = env!("CARGO_BIN_EXE_openclaw-agent");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("--config")
            .arg(&cfg)
            .arg("--id")
            .arg(id)
            .arg("--broker")
            .arg(broker)
            .arg("--data-dir")
            .arg(&data)
            .arg("--board")
            .arg(board)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn openclaw-agent");
        Agent {
            child,
            id: id.to_string(),
        }
    }

    /// SIGKILLs the agent.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// SIGTERM: a graceful stop (publishes its offline status).
    pub fn stop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the agent.
    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A real mosquitto broker on a free loopback port.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    conf: PathBuf,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        Self::start_with(dir, "")
    }

    /// Like `start`, with `extra` lines for the listener (TLS files, ...).
    pub fn start_with(dir: &Path, extra: &str) -> Mosquitto {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                 persistence false\nmax_packet_size 2000000\n{extra}"
            ),
        )
        .unwrap();
        Self::spawn(conf, port)
    }

    /// mosquitto with a config file of its own, whose `listener` is on `port`.
    pub fn start_file(conf: &Path, port: u16) -> Mosquitto {
        Self::spawn(conf.to_path_buf(), port)
    }

    /// SIGHUP: mosquitto reloads its password and ACL files.
    pub fn reload(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP mosquitto");
    }

    /// SIGKILLs the broker (its sessions and queued messages are gone:
    /// `persistence false`) and starts a new one on the same port.
    pub fn restart(&mut self) {
        kill(&mut self.child);
        let next = Self::spawn(self.conf.clone(), self.port);
        let old = std::mem::replace(self, next);
        drop(old); // already killed and reaped
    }

    fn spawn(conf: PathBuf, port: u16) -> Mosquitto {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is not installed: run scripts/test.sh (apt-get install mosquitto)");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto { child, port, conf }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A submission with defaults.
pub fn task(plugin: &str, input: serde_json::Value) -> SubmitRequest {
    SubmitRequest::new(plugin, input)
}

pub fn succeeded(t: &TaskView) -> bool {
    t.state == TaskState::Succeeded
}

/// A plain MQTT client on a test broker: publishes raw payloads and
/// collects what arrives on its subscriptions.
pub struct MqttPeer {
    pub client: rumqttc::Client,
    pub rx: std::sync::mpsc::Receiver<rumqttc::Publish>,
}

impl MqttPeer {
    /// Connects and returns once every subscription is acknowledged.
    pub fn connect(port: u16, id: &str, subscribe: &[&str]) -> MqttPeer {
        Self::connect_as(port, id, None, subscribe)
    }

    /// [`MqttPeer::connect`] with a login (user, password).
    pub fn connect_as(
        port: u16,
        id: &str,
        login: Option<(&str, &str)>,
        subscribe: &[&str],
    ) -> MqttPeer {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_max_packet_size(4 << 20, 4 << 20);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut conn) = rumqttc::Client::new(opts, 64);
        for t in subscribe {
            client.subscribe(*t, rumqttc::QoS::AtLeastOnce).unwrap();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let n = subscribe.len();
        std::thread::spawn(move || {
            let mut acked = 0;
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        acked += 1;
                        if acked == n {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) if n == 0 => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("peer subscribed");
        MqttPeer { client, rx }
    }

    /// Whether the broker takes this login: the first answer to a
    /// connection attempt (ConnAck, or the connection dropped).
    pub fn login_accepted(port: u16, id: &str, login: Option<(&str, &str)>) -> bool {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (_client, mut conn) = rumqttc::Client::new(opts, 8);
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    return a.code == rumqttc::ConnectReturnCode::Success
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    pub fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// The next message on `topic` (others are skipped), within 20 s.
    pub fn next_on(&self, topic: &str) -> rumqttc::Publish {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("nothing on {topic}"));
            if p.topic == topic {
                return p;
            }
        }
    }

    /// The next message on any subscription, within 20 s.
    pub fn next(&self) -> rumqttc::Publish {
        self.rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a message within 20 s")
    }
}

/// Waits until `GET /v1/tools` satisfies `pred`; the list then.
pub fn wait_tools(
    server: &Server,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        if let Ok(v) = server.client.tools() {
            let list = v["tools"].as_array().cloned().unwrap_or_default();
            if pred(&list) {
                return list;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for the tools"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A token made offline with `openclaw-admin token create`, straight into
/// the data dir `dir` (how the first admin token is made).
pub fn offline_token(dir: &Path, role: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
        .args(["token", "create", "--role", role, "--data-dir"])
        .arg(dir)
        .args(extra)
        .env_remove("OPENCLAW_TOKEN")
        .output()
        .unwrap();
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(token.starts_with("oc_"), "{token}");
    token
}

/// The chat model the `llm` tests run (the real Qwen2.5-Coder-0.5B-Instruct
/// GGUF, fetched by `openclaw-admin models fetch`).
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct";

/// The heavy node's config for [`QWEN`] with `context` tokens and `slots`
/// sequences; fails, saying how to fetch it, when the GGUF is missing.
/// One llama.cpp thread: two on two busy cores fall from ~30 to ~1 token/s.
pub fn qwen_node_config(context: u32, slots: u32) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llm");
    let gguf = dir.join("cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    assert!(
        gguf.exists(),
        "{} is missing: run `cargo run --bin openclaw-admin -- models fetch {QWEN}` \
         (scripts/test.sh does)",
        gguf.display()
    );
    format!(
        "[plugins.llm]\nmodels_dir = {:?}\nthreads = 1\n\
         [plugins.llm.models.\"{QWEN}\"]\ncontext = {context}\nslots = {slots}\n",
        dir.display().to_string()
    )
}
