//! `openclaw-server`: the central node.

use anyhow::Context;
use clap::Parser;
use openclaw::config::override_table;
use openclaw::server::{self, ServerConfig};
use std::path::PathBuf;

/// jemalloc returns what the broker's churn frees; glibc's allocator let the
/// server's RSS creep up by ~20 bytes per task (see Cargo.toml).
#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// OpenClaw central node: MQTT broker, scheduler, task store and HTTP API.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// HTTP listen address.
    #[arg(long)]
    host: Option<String>,
    /// HTTP port (0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Port of the embedded MQTT broker (0 picks a free one).
    #[arg(long, conflicts_with = "broker")]
    mqtt_port: Option<u16>,
    /// Use this external broker (mqtt://HOST:PORT) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// `required` (API tokens) or `off` (`http.auth`).
    #[arg(long, value_parser = ["required", "off"])]
    auth: Option<String>,
    /// Where the task store lives.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Configuration file (TOML), merged over the built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,rumqttd=off"))
        .init();
    if let Err(e) = real_main() {
        eprintln!("openclaw-server: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut o: Vec<(&'static str, toml::Value)> = Vec::new();
    if let Some(h) = args.host {
        o.push(("http.host", h.into()));
    }
    if let Some(p) = args.port {
        o.push(("http.port", (p as i64).into()));
    }
    if let Some(p) = args.mqtt_port {
        o.push(("mqtt.port", (p as i64).into()));
    }
    if let Some(b) = args.broker {
        o.push(("mqtt.embedded", false.into()));
        o.push(("mqtt.broker", b.into()));
    }
    if let Some(a) = args.auth {
        o.push(("http.auth", a.into()));
    }
    if let Some(d) = args.data_dir {
        o.push(("storage.data_dir", d.display().to_string().into()));
    }
    let cfg = ServerConfig::load(args.config.as_deref(), override_table(o))
        .context("invalid configuration")?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string_pretty(&cfg).context("printing config")?
        );
        return Ok(());
    }
    raise_fd_limit(cfg.http.max_connections + cfg.mqtt.max_connections + 256);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let token = openclaw::shutdown_on_signal();
        server::run(cfg, token, |ep| {
            // One machine-readable line on stdout: scripts and tests wait for it.
            println!(
                "openclaw-server ready http={} mqtt={}:{}",
                ep.http, ep.mqtt.0, ep.mqtt.1
            );
        })
        .await
        .context("server failed")
    })?;
    // The embedded broker's threads cannot be joined; leave now.
    std::process::exit(0)
}

/// Raises the soft limit on open files towards `want` (at most the hard
/// limit): every HTTP connection (each long poll) and MQTT client holds one,
/// and the common soft default of 1024 would refuse connections far below
/// `http.max_connections`.
fn raise_fd_limit(want: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want = want as libc::rlim_t;
    if lim.rlim_cur >= want {
        return;
    }
    let new = libc::rlimit {
        rlim_cur: want.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 || new.rlim_cur < want {
        eprintln!(
            "openclaw-server: warning: open files limited to {} (want {want} for \
             http.max_connections + mqtt.max_connections); raise `ulimit -n`",
            new.rlim_cur.max(lim.rlim_cur)
        );
    }
}
