//! Error type of the language-model module.

use std::path::PathBuf;

/// Everything that can go wrong between a request and its completion.
/// Messages name the model, the field or the upstream involved, so the
/// gateway can pass them to the client as they are.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// A request value is missing or out of range.
    #[error("invalid request: `{field}`: {message}")]
    InvalidRequest { field: String, message: String },
    /// No model of that name here.
    #[error("unknown model `{name}` (served here: {known})")]
    UnknownModel { name: String, known: String },
    /// The prompt does not fit the model's context with room to answer.
    #[error(
        "model `{model}`: the prompt is {prompt_tokens} tokens, the context is {context} tokens"
    )]
    ContextOverflow {
        model: String,
        prompt_tokens: u32,
        context: u32,
    },
    /// A manifest is malformed, or names a file that is missing, truncated
    /// or has another sha256.
    #[error("model `{model}`: {path}: {message}")]
    Model {
        model: String,
        path: PathBuf,
        message: String,
    },
    /// The engine failed (llama.cpp returned an error).
    #[error("model `{model}`: {message}")]
    Engine { model: String, message: String },
    /// Every slot is taken and the wait for one ended.
    #[error("model `{model}`: all {slots} slot(s) busy")]
    Busy { model: String, slots: u32 },
    /// An upstream answered with an error or broke the stream.
    #[error("upstream {url}: {message}")]
    Upstream { url: String, message: String },
    /// No upstream of the pool is healthy (each one's last error listed).
    #[error("model `{model}`: no upstream left ({detail})")]
    NoUpstream { model: String, detail: String },
    /// The agent's config for the plugin is wrong: the key is named.
    #[error("invalid config: key `{key}`: {message}")]
    Config { key: String, message: String },
}

impl LlmError {
    /// Whether trying again (elsewhere, later) may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            LlmError::Busy { .. } | LlmError::Upstream { .. } | LlmError::NoUpstream { .. }
        )
    }
}
