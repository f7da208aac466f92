//! The `openai` backend: a pool of OpenAI-compatible upstreams (vLLM,
//! llama-server, llama-cpp-python, Ollama...) with a per-upstream
//! concurrency limit, cooldown after failures, a background health check
//! and failover.
//!
//! Routing: a request goes to the first upstream **in config order** that
//! is not cooling down, not marked dead by the health check, not already
//! tried by this request, and has a free permit (`max_concurrent`). So the
//! first upstream is the preferred one and the next ones take its overflow
//! and its failures. When every such upstream is full the request waits,
//! up to `queue_timeout_ms`, for any of them to free a permit, then fails
//! with [`LlmError::Busy`].
//!
//! Failover: a connect error, a timeout, an HTTP 5xx, 408 or 429, or a
//! stream that breaks **before any piece was passed to `on_piece`** cools
//! the upstream down and the request goes on to the next one. Once a piece
//! was passed on, a broken stream is returned as [`LlmError::Upstream`]: a
//! retry elsewhere would repeat text the client already has. Any other 4xx
//! is the request's or the config's fault and is returned at once (400 and
//! 422 as [`LlmError::InvalidRequest`], others as [`LlmError::Upstream`]),
//! without cooling the upstream down. When no upstream is left the error
//! is [`LlmError::NoUpstream`] with each upstream's last error.
//!
//! Cooldown: `cooldown_ms` after a failure, doubled for each consecutive
//! failure, at most `max_cooldown_ms`; a success resets it. The health
//! check (every `health_interval_ms`, 0 = off) sends `GET {base}/models`
//! to each upstream that has no request in flight (one in flight shows it
//! is alive, and a single-slot server may not answer `/models` while it
//! decodes): a 2xx ends its cooldown and clears a dead mark, anything else
//! marks it dead, and a dead upstream gets no request until a check
//! succeeds.
//!
//! Streaming: `POST {base}/chat/completions` with `stream: true` and
//! `stream_options.include_usage`; server-sent events are read line by
//! line, each `choices[0].delta.content` is passed on as it arrives. An
//! upstream that sends no `usage` (llama-cpp-python 0.2.62 does not) gives
//! 0 prompt and completion tokens. A line is capped at `max_line_bytes` and
//! the whole text at `max_text_bytes`, so a hostile upstream cannot grow
//! the agent's memory without bound. Cancellation is checked between
//! received lines; on cancel the connection is dropped (which is how an
//! upstream learns to stop decoding) and the text so far is returned with
//! [`FinishReason::Cancelled`]. An upstream that sends nothing is noticed
//! after `read_timeout_ms` at the latest, so a cancel waits that long at
//! worst.

use super::{
    Backend, ChatRequest, Completion, EmbedRequest, FinishReason, LlmError, ModelInfo,
    ResponseFormat,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Default cap on one line of the event stream (1 MiB).
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;
/// Default cap on the text of one completion (4 MiB).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 4 << 20;
/// Default cap on a whole non-streamed response body, as embeddings (64 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;
/// How much of an error body is read for its message.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// How often a request waiting for a permit looks at its cancel token.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// The config of an `openai` backend (a table of the `llm` plugin's config).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The model names this pool serves: `"name"` (the same name upstream)
    /// or `{ name = "local", upstream = "upstream-name" }`.
    pub models: Vec<ModelName>,
    /// The upstreams, the preferred first.
    pub upstreams: Vec<UpstreamConfig>,
    /// Cooldown after one failure (doubled per consecutive failure).
    #[serde(default = "default_cooldown_ms")]
    pub cooldown_ms: u64,
    /// Longest cooldown.
    #[serde(default = "default_max_cooldown_ms")]
    pub max_cooldown_ms: u64,
    /// Period of the health check; 0 turns it off.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Longest wait for a permit when every usable upstream is full.
    #[serde(default = "default_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// Cap on one line of an event stream.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// Cap on the text of one completion.
    #[serde(default = "default_max_text_bytes")]
    pub max_text_bytes: usize,
    /// Cap on a non-streamed response body (embeddings).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How a JSON schema is asked for: OpenAI's `response_format`
    /// `{"type": "json_schema", "json_schema": {"schema": ...}}` (OpenAI,
    /// vLLM, llama-server), or `json_object` with the schema beside it
    /// (`{"type": "json_object", "schema": ...}`: llama-cpp-python before
    /// 0.2.7x, Anyscale, llama-server too).
    #[serde(default)]
    pub schema_format: SchemaFormat,
}

/// The upstream's spelling of a schema-constrained answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaFormat {
    #[default]
    JsonSchema,
    JsonObject,
}

/// A model name of [`PoolConfig::models`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ModelName {
    /// Served under the same name upstream.
    Same(String),
    /// A local name for an upstream model name.
    Mapped(MappedModel),
}

/// A local model name and the upstream's name for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappedModel {
    pub name: String,
    pub upstream: String,
}

/// One upstream server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, with or without the trailing `/v1` (added when missing).
    pub url: String,
    /// Bearer token sent as `Authorization`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The name of an environment variable that holds the token (read once,
    /// when the pool is built).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Most requests in flight to this upstream at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Connect, and then the response headers, each within this.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest silence between two reads of a response (also bounds the
    /// wait for the headers when it is the smaller).
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
}

fn default_cooldown_ms() -> u64 {
    5_000
}
fn default_max_cooldown_ms() -> u64 {
    120_000
}
fn default_health_interval_ms() -> u64 {
    10_000
}
fn default_queue_timeout_ms() -> u64 {
    30_000
}
fn default_max_line_bytes() -> usize {
    DEFAULT_MAX_LINE_BYTES
}
fn default_max_text_bytes() -> usize {
    DEFAULT_MAX_TEXT_BYTES
}
fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_max_concurrent() -> u32 {
    4
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_read_timeout_ms() -> u64 {
    60_000
}

/// What the pool knows of one upstream, for the agent's status and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStatus {
    /// The normalised base URL (ending in `/v1`).
    pub url: String,
    pub max_concurrent: u32,
    pub in_flight: u32,
    /// Requests it completed (a cancelled one included).
    pub served: u64,
    /// Consecutive failures.
    pub failures: u32,
    /// Whether it is cooling down now.
    pub cooling_down: bool,
    /// The length of its current (or last) cooldown.
    pub cooldown_ms: u64,
    /// The last health check failed.
    pub dead: bool,
    pub last_error: Option<String>,
}

/// The pool's state, see [`UpstreamPool::status`].
#[derive(Debug, Clone, PartialEq)]
pub struct PoolStatus {
    /// Requests waiting for a permit.
    pub waiting: u32,
    pub upstreams: Vec<UpstreamStatus>,
}

/// A pool of OpenAI-compatible upstreams: the `openai` backend.
pub struct UpstreamPool {
    inner: Arc<Inner>,
    /// Dropped with the pool, which ends the health check thread.
    _stop_health: Option<mpsc::Sender<()>>,
}

struct Inner {
    /// (local name, upstream name).
    models: Vec<(String, String)>,
    ups: Vec<Upstream>,
    state: Mutex<State>,
    changed: Condvar,
    cooldown: Duration,
    max_cooldown: Duration,
    queue_timeout: Duration,
    max_line: usize,
    max_text: usize,
    max_body: usize,
    schema_format: SchemaFormat,
}

struct Upstream {
    base: String,
    key: Option<String>,
    max_concurrent: u32,
    timeout: Duration,
    read_timeout: Duration,
    agent: ureq::Agent,
}

#[derive(Default)]
struct State {
    waiting: u32,
    ups: Vec<UpState>,
}

#[derive(Default, Clone)]
struct UpState {
    in_flight: u32,
    served: u64,
    failures: u32,
    cooldown_until: Option<Instant>,
    cooldown: Duration,
    dead: bool,
    last_error: Option<String>,
}

/// How one attempt on one upstream failed.
enum Fail {
    /// Nothing reached the caller: cool this upstream down, try the next.
    Over(String),
    /// Return this error; cool the upstream down when the flag is set.
    Final(LlmError, bool),
}

fn config_err(key: impl Into<String>, message: impl Into<String>) -> LlmError {
    LlmError::Config {
        key: key.into(),
        message: message.into(),
    }
}

/// `url` with trailing slashes off and `/v1` added when it does not end so.
fn normalise_url(url: &str) -> Result<String, String> {
    let uri: ureq::http::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("`{url}`: only http:// and https:// URLs"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "`{url}`: credentials in the URL are not accepted; use api_key or api_key_env"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("`{url}`: a base URL takes no query"));
    }
    let base = url.trim_end_matches('/');
    Ok(if base.ends_with("/v1") {
        base.to_string()
    } else {
        format!("{base}/v1")
    })
}

impl UpstreamPool {
    /// Builds the pool from the `openai` table of the agent's config; an
    /// error names the key (`upstreams[1].timeout_ms`).
    pub fn from_toml(table: &toml::Table) -> Result<UpstreamPool, LlmError> {
        let text = toml::to_string(table).map_err(|e| config_err("", e.to_string()))?;
        let de = toml::Deserializer::parse(&text).map_err(|e| config_err("", e.to_string()))?;
        let config: PoolConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| config_err(e.path().to_string(), e.inner().message().to_string()))?;
        UpstreamPool::new(config)
    }

    /// Builds the pool and starts its health check (when the interval is
    /// not 0). API keys named by `api_key_env` are read now.
    pub fn new(config: PoolConfig) -> Result<UpstreamPool, LlmError> {
        if config.models.is_empty() {
            return Err(config_err("models", "names no model"));
        }
        let mut models: Vec<(String, String)> = Vec::new();
        for (i, m) in config.models.iter().enumerate() {
            let (name, upstream) = match m {
                ModelName::Same(n) => (n.clone(), n.clone()),
                ModelName::Mapped(m) => (m.name.clone(), m.upstream.clone()),
            };
            if name.is_empty() || upstream.is_empty() {
                return Err(config_err(format!("models[{i}]"), "empty model name"));
            }
            if models.iter().any(|(n, _)| *n == name) {
                return Err(config_err(
                    format!("models[{i}]"),
                    format!("`{name}` is named twice"),
                ));
            }
            models.push((name, upstream));
        }
        if config.upstreams.is_empty() {
            return Err(config_err("upstreams", "names no upstream"));
        }
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(config_err(key, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("queue_timeout_ms", config.queue_timeout_ms)?;
        positive("max_line_bytes", config.max_line_bytes as u64)?;
        positive("max_text_bytes", config.max_text_bytes as u64)?;
        positive("max_body_bytes", config.max_body_bytes as u64)?;
        if config.max_cooldown_ms < config.cooldown_ms {
            return Err(config_err(
                "max_cooldown_ms",
                format!(
                    "{} is less than cooldown_ms ({})",
                    config.max_cooldown_ms, config.cooldown_ms
                ),
            ));
        }
        // Always rustls with ring and the platform's roots: an agent left
        // to ureq's TLS defaults (no provider) panics on `https://`.
        let (tls, no_roots) = crate::plugins::http::platform_tls_config();
        let mut ups = Vec::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstreams[{i}].{k}");
            let base = normalise_url(&u.url).map_err(|e| config_err(key("url"), e))?;
            if base.starts_with("https://") {
                if let Some(why) = &no_roots {
                    return Err(config_err(key("url"), why.clone()));
                }
            }
            let api_key = match (&u.api_key, &u.api_key_env) {
                (Some(_), Some(_)) => {
                    return Err(config_err(
                        key("api_key_env"),
                        "give api_key or api_key_env, not both",
                    ))
                }
                (Some(k), None) => Some(k.clone()),
                (None, Some(var)) => match std::env::var(var) {
                    Ok(k) if !k.is_empty() => Some(k),
                    Ok(_) => {
                        return Err(config_err(
                            key("api_key_env"),
                            format!("environment variable `{var}` is empty"),
                        ))
                    }
                    Err(_) => {
                        return Err(config_err(
                            key("api_key_env"),
                            format!("environment variable `{var}` is not set"),
                        ))
                    }
                },
                (None, None) => None,
            };
            positive(&key("max_concurrent"), u.max_concurrent as u64)?;
            positive(&key("timeout_ms"), u.timeout_ms)?;
            positive(&key("read_timeout_ms"), u.read_timeout_ms)?;
            let timeout = Duration::from_millis(u.timeout_ms);
            let read_timeout = Duration::from_millis(u.read_timeout_ms);
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_connect(Some(timeout))
                .timeout_recv_response(Some(timeout))
                // Restarts at each read: the silence allowed between chunks.
                .timeout_per_read(Some(read_timeout))
                .tls_config(tls.clone())
                .build()
                .into();
            ups.push(Upstream {
                base,
                key: api_key,
                max_concurrent: u.max_concurrent,
                timeout,
                read_timeout,
                agent,
            });
        }
        let n = ups.len();
        let inner = Arc::new(Inner {
            models,
            ups,
            state: Mutex::new(State {
                waiting: 0,
                ups: vec![UpState::default(); n],
            }),
            changed: Condvar::new(),
            cooldown: Duration::from_millis(config.cooldown_ms),
            max_cooldown: Duration::from_millis(config.max_cooldown_ms),
            queue_timeout: Duration::from_millis(config.queue_timeout_ms),
            max_line: config.max_line_bytes,
            max_text: config.max_text_bytes,
            max_body: config.max_body_bytes,
            schema_format: config.schema_format,
        });
        let stop = if config.health_interval_ms > 0 {
            let (tx, rx) = mpsc::channel::<()>();
            let weak = Arc::downgrade(&inner);
            let every = Duration::from_millis(config.health_interval_ms);
            std::thread::Builder::new()
                .name("llm-upstream-health".into())
                .spawn(move || health_loop(weak, rx, every))
                .map_err(|e| config_err("health_interval_ms", format!("no thread: {e}")))?;
            Some(tx)
        } else {
            None
        };
        Ok(UpstreamPool {
            inner,
            _stop_health: stop,
        })
    }

    /// Each upstream's state, in config order.
    pub fn status(&self) -> PoolStatus {
        let st = self.inner.lock();
        let now = Instant::now();
        PoolStatus {
            waiting: st.waiting,
            upstreams: self
                .inner
                .ups
                .iter()
                .zip(&st.ups)
                .map(|(u, s)| UpstreamStatus {
                    url: u.base.clone(),
                    max_concurrent: u.max_concurrent,
                    in_flight: s.in_flight,
                    served: s.served,
                    failures: s.failures,
                    cooling_down: s.cooldown_until.is_some_and(|t| t > now),
                    cooldown_ms: s.cooldown.as_millis() as u64,
                    dead: s.dead,
                    last_error: s.last_error.clone(),
                })
                .collect(),
        }
    }

    /// Runs health checks on every upstream now (what the background
    /// thread does each interval).
    pub fn check_health(&self) {
        self.inner.check_all();
    }

    fn upstream_model(&self, name: &str) -> Result<&str, LlmError> {
        self.inner
            .models
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| u.as_str())
            .ok_or_else(|| LlmError::UnknownModel {
                name: name.to_string(),
                known: self
                    .inner
                    .models
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Tries `attempt` on upstreams in routing order until one succeeds,
    /// fails finally, or none is left.
    fn run<T>(
        &self,
        model: &str,
        cancel: Option<&CancellationToken>,
        mut attempt: impl FnMut(&Upstream) -> Result<T, Fail>,
    ) -> Result<Option<T>, LlmError> {
        let inner = &*self.inner;
        let mut tried = vec![false; inner.ups.len()];
        loop {
            let Some(lease) = inner.acquire(model, &tried, cancel)? else {
                return Ok(None);
            };
            let idx = lease.idx;
            match attempt(&inner.ups[idx]) {
                Ok(v) => {
                    inner.succeeded(idx);
                    return Ok(Some(v));
                }
                Err(Fail::Over(message)) => {
                    log::warn!(
                        "llm: upstream {}: {message}; trying the next",
                        inner.ups[idx].base
                    );
                    inner.failed(idx, message);
                    tried[idx] = true;
                }
                Err(Fail::Final(e, cool)) => {
                    if cool {
                        inner.failed(idx, e.to_string());
                    }
                    return Err(e);
                }
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit on the first usable upstream with one free, waiting up to
    /// the queue timeout; `None` when the request was cancelled meanwhile.
    fn acquire(
        &self,
        model: &str,
        tried: &[bool],
        cancel: Option<&CancellationToken>,
    ) -> Result<Option<Lease<'_>>, LlmError> {
        let deadline = Instant::now() + self.queue_timeout;
        let mut st = self.lock();
        let mut waiting = false;
        let result = loop {
            if cancel.is_some_and(CancellationToken::is_cancelled) {
                break Ok(None);
            }
            let now = Instant::now();
            let usable: Vec<usize> = (0..self.ups.len())
                .filter(|&i| {
                    let s = &st.ups[i];
                    !tried[i] && !s.dead && s.cooldown_until.is_none_or(|t| t <= now)
                })
                .collect();
            if usable.is_empty() {
                break Err(self.no_upstream(model, &st, tried));
            }
            if let Some(&i) = usable
                .iter()
                .find(|&&i| st.ups[i].in_flight < self.ups[i].max_concurrent)
            {
                st.ups[i].in_flight += 1;
                break Ok(Some(Lease {
                    inner: self,
                    idx: i,
                }));
            }
            if now >= deadline {
                break Err(LlmError::Busy {
                    model: model.to_string(),
                    slots: usable.iter().map(|&i| self.ups[i].max_concurrent).sum(),
                });
            }
            if !waiting {
                waiting = true;
                st.waiting += 1;
            }
            // Woken by a freed permit or a health change; the slice bounds
            // how late a cancel or the end of a cooldown is seen.
            let wait = (deadline - now).min(WAIT_SLICE);
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        if waiting {
            st.waiting -= 1;
        }
        result
    }

    fn no_upstream(&self, model: &str, st: &State, tried: &[bool]) -> LlmError {
        let now = Instant::now();
        let detail = self
            .ups
            .iter()
            .zip(&st.ups)
            .enumerate()
            .map(|(i, (u, s))| {
                let last = s.last_error.as_deref().unwrap_or("no error recorded");
                let why = if s.dead {
                    format!("dead (health check): {last}")
                } else if let Some(t) = s.cooldown_until.filter(|&t| t > now) {
                    format!(
                        "cooling down for {} ms more after: {last}",
                        (t - now).as_millis()
                    )
                } else if tried[i] {
                    last.to_string()
                } else {
                    format!("not tried: {last}")
                };
                format!("{}: {why}", u.base)
            })
            .collect::<Vec<_>>()
            .join("; ");
        LlmError::NoUpstream {
            model: model.to_string(),
            detail,
        }
    }

    fn succeeded(&self, idx: usize) {
        let mut st = self.lock();
        let s = &mut st.ups[idx];
        s.served += 1;
        s.failures = 0;
        s.cooldown_until = None;
        drop(st);
        self.changed.notify_all();
    }

    fn failed(&self, idx: usize, message: String) {
        let mut st = self.lock();
        let s = &mut st.ups[idx];
        s.failures = s.failures.saturating_add(1);
        let doublings = (s.failures - 1).min(31);
        let cooldown = self
            .cooldown
            .saturating_mul(1u32 << doublings)
            .min(self.max_cooldown);
        s.cooldown = cooldown;
        s.cooldown_until = Some(Instant::now() + cooldown);
        s.last_error = Some(message);
        drop(st);
        self.changed.notify_all();
    }

    fn check_all(&self) {
        for idx in 0..self.ups.len() {
            if self.lock().ups[idx].in_flight > 0 {
                continue;
            }
            let up = &self.ups[idx];
            let mut get = up.agent.get(format!("{}/models", up.base));
            if up.key.is_some() {
                get = get.header("authorization", up.auth());
            }
            let outcome = get
                .call()
                .map_err(|e| transport_error(up, &e))
                .and_then(|mut r| {
                    let status = r.status().as_u16();
                    let mut sink = Vec::new();
                    let _ = r
                        .body_mut()
                        .as_reader()
                        .take(MAX_ERROR_BODY)
                        .read_to_end(&mut sink);
                    if (200..300).contains(&status) {
                        Ok(())
                    } else {
                        Err(format!("HTTP {status}: {}", error_message(&sink)))
                    }
                });
            let mut st = self.lock();
            let s = &mut st.ups[idx];
            match outcome {
                Ok(()) => {
                    if s.dead || s.cooldown_until.is_some() {
                        log::info!("llm: upstream {} is healthy again", up.base);
                    }
                    s.dead = false;
                    s.failures = 0;
                    s.cooldown_until = None;
                }
                Err(e) => {
                    if !s.dead {
                        log::warn!("llm: upstream {}: health check failed: {e}", up.base);
                    }
                    s.dead = true;
                    s.last_error = Some(format!("GET /models: {e}"));
                }
            }
            drop(st);
            self.changed.notify_all();
        }
    }
}

fn health_loop(inner: Weak<Inner>, stop: mpsc::Receiver<()>, every: Duration) {
    loop {
        match stop.recv_timeout(every) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The pool was dropped.
            _ => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.check_all();
    }
}

/// A permit on one upstream, given back when dropped.
struct Lease<'a> {
    inner: &'a Inner,
    idx: usize,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.ups[self.idx].in_flight -= 1;
        drop(st);
        self.inner.changed.notify_all();
    }
}

impl Upstream {
    fn auth(&self) -> String {
        self.key
            .as_ref()
            .map_or_else(String::new, |k| format!("Bearer {k}"))
    }

    fn post(&self, path: &str, body: &Value) -> Result<ureq::http::Response<ureq::Body>, Fail> {
        let mut r = self
            .agent
            .post(format!("{}{path}", self.base))
            .content_type("application/json")
            .header("accept", "text/event-stream, application/json");
        if self.key.is_some() {
            r = r.header("authorization", self.auth());
        }
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        r.send(&bytes[..])
            .map_err(|e| Fail::Over(transport_error(self, &e)))
    }

    /// Failover for 5xx, 408 and 429; other non-2xx returned as they are.
    fn check_status(
        &self,
        resp: &mut ureq::http::Response<ureq::Body>,
        path: &str,
    ) -> Result<(), Fail> {
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let mut body = Vec::new();
        let _ = resp
            .body_mut()
            .as_reader()
            .take(MAX_ERROR_BODY)
            .read_to_end(&mut body);
        let message = error_message(&body);
        let what = format!("POST {path}: HTTP {status}: {message}");
        Err(match status {
            408 | 429 | 500..=599 => Fail::Over(what),
            400 | 422 => Fail::Final(
                LlmError::InvalidRequest {
                    field: error_param(&body).unwrap_or_else(|| "request".into()),
                    message: format!("upstream {}: {what}", self.base),
                },
                false,
            ),
            401 | 403 => Fail::Final(
                LlmError::Upstream {
                    url: self.base.clone(),
                    message: format!(
                        "{what} (the upstream refused the API key: check api_key / api_key_env)"
                    ),
                },
                false,
            ),
            _ => Fail::Final(
                LlmError::Upstream {
                    url: self.base.clone(),
                    message: what,
                },
                false,
            ),
        })
    }
}

/// A transport error in words, timeouts naming the setting.
fn transport_error(up: &Upstream, e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(ureq::Timeout::PerRead) => format!(
            "no data within read_timeout_ms ({} ms)",
            up.read_timeout.as_millis()
        ),
        ureq::Error::Timeout(t) => format!(
            "timed out ({t}) within timeout_ms ({} ms)",
            up.timeout.as_millis()
        ),
        other => format!("cannot reach it: {other}"),
    }
}

/// OpenAI's `error.message` (or FastAPI's `detail`), else the text cut short.
fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(m) = v
            .pointer("/error/message")
            .or_else(|| v.get("error").filter(|e| e.is_string()))
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("message"))
        {
            return match m {
                Value::String(s) => cut(s),
                other => cut(&other.to_string()),
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        cut(text)
    }
}

fn error_param(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/error/param")?.as_str().map(str::to_string)
}

fn cut(s: &str) -> String {
    const MAX: usize = 500;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Reads one line (without its `\n`) into `line`, at most `max` bytes;
/// `Ok(false)` at the end of the stream.
fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>, max: usize) -> std::io::Result<bool> {
    line.clear();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(!line.is_empty());
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Err(std::io::Error::other(format!(
                "a line of the stream is longer than max_line_bytes ({max})"
            )));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(true);
        }
    }
}

fn read_error(up: &Upstream, e: &std::io::Error) -> String {
    if let Some(u) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
        return transport_error(up, u);
    }
    if e.kind() == std::io::ErrorKind::TimedOut {
        return format!(
            "no data within read_timeout_ms ({} ms)",
            up.read_timeout.as_millis()
        );
    }
    format!("reading the stream: {e}")
}

fn finish_reason(s: &str) -> FinishReason {
    // `tool_calls`, `content_filter` and others end the text as a stop.
    if s == "length" {
        FinishReason::Length
    } else {
        FinishReason::Stop
    }
}

fn tokens(usage: &Value, key: &str) -> u32 {
    usage
        .get(key)
        .and_then(Value::as_u64)
        .map_or(0, |n| n.min(u32::MAX as u64) as u32)
}

impl UpstreamPool {
    fn chat_body(&self, req: &ChatRequest, upstream_model: &str) -> Value {
        let mut b = json!({
            "model": upstream_model,
            "messages": req.messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let m = b.as_object_mut().expect("an object");
        if let Some(v) = req.max_tokens {
            m.insert("max_tokens".into(), json!(v));
        }
        if let Some(v) = req.temperature {
            m.insert("temperature".into(), json!(v));
        }
        if let Some(v) = req.top_p {
            m.insert("top_p".into(), json!(v));
        }
        if let Some(v) = req.top_k {
            m.insert("top_k".into(), json!(v));
        }
        if let Some(v) = req.seed {
            m.insert("seed".into(), json!(v));
        }
        if !req.stop.is_empty() {
            m.insert("stop".into(), json!(req.stop));
        }
        if let Some(f) = &req.response_format {
            let f = match (f, self.inner.schema_format) {
                (ResponseFormat::JsonSchema { json_schema }, SchemaFormat::JsonObject) => {
                    json!({"type": "json_object", "schema": json_schema.schema})
                }
                (f, _) => json!(f),
            };
            m.insert("response_format".into(), f);
        }
        b
    }

    /// One streamed chat attempt on `up`.
    fn chat_once(
        &self,
        up: &Upstream,
        body: &Value,
        model: &str,
        on_piece: &mut dyn FnMut(&str),
        cancel: &CancellationToken,
    ) -> Result<Completion, Fail> {
        let mut resp = up.post("/chat/completions", body)?;
        up.check_status(&mut resp, "/chat/completions")?;
        let json_body = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
        let mut out = Completion {
            model: model.to_string(),
            text: String::new(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        let mut reader = BufReader::with_capacity(16 << 10, resp.into_body().into_reader());
        // Before any piece went out the next upstream may take over; after,
        // the error is final (a retry would repeat text).
        let broken = |message: String, pieces: usize| {
            if pieces == 0 {
                Fail::Over(message)
            } else {
                Fail::Final(
                    LlmError::Upstream {
                        url: up.base.clone(),
                        message: format!(
                            "{message} after {pieces} piece(s) were passed on (not tried \
                             elsewhere: that would repeat text)"
                        ),
                    },
                    true,
                )
            }
        };
        if json_body {
            // The upstream ignored `stream: true`: one JSON completion.
            let mut bytes = Vec::new();
            (&mut reader)
                .take(self.inner.max_body as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| Fail::Over(read_error(up, &e)))?;
            if bytes.len() > self.inner.max_body {
                return Err(Fail::Over(format!(
                    "the response is longer than max_body_bytes ({})",
                    self.inner.max_body
                )));
            }
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| Fail::Over(format!("the response is not JSON: {e}")))?;
            let text = v
                .pointer("/choices/0/message/content")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Fail::Over("the response has no choices[0].message.content".into())
                })?;
            if text.len() > self.inner.max_text {
                return Err(Fail::Over(format!(
                    "the text is longer than max_text_bytes ({})",
                    self.inner.max_text
                )));
            }
            if !text.is_empty() {
                on_piece(text);
            }
            out.text = text.to_string();
            if let Some(r) = v
                .pointer("/choices/0/finish_reason")
                .and_then(Value::as_str)
            {
                out.finish_reason = finish_reason(r);
            }
            if let Some(u) = v.get("usage") {
                out.prompt_tokens = tokens(u, "prompt_tokens");
                out.completion_tokens = tokens(u, "completion_tokens");
            }
            return Ok(out);
        }
        let mut line = Vec::new();
        let mut pieces = 0usize;
        let mut finished = false;
        let mut done = false;
        loop {
            if cancel.is_cancelled() {
                // Returning drops `reader` and with it the connection.
                out.finish_reason = FinishReason::Cancelled;
                return Ok(out);
            }
            match read_line(&mut reader, &mut line, self.inner.max_line) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(broken(read_error(up, &e), pieces)),
            }
            let Some(data) = line.strip_prefix(b"data:") else {
                // Blank lines, `:` comments, `event:`, `id:`, `retry:`.
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                done = true;
                break;
            }
            let v: Value = match serde_json::from_slice(data) {
                Ok(v) => v,
                Err(e) => {
                    return Err(broken(
                        format!(
                            "bad JSON in the event stream ({e}): {}",
                            cut(&String::from_utf8_lossy(data))
                        ),
                        pieces,
                    ))
                }
            };
            if let Some(err) = v.get("error") {
                let message = err
                    .get("message")
                    .and_then(Value::as_str)
                    .map_or_else(|| cut(&err.to_string()), cut);
                return Err(broken(format!("error in the stream: {message}"), pieces));
            }
            if let Some(c) = v.pointer("/choices/0") {
                if let Some(piece) = c.pointer("/delta/content").and_then(Value::as_str) {
                    if !piece.is_empty() {
                        if out.text.len() + piece.len() > self.inner.max_text {
                            return Err(broken(
                                format!(
                                    "the text is longer than max_text_bytes ({})",
                                    self.inner.max_text
                                ),
                                pieces,
                            ));
                        }
                        on_piece(piece);
                        out.text.push_str(piece);
                        pieces += 1;
                    }
                }
                if let Some(r) = c.get("finish_reason").and_then(Value::as_str) {
                    out.finish_reason = finish_reason(r);
                    finished = true;
                }
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                out.prompt_tokens = tokens(u, "prompt_tokens");
                out.completion_tokens = tokens(u, "completion_tokens");
            }
        }
        if !done && !finished {
            return Err(broken(
                "the stream ended without [DONE] or a finish_reason".into(),
                pieces,
            ));
        }
        Ok(out)
    }

    fn embed_once(
        &self,
        up: &Upstream,
        body: &Value,
        inputs: usize,
    ) -> Result<Vec<Vec<f32>>, Fail> {
        let mut resp = up.post("/embeddings", body)?;
        up.check_status(&mut resp, "/embeddings")?;
        let mut bytes = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(self.inner.max_body as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Fail::Over(read_error(up, &e)))?;
        if bytes.len() > self.inner.max_body {
            return Err(Fail::Over(format!(
                "the response is longer than max_body_bytes ({})",
                self.inner.max_body
            )));
        }
        #[derive(Deserialize)]
        struct Item {
            #[serde(default)]
            index: Option<usize>,
            embedding: Vec<f32>,
        }
        #[derive(Deserialize)]
        struct Answer {
            data: Vec<Item>,
        }
        let a: Answer = serde_json::from_slice(&bytes)
            .map_err(|e| Fail::Over(format!("POST /embeddings: not an embeddings answer: {e}")))?;
        if a.data.len() != inputs {
            return Err(Fail::Over(format!(
                "POST /embeddings: {} vectors for {inputs} inputs",
                a.data.len()
            )));
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; inputs];
        for (i, item) in a.data.into_iter().enumerate() {
            let at = item.index.unwrap_or(i);
            match out.get_mut(at) {
                Some(slot @ None) => *slot = Some(item.embedding),
                _ => {
                    return Err(Fail::Over(format!(
                        "POST /embeddings: index {at} out of range or repeated"
                    )))
                }
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

impl Backend for UpstreamPool {
    fn models(&self) -> Vec<ModelInfo> {
        self.inner
            .models
            .iter()
            .map(|(n, _)| ModelInfo {
                name: n.clone(),
                backend: "openai".into(),
                context: 0,
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
        let upstream_model = self.upstream_model(&req.model)?;
        let body = self.chat_body(req, upstream_model);
        let done = self.run(&req.model, Some(cancel), |up| {
            self.chat_once(up, &body, &req.model, on_piece, cancel)
        })?;
        Ok(done.unwrap_or_else(|| Completion {
            model: req.model.clone(),
            text: String::new(),
            finish_reason: FinishReason::Cancelled,
            prompt_tokens: 0,
            completion_tokens: 0,
        }))
    }

    fn embed(&self, req: &EmbedRequest) -> Result<Vec<Vec<f32>>, LlmError> {
        if req.input.is_empty() {
            return Err(LlmError::InvalidRequest {
                field: "input".into(),
                message: "must hold at least one string".into(),
            });
        }
        let upstream_model = self.upstream_model(&req.model)?;
        let body = json!({"model": upstream_model, "input": req.input});
        let out = self.run(&req.model, None, |up| {
            self.embed_once(up, &body, req.input.len())
        })?;
        Ok(out.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    fn err(s: &str) -> String {
        match UpstreamPool::from_toml(&table(s)) {
            Ok(_) => panic!("accepted: {s}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn urls_are_normalised_and_bad_ones_refused() {
        assert_eq!(normalise_url("http://h:1").unwrap(), "http://h:1/v1");
        assert_eq!(normalise_url("http://h:1/v1/").unwrap(), "http://h:1/v1");
        assert_eq!(normalise_url("https://h/api/").unwrap(), "https://h/api/v1");
        assert!(normalise_url("ftp://h").is_err());
        assert!(normalise_url("http://u:p@h/").is_err());
        assert!(normalise_url("http://h/?x=1").is_err());
    }

    #[test]
    fn config_errors_name_their_key() {
        let ok = "health_interval_ms = 0\nmodels = [\"m\", {name = \"l\", upstream = \"u\"}]\n\
                  [[upstreams]]\nurl = \"http://127.0.0.1:9/\"\n";
        let pool = UpstreamPool::from_toml(&table(ok)).unwrap();
        let names: Vec<_> = pool.models().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["m", "l"]);
        assert!(pool.models().iter().all(|m| m.backend == "openai"));
        assert_eq!(pool.status().upstreams[0].url, "http://127.0.0.1:9/v1");
        let e = err(&format!("{ok}bogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");
        let e = err("models = [\"m\"]\n[[upstreams]]\nurl = \"http://h\"\ntimeout = 1\n");
        assert!(e.contains("upstreams[0]") && e.contains("timeout"), "{e}");
        let e = err("models = [\"m\"]\n[[upstreams]]\nurl = \"http://h\"\n\
             api_key_env = \"OPENCLAW_TEST_SURELY_UNSET_KEY\"\n");
        assert!(
            e.contains("upstreams[0].api_key_env") && e.contains("OPENCLAW_TEST_SURELY_UNSET_KEY"),
            "{e}"
        );
        let e = err("models = [\"m\"]\n[[upstreams]]\nurl = \"ftp://h\"\n");
        assert!(e.contains("upstreams[0].url"), "{e}");
        let e = err("models = [\"m\"]\n[[upstreams]]\nurl = \"http://h\"\nmax_concurrent = 0\n");
        assert!(e.contains("upstreams[0].max_concurrent"), "{e}");
        let e = err("models = []\n[[upstreams]]\nurl = \"http://h\"\n");
        assert!(e.contains("models"), "{e}");
        let e = err("models = [\"m\"]\nupstreams = []\n");
        assert!(e.contains("upstreams"), "{e}");
    }

    #[test]
    fn a_schema_is_asked_for_in_the_upstreams_spelling() {
        let base = "health_interval_ms = 0\nmodels = [\"m\"]\n[[upstreams]]\nurl = \"http://127.0.0.1:9/\"\n";
        let mut req = ChatRequest {
            model: "m".into(),
            messages: Vec::new(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: super::super::JsonSchemaSpec {
                    name: Some("x".into()),
                    schema: json!({"type": "object"}),
                    strict: None,
                },
            }),
        };
        let openai = UpstreamPool::from_toml(&table(base)).unwrap();
        let b = openai.chat_body(&req, "m");
        assert_eq!(b["response_format"]["type"], "json_schema");
        assert_eq!(
            b["response_format"]["json_schema"]["schema"],
            json!({"type": "object"})
        );
        let older =
            UpstreamPool::from_toml(&table(&format!("schema_format = \"json_object\"\n{base}")))
                .unwrap();
        let b = older.chat_body(&req, "m");
        assert_eq!(
            b["response_format"],
            json!({"type": "json_object", "schema": {"type": "object"}})
        );
        req.response_format = Some(ResponseFormat::JsonObject);
        assert_eq!(
            older.chat_body(&req, "m")["response_format"],
            json!({"type": "json_object"})
        );
        assert!(err(&format!("schema_format = \"yaml\"\n{base}")).contains("schema_format"));
    }

    #[test]
    fn lines_are_capped_and_split() {
        let mut r = BufReader::with_capacity(4, &b"ab\r\ncdef\nlast"[..]);
        let mut l = Vec::new();
        assert!(read_line(&mut r, &mut l, 8).unwrap());
        assert_eq!(l, b"ab");
        assert!(read_line(&mut r, &mut l, 8).unwrap());
        assert_eq!(l, b"cdef");
        assert!(read_line(&mut r, &mut l, 8).unwrap());
        assert_eq!(l, b"last");
        assert!(!read_line(&mut r, &mut l, 8).unwrap());
        let mut r = BufReader::with_capacity(4, &b"0123456789\n"[..]);
        let e = read_line(&mut r, &mut l, 8).unwrap_err().to_string();
        assert!(e.contains("max_line_bytes (8)"), "{e}");
    }
}
