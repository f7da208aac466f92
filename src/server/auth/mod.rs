//! Who may call the HTTP API: bearer tokens with roles (`viewer`,
//! `operator`, `admin`), a rate limit per token, and the audit log.
//!
//! [`check`] runs before every route. `/healthz` is open (probes carry no
//! token); reads need `viewer`, anything that changes or computes
//! (submit, cancel, chat, embeddings) `operator`, `/v1/tokens` and
//! `/v1/audit` `admin`. Without a valid token: 401 with
//! `WWW-Authenticate: Bearer`; with a token of too low a role: 403; over
//! the rate: 429 with `Retry-After`. The OpenAI gateway's routes answer in
//! OpenAI's error shape, so its clients raise their own auth errors.

pub mod identities;
pub mod mosquitto;
pub mod tokens;

pub use tokens::{AuditEntry, AuthError, NewToken, Role, TokenInfo, TokenStore};

use super::config::{AuthMode, HttpSection};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// Tokens remembered between store reads, known and unknown ids each (the
/// unknown ones apart: a flood of random ids, which anyone can send, must
/// not evict the tokens in use); past it that memory starts empty again.
const MAX_CACHED: usize = 4096;
/// Audit rows waiting for the writer. An action that audits reserves its
/// row's place before it is done: with the queue full, or while the writer
/// cannot write, it is refused (503) rather than done unrecorded.
const AUDIT_QUEUE: usize = 4096;
/// Longest pause between two attempts of the writer at a failed batch.
const AUDIT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// Rows the writer commits at once at most.
const AUDIT_BATCH: usize = 512;
/// Longest page of `GET /v1/audit`.
const MAX_AUDIT_PAGE: u32 = 1000;

/// A token as read from the store (None: no such id) and its secret's hash.
type Stored = Option<(TokenInfo, Vec<u8>)>;

/// Who made a request: set by [`check`] for every route behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's id; None with `http.auth = "off"`.
    pub token: Option<String>,
    pub role: Role,
}

impl Caller {
    /// An audit row of `action` on `target` by this caller.
    pub fn entry(&self, action: &str, target: &str) -> AuditEntry {
        AuditEntry {
            seq: 0,
            at_ms: tokens::now_ms(),
            token: self.token.clone(),
            role: self.token.as_ref().map(|_| self.role),
            action: action.to_string(),
            target: target.chars().take(256).collect(),
        }
    }

    /// For messages and logs.
    pub fn name(&self) -> String {
        match &self.token {
            Some(id) => format!("token {id} ({})", self.role),
            None => "an unauthenticated caller".into(),
        }
    }
}

/// What was read about tokens, and when.
#[derive(Default)]
struct Cache {
    known: HashMap<String, (Instant, Stored)>,
    unknown: HashMap<String, Instant>,
    /// Bumped by every [`Auth::forget`]: a read begun before it is not
    /// kept.
    epoch: u64,
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The API's authentication state, shared by every request.
pub struct Auth {
    required: bool,
    /// For the admin routes (create, revoke, list, audit pages).
    store: Arc<Mutex<TokenStore>>,
    /// For token lookups alone: a write waiting on a lock another process
    /// holds (5 s busy timeout) must not hold up every request's check.
    reader: Arc<Mutex<TokenStore>>,
    cache: Mutex<Cache>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// (per second, burst); None: no limit.
    rate: Option<(f64, f64)>,
    audit_tx: mpsc::Sender<Msg>,
    /// Set by [`Auth::close`]: the writer stops retrying and spills.
    closing: Arc<AtomicBool>,
    /// Why the audit writer's last attempt failed; None while it writes.
    audit_failing: Arc<Mutex<Option<String>>>,
    /// Requests refused for want of a valid token or role.
    denied: AtomicU64,
}

impl Auth {
    /// Opens `DATA_DIR/auth.db` and starts the audit writer.
    pub fn open(data_dir: &FsPath, http: &HttpSection) -> Result<Arc<Auth>, AuthError> {
        let store = TokenStore::open(data_dir)?;
        let required = http.auth == AuthMode::Required;
        if required && !store.any_usable()? {
            log::warn!(
                "http.auth is \"required\" and {} holds no usable token: every API call \
                 will get 401. Make one with `openclaw-admin token create --role admin \
                 --data-dir {}`",
                data_dir.join(tokens::AUTH_FILE).display(),
                data_dir.display()
            );
        }
        let reader = TokenStore::open(data_dir)?;
        let mut writer = TokenStore::open(data_dir)?;
        let spill = data_dir.join(UNWRITTEN_FILE);
        take_unwritten(&mut writer, &spill);
        let (audit_tx, rx) = mpsc::channel::<Msg>(AUDIT_QUEUE);
        let audit_failing = Arc::new(Mutex::new(None::<String>));
        let closing = Arc::new(AtomicBool::new(false));
        let (failing, closing_w) = (audit_failing.clone(), closing.clone());
        // Its own thread and connection: SQLite blocks, and the rows of a
        // burst go in one commit.
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || audit_writer(writer, rx, &failing, &closing_w, &spill))
            .map_err(|e| AuthError::Random(format!("cannot start the audit thread: {e}")))?;
        let rate = (http.rate_limit_per_s > 0.0).then(|| {
            (
                http.rate_limit_per_s,
                f64::from(http.rate_limit_burst.max(1)),
            )
        });
        Ok(Arc::new(Auth {
            required,
            store: Arc::new(Mutex::new(store)),
            reader: Arc::new(Mutex::new(reader)),
            cache: Mutex::new(Cache::default()),
            buckets: Mutex::new(HashMap::new()),
            rate,
            audit_tx,
            audit_failing,
            closing,
            denied: AtomicU64::new(0),
        }))
    }

    /// Waits (up to ~10 s) until every audit row sent so far is written,
    /// or spilled to [`UNWRITTEN_FILE`] if auth.db cannot take it. Called
    /// once the HTTP server has stopped.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.audit_tx.send(Msg::Close(tx)),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            // Full, or the writer already spilled and stopped.
            return;
        }
        let waited = tokio::task::spawn_blocking(move || {
            rx.recv_timeout(std::time::Duration::from_secs(10))
        })
        .await;
        if matches!(waited, Ok(Err(std::sync::mpsc::RecvTimeoutError::Timeout))) {
            log::error!("audit log: the writer did not finish within 10 s; rows may be lost");
        }
    }

    /// Requests refused so far for want of a valid token or role.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// A place in the audit log for an action `caller` is about to do;
    /// call it before doing it, and [`AuditSlot::record`] once done. Err
    /// (the message of a 503): the log cannot take it now, do nothing.
    /// Why the audit log cannot be written now, if it cannot (its writer
    /// retries; actions that audit are refused meanwhile).
    pub fn audit_failure(&self) -> Option<String> {
        self.audit_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn reserve_audit(&self, caller: &Caller) -> Result<AuditSlot, String> {
        if let Some(e) = &*self.audit_failing.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(format!(
                "the audit log cannot be written ({e}); nothing was done, retry later"
            ));
        }
        match self.audit_tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(AuditSlot {
                permit,
                caller: caller.clone(),
            }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(format!(
                "the audit log is {AUDIT_QUEUE} rows behind; nothing was done, retry later"
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err("the audit log's writer has stopped; nothing was done".into())
            }
        }
    }

    /// Runs `f` on the admin routes' store connection on a blocking thread.
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut TokenStore) -> Result<T, AuthError> + Send + 'static,
    ) -> Result<T, AuthError> {
        Self::on(self.store.clone(), f).await
    }

    async fn on<T: Send + 'static>(
        store: Arc<Mutex<TokenStore>>,
        f: impl FnOnce(&mut TokenStore) -> Result<T, AuthError> + Send + 'static,
    ) -> Result<T, AuthError> {
        tokio::task::spawn_blocking(move || {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            s.follow()?;
            f(&mut s)
        })
        .await
        .unwrap_or_else(|e| Err(AuthError::Random(format!("token store task: {e}"))))
    }

    /// The token behind `id`, from memory if read within the TTL.
    async fn lookup(&self, id: &str) -> Result<Stored, AuthError> {
        let epoch = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, v)) = cache.known.get(id) {
                if at.elapsed() < tokens::CACHE_TTL {
                    return Ok(v.clone());
                }
            }
            if let Some(at) = cache.unknown.get(id) {
                if at.elapsed() < tokens::CACHE_TTL {
                    return Ok(None);
                }
            }
            cache.epoch
        };
        let key = id.to_string();
        let v = Self::on(self.reader.clone(), move |s| s.get(&key)).await?;
        self.remember(id, v.clone(), epoch);
        Ok(v)
    }

    /// The cache's epoch before a store read ([`Auth::remember`]).
    #[cfg(test)]
    fn epoch(&self) -> u64 {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).epoch
    }

    /// Keeps what a read begun at `epoch` found, unless a revocation came
    /// since (that read may be older than it).
    fn remember(&self, id: &str, v: Stored, epoch: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.epoch != epoch {
            return;
        }
        let now = Instant::now();
        match v {
            Some(_) => {
                if cache.known.len() >= MAX_CACHED {
                    cache.known.clear();
                }
                cache.unknown.remove(id);
                cache.known.insert(id.to_string(), (now, v));
            }
            None => {
                if cache.unknown.len() >= MAX_CACHED {
                    cache.unknown.clear();
                }
                cache.known.remove(id);
                cache.unknown.insert(id.to_string(), now);
            }
        }
    }

    /// Whether what was read about `id` is in memory.
    #[cfg(test)]
    fn cached(&self, id: &str) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.known.contains_key(id) || cache.unknown.contains_key(id)
    }

    /// Forgets what was read about `id` (after a revocation here).
    fn forget(&self, id: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.known.remove(id);
        cache.unknown.remove(id);
        cache.epoch += 1;
    }

    /// Who holds this `Authorization` header value.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Denied> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values.next().ok_or(Denied::Missing)?;
        if values.next().is_some() {
            return Err(Denied::Bad(
                "several Authorization headers: send one".into(),
            ));
        }
        let token =
            tokens::parse_bearer(value.as_bytes()).map_err(|e| Denied::Bad(e.to_string()))?;
        let (id, secret) = tokens::parse_token(token).map_err(|e| Denied::Bad(e.to_string()))?;
        let found = self
            .lookup(id)
            .await
            .map_err(|e| Denied::Unavailable(e.to_string()))?;
        let Some((info, hash)) = found else {
            return Err(Denied::Bad(format!("no token with id {id}")));
        };
        if !tokens::ct_eq(&hash, &tokens::hash_secret(secret)) {
            return Err(Denied::Bad(format!("wrong secret for token {id}")));
        }
        if let Some(why) = info.unusable(tokens::now_ms()) {
            return Err(Denied::Bad(why));
        }
        Ok(Caller {
            token: Some(info.id),
            role: info.role,
        })
    }

    /// Takes one request from the caller's bucket; the seconds to wait if
    /// it is empty.
    fn take(&self, caller: &Caller) -> Result<(), u64> {
        let (Some((per_s, burst)), Some(id)) = (self.rate, &caller.token) else {
            return Ok(());
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let b = buckets.entry(id.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_s).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - b.tokens) / per_s).ceil() as u64).max(1))
        }
    }
}

/// A reserved row of the audit log ([`Auth::reserve_audit`]): recording
/// it never waits and never fails.
pub struct AuditSlot {
    permit: mpsc::OwnedPermit<Msg>,
    caller: Caller,
}

impl AuditSlot {
    /// Records `action` on `target`.
    pub fn record(self, action: &str, target: &str) {
        self.permit
            .send(Msg::Row(self.caller.entry(action, target)));
    }
}

/// What the audit writer is sent.
enum Msg {
    Row(AuditEntry),
    /// Everything sent before is written (or spilled): say so.
    Close(std::sync::mpsc::Sender<()>),
}

/// Audit rows the writer could not put in auth.db when the server stopped,
/// one JSON object a line; taken into the log at the next start.
pub const UNWRITTEN_FILE: &str = "audit-unwritten.jsonl";

/// The audit writer's loop. A batch that cannot be written is kept and
/// tried again (an accepted action is never left out); meanwhile `failing`
/// has new actions refused. Closing while it fails, it spills what it
/// holds to `spill`.
fn audit_writer(
    mut writer: TokenStore,
    mut rx: mpsc::Receiver<Msg>,
    failing: &Mutex<Option<String>>,
    closing: &AtomicBool,
    spill: &FsPath,
) {
    let mut batch = Vec::with_capacity(AUDIT_BATCH);
    let mut done = None;
    while done.is_none() {
        match rx.blocking_recv() {
            None => return,
            Some(Msg::Close(d)) => done = Some(d),
            Some(Msg::Row(e)) => batch.push(e),
        }
        while batch.len() < AUDIT_BATCH && done.is_none() {
            match rx.try_recv() {
                Ok(Msg::Row(e)) => batch.push(e),
                Ok(Msg::Close(d)) => done = Some(d),
                Err(_) => break,
            }
        }
        let mut pause = std::time::Duration::from_millis(50);
        while !batch.is_empty() {
            let Err(e) = writer.follow().and_then(|()| writer.audit(&batch)) else {
                break;
            };
            let was = failing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(e.to_string());
            if was.is_none() {
                log::error!(
                    "audit log: {} row(s) not written yet, retrying; actions that audit \
                     are refused meanwhile: {e}",
                    batch.len()
                );
            }
            if closing.load(Ordering::SeqCst) {
                rx.close();
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Msg::Row(r) => batch.push(r),
                        Msg::Close(d) => done = Some(d),
                    }
                }
                match spill_rows(spill, &batch) {
                    Ok(()) => log::error!(
                        "audit log: {} row(s) kept in {} for the next start: {e}",
                        batch.len(),
                        spill.display()
                    ),
                    Err(s) => log::error!(
                        "audit log: {} row(s) lost: {e}; and {}: {s}",
                        batch.len(),
                        spill.display()
                    ),
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(AUDIT_RETRY_MAX);
        }
        if failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some()
        {
            log::info!("audit log: written again");
        }
        batch.clear();
    }
    if let Some(d) = done {
        let _ = d.send(());
    }
}

fn spill_rows(path: &FsPath, rows: &[AuditEntry]) -> std::io::Result<()> {
    use std::io::Write;
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Takes the rows a previous run spilled into the log.
fn take_unwritten(writer: &mut TokenStore, path: &FsPath) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            log::error!("audit log: cannot read {}: {e}", path.display());
            return;
        }
    };
    let rows: Vec<AuditEntry> = text
        .lines()
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(r) => Some(r),
            Err(e) => {
                if !l.trim().is_empty() {
                    log::warn!("audit log: {}: a line skipped: {e}", path.display());
                }
                None
            }
        })
        .collect();
    match writer.audit(&rows) {
        Ok(()) => {
            log::info!(
                "audit log: {} row(s) from {} taken in",
                rows.len(),
                path.display()
            );
            if let Err(e) = std::fs::remove_file(path) {
                log::error!("audit log: cannot remove {}: {e}", path.display());
            }
        }
        Err(e) => log::error!(
            "audit log: the rows of {} not taken in (kept for the next start): {e}",
            path.display()
        ),
    }
}

/// Why a request was refused.
#[derive(Debug)]
enum Denied {
    Missing,
    Bad(String),
    Forbidden(String),
    Limited(u64),
    Unavailable(String),
}

/// The paths that answer in OpenAI's error shape.
fn is_gateway(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions" | "/v1/embeddings" | "/v1/models"
    ) || path.starts_with("/v1/models/")
}

impl Denied {
    fn response(self, gateway: bool) -> Response {
        let (status, kind, code, msg) = match &self {
            Denied::Missing => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing_token",
                "this route needs `Authorization: Bearer <token>` \
                 (openclaw-admin token create; http.auth is \"required\")"
                    .to_string(),
            ),
            Denied::Bad(m) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                m.clone(),
            ),
            Denied::Forbidden(m) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "insufficient_role",
                m.clone(),
            ),
            Denied::Limited(s) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limited",
                format!("this token is over its rate (http.rate_limit_per_s); retry in {s} s"),
            ),
            Denied::Unavailable(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "token_store",
                format!("cannot check the token: {m}"),
            ),
        };
        let body = if gateway {
            json!({"error": {"message": msg, "type": kind, "param": null, "code": code}})
        } else {
            json!({ "error": msg })
        };
        let mut r = (status, Json(body)).into_response();
        let h = r.headers_mut();
        match self {
            Denied::Missing => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"openclaw\""),
                );
            }
            Denied::Bad(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"openclaw\", error=\"invalid_token\""),
                );
            }
            Denied::Limited(s) => {
                h.insert(header::RETRY_AFTER, s.into());
            }
            _ => {}
        }
        r
    }
}

/// The role a request needs; None for open routes.
pub fn needed(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" {
        return None;
    }
    if path.starts_with("/v1/releases/") && path.ends_with("/binary") && method == Method::GET {
        // Devices download with the rollout's grant, not an API token.
        return None;
    }
    if (path == "/v1/releases" || path.starts_with("/v1/releases/")) && method == Method::POST {
        return Some(Role::Admin);
    }
    if path == "/v1/tokens"
        || path.starts_with("/v1/tokens/")
        || path == "/v1/audit"
        || path.starts_with("/v1/audit/")
    {
        return Some(Role::Admin);
    }
    if path == "/mcp" {
        // Listing is a read; `tools/call` checks for an operator itself.
        return Some(Role::Viewer);
    }
    if method == Method::GET || method == Method::HEAD {
        Some(Role::Viewer)
    } else {
        Some(Role::Operator)
    }
}

/// The middleware: authenticates, checks the role and the rate, and hands
/// the [`Caller`] to the route.
pub async fn check(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let (need, gateway) = {
        let path = req.uri().path();
        (needed(req.method(), path), is_gateway(path))
    };
    let Some(need) = need else {
        return next.run(req).await;
    };
    if !auth.required {
        // Anyone who reaches the port may call it, and so may any web page
        // a user of this machine opens: a cross-site POST with a text/plain
        // body needs no CORS preflight. Browsers send `Origin` on those;
        // other clients do not.
        if req.headers().contains_key(header::ORIGIN) {
            let d = Denied::Forbidden(
                "a request with an Origin header (from a web page) needs a token: \
                 http.auth is \"off\", so browsers are refused"
                    .into(),
            );
            return refuse(&auth, d, req.method(), req.uri().path(), gateway);
        }
        req.extensions_mut().insert(Caller {
            token: None,
            role: Role::Admin,
        });
        return next.run(req).await;
    }
    let caller = match auth.authenticate(req.headers()).await {
        Ok(c) => c,
        Err(d) => return refuse(&auth, d, req.method(), req.uri().path(), gateway),
    };
    if caller.role < need {
        let d = Denied::Forbidden(format!(
            "{} may not {} {}: it needs the {need} role",
            caller.name(),
            req.method(),
            req.uri().path()
        ));
        return refuse(&auth, d, req.method(), req.uri().path(), gateway);
    }
    if let Err(s) = auth.take(&caller) {
        return Denied::Limited(s).response(gateway);
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn refuse(auth: &Auth, d: Denied, method: &Method, path: &str, gateway: bool) -> Response {
    let n = auth.denied.fetch_add(1, Ordering::Relaxed) + 1;
    // A flood of bad tokens must not flood the log: the first, then at
    // powers of two.
    if n.is_power_of_two() {
        log::warn!(
            "HTTP: refused {method} {} ({n} refused so far): {d:?}",
            path.chars().take(128).collect::<String>()
        );
    }
    d.response(gateway)
}

/// The token and audit routes (admin only, behind [`check`]).
pub fn router(auth: Arc<Auth>) -> Router {
    Router::new()
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/audit", get(audit_page))
        .with_state(auth)
}

type AuthState = State<Arc<Auth>>;

fn api_error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

fn store_error(e: AuthError) -> Response {
    match e {
        AuthError::NotFound(_) => api_error(StatusCode::NOT_FOUND, e.to_string()),
        AuthError::Role(_) | AuthError::Duration(_) | AuthError::Name(_) => {
            api_error(StatusCode::BAD_REQUEST, e.to_string())
        }
        _ => api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /v1/tokens` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    role: String,
    /// `30d`, `12h`; none: never expires.
    expires: Option<String>,
    #[serde(default)]
    name: String,
}

async fn create_token(
    State(auth): AuthState,
    Extension(caller): Extension<Caller>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    };
    let b: CreateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    let role: Role = match b.role.parse() {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let expires = match b.expires.as_deref().map(tokens::parse_duration).transpose() {
        Ok(e) => e,
        Err(e) => return store_error(e),
    };
    let name = b.name;
    // The token and its audit row in one transaction, not through the
    // writer's queue: no token without its row, even after a crash.
    let who = caller.clone();
    match auth
        .with_store(move |s| {
            s.create_audited(role, &name, expires, |i| who.entry("token.create", &i.id))
        })
        .await
    {
        Ok(t) => (StatusCode::CREATED, Json(t)).into_response(),
        Err(e) => store_error(e),
    }
}

async fn list_tokens(State(auth): AuthState) -> Response {
    match auth.with_store(|s| s.list()).await {
        Ok(l) => Json(l).into_response(),
        Err(e) => store_error(e),
    }
}

async fn revoke_token(
    State(auth): AuthState,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let key = id.clone();
    let who = caller.clone();
    match auth
        .with_store(move |s| s.revoke_audited(&key, |i| who.entry("token.revoke", &i.id)))
        .await
    {
        Ok(info) => {
            auth.forget(&id);
            Json(info).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// `GET /v1/audit` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<u32>,
    before: Option<i64>,
}

async fn audit_page(
    State(auth): AuthState,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                format!("invalid query string: {}", e.body_text()),
            )
        }
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_AUDIT_PAGE);
    let before = q.before;
    match auth.with_store(move |s| s.audit_page(before, limit)).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(dir: &FsPath) -> Arc<Auth> {
        let cfg = crate::server::config::ServerConfig::load(None, toml::Table::new()).unwrap();
        Auth::open(dir, &cfg.http).unwrap()
    }

    /// Review (s9): a flood of unknown ids (anyone can send them) emptied
    /// the whole cache every 4096, valid tokens with it.
    #[tokio::test]
    async fn unknown_ids_do_not_evict_known_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let t = TokenStore::open(dir.path())
            .unwrap()
            .create(Role::Viewer, "", None)
            .unwrap();
        assert!(a.lookup(&t.info.id).await.unwrap().is_some());
        for n in 0..(MAX_CACHED as u64 + 10) {
            assert!(a.lookup(&format!("{n:016x}")).await.unwrap().is_none());
        }
        assert!(a.cached(&t.info.id), "the flood evicted a valid token");
    }

    /// Review (s9): a lookup that read the store before a revocation here
    /// and stored its answer after the revocation's `forget` kept the
    /// revoked token usable for the cache's 2 s.
    #[tokio::test]
    async fn a_read_older_than_a_revocation_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let store = TokenStore::open(dir.path()).unwrap();
        let t = store.create(Role::Admin, "", None).unwrap();
        let id = t.info.id.clone();
        let epoch = a.epoch();
        let stale = store.get(&id).unwrap();
        store.revoke(&id).unwrap();
        a.forget(&id);
        a.remember(&id, stale, epoch);
        assert!(
            !a.cached(&id),
            "a read from before the revocation was cached"
        );
        let (info, _) = a.lookup(&id).await.unwrap().unwrap();
        assert!(info.revoked_ms.is_some());
    }

    #[test]
    fn roles_by_route() {
        let g = Method::GET;
        let p = Method::POST;
        assert_eq!(needed(&g, "/healthz"), None);
        assert_eq!(needed(&g, "/v1/tasks"), Some(Role::Viewer));
        assert_eq!(needed(&p, "/v1/tasks"), Some(Role::Operator));
        assert_eq!(needed(&Method::DELETE, "/v1/tasks/x"), Some(Role::Operator));
        assert_eq!(needed(&p, "/v1/chat/completions"), Some(Role::Operator));
        assert_eq!(needed(&g, "/v1/models"), Some(Role::Viewer));
        assert_eq!(needed(&g, "/v1/tokens"), Some(Role::Admin));
        assert_eq!(needed(&Method::DELETE, "/v1/tokens/ab"), Some(Role::Admin));
        assert_eq!(needed(&g, "/v1/audit"), Some(Role::Admin));
        // Unknown routes are not open either (the 404 comes after the check).
        assert_eq!(needed(&p, "/nope"), Some(Role::Operator));
        assert_eq!(needed(&p, "/v1/releases"), Some(Role::Admin));
        assert_eq!(needed(&p, "/v1/releases/r1/deploy"), Some(Role::Admin));
        assert_eq!(needed(&g, "/v1/releases/r1"), Some(Role::Viewer));
        assert_eq!(needed(&g, "/v1/releases/r1/binary"), None);
        assert_eq!(needed(&p, "/v1/releases/r1/binary"), Some(Role::Admin));
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }
}
