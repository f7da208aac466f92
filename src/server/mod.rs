//! The central node: embedded (or external) MQTT broker, durable SQLite
//! store, scheduler and HTTP API.

pub mod auth;
pub mod broker;
pub mod config;
pub mod http;
pub mod lock;
pub mod mcp;
pub mod openai;
pub mod queue;
pub mod releases;
pub mod runs;
pub mod scheduler;
pub mod store;
pub mod streams;
pub mod tools;
pub mod workflows;

pub use config::ServerConfig;

use crate::mqtt::{spawn_event_loop, Backoff, MqttEvent};
use crate::protocol::topics;
use rumqttc::{MqttOptions, QoS};
use scheduler::{Command, Scheduler};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Another server holds the data dir.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpBind {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::mqtt::TlsError),
    #[error(transparent)]
    BrokerTls(#[from] broker::tls::BrokerTlsError),
    #[error(transparent)]
    Releases(#[from] releases::ReleasesError),
    #[error(transparent)]
    Runs(#[from] runs::RunsError),
    #[error(transparent)]
    Workflows(#[from] workflows::WorkflowsError),
    /// The scheduler ended on its own (an error, or a panic): the process
    /// must end too, rather than leave HTTP answering 503 forever.
    #[error("scheduler stopped: {0}")]
    Scheduler(String),
    /// Likewise the release task (rollouts would stop silently).
    #[error("release task stopped: {0}")]
    ReleaseTask(String),
}

/// Where a running server can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub http: SocketAddr,
    /// The broker the devices use (embedded or external; with
    /// `[mqtt.listen_tls]`, the TLS listener).
    pub mqtt: (std::net::IpAddr, u16),
}

/// Runs the server until `shutdown` is cancelled. `ready` is called once the
/// broker, the store and the HTTP listener are up.
pub async fn run(
    cfg: ServerConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(Endpoints),
) -> Result<(), ServerError> {
    // Before the store is opened: a second server must not touch it. Held
    // until this function returns; the kernel frees it if the process dies.
    let lock = lock::acquire(&cfg.storage.data_dir)?;
    log::info!("data dir locked ({})", lock.path().display());
    let store = store::Store::open(&cfg.storage.data_dir, &cfg.storage.synchronous)?;
    let auth = auth::Auth::open(&cfg.storage.data_dir, &cfg.http)?;
    // The server's login on its own broker: new at every start, never stored.
    let server_secret = auth::tokens::random_hex(32)?;
    // The embedded broker's device-facing listener, where it differs from
    // what this server connects to (TLS).
    let mut mqtt_public: Option<SocketAddr> = None;
    let (broker_host, broker_port) = if cfg.mqtt.embedded {
        let host = cfg.mqtt.host.clone();
        let limits = broker::Limits {
            max_payload: cfg.mqtt.max_payload_bytes,
            max_connections: cfg.mqtt.max_connections,
            submit_log_bytes: cfg.mqtt.submit_log_bytes,
        };
        let port = cfg.mqtt.port;
        let gate = (cfg.mqtt.auth == config::AuthMode::Required).then(|| broker::BrokerAuth {
            data_dir: cfg.storage.data_dir.clone(),
            server_user: cfg.mqtt.client_id.clone(),
            server_secret: server_secret.clone(),
        });
        let tls = match &cfg.mqtt.listen_tls {
            Some(t) => Some(broker::TlsListener {
                acceptor: broker::tls::acceptor(t)?,
                server_user: cfg.mqtt.client_id.clone(),
                server_secret: server_secret.clone(),
            }),
            None => None,
        };
        let with_tls = tls.is_some();
        let at =
            tokio::task::spawn_blocking(move || broker::start(&host, port, &limits, gate, tls))
                .await
                .expect("broker start does not panic")?;
        if with_tls {
            log::info!(
                "embedded MQTT broker listening on {} (TLS), and on {} for this server",
                at.public,
                at.internal
            );
        } else {
            log::info!("embedded MQTT broker listening on {}", at.public);
        }
        mqtt_public = Some(at.public);
        (at.internal.ip().to_string(), at.internal.port())
    } else {
        cfg.broker_addr()
    };

    let mut opts = MqttOptions::new(cfg.mqtt.client_id.clone(), broker_host.clone(), broker_port);
    opts.set_keep_alive(Duration::from_secs(cfg.mqtt.keep_alive_secs))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(1000)
        .set_max_packet_size(
            cfg.mqtt.max_payload_bytes + 1024,
            cfg.mqtt.max_payload_bytes + 1024,
        );
    if !cfg.mqtt.embedded {
        crate::mqtt::apply_tls(&mut opts, &cfg.mqtt.broker, &cfg.mqtt.tls)?;
        if let Some(pass) = &cfg.mqtt.password {
            let user = cfg
                .mqtt
                .username
                .clone()
                .unwrap_or(cfg.mqtt.client_id.clone());
            opts.set_credentials(user, pass.clone());
        }
    } else if cfg.mqtt.auth == config::AuthMode::Required || cfg.mqtt.listen_tls.is_some() {
        // With TLS the server's loopback listener wants its login even when
        // devices need none (see `broker::TlsListener`).
        opts.set_credentials(cfg.mqtt.client_id.clone(), server_secret);
    }
    let (client, eventloop) = crate::mqtt::client(opts, 8192);
    let (sched, handle, rx) = Scheduler::new(
        cfg.scheduler.clone(),
        store,
        client.clone(),
        cfg.mqtt.max_payload_bytes,
    )?;

    let (mqtt_tx, mut mqtt_rx) = mpsc::channel::<MqttEvent>(8192);
    let loop_stop = CancellationToken::new();
    let loop_handle = spawn_event_loop(
        eventloop,
        vec![
            (topics::ALL_STATUS.to_string(), QoS::AtLeastOnce),
            (topics::ALL_RESULTS.to_string(), QoS::AtLeastOnce),
            (topics::SUBMIT.to_string(), QoS::AtLeastOnce),
        ],
        mqtt_tx,
        Backoff::new(
            Duration::from_millis(cfg.mqtt.reconnect_min_ms),
            Duration::from_millis(cfg.mqtt.reconnect_max_ms),
        ),
        loop_stop.clone(),
        "server".into(),
    );
    let to_sched = handle.sender();
    tokio::spawn(async move {
        while let Some(ev) = mqtt_rx.recv().await {
            if to_sched.send(Command::Mqtt(ev)).await.is_err() {
                break;
            }
        }
    });
    let sched_stop = shutdown.clone();
    let sched_task = tokio::spawn(sched.run(rx, sched_stop));

    let http_addr = format!("{}:{}", cfg.http.host, cfg.http.port);
    let listener = tokio::net::TcpListener::bind(&http_addr)
        .await
        .map_err(|source| ServerError::HttpBind {
            addr: http_addr.clone(),
            source,
        })?;
    let http = listener.local_addr().map_err(ServerError::Http)?;
    log::info!("HTTP API listening on {http}");
    let ip = broker_host
        .parse()
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let mqtt = match mqtt_public {
        Some(a) if a.ip().is_unspecified() => (std::net::IpAddr::from([127, 0, 0, 1]), a.port()),
        Some(a) => (a.ip(), a.port()),
        None => (ip, broker_port),
    };
    ready(Endpoints { http, mqtt });
    let handle = handle.with_deadline(Duration::from_millis(cfg.http.request_timeout_ms));
    let (rel, rel_handle, rel_rx) = releases::Releases::new(
        &cfg.storage.data_dir,
        cfg.releases.clone(),
        client.clone(),
        handle.clone(),
    )?;
    let mut rel_task = tokio::spawn(rel.run(rel_rx, shutdown.clone()));
    let agent_runs = runs::Runs::open(&cfg.storage.data_dir, handle.clone(), shutdown.clone())?;
    let workflow_runs =
        workflows::Workflows::open(&cfg.storage.data_dir, handle.clone(), shutdown.clone())?;
    // Ended runs go after the time finished tasks are kept.
    agent_runs.keep(cfg.scheduler.retention_ms);
    workflow_runs.keep(cfg.scheduler.retention_ms);
    let app =
        http::router(
            handle,
            &cfg.http,
            cfg.storage.data_dir.clone(),
            auth.clone(),
        )
        .merge(releases::router(rel_handle, auth.clone()).layer(
            axum::middleware::from_fn_with_state(auth.clone(), auth::check),
        ))
        .merge(
            runs::router(agent_runs, auth.clone()).layer(axum::middleware::from_fn_with_state(
                auth.clone(),
                auth::check,
            )),
        )
        .merge(workflows::router(workflow_runs, auth.clone()).layer(
            axum::middleware::from_fn_with_state(auth.clone(), auth::check),
        ));
    let serve = http::serve(listener, app, &cfg.http, shutdown.clone());
    let mut sched_task = sched_task;
    // A scheduler that ends on its own ends the process (issue 15): HTTP
    // must not stay up answering 503 where systemd would never restart it.
    let sched_end = tokio::select! {
        () = serve => sched_task.await,
        r = &mut sched_task => {
            shutdown.cancel();
            r
        }
        // Likewise the release task: rollouts must not stop silently.
        r = &mut rel_task => {
            if shutdown.is_cancelled() && r.is_ok() {
                sched_task.await
            } else {
                shutdown.cancel();
                let _ = sched_task.await;
                return Err(ServerError::ReleaseTask(match r {
                    Ok(()) => "it ended without being asked to".into(),
                    Err(e) => e.to_string(),
                }));
            }
        }
    };
    let failed = match sched_end {
        Ok(Ok(())) if shutdown.is_cancelled() => None,
        Ok(Ok(())) => Some("it ended without being asked to".to_string()),
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) if e.is_panic() => Some("it panicked (see the log above)".to_string()),
        Err(e) => Some(e.to_string()),
    };
    // Every accepted action's audit row written (or kept for the next
    // start) before the process ends.
    auth.close().await;
    let _ = client.try_disconnect();
    if tokio::time::timeout(Duration::from_secs(2), loop_handle)
        .await
        .is_err()
    {
        loop_stop.cancel();
    }
    drop(lock);
    match failed {
        Some(why) => Err(ServerError::Scheduler(why)),
        None => Ok(()),
    }
}
