//! The embedded MQTT broker (rumqttd). Sessions and retained messages live in
//! its memory only, so it is transport, never the record: the server's
//! SQLite and the agents' outboxes are what survive a restart.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("embedded broker config: {0}")]
    Config(String),
    #[error("embedded broker did not start listening on {0} within 10 s")]
    NotReady(SocketAddr),
}

/// rumqttd keeps every publish in an in-memory log per topic filter and
/// drops only whole segments, oldest first, once a filter has more than
/// [`SEGMENTS`] of them: so memory per filter is bounded by about
/// `SEGMENTS * SEGMENT_BYTES` (a segment may overrun by one packet), whether
/// or not the messages were delivered. The 100 MiB x 10 used before let the
/// server's RSS grow by ~1.6 kB per task, towards 1 GiB per filter. A
/// subscriber that falls further behind than the log holds (~35,000 of our
/// messages) skips ahead: a lost result is re-sent by the agent's outbox, a
/// lost dispatch ends in the task's timeout. The bound counts topic and
/// payload bytes; a stored message costs more than that in memory (with
/// these sizes for every filter, 10 agents and 200,000 tasks took the
/// server to ~250 MB; with [`DEVICE_SEGMENT_BYTES`] for device topics, 87 MB).
pub const SEGMENT_BYTES: usize = 1 << 20;
/// See [`SEGMENT_BYTES`].
pub const SEGMENTS: usize = 4;
/// The log of `openclaw/v1/submit` is sized by `mqtt.submit_log_bytes`
/// ([`Limits::submit_log_bytes`], 16 MiB by default) in this many segments.
/// Nobody re-sends a submission the broker dropped, so this log is what MQTT
/// submission's "at least once" holds to: a server that falls further
/// behind than it (a burst while the store is slow) loses the oldest.
/// A publish larger than a segment (`submit_log_bytes / 8` can be under
/// `max_payload_bytes`) is still kept whole: rumqttd's commit log lets the
/// active segment overflow by the last message before it rolls
/// (`vendor/rumqttd/src/segments/mod.rs`, `apply_retention`), so the log
/// holds at least 8 submissions however large, and at most
/// `submit_log_bytes` plus 8 payloads.
pub const SUBMIT_SEGMENTS: usize = 8;
/// The log of each device's task topic, which one agent reads and the
/// server fills only up to that device's capacity (dispatches, result acks,
/// cancels): a few hundred messages behind at most, so 4 x 64 KiB is ample,
/// and memory no longer grows by megabytes per device.
pub const DEVICE_SEGMENT_BYTES: usize = 64 << 10;

/// What the embedded broker is sized for (from `[mqtt]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `mqtt.max_payload_bytes`: larger packets (with 1024 bytes of
    /// headroom for topic and header) are refused.
    pub max_payload: usize,
    /// `mqtt.max_connections`.
    pub max_connections: usize,
    /// `mqtt.submit_log_bytes`: see [`SUBMIT_SEGMENTS`].
    pub submit_log_bytes: usize,
}

/// Starts rumqttd on `host:port` (port 0 picks a free one) in its own
/// threads and waits until it accepts connections. Returns the bound address.
pub fn start(host: &str, port: u16, limits: &Limits) -> Result<SocketAddr, BrokerError> {
    let Limits {
        max_payload,
        max_connections,
        submit_log_bytes,
    } = *limits;
    // rumqttd logs a bind failure instead of returning it, so bind here first
    // to give a real error (and to pick a port when asked for 0).
    let probe = TcpListener::bind((host, port)).map_err(|source| BrokerError::Bind {
        addr: format!("{host}:{port}"),
        source,
    })?;
    let addr = probe.local_addr().map_err(|source| BrokerError::Bind {
        addr: format!("{host}:{port}"),
        source,
    })?;
    drop(probe);
    let text = format!(
        r#"id = 0
[router]
id = 0
max_connections = {max_connections}
max_outgoing_packet_count = 200
max_segment_size = {segment}
max_segment_count = {SEGMENTS}

[router.custom_segment."{device_tasks}"]
max_segment_size = {DEVICE_SEGMENT_BYTES}
max_segment_count = {SEGMENTS}

[router.custom_segment."{submit}"]
max_segment_size = {submit_segment}
max_segment_count = {SUBMIT_SEGMENTS}

[v4.1]
name = "openclaw-v4"
listen = "{addr}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {payload}
max_inflight_count = 500
dynamic_filters = true
"#,
        payload = max_payload + 1024,
        segment = SEGMENT_BYTES,
        device_tasks = crate::protocol::topics::tasks("+"),
        submit = crate::protocol::topics::SUBMIT,
        submit_segment = (submit_log_bytes / SUBMIT_SEGMENTS).max(1),
    );
    let config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let connect_to = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        a => a,
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect_timeout(&connect_to, Duration::from_millis(200)).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotReady(addr))
}
