//! `openclaw-admin bench dispatch`: a real server process, N in-process
//! agents (each with its own MQTT connection), M echo tasks pushed by C
//! concurrent HTTP clients, and, in the same run, the baseline: a raw MQTT
//! request/reply round trip through the same broker without OpenClaw.

use super::{AdminError, Client};
use crate::agent::{Agent, AgentConfig};
use crate::config::override_table;
use crate::protocol::api::{SubmitRequest, TaskState};
use rumqttc::{Event, MqttOptions, Packet, QoS};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What to run.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    pub agents: usize,
    pub tasks: usize,
    pub concurrency: usize,
    pub plugin: String,
    /// The `openclaw-server` binary to start.
    pub server_bin: PathBuf,
    /// Sequential round trips for the raw MQTT baseline.
    pub baseline_round_trips: usize,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Summarizes a non-empty set of samples.
    pub fn of(mut v: Vec<Duration>) -> Percentiles {
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let at = |p: f64| ms(v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]);
        Percentiles {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            mean_ms: ms(v.iter().sum::<Duration>() / v.len().max(1) as u32),
            max_ms: v.last().map(|d| ms(*d)).unwrap_or(0.0),
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DispatchReport {
    pub agents: usize,
    pub tasks: usize,
    pub concurrency: usize,
    pub wall_s: f64,
    pub throughput_per_s: f64,
    pub latency: Percentiles,
    /// Tasks that did not succeed.
    pub lost: usize,
    /// Tasks dispatched more than once (re-dispatches after loss or busy).
    pub redispatched: usize,
    /// Results that were not the task's own input echoed back.
    pub wrong: usize,
    /// Server CPU over the load phase, percent of one core.
    pub server_cpu_percent: f64,
    pub server_rss_kb: u64,
    pub server_peak_rss_kb: u64,
    /// This process: the agents plus the benchmark's HTTP clients.
    pub agents_process_rss_kb: u64,
    pub baseline_mqtt_rtt: Percentiles,
    /// OpenClaw's p50 over the raw MQTT round trip's p50.
    pub p50_ratio_to_baseline: f64,
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

struct ServerProc(Child);

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench_err(message: impl Into<String>) -> AdminError {
    AdminError::BadAnswer {
        url: "bench".into(),
        message: message.into(),
    }
}

fn start_server(bin: &Path, dir: &Path) -> Result<(ServerProc, String, u16), AdminError> {
    let mut child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", "0", "--mqtt-port", "0"])
        .arg("--data-dir")
        .arg(dir.join("server"))
        .env("RUST_LOG", "warn,rumqttd=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| AdminError::Io {
            path: bin.to_path_buf(),
            source,
        })?;
    let stdout = child.stdout.take().expect("piped");
    let proc = ServerProc(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| bench_err(format!("server output: {e}")))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(String::from)
    };
    let (Some(http), Some(mqtt)) = (field("http="), field("mqtt=")) else {
        return Err(bench_err(format!("server did not get ready: {line:?}")));
    };
    let port = mqtt
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bench_err(format!("bad mqtt address {mqtt}")))?;
    Ok((proc, format!("http://{http}"), port))
}

/// Sequential QoS 1 request/reply through the broker between two plain
/// clients: what a round trip costs without OpenClaw.
async fn mqtt_baseline(port: u16, n: usize) -> Result<Vec<Duration>, AdminError> {
    let opts = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        o
    };
    let (responder, mut rel) = crate::mqtt::client(opts("bench-responder"), 64);
    let (requester, mut qel) = crate::mqtt::client(opts("bench-requester"), 64);
    responder
        .subscribe("openclaw-bench/req", QoS::AtLeastOnce)
        .await
        .map_err(|e| bench_err(e.to_string()))?;
    requester
        .subscribe("openclaw-bench/rep", QoS::AtLeastOnce)
        .await
        .map_err(|e| bench_err(e.to_string()))?;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(4);
    let r2 = responder.clone();
    let rtx = ready_tx.clone();
    let resp_task = tokio::spawn(async move {
        while let Ok(ev) = rel.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = rtx.send(()).await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = r2
                        .publish("openclaw-bench/rep", QoS::AtLeastOnce, false, p.payload)
                        .await;
                }
                _ => {}
            }
        }
    });
    let (rep_tx, mut rep_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let req_task = tokio::spawn(async move {
        while let Ok(ev) = qel.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = ready_tx.send(()).await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = rep_tx.send(p.payload.to_vec()).await;
                }
                _ => {}
            }
        }
    });
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .map_err(|_| bench_err("baseline clients did not subscribe"))?;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let body = format!("{i}").into_bytes();
        let t = Instant::now();
        requester
            .publish("openclaw-bench/req", QoS::AtLeastOnce, false, body.clone())
            .await
            .map_err(|e| bench_err(e.to_string()))?;
        loop {
            let got = tokio::time::timeout(Duration::from_secs(10), rep_rx.recv())
                .await
                .map_err(|_| bench_err("baseline reply did not come"))?
                .ok_or_else(|| bench_err("baseline requester stopped"))?;
            if got == body {
                break;
            }
        }
        if i >= 20 {
            out.push(t.elapsed());
        }
    }
    resp_task.abort();
    req_task.abort();
    Ok(out)
}

/// Runs the benchmark. Blocking; starts its own runtime for the agents.
pub fn dispatch(opts: &DispatchOptions) -> Result<DispatchReport, AdminError> {
    if opts.agents == 0 || opts.tasks == 0 || opts.concurrency == 0 {
        return Err(bench_err(
            "--agents, --tasks and --concurrency must be at least 1",
        ));
    }
    let dir = std::env::temp_dir().join(format!("openclaw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| AdminError::Io {
        path: dir.clone(),
        source,
    })?;
    let result = run_in(&dir, opts);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, opts: &DispatchOptions) -> Result<DispatchReport, AdminError> {
    let (server, http, mqtt_port) = start_server(&opts.server_bin, dir)?;
    let server_pid = server.0.id();
    let rt = tokio::runtime::Runtime::new().map_err(|e| bench_err(e.to_string()))?;
    let stop = CancellationToken::new();
    for i in 0..opts.agents {
        let o = override_table([
            ("id", format!("bench-{i}").into()),
            (
                "mqtt.broker",
                format!("mqtt://127.0.0.1:{mqtt_port}").into(),
            ),
            (
                "data_dir",
                dir.join(format!("agent-{i}")).display().to_string().into(),
            ),
            ("agent.heartbeat_ms", 1000i64.into()),
        ]);
        let cfg = AgentConfig::load(None, o).map_err(|e| bench_err(e.to_string()))?;
        let agent = Agent::new(cfg).map_err(|e| bench_err(e.to_string()))?;
        let token = stop.clone();
        rt.spawn(async move {
            if let Err(e) = agent.run(token).await {
                log::error!("bench agent: {e}");
            }
        });
    }
    let client = Client::new(&http);
    let start = Instant::now();
    loop {
        let online = client.devices()?.iter().filter(|d| d.online).count();
        if online == opts.agents {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(bench_err(format!(
                "only {online} of {} agents came online",
                opts.agents
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let baseline = rt.block_on(mqtt_baseline(mqtt_port, opts.baseline_round_trips))?;

    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(opts.tasks)));
    let cpu0 = cpu_ticks(server_pid);
    let t0 = Instant::now();
    let workers: Vec<_> = (0..opts.concurrency)
        .map(|_| {
            let (next, results, client, plugin) = (
                next.clone(),
                results.clone(),
                Client::new(&http),
                opts.plugin.clone(),
            );
            let total = opts.tasks;
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let input = serde_json::json!({ "i": i });
                let req = SubmitRequest::new(plugin.clone(), input.clone());
                let t = Instant::now();
                let outcome = client
                    .submit(&req)
                    .and_then(|r| client.wait(&r.id, Duration::from_secs(120)));
                let el = t.elapsed();
                results.lock().unwrap().push((
                    el,
                    outcome
                        .ok()
                        .map(|v| (v.state, v.attempts, v.result == Some(input))),
                ));
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let wall = t0.elapsed();
    let cpu1 = cpu_ticks(server_pid);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let server_rss_kb = proc_field(server_pid, "VmRSS:");
    let server_peak_rss_kb = proc_field(server_pid, "VmHWM:");
    let agents_process_rss_kb = proc_field(std::process::id(), "VmRSS:");
    stop.cancel();
    rt.shutdown_timeout(Duration::from_secs(3));
    drop(server);

    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut lat = Vec::with_capacity(results.len());
    let (mut lost, mut redispatched, mut wrong) = (0, 0, 0);
    for (el, r) in results {
        lat.push(el);
        match r {
            Some((TaskState::Succeeded, attempts, same)) => {
                redispatched += usize::from(attempts > 1);
                wrong += usize::from(!same && opts.plugin == "echo");
            }
            _ => lost += 1,
        }
    }
    let latency = Percentiles::of(lat);
    let baseline_mqtt_rtt = Percentiles::of(baseline);
    Ok(DispatchReport {
        agents: opts.agents,
        tasks: opts.tasks,
        concurrency: opts.concurrency,
        wall_s: wall.as_secs_f64(),
        throughput_per_s: opts.tasks as f64 / wall.as_secs_f64(),
        p50_ratio_to_baseline: latency.p50_ms / baseline_mqtt_rtt.p50_ms.max(1e-9),
        latency,
        lost,
        redispatched,
        wrong,
        server_cpu_percent: (cpu1 - cpu0) as f64 / hz / wall.as_secs_f64() * 100.0,
        server_rss_kb,
        server_peak_rss_kb,
        agents_process_rss_kb,
        baseline_mqtt_rtt,
    })
}
