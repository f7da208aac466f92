//! The embedded MQTT broker (rumqttd). Sessions and retained messages live in
//! its memory only, so it is transport, never the record: the server's
//! SQLite and the agents' outboxes are what survive a restart. With
//! `[mqtt.listen_tls]` its listener speaks TLS ([`tls`]).

pub mod tls;

use super::auth::identities::{may_publish, may_subscribe, Grant};
use super::auth::tokens::{ct_eq, hash_secret};
use super::auth::TokenStore;
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// How often the broker looks for revoked identities among the sessions
/// logged in (`openclaw-admin device revoke` writes only to `auth.db`).
pub const REVOCATION_CHECK: Duration = Duration::from_secs(2);

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

/// Who may log in to the embedded broker (`mqtt.auth = "required"`).
#[derive(Debug, Clone)]
pub struct BrokerAuth {
    /// Holds `auth.db` with the device identities.
    pub data_dir: PathBuf,
    /// The server's own login: user and client id...
    pub server_user: String,
    /// ...and the secret it was given at this start.
    pub server_secret: String,
}

/// Logins and topic rules of the embedded broker.
struct Gate {
    auth: BrokerAuth,
    store: Mutex<TokenStore>,
    /// The grant of each identity that logged in, with the SHA-256 of the
    /// password it logged in with (zeros for the server): a session is
    /// closed once its identity is revoked or replaced (`device add
    /// --replace` makes a new password).
    grants: Mutex<HashMap<String, (Grant, [u8; 32])>>,
    refused_logins: AtomicU64,
    denied: AtomicU64,
    /// Revoked identities whose sessions the broker's links close.
    evictions: tokio::sync::watch::Sender<HashSet<String>>,
}

impl Gate {
    async fn login(self: Arc<Self>, client_id: String, user: String, pass: String) -> bool {
        let login_hash = hash_secret(&pass);
        let grant = if client_id != user {
            None
        } else if user == self.auth.server_user {
            ct_eq(pass.as_bytes(), self.auth.server_secret.as_bytes()).then_some(Grant::Server)
        } else {
            let (me, u) = (self.clone(), user.clone());
            tokio::task::spawn_blocking(move || {
                let store = me.store.lock().unwrap_or_else(|p| p.into_inner());
                match store.device_login(&u, &pass) {
                    Ok(g) => g,
                    Err(e) => {
                        log::error!("MQTT: cannot check the login of {u}: {e}");
                        None
                    }
                }
            })
            .await
            .unwrap_or(None)
        };
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        match grant {
            Some(g) => {
                // Logged in anew (added again after a revocation): its new
                // session stays. No link needs waking for that.
                self.evictions.send_if_modified(|s| {
                    s.remove(&user);
                    false
                });
                grants.insert(user, (g, login_hash));
                true
            }
            None => {
                // The grant of a session already logged in stays: a failed
                // login under its name must not cut it off (a revocation
                // closes it through `drop_revoked`).
                let n = self.refused_logins.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    let why = if client_id != user {
                        "its client id is not its user name"
                    } else {
                        "unknown, revoked or wrong password"
                    };
                    log::warn!(
                        "MQTT: refused the login of user {:?} with client id {:?}: {why} \
                         ({n} refused so far)",
                        user.chars().take(64).collect::<String>(),
                        client_id.chars().take(64).collect::<String>()
                    );
                }
                false
            }
        }
    }

    /// Drops the grant of every logged-in device whose identity was revoked
    /// (or replaced) since and closes its sessions: until the connection is
    /// gone it may publish and subscribe nothing more (its publishes go to
    /// the sink; its last will is dropped), and its next login is refused.
    fn drop_revoked(&self) {
        let users: Vec<(String, [u8; 32])> = self
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, (g, _))| matches!(g, Grant::Device { .. }))
            .map(|(u, (_, h))| (u.clone(), *h))
            .collect();
        let mut gone = Vec::new();
        for (u, logged_in_with) in users {
            let current = self
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_active_hash(&u);
            match current {
                Ok(Some(h)) if ct_eq(&h, &logged_in_with) => {}
                Ok(_) => {
                    let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
                    // Unless it logged in anew (with the new password) since.
                    if grants.get(&u).is_some_and(|(_, h)| *h == logged_in_with) {
                        grants.remove(&u);
                        log::warn!(
                            "MQTT: identity {u} was revoked or replaced: its session is closed"
                        );
                        gone.push(u);
                    }
                }
                Err(e) => log::error!("MQTT: cannot check whether {u} was revoked: {e}"),
            }
        }
        if !gone.is_empty() {
            // One change for the whole tick: each one wakes every link.
            self.evictions.send_modify(|s| s.extend(gone));
        }
    }

    fn allows(&self, user: &str, access: rumqttd::Access, topic: &str, payload: &[u8]) -> bool {
        let grant = self
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .map(|(g, _)| *g);
        let ok = grant.is_some_and(|g| match access {
            rumqttd::Access::Publish => may_publish(user, g, topic, payload),
            rumqttd::Access::Subscribe => may_subscribe(user, g, topic),
        });
        if !ok {
            let n = self.denied.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    "MQTT: denied {access:?} by {:?} on {:?} ({n} denied so far)",
                    user.chars().take(64).collect::<String>(),
                    topic.chars().take(128).collect::<String>()
                );
            }
        }
        ok
    }
}

/// `[mqtt.listen_tls]` for [`start`]: the acceptor of the devices' listener
/// and the server's own login, which the plain loopback listener beside it
/// requires even with `mqtt.auth = "off"` (else anyone on this machine could
/// go round the TLS listener's client certificates).
pub struct TlsListener {
    pub acceptor: rumqttd::Acceptor,
    pub server_user: String,
    pub server_secret: String,
}

/// Where a started broker listens.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// `host:port`, for the devices (TLS with [`tls`]).
    pub public: SocketAddr,
    /// Where the server's own client connects: `public`, or with TLS a
    /// plain listener on a free loopback port (the same logins and rules).
    pub internal: SocketAddr,
}

/// The broker's socket on `host:port` (port 0 picks a free one), bound and
/// listening here: rumqttd accepts on this very socket
/// ([`rumqttd::ServerSettings::set_bound`]), so a failure is a real error
/// and no other process can take the port between a check and the
/// broker's own bind (on the loopback listener of [`Listening::internal`]
/// that would have handed it the server's login).
fn bind(host: &str, port: u16) -> Result<(TcpListener, SocketAddr), BrokerError> {
    let bind_err = |source| BrokerError::Bind {
        addr: format!("{host}:{port}"),
        source,
    };
    // (std's backlog, 128, is what tokio's bind in rumqttd used too.)
    let listener = TcpListener::bind((host, port)).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    Ok((listener, addr))
}

/// Starts rumqttd on `host:port` (port 0 picks a free one) in its own
/// threads and waits until it accepts connections. With `auth`, only the
/// server and device identities may log in, each to its own topics; with
/// `tls`, the listener speaks TLS through that acceptor.
pub fn start(
    host: &str,
    port: u16,
    limits: &Limits,
    auth: Option<BrokerAuth>,
    tls: Option<TlsListener>,
) -> Result<Listening, BrokerError> {
    let Limits {
        max_payload,
        max_connections,
        submit_log_bytes,
    } = *limits;
    let (public_socket, addr) = bind(host, port)?;
    let (internal_socket, internal) = match tls {
        Some(_) => {
            let (s, a) = bind("127.0.0.1", 0)?;
            (Some(s), Some(a))
        }
        None => (None, None),
    };
    let listener = |n: u8, name: &str, addr: SocketAddr| {
        format!(
            r#"
[v4.{n}]
name = "{name}"
listen = "{addr}"
next_connection_delay_ms = 1
[v4.{n}.connections]
connection_timeout_ms = 60000
max_payload_size = {payload}
max_inflight_count = 500
dynamic_filters = true
"#,
            payload = max_payload + 1024,
        )
    };
    let mut text = format!(
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
"#,
        segment = SEGMENT_BYTES,
        device_tasks = crate::protocol::topics::tasks("+"),
        submit = crate::protocol::topics::SUBMIT,
        submit_segment = (submit_log_bytes / SUBMIT_SEGMENTS).max(1),
    );
    text.push_str(&listener(1, "openclaw-v4", addr));
    if let Some(internal) = internal {
        text.push_str(&listener(2, "openclaw-v4-loopback", internal));
    }
    let mut config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))?;
    let listeners = config
        .v4
        .as_mut()
        .ok_or_else(|| BrokerError::Config("no v4 listener".into()))?;
    let public = listeners
        .get_mut("1")
        .ok_or_else(|| BrokerError::Config("no v4 listener".into()))?;
    // Each server thread takes its socket as it starts accepting: both
    // taken is what "ready" means below (the kernel queues connections
    // from the bind on, so a test connection says nothing).
    let mut sockets: Vec<(SocketAddr, rumqttd::BoundListener)> = Vec::new();
    let bound = Arc::new(Mutex::new(Some(public_socket)));
    public.bound = Some(bound.clone());
    sockets.push((addr, bound));
    let loopback_login = match tls {
        Some(t) => {
            public.set_acceptor(t.acceptor);
            Some((t.server_user, t.server_secret))
        }
        None => None,
    };
    if let (Some(s), Some(a)) = (internal_socket, internal) {
        let bound = Arc::new(Mutex::new(Some(s)));
        listeners
            .get_mut("2")
            .ok_or_else(|| BrokerError::Config("no loopback v4 listener".into()))?
            .bound = Some(bound.clone());
        sockets.push((a, bound));
    }
    if let (None, Some((server_user, secret))) = (&auth, loopback_login) {
        // No device logins: the TLS listener's client certificates are the
        // only gate, and the loopback one admits the server alone.
        let loopback = listeners
            .get_mut("2")
            .ok_or_else(|| BrokerError::Config("no loopback v4 listener".into()))?;
        loopback.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let ok = client_id == user
                && user == server_user
                && ct_eq(pass.as_bytes(), secret.as_bytes());
            std::future::ready(ok)
        });
    }
    if let Some(auth) = auth {
        let store =
            TokenStore::open(&auth.data_dir).map_err(|e| BrokerError::Config(e.to_string()))?;
        let gate = Arc::new(Gate {
            auth,
            store: Mutex::new(store),
            grants: Mutex::new(HashMap::new()),
            refused_logins: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            evictions: tokio::sync::watch::channel(HashSet::new()).0,
        });
        let g = gate.clone();
        std::thread::Builder::new()
            .name("mqtt-revocations".into())
            .spawn(move || loop {
                std::thread::sleep(REVOCATION_CHECK);
                g.drop_revoked();
            })
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        for settings in listeners.values_mut() {
            let (g, gate) = (gate.clone(), gate.clone());
            settings.set_auth_handler(move |client_id, user, pass| {
                g.clone().login(client_id, user, pass)
            });
            settings.set_evictions(gate.evictions.subscribe());
            settings.set_acl_handler(move |user, access, topic, payload| {
                gate.allows(user, access, topic, payload)
            });
        }
    }
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let reachable = |addr: SocketAddr| match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        a => a,
    };
    let listening = Listening {
        public: addr,
        internal: internal.unwrap_or(reachable(addr)),
    };
    let start = Instant::now();
    for (a, bound) in sockets {
        while bound.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(BrokerError::NotReady(a));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(listening)
}
