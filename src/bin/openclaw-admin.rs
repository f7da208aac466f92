//! `openclaw-admin`: set up, submit and inspect tasks, benchmark.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use openclaw::admin::{self, Client};
use openclaw::protocol::api::{SubmitRequest, TaskState, TaskView};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// OpenClaw administration.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Server HTTP address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a starter configuration and model folder.
    Init {
        /// Folder for local models.
        #[arg(long, default_value = "./local_models")]
        model_path: PathBuf,
        /// Folder for the configuration files.
        #[arg(long, default_value = "./openclaw")]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
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
}

#[derive(Subcommand)]
enum Bench {
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
    println!("device   {}", t.device.as_deref().unwrap_or("-"));
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

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::new(&args.server);
    match args.cmd {
        Cmd::Init {
            model_path,
            dir,
            force,
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
            }
        }
        Cmd::Submit {
            plugin,
            input,
            priority,
            target,
            capability,
            timeout_ms,
            wait,
            wait_secs,
        } => {
            let req = SubmitRequest {
                plugin,
                input: parse_json("--input", &input)?,
                priority,
                target,
                capability,
                timeout_ms,
                max_attempts: None,
                reply_to: None,
                correlation: None,
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
            for i in 0..warmup + tasks {
                let req = SubmitRequest {
                    plugin: plugin.clone(),
                    input: input.clone(),
                    priority: None,
                    target: None,
                    capability: None,
                    timeout_ms: None,
                    max_attempts: None,
                    reply_to: None,
                    correlation: None,
                };
                let start = Instant::now();
                let r = client.submit(&req).context("submit failed")?;
                let t = client.wait(&r.id, Duration::from_secs(60))?;
                let el = start.elapsed();
                if t.state != TaskState::Succeeded {
                    bail!("task {} ended {}: {:?}", t.id, t.state.as_str(), t.error);
                }
                if i >= warmup {
                    lat.push(el);
                }
            }
            lat.sort();
            let pct =
                |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
            let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"tasks": lat.len(), "plugin": plugin,
                        "p50_ms": ms(pct(0.5)), "p95_ms": ms(pct(0.95)), "p99_ms": ms(pct(0.99)),
                        "mean_ms": ms(mean), "max_ms": ms(*lat.last().unwrap())})
                );
            } else {
                println!(
                    "{} sequential {plugin} tasks, submit to result over HTTP:\n  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  mean {:.2} ms  max {:.2} ms",
                    lat.len(),
                    ms(pct(0.5)),
                    ms(pct(0.95)),
                    ms(pct(0.99)),
                    ms(mean),
                    ms(*lat.last().unwrap())
                );
            }
        }
    }
    Ok(())
}
