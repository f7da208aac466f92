//! The OpenAI-compatible API: `POST /v1/chat/completions` (with `stream`
//! as server-sent events, and without), `GET /v1/models` and
//! `POST /v1/embeddings`.
//!
//! Each request becomes a stored task of plugin `llm` (input `{"chat":
//! ...}` or `{"embed": ...}`), routed by the scheduler like any other to a
//! heavy node that advertises `llm:MODEL`: queued while every slot is
//! busy, moved to another node when its node is lost. A streamed answer
//! reads the task's output as its node sends it (`Chunk` messages, in
//! order); what a reader missed (it fell behind, a chunk was lost) comes
//! from the result at the end, and when the task restarts on another node
//! the text it repeats is skipped. A client that goes away cancels the task.
//!
//! Errors have OpenAI's shape `{"error": {"message", "type", "param",
//! "code"}}`: unknown model 404, bad parameters 400 (also a prompt over the
//! context, with both numbers, as the node reports it).

use super::auth::{AuditSlot, Caller};
use super::http::wait_for;
use super::scheduler::{ApiError, Command, SchedulerHandle};
use super::streams::StreamEvent;
use crate::llm::{ChatRequest, Completion, EmbedRequest, FinishReason};
use crate::protocol::api::{SubmitRequest, TaskState, TaskView};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The capability a heavy node advertises for each language model it serves.
pub const LLM_CAPABILITY: &str = "llm:";
/// How long one completion may run on its node unless the request says
/// otherwise (`timeout_ms`, an OpenClaw extension).
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Longest a streamed answer waits for its client to take an event.
const SLOW_CLIENT: Duration = Duration::from_secs(60);
/// Most texts one embeddings request may hold (the vectors come back in
/// one MQTT message).
const MAX_EMBED_INPUTS: usize = 64;
/// Tries on other nodes after a node is lost.
const MAX_ATTEMPTS: u32 = 3;

struct Gateway {
    sched: SchedulerHandle,
    auth: Arc<super::auth::Auth>,
}

type GwState = State<Arc<Gateway>>;

/// The gateway's routes, merged into the API router.
pub fn router(sched: SchedulerHandle, auth: Arc<super::auth::Auth>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .with_state(Arc::new(Gateway { sched, auth }))
}

/// An error in OpenAI's shape.
#[derive(Debug)]
struct OaiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    /// Sent with `x-should-retry: false`.
    no_retry: bool,
}

impl OaiError {
    fn bad(message: impl Into<String>, param: Option<&str>) -> OaiError {
        OaiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            no_retry: false,
        }
    }

    fn json(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.json())).into_response();
        if self.no_retry {
            // The official clients retry 5xx; a task the scheduler already
            // tried on its nodes would only go to the back of the queue.
            r.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        r
    }
}

impl From<ApiError> for OaiError {
    fn from(e: ApiError) -> OaiError {
        let (status, kind) = match &e {
            ApiError::BadRequest(_) | ApiError::Unprocessable(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "invalid_request_error"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
            ApiError::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        };
        OaiError {
            status,
            message: e.to_string(),
            kind,
            param: None,
            code: None,
            no_retry: false,
        }
    }
}

/// The body, as JSON, or an error saying why not.
fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, OaiError> {
    let body = body.map_err(|e| {
        let mut err = OaiError::bad(format!("cannot read the body: {e}"), None);
        err.status = e.status();
        err
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| OaiError::bad(format!("invalid JSON body: {e}"), None))
}

/// Text of a message's `content`: a string, or OpenAI's list of parts of
/// which only `text` ones are taken (anything else is refused by name).
fn normalize_messages(body: &mut Value) -> Result<(), OaiError> {
    let Some(msgs) = body.get_mut("messages").and_then(Value::as_array_mut) else {
        return Ok(()); // `validate` names it
    };
    for (i, m) in msgs.iter_mut().enumerate() {
        let Some(obj) = m.as_object_mut() else {
            return Err(OaiError::bad(
                format!("messages[{i}] is not an object"),
                Some(&format!("messages[{i}]")),
            ));
        };
        // Fields of tool-calling clients the engines here do not take.
        for k in [
            "tool_calls",
            "tool_call_id",
            "refusal",
            "audio",
            "function_call",
        ] {
            obj.remove(k);
        }
        match obj.get("content") {
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(OaiError::bad(
                                format!(
                                    "messages[{i}].content[{j}]: only text parts are supported"
                                ),
                                Some(&format!("messages[{i}].content")),
                            ))
                        }
                    }
                }
                obj.insert("content".into(), Value::String(text));
            }
            Some(Value::Null) | None => {
                obj.insert("content".into(), Value::String(String::new()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Fields of the request that the gateway handles itself.
#[derive(Debug)]
struct Extras {
    stream: bool,
    include_usage: bool,
    priority: Option<u8>,
    timeout_ms: u64,
}

fn take_extras(body: &mut Value) -> Result<Extras, OaiError> {
    let obj = body
        .as_object_mut()
        .ok_or_else(|| OaiError::bad("the body is not a JSON object", None))?;
    let stream = match obj.remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(OaiError::bad("`stream` must be a boolean", Some("stream"))),
    };
    let include_usage = obj
        .remove("stream_options")
        .and_then(|o| o.get("include_usage").and_then(Value::as_bool))
        .unwrap_or(false);
    match obj.remove("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => {
            return Err(OaiError::bad(
                format!("`n` is {v}: only 1 is supported"),
                Some("n"),
            ))
        }
    }
    let priority = match obj.remove("priority") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(p) if p <= 100 => Some(p as u8),
            _ => {
                return Err(OaiError::bad(
                    format!("`priority` {v} is not in 0..=100"),
                    Some("priority"),
                ))
            }
        },
    };
    let timeout_ms = match obj.remove("timeout_ms") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_MS,
        Some(v) => v.as_u64().filter(|t| *t > 0).ok_or_else(|| {
            OaiError::bad(
                format!("`timeout_ms` {v} is not a positive integer"),
                Some("timeout_ms"),
            )
        })?,
    };
    Ok(Extras {
        stream,
        include_usage,
        priority,
        timeout_ms,
    })
}

/// The language models the online heavy nodes serve, with those nodes.
async fn served(sched: &SchedulerHandle) -> Result<BTreeMap<String, Vec<String>>, OaiError> {
    let devices = sched.ask(|resp| Command::Devices { resp }).await?;
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in devices.iter().filter(|d| d.online) {
        for c in &d.capabilities {
            if let Some(name) = c.strip_prefix(LLM_CAPABILITY) {
                m.entry(name.to_string()).or_default().push(d.id.clone());
            }
        }
    }
    Ok(m)
}

async fn models(State(gw): GwState) -> Result<Response, OaiError> {
    let data: Vec<Value> = served(&gw.sched)
        .await?
        .into_iter()
        .map(|(name, nodes)| {
            json!({"id": name, "object": "model", "created": 0, "owned_by": "openclaw",
                   "nodes": nodes})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn known_model(sched: &SchedulerHandle, model: &str) -> Result<(), OaiError> {
    let served = served(sched).await?;
    if served.contains_key(model) {
        return Ok(());
    }
    let known: Vec<&str> = served.keys().map(String::as_str).collect();
    Err(OaiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "The model `{model}` does not exist or no node serving it is online (served: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
        no_retry: false,
    })
}

/// Submits the `llm` task and records `action` in its audit slot; its id.
/// The two go together even if the client goes away meanwhile.
async fn submit(
    sched: &SchedulerHandle,
    model: &str,
    input: Value,
    x: &Extras,
    slot: AuditSlot,
    action: &'static str,
) -> Result<String, OaiError> {
    let mut req = SubmitRequest::new("llm", input);
    req.capability = Some(format!("{LLM_CAPABILITY}{model}"));
    req.priority = x.priority;
    req.timeout_ms = Some(x.timeout_ms);
    req.max_attempts = Some(MAX_ATTEMPTS);
    let model = model.to_string();
    let id = super::http::submit_followed(sched, req, slot, action, move |id| {
        format!("{model} (task {id})")
    })
    .await?;
    Ok(id)
}

/// A failed task's error as the client should see it: a plugin's
/// "invalid input" (a prompt over the context, a value the engine refuses)
/// is the client's 400, the rest the server's.
fn task_error(t: &TaskView) -> OaiError {
    let msg = t
        .error
        .clone()
        .unwrap_or_else(|| format!("task ended {:?}", t.state));
    // The task's error is "Kind: message" (the agent's ErrorKind).
    let (status, kind) = if msg.starts_with("InvalidInput:") {
        (StatusCode::BAD_REQUEST, "invalid_request_error")
    } else if msg.starts_with("TooLarge:") {
        (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error")
    } else if t.state == TaskState::TimedOut {
        (StatusCode::GATEWAY_TIMEOUT, "server_error")
    } else if t.state == TaskState::Cancelled {
        // Cancelled by an operator: not the client's to retry.
        (StatusCode::CONFLICT, "invalid_request_error")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "server_error")
    };
    OaiError {
        status,
        message: format!("task {}: {msg}", t.id),
        kind,
        param: None,
        code: None,
        // The scheduler already tried it on its nodes (up to 3 attempts).
        no_retry: true,
    }
}

fn completion_of(t: &TaskView) -> Result<Completion, OaiError> {
    let r = t.result.clone().unwrap_or(Value::Null);
    serde_json::from_value(r).map_err(|e| OaiError {
        status: StatusCode::BAD_GATEWAY,
        message: format!("task {}: the node's result is not a completion: {e}", t.id),
        kind: "server_error",
        param: None,
        code: None,
        no_retry: false,
    })
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(c: &Completion) -> Value {
    json!({"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
           "total_tokens": c.prompt_tokens + c.completion_tokens})
}

/// Cancels a task whose client went away (best effort: it may have ended).
pub(crate) fn cancel_later(sched: SchedulerHandle, id: String) {
    tokio::spawn(async move {
        if let Ok(Err(e)) = sched
            .ask(|resp| Command::Cancel {
                id: id.clone(),
                resp,
            })
            .await
        {
            log::debug!("task {id}: not cancelled after its client left: {e}");
        }
    });
}

/// Cancels the task when dropped before `disarm`: the handler's future is
/// dropped when its client disconnects.
struct CancelOnDrop(Option<(SchedulerHandle, String)>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some((s, id)) = self.0.take() {
            log::info!("task {id}: the client went away; cancelling it");
            cancel_later(s, id);
        }
    }
}

async fn chat(
    State(gw): GwState,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OaiError> {
    let mut body = body_json(body)?;
    let extras = take_extras(&mut body)?;
    normalize_messages(&mut body)?;
    let req: ChatRequest = serde_json::from_value(body)
        .map_err(|e| OaiError::bad(format!("invalid chat request: {e}"), None))?;
    req.validate().map_err(|e| match e {
        crate::llm::LlmError::InvalidRequest { field, message } => {
            OaiError::bad(format!("`{field}`: {message}"), Some(&field))
        }
        e => OaiError::bad(e.to_string(), None),
    })?;
    known_model(&gw.sched, &req.model).await?;
    let model = req.model.clone();
    let input = json!({ "chat": req, "stream": extras.stream });
    let slot = gw
        .auth
        .reserve_audit(&caller)
        .map_err(ApiError::Unavailable)?;
    let id = submit(&gw.sched, &model, input, &extras, slot, "chat").await?;
    let mut guard = CancelOnDrop(Some((gw.sched.clone(), id.clone())));
    let created = crate::now_ms() / 1000;
    if !extras.stream {
        let t = wait_terminal(&gw.sched, &id).await?;
        guard.disarm();
        if t.state != TaskState::Succeeded {
            return Err(task_error(&t));
        }
        let c = completion_of(&t)?;
        return Ok(Json(json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": c.text},
                         "finish_reason": finish_str(c.finish_reason)}],
            "usage": usage(&c),
            "openclaw": {"task": id, "device": t.device},
        }))
        .into_response());
    }
    // Streamed: the first piece (or the end) is awaited before the status
    // is sent, so an error the node finds at once (a prompt over the
    // context) is a proper 400, not an event inside a 200.
    let mut rx = gw
        .sched
        .ask(|resp| Command::Subscribe {
            id: id.clone(),
            resp,
        })
        .await?;
    let first = match rx.as_mut() {
        Some(rx) => rx.recv().await,
        None => None,
    };
    if first.is_none() {
        // Ended before any output (or never streamed).
        let t = wait_terminal(&gw.sched, &id).await?;
        if t.state != TaskState::Succeeded {
            guard.disarm();
            return Err(task_error(&t));
        }
    }
    let (tx, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let sse = SseStream {
        sched: gw.sched.clone(),
        id: id.clone(),
        model,
        created,
        include_usage: extras.include_usage,
        tx,
    };
    guard.disarm();
    tokio::spawn(sse.run(first, rx));
    let mut resp = ChannelBody::event_stream(body_rx);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("openclaw-task", v);
    }
    Ok(resp)
}

/// Waits for the task to end. No deadline of its own: the scheduler ends
/// a task that runs past its `timeout_ms` (counted from its start on a
/// node, not from the submit: time in the queue is not the node's), and a
/// client that gives up disconnects, which cancels the task.
async fn wait_terminal(sched: &SchedulerHandle, id: &str) -> Result<TaskView, OaiError> {
    loop {
        match wait_for(sched, id, Duration::from_secs(300)).await? {
            Some(t) if t.state.is_terminal() => return Ok(t),
            Some(_) => continue,
            None => {
                return Err(OaiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("task {id} is gone"),
                    kind: "server_error",
                    param: None,
                    code: None,
                    no_retry: false,
                })
            }
        }
    }
}

/// Writes one streamed answer as server-sent events.
struct SseStream {
    sched: SchedulerHandle,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl SseStream {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let v = json!({
            "id": format!("chatcmpl-{}", self.id),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// Sends an event; false when the client has gone, or has not taken
    /// anything for [`SLOW_CLIENT`] (then the connection is closed: a
    /// client that never reads must not hold it and its task forever).
    async fn send(&self, b: Bytes) -> bool {
        send_event(&self.tx, b, &format!("task {}", self.id)).await
    }

    async fn run(self, first: Option<StreamEvent>, rx: Option<mpsc::Receiver<StreamEvent>>) {
        if !self.stream(first, rx).await {
            log::info!(
                "task {}: the client went away mid-stream; cancelling it",
                self.id
            );
            cancel_later(self.sched.clone(), self.id.clone());
        }
    }

    /// False when the client went away before the end.
    async fn stream(
        &self,
        first: Option<StreamEvent>,
        rx: Option<mpsc::Receiver<StreamEvent>>,
    ) -> bool {
        if !self
            .send(self.chunk(json!({"role": "assistant", "content": ""}), None))
            .await
        {
            return false;
        }
        // What the client has; after a restart elsewhere, how much of it
        // the new attempt has repeated so far.
        let mut sent = String::new();
        let mut replay: Option<usize> = None;
        let mut diverged = false;
        let mut next = first;
        let mut rx = rx;
        loop {
            let ev = match next.take() {
                Some(e) => Some(e),
                None => match rx.as_mut() {
                    Some(r) => tokio::select! {
                        e = r.recv() => e,
                        _ = self.tx.closed() => return false,
                    },
                    None => None,
                },
            };
            let Some(ev) = ev else { break };
            match ev {
                StreamEvent::Restart => {
                    // Each attempt is judged afresh; at the end only the
                    // result counts (it may come from an earlier attempt).
                    replay = Some(0);
                    diverged = false;
                }
                StreamEvent::Text(t) if diverged => drop(t),
                StreamEvent::Text(t) => {
                    let new = match replay {
                        Some(pos) => {
                            let have = &sent[pos..];
                            if have.starts_with(t.as_str()) {
                                replay = Some(pos + t.len());
                                continue;
                            }
                            if !t.starts_with(have) {
                                // The new attempt says something else: what
                                // the client has cannot be taken back.
                                diverged = true;
                                continue;
                            }
                            replay = None;
                            t[have.len()..].to_string()
                        }
                        None => t,
                    };
                    if new.is_empty() {
                        continue;
                    }
                    sent.push_str(&new);
                    if !self.send(self.chunk(json!({"content": new}), None)).await {
                        return false;
                    }
                }
            }
        }
        // The stream closed: the task ended (or this reader fell behind).
        // The client may leave while the last part is awaited (a reader
        // that fell behind waits here for the whole rest): that cancels.
        let t = tokio::select! {
            t = wait_terminal(&self.sched, &self.id) => t,
            _ = self.tx.closed() => return false,
        };
        let t = match t {
            Ok(t) => t,
            Err(e) => {
                // The task may still run: the stream ends, so does the task.
                self.send(error_event(&e)).await;
                return false;
            }
        };
        if t.state != TaskState::Succeeded {
            let e = task_error(&t);
            return self.send(error_event(&e)).await;
        }
        let c = match completion_of(&t) {
            Ok(c) => c,
            Err(e) => return self.send(error_event(&e)).await,
        };
        if !c.text.starts_with(&sent) {
            let e = OaiError {
                status: StatusCode::BAD_GATEWAY,
                message: format!(
                    "task {}: its node was lost mid-stream and the retry on another node wrote \
                     another text; the text streamed so far is not the answer",
                    self.id
                ),
                kind: "server_error",
                param: None,
                code: None,
                no_retry: false,
            };
            return self.send(error_event(&e)).await;
        }
        let rest = &c.text[sent.len()..];
        if !rest.is_empty() && !self.send(self.chunk(json!({"content": rest}), None)).await {
            return false;
        }
        if !self
            .send(self.chunk(json!({}), Some(finish_str(c.finish_reason))))
            .await
        {
            return false;
        }
        if self.include_usage {
            let v = json!({
                "id": format!("chatcmpl-{}", self.id),
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(&c),
            });
            if !self.send(Bytes::from(format!("data: {v}\n\n"))).await {
                return false;
            }
        }
        self.send(Bytes::from_static(b"data: [DONE]\n\n")).await
    }
}

fn error_event(e: &OaiError) -> Bytes {
    Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", e.json()))
}

/// A response body fed from a channel; dropped (the client went away) it
/// closes the channel, which the writer notices.
/// An `Err` ends the response with an error, which closes the connection.
/// Sends one event of a stream to its client; false when the client has
/// gone, or has not taken anything for [`SLOW_CLIENT`] (the connection is
/// then closed: a client that never reads must not hold it, and what it
/// waits for, forever). `what` names the stream in the log.
pub(crate) async fn send_event(
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    b: Bytes,
    what: &str,
) -> bool {
    match tokio::time::timeout(SLOW_CLIENT, tx.send(Ok(b))).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            log::warn!(
                "{what}: the client took nothing for {} s; closing its stream",
                SLOW_CLIENT.as_secs()
            );
            let _ = tx.try_send(Err(std::io::Error::other("client too slow")));
            false
        }
    }
}

pub(crate) struct ChannelBody(pub(crate) mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl ChannelBody {
    /// A `text/event-stream` response of what `rx` receives, uncached and
    /// not buffered by a proxy (nginx and its kin would hold keep-alive
    /// comments and chunks back).
    pub(crate) fn event_stream(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
        let mut r = Response::new(Body::new(ChannelBody(rx)));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| b.map(http_body::Frame::data)))
    }
}

async fn embeddings(
    State(gw): GwState,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OaiError> {
    let mut body = body_json(body)?;
    let extras = take_extras(&mut body)?;
    if let Some(obj) = body.as_object_mut() {
        // The official client asks for base64 by default; floats are what we send.
        match obj.remove("encoding_format") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "float" || s == "base64" => {
                obj.insert("encoding_format".into(), Value::String(s));
            }
            Some(v) => {
                return Err(OaiError::bad(
                    format!("`encoding_format` {v} is not float or base64"),
                    Some("encoding_format"),
                ))
            }
        }
    }
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    if let Some(obj) = body.as_object_mut() {
        obj.remove("encoding_format");
        obj.remove("user");
        if obj.remove("dimensions").is_some_and(|d| !d.is_null()) {
            return Err(OaiError::bad(
                "`dimensions` is not supported: the vectors have the model's own size",
                Some("dimensions"),
            ));
        }
    }
    let req: EmbedRequest = serde_json::from_value(body)
        .map_err(|e| OaiError::bad(format!("invalid embeddings request: {e}"), None))?;
    if req.input.is_empty() || req.input.len() > MAX_EMBED_INPUTS {
        return Err(OaiError::bad(
            format!(
                "`input` holds {} texts, 1 to {MAX_EMBED_INPUTS} allowed per request",
                req.input.len()
            ),
            Some("input"),
        ));
    }
    known_model(&gw.sched, &req.model).await?;
    let model = req.model.clone();
    let slot = gw
        .auth
        .reserve_audit(&caller)
        .map_err(ApiError::Unavailable)?;
    let input = json!({ "embed": req });
    let id = submit(&gw.sched, &model, input, &extras, slot, "embeddings").await?;
    let mut guard = CancelOnDrop(Some((gw.sched.clone(), id.clone())));
    let t = wait_terminal(&gw.sched, &id).await?;
    guard.disarm();
    if t.state != TaskState::Succeeded {
        return Err(task_error(&t));
    }
    let r = t.result.clone().unwrap_or(Value::Null);
    let vectors: Vec<Vec<f32>> = serde_json::from_value(
        r.get("embeddings").cloned().unwrap_or(Value::Null),
    )
    .map_err(|e| OaiError {
        status: StatusCode::BAD_GATEWAY,
        message: format!("task {id}: the node's result holds no embeddings: {e}"),
        kind: "server_error",
        param: None,
        code: None,
        no_retry: false,
    })?;
    let tokens = r.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let e = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": e})
        })
        .collect();
    Ok(Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// Standard base64 with padding (what OpenAI's `encoding_format: base64` is).
fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn extras_are_taken_and_bad_ones_named() {
        let mut b = json!({"model": "m", "stream": true, "n": 1, "stream_options": {"include_usage": true}});
        let x = take_extras(&mut b).unwrap();
        assert!(x.stream && x.include_usage);
        assert_eq!(b, json!({"model": "m"}));
        let e = take_extras(&mut json!({"n": 2})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = take_extras(&mut json!({"stream": "yes"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream"));
    }

    #[test]
    fn content_parts_become_text_and_others_are_refused() {
        let mut b = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
        normalize_messages(&mut b).unwrap();
        assert_eq!(b["messages"][0]["content"], "ab");
        let mut b = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]});
        let e = normalize_messages(&mut b).unwrap_err();
        assert!(e.message.contains("only text parts"), "{}", e.message);
    }
}
