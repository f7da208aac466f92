//! `echo`: returns its input. Diagnostic aids in a map input (documented in
//! docs/plugins.md): `sleep_ms` waits (honouring cancellation), `fail` fails
//! with that message, `panic` panics — so tests can exercise the agent's
//! timeouts, retries and panic isolation with a real plugin.

use super::schema::Schema;
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use std::time::Duration;

/// The echo plugin.
#[derive(Debug, Default)]
pub struct Echo {
    max_sleep_ms: u64,
}

impl Echo {
    /// Config keys: `max_sleep_ms` (default 600000).
    pub fn from_config(config: &toml::Table) -> Result<Echo, PluginError> {
        check_keys("echo", config, &["max_sleep_ms"])?;
        let max_sleep_ms = match config.get("max_sleep_ms") {
            None => 600_000,
            Some(toml::Value::Integer(i)) if *i >= 0 => *i as u64,
            Some(v) => {
                return Err(PluginError::Config {
                    plugin: "echo".into(),
                    key: "max_sleep_ms".into(),
                    message: format!("expected a non-negative integer, found {v}"),
                })
            }
        };
        Ok(Echo { max_sleep_ms })
    }
}

fn invalid(field: &str, message: &str) -> PluginError {
    PluginError::InvalidInput {
        plugin: "echo".into(),
        field: field.into(),
        message: message.into(),
    }
}

#[async_trait]
impl Plugin for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn description(&self) -> String {
        "Returns its input unchanged (a diagnostic).".into()
    }

    fn input_schema(&self) -> Schema {
        // Any value comes back; in an object these fields are diagnostic aids.
        Schema::any()
            .desc("any value, returned unchanged")
            .field(
                "sleep_ms",
                Schema::integer(0, self.max_sleep_ms.min(i64::MAX as u64) as i64)
                    .desc("wait this long first (cancellable)"),
            )
            .field("fail", Schema::string().desc("fail with this message"))
            .field(
                "retryable",
                Schema::boolean().desc("with `fail`: retryable"),
            )
            .field(
                "panic",
                Schema::boolean().desc("panic (tests panic isolation)"),
            )
    }

    fn concurrency(&self) -> usize {
        // Nothing shared: the agent's max_concurrency is the limit.
        super::MAX_PLUGIN_CONCURRENCY
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        if let Some(v) = task.input.get("sleep_ms") {
            let ms = match v {
                Value::Int(i) if *i >= 0 && (*i as u64) <= self.max_sleep_ms => *i as u64,
                _ => {
                    return Err(invalid(
                        "sleep_ms",
                        &format!("expected an integer from 0 to {}", self.max_sleep_ms),
                    ))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = task.cancel.cancelled() => return Err(PluginError::Cancelled("echo".into())),
            }
        }
        match task.input.get("fail") {
            Some(Value::Str(msg)) => {
                let retryable = matches!(task.input.get("retryable"), Some(Value::Bool(true)));
                return Err(PluginError::Failed {
                    plugin: "echo".into(),
                    // The attempt number shows which run failed (retries run again).
                    message: format!("{msg} (attempt {})", task.attempt),
                    retryable,
                });
            }
            Some(_) => return Err(invalid("fail", "expected a string")),
            None => {}
        }
        if matches!(task.input.get("panic"), Some(Value::Bool(true))) {
            panic!("echo asked to panic by task {}", task.id);
        }
        Ok(task.input)
    }
}
