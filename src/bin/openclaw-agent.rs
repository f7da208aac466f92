//! `openclaw-agent`: the edge agent.

use anyhow::Context;
use clap::Parser;
use openclaw::agent::{Agent, AgentConfig, RunEnd};
use openclaw::config::override_table;
use std::path::PathBuf;

/// OpenClaw edge agent: runs tasks from the central node on this device.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML), merged over the built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Board profile: a built-in name (sim, rpi5, rpi4, rpi3, zero2w, generic-aarch64) or a file.
    #[arg(long)]
    board: Option<String>,
    /// Broker to connect to, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS: set [mqtt.tls] in the config).
    #[arg(long)]
    broker: Option<String>,
    /// Device id (default: the host name).
    #[arg(long)]
    id: Option<String>,
    /// Where the agent keeps its state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print the effective configuration and board profile, then exit.
    #[arg(long)]
    print_config: bool,
    /// The unit's guard (ExecStartPre, run from PREFIX/good): count the
    /// starts of a release on trial and switch back past its limits, then exit.
    #[arg(long, value_name = "PREFIX")]
    ota_guard: Option<PathBuf>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,rumqttd=off"))
        .init();
    if let Err(e) = real_main() {
        eprintln!("openclaw-agent: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(prefix) = &args.ota_guard {
        let said = openclaw::agent::ota::guard(prefix, openclaw::now_ms())
            .with_context(|| format!("OTA guard for {}", prefix.display()))?;
        eprintln!("openclaw-agent: OTA guard: {said}");
        return Ok(());
    }
    let mut o: Vec<(&'static str, toml::Value)> = Vec::new();
    if let Some(b) = args.board {
        o.push(("board", b.into()));
    }
    if let Some(b) = args.broker {
        o.push(("mqtt.broker", b.into()));
    }
    if let Some(i) = args.id {
        o.push(("id", i.into()));
    }
    if let Some(d) = args.data_dir {
        o.push(("data_dir", d.display().to_string().into()));
    }
    let cfg = AgentConfig::load(args.config.as_deref(), override_table(o))
        .context("invalid configuration")?;
    let agent = Agent::new(cfg.clone()).context("cannot set up the agent")?;
    if args.print_config {
        let mut board = toml::Table::new();
        board.insert(
            "board_profile".into(),
            toml::Value::try_from(agent.board()).context("printing board")?,
        );
        let text = format!(
            "{}\n# board profile `{}`\n{}",
            toml::to_string_pretty(&cfg).context("printing config")?,
            agent.board().name,
            toml::to_string_pretty(&board).context("printing board")?
        );
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = rt.block_on(async move {
        let token = openclaw::shutdown_on_signal();
        agent.run_to_end(token).await.context("agent failed")
    });
    // `run` already waited `agent.shutdown_timeout_ms` for running work;
    // a blocking thread still in a call nothing interrupts does not keep
    // the process alive (dropping the runtime would wait for it).
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    if let RunEnd::Restart(release) = result? {
        // systemd (Restart=on-failure) starts `current` again.
        eprintln!("openclaw-agent: switched to release {release}; exiting to be restarted");
        std::process::exit(openclaw::agent::RESTART_EXIT_CODE);
    }
    Ok(())
}
