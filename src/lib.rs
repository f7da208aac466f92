//! OpenClaw: private, local AI agents on edge fleets.
//!
//! # Layout
//!
//! - [`protocol`]: the versioned wire protocol shared by agent and server
//!   (postcard envelopes, topic layout) and the JSON types of the external
//!   boundary.
//! - [`config`]: layered TOML loading (embedded defaults, file, overrides)
//!   with errors that name the key and file.
//! - [`schema`]: plugin input declarations (a JSON Schema subset) and
//!   their effects, checked by the agent before a task runs and by the
//!   server before an agent run's tool call becomes a task.
//! - [`boards`]: board profiles (target, CPU, buses, pins, sensors, limits),
//!   embedded in the binary.
//! - [`mqtt`]: the task that owns an MQTT event loop (back-off, resubscribe).
//! - [`plugins`] (feature `agent`): the plugin interface and the built-ins
//!   (among them `plugins::ocr`, page OCR on the device, and
//!   `plugins::validate`, rule checks with proposed corrections).
//! - [`agent`] (feature `agent`): the edge agent, and its over-the-air
//!   updates into the release layout `flash` makes (`agent::ota`).
//! - [`server`] (feature `server`): the central node: embedded broker with
//!   TLS on its listener (`server::broker`, `server::broker::tls`), SQLite
//!   store (with each task's dispatch history, route and placement),
//!   scheduler (routes `edge`/`heavy`/`queue`), HTTP API, the
//!   OpenAI-compatible gateway (`server::openai`) over the streamed output
//!   of running tasks (`server::streams`), API tokens with roles, rate
//!   limits and the audit log, the device identities and topic rules of
//!   the embedded broker and their mosquitto form (`server::auth`,
//!   `server::auth::mosquitto`), signed releases and their rollouts
//!   (`server::releases`), the fleet's plugins as tools from each
//!   device's catalog (`server::tools`), the MCP server over them
//!   (`server::mcp`), agent runs: a language model
//!   planning through those tools, with approvals, stored step by step
//!   (`server::runs`), workflows: TOML DAGs of plugin and model steps,
//!   each a stored task, with approvals, resumed after a restart
//!   (`server::workflows`, its routes in `server::workflows::routes`),
//!   and the data-dir lock that keeps a second server
//!   off the same store.
//! - `inference` (feature `inference`): the tract ONNX engine with model
//!   manifests and a byte-bounded plan cache, post-processing, voice
//!   activity (`inference::vad`) and page OCR (`inference::ocr`: DB text
//!   boxes, CTC lines, rows and tables).
//! - [`llm`]: language models for heavy nodes: the request types the
//!   server's OpenAI gateway and the agent's `llm` plugin share, llama.cpp
//!   embedded (feature `llm`) and OpenAI-compatible upstream pools (agent).
//! - [`release`]: signed release manifests (ed25519) for over-the-air
//!   agent updates: what the admin signs, the server serves and the agent
//!   verifies before it installs (`agent::ota`).
//! - [`admin`] (feature `admin`): the HTTP client behind `openclaw-admin`
//!   (agent runs and workflow runs followed as they happen: `admin::agent`,
//!   `admin::workflow`),
//!   cross builds and flashing, model downloads, and `init` (a new
//!   installation's CA, certificates, token and configs).
//!
//! The binaries in `src/bin/` only parse arguments and call into these.

pub mod boards;
pub mod config;
pub mod protocol;
pub mod schema;

#[cfg(any(feature = "agent", feature = "server"))]
pub mod mqtt;

#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "agent")]
pub mod plugins;
#[cfg(feature = "agent")]
pub mod storage;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "admin")]
pub mod admin;

#[cfg(feature = "inference")]
pub mod inference;

#[cfg(any(feature = "agent", feature = "server"))]
pub mod llm;

#[cfg(any(feature = "agent", feature = "server"))]
pub mod release;

/// Lowercase hex of `bytes` (digests, keys, random ids).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A token cancelled on SIGINT or SIGTERM: the one shutdown signal every
/// task of a program listens to.
#[cfg(any(feature = "agent", feature = "server"))]
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                log::warn!("no SIGTERM handler ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        log::info!("shutting down");
        t.cancel();
    });
    token
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs a blocking call (an fsync) from async code without stalling the
/// other tasks of the worker thread: on a multi-threaded runtime through
/// `block_in_place`, which hands them to another worker first; elsewhere
/// (current-thread runtimes, as in tests) directly.
#[cfg(any(feature = "agent", feature = "server"))]
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
