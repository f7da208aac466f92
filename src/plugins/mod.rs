//! Plugins: the unit of work on an agent.
//!
//! A plugin is built from its TOML config, checked once with
//! [`Plugin::validate`] (the product's template: config checks before any
//! task), then runs tasks with [`Plugin::execute`]. The agent enforces the
//! deadline and cancellation around `execute`, and catches panics, so a
//! misbehaving plugin fails its task, not the agent.

pub mod anomaly;
mod cgroup;
mod echo;
pub mod exec;
pub mod file;
pub mod gpio;
pub mod http;
#[cfg(feature = "inference")]
pub mod infer;
#[cfg(feature = "llm")]
pub mod llm;
pub mod modbus;
#[cfg(feature = "inference")]
pub mod ocr;
pub mod process;
pub mod publish;
pub mod schema;
pub mod sensor;
pub mod serial;
pub mod sysinfo;
pub mod transform;
mod util;
pub mod validate;

use crate::boards::Board;
use crate::protocol::Value;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub use echo::Echo;
pub use schema::{EffectRule, Effects, Schema};
pub use sysinfo::SysInfo;
pub use util::result_budget;

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
    /// The result would be larger than it may be (what one result can
    /// carry), found while building it: `field` names the part, `message`
    /// the limit.
    #[error("plugin `{plugin}`: result too large: `{field}`: {message}")]
    TooLarge {
        plugin: String,
        field: String,
        message: String,
    },
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
    /// Where a streaming plugin (`llm`) sends its output as it is made.
    pub output: OutputStream,
}

#[cfg(test)]
impl TaskContext {
    /// A task with this input, 10 s to run, never cancelled.
    pub(crate) fn for_test(input: Value) -> TaskContext {
        TaskContext {
            id: "t".into(),
            input,
            deadline: Instant::now() + std::time::Duration::from_secs(10),
            cancel: CancellationToken::new(),
            attempt: 1,
            output: Default::default(),
        }
    }
}

/// Pieces of a task's output on their way to the server while the task
/// runs (MQTT `Chunk` messages with sequence numbers, in order). Bounded:
/// a plugin that makes output faster than it can be sent waits. The
/// default sends nothing anywhere.
#[derive(Debug, Clone, Default)]
pub struct OutputStream(Option<tokio::sync::mpsc::Sender<String>>);

impl OutputStream {
    /// A stream whose pieces arrive on the returned receiver.
    pub fn channel(bound: usize) -> (OutputStream, tokio::sync::mpsc::Receiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::channel(bound.max(1));
        (OutputStream(Some(tx)), rx)
    }

    /// Whether the pieces go anywhere (the task was sent by a client that
    /// reads them as they come).
    pub fn is_connected(&self) -> bool {
        self.0.as_ref().is_some_and(|t| !t.is_closed())
    }

    /// Sends a piece from a blocking thread, waiting while the channel is
    /// full; false when nobody reads any more. Never call it from async code.
    pub fn send_blocking(&self, piece: &str) -> bool {
        match &self.0 {
            Some(tx) => tx.blocking_send(piece.to_string()).is_ok(),
            None => false,
        }
    }
}

tokio::task_local! {
    static WORK: Work;
}

/// A handle held by everything a task's plugin runs: the plugin's own
/// future (the agent runs it inside [`Work::scope`]) and every blocking
/// thread it starts through the plugins' helpers. The agent keeps the
/// task's concurrency slot until the last handle is gone, so work that
/// goes on after its task timed out or was cancelled still counts against
/// the limits (a thread stuck in a call that cannot be interrupted keeps
/// its slot, and the next task of that plugin waits).
#[derive(Clone, Debug)]
pub struct Work(#[allow(dead_code)] tokio::sync::mpsc::Sender<()>);

/// The other end of [`Work`]: tells when every handle is gone.
#[derive(Debug)]
pub struct WorkEnded(tokio::sync::mpsc::Receiver<()>);

impl Work {
    /// A new handle and its end signal.
    pub fn new() -> (Work, WorkEnded) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (Work(tx), WorkEnded(rx))
    }

    /// Runs `f` with this handle as the current task's work.
    pub fn scope<F: std::future::Future>(
        self,
        f: F,
    ) -> impl std::future::Future<Output = F::Output> {
        WORK.scope(self, f)
    }

    /// The current task's handle, when called inside [`Work::scope`].
    pub fn current() -> Option<Work> {
        WORK.try_with(Clone::clone).ok()
    }
}

impl WorkEnded {
    /// Whether every handle is gone already.
    pub fn ended(&mut self) -> bool {
        matches!(
            self.0.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        )
    }

    /// Waits until every handle is gone.
    pub async fn wait(mut self) {
        while self.0.recv().await.is_some() {}
    }
}

/// The plugin interface.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// Name tasks use to address it.
    fn name(&self) -> &'static str;
    /// What it does, in a sentence: the tool description a language model
    /// reads in an agent run (`GET /v1/tools`).
    fn description(&self) -> String {
        String::new()
    }
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
    /// The input it accepts. The agent checks every task against it before
    /// `execute` (and before queueing it); checks beyond the shape stay in
    /// `execute`.
    fn input_schema(&self) -> Schema;
    /// Which of its tasks change the world: an agent run asks a person
    /// before it makes such a call (unless the run allows the plugin).
    fn effects(&self) -> Effects {
        Effects::None
    }
    /// How many of its tasks may run at once on this agent (at least 1).
    /// A `concurrency` key in the plugin's config table overrides it.
    fn concurrency(&self) -> usize;
    /// Whether its tasks send output while they run (through
    /// [`TaskContext::output`]); the agent sets up the stream only then.
    fn streams(&self) -> bool {
        false
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
        if key != "enabled" && key != "concurrency" && !known.contains(&key.as_str()) {
            return Err(PluginError::Config {
                plugin: plugin.into(),
                key: key.clone(),
                message: format!(
                    "unknown key (known: enabled, concurrency, {})",
                    known.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// A plugin with its declarations, as the agent dispatches to it.
#[derive(Clone)]
pub struct Entry {
    pub plugin: Arc<dyn Plugin>,
    /// Checked before `execute`.
    pub schema: Arc<Schema>,
    /// Most tasks of this plugin running at once.
    pub concurrency: usize,
}

/// Highest per-plugin `concurrency` a config may set.
pub const MAX_PLUGIN_CONCURRENCY: usize = 1024;

/// The plugins an agent runs, by name.
#[derive(Clone, Default)]
pub struct Registry {
    plugins: BTreeMap<String, Entry>,
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
                // One table, any number of plugins (see docs/plugins.md);
                // each declares its concurrency in its manifest.
                for p in process::build(table)? {
                    reg.add(p)?;
                }
                continue;
            }
            let concurrency = match table.get("concurrency") {
                None => None,
                Some(toml::Value::Integer(i))
                    if *i >= 1 && *i as usize <= MAX_PLUGIN_CONCURRENCY =>
                {
                    Some(*i as usize)
                }
                Some(v) => {
                    return Err(PluginError::Config {
                        plugin: name.clone(),
                        key: "concurrency".into(),
                        message: format!(
                            "expected an integer from 1 to {MAX_PLUGIN_CONCURRENCY}, found {v}"
                        ),
                    })
                }
            };
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
                "validate" => Arc::new(validate::Validate::from_config(table)?),
                #[cfg(feature = "inference")]
                "infer" | "vad" => infer::build(name, table, board, &mut engines)?,
                #[cfg(feature = "inference")]
                "ocr" => ocr::build(table, board, |ec| {
                    infer::shared_engine("ocr", ec, &mut engines)
                })?,
                #[cfg(feature = "llm")]
                "llm" => Arc::new(llm::Llm::from_config(table, board)?),
                other => return Err(PluginError::Unknown(other.to_string())),
            };
            reg.add_with(plugin, concurrency)?;
        }
        Ok(reg)
    }

    /// Every plugin with its schema and effects, for the server's tools.
    pub fn catalog(&self) -> crate::protocol::Catalog {
        crate::protocol::Catalog {
            plugins: self
                .plugins
                .iter()
                .map(|(name, e)| crate::protocol::ToolDecl {
                    name: name.clone(),
                    version: e.plugin.version().into(),
                    description: e.plugin.description(),
                    input_schema: e.schema.to_json().to_string(),
                    effects: e.plugin.effects(),
                })
                .collect(),
        }
    }

    /// Adds a plugin after validating it, with its declared concurrency.
    pub fn add(&mut self, plugin: Arc<dyn Plugin>) -> Result<(), PluginError> {
        self.add_with(plugin, None)
    }

    /// Adds a plugin after validating it; `concurrency` overrides its own.
    pub fn add_with(
        &mut self,
        plugin: Arc<dyn Plugin>,
        concurrency: Option<usize>,
    ) -> Result<(), PluginError> {
        plugin.validate()?;
        let concurrency = concurrency.unwrap_or_else(|| plugin.concurrency()).max(1);
        let schema = Arc::new(plugin.input_schema());
        self.plugins.insert(
            plugin.name().to_string(),
            Entry {
                plugin,
                schema,
                concurrency,
            },
        );
        Ok(())
    }

    /// The plugin called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Plugin>> {
        self.plugins.get(name).map(|e| e.plugin.clone())
    }

    /// The plugin called `name` with its declarations.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.plugins.get(name)
    }

    /// Checks a task's input against the plugin's declaration.
    pub fn check_input(&self, name: &str, input: &Value) -> Result<(), PluginError> {
        match self.plugins.get(name) {
            Some(e) => e.schema.check(name, input),
            None => Err(PluginError::Unknown(name.to_string())),
        }
    }

    /// The concurrency limit of `name` (0 when unknown).
    pub fn concurrency(&self, name: &str) -> usize {
        self.plugins.get(name).map_or(0, |e| e.concurrency)
    }

    /// Names of all plugins.
    pub fn names(&self) -> Vec<String> {
        self.plugins.keys().cloned().collect()
    }

    /// Every plugin's input declaration as JSON Schema, with its
    /// concurrency limit (`x-concurrency`), by name.
    pub fn schemas(&self) -> serde_json::Value {
        let mut all = serde_json::Map::new();
        for (name, e) in &self.plugins {
            let mut s = e.schema.to_json();
            if let serde_json::Value::Object(o) = &mut s {
                o.insert("x-concurrency".into(), e.concurrency.into());
                o.insert("x-version".into(), e.plugin.version().into());
            }
            all.insert(name.clone(), s);
        }
        serde_json::Value::Object(all)
    }

    /// Capabilities of all plugins: `plugin:NAME` for each, plus their own.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = Vec::new();
        for e in self.plugins.values() {
            caps.push(format!("plugin:{}", e.plugin.name()));
            caps.extend(e.plugin.capabilities());
        }
        caps.sort();
        caps.dedup();
        caps
    }
}
