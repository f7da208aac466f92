//! Agent configuration (`config/agent.toml` holds the defaults).

use crate::config::{self, ConfigError};
use crate::protocol::topics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Built-in defaults.
pub const DEFAULTS: &str = include_str!("../../config/agent.toml");

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub id: String,
    pub board: String,
    pub data_dir: PathBuf,
    pub mqtt: MqttSection,
    pub agent: AgentSection,
    pub storage: StorageSection,
    pub ota: OtaSection,
    pub plugins: BTreeMap<String, toml::Table>,
}

/// `[ota]`: over-the-air updates (`agent::ota`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtaSection {
    /// The install's root (`PREFIX/releases`, `PREFIX/current`), as
    /// `openclaw-admin flash` lays it out; empty: updates are refused.
    pub prefix: PathBuf,
    /// Trusted release signing keys (64 hex digits each, from
    /// `openclaw-admin release keygen`); none: updates are refused.
    pub keys: Vec<String>,
    /// A download larger than this is refused (before it starts, when the
    /// manifest says so; else when it gets there).
    pub max_download_bytes: u64,
    /// A new release not confirmed by the server this long after the
    /// switch is rolled back.
    pub confirm_timeout_ms: u64,
    /// A new release that has started this many times without being
    /// confirmed is rolled back at the next start (the unit's guard).
    pub max_starts: u32,
    /// The new binary's self-check (`--print-config` on its config) must
    /// end within this.
    pub self_check_timeout_ms: u64,
}

/// `[mqtt]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    pub broker: String,
    pub keep_alive_secs: u64,
    pub max_payload_bytes: usize,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// TLS for a `mqtts://` broker.
    #[serde(default)]
    pub tls: config::TlsSection,
    /// The broker login's name; the agent's id when absent (the embedded
    /// broker with `mqtt.auth = "required"` wants exactly that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The broker login's password (`openclaw-admin device add` makes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `[agent]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub heartbeat_ms: u64,
    /// Tasks run at once; the board profile's limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Tasks waiting beyond those running; the board profile's limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_capacity: Option<u32>,
    pub result_resend_ms: u64,
    pub ledger_size: usize,
    /// At shutdown, how long running tasks may take to stop after they are
    /// cancelled; the agent exits then even if some have not.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

fn default_shutdown_timeout_ms() -> u64 {
    5000
}

/// `fsync` values of `[storage]`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// Every record is on disk before the agent acts on it.
    Always,
    /// Every `batch_ms` or `batch_records`, whichever comes first.
    Batch,
    /// Left to the operating system.
    Never,
}

/// `[storage]`: the agent's journal of accepted tasks, results and ledger.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub fsync: FsyncMode,
    pub batch_ms: u64,
    pub batch_records: u32,
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

impl StorageSection {
    /// The storage layer's options.
    pub fn log_options(&self) -> crate::storage::LogOptions {
        use crate::storage::FsyncPolicy;
        crate::storage::LogOptions {
            fsync: match self.fsync {
                FsyncMode::Always => FsyncPolicy::Always,
                FsyncMode::Batch => FsyncPolicy::Batch {
                    interval: std::time::Duration::from_millis(self.batch_ms),
                    records: self.batch_records,
                },
                FsyncMode::Never => FsyncPolicy::Never,
            },
            max_bytes: self.max_bytes,
            segment_bytes: self.segment_bytes,
            simulated_disk_bytes: None,
        }
    }
}

impl AgentConfig {
    /// Defaults, then `file`, then `overrides`; validated.
    pub fn load(file: Option<&Path>, overrides: toml::Table) -> Result<AgentConfig, ConfigError> {
        let (mut cfg, name): (AgentConfig, PathBuf) =
            config::load(DEFAULTS, "config/agent.toml (built in)", file, overrides)?;
        if cfg.id.is_empty() {
            cfg.id = hostname();
        }
        cfg.validate(&name)?;
        cfg.fit_plugin_caps();
        Ok(cfg)
    }

    /// The caps on what `http`, `file` and `transform` return, as defaults
    /// that fit the result in one MQTT payload (base64 and envelope
    /// included), so a capped response or listing comes back `truncated`
    /// instead of `TooLarge`. A value set in the config is kept; one that
    /// cannot fit is warned about.
    fn fit_plugin_caps(&mut self) {
        let budget = crate::plugins::result_budget(self.mqtt.max_payload_bytes as u64);
        // CSV text is not base64-encoded: one payload is its bound.
        let payload = self.mqtt.max_payload_bytes as u64;
        for (plugin, key, budget) in [
            ("http", "max_response_bytes", budget),
            ("file", "max_read_bytes", budget),
            ("file", "max_list_bytes", budget),
            ("transform", "max_output_bytes", payload),
        ] {
            let Some(table) = self.plugins.get_mut(plugin) else {
                continue;
            };
            match table.get(key) {
                None => {
                    table.insert(key.into(), toml::Value::Integer(budget as i64));
                }
                Some(toml::Value::Integer(v)) if *v as u64 > budget => log::warn!(
                    "plugins.{plugin}.{key} = {v} may not come back: its result, with the envelope (and base64 for bytes), can exceed mqtt.max_payload_bytes ({}); at most {budget} always fits",
                    self.mqtt.max_payload_bytes
                ),
                Some(_) => {}
            }
        }
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        for (i, k) in self.ota.keys.iter().enumerate() {
            crate::release::parse_public_key(k).map_err(|e| {
                ConfigError::invalid(file, &format!("ota.keys[{i}]"), e.to_string())
            })?;
        }
        if !self.ota.prefix.as_os_str().is_empty() && !self.ota.prefix.is_absolute() {
            return Err(ConfigError::invalid(
                file,
                "ota.prefix",
                "must be an absolute path (the install's root, as flash made it)",
            ));
        }
        if self.ota.max_starts == 0 {
            return Err(ConfigError::invalid(
                file,
                "ota.max_starts",
                "must be at least 1",
            ));
        }
        if !topics::valid_device_id(&self.id) {
            return Err(ConfigError::invalid(
                file,
                "id",
                format!(
                    "`{}` is not a valid device id (1-64 of letters, digits, - _ .)",
                    self.id
                ),
            ));
        }
        config::parse_broker_url(&self.mqtt.broker)
            .map_err(|m| ConfigError::invalid(file, "mqtt.broker", m))?;
        self.check_ranges(file)?;
        self.mqtt
            .tls
            .validate(&self.mqtt.broker, file, "mqtt.tls")?;
        if self.mqtt.keep_alive_secs == 0 || self.mqtt.keep_alive_secs > 3600 {
            return Err(ConfigError::invalid(
                file,
                "mqtt.keep_alive_secs",
                "must be from 1 to 3600",
            ));
        }
        if self.mqtt.max_payload_bytes < 1024 {
            return Err(ConfigError::invalid(
                file,
                "mqtt.max_payload_bytes",
                "must be at least 1024",
            ));
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms
        {
            return Err(ConfigError::invalid(
                file,
                "mqtt.reconnect_min_ms",
                "must be at least 1 and at most mqtt.reconnect_max_ms",
            ));
        }
        if self.agent.heartbeat_ms < 100 {
            return Err(ConfigError::invalid(
                file,
                "agent.heartbeat_ms",
                "must be at least 100",
            ));
        }
        if self.agent.max_concurrency == Some(0) {
            return Err(ConfigError::invalid(
                file,
                "agent.max_concurrency",
                "must be at least 1",
            ));
        }
        if self.agent.queue_capacity.unwrap_or(0) > crate::boards::MAX_QUEUE_CAPACITY {
            return Err(ConfigError::invalid(
                file,
                "agent.queue_capacity",
                format!("must be at most {}", crate::boards::MAX_QUEUE_CAPACITY),
            ));
        }
        let st = &self.storage;
        if st.segment_bytes < 4096 {
            return Err(ConfigError::invalid(
                file,
                "storage.segment_bytes",
                "must be at least 4096",
            ));
        }
        if st.max_bytes < 2 * st.segment_bytes {
            return Err(ConfigError::invalid(
                file,
                "storage.max_bytes",
                "must be at least twice storage.segment_bytes",
            ));
        }
        if st.batch_ms == 0 {
            return Err(ConfigError::invalid(
                file,
                "storage.batch_ms",
                "must be at least 1",
            ));
        }
        if st.batch_records == 0 {
            return Err(ConfigError::invalid(
                file,
                "storage.batch_records",
                "must be at least 1",
            ));
        }
        if self.agent.ledger_size == 0 {
            return Err(ConfigError::invalid(
                file,
                "agent.ledger_size",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl AgentConfig {
    /// Every numeric key within the range the agent works with (the
    /// heartbeat interval goes on the wire as a u32, for one).
    fn check_ranges(&self, file: &Path) -> Result<(), ConfigError> {
        use config::{check_range as r, HOUR_MS};
        let m = &self.mqtt;
        config::MqttRanges {
            keep_alive_secs: m.keep_alive_secs,
            max_payload_bytes: m.max_payload_bytes,
            reconnect_min_ms: m.reconnect_min_ms,
            reconnect_max_ms: m.reconnect_max_ms,
        }
        .check(file)?;
        let a = &self.agent;
        r(file, "agent.heartbeat_ms", a.heartbeat_ms, 100, HOUR_MS)?;
        if let Some(n) = a.max_concurrency {
            r(file, "agent.max_concurrency", n, 1, 64)?;
        }
        r(
            file,
            "agent.result_resend_ms",
            a.result_resend_ms,
            100,
            HOUR_MS,
        )?;
        r(file, "agent.ledger_size", a.ledger_size, 1, 1_000_000)?;
        let st = &self.storage;
        r(file, "storage.batch_ms", st.batch_ms, 1, 60_000)?;
        r(
            file,
            "storage.batch_records",
            st.batch_records,
            1,
            1_000_000,
        )?;
        r(
            file,
            "storage.segment_bytes",
            st.segment_bytes,
            4096,
            1 << 30,
        )?;
        r(
            file,
            "storage.max_bytes",
            st.max_bytes,
            2 * st.segment_bytes,
            1 << 40,
        )?;
        Ok(())
    }
}

/// The machine's host name, as a valid device id.
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "openclaw-agent".into());
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if topics::valid_device_id(&c.to_string()) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() {
        "openclaw-agent".into()
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_bad_values_name_the_key() {
        let cfg = AgentConfig::load(None, toml::Table::new()).unwrap();
        assert!(cfg.plugins.contains_key("echo"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, "[mqtt]\nbroker = \"mqtt://h:notaport\"\n").unwrap();
        let e = AgentConfig::load(Some(&f), toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.toml") && e.contains("mqtt.broker"), "{e}");
        std::fs::write(&f, "id = \"a/b\"\n").unwrap();
        let e = AgentConfig::load(Some(&f), toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `id`"), "{e}");
        std::fs::write(&f, "[agent]\nheartbeat = 5\n").unwrap();
        let e = AgentConfig::load(Some(&f), toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent") && e.contains("heartbeat"), "{e}");
        for (text, key) in [
            ("[storage]\nfsync = \"sometimes\"\n", "storage.fsync"),
            ("[storage]\nsegment_bytes = 10\n", "storage.segment_bytes"),
            ("[storage]\nmax_bytes = 4096\n", "storage.max_bytes"),
            ("[storage]\nbatch_ms = 0\n", "storage.batch_ms"),
            ("[storage]\nbatch_records = 0\n", "storage.batch_records"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = AgentConfig::load(Some(&f), toml::Table::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains("agent.toml") && e.contains(key), "{text}: {e}");
        }
        assert_eq!(cfg.storage.fsync, FsyncMode::Always);
        // The caps of http and file follow the payload limit.
        std::fs::write(
            &f,
            "[mqtt]\nmax_payload_bytes = 65536\n[plugins.http]\n[plugins.file]\nroot = \"/\"\nmax_read_bytes = 7\n",
        )
        .unwrap();
        let c = AgentConfig::load(Some(&f), toml::Table::new()).unwrap();
        assert_eq!(
            c.plugins["http"]["max_response_bytes"].as_integer(),
            Some(43008)
        );
        assert_eq!(c.plugins["file"]["max_read_bytes"].as_integer(), Some(7));
        cfg.storage.log_options().validate().unwrap();
    }

    /// Values that were accepted and broke the agent (issue 18, item 6): a
    /// heartbeat above u32::MAX wrapped on the wire and the device flapped.
    #[test]
    fn out_of_range_values_are_refused_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        for (text, key) in [
            ("[agent]\nheartbeat_ms = 4294967396\n", "agent.heartbeat_ms"),
            ("[agent]\nheartbeat_ms = 36000000\n", "agent.heartbeat_ms"),
            ("[agent]\nresult_resend_ms = 0\n", "agent.result_resend_ms"),
            (
                "[agent]\nmax_concurrency = 100000\n",
                "agent.max_concurrency",
            ),
            ("[agent]\nledger_size = 100000000000\n", "agent.ledger_size"),
            ("[mqtt]\nkeep_alive_secs = 0\n", "mqtt.keep_alive_secs"),
            (
                "[mqtt]\nmax_payload_bytes = 1000000000\n",
                "mqtt.max_payload_bytes",
            ),
            (
                "[mqtt]\nreconnect_max_ms = 9223372036854775807\n",
                "mqtt.reconnect_max_ms",
            ),
            ("[storage]\nbatch_ms = 100000000\n", "storage.batch_ms"),
            (
                "[storage]\nsegment_bytes = 100000000000\nmax_bytes = 200000000000\n",
                "storage.segment_bytes",
            ),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = AgentConfig::load(Some(&f), toml::Table::new())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("agent.toml") && e.contains(&format!("`{key}`")),
                "{text}: {e}"
            );
        }
        std::fs::write(&f, "[agent]\nheartbeat_ms = 3600000\n").unwrap();
        AgentConfig::load(Some(&f), toml::Table::new()).unwrap();
    }
}
