//! Running workflows: one driver task per run submits every step whose
//! dependencies have succeeded (so independent steps run in parallel),
//! each as a task through the scheduler like any other, and waits for
//! them. A step's task id is stored as soon as it exists; after a restart
//! the driver waits for tasks already submitted and never submits a
//! finished step again. (A crash between a submission and the write of
//! its id, a few milliseconds, submits that one step again, as agent runs
//! do.) A failed step fails the run: the steps that were running are
//! cancelled (one that still succeeds keeps its output), the rest are
//! `skipped`. A step with `approve` waits, its call rendered, for an
//! operator's approval before its task exists. The routes are in routes.rs.

use super::store::{RunSummary, WorkflowStore};
use super::template::Context;
use super::{Checked, DefinitionError, StepDef, Workflow, WorkflowsError, DEFAULT_APPROVAL_MS};
use crate::llm::{ChatMessage, ChatRequest, Completion, JsonSchemaSpec, ResponseFormat};
use crate::protocol::api::{SubmitRequest, TaskState};
use crate::schema::Schema;
use crate::server::openai::LLM_CAPABILITY;
use crate::server::runs::{submit_whole, sweep_ended, wait_task, Starting, Waited};
use crate::server::scheduler::{ApiError, Command, SchedulerHandle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as J};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

/// Runs in progress at once.
pub const MAX_LIVE_RUNS: usize = 1024;
/// How long a step's task is waited for (its own timeout ends it first).
const STEP_WAIT: Duration = Duration::from_secs(400 * 24 * 3600);
/// How long a step waits for room while the scheduler's queue is full.
const BUSY_WAIT: Duration = Duration::from_secs(60);
/// The largest input a step that needs approval may propose (serialised).
pub const MAX_PROPOSED_BYTES: usize = 256 * 1024;
/// After a cancel, how long a running task's end is waited for.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// What a step's background tasks are given: the channel they report on,
/// the token that stops them, and the run's turn to ask for room.
type Waiters<'a> = (
    &'a mpsc::Sender<(usize, Report)>,
    &'a CancellationToken,
    &'a Arc<Semaphore>,
);

/// What a step's background task tells the run's driver.
enum Report {
    /// A submission retried while the queue was full: its task, or why not.
    Submitted(Result<String, ApiError>),
    /// The step's task ended (or its wait was stopped).
    Ended(Waited),
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl WorkflowState {
    pub fn is_terminal(self) -> bool {
        self != WorkflowState::Running
    }
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Running => "running",
            WorkflowState::Succeeded => "succeeded",
            WorkflowState::Failed => "failed",
            WorkflowState::Cancelled => "cancelled",
        }
    }
    pub(crate) fn parse(s: &str) -> WorkflowState {
        match s {
            "running" => WorkflowState::Running,
            "succeeded" => WorkflowState::Succeeded,
            "cancelled" => WorkflowState::Cancelled,
            _ => WorkflowState::Failed,
        }
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Its dependencies have not all succeeded yet.
    Waiting,
    /// Its call is rendered (`proposed`) and waits for an operator's
    /// approval before its task exists.
    AwaitingApproval,
    /// Submitted (its task exists once `task_id` is set).
    Running,
    Succeeded,
    Failed,
    /// Never ran: the run failed or was cancelled first.
    Skipped,
    Cancelled,
}

impl StepState {
    fn is_terminal(self) -> bool {
        !matches!(
            self,
            StepState::Waiting | StepState::AwaitingApproval | StepState::Running
        )
    }
}

/// A step as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub id: String,
    pub state: StepState,
    pub task_id: Option<String>,
    pub device: Option<String>,
    pub attempts: u32,
    pub output: Option<J>,
    pub error: Option<String>,
    /// A step with `approve`: the call it makes once approved (`plugin`,
    /// `input`, `target`, `capability`), and until when the approval is
    /// waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed: Option<J>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_deadline_ms: Option<u64>,
    /// Who approved it (a token id, or `(auth off)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
}

/// An operator's word on a step awaiting approval.
#[derive(Debug)]
pub(crate) struct Decision {
    /// The step, when more than one awaits.
    pub step: Option<String>,
    pub approve: bool,
    pub by: String,
    pub done: tokio::sync::oneshot::Sender<Result<(), ApiError>>,
}

/// A run as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub name: String,
    pub state: WorkflowState,
    pub inputs: J,
    pub steps: Vec<StepView>,
    pub output: Option<J>,
    pub error: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

struct Live {
    view: watch::Sender<RunView>,
    cancel: CancellationToken,
    decide: mpsc::Sender<Decision>,
}

struct Inner {
    store: Mutex<WorkflowStore>,
    sched: SchedulerHandle,
    live: Mutex<HashMap<String, Live>>,
    /// Runs being stored, not yet in `live` (see [`Starting`]).
    starting: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

/// The workflow runs of a server.
#[derive(Clone)]
pub struct Workflows(Arc<Inner>);

/// Why a driver stopped without an end to store.
enum Stop {
    Shutdown,
    Store(String),
}

type End = (WorkflowState, Option<J>, Option<String>);

impl Workflows {
    /// Opens `DATA/workflows.db` and resumes every run in progress.
    pub fn open(
        data_dir: &Path,
        sched: SchedulerHandle,
        shutdown: CancellationToken,
    ) -> Result<Workflows, WorkflowsError> {
        let store = WorkflowStore::open(data_dir)?;
        let open = store.open_runs()?;
        let w = Workflows(Arc::new(Inner {
            store: Mutex::new(store),
            sched,
            live: Mutex::new(HashMap::new()),
            starting: Arc::default(),
            shutdown,
        }));
        for (view, wf) in open {
            match wf.check() {
                Ok(c) => {
                    log::info!("workflow run {}: resuming", view.id);
                    w.spawn(view, c);
                }
                Err(e) => {
                    // Checked at submission: only a changed checker gets here.
                    let s = w.0.store.lock().unwrap_or_else(|p| p.into_inner());
                    let msg = format!("its definition no longer passes the check: {e}");
                    log::error!("workflow run {}: {msg}", view.id);
                    s.finish(&view.id, WorkflowState::Failed, None, Some(&msg))?;
                }
            }
        }
        Ok(w)
    }

    /// Deletes runs that ended more than `retention_ms` ago (the tasks'
    /// `scheduler.retention_ms`), every minute; 0 keeps them.
    pub fn keep(&self, retention_ms: u64) {
        let w = self.clone();
        let batch = crate::server::runs::store::PRUNE_BATCH;
        sweep_ended(
            "workflow run(s)",
            retention_ms,
            &self.0.shutdown,
            move |cutoff| {
                let w = w.clone();
                async move { w.blocking(move |s| s.prune(cutoff, batch)).await }
            },
        );
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.0.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WorkflowStore) -> Result<T, WorkflowsError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let s = inner.store.lock().unwrap_or_else(|p| p.into_inner());
            f(&s)
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("workflow store: {e}")))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    /// Checks a definition and its inputs, stores the run, starts it.
    pub async fn start(&self, wf: Workflow, given: Map<String, J>) -> Result<RunView, ApiError> {
        let bad = |e: DefinitionError| ApiError::BadRequest(e.to_string());
        let checked = wf.check().map_err(bad)?;
        let inputs = checked.wf.inputs_with(&given).map_err(bad)?;
        self.check_fleet(&checked.wf).await?;
        let slot = {
            let live = self.lock_live();
            Starting::take(&self.0.starting, live.len(), MAX_LIVE_RUNS, "workflow runs")?
        };
        let now = crate::now_ms();
        let view = RunView {
            id: crate::server::runs::new_id("wf"),
            name: checked.wf.name.clone(),
            state: WorkflowState::Running,
            inputs: J::Object(inputs),
            steps: checked
                .wf
                .steps
                .iter()
                .map(|s| StepView {
                    id: s.id.clone(),
                    state: StepState::Waiting,
                    task_id: None,
                    device: None,
                    attempts: 0,
                    output: None,
                    error: None,
                    proposed: None,
                    approval_deadline_ms: None,
                    approved_by: None,
                })
                .collect(),
            output: None,
            error: None,
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
                let (v, w) = (v.clone(), checked.wf.clone());
                this.blocking(move |s| s.create(&v, &w)).await?;
            }
            log::info!(
                "workflow run {}: `{}` started ({} steps)",
                v.id,
                v.name,
                v.steps.len()
            );
            this.spawn(v, checked);
            Ok::<_, ApiError>(())
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))??;
        Ok(view)
    }

    /// Refuses a plugin or model no known device (online or not) offers,
    /// as the scheduler refuses such a task, but before anything runs.
    /// A templated target or capability is checked when its task is
    /// submitted.
    async fn check_fleet(&self, wf: &Workflow) -> Result<(), ApiError> {
        let devices = self.0.sched.ask(|resp| Command::Devices { resp }).await?;
        let literal = |s: &Option<String>| s.clone().filter(|s| !s.contains("{{"));
        for s in &wf.steps {
            let target = literal(&s.target);
            let on =
                |d: &&crate::protocol::api::DeviceView| target.as_ref().is_none_or(|t| *t == d.id);
            let (ok, what) = match (&s.plugin, &s.model) {
                (Some(p), _) => {
                    let cap = literal(&s.capability);
                    let ok = devices.iter().filter(on).any(|d| {
                        d.plugins.contains(p)
                            && cap.as_ref().is_none_or(|c| d.capabilities.contains(c))
                    });
                    (ok, format!("plugin `{p}`"))
                }
                (None, Some(m)) => {
                    let cap = format!("{LLM_CAPABILITY}{m}");
                    let ok = devices
                        .iter()
                        .filter(on)
                        .any(|d| d.capabilities.contains(&cap));
                    (ok, format!("model `{m}`"))
                }
                (None, None) => (true, String::new()),
            };
            if !ok {
                let r#where = match &target {
                    Some(t) => format!("device `{t}` (known) does not offer it"),
                    None => "no known device offers it".into(),
                };
                return Err(ApiError::BadRequest(format!(
                    "step `{}`: {what}: {where}",
                    s.id
                )));
            }
        }
        Ok(())
    }

    fn spawn(&self, view: RunView, checked: Checked) {
        let (view_tx, _) = watch::channel(view.clone());
        let cancel = self.0.shutdown.child_token();
        let (decide, mut decisions) = mpsc::channel(4);
        self.lock_live().insert(
            view.id.clone(),
            Live {
                view: view_tx.clone(),
                cancel: cancel.clone(),
                decide,
            },
        );
        let w = self.clone();
        tokio::spawn(async move {
            let id = view.id.clone();
            let end = w.drive(&checked, &view_tx, &cancel, &mut decisions).await;
            match end {
                Err(Stop::Shutdown) => {}
                Err(Stop::Store(e)) => {
                    log::error!("workflow run {id}: stopped: {e}; it resumes at the next start")
                }
                Ok((state, output, error)) => {
                    let (i, o, e) = (id.clone(), output.clone(), error.clone());
                    match w
                        .blocking(move |s| s.finish(&i, state, o.as_ref(), e.as_deref()))
                        .await
                    {
                        Ok(true) => {
                            log::info!("workflow run {id}: {}", state.as_str());
                            view_tx.send_modify(|v| {
                                v.state = state;
                                v.output = output;
                                v.error = error;
                                v.updated_ms = crate::now_ms();
                            });
                        }
                        // Ended first by a stored cancel: that end is shown.
                        Ok(false) => {
                            let i = id.clone();
                            if let Ok(Some(v)) = w.blocking(move |s| s.get(&i)).await {
                                log::info!("workflow run {id}: {}", v.state.as_str());
                                view_tx.send_replace(v);
                            }
                        }
                        Err(err) => log::error!("workflow run {id}: its end not stored: {err}"),
                    }
                }
            }
            w.lock_live().remove(&id);
        });
    }

    /// Stores step `n` and shows it.
    async fn put(
        &self,
        view: &watch::Sender<RunView>,
        steps: &mut [StepView],
        n: usize,
        s: StepView,
    ) -> Result<(), Stop> {
        let id = view.borrow().id.clone();
        let st = s.clone();
        self.blocking(move |store| store.put_step(&id, n, &st))
            .await
            .map_err(|e| Stop::Store(e.to_string()))?;
        steps[n] = s.clone();
        view.send_modify(|v| {
            v.steps[n] = s;
            v.updated_ms = crate::now_ms();
        });
        Ok(())
    }

    /// The run, to its end.
    async fn drive(
        &self,
        c: &Checked,
        view: &watch::Sender<RunView>,
        cancel: &CancellationToken,
        decisions: &mut mpsc::Receiver<Decision>,
    ) -> Result<End, Stop> {
        let (mut steps, inputs) = {
            let v = view.borrow();
            (
                v.steps.clone(),
                v.inputs.as_object().cloned().unwrap_or_default(),
            )
        };
        let n = steps.len();
        // Waiters report here; `tasks` cancels them (and their tasks).
        let (tx, mut rx) = mpsc::channel::<(usize, Report)>(n.max(1));
        let tasks = cancel.child_token();
        // One step of a run at a time asks a full queue for room; the others
        // wait their turn without asking.
        let room = Arc::new(Semaphore::new(1));
        let mut live: HashSet<usize> = HashSet::new();
        for (i, s) in steps.clone().into_iter().enumerate() {
            match (s.state, &s.task_id) {
                (StepState::Running, Some(t)) => {
                    self.wait_in_background(i, t.clone(), &tx, &tasks);
                    live.insert(i);
                }
                // Stored as submitted but its id never was: submitted again.
                (StepState::Running, None) => {
                    let mut s = s;
                    s.state = StepState::Waiting;
                    self.put(view, &mut steps, i, s).await?;
                }
                _ => {}
            }
        }
        // A step stored cancelled (its task cancelled through the tasks
        // API) failed the run before a restart as it does now.
        let failed = |want: StepState| {
            steps.iter().find_map(|s| {
                (s.state == want)
                    .then(|| format!("step `{}`: {}", s.id, s.error.clone().unwrap_or_default()))
            })
        };
        // The step that failed is named before those cancelled because of it.
        let mut failure: Option<String> =
            failed(StepState::Failed).or_else(|| failed(StepState::Cancelled));
        if failure.is_some() {
            tasks.cancel();
        }
        let mut cancelled = false;
        loop {
            if failure.is_none() && !cancelled && !cancel.is_cancelled() {
                let ready: Vec<usize> = (0..n)
                    .filter(|&i| {
                        steps[i].state == StepState::Waiting
                            && c.deps[i]
                                .iter()
                                .all(|&d| steps[d].state == StepState::Succeeded)
                    })
                    .collect();
                let outputs = outputs(&steps);
                for i in ready {
                    let ctx = Context {
                        inputs: &inputs,
                        outputs: &outputs,
                    };
                    let def = &c.wf.steps[i];
                    let mut s = steps[i].clone();
                    let req = match submission(def, &ctx) {
                        Ok(r) => r,
                        Err(e) => {
                            s.state = StepState::Failed;
                            s.error = Some(e.clone());
                            self.put(view, &mut steps, i, s).await?;
                            failure = Some(format!("step `{}`: {e}", def.id));
                            break;
                        }
                    };
                    // Measured only for a call to approve (not on every step).
                    let shown = if def.approve && s.approved_by.is_none() {
                        req.input.to_string().len()
                    } else {
                        0
                    };
                    if shown > MAX_PROPOSED_BYTES {
                        // An operator approves what is shown in whole, and
                        // each waiting call is held in memory as shown.
                        let e = format!(
                            "the call to approve has {shown} bytes of input, more than the \
                             {MAX_PROPOSED_BYTES} an approval shows; not submitted"
                        );
                        s.state = StepState::Failed;
                        s.error = Some(e.clone());
                        self.put(view, &mut steps, i, s).await?;
                        failure = Some(format!("step `{}`: {e}", def.id));
                        break;
                    }
                    if def.approve && s.approved_by.is_none() {
                        // Shown as it will be submitted; nothing exists yet.
                        let wait = def.approval_timeout_ms.unwrap_or(DEFAULT_APPROVAL_MS);
                        s.state = StepState::AwaitingApproval;
                        s.proposed = Some(json!({
                            "plugin": req.plugin,
                            "input": req.input,
                            "target": req.target,
                            "capability": req.capability,
                            "route": req.route,
                            "timeout_ms": req.timeout_ms,
                            "max_attempts": req.max_attempts,
                        }));
                        s.approval_deadline_ms = Some(crate::now_ms().saturating_add(wait));
                        log::info!(
                            "workflow run {}: step {} awaits approval",
                            view.borrow().id,
                            def.id
                        );
                        self.put(view, &mut steps, i, s).await?;
                        continue;
                    }
                    if let Err(e) = self
                        .submit_step(view, &mut steps, i, req, (&tx, &tasks, &room))
                        .await?
                    {
                        failure = Some(format!("step `{}`: {e}", def.id));
                        break;
                    }
                    live.insert(i);
                }
                if failure.is_some() {
                    tasks.cancel();
                }
            }
            let awaiting: Vec<usize> = (0..n)
                .filter(|&i| steps[i].state == StepState::AwaitingApproval)
                .collect();
            let deciding =
                failure.is_none() && !cancelled && !cancel.is_cancelled() && !awaiting.is_empty();
            if live.is_empty() && !deciding {
                break;
            }
            // The first approval deadline, as an instant.
            let next_deadline = awaiting
                .iter()
                .filter_map(|&i| steps[i].approval_deadline_ms)
                .min()
                .map(|ms| {
                    tokio::time::Instant::now()
                        + Duration::from_millis(ms.saturating_sub(crate::now_ms()))
                });
            // Biased: a cancel and an expired deadline win over a decision
            // that arrives at the same time.
            tokio::select! {
                biased;
                () = cancel.cancelled(), if !cancelled => {
                    if self.0.shutdown.is_cancelled() {
                        return Err(Stop::Shutdown);
                    }
                    cancelled = true;
                }
                // Once cancelled, a shutdown still ends the wait (a waiter
                // stopped by it does not report).
                () = self.0.shutdown.cancelled(), if cancelled => return Err(Stop::Shutdown),
                () = async {
                    match next_deadline {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                }, if deciding => {
                    let now = crate::now_ms();
                    for &i in &awaiting {
                        if steps[i].approval_deadline_ms.is_some_and(|d| d <= now) && failure.is_none() {
                            let waited = c.wf.steps[i].approval_timeout_ms.unwrap_or(DEFAULT_APPROVAL_MS);
                            let e = format!("no approval within {waited} ms");
                            let mut s = steps[i].clone();
                            s.state = StepState::Failed;
                            s.error = Some(e.clone());
                            self.put(view, &mut steps, i, s).await?;
                            failure = Some(format!("step `{}`: {e}", steps[i].id));
                            tasks.cancel();
                        }
                    }
                }
                got = rx.recv() => {
                    let Some((i, report)) = got else { break };
                    if self.0.shutdown.is_cancelled() {
                        return Err(Stop::Shutdown);
                    }
                    let stopping = failure.is_some() || cancelled;
                    let s = match report {
                        // Room was found after a wait: the step goes on
                        // (a cancel meanwhile stops its task at once).
                        Report::Submitted(Ok(task)) => {
                            self.submitted(view, &mut steps, i, task, &tx, &tasks).await?;
                            continue;
                        }
                        Report::Submitted(Err(e)) => {
                            let mut s = steps[i].clone();
                            s.state = if stopping { StepState::Cancelled } else { StepState::Failed };
                            s.error = Some(format!("not submitted: {e}"));
                            s
                        }
                        Report::Ended(waited) => finished(&c.wf.steps[i], steps[i].clone(), waited, stopping),
                    };
                    live.remove(&i);
                    // A step's task cancelled by someone else (the tasks
                    // API) fails the run too: its dependents cannot run,
                    // and the run must not end `succeeded` without them.
                    if matches!(s.state, StepState::Failed | StepState::Cancelled)
                        && failure.is_none()
                        && !cancelled
                    {
                        failure = Some(format!(
                            "step `{}`: {}",
                            s.id,
                            s.error.clone().unwrap_or_default()
                        ));
                        tasks.cancel();
                    }
                    self.put(view, &mut steps, i, s).await?;
                }
                Some(d) = decisions.recv(), if deciding => {
                    let pick = match &d.step {
                        Some(id) => awaiting.iter().copied().find(|&i| steps[i].id == *id).ok_or_else(|| {
                            ApiError::Conflict(format!("step `{id}` does not await approval"))
                        }),
                        None if awaiting.len() == 1 => Ok(awaiting[0]),
                        None => Err(ApiError::BadRequest(format!(
                            "steps {} await approval: name one (?step=ID)",
                            awaiting.iter().map(|&i| steps[i].id.as_str()).collect::<Vec<_>>().join(", ")
                        ))),
                    };
                    let i = match pick {
                        Ok(i) => i,
                        Err(e) => {
                            let _ = d.done.send(Err(e));
                            continue;
                        }
                    };
                    if steps[i].approval_deadline_ms.is_some_and(|t| t <= crate::now_ms()) {
                        // Too late: the deadline arm fails the step next.
                        let _ = d.done.send(Err(ApiError::Conflict(format!(
                            "step `{}`: its approval deadline has passed",
                            steps[i].id
                        ))));
                        continue;
                    }
                    let def = &c.wf.steps[i];
                    let mut s = steps[i].clone();
                    if !d.approve {
                        let e = format!("denied by {}", d.by);
                        s.state = StepState::Failed;
                        s.error = Some(e.clone());
                        self.put(view, &mut steps, i, s).await?;
                        let _ = d.done.send(Ok(()));
                        failure = Some(format!("step `{}`: {e}", def.id));
                        tasks.cancel();
                        continue;
                    }
                    s.approved_by = Some(d.by.clone());
                    steps[i] = s;
                    let outputs = outputs(&steps);
                    let ctx = Context { inputs: &inputs, outputs: &outputs };
                    let res = match submission(def, &ctx) {
                        Ok(req) => {
                            self.submit_step(view, &mut steps, i, req, (&tx, &tasks, &room))
                                .await?
                        }
                        Err(e) => Err(e),
                    };
                    let _ = d.done.send(Ok(()));
                    match res {
                        Ok(()) => {
                            live.insert(i);
                        }
                        Err(e) => {
                            if !matches!(steps[i].state, StepState::Failed | StepState::Cancelled) {
                                let mut s = steps[i].clone();
                                s.state = StepState::Failed;
                                s.error = Some(e.clone());
                                self.put(view, &mut steps, i, s).await?;
                            }
                            failure = Some(format!("step `{}`: {e}", def.id));
                            tasks.cancel();
                        }
                    }
                }
            }
        }
        if self.0.shutdown.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        if cancel.is_cancelled() {
            cancelled = true;
        }
        for i in 0..n {
            if !steps[i].state.is_terminal() {
                let mut s = steps[i].clone();
                s.state = StepState::Skipped;
                self.put(view, &mut steps, i, s).await?;
            }
        }
        if cancelled {
            return Ok((WorkflowState::Cancelled, None, Some("cancelled".into())));
        }
        if let Some(f) = failure {
            return Ok((WorkflowState::Failed, None, Some(f)));
        }
        match final_output(c, &inputs, &outputs(&steps)) {
            Ok(o) => Ok((WorkflowState::Succeeded, Some(o), None)),
            Err(e) => Ok((WorkflowState::Failed, None, Some(e))),
        }
    }

    /// Submits step `i` (stored `running` first, then with its task id) and
    /// waits for its task in the background. While the scheduler's queue is
    /// full the submission is retried in the background too (for a while,
    /// as the scheduler asks), so other steps, decisions and cancels go on
    /// meanwhile; it reports on `tx`. `Err`: it could not be submitted, and
    /// is stored `failed` with that error.
    async fn submit_step(
        &self,
        view: &watch::Sender<RunView>,
        steps: &mut [StepView],
        i: usize,
        req: SubmitRequest,
        (tx, tasks, room): Waiters<'_>,
    ) -> Result<Result<(), String>, Stop> {
        let mut s = steps[i].clone();
        s.state = StepState::Running;
        self.put(view, steps, i, s.clone()).await?;
        // A cancel (or another step's failure) since the step was picked:
        // nothing is submitted. A shutdown leaves it stored `running`
        // without a task, for the next start to submit.
        if tasks.is_cancelled() {
            if self.0.shutdown.is_cancelled() {
                return Err(Stop::Shutdown);
            }
            let e = "cancelled before it was submitted".to_string();
            s.state = StepState::Cancelled;
            s.error = Some(e.clone());
            self.put(view, steps, i, s).await?;
            return Ok(Err(e));
        }
        match submit_whole(&self.0.sched, req.clone()).await {
            Ok(task) => {
                self.submitted(view, steps, i, task, tx, tasks).await?;
                Ok(Ok(()))
            }
            Err(ApiError::Busy { retry_after_s, .. }) => {
                log::info!(
                    "workflow run {}: step {} waits for room in the queue",
                    view.borrow().id,
                    s.id
                );
                let run = view.borrow().id.clone();
                self.submit_in_background(run, i, s, req, retry_after_s, (tx, tasks, room));
                Ok(Ok(()))
            }
            Err(e) => {
                let e = format!("not submitted: {e}");
                s.state = StepState::Failed;
                s.error = Some(e.clone());
                self.put(view, steps, i, s).await?;
                Ok(Err(e))
            }
        }
    }

    /// Step `i` is task `task`: stored so, then waited for in the background.
    async fn submitted(
        &self,
        view: &watch::Sender<RunView>,
        steps: &mut [StepView],
        i: usize,
        task: String,
        tx: &mpsc::Sender<(usize, Report)>,
        tasks: &CancellationToken,
    ) -> Result<(), Stop> {
        log::info!(
            "workflow run {}: step {} is task {task}",
            view.borrow().id,
            steps[i].id
        );
        let mut s = steps[i].clone();
        s.task_id = Some(task.clone());
        self.put(view, steps, i, s).await?;
        self.wait_in_background(i, task, tx, tasks);
        Ok(())
    }

    /// Retries a submission the scheduler answered `Busy` for up to
    /// [`BUSY_WAIT`], then reports how it went. A cancel ends the wait; a
    /// shutdown ends it without a report (the step stays stored `running`
    /// without a task, and the next start submits it). The pause between
    /// tries grows (with jitter), so many waiting steps do not all ask at
    /// once. A task made is stored here, before the report: a driver that
    /// stops meanwhile (a shutdown) cannot lose its id, and the next start
    /// waits on it instead of submitting the step twice.
    fn submit_in_background(
        &self,
        run: String,
        i: usize,
        step: StepView,
        req: SubmitRequest,
        retry_after_s: u64,
        (tx, tasks, room): Waiters<'_>,
    ) {
        let (w, tx, tasks, room) = (self.clone(), tx.clone(), tasks.clone(), room.clone());
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let until = start + BUSY_WAIT;
            let mut pause = Duration::from_secs(retry_after_s.clamp(1, 5));
            let mut tries = 1u32;
            // The run's turn to ask (held until this step is through).
            let turn = tokio::select! {
                biased;
                () = tasks.cancelled() => None,
                t = tokio::time::timeout_at(until, room.acquire_owned()) => Some(t),
            };
            let got = match turn {
                None if w.0.shutdown.is_cancelled() => return,
                None => Err(ApiError::Conflict(
                    "cancelled while the queue was full".into(),
                )),
                Some(Err(_)) | Some(Ok(Err(_))) => Err(ApiError::Busy {
                    message: format!(
                        "the queue stayed full: this step waited {} s for its run's other \
                         steps to find room",
                        BUSY_WAIT.as_secs()
                    ),
                    retry_after_s: 1,
                }),
                Some(Ok(Ok(_turn))) => loop {
                    tokio::select! {
                        biased;
                        () = tasks.cancelled() => {
                            if w.0.shutdown.is_cancelled() {
                                return;
                            }
                            break Err(ApiError::Conflict("cancelled while the queue was full".into()));
                        }
                        () = tokio::time::sleep(pause) => {}
                    }
                    if tasks.is_cancelled() {
                        continue;
                    }
                    tries += 1;
                    match submit_whole(&w.0.sched, req.clone()).await {
                        Err(ApiError::Busy { retry_after_s, .. })
                            if tokio::time::Instant::now() < until =>
                        {
                            let base = Duration::from_secs(retry_after_s.clamp(1, 5));
                            let grown = (pause * 2).min(Duration::from_secs(8)).max(base);
                            // Up to a quarter more, so waiters spread out.
                            let r = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.subsec_micros() % 1000);
                            let jitter = grown.mul_f64(f64::from(r) / 4000.0);
                            pause = (grown + jitter).min(until - tokio::time::Instant::now());
                        }
                        Err(ApiError::Busy { message, .. }) => {
                            break Err(ApiError::Busy {
                                message: format!(
                                    "{message} (waited {} s, {tries} tries, for room in the queue)",
                                    start.elapsed().as_secs()
                                ),
                                retry_after_s: 1,
                            });
                        }
                        other => break other,
                    }
                },
            };
            if let Ok(task) = &got {
                let mut s = step;
                s.task_id = Some(task.clone());
                if let Err(e) = w.blocking(move |store| store.put_step(&run, i, &s)).await {
                    log::error!("workflow step {i}: its task {task} not stored: {e}");
                }
            }
            let _ = tx.send((i, Report::Submitted(got))).await;
        });
    }

    /// Passes an operator's decision to the run's driver and waits for it
    /// to be stored: 404 for no such run, 409 when nothing awaits approval.
    pub(crate) async fn decide(
        &self,
        id: &str,
        step: Option<String>,
        approve: bool,
        by: String,
    ) -> Result<(RunView, Option<String>), ApiError> {
        // The step is fixed when the request arrives: a retried approval
        // that names none cannot land on a step that began waiting since.
        let mut step = step;
        let tx = self.lock_live().get(id).and_then(|l| {
            let v = l.view.borrow();
            let waiting: Vec<&str> = v
                .steps
                .iter()
                .filter(|s| s.state == StepState::AwaitingApproval)
                .map(|s| s.id.as_str())
                .collect();
            if step.is_none() && waiting.len() == 1 {
                step = Some(waiting[0].to_string());
            }
            (!waiting.is_empty()).then(|| l.decide.clone())
        });
        let Some(tx) = tx else {
            return match self.get(id).await? {
                None => Err(ApiError::NotFound(format!("no workflow run `{id}`"))),
                Some(v) => Err(ApiError::Conflict(format!(
                    "workflow run `{id}` ({}) has no step awaiting approval",
                    v.state.as_str()
                ))),
            };
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        tx.try_send(Decision {
            step: step.clone(),
            approve,
            by,
            done,
        })
        .map_err(|_| ApiError::Conflict(format!("workflow run `{id}` is being decided")))?;
        match answer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            // The driver ended first (a cancel, the server stopping).
            Err(_) => {
                return Err(ApiError::Conflict(format!(
                    "workflow run `{id}` ended before the decision"
                )))
            }
        }
        let v = self
            .get(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no workflow run `{id}`")))?;
        Ok((v, step))
    }

    /// Waits for step `i`'s task on a task of its own; reports on `tx`.
    /// Stopped by `tasks` (not by the shutdown), it cancels the task and
    /// reports how it ended.
    fn wait_in_background(
        &self,
        i: usize,
        task: String,
        tx: &mpsc::Sender<(usize, Report)>,
        tasks: &CancellationToken,
    ) {
        let (w, tx, tasks) = (self.clone(), tx.clone(), tasks.clone());
        tokio::spawn(async move {
            let sched = &w.0.sched;
            let shutdown = &w.0.shutdown;
            let mut got = wait_task(sched, shutdown, &task, STEP_WAIT, &tasks).await;
            if matches!(got, Waited::Stopped) && !shutdown.is_cancelled() {
                let never = CancellationToken::new();
                got = wait_task(sched, shutdown, &task, CANCEL_WAIT, &never).await;
                if let Waited::Gone(_) = got {
                    got = Waited::Stopped;
                }
            }
            let _ = tx.send((i, Report::Ended(got))).await;
        });
    }

    /// A run's view: live, else from the store.
    pub async fn get(&self, id: &str) -> Result<Option<RunView>, ApiError> {
        if let Some(l) = self.lock_live().get(id) {
            return Ok(Some(l.view.borrow().clone()));
        }
        let id = id.to_string();
        self.blocking(move |s| s.get(&id)).await
    }

    /// Waits until the run has ended or `wait` has passed.
    pub async fn wait(&self, id: &str, wait: Duration) -> Result<Option<RunView>, ApiError> {
        let rx = self.lock_live().get(id).map(|l| l.view.subscribe());
        let Some(mut rx) = rx else {
            return self.get(id).await;
        };
        let stopped = matches!(
            tokio::time::timeout(wait, rx.wait_for(|v| v.state.is_terminal())).await,
            Ok(Err(_))
        );
        if stopped {
            // The driver stopped (the server is stopping): the store has it.
            return self.get(id).await;
        }
        let v = rx.borrow().clone();
        Ok(Some(v))
    }

    pub(super) fn watch(&self, id: &str) -> Option<watch::Receiver<RunView>> {
        self.lock_live().get(id).map(|l| l.view.subscribe())
    }

    /// Cancels a run in progress and its running tasks.
    pub async fn cancel(&self, id: &str) -> Result<RunView, ApiError> {
        let c = self.lock_live().get(id).map(|l| l.cancel.clone());
        match c {
            Some(c) => {
                // Stored first (a server killed from here on does not resume
                // the run), then cancelled, both on the blocking thread: a
                // client gone meanwhile cannot stop half of it.
                let i = id.to_string();
                self.blocking(move |s| {
                    let stored = s.finish(&i, WorkflowState::Cancelled, None, Some("cancelled"));
                    c.cancel();
                    stored
                })
                .await?;
                self.wait(id, CANCEL_WAIT + Duration::from_secs(5))
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("no workflow run `{id}`")))
            }
            None => match self.get(id).await? {
                None => Err(ApiError::NotFound(format!("no workflow run `{id}`"))),
                Some(v) => Err(ApiError::Conflict(format!(
                    "workflow run `{id}` has ended ({})",
                    v.state.as_str()
                ))),
            },
        }
    }

    /// The newest runs.
    pub async fn list(&self, limit: u32) -> Result<Vec<RunSummary>, ApiError> {
        self.blocking(move |s| s.list(limit)).await
    }
}

fn outputs(steps: &[StepView]) -> HashMap<String, J> {
    steps
        .iter()
        .filter(|s| s.state == StepState::Succeeded)
        .map(|s| (s.id.clone(), s.output.clone().unwrap_or(J::Null)))
        .collect()
}

/// The task a step becomes, its templates rendered.
fn submission(def: &StepDef, ctx: &Context) -> Result<SubmitRequest, String> {
    let text = |v: &Option<String>, at: &str| -> Result<Option<String>, String> {
        match v {
            None => Ok(None),
            Some(s) => match ctx.render(&J::String(s.clone()), at)? {
                J::String(s) => Ok(Some(s)),
                other => Err(format!("`{at}`: expected text, the template gave {other}")),
            },
        }
    };
    let mut req = match (&def.plugin, &def.model) {
        (Some(p), _) => {
            let input = match &def.input {
                Some(i) => ctx.render(i, "input")?,
                None => J::Null,
            };
            let mut r = SubmitRequest::new(p.clone(), input);
            r.capability = text(&def.capability, "capability")?;
            r
        }
        (None, Some(m)) => {
            let mut messages = Vec::new();
            if let Some(s) = text(&def.system, "system")? {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: s,
                    name: None,
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: text(&def.prompt, "prompt")?.unwrap_or_default(),
                name: None,
            });
            let chat = ChatRequest {
                model: m.clone(),
                messages,
                max_tokens: Some(def.max_tokens.unwrap_or(256)),
                temperature: Some(0.0),
                top_p: None,
                top_k: None,
                seed: Some(0),
                stop: Vec::new(),
                response_format: def.schema.as_ref().map(|s| ResponseFormat::JsonSchema {
                    json_schema: JsonSchemaSpec {
                        name: Some(format!("step_{}", def.id.replace('-', "_"))),
                        schema: s.clone(),
                        strict: Some(true),
                    },
                }),
            };
            let mut r = SubmitRequest::new("llm", json!({"chat": chat, "stream": false}));
            r.capability = Some(format!("{LLM_CAPABILITY}{m}"));
            r
        }
        (None, None) => return Err("neither plugin nor model".into()),
    };
    req.target = text(&def.target, "target")?;
    req.route = def.route;
    req.priority = def.priority;
    req.timeout_ms = def.timeout_ms;
    req.max_attempts = def.retries.map(|r| r + 1);
    Ok(req)
}

/// A step once its wait ended. `stopping`: the run is failing or being
/// cancelled, so a task that did not succeed was (most likely) cancelled.
fn finished(def: &StepDef, mut s: StepView, waited: Waited, stopping: bool) -> StepView {
    match waited {
        Waited::Done(t) => {
            s.device = t.device.clone();
            s.attempts = t.attempts;
            let task = t.id.clone();
            match t.state {
                TaskState::Succeeded => match step_output(def, t.result) {
                    Ok(o) => {
                        s.state = StepState::Succeeded;
                        s.output = Some(o);
                    }
                    Err(e) => {
                        s.state = StepState::Failed;
                        s.error = Some(format!("task {task}: {e}"));
                    }
                },
                TaskState::Cancelled => {
                    s.state = StepState::Cancelled;
                    s.error = Some(format!("task {task} was cancelled"));
                }
                st => {
                    s.state = if stopping && st == TaskState::Failed {
                        // Cancelled while queued ends `failed` too: either
                        // way the run is already ending.
                        StepState::Cancelled
                    } else {
                        StepState::Failed
                    };
                    s.error = Some(format!(
                        "task {task} ended {}: {}",
                        st.as_str(),
                        t.error.unwrap_or_default()
                    ));
                }
            }
        }
        Waited::Stopped => {
            s.state = StepState::Cancelled;
            s.error = Some("cancelled".into());
        }
        Waited::Gone(e) => {
            s.state = StepState::Failed;
            s.error = Some(e);
        }
    }
    s
}

/// What a step's task gave, as the step's output: a plugin's result as it
/// is; a model's text, or with a `schema` the JSON it holds, checked.
fn step_output(def: &StepDef, result: Option<J>) -> Result<J, String> {
    if def.model.is_none() {
        return Ok(result.unwrap_or(J::Null));
    }
    let c: Completion = serde_json::from_value(result.unwrap_or(J::Null))
        .map_err(|e| format!("not a completion: {e}"))?;
    let Some(schema) = &def.schema else {
        return Ok(J::String(c.text));
    };
    let v: J = serde_json::from_str(c.text.trim())
        .map_err(|e| format!("the model's reply is not JSON ({e}): {:?}", c.text))?;
    check_schema(schema, &v).map_err(|e| format!("the model's reply: {e}"))?;
    Ok(v)
}

fn check_schema(schema: &J, v: &J) -> Result<(), String> {
    let s = Schema::from_json(schema).map_err(|e| format!("schema: {e}"))?;
    let val = crate::protocol::Value::try_from_json(v)?;
    s.validate(&val).map_err(|e| e.to_string())
}

fn final_output(
    c: &Checked,
    inputs: &Map<String, J>,
    outputs: &HashMap<String, J>,
) -> Result<J, String> {
    let ctx = Context { inputs, outputs };
    let out = c.wf.output.as_ref();
    let value = match out.and_then(|o| o.value.as_ref()) {
        Some(v) => ctx.render(v, "output.value")?,
        None => J::Object(
            super::sinks(&c.deps)
                .into_iter()
                .map(|i| {
                    let id = &c.wf.steps[i].id;
                    (id.clone(), outputs.get(id).cloned().unwrap_or(J::Null))
                })
                .collect(),
        ),
    };
    if let Some(schema) = out.and_then(|o| o.schema.as_ref()) {
        check_schema(schema, &value).map_err(|e| format!("output: {e}"))?;
    }
    Ok(value)
}
