//! The HTTP API (axum). Every error is JSON `{"error": "..."}` with a 4xx/5xx code.

use super::scheduler::{ApiError, Command, SchedulerHandle};
use crate::protocol::api::{ErrorBody, SubmitRequest, TaskState};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::time::Duration;

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

/// The API router.
pub fn router(handle: SchedulerHandle, max_body: usize) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/tasks", get(list).post(submit))
        .route("/v1/tasks/{id}", get(task).delete(cancel))
        .route("/v1/devices", get(devices))
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
        .with_state((handle, max_body))
}

type AppState = State<(SchedulerHandle, usize)>;

async fn health(State((h, _)): AppState) -> Result<Response, ApiError> {
    let health = h.ask(|resp| Command::Health { resp }).await?;
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
    State((h, max_body)): AppState,
    q: Result<Query<SubmitQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("body exceeds the limit of {max_body} bytes"))
        }
        _ => ApiError::BadRequest(format!("cannot read the body: {e}")),
    })?;
    let req: SubmitRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if req.reply_to.is_some() || req.correlation.is_some() {
        return Err(ApiError::BadRequest(
            "`reply_to` and `correlation` are for MQTT submissions only".into(),
        ));
    }
    let resp = h.ask(|resp| Command::Submit { req, resp }).await??;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(300_000));
    if wait.is_zero() {
        return Ok((StatusCode::ACCEPTED, Json(resp)).into_response());
    }
    // One request instead of a submit and a long poll. 200 once terminal,
    // 202 with the current view if the wait ran out first.
    match wait_for(&h, &resp.id, wait).await? {
        Some(v) if v.state.is_terminal() => Ok(Json(v).into_response()),
        Some(v) => Ok((StatusCode::ACCEPTED, Json(v)).into_response()),
        None => Ok((StatusCode::ACCEPTED, Json(resp)).into_response()),
    }
}

/// Waits up to `wait` for a task to be terminal; its view then (or the
/// current one when the wait ran out), `None` if it does not exist.
async fn wait_for(
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
    State((h, _)): AppState,
    Path(id): Path<String>,
    q: Result<Query<TaskQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(300_000));
    let found = if wait.is_zero() {
        h.ask(|resp| Command::Get {
            id: id.clone(),
            resp,
        })
        .await??
    } else {
        wait_for(&h, &id, wait).await?
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
}

async fn list(
    State((h, _)): AppState,
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
    let limit = q.limit.unwrap_or(100).min(10_000);
    let tasks = h.ask(|resp| Command::List { state, limit, resp }).await??;
    Ok(Json(tasks).into_response())
}

async fn cancel(State((h, _)): AppState, Path(id): Path<String>) -> Result<Response, ApiError> {
    let v = h.ask(|resp| Command::Cancel { id, resp }).await??;
    Ok(Json(v).into_response())
}

async fn devices(State((h, _)): AppState) -> Result<Response, ApiError> {
    let d = h.ask(|resp| Command::Devices { resp }).await?;
    Ok(Json(d).into_response())
}

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid query string: {}", e.body_text()))
}
