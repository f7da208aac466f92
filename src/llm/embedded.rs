//! The `embedded` backend: llama.cpp through `llama-cpp-2`.
//!
//! Each configured model names a GGUF manifest (`models/llm/*.toml`). A
//! model is loaded on first use (its file's size and sha256 checked first)
//! and kept in a cache bounded in bytes, least recently used evicted first,
//! as `inference::Engine` does for ONNX models.
//!
//! A loaded model has ONE engine thread that owns its llama.cpp context with
//! `slots` sequences. Requests reach it on a bounded channel (a request that
//! finds every slot busy waits there); each step of the thread puts one
//! token of every active sequence (or a chunk of a new prompt) in one
//! `LlamaBatch`, decodes it, samples each sequence and sends the decoded
//! text back to the caller's thread, which hands it to `on_piece`. A
//! finished sequence's KV cells are cleared and its slot is free again.
//!
//! Each sequence has a full `context` of its own (the llama.cpp context is
//! `context * slots` tokens, not unified), so a sequence never runs out of
//! KV cells because of the others.

use crate::hex;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::manifest::{LlmManifest, LlmRepo};
use super::{
    Backend, ChatRequest, Completion, EmbedRequest, FinishReason, LlmError, ModelInfo,
    ResponseFormat,
};

/// Default context per sequence, in tokens.
pub const DEFAULT_CONTEXT: u32 = 4096;
/// Default number of parallel sequences per model.
pub const DEFAULT_SLOTS: u32 = 4;
/// Default llama.cpp batch size (tokens per decode).
pub const DEFAULT_BATCH: u32 = 512;
/// Default bound of the engine's model cache: 4 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 30;
/// Most tokens of one embeddings input. The embeddings context decodes an
/// input in one micro-batch, and llama.cpp reserves compute memory for the
/// logits of every token of it (vocabulary x tokens x 4 bytes: 311 MB at
/// 512 tokens for Qwen2.5's 151,936 entries).
pub const EMBED_CONTEXT_MAX: u32 = 512;
/// Most slots per model (llama.cpp's `LLAMA_MAX_SEQ` is 256).
pub const MAX_SLOTS: u32 = 64;

/// One model the engine serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The manifest's `name`; also the `model` of requests.
    pub model: String,
    /// Context of each sequence in tokens (at most the manifest's trained context).
    #[serde(default = "default_context")]
    pub context: u32,
    /// Sequences decoded together.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// llama.cpp threads; default: the free physical cores, at least 1.
    #[serde(default)]
    pub threads: Option<u32>,
    /// Tokens per decode call (prompt chunks).
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// Also serve embeddings (a second llama.cpp context, mean pooling,
    /// inputs of at most [`EMBED_CONTEXT_MAX`] tokens).
    #[serde(default)]
    pub embeddings: bool,
    /// Requests that may wait for a slot; default `2 * slots`.
    #[serde(default)]
    pub queue: Option<u32>,
}

fn default_context() -> u32 {
    DEFAULT_CONTEXT
}
fn default_slots() -> u32 {
    DEFAULT_SLOTS
}
fn default_batch() -> u32 {
    DEFAULT_BATCH
}
fn default_cache_bytes() -> u64 {
    DEFAULT_CACHE_BYTES
}
fn default_models_dir() -> PathBuf {
    PathBuf::from("models/llm")
}

impl ModelConfig {
    /// A config for `model` with every default.
    pub fn new(model: impl Into<String>) -> ModelConfig {
        ModelConfig {
            model: model.into(),
            context: DEFAULT_CONTEXT,
            slots: DEFAULT_SLOTS,
            threads: None,
            batch: DEFAULT_BATCH,
            embeddings: false,
            queue: None,
        }
    }
}

/// The engine's config (the agent's `[plugins.llm.embedded]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Folder of the GGUF manifests.
    #[serde(default = "default_models_dir")]
    pub models_dir: PathBuf,
    /// Models loaded at once may need this many bytes (weights and KV
    /// cache, estimated); past it the least recently used is unloaded.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// The models served.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

/// Physical cores not busy now (1-minute load average), at least 1.
pub fn free_physical_cores() -> u32 {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let physical = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .map(|s| {
            let mut cores = std::collections::HashSet::new();
            let mut phys = "";
            for line in s.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    match k.trim() {
                        "physical id" => phys = v.trim(),
                        "core id" => {
                            cores.insert((phys.to_string(), v.trim().to_string()));
                        }
                        _ => {}
                    }
                }
            }
            cores.len() as u32
        })
        .filter(|n| *n > 0)
        .unwrap_or(logical)
        .min(logical);
    let busy = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |l| l.round() as u32);
    // llama.cpp's threads spin-wait: on busy cores one thread too many
    // divides the speed many times (measured 30 -> 1 tokens/s).
    physical.saturating_sub(busy).max(1)
}

/// The llama.cpp backend, initialised once per process.
fn backend() -> Result<&'static LlamaBackend, LlmError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            if std::env::var_os("OPENCLAW_LLAMA_LOG").is_none() {
                llama_cpp_2::send_logs_to_tracing(
                    llama_cpp_2::LogOptions::default().with_logs_enabled(false),
                );
            }
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LlmError::Engine {
            model: String::new(),
            message: format!("llama.cpp backend: {e}"),
        })
}

/// Checks a model file's size, then its sha256, against the manifest.
fn check_file(m: &LlmManifest, path: &std::path::Path) -> Result<(), LlmError> {
    let err = |message: String| LlmError::Model {
        model: m.name.clone(),
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            err(format!(
                "missing: run `openclaw-admin models fetch {}` (it downloads the file and checks it)",
                m.name
            ))
        } else {
            err(e.to_string())
        }
    })?;
    if meta.len() != m.size {
        return Err(err(format!(
            "{} bytes, the manifest says {} ({}): run `openclaw-admin models fetch {}`",
            meta.len(),
            m.size,
            if meta.len() < m.size {
                "truncated"
            } else {
                "too long"
            },
            m.name
        )));
    }
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| err(e.to_string()))?;
    let actual = hex(&h.finalize());
    if actual != m.sha256 {
        return Err(err(format!(
            "sha256 mismatch: expected {} (manifest), actual {actual}",
            m.sha256
        )));
    }
    Ok(())
}

/// What the engine thread sends back to a chat caller.
enum Event {
    Piece(String),
    Done(Result<Completion, LlmError>),
}

/// A chat request ready to decode.
struct ChatJob {
    tokens: Vec<LlamaToken>,
    sampler: LlamaSampler,
    max_tokens: u32,
    stop: Vec<String>,
    cancel: CancellationToken,
    events: mpsc::Sender<Event>,
}

enum Job {
    Chat(Box<ChatJob>),
    Embed {
        inputs: Vec<Vec<LlamaToken>>,
        reply: mpsc::Sender<Result<Vec<Vec<f32>>, LlmError>>,
    },
}

/// A loaded model: its weights (shared with the engine thread, for
/// tokenizing on the caller's thread) and the way to its engine thread.
struct Loaded {
    model: Arc<LlamaModel>,
    template: LlamaChatTemplate,
    jobs: SyncSender<Job>,
    bytes: u64,
    /// Most sequences decoded in one batch so far.
    peak: Arc<AtomicU32>,
}

struct CacheEntry {
    loaded: Arc<Loaded>,
    last_used: Instant,
}

/// The llama.cpp backend. See the module documentation.
pub struct Embedded {
    repo: LlmRepo,
    configs: Vec<ModelConfig>,
    not_offered: Vec<(String, u64)>,
    cache_bytes: u64,
    cache: Mutex<HashMap<String, CacheEntry>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("configs", &self.configs)
            .field("cache_bytes", &self.cache_bytes)
            .finish_non_exhaustive()
    }
}

impl Embedded {
    /// Reads the manifests of `config.models_dir` and checks the config
    /// against them; loads nothing yet.
    pub fn new(config: EmbeddedConfig) -> Result<Embedded, LlmError> {
        let repo = LlmRepo::open(&config.models_dir)?;
        Self::with_repo(repo, config.models, config.cache_bytes)
    }

    /// As [`Embedded::new`] with manifests already read (tests).
    pub fn with_repo(
        repo: LlmRepo,
        models: Vec<ModelConfig>,
        cache_bytes: u64,
    ) -> Result<Embedded, LlmError> {
        let total = crate::plugins::sysinfo::memory()
            .total_kb
            .saturating_mul(1024);
        Self::with_repo_on(repo, models, cache_bytes, total)
    }

    /// As [`Embedded::with_repo`] on a node with `node_memory` bytes of
    /// RAM (0: unknown). A model whose manifest needs more (`memory_bytes`)
    /// is not offered here: placement by memory, so a 70B model is never
    /// routed to a node that cannot hold it ([`Embedded::not_offered`]).
    pub fn with_repo_on(
        repo: LlmRepo,
        models: Vec<ModelConfig>,
        cache_bytes: u64,
        node_memory: u64,
    ) -> Result<Embedded, LlmError> {
        let bad = |key: String, message: String| Err(LlmError::Config { key, message });
        for (i, c) in models.iter().enumerate() {
            let m = match repo.get(&c.model) {
                Ok(m) => m,
                Err(e) => return bad(format!("models[{i}].model"), e.to_string()),
            };
            if c.context < 16 || c.context > m.context {
                return bad(
                    format!("models[{i}].context"),
                    format!(
                        "{} is not in 16..={} (the trained context of `{}`)",
                        c.context, m.context, m.name
                    ),
                );
            }
            if c.slots == 0 || c.slots > MAX_SLOTS {
                return bad(
                    format!("models[{i}].slots"),
                    format!("{} is not in 1..={MAX_SLOTS}", c.slots),
                );
            }
            // One decode step holds a token of every generating slot, and
            // llama.cpp aborts the process on a batch over `n_batch`.
            if c.batch < c.slots {
                return bad(
                    format!("models[{i}].batch"),
                    format!("{} is less than slots ({})", c.batch, c.slots),
                );
            }
            if c.threads == Some(0) {
                return bad(format!("models[{i}].threads"), "must be at least 1".into());
            }
            if c.queue == Some(0) {
                return bad(format!("models[{i}].queue"), "must be at least 1".into());
            }
            if models[..i].iter().any(|o| o.model == c.model) {
                return bad(
                    format!("models[{i}].model"),
                    format!("`{}` is configured twice", c.model),
                );
            }
        }
        let mut offered = Vec::new();
        let mut not_offered = Vec::new();
        for c in models {
            let need = repo.get(&c.model).map(|m| m.memory_bytes).unwrap_or(0);
            if node_memory > 0 && need > node_memory {
                log::warn!(
                    "llm: model `{}` needs {} MB of memory and this node has {} MB: not offered \
                     (a node with more memory, or an upstream pool, can serve it)",
                    c.model,
                    need >> 20,
                    node_memory >> 20
                );
                not_offered.push((c.model, need));
            } else {
                offered.push(c);
            }
        }
        Ok(Embedded {
            repo,
            configs: offered,
            not_offered,
            cache_bytes,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The configured models this node does not offer because they need
    /// more memory than it has: (name, bytes needed).
    pub fn not_offered(&self) -> &[(String, u64)] {
        &self.not_offered
    }

    fn config(&self, name: &str) -> Result<&ModelConfig, LlmError> {
        self.configs
            .iter()
            .find(|c| c.model == name)
            .ok_or_else(|| LlmError::UnknownModel {
                name: name.to_string(),
                known: self
                    .configs
                    .iter()
                    .map(|c| c.model.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Loads a model now (checks, reads, starts its engine thread) unless it
    /// is loaded; returns how long the load took (zero when it was loaded).
    pub fn preload(&self, name: &str) -> Result<Duration, LlmError> {
        let t = Instant::now();
        let was = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name);
        self.get(name)?;
        Ok(if was { Duration::ZERO } else { t.elapsed() })
    }

    /// Most sequences one decode of `name` has carried since it was loaded
    /// (`None` when it is not loaded): how much batching happened.
    pub fn peak_active(&self, name: &str) -> Option<u32> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|e| e.loaded.peak.load(Ordering::Relaxed))
    }

    /// Names of the models loaded now.
    pub fn loaded(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn get(&self, name: &str) -> Result<Arc<Loaded>, LlmError> {
        let config = self.config(name)?.clone();
        // Held while loading: a second request for the same model waits
        // for the first load instead of loading it twice.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache.get_mut(name) {
            e.last_used = Instant::now();
            return Ok(e.loaded.clone());
        }
        let manifest = self.repo.get(name)?.clone();
        let path = self.repo.model_path(&manifest);
        let loaded = Arc::new(load(&manifest, path, &config)?);
        cache.insert(
            name.to_string(),
            CacheEntry {
                loaded: loaded.clone(),
                last_used: Instant::now(),
            },
        );
        // Evict the least recently used others past the bound. A model in
        // use keeps running until its requests end (they hold an Arc).
        loop {
            let total: u64 = cache.values().map(|e| e.loaded.bytes).sum();
            if total <= self.cache_bytes {
                break;
            }
            let Some(victim) = cache
                .iter()
                .filter(|(k, _)| k.as_str() != name)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            log::info!(
                "llm: unloading `{victim}` (cache bound {} bytes)",
                self.cache_bytes
            );
            cache.remove(&victim);
        }
        Ok(loaded)
    }
}

/// Loads a model and starts its engine thread.
fn load(m: &LlmManifest, path: PathBuf, config: &ModelConfig) -> Result<Loaded, LlmError> {
    let started = Instant::now();
    check_file(m, &path)?;
    let backend = backend()?;
    let engine = |message: String| LlmError::Engine {
        model: m.name.clone(),
        message,
    };
    let model =
        LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default()).map_err(|e| {
            LlmError::Model {
                model: m.name.clone(),
                path: path.clone(),
                message: format!("llama.cpp cannot load it: {e}"),
            }
        })?;
    let model = Arc::new(model);
    let template = match model.chat_template(None) {
        Ok(t) => t,
        Err(_) => {
            let t = m.chat_template.as_deref().ok_or_else(|| {
                engine(
                    "the GGUF has no chat template and the manifest gives none (`chat_template`)"
                        .into(),
                )
            })?;
            LlamaChatTemplate::new(t).map_err(|e| engine(format!("chat_template: {e}")))?
        }
    };
    let threads = config.threads.unwrap_or_else(free_physical_cores).max(1);
    let slots = config.slots;
    let n_ctx = config.context.saturating_mul(slots);
    // Rough: weights + f16 K and V for every cell of every layer.
    let kv_width = (model.n_embd().max(0) as u64) * u64::from(model.n_head_kv())
        / u64::from(model.n_head().max(1));
    let bytes = model.size() + 4 * u64::from(model.n_layer()) * u64::from(n_ctx) * kv_width;
    let (tx, rx) = mpsc::sync_channel::<Job>(config.queue.unwrap_or(2 * slots) as usize);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), LlmError>>();
    let thread_model = model.clone();
    let peak = Arc::new(AtomicU32::new(0));
    let thread_peak = peak.clone();
    let name = m.name.clone();
    let cfg = config.clone();
    std::thread::Builder::new()
        .name(format!("llm-{}", m.name))
        .spawn(move || {
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n_ctx))
                .with_n_batch(cfg.batch)
                .with_n_ubatch(cfg.batch)
                .with_n_seq_max(slots)
                .with_kv_unified(false)
                .with_n_threads(threads as i32)
                .with_n_threads_batch(threads as i32);
            let ctx = match thread_model.new_context(backend, params) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(LlmError::Engine {
                        model: name.clone(),
                        message: format!("cannot create a context of {n_ctx} tokens: {e}"),
                    }));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut w = Worker {
                name,
                model: &thread_model,
                ctx,
                embed_ctx: None,
                cfg,
                threads,
                seqs: (0..slots).map(|_| None).collect(),
                peak: thread_peak,
            };
            w.run(rx);
        })
        .map_err(|e| engine(format!("cannot start the engine thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| engine("the engine thread ended while starting".into()))??;
    log::info!(
        "llm: loaded `{}` in {:.2} s ({} slot(s) x {} tokens, {threads} thread(s), ~{} MB)",
        m.name,
        started.elapsed().as_secs_f64(),
        slots,
        config.context,
        bytes / 1_000_000
    );
    Ok(Loaded {
        model,
        template,
        jobs: tx,
        bytes,
        peak,
    })
}

/// One active sequence of the engine thread.
struct Seq {
    job: Box<ChatJob>,
    /// Prompt tokens not decoded yet.
    pending: Vec<LlamaToken>,
    /// Next position.
    pos: i32,
    prompt_tokens: u32,
    generated: u32,
    /// Batch index of this sequence's logits after the step's decode.
    logits_at: Option<i32>,
    /// The token to decode next step (sampled, not decoded yet).
    next: Option<LlamaToken>,
    text: TextState,
}

/// Decoded text of one sequence: UTF-8 assembly, stop strings, and what
/// was already sent.
#[derive(Debug, Default)]
struct TextState {
    /// Bytes of an unfinished UTF-8 character.
    partial: Vec<u8>,
    /// Valid text decoded so far (sent and held back).
    out: String,
    /// Bytes of `out` sent to the caller.
    sent: usize,
}

impl TextState {
    /// Adds a token's bytes; returns the text that may be sent now and
    /// whether a stop string was reached (the text is then cut before it).
    fn push(&mut self, bytes: &[u8], stops: &[String]) -> (String, bool) {
        self.partial.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.partial) {
                Ok(s) => {
                    self.out.push_str(s);
                    self.partial.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: checked by from_utf8.
                    self.out
                        .push_str(std::str::from_utf8(&self.partial[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.partial.drain(..valid);
                            break;
                        }
                        Some(n) => {
                            self.out.push('\u{FFFD}');
                            self.partial.drain(..valid + n);
                        }
                    }
                }
            }
        }
        // A stop can only start in the unsent part: a sent suffix was never
        // a stop's prefix (see the hold back below).
        let tail = &self.out[self.sent..];
        if let Some(at) = stops.iter().filter_map(|s| tail.find(s.as_str())).min() {
            let end = self.sent + at;
            let piece = self.out[self.sent..end].to_string();
            self.out.truncate(end);
            self.sent = end;
            return (piece, true);
        }
        // Hold back the longest suffix that might be a stop's beginning.
        let mut hold = 0;
        for s in stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && tail.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let end = self.out.len() - hold;
        let piece = self.out[self.sent..end].to_string();
        self.sent = end;
        (piece, false)
    }

    /// At the end: everything held back (an unfinished character is dropped).
    fn flush(&mut self) -> String {
        let piece = self.out[self.sent..].to_string();
        self.sent = self.out.len();
        piece
    }
}

struct Worker<'m> {
    name: String,
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    embed_ctx: Option<LlamaContext<'m>>,
    cfg: ModelConfig,
    threads: u32,
    seqs: Vec<Option<Seq>>,
    peak: Arc<AtomicU32>,
}

impl<'m> Worker<'m> {
    fn engine_err(&self, message: String) -> LlmError {
        LlmError::Engine {
            model: self.name.clone(),
            message,
        }
    }

    fn run(&mut self, jobs: Receiver<Job>) {
        let mut batch = LlamaBatch::new(self.cfg.batch.max(self.cfg.slots) as usize, 1);
        let mut open = true;
        loop {
            // Take new requests while a slot is free; block only when idle.
            while open && self.seqs.iter().any(Option::is_none) {
                let idle = self.seqs.iter().all(Option::is_none);
                let job = if idle {
                    match jobs.recv_timeout(Duration::from_secs(3600)) {
                        Ok(j) => j,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                };
                match job {
                    Job::Chat(job) => self.admit(job),
                    Job::Embed { inputs, reply } => {
                        let _ = reply.send(self.embed(&inputs));
                    }
                }
            }
            if !open && self.seqs.iter().all(Option::is_none) {
                return;
            }
            if self.seqs.iter().all(Option::is_none) {
                continue;
            }
            if let Err(e) = self.step(&mut batch) {
                // A failed decode fails every active request; the context
                // is cleared so the model stays usable.
                for i in 0..self.seqs.len() {
                    self.finish(i, Err(e.clone()));
                }
                self.ctx.clear_kv_cache();
            }
        }
    }

    fn admit(&mut self, job: Box<ChatJob>) {
        let Some(slot) = self.seqs.iter().position(Option::is_none) else {
            let _ = job.events.send(Event::Done(Err(LlmError::Busy {
                model: self.name.clone(),
                slots: self.cfg.slots,
            })));
            return;
        };
        if job.cancel.is_cancelled() {
            let _ = job.events.send(Event::Done(Ok(Completion {
                model: self.name.clone(),
                text: String::new(),
                finish_reason: FinishReason::Cancelled,
                prompt_tokens: job.tokens.len() as u32,
                completion_tokens: 0,
            })));
            return;
        }
        if self.seqs.iter().all(Option::is_none) {
            // Idle: start from an empty cache, so a request alone always
            // lands in the same cells.
            self.ctx.clear_kv_cache();
        } else {
            let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        }
        self.seqs[slot] = Some(Seq {
            prompt_tokens: job.tokens.len() as u32,
            pending: job.tokens.clone(),
            job,
            pos: 0,
            generated: 0,
            logits_at: None,
            next: None,
            text: TextState::default(),
        });
    }

    /// Ends sequence `i`: the caller gets its completion, its KV cells are cleared.
    fn finish(&mut self, i: usize, result: Result<FinishReason, LlmError>) {
        let Some(mut s) = self.seqs[i].take() else {
            return;
        };
        let _ = self.ctx.clear_kv_cache_seq(Some(i as u32), None, None);
        let done = result.map(|reason| {
            if reason != FinishReason::Cancelled {
                let rest = s.text.flush();
                if !rest.is_empty() {
                    let _ = s.job.events.send(Event::Piece(rest));
                }
            }
            s.text.out.truncate(s.text.sent);
            Completion {
                model: self.name.clone(),
                text: std::mem::take(&mut s.text.out),
                finish_reason: reason,
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.generated,
            }
        });
        let _ = s.job.events.send(Event::Done(done));
    }

    /// One decode of every active sequence: a token each for those
    /// generating, a chunk of prompt for those starting.
    fn step(&mut self, batch: &mut LlamaBatch) -> Result<(), LlmError> {
        batch.clear();
        let cap = self.cfg.batch.max(self.cfg.slots) as i32;
        let mut n = 0i32;
        // Sequences with a token in this batch.
        let mut carried = 0u32;
        // Cancellation is checked before every token.
        for i in 0..self.seqs.len() {
            if self.seqs[i]
                .as_ref()
                .is_some_and(|s| s.job.cancel.is_cancelled())
            {
                self.finish(i, Ok(FinishReason::Cancelled));
            }
        }
        for (i, s) in self.seqs.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            s.logits_at = None;
            if let Some(t) = s.next.take() {
                batch
                    .add(t, s.pos, &[i as i32], true)
                    .map_err(|e| LlmError::Engine {
                        model: self.name.clone(),
                        message: format!("batch: {e}"),
                    })?;
                s.logits_at = Some(n);
                s.pos += 1;
                n += 1;
                carried += 1;
            }
        }
        for (i, s) in self.seqs.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            if s.pending.is_empty() || n >= cap {
                continue;
            }
            let take = s.pending.len().min((cap - n) as usize);
            let last = take == s.pending.len();
            carried += 1;
            for (k, t) in s.pending.drain(..take).enumerate() {
                let logits = last && k + 1 == take;
                batch
                    .add(t, s.pos, &[i as i32], logits)
                    .map_err(|e| LlmError::Engine {
                        model: self.name.clone(),
                        message: format!("batch: {e}"),
                    })?;
                if logits {
                    s.logits_at = Some(n);
                }
                s.pos += 1;
                n += 1;
            }
        }
        if n == 0 {
            return Ok(());
        }
        self.peak.fetch_max(carried, Ordering::Relaxed);
        self.ctx
            .decode(batch)
            .map_err(|e| self.engine_err(format!("decode: {e}")))?;
        let model = self.model;
        let vocab = model.vocab();
        for i in 0..self.seqs.len() {
            let outcome = {
                let Some(s) = self.seqs[i].as_mut() else {
                    continue;
                };
                let Some(at) = s.logits_at else { continue };
                let token = s.job.sampler.sample(&self.ctx, at);
                if vocab.is_eog(token) {
                    Some(FinishReason::Stop)
                } else {
                    s.generated += 1;
                    let bytes = vocab.token_to_piece(token, false, None);
                    let (piece, stopped) = s.text.push(&bytes, &s.job.stop);
                    if !piece.is_empty() && s.job.events.send(Event::Piece(piece)).is_err() {
                        // The caller is gone: nobody to answer.
                        Some(FinishReason::Cancelled)
                    } else if stopped {
                        Some(FinishReason::Stop)
                    } else if s.generated >= s.job.max_tokens || s.pos as u32 >= self.cfg.context {
                        Some(FinishReason::Length)
                    } else {
                        s.next = Some(token);
                        None
                    }
                }
            };
            if let Some(reason) = outcome {
                self.finish(i, Ok(reason));
            }
        }
        Ok(())
    }

    /// Mean-pooled, L2-normalised embeddings, one input at a time, in a
    /// context of its own (made on first use).
    fn embed(&mut self, inputs: &[Vec<LlamaToken>]) -> Result<Vec<Vec<f32>>, LlmError> {
        if self.embed_ctx.is_none() {
            let n = self.cfg.context.min(EMBED_CONTEXT_MAX);
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n))
                .with_n_batch(n)
                .with_n_ubatch(n)
                .with_n_seq_max(1)
                .with_embeddings(true)
                .with_pooling_type(LlamaPoolingType::Mean)
                .with_n_threads(self.threads as i32)
                .with_n_threads_batch(self.threads as i32);
            let model = self.model;
            let ctx = model
                .new_context(backend()?, params)
                .map_err(|e| self.engine_err(format!("embeddings context: {e}")))?;
            self.embed_ctx = Some(ctx);
        }
        let name = self.name.clone();
        let err = |message: String| LlmError::Engine {
            model: name.clone(),
            message,
        };
        let Some(ctx) = self.embed_ctx.as_mut() else {
            return Err(err("no embeddings context".into()));
        };
        let mut out = Vec::with_capacity(inputs.len());
        for tokens in inputs {
            ctx.clear_kv_cache();
            let mut batch = LlamaBatch::new(tokens.len().max(1), 1);
            batch
                .add_sequence(tokens, 0, false)
                .map_err(|e| err(format!("batch: {e}")))?;
            ctx.decode(&mut batch)
                .map_err(|e| err(format!("decode: {e}")))?;
            let v = ctx
                .embeddings_seq_ith(0)
                .map_err(|e| err(format!("embeddings: {e}")))?;
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            out.push(v.iter().map(|x| x / norm).collect());
        }
        Ok(out)
    }
}

/// A GBNF grammar for the response format (`None` for text).
fn grammar_for(format: &ResponseFormat) -> Result<Option<String>, LlmError> {
    match format {
        ResponseFormat::Text => Ok(None),
        ResponseFormat::JsonObject => Ok(Some(format!("root ::= object\n{JSON_RULES}"))),
        ResponseFormat::JsonSchema { json_schema } => {
            let mut g = Gbnf::default();
            let root = g.rule_for(&json_schema.schema, "root").map_err(|message| {
                LlmError::InvalidRequest {
                    field: "response_format.json_schema.schema".into(),
                    message,
                }
            })?;
            let mut text = format!("root ::= {root}\n");
            for (name, body) in &g.rules {
                text.push_str(&format!("{name} ::= {body}\n"));
            }
            text.push_str(JSON_RULES);
            Ok(Some(text))
        }
    }
}

/// Temperatures below this decode greedily.
pub const MIN_TEMPERATURE: f32 = 1e-3;
/// Most parts (sub-schemas) of a `json_schema` turned into a grammar: a
/// small schema that nests lists of types would otherwise make
/// exponentially many rules.
pub const MAX_SCHEMA_PARTS: usize = 256;

/// Most characters and items all of a schema's `maxLength`s and `minItems`
/// spell out together, so one request cannot make a grammar of a million
/// rules.
const MAX_GRAMMAR_SPELLED: u64 = 16_384;

/// Largest `minItems` a grammar spells out.
const MAX_GRAMMAR_MIN_ITEMS: u64 = 64;

/// Longest `maxLength` a grammar spells out (each character a rule in
/// llama.cpp's expansion of `{0,N}`).
const MAX_GRAMMAR_STRING: u64 = 4096;

/// JSON in GBNF (llama.cpp's `json.gbnf`), with bounded whitespace so a
/// small model cannot loop on blanks.
const JSON_RULES: &str = r#"value ::= object | array | string | number | ("true" | "false" | "null")
object ::= "{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* )? ws "}"
array ::= "[" ws ( value ( ws "," ws value )* )? ws "]"
string ::= "\"" char* "\""
char ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] )
number ::= "-"? ( [0-9] | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
integer ::= "-"? ( [0-9] | [1-9] [0-9]* )
boolean ::= "true" | "false"
null ::= "null"
ws ::= [ \t\n]? [ \t\n]?
"#;

/// A JSON Schema subset turned into GBNF rules: `type` (object, array,
/// string, number, integer, boolean, null, or a list of them), `properties`
/// with `required` (properties are written in key order, serde_json's; optional ones
/// may be left out), `items`, `enum`, `const`, `anyOf`/`oneOf`, and
/// `maxLength` of strings (up to [`MAX_GRAMMAR_STRING`] characters, so a
/// small model cannot ramble past its token budget inside a string) and
/// `minItems` of arrays (so it cannot answer a list with `[]`). Other
/// keywords that constrain values (`pattern`, `minimum`, ...) are refused
/// rather than ignored, so an answer never claims a schema it did not follow.
#[derive(Default)]
struct Gbnf {
    rules: Vec<(String, String)>,
    /// `rule_for` calls so far, bounded by [`MAX_SCHEMA_PARTS`].
    parts: usize,
    /// Characters and items spelled out by `maxLength` and `minItems` so far
    /// (llama.cpp expands each into rules), bounded by [`MAX_GRAMMAR_SPELLED`].
    spelled: u64,
}

impl Gbnf {
    fn add(&mut self, hint: &str, body: String) -> String {
        let base: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let mut name = format!("s-{base}");
        let mut k = 1;
        while self.rules.iter().any(|(n, _)| *n == name) {
            k += 1;
            name = format!("s-{base}-{k}");
        }
        self.rules.push((name.clone(), body));
        name
    }

    fn spell(&mut self, n: u64, hint: &str) -> Result<(), String> {
        self.spelled += n;
        if self.spelled > MAX_GRAMMAR_SPELLED {
            return Err(format!(
                "`{hint}`: the schema's `maxLength`s and `minItems` add up to more than {MAX_GRAMMAR_SPELLED}"
            ));
        }
        Ok(())
    }

    fn literal(v: &serde_json::Value) -> String {
        // A JSON text as a GBNF string literal.
        let json = v.to_string();
        let mut s = String::from("\"");
        for c in json.chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
        s
    }

    fn rule_for(&mut self, schema: &serde_json::Value, hint: &str) -> Result<String, String> {
        use serde_json::Value;
        self.parts += 1;
        if self.parts > MAX_SCHEMA_PARTS {
            return Err(format!(
                "the schema has more than {MAX_SCHEMA_PARTS} parts (sub-schemas and types)"
            ));
        }
        let obj = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Object(o) => o,
            other => return Err(format!("`{hint}`: a schema must be an object, not {other}")),
        };
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "type"
                    | "properties"
                    | "required"
                    | "items"
                    | "enum"
                    | "const"
                    | "anyOf"
                    | "oneOf"
                    | "additionalProperties"
                    | "title"
                    | "description"
                    | "maxLength"
                    | "minItems"
                    | "$schema"
                    | "default"
                    | "examples"
            ) {
                return Err(format!("`{hint}`: keyword `{key}` is not supported"));
            }
        }
        if let Some(c) = obj.get("const") {
            return Ok(Self::literal(c));
        }
        if let Some(Value::Array(vals)) = obj.get("enum") {
            if vals.is_empty() {
                return Err(format!("`{hint}`: empty enum"));
            }
            let alts: Vec<String> = vals.iter().map(Self::literal).collect();
            return Ok(format!("( {} )", alts.join(" | ")));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(Value::Array(alts)) = obj.get(key) {
                let mut names = Vec::new();
                for (i, a) in alts.iter().enumerate() {
                    let r = self.rule_for(a, &format!("{hint}-{i}"))?;
                    names.push(r);
                }
                return Ok(format!("( {} )", names.join(" | ")));
            }
        }
        let types: Vec<&str> = match obj.get("type") {
            None => {
                if obj.contains_key("properties") {
                    vec!["object"]
                } else {
                    return Ok("value".into());
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => {
                let mut v: Vec<&str> = Vec::new();
                for t in ts {
                    match t.as_str() {
                        Some(t) if !v.contains(&t) => v.push(t),
                        Some(_) => {}
                        None => return Err(format!("`{hint}`: `type` {t} is not a type")),
                    }
                }
                if v.is_empty() {
                    return Err(format!("`{hint}`: `type` is an empty list"));
                }
                v
            }
            Some(other) => return Err(format!("`{hint}`: `type` {other} is not a type")),
        };
        let mut alts = Vec::new();
        for t in types {
            alts.push(match t {
                "string" => match obj.get("maxLength") {
                    None => "string".to_string(),
                    Some(n) => match n.as_u64() {
                        Some(n) if n <= MAX_GRAMMAR_STRING => {
                            self.spell(n, hint)?;
                            self.add(
                                &format!("{hint}-string"),
                                format!("\"\\\"\" char{{0,{n}}} \"\\\"\""),
                            )
                        }
                        _ => {
                            return Err(format!(
                                "`{hint}`: `maxLength` {n}: 0 to {MAX_GRAMMAR_STRING}"
                            ))
                        }
                    },
                },
                "number" => "number".to_string(),
                "integer" => "integer".to_string(),
                "boolean" => "boolean".to_string(),
                "null" => "null".to_string(),
                "array" => {
                    let item = match obj.get("items") {
                        Some(s) => self.rule_for(s, &format!("{hint}-item"))?,
                        None => "value".into(),
                    };
                    let body = match obj.get("minItems").map(|n| n.as_u64()) {
                        None | Some(Some(0)) => {
                            format!("\"[\" ws ( {item} ( ws \",\" ws {item} )* )? ws \"]\"")
                        }
                        // At least N: the first N spelled out, then any more.
                        Some(Some(n)) if n <= MAX_GRAMMAR_MIN_ITEMS => {
                            self.spell(n, hint)?;
                            let more = format!(" ws \",\" ws {item}");
                            format!(
                                "\"[\" ws {item}{} ( ws \",\" ws {item} )* ws \"]\"",
                                more.repeat(n as usize - 1)
                            )
                        }
                        Some(_) => {
                            return Err(format!(
                                "`{hint}`: `minItems`: 0 to {MAX_GRAMMAR_MIN_ITEMS}"
                            ))
                        }
                    };
                    self.add(&format!("{hint}-array"), body)
                }
                "object" => self.object(obj, hint)?,
                other => return Err(format!("`{hint}`: unknown type `{other}`")),
            });
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            format!("( {} )", alts.join(" | "))
        })
    }

    fn object(
        &mut self,
        obj: &serde_json::Map<String, serde_json::Value>,
        hint: &str,
    ) -> Result<String, String> {
        let Some(props) = obj.get("properties").and_then(|p| p.as_object()) else {
            return Ok("object".into());
        };
        let required: Vec<&str> = obj
            .get("required")
            .and_then(|r| r.as_array())
            .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        for r in &required {
            if !props.contains_key(*r) {
                return Err(format!("`{hint}`: required `{r}` is not in `properties`"));
            }
        }
        // Properties in key order; an optional one is `( "," kv )?`. A
        // leading optional one is made required to keep the grammar simple
        // when nothing required precedes it (models write every field
        // anyway; the output still matches the schema).
        let mut body = String::from("\"{\" ws ");
        let mut first = true;
        for (k, v) in props {
            let value = self.rule_for(v, &format!("{hint}-{k}"))?;
            let key = Self::literal(&serde_json::Value::String(k.clone()));
            let kv = format!("{key} ws \":\" ws {value}");
            if first {
                body.push_str(&kv);
                first = false;
            } else if required.contains(&k.as_str()) {
                body.push_str(&format!(" ws \",\" ws {kv}"));
            } else {
                body.push_str(&format!(" ( ws \",\" ws {kv} )?"));
            }
        }
        body.push_str(" ws \"}\"");
        Ok(self.add(&format!("{hint}-object"), body))
    }
}

impl Backend for Embedded {
    fn models(&self) -> Vec<ModelInfo> {
        self.configs
            .iter()
            .map(|c| ModelInfo {
                name: c.model.clone(),
                backend: "embedded".into(),
                context: c.context,
            })
            .collect()
    }

    fn chat(
        &self,
        req: &ChatRequest,
        on_piece: &mut dyn FnMut(&str),
        cancel: &CancellationToken,
    ) -> Result<Completion, LlmError> {
        req.validate()?;
        let config = self.config(&req.model)?.clone();
        let loaded = self.get(&req.model)?;
        let model = &loaded.model;
        let engine = |message: String| LlmError::Engine {
            model: req.model.clone(),
            message,
        };
        let messages = req
            .messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LlmError::InvalidRequest {
                field: "messages".into(),
                message: e.to_string(),
            })?;
        let prompt = model
            .apply_chat_template(&loaded.template, &messages, true)
            .map_err(|e| engine(format!("chat template: {e}")))?;
        let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
        let prompt_tokens = tokens.len() as u32;
        // Room for at least one token.
        if prompt_tokens + 1 > config.context {
            return Err(LlmError::ContextOverflow {
                model: req.model.clone(),
                prompt_tokens,
                context: config.context,
            });
        }
        let room = config.context - prompt_tokens;
        let max_tokens = req.max_tokens.map_or(room, |n| n.min(room));
        let sampler = build_sampler(model, req).map_err(|e| match e {
            LlmError::Engine { message, .. } => engine(message),
            e => e,
        })?;
        let (events_tx, events) = mpsc::channel();
        let job = Job::Chat(Box::new(ChatJob {
            tokens,
            sampler,
            max_tokens,
            stop: req.stop.clone(),
            cancel: cancel.clone(),
            events: events_tx,
        }));
        // Bounded queue: while even the waiting room is taken, wait for it
        // (the node's plugin concurrency is the sum over its models, so one
        // model can be sent more than its slots and queue hold); a cancel
        // (the task's timeout too) ends the wait.
        let mut job = job;
        loop {
            match loaded.jobs.try_send(job) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(j)) => {
                    if cancel.is_cancelled() {
                        return Err(LlmError::Busy {
                            model: req.model.clone(),
                            slots: config.slots,
                        });
                    }
                    job = j;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(engine("the engine thread has ended".into()))
                }
            }
        }
        let mut delivered = String::new();
        loop {
            match events.recv() {
                Ok(Event::Piece(p)) => {
                    // A piece decoded while the caller was cancelling is
                    // not passed on: at most the token in flight is lost.
                    if !cancel.is_cancelled() {
                        on_piece(&p);
                        delivered.push_str(&p);
                    }
                }
                Ok(Event::Done(r)) => {
                    let mut c = r?;
                    if c.finish_reason == FinishReason::Cancelled || cancel.is_cancelled() {
                        c.finish_reason = FinishReason::Cancelled;
                        c.text = delivered;
                    }
                    return Ok(c);
                }
                Err(_) => return Err(engine("the engine thread ended mid-request".into())),
            }
        }
    }

    fn embed(&self, req: &EmbedRequest) -> Result<Vec<Vec<f32>>, LlmError> {
        let config = self.config(&req.model)?.clone();
        if !config.embeddings {
            return Err(LlmError::InvalidRequest {
                field: "model".into(),
                message: format!(
                    "`{}` is not configured for embeddings (`embeddings = true`)",
                    req.model
                ),
            });
        }
        if req.input.is_empty() {
            return Err(LlmError::InvalidRequest {
                field: "input".into(),
                message: "must hold at least one string".into(),
            });
        }
        let loaded = self.get(&req.model)?;
        let mut inputs = Vec::with_capacity(req.input.len());
        for (i, text) in req.input.iter().enumerate() {
            let t = loaded.model.vocab().tokenize(text.as_bytes(), true, false);
            if t.is_empty() {
                return Err(LlmError::InvalidRequest {
                    field: format!("input[{i}]"),
                    message: "is empty".into(),
                });
            }
            let limit = config.context.min(EMBED_CONTEXT_MAX);
            if t.len() as u32 > limit {
                return Err(LlmError::ContextOverflow {
                    model: req.model.clone(),
                    prompt_tokens: t.len() as u32,
                    context: limit,
                });
            }
            inputs.push(t);
        }
        let (reply, rx) = mpsc::channel();
        loaded
            .jobs
            .send(Job::Embed { inputs, reply })
            .map_err(|_| LlmError::Engine {
                model: req.model.clone(),
                message: "the engine thread has ended".into(),
            })?;
        rx.recv().map_err(|_| LlmError::Engine {
            model: req.model.clone(),
            message: "the engine thread ended mid-request".into(),
        })?
    }
}

/// The sampler chain of a request: grammar first (so the others only see
/// allowed tokens), then greedy at temperature 0, else top-k, top-p,
/// temperature and a seeded draw.
fn build_sampler(model: &LlamaModel, req: &ChatRequest) -> Result<LlamaSampler, LlmError> {
    let mut chain = Vec::new();
    let grammar = match &req.response_format {
        Some(f) => grammar_for(f)?,
        None => None,
    };
    if let Some(g) = grammar {
        let s = LlamaSampler::grammar(model, &g, "root").map_err(|e| LlmError::Engine {
            model: req.model.clone(),
            message: format!("grammar: {e}"),
        })?;
        chain.push(s);
    }
    let temperature = req.temperature.unwrap_or(1.0);
    // Below this the logits divided by the temperature overflow to
    // infinity: the softmax is NaN and llama.cpp's `dist` picks a token
    // the grammar refused, and the grammar aborts the process (found by
    // review). That close to 0 is greedy anyway.
    if temperature < MIN_TEMPERATURE {
        chain.push(LlamaSampler::greedy());
    } else {
        if let Some(k) = req.top_k.filter(|k| *k > 0) {
            chain.push(LlamaSampler::top_k(k));
        }
        if let Some(p) = req.top_p.filter(|p| *p < 1.0) {
            chain.push(LlamaSampler::top_p(p, 1));
        }
        chain.push(LlamaSampler::temp(temperature));
        // llama.cpp's LLAMA_DEFAULT_SEED: a random seed.
        chain.push(LlamaSampler::dist(req.seed.unwrap_or(u32::MAX)));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_are_never_sent() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        let mut t = TextState::default();
        let mut sent = String::new();
        for piece in ["Hel", "lo E", "N", "Dworld"] {
            let (p, stop) = t.push(piece.as_bytes(), &stops);
            sent.push_str(&p);
            if stop {
                break;
            }
        }
        assert_eq!(sent, "Hello ");
        assert_eq!(t.out, "Hello ");
        // A held-back prefix that turns out not to be a stop is sent later.
        let mut t = TextState::default();
        let (p, _) = t.push(b"a E", &stops);
        assert_eq!(p, "a ");
        let (p, _) = t.push(b"x", &stops);
        assert_eq!(p, "Ex");
    }

    #[test]
    fn utf8_split_across_tokens_is_buffered() {
        let mut t = TextState::default();
        let e = "é".as_bytes();
        let (p, _) = t.push(&e[..1], &[]);
        assert_eq!(p, "");
        let (p, _) = t.push(&e[1..], &[]);
        assert_eq!(p, "é");
        let (p, _) = t.push(&[0xff, b'a'], &[]);
        assert_eq!(p, "\u{FFFD}a");
    }

    #[test]
    fn schemas_become_grammars_and_unknown_keywords_are_refused() {
        let f = ResponseFormat::JsonSchema {
            json_schema: super::super::JsonSchemaSpec {
                name: None,
                schema: serde_json::json!({"type": "object", "properties": {
                    "name": {"type": "string"}, "age": {"type": "integer"},
                    "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
                    "required": ["name", "age"]}),
                strict: None,
            },
        };
        let g = grammar_for(&f).unwrap().unwrap();
        assert!(g.starts_with("root ::= s-root-object"), "{g}");
        assert!(g.contains("\"\\\"age\\\"\""), "{g}");
        let bad = ResponseFormat::JsonSchema {
            json_schema: super::super::JsonSchemaSpec {
                name: None,
                schema: serde_json::json!({"type": "string", "pattern": "a+"}),
                strict: None,
            },
        };
        let e = grammar_for(&bad).unwrap_err().to_string();
        assert!(
            e.contains("pattern") && e.contains("response_format"),
            "{e}"
        );
        let short = |schema| ResponseFormat::JsonSchema {
            json_schema: super::super::JsonSchemaSpec {
                name: None,
                schema,
                strict: None,
            },
        };
        let g = grammar_for(&short(
            serde_json::json!({"type": "string", "maxLength": 12}),
        ))
        .unwrap()
        .unwrap();
        assert!(g.contains("char{0,12}"), "{g}");
        let e = grammar_for(&short(
            serde_json::json!({"type": "string", "maxLength": 99999}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("maxLength"), "{e}");
        let many: serde_json::Map<String, serde_json::Value> = (0..10)
            .map(|i| {
                (
                    format!("f{i}"),
                    serde_json::json!({"type": "string", "maxLength": 4000}),
                )
            })
            .collect();
        let e = grammar_for(&short(
            serde_json::json!({"type": "object", "properties": many}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("add up to more than"), "{e}");
        let g = grammar_for(&short(
            serde_json::json!({"type": "array", "items": {"type": "integer"}, "minItems": 2}),
        ))
        .unwrap()
        .unwrap();
        assert!(
            g.contains("\"[\" ws integer ws \",\" ws integer ( ws \",\" ws integer )* ws \"]\""),
            "{g}"
        );
    }
}
