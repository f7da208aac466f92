//! The fleet's tools for MCP clients: a Model Context Protocol server on
//! `POST /mcp` (the Streamable HTTP transport, stateless: no session id,
//! every request stands alone; GET and DELETE answer 405, as the
//! transport allows a server that offers no stream of its own).
//!
//! `tools/list` gives the plugins of the online devices under their stable
//! names (`plugin__device`, [`super::tools::tool_name`]) with their JSON
//! Schemas and hints from their effects. `tools/call` checks the arguments
//! against the tool's schema, submits a task on that device (an audited
//! `mcp.call`, operators only) and answers with its result: as one
//! server-sent event when the client accepts `text/event-stream` (with a
//! comment every [`KEEP_ALIVE`] while the task runs, so proxies keep the
//! connection), else as JSON. A client that goes away, or sends
//! `notifications/cancelled` for the call, cancels the task.
//!
//! Protocol errors are JSON-RPC errors; a tool that cannot run (a device
//! offline, arguments that do not fit the schema, a task that failed) is a
//! result with `isError`, which a model reads and can act on.

use super::auth::{AuditSlot, Auth, Caller, Role};
use super::openai::{cancel_later, send_event, ChannelBody};
use super::scheduler::{ApiError, Command, SchedulerHandle};
use super::tools::{self, FleetTool};
use crate::protocol::api::{SubmitRequest, TaskState, TaskView};
use crate::schema::Effects;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Protocol versions served, newest first.
pub const VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// What a request without `MCP-Protocol-Version` is taken to speak (the
/// transport's rule).
const ASSUMED_VERSION: &str = "2025-03-26";
/// The first version with `structuredContent`.
const STRUCTURED_SINCE: &str = "2025-06-18";
/// Tools per `tools/list` page.
pub const PAGE: usize = 200;
/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// How long a tool's task may run on its device.
pub const CALL_TIMEOUT_MS: u64 = 300_000;
/// A comment on the event stream this often while a call runs.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Largest result sent in a reply (as text; as much again as structured
/// content): clients cap an event (the Python SDK at 1 MiB), and a larger
/// one is fetched whole from the task (`GET /v1/tasks/ID`).
pub const MAX_RESULT_TEXT: usize = 200_000;
/// Calls in progress, in all and per caller (token).
const MAX_LIVE_CALLS: usize = 4096;
const MAX_CALLS_PER_CALLER: usize = 256;
/// Longest string id taken: it is kept while its call runs.
const MAX_ID_BYTES: usize = 256;

/// A request that cannot be answered, as a JSON-RPC error.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("parse error: {0}")]
    Parse(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("method `{0}` not found")]
    NoMethod(String),
    #[error("invalid params: {0}")]
    Params(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
}

impl McpError {
    fn code(&self) -> i64 {
        match self {
            McpError::Parse(_) => -32700,
            McpError::Invalid(_) => -32600,
            McpError::NoMethod(_) => -32601,
            McpError::Params(_) => -32602,
            // Implementation-defined server errors.
            McpError::Forbidden(_) => -32001,
            McpError::Unavailable(_) => -32603,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            McpError::Forbidden(_) => StatusCode::FORBIDDEN,
            McpError::Parse(_) | McpError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::OK,
        }
    }
}

impl From<ApiError> for McpError {
    fn from(e: ApiError) -> Self {
        McpError::Unavailable(e.to_string())
    }
}

struct Mcp {
    sched: SchedulerHandle,
    auth: Arc<Auth>,
    /// (caller, JSON-RPC id) of each call in progress: where
    /// `notifications/cancelled` finds it; with the call's serial number.
    calls: Mutex<Calls>,
    serial: AtomicU64,
}

/// Per (caller, id), the live calls under it (more than one only when a
/// caller reuses an id: then a notification cannot say which it means).
type Calls = HashMap<(String, String), Vec<(u64, CancellationToken)>>;

impl Mcp {
    fn lock_calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type McpState = State<Arc<Mcp>>;

/// The `/mcp` route, merged into the API router (behind its auth check:
/// a viewer may list, an operator call).
pub fn router(sched: SchedulerHandle, auth: Arc<Auth>) -> Router {
    let m = Arc::new(Mcp {
        sched,
        auth,
        calls: Mutex::new(HashMap::new()),
        serial: AtomicU64::new(0),
    });
    Router::new()
        .route(
            "/mcp",
            post(handle)
                .get(no_stream)
                .delete(no_stream)
                .put(no_stream)
                .patch(no_stream),
        )
        .with_state(m)
}

async fn no_stream() -> Response {
    let mut r = (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(
            json!({"error": "this MCP server is stateless: POST JSON-RPC messages to /mcp"}),
        ),
    )
        .into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    r
}

fn reply(id: &Value, result: Value) -> Response {
    json_response(
        StatusCode::OK,
        json!({"jsonrpc": "2.0", "id": id, "result": result}),
    )
}

fn error_reply(id: &Value, e: &McpError) -> Response {
    json_response(e.status(), error_body(id, e))
}

fn error_body(id: &Value, e: &McpError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code(), "message": e.to_string()}})
}

fn json_response(status: StatusCode, v: Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    State(m): McpState,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let null = Value::Null;
    let version = match headers.get("mcp-protocol-version") {
        None => ASSUMED_VERSION.to_string(),
        Some(v) => match v.to_str().ok().filter(|v| VERSIONS.contains(v)) {
            Some(v) => v.to_string(),
            None => {
                let e = McpError::Invalid(format!(
                    "MCP-Protocol-Version {:?} is not one this server speaks ({})",
                    String::from_utf8_lossy(v.as_bytes()),
                    VERSIONS.join(", ")
                ));
                return error_reply(&null, &e);
            }
        },
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let e = McpError::Invalid(format!("the body is over {MAX_BODY} bytes"));
            return json_response(StatusCode::PAYLOAD_TOO_LARGE, error_body(&null, &e));
        }
        Err(e) => {
            return error_reply(
                &null,
                &McpError::Parse(format!("cannot read the body: {e}")),
            )
        }
    };
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_reply(&null, &McpError::Parse(format!("not JSON: {e}"))),
    };
    let Value::Object(obj) = &msg else {
        let why = if msg.is_array() {
            "batches are not supported: send one message per request"
        } else {
            "a message must be a JSON object"
        };
        return error_reply(&null, &McpError::Invalid(why.into()));
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return error_reply(
            obj.get("id").unwrap_or(&null),
            &McpError::Invalid("`jsonrpc` must be \"2.0\"".into()),
        );
    }
    if obj.get("id").is_some() && obj.get("method").is_some_and(|m| !m.is_string()) {
        return error_reply(
            &null,
            &McpError::Invalid("`method` must be a string".into()),
        );
    }
    let method = obj.get("method").and_then(Value::as_str);
    let Some(id) = obj.get("id").filter(|_| method.is_some()) else {
        // A notification or a response: accepted, nothing to answer.
        if method == Some("notifications/cancelled") {
            cancelled(&m, &caller, obj.get("params"));
        }
        return StatusCode::ACCEPTED.into_response();
    };
    if !(id.is_string() || id.is_i64() || id.is_u64()) {
        return error_reply(
            &null,
            &McpError::Invalid("`id` must be a string or an integer".into()),
        );
    }
    if id.as_str().is_some_and(|s| s.len() > MAX_ID_BYTES) {
        return error_reply(
            &null,
            &McpError::Invalid(format!("`id` is longer than {MAX_ID_BYTES} bytes")),
        );
    }
    let method = method.unwrap_or_default();
    let params = obj.get("params").cloned().unwrap_or(json!({}));
    if !params.is_object() {
        return error_reply(id, &McpError::Params("`params` must be an object".into()));
    }
    let r = match method {
        "initialize" => Ok(initialize(&params)),
        "ping" => Ok(json!({})),
        "tools/list" => list(&m, &params).await,
        "tools/call" => {
            let sse = accepts_sse(&headers);
            return call(m, caller, id.clone(), params, &version, sse).await;
        }
        other => Err(McpError::NoMethod(other.chars().take(100).collect())),
    };
    match r {
        Ok(v) => reply(id, v),
        Err(e) => error_reply(id, &e),
    }
}

fn accepts_sse(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

fn initialize(params: &Value) -> Value {
    // The client's version if we speak it, else our newest: the client
    // then decides whether it can go on.
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = asked
        .and_then(|a| VERSIONS.iter().find(|v| **v == a))
        .unwrap_or(&VERSIONS[0]);
    json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {
            "name": "openclaw",
            "title": "OpenClaw fleet",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "instructions": "Each tool is one plugin on one device of the fleet, named \
            plugin__device. A call runs as a task on that device; its result is the \
            plugin's JSON output.",
    })
}

/// Cancels the caller's call that `params.requestId` names, if it runs.
fn cancelled(m: &Mcp, caller: &Caller, params: Option<&Value>) {
    let Some(rid) = params.and_then(|p| p.get("requestId")) else {
        return;
    };
    let key = (caller.name(), rid.to_string());
    let rid: String = rid.to_string().chars().take(MAX_ID_BYTES).collect();
    match m.lock_calls().get(&key).map(Vec::as_slice) {
        Some([(_, t)]) => {
            log::info!("MCP: call {rid} cancelled by its client");
            t.cancel();
        }
        Some([_, _, ..]) => {
            log::warn!(
                "MCP: {} has several calls with id {rid}; none cancelled",
                caller.name()
            )
        }
        _ => {}
    }
}

/// The tools of the online devices; `devices` of all.
async fn fleet(m: &Mcp, online_only: bool) -> Result<(Vec<FleetTool>, Vec<String>), McpError> {
    let d = m.sched.ask(|resp| Command::Devices { resp }).await?;
    let online: Vec<String> = d
        .iter()
        .filter(|d| d.online)
        .map(|d| d.id.clone())
        .collect();
    let tools = tools::fleet(
        d.iter()
            .filter(|d| d.online || !online_only)
            .filter_map(|d| Some((d.id.as_str(), d.tools.as_deref()?))),
    );
    Ok((tools, online))
}

async fn list(m: &Mcp, params: &Value) -> Result<Value, McpError> {
    let after = match params.get("cursor") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) => Some(c.clone()),
        Some(_) => return Err(McpError::Params("`cursor` must be a string".into())),
    };
    let (all, _) = fleet(m, true).await?;
    let rest: Vec<&FleetTool> = all
        .iter()
        .filter(|t| after.as_ref().is_none_or(|a| t.name.as_str() > a.as_str()))
        .collect();
    let page: Vec<Value> = rest.iter().take(PAGE).map(|t| describe(t)).collect();
    let mut out = json!({ "tools": page });
    if rest.len() > PAGE {
        out["nextCursor"] = json!(rest[PAGE - 1].name);
    }
    Ok(out)
}

/// A tool as MCP lists it.
fn describe(t: &FleetTool) -> Value {
    // Arguments are always an object in MCP: a plugin whose input is not
    // one is listed with an open object schema and checked on call.
    let object = match t.input_schema.get("type") {
        Some(Value::String(s)) => s == "object",
        Some(Value::Array(a)) => a.iter().any(|k| k == "object"),
        _ => false,
    };
    // `type` is exactly "object" (clients check it): the other kinds of a
    // list (`["object", "null"]`) cannot be MCP arguments anyway.
    let schema = if object {
        let mut s = t.input_schema.clone();
        s["type"] = json!("object");
        s
    } else {
        json!({"type": "object"})
    };
    let mut description = t.description.clone();
    if !description.is_empty() {
        description.push(' ');
    }
    description.push_str(&format!("(plugin `{}` on device `{}`)", t.plugin, t.device));
    let reads_only = t.effects == Effects::None;
    json!({
        "name": t.name,
        "title": format!("{} on {}", t.plugin, t.device),
        "description": description,
        "inputSchema": schema,
        "annotations": {
            "readOnlyHint": reads_only,
            "destructiveHint": !reads_only,
            "openWorldHint": matches!(t.plugin.as_str(), "http" | "publish"),
        },
        "_meta": {
            "openclaw/plugin": t.plugin,
            "openclaw/device": t.device,
            "openclaw/version": t.version,
        },
    })
}

/// Takes a call out of the cancellation map when dropped, and cancels its
/// task if that was not disarmed (the handler's future dropped: its
/// client went away).
struct Pending {
    m: Arc<Mcp>,
    key: (String, String),
    serial: u64,
    task: Option<String>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        {
            // Unless a newer call under the same id took the entry.
            let mut calls = self.m.lock_calls();
            if let Some(v) = calls.get_mut(&self.key) {
                v.retain(|(n, _)| *n != self.serial);
                if v.is_empty() {
                    calls.remove(&self.key);
                }
            }
        }
        if let Some(id) = self.task.take() {
            log::info!("task {id}: its MCP client went away; cancelling it");
            cancel_later(self.m.sched.clone(), id);
        }
    }
}

fn tool_error(text: String) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": true})
}

async fn call(
    m: Arc<Mcp>,
    caller: Caller,
    id: Value,
    params: Value,
    version: &str,
    sse: bool,
) -> Response {
    if caller.role < Role::Operator {
        let e = McpError::Forbidden(format!(
            "{} may list tools but not call them: that takes an operator token",
            caller.name()
        ));
        return error_reply(&id, &e);
    }
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return error_reply(
            &id,
            &McpError::Params("`name` (a string) is missing".into()),
        );
    };
    let args = match params.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => {
            return error_reply(
                &id,
                &McpError::Params("`arguments` must be an object".into()),
            )
        }
    };
    // The name as tools/list gives it (online devices), else as it was
    // (a device gone since) for a clear error.
    let (listed, _) = match fleet(&m, true).await {
        Ok(f) => f,
        Err(e) => return error_reply(&id, &e),
    };
    let found = listed.into_iter().find(|t| t.name == name);
    let (all, online) = match found {
        Some(_) => (Vec::new(), Vec::new()),
        None => match fleet(&m, false).await {
            Ok(f) => f,
            Err(e) => return error_reply(&id, &e),
        },
    };
    let offline = found.is_none();
    let unknown = || {
        let e = McpError::Params(format!(
            "unknown tool `{}`: tools/list names the ones there are",
            name.escape_debug()
                .to_string()
                .chars()
                .take(100)
                .collect::<String>()
        ));
        error_reply(&id, &e)
    };
    let Some(tool) = found.or_else(|| all.into_iter().find(|t| t.name == name)) else {
        return unknown();
    };
    if offline {
        if online.contains(&tool.device) {
            // Named only among all devices' tools though its device is
            // online: tools/list left it out (a name two tools share there).
            return unknown();
        }
        let text = format!(
            "device `{}` is offline: tool `{}` cannot run until it is back",
            tool.device, tool.name
        );
        return reply(&id, tool_error(text));
    }
    if let Err(why) = super::runs::prompt::check_input(&tool, &args) {
        return reply(&id, tool_error(why.replace("`input`", "`arguments`")));
    }
    let key = (caller.name(), id.to_string());
    let token = CancellationToken::new();
    let serial = m.serial.fetch_add(1, Ordering::Relaxed);
    {
        let mut calls = m.lock_calls();
        let live: usize = calls.values().map(Vec::len).sum();
        let mine: usize = calls
            .iter()
            .filter(|((c, _), _)| *c == key.0)
            .map(|(_, v)| v.len())
            .sum();
        // One caller cannot take every slot from the others.
        if live >= MAX_LIVE_CALLS || mine >= MAX_CALLS_PER_CALLER {
            drop(calls);
            let e = McpError::Unavailable(format!(
                "{} MCP calls are in progress ({mine} of them {}'s, at most \
                 {MAX_CALLS_PER_CALLER} each, {MAX_LIVE_CALLS} in all); retry later",
                live,
                caller.name()
            ));
            return error_reply(&id, &e);
        }
        calls
            .entry(key.clone())
            .or_default()
            .push((serial, token.clone()));
    }
    let mut pending = Pending {
        m: m.clone(),
        key,
        serial,
        task: None,
    };
    let slot = match m.auth.reserve_audit(&caller) {
        Ok(s) => s,
        Err(e) => return error_reply(&id, &McpError::Unavailable(e)),
    };
    let task = match submit(&m.sched, &tool, args, slot).await {
        Ok(t) => t,
        Err(e) => return reply(&id, tool_error(format!("not submitted: {e}"))),
    };
    pending.task = Some(task.clone());
    let structured = version >= STRUCTURED_SINCE;
    if !sse {
        let done = tokio::select! {
            t = wait_terminal(&m.sched, &task) => t,
            () = token.cancelled() => {
                // Dropping `pending` cancels the task.
                return error_reply(&id, &McpError::Invalid("the request was cancelled".into()));
            }
        };
        pending.task = None;
        return match done {
            Ok(t) => reply(&id, tool_result(&t, &tool, structured)),
            Err(e) => error_reply(&id, &e),
        };
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let stream = CallStream {
        tx,
        id,
        tool,
        structured,
        token,
    };
    tokio::spawn(stream.run(pending, task));
    ChannelBody::event_stream(rx)
}

/// Submits the tool's task and writes its audit row; the two go together
/// even if the client goes away meanwhile.
async fn submit(
    sched: &SchedulerHandle,
    tool: &FleetTool,
    args: Value,
    slot: AuditSlot,
) -> Result<String, ApiError> {
    let mut req = SubmitRequest::new(tool.plugin.clone(), args);
    req.target = Some(tool.device.clone());
    req.timeout_ms = Some(CALL_TIMEOUT_MS);
    if tool.effects != Effects::None {
        // Not run twice behind the client's back when its device is lost
        // midway: the client hears it failed and decides.
        req.max_attempts = Some(1);
    }
    let name = tool.name.clone();
    super::http::submit_followed(sched, req, slot, "mcp.call", move |id| {
        format!("{name} (task {id})")
    })
    .await
}

/// Waits for the task to end: its own timeout bounds it.
async fn wait_terminal(sched: &SchedulerHandle, id: &str) -> Result<TaskView, McpError> {
    loop {
        match super::http::wait_for(sched, id, KEEP_ALIVE).await {
            Ok(Some(t)) if t.state.is_terminal() => return Ok(t),
            Ok(Some(_)) => {}
            Ok(None) => return Err(McpError::Unavailable(format!("task {id} is gone"))),
            // Shutting down: the call cannot end here.
            Err(e) if sched.sender().is_closed() => return Err(e.into()),
            // The scheduler busy: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The reply to a call whose task ended.
fn tool_result(t: &TaskView, tool: &FleetTool, structured: bool) -> Value {
    let meta = json!({"openclaw/task": t.id, "openclaw/device": tool.device});
    if t.state != TaskState::Succeeded {
        let why = t.error.clone().unwrap_or_default();
        let state = serde_json::to_value(t.state).unwrap_or_default();
        let mut r = tool_error(format!(
            "task {} on `{}` {}: {why}",
            t.id,
            tool.device,
            state.as_str().unwrap_or("ended")
        ));
        r["_meta"] = meta;
        return r;
    }
    let result = t.result.clone().unwrap_or(Value::Null);
    let text = result.to_string();
    if text.len() > MAX_RESULT_TEXT {
        return json!({
            "content": [{"type": "text", "text": format!(
                "the result is {} bytes, more than the {MAX_RESULT_TEXT} a reply here carries; \
                 it is stored whole as task {} (GET /v1/tasks/{})",
                text.len(), t.id, t.id
            )}],
            "isError": false,
            "_meta": meta,
        });
    }
    let mut r = json!({
        "content": [{"type": "text", "text": text}],
        "isError": false,
        "_meta": meta,
    });
    if structured && result.is_object() {
        r["structuredContent"] = result;
    }
    r
}

/// One call's reply as server-sent events.
struct CallStream {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    id: Value,
    tool: FleetTool,
    structured: bool,
    token: CancellationToken,
}

impl CallStream {
    async fn send(&self, b: Bytes) -> bool {
        send_event(&self.tx, b, &format!("MCP call {}", self.id)).await
    }

    async fn run(self, mut pending: Pending, task: String) {
        let sched = pending.m.sched.clone();
        let done = loop {
            let got = tokio::select! {
                r = super::http::wait_for(&sched, &task, KEEP_ALIVE) => r,
                () = self.token.cancelled() => return, // `pending` cancels the task
                () = self.tx.closed() => return,
            };
            match got {
                Ok(Some(t)) if t.state.is_terminal() => break Ok(t),
                Ok(Some(_)) => {}
                Ok(None) => break Err(McpError::Unavailable(format!("task {task} is gone"))),
                Err(e) if sched.sender().is_closed() => break Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            if !self.send(Bytes::from_static(b": working\n\n")).await {
                return;
            }
        };
        pending.task = None;
        let body = match done {
            Ok(t) => {
                json!({"jsonrpc": "2.0", "id": self.id, "result": tool_result(&t, &self.tool, self.structured)})
            }
            Err(e) => error_body(&self.id, &e),
        };
        self.send(Bytes::from(format!("event: message\ndata: {body}\n\n")))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(schema: Value, effects: Effects) -> FleetTool {
        FleetTool {
            name: "gpio__pi-1".into(),
            plugin: "gpio".into(),
            device: "pi-1".into(),
            description: "Pins.".into(),
            input_schema: schema,
            effects,
            version: "1".into(),
        }
    }

    #[test]
    fn tools_are_listed_with_object_schemas_and_hints() {
        let t = describe(&tool(
            json!({"type": ["object", "null"], "required": ["op"]}),
            Effects::Always,
        ));
        assert_eq!(
            t["inputSchema"],
            json!({"type": "object", "required": ["op"]})
        );
        assert_eq!(t["annotations"]["destructiveHint"], true);
        assert_eq!(t["annotations"]["readOnlyHint"], false);
        assert!(t["description"]
            .as_str()
            .unwrap()
            .contains("plugin `gpio` on device `pi-1`"));
        let t = describe(&tool(json!({"type": "string"}), Effects::None));
        assert_eq!(t["inputSchema"], json!({"type": "object"}));
        assert_eq!(t["annotations"]["readOnlyHint"], true);
    }

    #[test]
    fn results_are_capped_and_structured_only_where_the_version_has_it() {
        let mut t = TaskView {
            id: "t1".into(),
            plugin: "gpio".into(),
            state: TaskState::Succeeded,
            priority: 5,
            target: None,
            capability: None,
            device: Some("pi-1".into()),
            attempts: 1,
            max_attempts: 1,
            timeout_ms: 1,
            input: Value::Null,
            result: Some(json!({"level": 1})),
            error: None,
            created_ms: 0,
            dispatched_ms: None,
            started_ms: None,
            finished_ms: None,
            output: None,
            route: Default::default(),
            placement: None,
        };
        let g = tool(json!({}), Effects::None);
        let r = tool_result(&t, &g, true);
        assert_eq!(r["structuredContent"], json!({"level": 1}));
        assert_eq!(r["content"][0]["text"], "{\"level\":1}");
        assert_eq!(r["_meta"]["openclaw/task"], "t1");
        assert!(tool_result(&t, &g, false)
            .get("structuredContent")
            .is_none());
        t.result = Some(json!({"big": "x".repeat(MAX_RESULT_TEXT)}));
        let r = tool_result(&t, &g, true);
        assert!(r.get("structuredContent").is_none());
        let text = r["content"][0]["text"].as_str().unwrap();
        assert!(text.contains("GET /v1/tasks/t1"), "{text}");
        assert!(r.to_string().len() < 1000);
        t.state = TaskState::Failed;
        t.error = Some("InvalidInput: no pin".into());
        let r = tool_result(&t, &g, true);
        assert_eq!(r["isError"], true);
        assert!(r["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("failed: InvalidInput: no pin"));
    }

    #[test]
    fn initialize_answers_the_clients_version_or_the_newest() {
        let r = initialize(&json!({"protocolVersion": "2025-06-18"}));
        assert_eq!(r["protocolVersion"], "2025-06-18");
        let r = initialize(&json!({"protocolVersion": "1999-01-01"}));
        assert_eq!(r["protocolVersion"], VERSIONS[0]);
        assert_eq!(r["capabilities"]["tools"]["listChanged"], false);
    }
}
