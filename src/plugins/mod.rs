//! Plugins: the unit of work on an agent.
//!
//! A plugin is built from its TOML config, checked once with
//! [`Plugin::validate`] (the product's template: config checks before any
//! task), then runs tasks with [`Plugin::execute`]. The agent enforces the
//! deadline and cancellation around `execute`, and catches panics, so a
//! misbehaving plugin fails its task, not the agent.

pub mod anomaly;
mod echo;
pub mod exec;
pub mod file;
pub mod gpio;
pub mod http;
#[cfg(feature = "inference")]
pub mod infer;
pub mod modbus;
pub mod process;
pub mod publish;
pub mod sensor;
pub mod sysinfo;
pub mod transform;
mod util;

use crate::boards::Board;
use crate::protocol::Value;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub use echo::Echo;
pub use sysinfo::SysInfo;

/// Errors of plugins, at build time or for one task.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum PluginError {
    #[error("plugin `{plugin}`: invalid config: key `{key}`: {message}")]
    Config {
        plugin: String,
        key: String,
        message: String,
    },
    #[error("plugin `{0}` is not known to this agent")]
    Unknown(String),
    #[error("plugin `{plugin}`: invalid input: `{field}`: {message}")]
    InvalidInput {
        plugin: String,
        field: String,
        message: String,
    },
    #[error("plugin `{plugin}`: {message}")]
    Failed {
        plugin: String,
        message: String,
        retryable: bool,
    },
    #[error("plugin `{0}`: cancelled")]
    Cancelled(String),
}

/// One task as a plugin sees it.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: String,
    pub input: Value,
    /// The agent stops waiting for the plugin at this instant.
    pub deadline: Instant,
    /// Set when the task is cancelled or times out; long plugins should watch it.
    pub cancel: CancellationToken,
    pub attempt: u32,
}

/// The plugin interface.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// Name tasks use to address it.
    fn name(&self) -> &'static str;
    /// Plugin version, reported in heartbeats.
    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }
    /// Capabilities it adds to the device's heartbeat.
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }
    /// Checks the configuration before any task runs.
    fn validate(&self) -> Result<(), PluginError> {
        Ok(())
    }
    /// Runs one task.
    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError>;
}

/// Rejects keys a plugin does not know, so typos in configs are caught.
pub(crate) fn check_keys(
    plugin: &str,
    config: &toml::Table,
    known: &[&str],
) -> Result<(), PluginError> {
    for key in config.keys() {
        if key != "enabled" && !known.contains(&key.as_str()) {
            return Err(PluginError::Config {
                plugin: plugin.into(),
                key: key.clone(),
                message: format!("unknown key (known: enabled, {})", known.join(", ")),
            });
        }
    }
    Ok(())
}

/// The plugins an agent runs, by name.
#[derive(Clone, Default)]
pub struct Registry {
    plugins: BTreeMap<String, Arc<dyn Plugin>>,
}

impl Registry {
    /// Builds and validates every plugin enabled in `config` (`[plugins.NAME]`).
    pub fn from_config(
        config: &BTreeMap<String, toml::Table>,
        board: &Board,
    ) -> Result<Registry, PluginError> {
        let mut reg = Registry::default();
        #[cfg(feature = "inference")]
        let mut engines = Vec::new();
        for (name, table) in config {
            let enabled = match table.get("enabled") {
                None => true,
                Some(toml::Value::Boolean(b)) => *b,
                Some(other) => {
                    return Err(PluginError::Config {
                        plugin: name.clone(),
                        key: "enabled".into(),
                        message: format!("expected true or false, found {other}"),
                    })
                }
            };
            if !enabled {
                continue;
            }
            if name == "process" {
                // One table, any number of plugins (see docs/plugins.md).
                for p in process::build(table)? {
                    reg.add(p)?;
                }
                continue;
            }
            let plugin: Arc<dyn Plugin> = match name.as_str() {
                "echo" => Arc::new(Echo::from_config(table)?),
                "sysinfo" => Arc::new(SysInfo::from_config(table, board)?),
                "file" => Arc::new(file::FilePlugin::from_config(table)?),
                "http" => Arc::new(http::Http::from_config(table)?),
                "exec" => Arc::new(exec::Exec::from_config(table)?),
                "transform" => Arc::new(transform::Transform::from_config(table)?),
                "publish" => Arc::new(publish::Publish::from_config(table)?),
                "anomaly" => Arc::new(anomaly::Anomaly::from_config(table, board)?),
                "gpio" => Arc::new(gpio::Gpio::from_config(table, board)?),
                "sensor" => Arc::new(sensor::Sensor::from_config(table, board)?),
                "modbus" => Arc::new(modbus::Modbus::from_config(table)?),
                #[cfg(feature = "inference")]
                "infer" | "vad" => infer::build(name, table, board, &mut engines)?,
                other => return Err(PluginError::Unknown(other.to_string())),
            };
            reg.add(plugin)?;
        }
        Ok(reg)
    }

    /// Adds a plugin after validating it.
    pub fn add(&mut self, plugin: Arc<dyn Plugin>) -> Result<(), PluginError> {
        plugin.validate()?;
        self.plugins.insert(plugin.name().to_string(), plugin);
        Ok(())
    }

    /// The plugin called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Plugin>> {
        self.plugins.get(name).cloned()
    }

    /// Names of all plugins.
    pub fn names(&self) -> Vec<String> {
        self.plugins.keys().cloned().collect()
    }

    /// Capabilities of all plugins: `plugin:NAME` for each, plus their own.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = Vec::new();
        for p in self.plugins.values() {
            caps.push(format!("plugin:{}", p.name()));
            caps.extend(p.capabilities());
        }
        caps.sort();
        caps.dedup();
        caps
    }
}
