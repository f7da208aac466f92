//! The workflow routes: `POST /v1/workflows/runs`, `GET
//! /v1/workflows/runs[?limit=N]`, `GET /v1/workflows/runs/{id}[?wait_ms=N]`,
//! `GET /v1/workflows/runs/{id}/events` (server-sent events), `POST
//! /v1/workflows/runs/{id}/cancel`, and `POST
//! /v1/workflows/runs/{id}/approve` and `/deny` (`?step=ID` when more than
//! one step awaits approval).

use super::runner::{StepView, Workflows};
use super::{DefinitionError, Workflow, MAX_FILE_BYTES};
use crate::server::auth::{Auth, Caller};
use crate::server::openai::send_event;
use crate::server::scheduler::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value as J};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

type WState = State<(Workflows, Arc<Auth>)>;

/// `POST /v1/workflows/runs` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// The file's TOML text, or its data as a JSON object.
    workflow: J,
    #[serde(default)]
    inputs: Map<String, J>,
}

/// The routes (see the module's head).
pub fn router(w: Workflows, auth: Arc<Auth>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/workflows/runs", post(create).get(list))
        .route("/v1/workflows/runs/{id}", get(one))
        .route("/v1/workflows/runs/{id}/events", get(events))
        .route("/v1/workflows/runs/{id}/cancel", post(cancel))
        .route("/v1/workflows/runs/{id}/approve", post(approve))
        .route("/v1/workflows/runs/{id}/deny", post(deny))
        .with_state((w, auth))
}

async fn create(
    State((w, auth)): WState,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
    // The file plus its inputs and the JSON around them.
    if body.len() > 2 * MAX_FILE_BYTES {
        return Err(ApiError::TooLarge(format!(
            "the request is {} bytes; at most {}",
            body.len(),
            2 * MAX_FILE_BYTES
        )));
    }
    let req: StartRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid workflow run request: {e}")))?;
    let bad = |e: DefinitionError| ApiError::BadRequest(e.to_string());
    let wf = match req.workflow {
        J::String(text) => Workflow::parse_toml(&text).map_err(bad)?,
        v @ J::Object(_) => {
            if v.to_string().len() > MAX_FILE_BYTES {
                return Err(bad(DefinitionError::TooLarge {
                    bytes: v.to_string().len(),
                    max: MAX_FILE_BYTES,
                }));
            }
            Workflow::from_json(v).map_err(bad)?
        }
        _ => {
            return Err(ApiError::BadRequest(
                "`workflow`: the file's TOML text, or its data as a JSON object".into(),
            ))
        }
    };
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let view = crate::server::http::detached(async move {
        let v = w.start(wf, req.inputs).await?;
        slot.record("workflow.run", &format!("{} ({})", v.id, v.name));
        Ok(v)
    })
    .await?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({"id": view.id, "state": view.state})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
}

async fn list(
    State((w, _)): WState,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let runs = w.list(q.limit.unwrap_or(100).clamp(1, 1000)).await?;
    Ok(Json(json!({ "runs": runs })).into_response())
}

async fn one(
    State((w, _)): WState,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let v = match q.wait_ms {
        Some(ms) => w.wait(&id, Duration::from_millis(ms.min(60_000))).await?,
        None => w.get(&id).await?,
    };
    match v {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::NotFound(format!("no workflow run `{id}`"))),
    }
}

async fn cancel(
    State((w, auth)): WState,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let v = crate::server::http::detached(async move {
        let v = w.cancel(&id).await?;
        slot.record("workflow.cancel", &id);
        Ok(v)
    })
    .await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepQuery {
    step: Option<String>,
}

async fn decision(
    w: Workflows,
    auth: Arc<Auth>,
    caller: Caller,
    id: String,
    q: Result<Query<StepQuery>, axum::extract::rejection::QueryRejection>,
    approve: bool,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let by = caller.token.clone().unwrap_or_else(|| "(auth off)".into());
    let action = if approve {
        "workflow.approve"
    } else {
        "workflow.deny"
    };
    let v = crate::server::http::detached(async move {
        let (v, step) = w.decide(&id, q.step, approve, by).await?;
        let what = match step {
            Some(s) => format!("{id} step {s}"),
            None => id.clone(),
        };
        slot.record(action, &what);
        Ok(v)
    })
    .await?;
    Ok(Json(v).into_response())
}

async fn approve(
    State((w, auth)): WState,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<StepQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    decision(w, auth, caller, id, q, true).await
}

async fn deny(
    State((w, auth)): WState,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<StepQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    decision(w, auth, caller, id, q, false).await
}

/// Server-sent events: `step` (a step's view) each time a step changes,
/// then `end` with the whole run.
async fn events(State((w, _)): WState, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let live = w.watch(&id);
    let first = match &live {
        Some(l) => l.borrow().clone(),
        None => w
            .get(&id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no workflow run `{id}`")))?,
    };
    tokio::spawn(async move {
        let ev = |name: &str, data: &J| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        let mut sent: Vec<Option<StepView>> = vec![None; first.steps.len()];
        let mut view = first;
        let mut live = live;
        loop {
            for (i, s) in view.steps.iter().enumerate() {
                if sent.get(i).is_some_and(|x| x.as_ref() != Some(s)) {
                    let j = serde_json::to_value(s).unwrap_or(J::Null);
                    if !send_event(&tx, ev("step", &j), "workflow run events").await {
                        return;
                    }
                    sent[i] = Some(s.clone());
                }
            }
            if view.state.is_terminal() {
                let j = serde_json::to_value(&view).unwrap_or(J::Null);
                send_event(&tx, ev("end", &j), "workflow run events").await;
                return;
            }
            let Some(l) = live.as_mut() else { return };
            // A client gone while nothing changes ends this task too.
            let changed = tokio::select! {
                r = l.changed() => r,
                () = tx.closed() => return,
            };
            if changed.is_err() {
                match w.get(&view.id).await {
                    Ok(Some(v)) if v.state.is_terminal() => {
                        view = v;
                        live = None;
                        continue;
                    }
                    _ => return, // the server is stopping
                }
            }
            view = l.borrow_and_update().clone();
        }
    });
    let mut resp = Response::new(axum::body::Body::new(crate::server::openai::ChannelBody(
        rx,
    )));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}
