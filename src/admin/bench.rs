//! `openclaw-admin bench dispatch`: a real server process, N in-process
//! agents (each with its own MQTT connection), M echo tasks pushed by C
//! concurrent HTTP clients (or a window of C submissions over the MQTT
//! submit topic), optionally paced to a fixed rate, and, in the same run,
//! the baseline: a raw MQTT request/reply round trip through the same
//! broker without OpenClaw.

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
    /// How tasks are submitted and awaited.
    pub via: SubmitVia,
    /// Offered load in tasks/s (open loop, paced); `None`: as fast as the
    /// `concurrency` clients go.
    pub rate: Option<f64>,
    /// The server's `storage.synchronous` (`full`, its default, or `normal`).
    pub server_sync: String,
    /// The agents' `storage.fsync` (`always`, the default, `batch`, `never`).
    pub agent_fsync: String,
    /// Tasks no device can take, queued before the load (targeted at an
    /// agent that went offline) and still queued at the end.
    pub parked: usize,
}

/// How the benchmark's clients submit tasks and wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubmitVia {
    /// `POST /v1/tasks`, then `GET /v1/tasks/{id}?wait_ms=` (long poll),
    /// by `concurrency` blocking clients, each on its own connection.
    Http,
    /// `POST /v1/tasks?wait_ms=`: submit and wait in one request, by
    /// `concurrency` blocking clients.
    HttpWait,
    /// JSON on `openclaw/v1/submit` with `reply_to`/`correlation`, from one
    /// MQTT connection keeping up to `concurrency` tasks unfinished.
    Mqtt,
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
    pub via: SubmitVia,
    pub offered_rate_per_s: Option<f64>,
    pub server_sync: String,
    pub agent_fsync: String,
    /// Tasks parked in the queue throughout (see [`DispatchOptions::parked`]).
    pub parked: usize,
    pub wall_s: f64,
    pub throughput_per_s: f64,
    pub latency: Percentiles,
    /// Tasks that did not succeed.
    pub lost: usize,
    /// Tasks dispatched more than once (re-dispatches after loss or busy).
    pub redispatched: usize,
    /// Results that were not the task's own input echoed back.
    pub wrong: usize,
    /// Terminal answers beyond the first for one task (MQTT replies).
    pub duplicates: usize,
    /// Most tasks accepted and not finished at once (server's `/healthz`,
    /// queued + in flight, sampled every 50 ms).
    pub peak_in_flight: usize,
    /// Server CPU over the load phase, percent of one core.
    pub server_cpu_percent: f64,
    /// This process (the agents and the load generator) over the load phase.
    pub bench_cpu_percent: f64,
    pub server_rss_kb: u64,
    pub server_peak_rss_kb: u64,
    /// This process: the agents plus the benchmark's clients, at the end.
    pub agents_process_rss_kb: u64,
    /// Growth of this process's RSS from before the agents started to the
    /// end of the run: roughly what the agents hold (clients included).
    pub agents_rss_growth_kb: u64,
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

fn start_server(
    bin: &Path,
    dir: &Path,
    synchronous: &str,
) -> Result<(ServerProc, String, u16), AdminError> {
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!("[storage]\nsynchronous = {synchronous:?}\n"),
    )
    .map_err(|source| AdminError::Io {
        path: config.clone(),
        source,
    })?;
    let mut child = Command::new(bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--mqtt-port",
            "0",
            "--auth",
            "off",
        ])
        .arg("--config")
        .arg(&config)
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

/// Queues `opts.parked` tasks that no device can take: an agent
/// `bench-away` comes online, goes away, and every parked task targets it.
fn park(
    opts: &DispatchOptions,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    http: &str,
    mqtt_port: u16,
) -> Result<(), AdminError> {
    let o = override_table([
        ("id", "bench-away".into()),
        (
            "mqtt.broker",
            format!("mqtt://127.0.0.1:{mqtt_port}").into(),
        ),
        (
            "data_dir",
            dir.join("agent-away").display().to_string().into(),
        ),
        ("agent.heartbeat_ms", 1000i64.into()),
    ]);
    let cfg = AgentConfig::load(None, o).map_err(|e| bench_err(e.to_string()))?;
    let agent = Agent::new(cfg).map_err(|e| bench_err(e.to_string()))?;
    let away = CancellationToken::new();
    let token = away.clone();
    let run = rt.spawn(async move { agent.run(token).await });
    let client = Client::new(http);
    let seen = |online: bool| -> Result<(), AdminError> {
        let start = Instant::now();
        while !client
            .devices()?
            .iter()
            .any(|d| d.id == "bench-away" && d.online == online)
        {
            if start.elapsed() > Duration::from_secs(60) {
                return Err(bench_err("bench-away did not come and go"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    seen(true)?;
    away.cancel();
    let _ = rt.block_on(run);
    seen(false)?;
    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (next, client, n) = (next.clone(), Client::new(http), opts.parked);
            std::thread::spawn(move || -> Result<(), AdminError> {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    // The highest priority and older than any load task:
                    // ahead of all of them in the queue's order.
                    let req = SubmitRequest {
                        plugin: "echo".into(),
                        input: serde_json::json!({"parked": true}),
                        priority: Some(100),
                        target: Some("bench-away".into()),
                        capability: None,
                        timeout_ms: None,
                        max_attempts: None,
                        reply_to: None,
                        correlation: None,
                        route: None,
                    };
                    client.submit(&req)?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| bench_err("parking thread panicked"))??;
    }
    Ok(())
}

/// Runs the benchmark. Blocking; starts its own runtime for the agents.
pub fn dispatch(opts: &DispatchOptions) -> Result<DispatchReport, AdminError> {
    if opts.agents == 0 || opts.tasks == 0 || opts.concurrency == 0 {
        return Err(bench_err(
            "--agents, --tasks and --concurrency must be at least 1",
        ));
    }
    // Random name, 0700, never an existing directory: the server config and
    // stores in it are not another local user's to swap.
    let tmp =
        super::flash::private_temp_dir("openclaw-bench-").map_err(|source| AdminError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    run_in(tmp.path(), opts)
}

/// One finished (or failed) task as the load generator saw it:
/// (latency, Some((state, attempts, result is the input echoed))).
type Outcome = (Duration, Option<(TaskState, u32, bool)>);

fn run_in(dir: &Path, opts: &DispatchOptions) -> Result<DispatchReport, AdminError> {
    let (server, http, mqtt_port) = start_server(&opts.server_bin, dir, &opts.server_sync)?;
    let server_pid = server.0.id();
    let my_pid = std::process::id();
    let rss_before = proc_field(my_pid, "VmRSS:");
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
            ("storage.fsync", opts.agent_fsync.clone().into()),
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
    if opts.parked > 0 {
        park(opts, dir, &rt, &http, mqtt_port)?;
    }
    let baseline = rt.block_on(mqtt_baseline(mqtt_port, opts.baseline_round_trips))?;

    // Peak of accepted-and-unfinished tasks, from the server's own counters.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (sampling, peak, client) = (sampling.clone(), peak.clone(), Client::new(&http));
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Ok(h) = client.health() {
                    let n = ["queued", "in_flight"]
                        .iter()
                        .filter_map(|k| h.get(k).and_then(|v| v.as_u64()))
                        .sum::<u64>() as usize;
                    peak.fetch_max(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let cpu0 = cpu_ticks(server_pid);
    let my_cpu0 = cpu_ticks(my_pid);
    let t0 = Instant::now();
    let (results, duplicates) = match opts.via {
        SubmitVia::Http | SubmitVia::HttpWait => (load_http(opts, &http, t0), 0),
        SubmitVia::Mqtt => rt.block_on(load_mqtt(opts, mqtt_port, t0))?,
    };
    let wall = t0.elapsed();
    let cpu1 = cpu_ticks(server_pid);
    let my_cpu1 = cpu_ticks(my_pid);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let server_rss_kb = proc_field(server_pid, "VmRSS:");
    let server_peak_rss_kb = proc_field(server_pid, "VmHWM:");
    let agents_process_rss_kb = proc_field(my_pid, "VmRSS:");
    stop.cancel();
    rt.shutdown_timeout(Duration::from_secs(3));
    drop(server);

    let mut lat = Vec::with_capacity(results.len());
    let (mut lost, mut redispatched, mut wrong) = (opts.tasks - results.len(), 0, 0);
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
    if lat.is_empty() {
        return Err(bench_err("no task finished"));
    }
    let latency = Percentiles::of(lat);
    let baseline_mqtt_rtt = Percentiles::of(baseline);
    let per_s = |ticks: u64| ticks as f64 / hz / wall.as_secs_f64() * 100.0;
    Ok(DispatchReport {
        agents: opts.agents,
        tasks: opts.tasks,
        concurrency: opts.concurrency,
        via: opts.via,
        offered_rate_per_s: opts.rate,
        server_sync: opts.server_sync.clone(),
        agent_fsync: opts.agent_fsync.clone(),
        parked: opts.parked,
        wall_s: wall.as_secs_f64(),
        throughput_per_s: opts.tasks as f64 / wall.as_secs_f64(),
        p50_ratio_to_baseline: latency.p50_ms / baseline_mqtt_rtt.p50_ms.max(1e-9),
        latency,
        lost,
        redispatched,
        wrong,
        duplicates,
        peak_in_flight: peak.load(Ordering::Relaxed),
        server_cpu_percent: per_s(cpu1 - cpu0),
        bench_cpu_percent: per_s(my_cpu1 - my_cpu0),
        server_rss_kb,
        server_peak_rss_kb,
        agents_process_rss_kb,
        agents_rss_growth_kb: agents_process_rss_kb.saturating_sub(rss_before),
        baseline_mqtt_rtt,
    })
}

/// When task `i` may be submitted under a paced rate.
fn due(t0: Instant, rate: Option<f64>, i: usize) -> Option<Instant> {
    rate.map(|r| t0 + Duration::from_secs_f64(i as f64 / r))
}

/// `concurrency` blocking HTTP clients: submit, then long-poll the task.
fn load_http(opts: &DispatchOptions, http: &str, t0: Instant) -> Vec<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(opts.tasks)));
    let workers: Vec<_> = (0..opts.concurrency)
        .map(|_| {
            let (next, results, client, plugin) = (
                next.clone(),
                results.clone(),
                Client::new(http),
                opts.plugin.clone(),
            );
            let (total, rate, one_request) =
                (opts.tasks, opts.rate, opts.via == SubmitVia::HttpWait);
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                if let Some(at) = due(t0, rate, i) {
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                }
                let input = serde_json::json!({ "i": i });
                let req = SubmitRequest::new(plugin.clone(), input.clone());
                let t = Instant::now();
                let limit = Duration::from_secs(120);
                let outcome = if one_request {
                    client.submit_wait(&req, limit).and_then(|v| {
                        if v.state.is_terminal() {
                            Ok(v)
                        } else {
                            client.wait(&v.id, limit)
                        }
                    })
                } else {
                    client.submit(&req).and_then(|r| client.wait(&r.id, limit))
                };
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
    let mut r = results.lock().unwrap();
    std::mem::take(&mut *r)
}

/// One MQTT connection submitting on `openclaw/v1/submit` with a window of
/// `concurrency` unfinished tasks; latency runs from the publish to the
/// terminal reply on `reply_to`. Returns the outcomes and how many terminal
/// replies were duplicates.
async fn load_mqtt(
    opts: &DispatchOptions,
    port: u16,
    t0: Instant,
) -> Result<(Vec<Outcome>, usize), AdminError> {
    const REPLIES: &str = "openclaw-bench/replies";
    let mut o = MqttOptions::new("bench-submitter", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = crate::mqtt::client(o, 4096);
    client
        .subscribe(REPLIES, QoS::AtLeastOnce)
        .await
        .map_err(|e| bench_err(e.to_string()))?;
    let n = opts.tasks;
    let window = Arc::new(tokio::sync::Semaphore::new(opts.concurrency));
    // Per task: when it was published, and whether it is done.
    let started: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let outcomes: Arc<Mutex<(Vec<Outcome>, usize)>> =
        Arc::new(Mutex::new((Vec::with_capacity(n), 0)));
    let receiver = {
        let (window, started, outcomes) = (window.clone(), started.clone(), outcomes.clone());
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            let mut finished = vec![false; n];
            while let Ok(ev) = el.poll().await {
                let p = match ev {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Event::Incoming(Packet::Publish(p)) => p,
                    _ => continue,
                };
                let Ok(reply) = serde_json::from_slice::<crate::protocol::api::Reply>(&p.payload)
                else {
                    continue;
                };
                let Some(i) = reply
                    .correlation
                    .as_deref()
                    .and_then(|c| c.parse::<usize>().ok())
                    .filter(|i| *i < n)
                else {
                    continue;
                };
                let state = match reply.event.as_str() {
                    "accepted" => continue,
                    "rejected" => None,
                    s => TaskState::parse(s),
                };
                let mut o = outcomes.lock().unwrap();
                if finished[i] {
                    o.1 += 1;
                    continue;
                }
                finished[i] = true;
                let el = started.lock().unwrap()[i]
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                let same = reply.result == Some(serde_json::json!({ "i": i }));
                // Attempts are not in the reply; a repeat shows as a duplicate.
                o.0.push((el, state.map(|s| (s, 1, same))));
                window.add_permits(1);
                if o.0.len() == n {
                    let _ = done_tx.send(());
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .map_err(|_| bench_err("bench submitter did not subscribe"))?
        .map_err(|_| bench_err("bench submitter stopped"))?;
    for i in 0..n {
        if let Some(at) = due(t0, opts.rate, i) {
            tokio::time::sleep_until(at.into()).await;
        }
        window
            .acquire()
            .await
            .map_err(|e| bench_err(e.to_string()))?
            .forget();
        let mut req = SubmitRequest::new(opts.plugin.clone(), serde_json::json!({ "i": i }));
        req.reply_to = Some(REPLIES.into());
        req.correlation = Some(i.to_string());
        let body = serde_json::to_vec(&req).map_err(|e| bench_err(e.to_string()))?;
        started.lock().unwrap()[i] = Some(Instant::now());
        client
            .publish(
                crate::protocol::topics::SUBMIT,
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .map_err(|e| bench_err(e.to_string()))?;
    }
    // Until every task answered, or 60 s after the last submission; what
    // did not answer by then is counted as lost by the caller.
    let _ = tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await;
    receiver.abort();
    let _ = client.try_disconnect();
    let mut o = outcomes.lock().unwrap();
    Ok(std::mem::take(&mut *o))
}
