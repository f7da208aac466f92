//! Agent runs: a language model on a heavy node plans through the fleet's
//! plugins. `POST /v1/agent/runs` takes a goal, a model and the plugins it
//! may use; the server runs the loop: the model's reply (held to a call of
//! one of the run's tools or a final answer by a JSON schema, see
//! [`prompt`]) becomes a task on the device that offers the tool, routed
//! like any other, and the result goes back to the model, until it
//! answers or a budget runs out.
//!
//! Every step is written to `DATA/runs.db` before the next one starts,
//! and a tool call's task id as soon as it exists: a run survives a server
//! restart and resumes from its last stored step, waiting for a task
//! already submitted rather than submitting it again. (A crash between a
//! submission and the write of its id, a few milliseconds, submits that
//! one call again on resume.)
//!
//! A call whose plugin changes the world ([`crate::schema::Effects`]) waits
//! in `awaiting_approval` unless the run lists the plugin in `allow`;
//! `POST /v1/agent/runs/{id}/approve[?approval=N]` or `/deny` decide it.

pub mod prompt;
pub(crate) mod store;

use super::auth::{Auth, Caller};
use super::openai::{send_event, LLM_CAPABILITY};
use super::scheduler::{ApiError, Command, SchedulerHandle};
use super::tools::{self, FleetTool};
use crate::llm::{ChatRequest, Completion, JsonSchemaSpec, ResponseFormat};
use crate::protocol::api::{SubmitRequest, TaskState, TaskView};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as J};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::RunStore;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use store::RunsError;

/// Default and most tool calls of one run.
pub const DEFAULT_MAX_STEPS: u32 = 8;
pub const MAX_STEPS: u32 = 64;
/// Default and most tokens of one model reply.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
pub const MAX_TOKENS: u32 = 8192;
/// Default and longest run, from its submission.
pub const DEFAULT_TIMEOUT_MS: u64 = 10 * 60 * 1000;
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Longest goal, in bytes.
pub const MAX_GOAL_BYTES: usize = 16 * 1024;
/// Invalid replies in a row before the run fails.
pub const MAX_INVALID_REPLIES: usize = 3;
/// Runs in progress at once (running or awaiting approval).
pub const MAX_LIVE_RUNS: usize = 1024;

/// `POST /v1/agent/runs` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub goal: String,
    pub model: String,
    /// Plugin names the model may call.
    pub tools: Vec<String>,
    /// Only this device's plugins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Only plugins of devices advertising this capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Plugins whose world-changing calls need no approval.
    #[serde(default)]
    pub allow: Vec<String>,
    /// `auto` (default): the model calls tools or answers; `required`: its
    /// first reply must be a call (OpenAI's `tool_choice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<String>,
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    AwaitingApproval,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }
    fn parse(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "awaiting_approval" => RunState::AwaitingApproval,
            "succeeded" => RunState::Succeeded,
            "cancelled" => RunState::Cancelled,
            _ => RunState::Failed,
        }
    }
}

/// A call of a tool: which plugin on which device, with what input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub tool: String,
    pub plugin: String,
    pub device: String,
    pub arguments: J,
}

/// A person's word on a call that changes the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Pending,
    Approved,
    Denied,
}

/// One stored step of a run (`kind` in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A model reply: its task, then its text; `error` when the reply was
    /// refused (not JSON, a tool not allowed, input its schema refuses).
    Llm {
        n: u32,
        task_id: Option<String>,
        output: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default)]
        answer_only: bool,
        #[serde(default)]
        prompt_tokens: u32,
        #[serde(default)]
        completion_tokens: u32,
    },
    /// A call that became (or is becoming) a task on its device.
    ToolCall {
        n: u32,
        tool: String,
        plugin: String,
        device: String,
        arguments: J,
        task_id: Option<String>,
    },
    ToolResult {
        n: u32,
        tool: String,
        device: String,
        task_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<J>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A world-changing call waiting for, or given, a decision.
    Approval {
        n: u32,
        call: Call,
        decision: Decision,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
}

impl Step {
    fn n(&self) -> u32 {
        match self {
            Step::Llm { n, .. }
            | Step::ToolCall { n, .. }
            | Step::ToolResult { n, .. }
            | Step::Approval { n, .. } => *n,
        }
    }
}

/// A run as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub state: RunState,
    pub goal: String,
    pub model: String,
    /// The tools it was given (names as the model sees them).
    pub tools: Vec<String>,
    pub answer: Option<String>,
    pub error: Option<String>,
    pub steps: Vec<Step>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A run in progress: its view (watched by waiting requests and event
/// streams), the way to its approvals, and its cancel.
struct Live {
    view: watch::Sender<RunView>,
    /// Decisions, each naming the approval step it answers: one meant for
    /// an earlier approval (a duplicate that arrived late) is dropped.
    decide: mpsc::Sender<Decided>,
    /// The approval step a decision was sent for: a second decision on it
    /// is a conflict, not a decision on whatever is asked next.
    decided: Option<u32>,
    cancel: CancellationToken,
}

/// A decision sent to a run's driver: (approval step, decision, by whom).
type Decided = (u32, Decision, Option<String>);

struct Inner {
    store: Mutex<RunStore>,
    sched: SchedulerHandle,
    live: Mutex<HashMap<String, Live>>,
    /// Runs being stored, not yet in `live` (see [`Starting`]).
    starting: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

/// The agent runs of a server.
#[derive(Clone)]
pub struct Runs(Arc<Inner>);

/// What a run's driver keeps besides its view.
struct Plan {
    id: String,
    req: RunRequest,
    tools: Vec<FleetTool>,
    created_ms: u64,
}

impl Runs {
    /// Opens `DATA/runs.db` and resumes every run that was in progress.
    pub fn open(
        data_dir: &Path,
        sched: SchedulerHandle,
        shutdown: CancellationToken,
    ) -> Result<Runs, RunsError> {
        let store = RunStore::open(data_dir)?;
        let open = store.open_runs()?;
        let runs = Runs(Arc::new(Inner {
            store: Mutex::new(store),
            sched,
            live: Mutex::new(HashMap::new()),
            starting: Arc::default(),
            shutdown,
        }));
        for (view, req, tools) in open {
            log::info!(
                "agent run {}: resuming after {} stored step(s)",
                view.id,
                view.steps.len()
            );
            runs.spawn(view, req, tools);
        }
        Ok(runs)
    }

    /// Deletes runs that ended more than `retention_ms` ago (the tasks'
    /// `scheduler.retention_ms`), every minute; 0 keeps them.
    pub fn keep(&self, retention_ms: u64) {
        let r = self.clone();
        sweep_ended(
            "agent run(s)",
            retention_ms,
            &self.0.shutdown,
            move |cutoff| {
                let r = r.clone();
                async move {
                    r.blocking(move |s| s.prune(cutoff, store::PRUNE_BATCH))
                        .await
                }
            },
        );
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.0.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks and starts a run; its view.
    pub async fn start(&self, req: RunRequest) -> Result<RunView, ApiError> {
        check_request(&req)?;
        let devices = self.0.sched.ask(|resp| Command::Devices { resp }).await?;
        let served = devices.iter().filter(|d| d.online).any(|d| {
            d.capabilities
                .contains(&format!("{LLM_CAPABILITY}{}", req.model))
        });
        if !served {
            return Err(ApiError::NotFound(format!(
                "model `{}`: no online node serves it",
                req.model
            )));
        }
        let offered = tools::fleet(
            devices
                .iter()
                .filter(|d| d.online)
                .filter(|d| req.target.as_ref().is_none_or(|t| *t == d.id))
                .filter(|d| {
                    req.capability
                        .as_ref()
                        .is_none_or(|c| d.capabilities.contains(c))
                })
                .filter_map(|d| Some((d.id.as_str(), d.tools.as_deref()?))),
        );
        let tools: Vec<FleetTool> = offered
            .into_iter()
            .filter(|t| req.tools.contains(&t.plugin))
            .collect();
        for want in &req.tools {
            if !tools.iter().any(|t| &t.plugin == want) {
                let r#where = match (&req.target, &req.capability) {
                    (Some(t), _) => format!("device `{t}`"),
                    (None, Some(c)) => format!("any online device with capability `{c}`"),
                    (None, None) => "any online device".into(),
                };
                return Err(ApiError::BadRequest(format!(
                    "`tools`: plugin `{want}` is not offered by {where} (that has sent its catalog)"
                )));
            }
        }
        let slot = {
            let live = self.lock_live();
            Starting::take(&self.0.starting, live.len(), MAX_LIVE_RUNS, "agent runs")?
        };
        let id = new_id("run");
        let now = crate::now_ms();
        let view = RunView {
            id: id.clone(),
            state: RunState::Running,
            goal: req.goal.clone(),
            model: req.model.clone(),
            tools: tools.iter().map(|t| t.name.clone()).collect(),
            answer: None,
            error: None,
            steps: Vec::new(),
            created_ms: now,
            updated_ms: now,
        };
        // Stored and started on a task of its own: a client that goes away
        // meanwhile cannot leave a stored run that nothing drives.
        let this = self.clone();
        let v = view.clone();
        tokio::spawn(async move {
            let _slot = slot;
            {
                let (v, r, t) = (v.clone(), req.clone(), tools.clone());
                this.blocking(move |s| s.create(&v, &r, &t)).await?;
            }
            log::info!(
                "agent run {}: started with model {} and tools {}",
                v.id,
                req.model,
                v.tools.join(", ")
            );
            this.spawn(v, req, tools);
            Ok::<_, ApiError>(())
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))??;
        Ok(view)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RunStore) -> Result<T, RunsError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let s = inner.store.lock().unwrap_or_else(|p| p.into_inner());
            f(&s)
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("agent run store: {e}")))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    fn spawn(&self, view: RunView, req: RunRequest, tools: Vec<FleetTool>) {
        let (view_tx, _) = watch::channel(view.clone());
        let (dtx, drx) = mpsc::channel(4);
        let cancel = self.0.shutdown.child_token();
        self.lock_live().insert(
            view.id.clone(),
            Live {
                view: view_tx.clone(),
                decide: dtx,
                decided: None,
                cancel: cancel.clone(),
            },
        );
        let plan = Plan {
            id: view.id.clone(),
            req,
            tools,
            created_ms: view.created_ms,
        };
        let runs = self.clone();
        tokio::spawn(async move {
            let id = plan.id.clone();
            let end = runs.drive(&plan, view.steps, &view_tx, drx, &cancel).await;
            let shutting_down = runs.0.shutdown.is_cancelled();
            match end {
                // Stopped by the server's shutdown: left as stored, resumed
                // at the next start.
                Err(Stop::Shutdown) => {}
                Err(Stop::Store(e)) => {
                    log::error!("agent run {id}: stopped: {e}; it resumes at the next start")
                }
                Ok((state, answer, error)) if !shutting_down || state.is_terminal() => {
                    let (i, a, e) = (id.clone(), answer.clone(), error.clone());
                    match runs
                        .blocking(move |s| s.finish(&i, state, a.as_deref(), e.as_deref()))
                        .await
                    {
                        // Ended first by a stored cancel: that end is shown.
                        Ok(false) => {
                            let i = id.clone();
                            if let Ok(Some(v)) = runs.blocking(move |s| s.get(&i)).await {
                                log::info!("agent run {id}: {}", v.state.as_str());
                                view_tx.send_replace(v);
                                runs.lock_live().remove(&id);
                                return;
                            }
                        }
                        Ok(true) => {}
                        Err(err) => log::error!("agent run {id}: its end not stored: {err}"),
                    }
                    log::info!("agent run {id}: {}", state.as_str());
                    view_tx.send_modify(|v| {
                        v.state = state;
                        v.answer = answer;
                        v.error = error;
                        v.updated_ms = crate::now_ms();
                    });
                }
                Ok(_) => {}
            }
            runs.lock_live().remove(&id);
        });
    }

    /// Stores a step (new or updated) and shows it.
    async fn put(
        &self,
        id: &str,
        steps: &mut Vec<Step>,
        step: Step,
        state: RunState,
        view: &watch::Sender<RunView>,
    ) -> Result<(), Stop> {
        let (i, s) = (id.to_string(), step.clone());
        self.blocking(move |st| st.put_step(&i, &s, state))
            .await
            .map_err(|e| Stop::Store(e.to_string()))?;
        match steps.iter_mut().find(|x| x.n() == step.n()) {
            Some(x) => *x = step,
            None => steps.push(step),
        }
        let steps = steps.clone();
        view.send_modify(|v| {
            v.steps = steps;
            v.state = state;
            v.updated_ms = crate::now_ms();
        });
        Ok(())
    }

    /// The loop. Returns the run's end (state, answer, error).
    async fn drive(
        &self,
        plan: &Plan,
        mut steps: Vec<Step>,
        view: &watch::Sender<RunView>,
        mut decisions: mpsc::Receiver<Decided>,
        cancel: &CancellationToken,
    ) -> Result<(RunState, Option<String>, Option<String>), Stop> {
        let req = &plan.req;
        let timeout = req.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        let deadline_ms = plan.created_ms.saturating_add(timeout);
        let max_steps = req.max_steps.unwrap_or(DEFAULT_MAX_STEPS);
        let failed = |m: String| Ok((RunState::Failed, None, Some(m)));
        loop {
            if cancel.is_cancelled() {
                if self.0.shutdown.is_cancelled() {
                    return Err(Stop::Shutdown);
                }
                // A task submitted just before the cancel is cancelled too
                // (the wait that would have cancelled it is not reached).
                if let Next::AwaitTool { task, .. } | Next::AwaitLlm { task, .. } =
                    next(&steps, &plan.tools)
                {
                    super::openai::cancel_later(self.0.sched.clone(), task);
                }
                return Ok((RunState::Cancelled, None, Some("cancelled".into())));
            }
            let now = crate::now_ms();
            if now >= deadline_ms {
                return failed(format!("the run's timeout_ms ({timeout}) ran out"));
            }
            let left = Duration::from_millis(deadline_ms - now);
            let n = steps.last().map_or(0, |s| s.n() + 1);
            // Calls made, and calls denied (those never became tasks).
            let calls = steps
                .iter()
                .filter(|s| {
                    matches!(
                        s,
                        Step::ToolCall { .. }
                            | Step::Approval {
                                decision: Decision::Denied,
                                ..
                            }
                    )
                })
                .count() as u32;
            match next(&steps, &plan.tools) {
                Next::Llm => {
                    let invalid = steps
                        .iter()
                        .rev()
                        .filter(|s| matches!(s, Step::Llm { .. }))
                        .take_while(|s| matches!(s, Step::Llm { error: Some(_), .. }))
                        .count();
                    if invalid >= MAX_INVALID_REPLIES {
                        let last = steps.iter().rev().find_map(|s| match s {
                            Step::Llm { error: Some(e), .. } => Some(e.clone()),
                            _ => None,
                        });
                        return failed(format!(
                            "the model made {invalid} invalid replies in a row; the last: {}",
                            last.unwrap_or_default()
                        ));
                    }
                    let answer_only = calls >= max_steps;
                    let must_call = calls == 0 && req.tool_choice.as_deref() == Some("required");
                    let chat = ChatRequest {
                        model: req.model.clone(),
                        messages: prompt::messages(&req.goal, &plan.tools, &steps),
                        max_tokens: Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
                        temperature: Some(0.0),
                        top_p: None,
                        top_k: None,
                        seed: Some(0),
                        stop: Vec::new(),
                        response_format: Some(ResponseFormat::JsonSchema {
                            json_schema: JsonSchemaSpec {
                                name: Some("openclaw_step".into()),
                                schema: if must_call {
                                    prompt::call_schema(&plan.tools)
                                } else {
                                    prompt::reply_schema(&plan.tools, answer_only)
                                },
                                strict: Some(true),
                            },
                        }),
                    };
                    let mut sub = SubmitRequest::new("llm", json!({"chat": chat, "stream": false}));
                    sub.capability = Some(format!("{LLM_CAPABILITY}{}", req.model));
                    sub.timeout_ms = Some(left.as_millis() as u64);
                    sub.max_attempts = Some(3);
                    let step = Step::Llm {
                        n,
                        task_id: None,
                        output: None,
                        error: None,
                        answer_only,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                    };
                    self.put(&plan.id, &mut steps, step, RunState::Running, view)
                        .await?;
                    if cancel.is_cancelled() {
                        continue;
                    }
                    match self.submit(sub).await {
                        Ok(task) => {
                            let step = Step::Llm {
                                n,
                                task_id: Some(task),
                                output: None,
                                error: None,
                                answer_only,
                                prompt_tokens: 0,
                                completion_tokens: 0,
                            };
                            self.put(&plan.id, &mut steps, step, RunState::Running, view)
                                .await?;
                        }
                        Err(e) => return failed(format!("the model's task: {e}")),
                    }
                }
                Next::AwaitLlm {
                    n,
                    task,
                    answer_only,
                } => {
                    let t = match self.wait_task(&task, left, cancel).await {
                        Waited::Done(t) => *t,
                        Waited::Stopped => continue,
                        Waited::Gone(e) => return failed(e),
                    };
                    if t.state != TaskState::Succeeded {
                        return failed(format!(
                            "the model's task {task} ended {:?}: {}",
                            t.state,
                            t.error.unwrap_or_default()
                        ));
                    }
                    let c: Completion = match serde_json::from_value(t.result.unwrap_or(J::Null)) {
                        Ok(c) => c,
                        Err(e) => return failed(format!("task {task}: not a completion: {e}")),
                    };
                    let error = prompt::read_reply(&c.text, &plan.tools).err();
                    let step = Step::Llm {
                        n,
                        task_id: Some(task),
                        output: Some(c.text),
                        error,
                        answer_only,
                        prompt_tokens: c.prompt_tokens,
                        completion_tokens: c.completion_tokens,
                    };
                    self.put(&plan.id, &mut steps, step, RunState::Running, view)
                        .await?;
                }
                Next::Answer(a) => return Ok((RunState::Succeeded, Some(a), None)),
                Next::Call(call) => {
                    let needs = plan.tools.iter().any(|t| {
                        t.name == call.tool
                            && !req.allow.contains(&t.plugin)
                            && crate::protocol::Value::try_from_json(&call.arguments)
                                .map_or(true, |v| t.effects.applies(&v))
                    });
                    if needs {
                        let step = Step::Approval {
                            n,
                            call,
                            decision: Decision::Pending,
                            by: None,
                        };
                        self.put(&plan.id, &mut steps, step, RunState::AwaitingApproval, view)
                            .await?;
                    } else {
                        self.call(plan, &mut steps, n, call, left, view, cancel)
                            .await?;
                    }
                }
                Next::AwaitApproval { n: an, call } => {
                    let sleep = tokio::time::sleep(left);
                    tokio::pin!(sleep);
                    let got = loop {
                        // A cancel wins over a decision that came with it.
                        let got = tokio::select! {
                            biased;
                            () = cancel.cancelled() => break Err(()),
                            d = decisions.recv() => d,
                            () = &mut sleep => None,
                        };
                        match got {
                            // Meant for an earlier approval: dropped.
                            Some((dn, ..)) if dn != an => continue,
                            got => break Ok(got),
                        }
                    };
                    let Ok(got) = got else { continue };
                    let Some((_, decision, by)) = got else {
                        return failed(format!(
                            "no decision on the call to `{}` within the run's timeout_ms ({timeout})",
                            call.tool
                        ));
                    };
                    let step = Step::Approval {
                        n: an,
                        call: call.clone(),
                        decision,
                        by,
                    };
                    self.put(&plan.id, &mut steps, step, RunState::Running, view)
                        .await?;
                    if decision == Decision::Approved {
                        self.call(plan, &mut steps, n, call, left, view, cancel)
                            .await?;
                    }
                }
                Next::Submit { n: cn, call } => {
                    // A call stored without its task id (a restart between
                    // the two writes): submitted now.
                    self.submit_call(plan, &mut steps, cn, call, left, view, cancel)
                        .await?;
                }
                Next::AwaitTool { call, task } => {
                    let (result, error) = match self.wait_task(&task, left, cancel).await {
                        Waited::Done(t) if t.state == TaskState::Succeeded => {
                            (t.result.clone(), None)
                        }
                        Waited::Done(t) => (
                            None,
                            Some(format!(
                                "task {task} ended {:?}: {}",
                                t.state,
                                t.error.unwrap_or_default()
                            )),
                        ),
                        Waited::Stopped => continue,
                        Waited::Gone(e) => (None, Some(e)),
                    };
                    let step = Step::ToolResult {
                        n,
                        tool: call.tool,
                        device: call.device,
                        task_id: task,
                        result,
                        error,
                    };
                    self.put(&plan.id, &mut steps, step, RunState::Running, view)
                        .await?;
                }
            }
        }
    }

    /// Stores the call, then submits it as a task on its device.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        plan: &Plan,
        steps: &mut Vec<Step>,
        n: u32,
        call: Call,
        left: Duration,
        view: &watch::Sender<RunView>,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let n = steps.last().map_or(n, |s| s.n() + 1);
        let step = Step::ToolCall {
            n,
            tool: call.tool.clone(),
            plugin: call.plugin.clone(),
            device: call.device.clone(),
            arguments: call.arguments.clone(),
            task_id: None,
        };
        self.put(&plan.id, steps, step, RunState::Running, view)
            .await?;
        self.submit_call(plan, steps, n, call, left, view, cancel)
            .await
    }

    /// Submits a stored call, unless the run was cancelled (or the server
    /// is stopping) meanwhile: then nothing is submitted, and a resumed
    /// run submits it (a cancelled run is not resumed).
    #[allow(clippy::too_many_arguments)]
    async fn submit_call(
        &self,
        plan: &Plan,
        steps: &mut Vec<Step>,
        n: u32,
        call: Call,
        left: Duration,
        view: &watch::Sender<RunView>,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let mut sub = SubmitRequest::new(call.plugin.clone(), call.arguments.clone());
        sub.target = Some(call.device.clone());
        sub.timeout_ms = Some(left.as_millis().min(u64::MAX as u128) as u64);
        match self.submit(sub).await {
            Ok(task) => {
                let step = Step::ToolCall {
                    n,
                    tool: call.tool,
                    plugin: call.plugin,
                    device: call.device,
                    arguments: call.arguments,
                    task_id: Some(task),
                };
                self.put(&plan.id, steps, step, RunState::Running, view)
                    .await
            }
            Err(e) => {
                // Refused at submission (a full queue, say): the model hears it.
                let step = Step::ToolResult {
                    n: n + 1,
                    tool: call.tool,
                    device: call.device,
                    task_id: String::new(),
                    result: None,
                    error: Some(format!("not submitted: {e}")),
                };
                self.put(&plan.id, steps, step, RunState::Running, view)
                    .await
            }
        }
    }

    async fn submit(&self, req: SubmitRequest) -> Result<String, ApiError> {
        submit_whole(&self.0.sched, req).await
    }

    async fn wait_task(&self, id: &str, left: Duration, cancel: &CancellationToken) -> Waited {
        wait_task(&self.0.sched, &self.0.shutdown, id, left, cancel).await
    }

    /// A run's view: live, else from the store.
    pub async fn get(&self, id: &str) -> Result<Option<RunView>, ApiError> {
        if let Some(l) = self.lock_live().get(id) {
            return Ok(Some(l.view.borrow().clone()));
        }
        let id = id.to_string();
        self.blocking(move |s| s.get(&id)).await
    }

    /// Waits until the run is no longer `running` (ended, or waiting for
    /// an approval) or `wait` has passed.
    pub async fn wait(&self, id: &str, wait: Duration) -> Result<Option<RunView>, ApiError> {
        self.wait_until(id, wait, |s| s != RunState::Running).await
    }

    /// The run's view once `done` holds for its state, or after `wait`.
    async fn wait_until(
        &self,
        id: &str,
        wait: Duration,
        done: impl Fn(RunState) -> bool,
    ) -> Result<Option<RunView>, ApiError> {
        self.wait_view(id, wait, |v| done(v.state)).await
    }

    /// The run's view once `done` holds for it, or after `wait`.
    async fn wait_view(
        &self,
        id: &str,
        wait: Duration,
        done: impl Fn(&RunView) -> bool,
    ) -> Result<Option<RunView>, ApiError> {
        let rx = self.lock_live().get(id).map(|l| l.view.subscribe());
        let Some(mut rx) = rx else {
            return self.get(id).await;
        };
        let stopped = matches!(
            tokio::time::timeout(wait, rx.wait_for(|v| done(v))).await,
            Ok(Err(_))
        );
        if stopped {
            // The driver is gone (the run ended or the server is stopping):
            // the store has the last word.
            return self.get(id).await;
        }
        let v = rx.borrow().clone();
        Ok(Some(v))
    }

    /// The live view of a run in progress (for its event stream).
    fn watch(&self, id: &str) -> Option<watch::Receiver<RunView>> {
        self.lock_live().get(id).map(|l| l.view.subscribe())
    }

    /// Approves or denies the call a run waits on: approval step `approval`
    /// when given (409 when that is not the one pending: a late or repeated
    /// request must not decide a call its sender never saw), else the one
    /// pending now. Answers once the decision is stored; 409 when the run
    /// ended first (a cancel), 503 when the server stopped first.
    pub async fn decide(
        &self,
        id: &str,
        d: Decision,
        by: Option<String>,
        approval: Option<u32>,
    ) -> Result<RunView, ApiError> {
        let tx = {
            let mut live = self.lock_live();
            match live.get_mut(id) {
                Some(l) if l.view.borrow().state == RunState::AwaitingApproval => {
                    // The approval asked now (the last step, pending).
                    let asked = l.view.borrow().steps.iter().rev().find_map(|s| match s {
                        Step::Approval {
                            n,
                            decision: Decision::Pending,
                            ..
                        } => Some(*n),
                        _ => None,
                    });
                    match asked {
                        Some(an) if approval.is_some_and(|w| w != an) => {
                            return Err(ApiError::Conflict(format!(
                                "agent run `{id}`: approval step {} is not the one pending \
                                 (step {an} is)",
                                approval.unwrap_or_default()
                            )));
                        }
                        Some(an) if l.decided == Some(an) => {
                            return Err(ApiError::Conflict(format!(
                                "agent run `{id}`: the call it waits on was decided already"
                            )));
                        }
                        Some(an) => {
                            l.decided = Some(an);
                            Some((an, l.decide.clone()))
                        }
                        None => None,
                    }
                }
                Some(_) => None,
                None => None,
            }
        };
        let Some((an, tx)) = tx else {
            return match self.get(id).await? {
                None => Err(ApiError::NotFound(format!("no agent run `{id}`"))),
                Some(v) => Err(ApiError::Conflict(format!(
                    "agent run `{id}` is {}, not awaiting_approval",
                    v.state.as_str()
                ))),
            };
        };
        tx.try_send((an, d, by))
            .map_err(|_| ApiError::Conflict(format!("agent run `{id}` was decided already")))?;
        // The answer shows the decision stored (or the run's end), not the
        // view that asked for it.
        let decided = move |v: &RunView| {
            v.state.is_terminal()
                || v.steps.iter().any(|s| {
                    matches!(s, Step::Approval { n, decision, .. }
                        if *n == an && *decision != Decision::Pending)
                })
        };
        let v = self
            .wait_view(id, Duration::from_secs(5), decided)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no agent run `{id}`")))?;
        let stored = v.steps.iter().any(|s| {
            matches!(s, Step::Approval { n, decision, .. }
                if *n == an && *decision != Decision::Pending)
        });
        match (stored, v.state.is_terminal()) {
            (true, _) => Ok(v),
            (false, true) => Err(ApiError::Conflict(format!(
                "agent run `{id}` ended ({}) before the decision was stored",
                v.state.as_str()
            ))),
            (false, false) => Err(ApiError::Unavailable(format!(
                "agent run `{id}`: the decision was not stored (the server is stopping); \
                 send it again"
            ))),
        }
    }

    /// Cancels a run in progress (and its running task).
    pub async fn cancel(&self, id: &str) -> Result<RunView, ApiError> {
        let c = self.lock_live().get(id).map(|l| l.cancel.clone());
        match c {
            Some(c) => {
                // Stored first (a server killed from here on does not resume
                // the run), then cancelled, both on the blocking thread: a
                // client gone meanwhile cannot stop half of it.
                let i = id.to_string();
                self.blocking(move |s| {
                    let stored = s.finish(&i, RunState::Cancelled, None, Some("cancelled"));
                    c.cancel();
                    stored
                })
                .await?;
                // Until it has ended: a run waiting on an approval is not
                // `running` either, and a cancel answering that view would
                // say the run still waits.
                self.wait_until(id, Duration::from_secs(5), RunState::is_terminal)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("no agent run `{id}`")))
            }
            None => match self.get(id).await? {
                None => Err(ApiError::NotFound(format!("no agent run `{id}`"))),
                Some(v) => Err(ApiError::Conflict(format!(
                    "agent run `{id}` has ended ({})",
                    v.state.as_str()
                ))),
            },
        }
    }
}

/// A place taken among a server's live runs (agent runs or workflow runs)
/// while a new run is being stored: the cap is checked against the live
/// runs and those being started, under the live map's lock, so concurrent
/// starts cannot pass it together. Given back when dropped, once the run
/// is in the live map.
pub(crate) struct Starting(Arc<AtomicUsize>);

impl Starting {
    /// Takes a place, or `Busy` when `live` plus those starting reach `max`.
    /// Call with the live map locked (`live` is its length).
    pub(crate) fn take(
        starting: &Arc<AtomicUsize>,
        live: usize,
        max: usize,
        what: &str,
    ) -> Result<Starting, ApiError> {
        if live + starting.load(Ordering::Acquire) >= max {
            return Err(ApiError::Busy {
                message: format!("{max} {what} are in progress; retry later"),
                retry_after_s: 5,
            });
        }
        starting.fetch_add(1, Ordering::AcqRel);
        Ok(Starting(starting.clone()))
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every minute until the shutdown, deletes the runs that ended more than
/// `retention_ms` ago through `prune(cutoff_ms)`, a batch at a time (shared
/// by agent runs and workflow runs). 0: nothing is deleted.
pub(crate) fn sweep_ended<F, Fut>(
    what: &'static str,
    retention_ms: u64,
    shutdown: &CancellationToken,
    prune: F,
) where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<usize, ApiError>> + Send,
{
    if retention_ms == 0 {
        return;
    }
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let mut total = 0;
            loop {
                let cutoff = crate::now_ms().saturating_sub(retention_ms);
                match prune(cutoff).await {
                    Ok(n) => {
                        total += n;
                        if n < store::PRUNE_BATCH as usize || shutdown.is_cancelled() {
                            break;
                        }
                    }
                    Err(e) => {
                        log::warn!("retention of {what}: {e}; tried again in a minute");
                        break;
                    }
                }
            }
            if total > 0 {
                log::info!(
                    "retention: deleted {total} {what} that ended more than {retention_ms} ms ago"
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    });
}

/// Submits `req` on a task of its own, so that the caller being dropped
/// midway cannot lose the id of a task that was made: the id must reach
/// the caller's store. (Shared by agent runs and workflows.)
pub(crate) async fn submit_whole(
    sched: &SchedulerHandle,
    req: SubmitRequest,
) -> Result<String, ApiError> {
    let sched = sched.clone();
    tokio::spawn(async move { sched.submit(req).await })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map(|r| r.id)
}

/// Waits up to `left` for task `id` to end. `cancel` cancels the task too
/// unless `shutdown` is what fired (then it is left to run, for the next
/// start to wait on). A scheduler busy or restarting is asked again.
pub(crate) async fn wait_task(
    sched: &SchedulerHandle,
    shutdown: &CancellationToken,
    id: &str,
    left: Duration,
    cancel: &CancellationToken,
) -> Waited {
    let until = tokio::time::Instant::now() + left;
    loop {
        let slice = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_secs(30));
        if slice.is_zero() {
            return Waited::Gone(format!("task {id} did not end within the run's timeout"));
        }
        let got = tokio::select! {
            r = super::http::wait_for(sched, id, slice) => r,
            () = cancel.cancelled() => {
                if !shutdown.is_cancelled() {
                    super::openai::cancel_later(sched.clone(), id.to_string());
                }
                return Waited::Stopped;
            }
        };
        match got {
            Ok(Some(t)) if t.state.is_terminal() => return Waited::Done(Box::new(t)),
            Ok(Some(_)) => {}
            Ok(None) => return Waited::Gone(format!("task {id} is gone")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Why a driver stopped without an end to store.
enum Stop {
    Shutdown,
    Store(String),
}

/// How waiting for a task ended.
pub(crate) enum Waited {
    Done(Box<TaskView>),
    /// Cancelled (or the server stopping).
    Stopped,
    Gone(String),
}

/// What the loop does next, read from the stored steps alone (so a
/// resumed run picks up where it stopped).
#[derive(Debug, PartialEq)]
enum Next {
    Llm,
    AwaitLlm {
        n: u32,
        task: String,
        answer_only: bool,
    },
    Answer(String),
    Call(Call),
    AwaitApproval {
        n: u32,
        call: Call,
    },
    Submit {
        n: u32,
        call: Call,
    },
    AwaitTool {
        call: Call,
        task: String,
    },
}

fn next(steps: &[Step], tools: &[FleetTool]) -> Next {
    match steps.last() {
        None => Next::Llm,
        Some(Step::Llm {
            n,
            task_id: Some(t),
            output: None,
            answer_only,
            ..
        }) => Next::AwaitLlm {
            n: *n,
            task: t.clone(),
            answer_only: *answer_only,
        },
        // Stored before its task existed: ask again.
        Some(Step::Llm { task_id: None, .. }) => Next::Llm,
        Some(Step::Llm {
            output: Some(o),
            error: None,
            ..
        }) => match prompt::read_reply(o, tools) {
            Ok(prompt::Reply::Answer(a)) => Next::Answer(a),
            Ok(prompt::Reply::Call(c)) => Next::Call(c),
            Err(_) => Next::Llm,
        },
        Some(Step::Llm { .. }) => Next::Llm,
        Some(Step::Approval {
            n,
            call,
            decision: Decision::Pending,
            ..
        }) => Next::AwaitApproval {
            n: *n,
            call: call.clone(),
        },
        Some(Step::Approval {
            call,
            decision: Decision::Approved,
            ..
        }) => Next::Call(call.clone()),
        Some(Step::Approval { .. }) => Next::Llm,
        Some(Step::ToolCall {
            n,
            tool,
            plugin,
            device,
            arguments,
            task_id,
        }) => {
            let call = Call {
                tool: tool.clone(),
                plugin: plugin.clone(),
                device: device.clone(),
                arguments: arguments.clone(),
            };
            match task_id {
                Some(t) => Next::AwaitTool {
                    call,
                    task: t.clone(),
                },
                None => Next::Submit { n: *n, call },
            }
        }
        Some(Step::ToolResult { .. }) => Next::Llm,
    }
}

fn check_request(r: &RunRequest) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if r.goal.trim().is_empty() || r.goal.len() > MAX_GOAL_BYTES {
        return bad(format!("`goal`: 1 to {MAX_GOAL_BYTES} bytes of text"));
    }
    if r.model.is_empty() || r.model.len() > 128 {
        return bad("`model`: a model name".into());
    }
    if r.tools.is_empty() || r.tools.len() > 64 {
        return bad("`tools`: 1 to 64 plugin names".into());
    }
    if r.allow.len() > 64 {
        return bad("`allow`: at most 64 plugin names".into());
    }
    for a in &r.allow {
        if !r.tools.contains(a) {
            return bad(format!("`allow`: `{a}` is not one of `tools`"));
        }
    }
    if !matches!(
        r.tool_choice.as_deref(),
        None | Some("auto") | Some("required")
    ) {
        return bad("`tool_choice`: `auto` or `required`".into());
    }
    if let Some(s) = r.max_steps {
        if s == 0 || s > MAX_STEPS {
            return bad(format!("`max_steps`: 1 to {MAX_STEPS}, not {s}"));
        }
    }
    if let Some(t) = r.max_tokens {
        if t == 0 || t > MAX_TOKENS {
            return bad(format!("`max_tokens`: 1 to {MAX_TOKENS}, not {t}"));
        }
    }
    if let Some(t) = r.timeout_ms {
        if !(1000..=MAX_TIMEOUT_MS).contains(&t) {
            return bad(format!("`timeout_ms`: 1000 to {MAX_TIMEOUT_MS}, not {t}"));
        }
    }
    Ok(())
}

/// A new random id, `PREFIX-` and 16 hex digits.
pub(crate) fn new_id(prefix: &str) -> String {
    let r = super::auth::tokens::random_hex(8).unwrap_or_else(|_| format!("{:x}", crate::now_ms()));
    format!("{prefix}-{r}")
}

// ---- HTTP ----

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

type RState = State<(Runs, Arc<Auth>)>;

/// The routes: `POST /v1/agent/runs`, `GET /v1/agent/runs/{id}[?wait_ms=N]`,
/// `GET /v1/agent/runs/{id}/events` (server-sent events), and `POST
/// /v1/agent/runs/{id}/approve`, `/deny` and `/cancel`.
pub fn router(runs: Runs, auth: Arc<Auth>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/agent/runs", post(create))
        .route("/v1/agent/runs/{id}", get(one))
        .route("/v1/agent/runs/{id}/events", get(events))
        .route("/v1/agent/runs/{id}/approve", post(approve))
        .route("/v1/agent/runs/{id}/deny", post(deny))
        .route("/v1/agent/runs/{id}/cancel", post(cancel))
        .with_state((runs, auth))
}

async fn create(
    State((runs, auth)): RState,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
    let req: RunRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid agent run request: {e}")))?;
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let view = super::http::detached(async move {
        let v = runs.start(req).await?;
        slot.record("agent.run", &format!("{} ({})", v.id, v.tools.join(",")));
        Ok(v)
    })
    .await?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({"id": view.id, "state": view.state, "tools": view.tools})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait_ms: Option<u64>,
}

async fn one(
    State((runs, _)): RState,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let v = match q.wait_ms {
        Some(ms) => {
            runs.wait(&id, Duration::from_millis(ms.min(60_000)))
                .await?
        }
        None => runs.get(&id).await?,
    };
    match v {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::NotFound(format!("no agent run `{id}`"))),
    }
}

/// `?approval=N`: the approval step the decision is for (its `n`, as the
/// client saw it); without it, the approval pending when it arrives.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideQuery {
    approval: Option<u32>,
}

async fn decision(
    runs: Runs,
    auth: Arc<Auth>,
    caller: Caller,
    id: String,
    q: Result<Query<DecideQuery>, axum::extract::rejection::QueryRejection>,
    d: Decision,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let by = caller.token.clone().or(Some("(auth off)".into()));
    let action = if d == Decision::Approved {
        "agent.approve"
    } else {
        "agent.deny"
    };
    let v = super::http::detached(async move {
        let v = runs.decide(&id, d, by, q.approval).await?;
        slot.record(action, &id);
        Ok(v)
    })
    .await?;
    Ok(Json(v).into_response())
}

async fn approve(
    State((runs, auth)): RState,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<DecideQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    decision(runs, auth, caller, id, q, Decision::Approved).await
}

async fn deny(
    State((runs, auth)): RState,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<DecideQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    decision(runs, auth, caller, id, q, Decision::Denied).await
}

async fn cancel(
    State((runs, auth)): RState,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let v = super::http::detached(async move {
        let v = runs.cancel(&id).await?;
        slot.record("agent.cancel", &id);
        Ok(v)
    })
    .await?;
    Ok(Json(v).into_response())
}

/// Server-sent events: `step` for each step as it is stored or changes,
/// `state` when the state changes, and `end` with the whole run.
async fn events(
    State((runs, _)): RState,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let live = runs.watch(&id);
    let first = match &live {
        Some(w) => w.borrow().clone(),
        None => runs
            .get(&id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no agent run `{id}`")))?,
    };
    tokio::spawn(async move {
        let ev = |name: &str, data: &J| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        let mut sent: Vec<Step> = Vec::new();
        let mut state = None;
        let mut view = first;
        let mut live = live;
        loop {
            for (i, s) in view.steps.iter().enumerate() {
                if sent.get(i) != Some(s) {
                    let j = serde_json::to_value(s).unwrap_or(J::Null);
                    if !send_event(&tx, ev("step", &j), "agent run events").await {
                        return;
                    }
                }
            }
            sent = view.steps.clone();
            if state != Some(view.state) {
                state = Some(view.state);
                if !send_event(
                    &tx,
                    ev("state", &json!({"state": view.state})),
                    "agent run events",
                )
                .await
                {
                    return;
                }
            }
            if view.state.is_terminal() {
                let j = serde_json::to_value(&view).unwrap_or(J::Null);
                send_event(&tx, ev("end", &j), "agent run events").await;
                return;
            }
            let Some(w) = live.as_mut() else { return };
            // A client gone while nothing changes ends this task too.
            let changed = tokio::select! {
                r = w.changed() => r,
                () = tx.closed() => return,
            };
            if changed.is_err() {
                // The driver ended: its last view is in the store.
                match runs.get(&view.id).await {
                    Ok(Some(v)) => {
                        view = v;
                        live = None;
                        if !view.state.is_terminal() {
                            return; // the server is stopping
                        }
                        continue;
                    }
                    _ => return,
                }
            }
            view = w.borrow_and_update().clone();
        }
    });
    let mut resp = Response::new(axum::body::Body::new(super::openai::ChannelBody(rx)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Call {
        Call {
            tool: "sysinfo".into(),
            plugin: "sysinfo".into(),
            device: "pi-1".into(),
            arguments: json!({}),
        }
    }

    #[test]
    fn the_next_step_comes_from_the_stored_ones() {
        let tools = vec![FleetTool {
            name: "sysinfo".into(),
            plugin: "sysinfo".into(),
            device: "pi-1".into(),
            description: String::new(),
            input_schema: json!({"type": ["null", "object"], "additionalProperties": false}),
            effects: crate::schema::Effects::None,
            version: "1".into(),
        }];
        assert_eq!(next(&[], &tools), Next::Llm);
        let llm = |task: Option<&str>, out: Option<&str>| Step::Llm {
            n: 0,
            task_id: task.map(String::from),
            output: out.map(String::from),
            error: None,
            answer_only: false,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        assert_eq!(next(&[llm(None, None)], &tools), Next::Llm);
        assert!(matches!(
            next(&[llm(Some("t"), None)], &tools),
            Next::AwaitLlm { .. }
        ));
        assert_eq!(
            next(
                &[llm(Some("t"), Some(r#"{"function":"sysinfo","input":{}}"#))],
                &tools
            ),
            Next::Call(call())
        );
        assert_eq!(
            next(&[llm(Some("t"), Some(r#"{"answer":"2"}"#))], &tools),
            Next::Answer("2".into())
        );
        let tc = |task: Option<&str>| Step::ToolCall {
            n: 1,
            tool: "sysinfo".into(),
            plugin: "sysinfo".into(),
            device: "pi-1".into(),
            arguments: json!({}),
            task_id: task.map(String::from),
        };
        // A finished task is waited for, not submitted again.
        assert_eq!(
            next(&[tc(Some("t9"))], &tools),
            Next::AwaitTool {
                call: call(),
                task: "t9".into()
            }
        );
        assert_eq!(
            next(&[tc(None)], &tools),
            Next::Submit { n: 1, call: call() }
        );
        let ap = |d| Step::Approval {
            n: 1,
            call: call(),
            decision: d,
            by: None,
        };
        assert!(matches!(
            next(&[ap(Decision::Pending)], &tools),
            Next::AwaitApproval { .. }
        ));
        assert_eq!(next(&[ap(Decision::Approved)], &tools), Next::Call(call()));
        assert_eq!(next(&[ap(Decision::Denied)], &tools), Next::Llm);
    }

    #[test]
    fn requests_are_checked_naming_the_field() {
        let ok = RunRequest {
            goal: "g".into(),
            model: "m".into(),
            tools: vec!["sysinfo".into()],
            target: None,
            capability: None,
            max_steps: None,
            max_tokens: None,
            timeout_ms: None,
            allow: vec![],
            tool_choice: None,
        };
        check_request(&ok).unwrap();
        for (r, field) in [
            (
                RunRequest {
                    goal: " ".into(),
                    ..ok.clone()
                },
                "`goal`",
            ),
            (
                RunRequest {
                    tools: vec![],
                    ..ok.clone()
                },
                "`tools`",
            ),
            (
                RunRequest {
                    allow: vec!["exec".into()],
                    ..ok.clone()
                },
                "`allow`",
            ),
            (
                RunRequest {
                    max_steps: Some(0),
                    ..ok.clone()
                },
                "`max_steps`",
            ),
            (
                RunRequest {
                    timeout_ms: Some(5),
                    ..ok.clone()
                },
                "`timeout_ms`",
            ),
        ] {
            let e = check_request(&r).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
