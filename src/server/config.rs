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
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
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
    /// TLS to an external `mqtts://` broker (the embedded one is plain TCP).
    #[serde(default)]
    pub tls: config::TlsSection,
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
            if self.mqtt.broker.is_empty() {
                return bad("mqtt.broker", "must be set when mqtt.embedded is false");
            }
            config::parse_broker_url(&self.mqtt.broker)
                .map_err(|m| ConfigError::invalid(file, "mqtt.broker", m))?;
            self.mqtt
                .tls
                .validate(&self.mqtt.broker, file, "mqtt.tls")?;
        } else if self.mqtt.tls != config::TlsSection::default() {
            return bad(
                "mqtt.tls",
                "TLS applies to an external mqtts:// broker; the embedded broker is plain TCP",
            );
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
}
