//! The HTTP API (axum on hyper). Every error is JSON `{"error": "..."}` with
//! a 4xx/5xx code.
//!
//! The accept loop is ours, not `axum::serve`: it bounds the connections
//! (`http.max_connections`), reads headers with hyper's timer-driven
//! timeout (`http.header_timeout_ms`, which also closes idle keep-alive
//! connections), limits the time a body may take (`http.body_timeout_ms`)
//! and a request may take beyond its own `wait_ms` (`http.request_timeout_ms`).

use super::auth::{Auth, Caller};
use super::config::HttpSection;
use super::scheduler::{ApiError, Command, SchedulerHandle};
use super::store::{ListFilter, ListedTask, ReadStore};
use crate::protocol::api::{ErrorBody, SubmitRequest, TaskState};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use hyper::body::{Frame, Incoming, SizeHint};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Lists that read the store at once (each on its own read-only connection
/// on a blocking thread); further lists wait for one to finish.
const LIST_CONNECTIONS: usize = 4;

/// The response header that carries the cursor of the next page.
pub const NEXT_CURSOR: &str = "openclaw-next-cursor";

/// The response header that counts stored rows a list page could not read
/// and left out (each is logged with its id and column).
pub const LEFT_OUT: &str = "openclaw-left-out";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut r = (
            code,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if let ApiError::Busy { retry_after_s, .. } = &self {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, (*retry_after_s).into());
        }
        r
    }
}

/// Shared state of the API's handlers.
struct Api {
    sched: SchedulerHandle,
    auth: Arc<Auth>,
    max_body: usize,
    lists: Arc<Lists>,
}

type AppState = State<Arc<Api>>;

/// The API router. `data_dir` holds the task store lists read from; every
/// route is behind `auth`'s check.
pub fn router(
    handle: SchedulerHandle,
    http: &HttpSection,
    data_dir: PathBuf,
    auth: Arc<Auth>,
) -> Router {
    let max_body = http.max_body_bytes;
    let gateway = super::openai::router(handle.clone(), auth.clone());
    let api_sched = handle.clone();
    let api = Api {
        sched: handle,
        auth: auth.clone(),
        max_body,
        lists: Arc::new(Lists {
            dir: data_dir,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(LIST_CONNECTIONS)),
            max_bytes: http.max_list_bytes,
        }),
    };
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/tasks", get(list).post(submit))
        .route("/v1/tasks/{id}", get(task).delete(cancel))
        .route("/v1/devices", get(devices))
        .route("/v1/tools", get(tools))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(ErrorBody {
                    error: "method not allowed on this endpoint".into(),
                }),
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(Arc::new(api))
        .merge(gateway.layer(DefaultBodyLimit::max(max_body)))
        .merge(
            super::mcp::router(api_sched, auth.clone())
                .layer(DefaultBodyLimit::max(super::mcp::MAX_BODY)),
        )
        .merge(super::auth::router(auth.clone()).layer(DefaultBodyLimit::max(64 << 10)))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            super::auth::check,
        ))
}

/// Serves `app` on `listener` until `shutdown` is cancelled, with the
/// limits of `[http]`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    http: &HttpSection,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper silently applies no header timeout at all.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(http.header_timeout_ms))
        .max_buf_size(http.max_header_bytes)
        .keep_alive(true);
    let limits = Arc::new(RequestLimits {
        body: Duration::from_millis(http.body_timeout_ms),
        request: Duration::from_millis(http.request_timeout_ms),
    });
    let connections = Arc::new(Semaphore::new(http.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        // At the limit, stop accepting: new clients wait in the kernel's
        // backlog until a connection closes (idle ones do after the header
        // timeout) instead of costing memory and descriptors here.
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = connections.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let tcp = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept.
                    log::warn!("HTTP: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Clients may write headers and body separately; without NODELAY the
        // reply waits on a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (app, limits) = (app.clone(), limits.clone());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(app.clone(), limits.clone(), req)
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(tcp), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("HTTP connection: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    // The scheduler stops with the same token, so open requests end quickly.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// Time limits of one request.
struct RequestLimits {
    /// From the end of the headers to the end of the body.
    body: Duration,
    /// The whole request, on top of its `wait_ms`.
    request: Duration,
}

/// One request through the router, within its time limits.
async fn handle(
    app: Router,
    limits: Arc<RequestLimits>,
    req: Request<Incoming>,
) -> Result<Response, Infallible> {
    // Long polls (`wait_ms`) are meant to take long: they get their wait
    // (capped as the handlers cap it) on top.
    let wait = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("wait_ms=")?.parse::<u64>().ok())
        .unwrap_or(0)
        .min(MAX_WAIT_MS);
    // A language model's answer takes as long as it takes: the gateway
    // bounds it by its task's timeout (`timeout_ms`), not this.
    // Nor does an MCP tool call: its task's timeout bounds it.
    let llm = matches!(
        req.uri().path(),
        "/v1/chat/completions" | "/v1/embeddings" | "/mcp"
    );
    let limit = if llm {
        // A queued request waits as long as the queue: no limit here.
        Duration::from_secs(365 * 24 * 3600)
    } else {
        limits.request + Duration::from_millis(wait)
    };
    // A release binary is tens of megabytes: its upload gets ten minutes.
    let upload = req.method() == axum::http::Method::POST && req.uri().path() == "/v1/releases";
    let body_limit = if upload {
        limits.body.max(Duration::from_secs(600))
    } else {
        limits.body
    };
    let limit = if upload { limit + body_limit } else { limit };
    let req = req.map(|b| TimedBody::new(b, body_limit));
    let svc = hyper_util::service::TowerToHyperService::new(app);
    match tokio::time::timeout(limit, hyper::service::Service::call(&svc, req)).await {
        Ok(r) => r,
        Err(_) => Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the request took longer than {} ms", limit.as_millis()),
        )),
    }
}

fn error(code: StatusCode, error: String) -> Response {
    (code, Json(ErrorBody { error })).into_response()
}

/// Longest `wait_ms` honoured.
const MAX_WAIT_MS: u64 = 300_000;

/// A body that fails once it has taken longer than its limit to arrive.
struct TimedBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    limit: Duration,
    /// Started on the first poll that has to wait.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration) -> TimedBody {
        TimedBody {
            inner,
            deadline: tokio::time::Instant::now() + limit,
            limit,
            sleep: None,
        }
    }
}

/// The error a [`TimedBody`] gives when it runs out of time.
#[derive(Debug, thiserror::Error)]
#[error("the body was not received within {} ms", .0.as_millis())]
struct BodyTimeout(Duration);

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(r.map(|r| r.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn health(State(api): AppState) -> Result<Response, ApiError> {
    let mut health = api.sched.ask(|resp| Command::Health { resp }).await?;
    // Every action that audits is refused while the audit log cannot be
    // written (a full disk can meet auth.db before the task store).
    if health.status == "ok" && api.auth.audit_failure().is_some() {
        health.status = "audit failing".into();
    }
    Ok(Json(health).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    /// Submit and wait: answer with the task view once it is terminal, or
    /// when this many milliseconds have passed.
    wait_ms: Option<u64>,
}

async fn submit(
    State(api): AppState,
    Extension(caller): Extension<Caller>,
    q: Result<Query<SubmitQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let (h, max_body) = (&api.sched, api.max_body);
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::TooLarge(format!(
                "body exceeds the limit of {max_body} bytes"
            )))
        }
        Err(e) => {
            if let Some(t) = find_source::<BodyTimeout>(&e as &(dyn std::error::Error + 'static)) {
                return Ok(error(StatusCode::REQUEST_TIMEOUT, t.to_string()));
            }
            return Err(ApiError::BadRequest(format!("cannot read the body: {e}")));
        }
    };
    let req: SubmitRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if req.reply_to.is_some() || req.correlation.is_some() {
        return Err(ApiError::BadRequest(
            "`reply_to` and `correlation` are for MQTT submissions only".into(),
        ));
    }
    let slot = api
        .auth
        .reserve_audit(&caller)
        .map_err(ApiError::Unavailable)?;
    // Its own task: a client going away must not drop the audit row of a
    // submit the scheduler accepts.
    let sched = h.clone();
    let resp = detached(async move {
        let r = sched.submit(req).await?;
        slot.record("task.submit", &r.id);
        Ok(r)
    })
    .await?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(MAX_WAIT_MS));
    if wait.is_zero() {
        return Ok((StatusCode::ACCEPTED, Json(resp)).into_response());
    }
    // One request instead of a submit and a long poll. 200 once terminal,
    // 202 with the current view if the wait ran out first.
    match wait_for(h, &resp.id, wait).await? {
        Some(v) if v.state.is_terminal() => Ok(Json(v).into_response()),
        Some(v) => Ok((StatusCode::ACCEPTED, Json(v)).into_response()),
        None => Ok((StatusCode::ACCEPTED, Json(resp)).into_response()),
    }
}

/// Waits up to `wait` for a task to be terminal; its view then (or the
/// current one when the wait ran out), `None` if it does not exist.
pub(super) async fn wait_for(
    h: &SchedulerHandle,
    id: &str,
    wait: Duration,
) -> Result<Option<crate::protocol::api::TaskView>, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.sender()
        .send(Command::Wait {
            id: id.to_string(),
            resp: tx,
        })
        .await
        .map_err(|_| ApiError::Unavailable("scheduler is shutting down".into()))?;
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(r)) => r,
        _ => {
            h.ask(|resp| Command::Get {
                id: id.to_string(),
                resp,
            })
            .await?
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskQuery {
    /// Long poll: wait up to this long for the task to finish.
    wait_ms: Option<u64>,
}

async fn task(
    State(api): AppState,
    Path(id): Path<String>,
    q: Result<Query<TaskQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let h = &api.sched;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(MAX_WAIT_MS));
    let found = if wait.is_zero() {
        h.ask(|resp| Command::Get {
            id: id.clone(),
            resp,
        })
        .await??
    } else {
        wait_for(h, &id, wait).await?
    };
    match found {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::NotFound(format!("task {id} does not exist"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    /// Shorthand for `include=input,result`.
    full: Option<bool>,
    /// Comma-separated: `input`, `result`.
    include: Option<String>,
    /// From the `openclaw-next-cursor` header of the previous page.
    cursor: Option<String>,
}

/// Lists run here: outside the scheduler, on read-only store connections.
struct Lists {
    dir: PathBuf,
    idle: Mutex<Vec<ReadStore>>,
    permits: Arc<Semaphore>,
    /// A page stops before it would exceed this (but holds at least one task).
    max_bytes: usize,
}

/// One task of a list, as JSON: `input` and `result` are the stored text.
#[derive(Serialize)]
struct ListItem<'a> {
    id: &'a str,
    plugin: &'a str,
    state: TaskState,
    priority: u8,
    target: Option<&'a str>,
    capability: Option<&'a str>,
    device: Option<&'a str>,
    attempts: u32,
    max_attempts: u32,
    timeout_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Option<&'a RawValue>>,
    error: Option<&'a str>,
    created_ms: u64,
    dispatched_ms: Option<u64>,
    started_ms: Option<u64>,
    finished_ms: Option<u64>,
    route: crate::protocol::api::Route,
    #[serde(skip_serializing_if = "Option::is_none")]
    placement: Option<&'a str>,
}

/// Stored JSON text as it is; `null` if it is not JSON (as `TaskRow::view`).
fn raw(text: &str) -> &RawValue {
    serde_json::from_str(text).unwrap_or(RawValue::NULL)
}

/// One page of a list.
struct Page {
    body: Vec<u8>,
    next: Option<String>,
    /// Stored rows that could not be read and were skipped (logged).
    left_out: usize,
}

impl Lists {
    /// Runs on a blocking thread with one of the read-only connections.
    fn page(
        &self,
        filter: &ListFilter,
        want: Option<TaskState>,
        running: &HashMap<String, u64>,
        limit: usize,
    ) -> Result<Page, ApiError> {
        let unavailable = |e: super::store::StoreError| ApiError::Unavailable(e.to_string());
        let idle = self.idle.lock().expect("not poisoned").pop();
        let store = match idle {
            Some(s) => s,
            None => ReadStore::open(&self.dir).map_err(unavailable)?,
        };
        let mut body = Vec::with_capacity(4096);
        body.push(b'[');
        let mut item = Vec::new();
        let (mut n, mut last, mut more) = (0usize, None, false);
        let r = store.list(filter, |mut t: ListedTask<'_>| {
            if t.state == TaskState::Dispatched {
                if let Some(&started) = running.get(t.id) {
                    t.state = TaskState::Running;
                    t.started_ms = Some(started);
                }
            }
            if want.is_some_and(|w| w != t.state) {
                return true;
            }
            item.clear();
            let view = ListItem {
                id: t.id,
                plugin: t.plugin,
                state: t.state,
                priority: t.priority,
                target: t.target,
                capability: t.capability,
                device: t.device,
                attempts: t.attempts,
                max_attempts: t.max_attempts,
                timeout_ms: t.timeout_ms,
                input: filter.input.then(|| raw(t.input.unwrap_or("null"))),
                result: filter.result.then(|| t.result.map(raw)),
                error: t.error,
                created_ms: t.created_ms,
                dispatched_ms: t.dispatched_ms,
                started_ms: t.started_ms,
                finished_ms: t.finished_ms,
                route: t.route,
                placement: t.placement,
            };
            serde_json::to_writer(&mut item, &view).expect("serializing to memory");
            if n == limit || (n > 0 && body.len() + item.len() + 2 > self.max_bytes) {
                more = true;
                return false;
            }
            if n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&item);
            last = Some((t.created_ms, t.id.to_string()));
            n += 1;
            true
        });
        self.idle.lock().expect("not poisoned").push(store);
        let left_out = r.map_err(unavailable)?;
        body.push(b']');
        let next = more
            .then_some(last)
            .flatten()
            .map(|(ms, id)| format!("{ms}_{id}"));
        Ok(Page {
            body,
            next,
            left_out,
        })
    }
}

async fn list(
    State(api): AppState,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown state `{s}` (queued, dispatched, running, succeeded, failed, timed_out, cancelled)"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(100).min(10_000) as usize;
    let mut filter = ListFilter::default();
    if q.full == Some(true) {
        filter.input = true;
        filter.result = true;
    }
    for part in q.include.as_deref().unwrap_or("").split(',') {
        match part.trim() {
            "" => {}
            "input" => filter.input = true,
            "result" => filter.result = true,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown `include` value `{other}` (input, result)"
                )))
            }
        }
    }
    if let Some(c) = &q.cursor {
        filter.before = Some(parse_cursor(c).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "invalid `cursor` `{c}` (use the {NEXT_CURSOR} header of the previous page)"
            ))
        })?);
    }
    // The store does not record `running`: it has those tasks as
    // `dispatched`, and the scheduler says which of them run (no JSON in
    // that answer, and no more entries than there are running tasks).
    filter.states = match state {
        Some(TaskState::Running | TaskState::Dispatched) => vec![TaskState::Dispatched],
        Some(s) => vec![s],
        None => Vec::new(),
    };
    let running = match state {
        None | Some(TaskState::Running | TaskState::Dispatched) => {
            api.sched.ask(|resp| Command::Running { resp }).await?
        }
        Some(_) => HashMap::new(),
    };
    let lists = api.lists.clone();
    let permit = lists
        .permits
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let page = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        lists.page(&filter, state, &running, limit)
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("the list failed: {e}")))??;
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        page.body,
    )
        .into_response();
    if let Some(next) = page.next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert(NEXT_CURSOR, next);
    }
    if page.left_out > 0 {
        resp.headers_mut()
            .insert(LEFT_OUT, HeaderValue::from(page.left_out as u64));
    }
    Ok(resp)
}

/// `CREATED_MS_ID` as the list writes it.
fn parse_cursor(c: &str) -> Option<(u64, String)> {
    let (ms, id) = c.split_once('_')?;
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        return None;
    }
    Some((ms.parse().ok()?, id.to_string()))
}

/// The first error of type `E` in `e`'s chain of sources.
fn find_source<'e, E: std::error::Error + 'static>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e E> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

async fn cancel(
    State(api): AppState,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let slot = api
        .auth
        .reserve_audit(&caller)
        .map_err(ApiError::Unavailable)?;
    let sched = api.sched.clone();
    let v = detached(async move {
        let v = sched.ask(|resp| Command::Cancel { id, resp }).await??;
        slot.record("task.cancel", &v.id);
        Ok(v)
    })
    .await?;
    Ok(Json(v).into_response())
}

/// Submits `req` on a task of its own and writes its audit row (`action`
/// on `what(id)`), then hands the id over. A caller gone by then (its
/// request dropped: the client disconnected) has the task cancelled: it
/// asked to follow the task, and nobody would.
pub(crate) async fn submit_followed(
    sched: &SchedulerHandle,
    req: SubmitRequest,
    slot: super::auth::AuditSlot,
    action: &'static str,
    what: impl FnOnce(&str) -> String + Send + 'static,
) -> Result<String, ApiError> {
    let sched = sched.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        match sched.submit(req).await {
            Ok(r) => {
                slot.record(action, &what(&r.id));
                if tx.send(Ok(r.id.clone())).is_err() {
                    log::info!("task {}: its client went away; cancelling it", r.id);
                    super::openai::cancel_later(sched, r.id);
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    rx.await
        .unwrap_or_else(|_| Err(ApiError::Unavailable("the submit's task ended".into())))
}

/// Runs `f` to its end even if the request is dropped (the client went
/// away): what it changes and its audit row go together.
pub(crate) async fn detached<T: Send + 'static>(
    f: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::Unavailable(format!("the request's task: {e}"))))
}

async fn devices(State(api): AppState) -> Result<Response, ApiError> {
    let d = api.sched.ask(|resp| Command::Devices { resp }).await?;
    Ok(Json(d).into_response())
}

/// `GET /v1/tools`: the plugins of the online devices that have sent
/// their catalog, as tools (`server::tools::fleet`).
async fn tools(State(api): AppState) -> Result<Response, ApiError> {
    let d = api.sched.ask(|resp| Command::Devices { resp }).await?;
    let tools = super::tools::fleet(
        d.iter()
            .filter(|d| d.online)
            .filter_map(|d| Some((d.id.as_str(), d.tools.as_deref()?))),
    );
    Ok(Json(serde_json::json!({ "tools": tools })).into_response())
}

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid query string: {}", e.body_text()))
}
