//! Language models on heavy nodes. The types here are shared by the
//! server's OpenAI gateway and the agent; the engines are behind features
//! (`llm` for llama.cpp, off in edge builds).
//!
//! A heavy node is an `openclaw-agent` on a PC or GPU box (board `pc`); its
//! `llm` plugin answers chat and embedding requests with one of two
//! backends, chosen per model in the agent's config:
//!
//! - [`embedded`]: llama.cpp through `llama-cpp-2` (GGUF files described by
//!   manifests in `models/llm/`), several sequences in one batch, models
//!   kept in a cache bounded in bytes;
//! - [`upstream`]: a pool of OpenAI-compatible servers (vLLM, llama-server,
//!   Ollama...) with health checks, cooldown and failover.
//!
//! Both implement [`Backend`]: a blocking call (run it on a blocking
//! thread) that hands each decoded piece of text to a callback as it comes
//! and stops within one token when its [`CancellationToken`] is cancelled.
//! The request types are the task input of plugin `llm` (JSON), the same
//! shape as OpenAI's chat request, so the server's gateway passes a
//! client's body through after checking it.

#[cfg(feature = "llm")]
pub mod embedded;
mod error;
#[cfg(feature = "llm")]
pub mod manifest;
#[cfg(feature = "llm")]
pub mod upstream;

pub use error::LlmError;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Most messages one chat request may carry.
pub const MAX_MESSAGES: usize = 1024;
/// Most stop strings (OpenAI allows 4).
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 64;
/// Largest `max_tokens` accepted (a node's context bounds it further).
pub const MAX_TOKENS_LIMIT: u32 = 1 << 20;

/// One chat message. `content` is text only (no images, no parts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
    /// OpenAI clients send `name` on some messages; kept, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// How the output is constrained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON that the schema accepts (through a llama.cpp grammar).
    JsonSchema {
        json_schema: JsonSchemaSpec,
    },
}

/// OpenAI's `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub schema: serde_json::Value,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// A chat request: the input of an `llm` task of kind `chat`, and the body
/// of `POST /v1/chat/completions` (fields the gateway does not pass on,
/// such as `stream`, are taken off before).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate (`max_completion_tokens` is read as this too).
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<u32>,
    /// 0 ..= 2; 0 is greedy. Default 1 (OpenAI's).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// (0, 1]. Default 1.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// 0 (off) or more. Not OpenAI's, as llama-server and vLLM take it.
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub seed: Option<u32>,
    /// One string or a list, at most [`MAX_STOP`].
    #[serde(default, deserialize_with = "one_or_many")]
    pub stop: Vec<String>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
}

/// The text of an embeddings request: one string or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedRequest {
    pub model: String,
    #[serde(deserialize_with = "one_or_many")]
    pub input: Vec<String>,
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The request was cancelled.
    Cancelled,
}

/// What a chat request produced: the result of an `llm` chat task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub model: String,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// A model a backend serves, for `GET /v1/models` and the agent's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// `embedded` or `openai`.
    pub backend: String,
    /// Context length in tokens (0 when unknown, as for an upstream).
    pub context: u32,
}

/// A language-model backend. Calls block: run them on a blocking thread.
pub trait Backend: Send + Sync {
    /// The models this backend serves.
    fn models(&self) -> Vec<ModelInfo>;

    /// Runs a chat request. Each piece of text is passed to `on_piece` as
    /// soon as it is decoded (the pieces joined are the returned `text`);
    /// when `cancel` is cancelled decoding stops within one token and the
    /// completion so far is returned with [`FinishReason::Cancelled`].
    fn chat(
        &self,
        req: &ChatRequest,
        on_piece: &mut dyn FnMut(&str),
        cancel: &CancellationToken,
    ) -> Result<Completion, LlmError>;

    /// One vector per input, in order.
    fn embed(&self, req: &EmbedRequest) -> Result<Vec<Vec<f32>>, LlmError>;
}

impl ChatRequest {
    /// Checks the values a backend relies on; the error names the field.
    pub fn validate(&self) -> Result<(), LlmError> {
        let bad = |field: &str, message: String| {
            Err(LlmError::InvalidRequest {
                field: field.to_string(),
                message,
            })
        };
        if self.model.is_empty() {
            return bad("model", "must not be empty".into());
        }
        if self.messages.is_empty() {
            return bad("messages", "must hold at least one message".into());
        }
        if self.messages.len() > MAX_MESSAGES {
            return bad(
                "messages",
                format!("{} messages, at most {MAX_MESSAGES}", self.messages.len()),
            );
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return bad(
                    &format!("messages[{i}].role"),
                    format!("`{}` is not system, user, assistant or tool", m.role),
                );
            }
        }
        if let Some(n) = self.max_tokens {
            if n == 0 || n > MAX_TOKENS_LIMIT {
                return bad(
                    "max_tokens",
                    format!("{n} is not in 1..={MAX_TOKENS_LIMIT}"),
                );
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return bad("temperature", format!("{t} is not in 0..=2"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", format!("{p} is not in (0, 1]"));
            }
        }
        if let Some(k) = self.top_k {
            if k < 0 {
                return bad("top_k", format!("{k} is negative"));
            }
        }
        if self.stop.len() > MAX_STOP {
            return bad(
                "stop",
                format!("{} stop strings, at most {MAX_STOP}", self.stop.len()),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "a stop string is empty".into());
        }
        // Each token is checked against every suffix of every stop string.
        if let Some((i, s)) = self
            .stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_STOP_BYTES)
        {
            return bad(
                &format!("stop[{i}]"),
                format!("{} bytes, at most {MAX_STOP_BYTES}", s.len()),
            );
        }
        // llama.cpp takes this seed for "random".
        if self.seed == Some(u32::MAX) {
            return bad(
                "seed",
                format!(
                    "{} means a random seed to llama.cpp; leave `seed` out for that",
                    u32::MAX
                ),
            );
        }
        Ok(())
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
        None => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_openai_body_parses_and_bad_values_name_their_field() {
        let r: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "stop": "\n", "max_completion_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        }))
        .unwrap();
        assert_eq!(r.stop, vec!["\n"]);
        assert_eq!(r.max_tokens, Some(5));
        r.validate().unwrap();
        let mut bad = r.clone();
        bad.temperature = Some(3.0);
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
        let mut bad = r;
        bad.messages[0].role = "robot".into();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("messages[0].role"), "{e}");
    }
}
