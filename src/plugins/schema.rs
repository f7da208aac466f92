//! The plugins' side of [`crate::schema`]: the check the agent runs
//! before `execute`, with the error naming the plugin.

pub use crate::schema::{EffectRule, Effects, Kind, Schema};

use super::PluginError;
use crate::protocol::Value;

impl Schema {
    /// Checks `input`; the error names `plugin` and the field's path.
    pub fn check(&self, plugin: &str, input: &Value) -> Result<(), PluginError> {
        self.validate(input).map_err(|e| PluginError::InvalidInput {
            plugin: plugin.into(),
            field: e.field,
            message: e.message,
        })
    }
}
