//! The `llm` plugin (feature `llm`): chat completions and embeddings on a
//! heavy node, with llama.cpp embedded or an OpenAI-compatible upstream
//! pool per model (see [`crate::llm`]).
//!
//! Input: `{"chat": ChatRequest}` or `{"embed": EmbedRequest}` (what the
//! server's OpenAI gateway submits). A chat streams its text as it is
//! decoded through the task's output stream and returns the whole
//! [`crate::llm::Completion`]; a cancel stops decoding within one token.
//!
//! ```toml
//! [plugins.llm]
//! models_dir = "models/llm"      # GGUF manifests
//! cache_bytes = 4294967296       # default: the board's model_cache_bytes
//! [plugins.llm.models.qwen2.5-coder-0.5b-instruct]
//! backend = "embedded"           # the default
//! context = 4096
//! slots = 4
//! [plugins.llm.models.llama-70b]
//! backend = "openai"
//! upstreams = [{ url = "http://gpu-1:8000/v1", api_key_env = "VLLM_KEY" }]
//! ```
//!
//! Models named by the board (`models`) that have a manifest in
//! `models_dir` and their file on disk are served embedded with the
//! defaults when the config does not name them.

use super::util::{blocking, config_err, failed, invalid};
use super::{Plugin, PluginError, Schema, TaskContext};
use crate::boards::Board;
use crate::llm::{Backend, ChatRequest, EmbedRequest, FinishReason, LlmError, ModelInfo};
use crate::protocol::Value;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;

const NAME: &str = "llm";

/// The `llm` plugin: a backend per model.
pub struct Llm {
    models: BTreeMap<String, (Arc<dyn Backend>, ModelInfo)>,
    concurrency: usize,
}

impl Llm {
    /// A plugin over these backends: each serves the models it lists.
    pub fn new(backends: Vec<Arc<dyn Backend>>, concurrency: usize) -> Llm {
        let mut models = BTreeMap::new();
        for b in backends {
            for m in b.models() {
                models.insert(m.name.clone(), (b.clone(), m));
            }
        }
        Llm {
            models,
            concurrency: concurrency.max(1),
        }
    }

    /// From `[plugins.llm]` and the board.
    pub fn from_config(table: &toml::Table, board: &Board) -> Result<Llm, PluginError> {
        super::check_keys(
            NAME,
            table,
            &["models_dir", "cache_bytes", "threads", "models"],
        )?;
        let (backends, slots) = build_backends(table, board).map_err(|e| match e {
            LlmError::Config { key, message } => config_err(NAME, &key, message),
            e => config_err(NAME, "models", e.to_string()),
        })?;
        // As many tasks run as there are slots (every model's, and a pool's
        // upstream permits); more wait in the agent's durable queue, not
        // in an engine's memory. The agent's own limit applies on top.
        Ok(Llm::new(backends, slots))
    }

    fn backend(&self, model: &str) -> Result<Arc<dyn Backend>, PluginError> {
        match self.models.get(model) {
            Some((b, _)) => Ok(b.clone()),
            None => Err(invalid(
                NAME,
                "model",
                LlmError::UnknownModel {
                    name: model.to_string(),
                    known: self.models.keys().cloned().collect::<Vec<_>>().join(", "),
                }
                .to_string(),
            )),
        }
    }
}

/// The backends `[plugins.llm]` configures (see the module docs): one
/// upstream pool per `openai` model, one embedded engine for the rest.
fn build_backends(
    table: &toml::Table,
    board: &Board,
) -> Result<(Vec<Arc<dyn Backend>>, usize), LlmError> {
    let cfg_err = |key: String, message: String| LlmError::Config { key, message };
    let empty = toml::Table::new();
    let models = match table.get("models") {
        None => &empty,
        Some(toml::Value::Table(t)) => t,
        Some(v) => {
            return Err(cfg_err(
                "models".into(),
                format!("expected a table, found {v}"),
            ))
        }
    };
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    let mut slots = 0usize;
    let mut embedded: BTreeMap<String, toml::Table> = BTreeMap::new();
    for (name, v) in models {
        let key = format!("models.{name}");
        let toml::Value::Table(t) = v else {
            return Err(cfg_err(key, format!("expected a table, found {v}")));
        };
        let mut t = t.clone();
        let backend = match t.remove("backend") {
            None => "embedded".to_string(),
            Some(toml::Value::String(b)) => b,
            Some(v) => {
                return Err(cfg_err(
                    format!("{key}.backend"),
                    format!("expected a string, found {v}"),
                ))
            }
        };
        match backend.as_str() {
            "embedded" => {
                slots += match t.get("slots") {
                    Some(toml::Value::Integer(n)) if *n > 0 => *n as usize,
                    _ => crate::llm::embedded::DEFAULT_SLOTS as usize,
                };
                embedded.insert(name.clone(), t);
            }
            "openai" => {
                let upstream = match t.remove("upstream_model") {
                    None => name.clone(),
                    Some(toml::Value::String(u)) => u,
                    Some(v) => {
                        return Err(cfg_err(
                            format!("{key}.upstream_model"),
                            format!("expected a string, found {v}"),
                        ))
                    }
                };
                let mut m = toml::Table::new();
                m.insert("name".into(), toml::Value::String(name.clone()));
                m.insert("upstream".into(), toml::Value::String(upstream));
                t.insert(
                    "models".into(),
                    toml::Value::Array(vec![toml::Value::Table(m)]),
                );
                let pool =
                    crate::llm::upstream::UpstreamPool::from_toml(&t).map_err(|e| match e {
                        LlmError::Config { key: k, message } => cfg_err(
                            if k.is_empty() {
                                key.clone()
                            } else {
                                format!("{key}.{k}")
                            },
                            message,
                        ),
                        e => e,
                    })?;
                slots += match t.get("upstreams") {
                    Some(toml::Value::Array(u)) => u
                        .iter()
                        .map(|u| match u.get("max_concurrent") {
                            Some(toml::Value::Integer(n)) if *n > 0 => *n as usize,
                            _ => 4, // the pool's default max_concurrent
                        })
                        .sum(),
                    _ => 8,
                };
                backends.push(Arc::new(pool));
            }
            other => {
                return Err(cfg_err(
                    format!("{key}.backend"),
                    format!("`{other}` is not embedded or openai"),
                ))
            }
        }
    }
    // The board's models that have a manifest and a file here are served
    // with the defaults unless the config names them.
    let dir = match table.get("models_dir") {
        Some(toml::Value::String(d)) => std::path::PathBuf::from(d),
        _ => std::path::PathBuf::from("models/llm"),
    };
    if let Ok(repo) = crate::llm::manifest::LlmRepo::open(&dir) {
        for name in &board.models {
            if models.contains_key(name) {
                continue;
            }
            if let Ok(m) = repo.get(name) {
                if repo.model_path(m).exists() {
                    slots += crate::llm::embedded::DEFAULT_SLOTS as usize;
                    embedded.insert(name.clone(), toml::Table::new());
                }
            }
        }
    }
    if let Some(b) = embedded_backend(table, board, embedded)? {
        backends.push(b);
    }
    if backends.is_empty() {
        return Err(cfg_err(
            "models".into(),
            "no model to serve: name one under [plugins.llm.models] or in the board's `models`"
                .into(),
        ));
    }
    Ok((backends, slots.max(1)))
}

/// The embedded engine for these models, or none when there are none.
/// `models_dir`, `cache_bytes` (default: the board's `model_cache_bytes`)
/// and `threads` (default: the free physical cores) are the plugin's;
/// each model's table holds its [`ModelConfig`] keys.
fn embedded_backend(
    table: &toml::Table,
    board: &Board,
    models: BTreeMap<String, toml::Table>,
) -> Result<Option<Arc<dyn Backend>>, LlmError> {
    use crate::llm::embedded::{Embedded, EmbeddedConfig, ModelConfig};
    if models.is_empty() {
        return Ok(None);
    }
    let cfg_err = |key: &str, message: String| LlmError::Config {
        key: key.to_string(),
        message,
    };
    let models_dir = match table.get("models_dir") {
        None => std::path::PathBuf::from("models/llm"),
        Some(toml::Value::String(d)) => std::path::PathBuf::from(d),
        Some(v) => {
            return Err(cfg_err(
                "models_dir",
                format!("expected a string, found {v}"),
            ))
        }
    };
    let cache_bytes = match table.get("cache_bytes") {
        None => board.limits.model_cache_bytes,
        Some(toml::Value::Integer(n)) if *n > 0 => *n as u64,
        Some(v) => {
            return Err(cfg_err(
                "cache_bytes",
                format!("expected a positive integer, found {v}"),
            ))
        }
    };
    let threads = match table.get("threads") {
        None => None,
        Some(toml::Value::Integer(n)) if (1..=1024).contains(n) => Some(*n),
        Some(v) => {
            return Err(cfg_err(
                "threads",
                format!("expected an integer from 1 to 1024, found {v}"),
            ))
        }
    };
    let mut configs = Vec::new();
    for (name, mut t) in models {
        t.insert("model".into(), toml::Value::String(name.clone()));
        if let (Some(n), false) = (threads, t.contains_key("threads")) {
            t.insert("threads".into(), toml::Value::Integer(n));
        }
        let c: ModelConfig = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| {
                cfg_err(&format!("models.{name}"), e.message().to_string())
            })?;
        configs.push(c);
    }
    let e = Embedded::new(EmbeddedConfig {
        models_dir,
        cache_bytes,
        models: configs,
    })?;
    Ok(Some(Arc::new(e)))
}

/// A backend's error as the task's: what the client got wrong is invalid
/// input (the gateway's 400), what may work elsewhere or later is retryable.
fn plugin_error(e: LlmError) -> PluginError {
    match &e {
        LlmError::InvalidRequest { field, .. } => invalid(NAME, field, e.to_string()),
        LlmError::ContextOverflow { .. } => invalid(NAME, "messages", e.to_string()),
        LlmError::UnknownModel { .. } => invalid(NAME, "model", e.to_string()),
        LlmError::Busy { .. } | LlmError::Upstream { .. } | LlmError::NoUpstream { .. } => {
            PluginError::Failed {
                plugin: NAME.into(),
                message: e.to_string(),
                retryable: true,
            }
        }
        LlmError::Model { .. } | LlmError::Engine { .. } | LlmError::Config { .. } => {
            failed(NAME, e.to_string())
        }
    }
}

#[async_trait]
impl Plugin for Llm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Chat completions and embeddings with a language model on this node.".into()
    }

    fn capabilities(&self) -> Vec<String> {
        self.models
            .keys()
            .flat_map(|m| [format!("llm:{m}"), format!("model:{m}")])
            .collect()
    }

    fn input_schema(&self) -> Schema {
        // The request's own checks (`ChatRequest::validate`) name the field.
        Schema::object()
            .field("chat", Schema::object().open())
            .field(
                "stream",
                Schema::boolean().desc("send the text as it is decoded (the gateway's `stream`)"),
            )
            .field("embed", Schema::object().open())
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn streams(&self) -> bool {
        true
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let input = serde_json::Value::from(task.input.clone());
        if let Some(chat) = input.get("chat") {
            let req: ChatRequest = serde_json::from_value(chat.clone())
                .map_err(|e| invalid(NAME, "chat", e.to_string()))?;
            req.validate().map_err(plugin_error)?;
            let backend = self.backend(&req.model)?;
            // Only a client that reads the text as it comes gets chunks: a
            // request without `stream` would double the MQTT traffic.
            let stream = input.get("stream").and_then(|v| v.as_bool()) == Some(true);
            let output = task.output.clone();
            let cancel = task.cancel.clone();
            let c = blocking(NAME, &task, move || {
                backend
                    .chat(
                        &req,
                        &mut |piece| {
                            // The result has the whole text in any case.
                            if stream {
                                output.send_blocking(piece);
                            }
                        },
                        &cancel,
                    )
                    .map_err(plugin_error)
            })
            .await?;
            if c.finish_reason == FinishReason::Cancelled {
                return Err(PluginError::Cancelled(NAME.into()));
            }
            let v = serde_json::to_value(&c).map_err(|e| failed(NAME, e.to_string()))?;
            return Ok(Value::from(v));
        }
        if let Some(embed) = input.get("embed") {
            let req: EmbedRequest = serde_json::from_value(embed.clone())
                .map_err(|e| invalid(NAME, "embed", e.to_string()))?;
            let backend = self.backend(&req.model)?;
            let n = req.input.iter().map(|s| s.len()).sum::<usize>();
            let vectors = blocking(NAME, &task, move || {
                backend.embed(&req).map_err(plugin_error)
            })
            .await?;
            let v =
                serde_json::json!({"embeddings": vectors, "prompt_tokens": 0, "input_bytes": n});
            return Ok(Value::from(v));
        }
        Err(invalid(
            NAME,
            "chat",
            "the input holds neither `chat` nor `embed`",
        ))
    }
}
