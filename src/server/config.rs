//! Server configuration (`config/server.toml` holds the defaults).

use crate::config::{self, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Built-in defaults.
pub const DEFAULTS: &str = include_str!("../../config/server.toml");

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub http: HttpSection,
    pub mqtt: MqttSection,
    pub storage: StorageSection,
    pub scheduler: SchedulerSection,
    pub releases: super::releases::ReleasesSection,
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    /// A request's headers must arrive within this; an idle keep-alive
    /// connection is closed after it.
    pub header_timeout_ms: u64,
    /// A request's body must arrive within this after its headers.
    pub body_timeout_ms: u64,
    /// A request may take this long, on top of its `wait_ms`.
    pub request_timeout_ms: u64,
    /// Open connections; beyond it new ones wait to be accepted.
    pub max_connections: usize,
    /// hyper's read buffer: the largest request head accepted.
    pub max_header_bytes: usize,
    /// The largest page of `GET /v1/tasks`.
    pub max_list_bytes: usize,
    /// Whether routes need `Authorization: Bearer <token>` (see
    /// [`crate::server::auth`]).
    pub auth: AuthMode,
    /// With `auth = "off"`, allow a host other than loopback.
    pub allow_unauthenticated: bool,
    /// Requests per second per token; 0: no limit.
    pub rate_limit_per_s: f64,
    /// Requests a token may make at once above its rate.
    pub rate_limit_burst: u32,
}

/// `http.auth`
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every route but `/healthz` needs a token.
    Required,
    /// Anyone who reaches the port may do anything.
    Off,
}

/// Whether `host` (an `http.host`) is reachable only from this machine.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// `[mqtt]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    pub embedded: bool,
    pub host: String,
    pub port: u16,
    pub broker: String,
    pub client_id: String,
    pub keep_alive_secs: u64,
    pub max_payload_bytes: usize,
    pub max_connections: usize,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Embedded broker only: how many bytes of `openclaw/v1/submit`
    /// publishes the broker keeps for the server (see
    /// [`crate::server::broker`]): a server further behind than this loses
    /// the oldest of them.
    pub submit_log_bytes: usize,
    /// TLS to an external `mqtts://` broker (the embedded one is plain TCP).
    #[serde(default)]
    pub tls: config::TlsSection,
    /// Embedded broker: `required` refuses clients without a device
    /// identity (`openclaw-admin device add`) and enforces the topic rules
    /// of [`crate::server::auth::identities`]; `off` lets anyone in.
    pub auth: AuthMode,
    /// Embedded broker with `auth = "off"`: listening on a host other than
    /// loopback is refused unless this is true.
    pub allow_anonymous: bool,
    /// External broker: the server's login name (default: `client_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// External broker: the server's login password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Embedded broker: TLS on its listener (`mqtt.host:mqtt.port` then
    /// speaks only TLS; agents connect with `mqtts://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_tls: Option<ListenTlsSection>,
}

/// `[mqtt.listen_tls]`: the embedded broker's certificate and, for mutual
/// TLS, the CA that signs the devices' client certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenTlsSection {
    /// PEM certificate chain of the broker (its names are what agents
    /// check: the host of their `mqtts://` URL).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: PathBuf,
    /// PEM file of CA certificates (all of them trusted): when set, a client
    /// must show a certificate that chains to one, or its handshake fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// A handshake not finished by then is given up (a client that opens
    /// TCP and says nothing holds nobody else up, and not for ever).
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// At most this many handshakes at once; a connection beyond them gives
    /// up the oldest under way (only a stalled one gets old). Bounds what clients that stall
    /// their handshakes hold: a descriptor and up to ~64 KiB of buffered
    /// ClientHello each, until `handshake_timeout_ms`.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

fn default_max_handshakes() -> usize {
    1024
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub data_dir: PathBuf,
    pub synchronous: String,
}

/// `[scheduler]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    pub default_priority: u8,
    pub aging_ms: u64,
    pub default_timeout_ms: u64,
    pub timeout_grace_ms: u64,
    pub default_max_attempts: u32,
    pub retry_backoff_ms: u64,
    pub retry_backoff_max_ms: u64,
    pub offline_after_missed: u32,
    /// Admission bound on unfinished tasks (429 past it).
    pub max_queued_tasks: usize,
    /// Admission bound on the input bytes of unfinished tasks.
    pub max_queued_bytes: u64,
    /// Longest wait in the queue before a task times out; 0: none.
    pub queue_ttl_ms: u64,
    /// Bound on devices created from statuses.
    pub max_devices: usize,
    /// Finished tasks older than this are deleted; 0: never.
    pub retention_ms: u64,
}

impl ServerConfig {
    /// Defaults, then `file`, then `overrides`; validated.
    pub fn load(file: Option<&Path>, overrides: toml::Table) -> Result<ServerConfig, ConfigError> {
        let (cfg, name): (ServerConfig, PathBuf) =
            config::load(DEFAULTS, "config/server.toml (built in)", file, overrides)?;
        cfg.validate(&name)?;
        Ok(cfg)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, msg: &str| Err(ConfigError::invalid(file, key, msg));
        if !self.mqtt.embedded {
            if self.mqtt.auth == AuthMode::Required {
                return bad(
                    "mqtt.auth",
                    "applies to the embedded broker only; with mqtt.embedded = false, \
                     logins and topic rules are the external broker's (give the server's \
                     login as mqtt.username and mqtt.password)",
                );
            }
            if self.mqtt.broker.is_empty() {
                return bad("mqtt.broker", "must be set when mqtt.embedded is false");
            }
            config::parse_broker_url(&self.mqtt.broker)
                .map_err(|m| ConfigError::invalid(file, "mqtt.broker", m))?;
            self.mqtt
                .tls
                .validate(&self.mqtt.broker, file, "mqtt.tls")?;
            if self.mqtt.listen_tls.is_some() {
                return bad(
                    "mqtt.listen_tls",
                    "is the embedded broker's TLS; with mqtt.embedded = false, the external \
                     broker's TLS is its own (and [mqtt.tls] is how the server trusts it)",
                );
            }
        } else if self.mqtt.tls != config::TlsSection::default() {
            return bad(
                "mqtt.tls",
                "is how the server trusts an external mqtts:// broker; for TLS on the \
                 embedded broker's listener use [mqtt.listen_tls]",
            );
        } else if let Some(t) = &self.mqtt.listen_tls {
            if !(1..=600_000).contains(&t.handshake_timeout_ms) {
                return bad(
                    "mqtt.listen_tls.handshake_timeout_ms",
                    "must be between 1 and 600000",
                );
            }
            if !(1..=1_000_000).contains(&t.max_handshakes) {
                return bad(
                    "mqtt.listen_tls.max_handshakes",
                    "must be between 1 and 1000000",
                );
            }
            // Parsed now, so a bad file is a config error naming it, not a
            // broker that starts and refuses everyone.
            crate::server::broker::tls::server_config(t)
                .map_err(|e| ConfigError::invalid(file, "mqtt.listen_tls", e.to_string()))?;
        }
        self.check_ranges(file)?;
        if self.http.auth == AuthMode::Off
            && !is_loopback(&self.http.host)
            && !self.http.allow_unauthenticated
        {
            return Err(ConfigError::invalid(
                file,
                "http.auth",
                format!(
                    "is \"off\" while http.host {:?} is reachable from other machines: anyone \
                     there could submit and cancel tasks. Use auth = \"required\" with tokens \
                     (openclaw-admin token create), bind to 127.0.0.1, or set \
                     http.allow_unauthenticated = true",
                    self.http.host
                ),
            ));
        }
        if self.mqtt.embedded
            && self.mqtt.auth == AuthMode::Off
            && !is_loopback(&self.mqtt.host)
            && !self.mqtt.allow_anonymous
        {
            return Err(ConfigError::invalid(
                file,
                "mqtt.auth",
                format!(
                    "is \"off\" while the embedded broker's mqtt.host {:?} is reachable from \
                     other machines: anyone there could read every task's input and answer \
                     as any device. Use auth = \"required\" with device identities \
                     (openclaw-admin device add), keep mqtt.host on 127.0.0.1, or set \
                     mqtt.allow_anonymous = true",
                    self.mqtt.host
                ),
            ));
        }
        if !(self.http.rate_limit_per_s >= 0.0 && self.http.rate_limit_per_s.is_finite()) {
            return bad("http.rate_limit_per_s", "must be a number of at least 0");
        }
        if self.mqtt.client_id.is_empty() {
            return bad("mqtt.client_id", "must not be empty");
        }
        if self.mqtt.keep_alive_secs == 0 {
            return bad("mqtt.keep_alive_secs", "must be at least 1");
        }
        if self.mqtt.max_payload_bytes < 1024 {
            return bad("mqtt.max_payload_bytes", "must be at least 1024");
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms
        {
            return bad(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and at most mqtt.reconnect_max_ms",
            );
        }
        if !matches!(self.storage.synchronous.as_str(), "full" | "normal") {
            return bad("storage.synchronous", "must be \"full\" or \"normal\"");
        }
        let s = &self.scheduler;
        if s.default_priority > 100 {
            return bad("scheduler.default_priority", "must be from 0 to 100");
        }
        if s.aging_ms == 0 {
            return bad("scheduler.aging_ms", "must be at least 1");
        }
        if s.default_timeout_ms == 0 {
            return bad("scheduler.default_timeout_ms", "must be at least 1");
        }
        if s.default_max_attempts == 0 {
            return bad("scheduler.default_max_attempts", "must be at least 1");
        }
        if s.offline_after_missed == 0 {
            return bad("scheduler.offline_after_missed", "must be at least 1");
        }
        Ok(())
    }

    /// Every numeric key within the range the server works with.
    fn check_ranges(&self, file: &Path) -> Result<(), ConfigError> {
        use config::{check_range as r, HOUR_MS};
        const DAY_MS: u64 = 24 * HOUR_MS;
        let h = &self.http;
        r(file, "http.max_body_bytes", h.max_body_bytes, 1024, 1 << 30)?;
        r(
            file,
            "http.header_timeout_ms",
            h.header_timeout_ms,
            100,
            HOUR_MS,
        )?;
        r(
            file,
            "http.body_timeout_ms",
            h.body_timeout_ms,
            100,
            HOUR_MS,
        )?;
        r(
            file,
            "http.request_timeout_ms",
            h.request_timeout_ms,
            100,
            HOUR_MS,
        )?;
        r(
            file,
            "http.max_connections",
            h.max_connections,
            1,
            1_000_000,
        )?;
        // hyper panics below 8 KiB.
        r(
            file,
            "http.max_header_bytes",
            h.max_header_bytes,
            8192,
            16 << 20,
        )?;
        r(file, "http.max_list_bytes", h.max_list_bytes, 4096, 1 << 30)?;
        let m = &self.mqtt;
        config::MqttRanges {
            keep_alive_secs: m.keep_alive_secs,
            max_payload_bytes: m.max_payload_bytes,
            reconnect_min_ms: m.reconnect_min_ms,
            reconnect_max_ms: m.reconnect_max_ms,
        }
        .check(file)?;
        // The server's own client is one of the broker's connections.
        r(
            file,
            "mqtt.max_connections",
            m.max_connections,
            2,
            1_000_000,
        )?;
        r(
            file,
            "mqtt.submit_log_bytes",
            m.submit_log_bytes,
            1 << 20,
            1 << 30,
        )?;
        let s = &self.scheduler;
        r(
            file,
            "scheduler.default_priority",
            s.default_priority,
            0,
            100,
        )?;
        // `priority * aging_ms` orders the queue: keep it far from overflow.
        r(file, "scheduler.aging_ms", s.aging_ms, 1, 7 * DAY_MS)?;
        // What a submission may ask for (7.5).
        r(
            file,
            "scheduler.default_timeout_ms",
            s.default_timeout_ms,
            1,
            DAY_MS,
        )?;
        r(
            file,
            "scheduler.timeout_grace_ms",
            s.timeout_grace_ms,
            0,
            HOUR_MS,
        )?;
        r(
            file,
            "scheduler.default_max_attempts",
            s.default_max_attempts,
            1,
            100,
        )?;
        r(
            file,
            "scheduler.retry_backoff_ms",
            s.retry_backoff_ms,
            0,
            HOUR_MS,
        )?;
        r(
            file,
            "scheduler.retry_backoff_max_ms",
            s.retry_backoff_max_ms,
            s.retry_backoff_ms,
            DAY_MS,
        )
        .map_err(|_| {
            ConfigError::invalid(
                file,
                "scheduler.retry_backoff_max_ms",
                format!(
                    "{} is out of range: must be from scheduler.retry_backoff_ms ({}) to {DAY_MS}",
                    s.retry_backoff_max_ms, s.retry_backoff_ms
                ),
            )
        })?;
        r(
            file,
            "scheduler.offline_after_missed",
            s.offline_after_missed,
            1,
            1000,
        )?;
        // Admission and housekeeping bounds: 0 would refuse every task or
        // device; 0 is "off" only where documented so.
        r(
            file,
            "scheduler.max_queued_tasks",
            s.max_queued_tasks,
            1,
            10_000_000,
        )?;
        r(
            file,
            "scheduler.max_queued_bytes",
            s.max_queued_bytes,
            4096,
            1 << 40,
        )?;
        r(file, "scheduler.max_devices", s.max_devices, 1, 1_000_000)?;
        let off_or = |key: &str, v: u64, lo: u64, hi: u64| {
            if v == 0 || (lo..=hi).contains(&v) {
                return Ok(());
            }
            Err(ConfigError::invalid(
                file,
                key,
                format!("{v} is out of range: must be 0 (off) or from {lo} to {hi}"),
            ))
        };
        off_or("scheduler.queue_ttl_ms", s.queue_ttl_ms, 1000, 30 * DAY_MS)?;
        off_or(
            "scheduler.retention_ms",
            s.retention_ms,
            60_000,
            3650 * DAY_MS,
        )?;
        Ok(())
    }

    /// The broker the server's own client connects to.
    pub fn broker_addr(&self) -> (String, u16) {
        if self.mqtt.embedded {
            let host = match self.mqtt.host.as_str() {
                "0.0.0.0" | "" => "127.0.0.1".to_string(),
                "::" => "::1".to_string(),
                h => h.to_string(),
            };
            (host, self.mqtt.port)
        } else {
            config::parse_broker_url(&self.mqtt.broker).expect("validated at load")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_errors_name_keys() {
        let c = ServerConfig::load(None, toml::Table::new()).unwrap();
        assert_eq!(c.http.port, 8080);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("server.toml");
        std::fs::write(&f, "[mqtt]\nembedded = false\n").unwrap();
        let e = ServerConfig::load(Some(&f), toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.toml") && e.contains("mqtt.broker"),
            "{e}"
        );
        std::fs::write(&f, "[storage]\nsynchronous = \"off\"\n").unwrap();
        let e = ServerConfig::load(Some(&f), toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage.synchronous"), "{e}");
        std::fs::write(&f, "[http]\nprot = 1\n").unwrap();
        let e = ServerConfig::load(Some(&f), toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot"), "{e}");
    }

    /// Values that were accepted and broke the server (issue 18, item 6):
    /// each is refused at load, naming the key and the file.
    #[test]
    fn out_of_range_values_are_refused_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("server.toml");
        for (text, key) in [
            ("[http]\nmax_body_bytes = 0\n", "http.max_body_bytes"),
            ("[http]\nheader_timeout_ms = 0\n", "http.header_timeout_ms"),
            ("[http]\nbody_timeout_ms = 0\n", "http.body_timeout_ms"),
            ("[http]\nrequest_timeout_ms = 0\n", "http.request_timeout_ms"),
            ("[http]\nmax_connections = 0\n", "http.max_connections"),
            ("[http]\nmax_header_bytes = 100\n", "http.max_header_bytes"),
            ("[http]\nmax_list_bytes = 0\n", "http.max_list_bytes"),
            ("[mqtt]\nmax_connections = 0\n", "mqtt.max_connections"),
            ("[mqtt]\nmax_connections = 1\n", "mqtt.max_connections"),
            ("[mqtt]\nkeep_alive_secs = 100000\n", "mqtt.keep_alive_secs"),
            (
                "[mqtt]\nmax_payload_bytes = 1000000000\n",
                "mqtt.max_payload_bytes",
            ),
            (
                "[mqtt]\nreconnect_max_ms = 9223372036854775807\n",
                "mqtt.reconnect_max_ms",
            ),
            ("[mqtt]\nsubmit_log_bytes = 1000\n", "mqtt.submit_log_bytes"),
            (
                "[scheduler]\naging_ms = 100000000000000000\n",
                "scheduler.aging_ms",
            ),
            (
                "[scheduler]\nretry_backoff_ms = 1000000000000000\nretry_backoff_max_ms = 2000000000000000\n",
                "scheduler.retry_backoff_ms",
            ),
            (
                "[scheduler]\nretry_backoff_ms = 5000\nretry_backoff_max_ms = 1000\n",
                "scheduler.retry_backoff_max_ms",
            ),
            (
                "[scheduler]\ndefault_timeout_ms = 100000000000\n",
                "scheduler.default_timeout_ms",
            ),
            (
                "[scheduler]\ndefault_max_attempts = 1000\n",
                "scheduler.default_max_attempts",
            ),
            (
                "[scheduler]\ntimeout_grace_ms = 100000000000\n",
                "scheduler.timeout_grace_ms",
            ),
            (
                "[scheduler]\noffline_after_missed = 4000000000\n",
                "scheduler.offline_after_missed",
            ),
            // Keys added after the first range checks.
            ("[scheduler]\nmax_devices = 0\n", "scheduler.max_devices"),
            (
                "[scheduler]\nmax_queued_tasks = 0\n",
                "scheduler.max_queued_tasks",
            ),
            (
                "[scheduler]\nmax_queued_bytes = 0\n",
                "scheduler.max_queued_bytes",
            ),
            (
                "[scheduler]\nmax_queued_bytes = 9223372036854775807\n",
                "scheduler.max_queued_bytes",
            ),
            ("[scheduler]\nqueue_ttl_ms = 5\n", "scheduler.queue_ttl_ms"),
            (
                "[scheduler]\nqueue_ttl_ms = 9223372036854775807\n",
                "scheduler.queue_ttl_ms",
            ),
            ("[scheduler]\nretention_ms = 1\n", "scheduler.retention_ms"),
            (
                "[scheduler]\nretention_ms = 9223372036854775807\n",
                "scheduler.retention_ms",
            ),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = ServerConfig::load(Some(&f), toml::Table::new())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("server.toml") && e.contains(&format!("`{key}`")),
                "{text}: {e}"
            );
        }
        // The bounds themselves are accepted.
        std::fs::write(
            &f,
            "[mqtt]\nmax_connections = 2\n[scheduler]\nretry_backoff_ms = 1000\nretry_backoff_max_ms = 1000\naging_ms = 604800000\n\
             max_devices = 1\nmax_queued_tasks = 1\nmax_queued_bytes = 4096\nqueue_ttl_ms = 0\nretention_ms = 0\n",
        )
        .unwrap();
        ServerConfig::load(Some(&f), toml::Table::new()).unwrap();
    }
}
