//! The scheduler: one task that owns every piece of scheduling state.
//!
//! It takes [`Command`]s in batches from a bounded channel, applies them in
//! one SQLite transaction, commits, and only then performs the effects
//! (answers to clients, MQTT publishes, MQTT acks). So a task is durable
//! before anyone hears it was accepted, and a dispatch or a result is on disk
//! before the agent is told.
//!
//! Priority with aging: a waiting task's effective priority is
//! `priority + waited / aging`. Because every waiting task ages at the same
//! rate, the order between two of them never changes, so the queue is a
//! `BTreeMap` keyed once by `priority * aging - created` (higher first).

use super::config::SchedulerSection;
use super::store::{Store, StoreError, TaskRow};
use crate::mqtt::MqttEvent;
use crate::protocol::api::{DeviceView, Reply, SubmitRequest, SubmitResponse, TaskState, TaskView};
use crate::protocol::{
    self, topics, DeviceStatus, ErrorKind, FromAgent, RejectReason, TaskSpec, ToAgent, Value,
};
use rumqttc::{AsyncClient, Publish, QoS};
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Errors the API shows to a client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Health figures.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub mqtt_connected: bool,
    pub queued: usize,
    pub in_flight: usize,
    pub devices_online: usize,
    pub devices_known: usize,
}

/// What the scheduler can be asked.
pub enum Command {
    Submit {
        req: SubmitRequest,
        resp: oneshot::Sender<Result<SubmitResponse, ApiError>>,
    },
    Get {
        id: String,
        resp: oneshot::Sender<Result<Option<TaskView>, ApiError>>,
    },
    /// Answers when the task is terminal (or at once if it already is or is unknown).
    Wait {
        id: String,
        resp: oneshot::Sender<Result<Option<TaskView>, ApiError>>,
    },
    List {
        state: Option<TaskState>,
        limit: u32,
        resp: oneshot::Sender<Result<Vec<TaskView>, ApiError>>,
    },
    Cancel {
        id: String,
        resp: oneshot::Sender<Result<TaskView, ApiError>>,
    },
    Devices {
        resp: oneshot::Sender<Vec<DeviceView>>,
    },
    Health {
        resp: oneshot::Sender<Health>,
    },
    Mqtt(MqttEvent),
    /// A dispatch publish could not be queued on the client.
    DispatchFailed {
        id: String,
    },
}

/// Handle used by the HTTP layer.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
}

impl SchedulerHandle {
    /// Sends a command and waits for its answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ApiError::Unavailable("scheduler is shutting down".into()))?;
        rx.await
            .map_err(|_| ApiError::Unavailable("scheduler dropped the request".into()))
    }

    /// The raw sender (the MQTT bridge uses it).
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }
}

type Waiter = oneshot::Sender<Result<Option<TaskView>, ApiError>>;

/// How a task goes back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requeue {
    /// It failed with a retryable error: the attempt counts and the retry
    /// backs off exponentially.
    Failed,
    /// Its device went away: the attempt counts (a task that kills its agent
    /// must not bounce forever) but the retry waits only the base back-off,
    /// since it is not the task's fault and a lost device gets no dispatches.
    DeviceLost,
    /// The device refused it unstarted (busy, shutting down): free and at once.
    Free,
}

enum Effect {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        /// Task to put back in the queue if the publish cannot be queued.
        dispatch_of: Option<String>,
    },
    Ack(Publish),
    Reply(Box<dyn FnOnce(bool) + Send>),
}

struct Task {
    row: TaskRow,
    key: (Reverse<i64>, u64),
    not_before: Instant,
    deadline: Option<Instant>,
    /// The device that had it before a server restart, and until when the
    /// task waits for that device to come back rather than go to another:
    /// it may have run it already, and only its ledger knows.
    prefer: Option<(String, Instant)>,
    /// When the task was last published to its device (while dispatched).
    last_sent: Option<Instant>,
}

struct Device {
    status: DeviceStatus,
    online: bool,
    last_seen: Instant,
    last_seen_ms: u64,
    assigned: HashSet<String>,
    busy_until: Option<Instant>,
}

impl Device {
    fn capacity(&self) -> usize {
        // Both from the network: a u32 sum could overflow (a panic in a
        // debug build, a wrapped tiny capacity in a release build).
        (self.status.max_concurrency as usize)
            .saturating_add(self.status.queue_capacity as usize)
            .max(1)
    }
    fn view(&self) -> DeviceView {
        let s = &self.status;
        DeviceView {
            id: s.device_id.clone(),
            board: s.board.clone(),
            online: self.online,
            agent_version: s.agent_version.clone(),
            plugins: s.plugins.clone(),
            capabilities: s.capabilities.clone(),
            assigned: self.assigned.len() as u32,
            max_concurrency: s.max_concurrency,
            queue_capacity: s.queue_capacity,
            running: s.running,
            queued: s.queued,
            load1: s.load1,
            mem_total_kb: s.mem_total_kb,
            mem_available_kb: s.mem_available_kb,
            temperature_c: s.temperature_c,
            last_heartbeat_ms: self.last_seen_ms,
            malformed: s.malformed,
            storage: s.storage,
        }
    }
}

/// Scheduler state; lives in one task.
pub struct Scheduler {
    cfg: SchedulerSection,
    store: Store,
    client: AsyncClient,
    max_payload: usize,
    tasks: HashMap<String, Task>,
    queue: BTreeMap<(Reverse<i64>, u64), String>,
    seq: u64,
    devices: BTreeMap<String, Device>,
    waiters: HashMap<String, Vec<Waiter>>,
    connected: bool,
    effects: Vec<Effect>,
    self_tx: mpsc::WeakSender<Command>,
}

const QUEUE_SCAN: usize = 4096;

impl Scheduler {
    /// Loads known devices and unfinished tasks from the store.
    pub fn new(
        cfg: SchedulerSection,
        store: Store,
        client: AsyncClient,
        max_payload: usize,
    ) -> Result<(Scheduler, SchedulerHandle, mpsc::Receiver<Command>), StoreError> {
        let (tx, rx) = mpsc::channel(4096);
        let mut s = Scheduler {
            cfg,
            store,
            client,
            max_payload,
            tasks: HashMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            devices: BTreeMap::new(),
            waiters: HashMap::new(),
            connected: false,
            effects: Vec::new(),
            self_tx: tx.downgrade(),
        };
        let now = Instant::now();
        for (id, bytes, last_seen_ms) in s.store.devices()? {
            if let Ok(status) = DeviceStatus::decode(&bytes, usize::MAX) {
                s.devices.insert(
                    id,
                    Device {
                        status,
                        online: false,
                        last_seen: now,
                        last_seen_ms,
                        assigned: HashSet::new(),
                        busy_until: None,
                    },
                );
            }
        }
        let mut recovered = 0;
        s.store.begin()?;
        for mut row in s.store.unfinished()? {
            // As long as the server would wait before declaring the device
            // lost (its heartbeat interval times offline_after_missed).
            let prefer = row.device.take().map(|d| {
                let hb = s
                    .devices
                    .get(&d)
                    .map_or(5000, |x| x.status.heartbeat_ms.max(100) as u64);
                let wait = Duration::from_millis(hb * s.cfg.offline_after_missed as u64);
                (d, now + wait)
            });
            if row.state != TaskState::Queued {
                // The interrupted dispatch is retried as the same attempt; the
                // previous device is favoured so its ledger answers a repeat.
                row.attempts = row.attempts.saturating_sub(1);
                row.state = TaskState::Queued;
                s.store.save(&row)?;
            }
            s.enqueue(row, now, prefer);
            recovered += 1;
        }
        s.store.commit()?;
        if recovered > 0 {
            log::info!("scheduler: recovered {recovered} unfinished task(s) from the store");
        }
        Ok((s, SchedulerHandle { tx }, rx))
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        loop {
            let ticked = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 { break; }
                    false
                }
                _ = tick.tick() => true,
            };
            if let Err(e) = self.store.begin() {
                log::error!("scheduler: cannot start a transaction: {e}");
            }
            for cmd in batch.drain(..) {
                if let Err(e) = self.handle(cmd) {
                    log::error!("scheduler: {e}");
                }
            }
            if ticked {
                if let Err(e) = self.on_tick() {
                    log::error!("scheduler: {e}");
                }
            }
            if let Err(e) = self.dispatch() {
                log::error!("scheduler: dispatch: {e}");
            }
            let store = &mut self.store;
            let committed = match crate::blocking(|| store.commit()) {
                Ok(()) => true,
                Err(e) => {
                    log::error!("scheduler: commit failed, refusing this batch's submissions: {e}");
                    false
                }
            };
            self.flush(committed);
        }
        log::info!("scheduler stopped");
    }

    fn flush(&mut self, committed: bool) {
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::Reply(f) => f(committed),
                // Nothing leaves unless it is on disk: an uncommitted batch
                // answers its clients with errors and tells MQTT nothing.
                _ if !committed => {}
                Effect::Ack(p) => {
                    let _ = self.client.try_ack(&p);
                }
                Effect::Publish {
                    topic,
                    payload,
                    retain,
                    dispatch_of,
                } => {
                    if let Err(e) =
                        self.client
                            .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
                    {
                        log::warn!("scheduler: publish to {topic} failed: {e}");
                        if let (Some(id), Some(tx)) = (dispatch_of, self.self_tx.upgrade()) {
                            let _ = tx.try_send(Command::DispatchFailed { id });
                        }
                    }
                }
            }
        }
    }

    fn reply<T: Send + 'static>(
        &mut self,
        resp: oneshot::Sender<Result<T, ApiError>>,
        value: Result<T, ApiError>,
    ) {
        self.effects.push(Effect::Reply(Box::new(move |committed| {
            let _ = resp.send(if committed {
                value
            } else {
                Err(ApiError::Unavailable(
                    "the task store could not commit; nothing was accepted".into(),
                ))
            });
        })));
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.effects.push(Effect::Publish {
            topic,
            payload,
            retain: false,
            dispatch_of: None,
        });
    }

    fn handle(&mut self, cmd: Command) -> Result<(), StoreError> {
        match cmd {
            Command::Submit { req, resp } => {
                let r = self.submit(req);
                let r = match r {
                    Ok(r) => Ok(r),
                    Err(SubmitFail::Api(e)) => Err(e),
                    Err(SubmitFail::Store(e)) => return Err(e),
                };
                self.reply(resp, r);
            }
            Command::Get { id, resp } => {
                let v = match self.tasks.get(&id) {
                    Some(t) => Ok(Some(t.row.view())),
                    None => self
                        .store
                        .get(&id)
                        .map(|r| r.map(|r| r.view()))
                        .map_err(|e| ApiError::Unavailable(e.to_string())),
                };
                let _ = resp.send(v);
            }
            Command::Wait { id, resp } => {
                if self.tasks.contains_key(&id) {
                    let waiters = self.waiters.entry(id).or_default();
                    // Drop waiters whose HTTP request already gave up.
                    waiters.retain(|w| !w.is_closed());
                    waiters.push(resp);
                } else {
                    let v = self
                        .store
                        .get(&id)
                        .map(|r| r.map(|r| r.view()))
                        .map_err(|e| ApiError::Unavailable(e.to_string()));
                    let _ = resp.send(v);
                }
            }
            Command::List {
                state: Some(state),
                limit,
                resp,
            } if !state.is_terminal() => {
                // Unfinished tasks all live here, with their current state
                // (the store does not record `running`).
                let mut v: Vec<&Task> = self
                    .tasks
                    .values()
                    .filter(|t| t.row.state == state)
                    .collect();
                v.sort_by_key(|t| Reverse(t.row.created_ms));
                let v = v
                    .iter()
                    .take(limit as usize)
                    .map(|t| t.row.view())
                    .collect();
                let _ = resp.send(Ok(v));
            }
            Command::List { state, limit, resp } => {
                let v = self
                    .store
                    .list(state, limit)
                    .map(|rows| {
                        rows.into_iter()
                            .map(|r| match self.tasks.get(&r.id) {
                                Some(t) => t.row.view(),
                                None => r.view(),
                            })
                            .collect()
                    })
                    .map_err(|e| ApiError::Unavailable(e.to_string()));
                let _ = resp.send(v);
            }
            Command::Cancel { id, resp } => {
                let r = self.cancel(&id)?;
                self.reply(resp, r);
            }
            Command::Devices { resp } => {
                let _ = resp.send(self.devices.values().map(Device::view).collect());
            }
            Command::Health { resp } => {
                let in_flight = self.tasks.len() - self.queue.len();
                let _ = resp.send(Health {
                    status: "ok".into(),
                    mqtt_connected: self.connected,
                    queued: self.queue.len(),
                    in_flight,
                    devices_online: self.devices.values().filter(|d| d.online).count(),
                    devices_known: self.devices.len(),
                });
            }
            Command::Mqtt(ev) => self.on_mqtt(ev)?,
            Command::DispatchFailed { id } => {
                if let Some(t) = self.tasks.get(&id) {
                    if t.row.state == TaskState::Dispatched {
                        let mut row = t.row.clone();
                        self.unassign(&row);
                        row.attempts = row.attempts.saturating_sub(1);
                        row.state = TaskState::Queued;
                        row.device = None;
                        self.tasks.remove(&id);
                        self.store.save(&row)?;
                        self.enqueue(row, Instant::now(), None);
                    }
                }
            }
        }
        Ok(())
    }

    fn submit(&mut self, req: SubmitRequest) -> Result<SubmitResponse, SubmitFail> {
        let bad = |m: String| Err(SubmitFail::Api(ApiError::BadRequest(m)));
        if req.plugin.is_empty() || req.plugin.len() > 64 {
            return bad("`plugin` must be 1 to 64 characters".into());
        }
        let priority = req.priority.unwrap_or(self.cfg.default_priority);
        if priority > 100 {
            return bad(format!("`priority` {priority} is out of range 0..=100"));
        }
        let timeout_ms = req.timeout_ms.unwrap_or(self.cfg.default_timeout_ms);
        if timeout_ms == 0 || timeout_ms > 86_400_000 {
            return bad(format!(
                "`timeout_ms` {timeout_ms} is out of range 1..=86400000"
            ));
        }
        let max_attempts = req.max_attempts.unwrap_or(self.cfg.default_max_attempts);
        if max_attempts == 0 || max_attempts > 100 {
            return bad(format!(
                "`max_attempts` {max_attempts} is out of range 1..=100"
            ));
        }
        if let Some(topic) = &req.reply_to {
            if topic.is_empty() || topic.contains(['+', '#']) || topic.starts_with(topics::ROOT) {
                return bad(format!(
                    "`reply_to` `{topic}` must be a plain topic outside {}/",
                    topics::ROOT
                ));
            }
        }
        if let Some(cap) = &req.capability {
            if cap.is_empty() {
                return bad("`capability` must not be empty".into());
            }
        }
        // Exactly what was submitted reaches the agent, or a clear 400.
        let input = match Value::try_from_json(&req.input) {
            Ok(v) => v,
            Err(m) => return bad(format!("`input`: {m}")),
        };
        let size = protocol::encode(&input).len();
        if size + 512 > self.max_payload {
            return Err(SubmitFail::Api(ApiError::TooLarge(format!(
                "`input` encodes to {size} bytes; the limit is {} bytes",
                self.max_payload - 512
            ))));
        }
        if let Some(target) = &req.target {
            match self.devices.get(target) {
                None => {
                    return Err(SubmitFail::Api(ApiError::NotFound(format!(
                        "device `{target}` does not exist (known: {})",
                        self.known_devices()
                    ))))
                }
                Some(d) if !d.status.plugins.contains(&req.plugin) => {
                    return Err(SubmitFail::Api(ApiError::Unprocessable(format!(
                        "device `{target}` has no plugin `{}` (it has: {})",
                        req.plugin,
                        d.status.plugins.join(", ")
                    ))))
                }
                Some(_) => {}
            }
        } else if !self
            .devices
            .values()
            .any(|d| d.status.plugins.contains(&req.plugin))
        {
            let mut all: Vec<&str> = self
                .devices
                .values()
                .flat_map(|d| d.status.plugins.iter().map(String::as_str))
                .collect();
            all.sort();
            all.dedup();
            return Err(SubmitFail::Api(ApiError::Unprocessable(format!(
                "unknown plugin `{}`: no known device offers it (known plugins: {})",
                req.plugin,
                if all.is_empty() {
                    "none yet".into()
                } else {
                    all.join(", ")
                }
            ))));
        }
        let row = TaskRow {
            // Time-ordered (UUID v7): new ids go to the end of the primary
            // key index, so a batch of submissions dirties a page or two of
            // it instead of one random page each (fewer WAL writes per
            // commit).
            id: uuid::Uuid::now_v7().to_string(),
            plugin: req.plugin,
            input: req.input.to_string(),
            priority,
            target: req.target,
            capability: req.capability,
            timeout_ms,
            max_attempts,
            reply_to: req.reply_to,
            correlation: req.correlation,
            state: TaskState::Queued,
            attempts: 0,
            device: None,
            result: None,
            error: None,
            created_ms: crate::now_ms(),
            dispatched_ms: None,
            started_ms: None,
            finished_ms: None,
        };
        self.store.save(&row).map_err(SubmitFail::Store)?;
        let resp = SubmitResponse {
            id: row.id.clone(),
            state: TaskState::Queued,
        };
        if let Some(topic) = row.reply_to.clone() {
            let reply = Reply {
                event: "accepted".into(),
                id: Some(row.id.clone()),
                correlation: row.correlation.clone(),
                result: None,
                error: None,
            };
            self.publish(topic, serde_json::to_vec(&reply).unwrap_or_default());
        }
        self.enqueue(row, Instant::now(), None);
        Ok(resp)
    }

    fn known_devices(&self) -> String {
        if self.devices.is_empty() {
            "none".into()
        } else {
            self.devices.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    fn enqueue(&mut self, row: TaskRow, not_before: Instant, prefer: Option<(String, Instant)>) {
        self.seq += 1;
        let score = row.priority as i64 * self.cfg.aging_ms as i64 - row.created_ms as i64;
        let key = (Reverse(score), self.seq);
        self.queue.insert(key, row.id.clone());
        self.tasks.insert(
            row.id.clone(),
            Task {
                row,
                key,
                not_before,
                deadline: None,
                prefer,
                last_sent: None,
            },
        );
    }

    fn cancel(&mut self, id: &str) -> Result<Result<TaskView, ApiError>, StoreError> {
        let Some(t) = self.tasks.get(id) else {
            return Ok(match self.store.get(id)? {
                Some(r) => Err(ApiError::Conflict(format!(
                    "task {id} already finished ({})",
                    r.state.as_str()
                ))),
                None => Err(ApiError::NotFound(format!("task {id} does not exist"))),
            });
        };
        if let Some(dev) = t.row.device.clone() {
            if t.row.state != TaskState::Queued {
                self.publish(
                    topics::tasks(&dev),
                    protocol::encode(&ToAgent::Cancel {
                        task_id: id.to_string(),
                    }),
                );
            }
        }
        let view = self.terminate(
            id,
            TaskState::Cancelled,
            None,
            Some("cancelled by request".into()),
        )?;
        Ok(Ok(view))
    }

    /// Moves an unfinished task to a terminal state and tells whoever waits.
    fn terminate(
        &mut self,
        id: &str,
        state: TaskState,
        result: Option<String>,
        error: Option<String>,
    ) -> Result<TaskView, StoreError> {
        let mut t = self.tasks.remove(id).expect("terminate of a known task");
        self.queue.remove(&t.key);
        self.unassign(&t.row);
        t.row.state = state;
        t.row.result = result;
        t.row.error = error;
        t.row.finished_ms = Some(crate::now_ms());
        self.store.save(&t.row)?;
        let view = t.row.view();
        for w in self.waiters.remove(id).unwrap_or_default() {
            let v = view.clone();
            self.effects.push(Effect::Reply(Box::new(move |_| {
                let _ = w.send(Ok(Some(v)));
            })));
        }
        if let Some(topic) = t.row.reply_to.clone() {
            let reply = Reply {
                event: state.as_str().into(),
                id: Some(view.id.clone()),
                correlation: t.row.correlation.clone(),
                result: view.result.clone(),
                error: view.error.clone(),
            };
            self.publish(topic, serde_json::to_vec(&reply).unwrap_or_default());
        }
        Ok(view)
    }

    fn unassign(&mut self, row: &TaskRow) {
        if let Some(dev) = &row.device {
            if let Some(d) = self.devices.get_mut(dev) {
                d.assigned.remove(&row.id);
            }
        }
    }

    /// Puts a dispatched task back in the queue, or fails it when its
    /// attempts are used up.
    fn requeue(&mut self, id: &str, reason: &str, how: Requeue) -> Result<(), StoreError> {
        let count_attempt = how != Requeue::Free;
        let Some(t) = self.tasks.get(id) else {
            return Ok(());
        };
        let mut row = t.row.clone();
        if !count_attempt {
            row.attempts = row.attempts.saturating_sub(1);
        }
        if row.attempts >= row.max_attempts {
            let msg = format!("gave up after {} attempt(s): {reason}", row.attempts);
            self.terminate(id, TaskState::Failed, None, Some(msg))?;
            return Ok(());
        }
        self.unassign(&row);
        self.tasks.remove(id);
        let delay = match how {
            Requeue::Failed => {
                let exp = row.attempts.saturating_sub(1).min(16);
                (self.cfg.retry_backoff_ms << exp).min(self.cfg.retry_backoff_max_ms)
            }
            Requeue::DeviceLost => self.cfg.retry_backoff_ms,
            Requeue::Free => 0,
        };
        log::info!(
            "task {id}: back to the queue ({reason}); attempt {} of {}, retry in {delay} ms",
            row.attempts,
            row.max_attempts
        );
        row.state = TaskState::Queued;
        row.device = None;
        row.error = Some(reason.to_string());
        self.store.save(&row)?;
        self.enqueue(row, Instant::now() + Duration::from_millis(delay), None);
        Ok(())
    }

    fn on_mqtt(&mut self, ev: MqttEvent) -> Result<(), StoreError> {
        match ev {
            MqttEvent::Connected { .. } => {
                self.connected = true;
                // Our client may have dropped unacked dispatches on
                // reconnect; agents answer repeats, so send them again.
                let pending: Vec<(String, TaskSpec)> = self
                    .tasks
                    .values()
                    .filter(|t| t.row.state == TaskState::Dispatched)
                    .filter_map(|t| Some((t.row.device.clone()?, spec_of(&t.row))))
                    .collect();
                for (dev, spec) in pending {
                    self.publish(topics::tasks(&dev), protocol::encode(&ToAgent::Task(spec)));
                }
            }
            MqttEvent::Disconnected(_) => self.connected = false,
            MqttEvent::Message(p) => {
                self.on_publish(&p)?;
                self.effects.push(Effect::Ack(p));
            }
        }
        Ok(())
    }

    fn on_publish(&mut self, p: &Publish) -> Result<(), StoreError> {
        if p.topic == topics::SUBMIT {
            return self.on_mqtt_submit(&p.payload);
        }
        let Some((device, kind)) = topics::parse(&p.topic) else {
            log::warn!("ignoring message on unexpected topic {}", p.topic);
            return Ok(());
        };
        let device = device.to_string();
        match kind {
            topics::Kind::Status => match DeviceStatus::decode(&p.payload, self.max_payload) {
                Ok(s) if s.device_id == device => self.on_status(s)?,
                Ok(s) => log::warn!(
                    "status on {} names another device `{}`; ignored",
                    p.topic,
                    s.device_id
                ),
                Err(e) => log::warn!("malformed status on {}: {e}", p.topic),
            },
            topics::Kind::Results => {
                match protocol::decode::<FromAgent>(&p.payload, self.max_payload) {
                    Ok(msg) => self.on_agent(&device, msg)?,
                    Err(e) => log::warn!("malformed result on {}: {e}", p.topic),
                }
            }
            topics::Kind::Tasks => {}
        }
        Ok(())
    }

    fn on_mqtt_submit(&mut self, payload: &[u8]) -> Result<(), StoreError> {
        let parsed: Result<SubmitRequest, String> = if payload.len() > self.max_payload {
            Err(format!(
                "payload of {} bytes is over the limit",
                payload.len()
            ))
        } else {
            serde_json::from_slice(payload).map_err(|e| format!("invalid submission: {e}"))
        };
        let (error, reply_to, correlation) = match parsed {
            Ok(req) => {
                let (reply_to, correlation) = (req.reply_to.clone(), req.correlation.clone());
                match self.submit(req) {
                    Ok(_) => return Ok(()),
                    Err(SubmitFail::Api(e)) => (e.to_string(), reply_to, correlation),
                    Err(SubmitFail::Store(e)) => return Err(e),
                }
            }
            Err(e) => {
                // A broken submission may still name where to answer.
                let loose: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
                let field = |k: &str| {
                    loose
                        .as_ref()
                        .and_then(|v| v.get(k))
                        .and_then(|v| v.as_str())
                        .map(String::from)
                };
                (e, field("reply_to"), field("correlation"))
            }
        };
        log::warn!("rejected submission on {}: {error}", topics::SUBMIT);
        if let Some(topic) =
            reply_to.filter(|t| !t.starts_with(topics::ROOT) && !t.contains(['+', '#']))
        {
            let reply = Reply {
                event: "rejected".into(),
                id: None,
                correlation,
                result: None,
                error: Some(error),
            };
            self.publish(topic, serde_json::to_vec(&reply).unwrap_or_default());
        }
        Ok(())
    }

    fn on_status(&mut self, s: DeviceStatus) -> Result<(), StoreError> {
        let now = Instant::now();
        let now_ms = crate::now_ms();
        let id = s.device_id.clone();
        let online = s.online;
        self.store.save_device(&id, &protocol::encode(&s), now_ms)?;
        let dev = self.devices.entry(id.clone()).or_insert_with(|| Device {
            status: s.clone(),
            online: false,
            last_seen: now,
            last_seen_ms: now_ms,
            assigned: HashSet::new(),
            busy_until: None,
        });
        let was_online = dev.online;
        dev.online = online;
        // A last will carries no plugin list or limits: keep what the device
        // last told us, so tasks for it still queue while it is away.
        if online {
            dev.status = s;
        }
        dev.last_seen = now;
        dev.last_seen_ms = now_ms;
        if online && !was_online {
            log::info!("device {id} is online");
        }
        if !online && was_online {
            self.device_lost(&id, "device went offline")?;
        }
        Ok(())
    }

    fn device_lost(&mut self, id: &str, why: &str) -> Result<(), StoreError> {
        let assigned: Vec<String> = match self.devices.get_mut(id) {
            Some(d) => {
                d.online = false;
                d.assigned.iter().cloned().collect()
            }
            None => return Ok(()),
        };
        log::warn!("device {id}: {why}; re-queueing {} task(s)", assigned.len());
        for task in assigned {
            self.requeue(&task, &format!("device {id}: {why}"), Requeue::DeviceLost)?;
        }
        Ok(())
    }

    fn on_agent(&mut self, device: &str, msg: FromAgent) -> Result<(), StoreError> {
        match msg {
            FromAgent::Started { task_id } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    if t.row.state == TaskState::Dispatched
                        && t.row.device.as_deref() == Some(device)
                    {
                        t.row.state = TaskState::Running;
                        t.row.started_ms = Some(crate::now_ms());
                        // The agent's clock for the task starts now, so ours restarts too.
                        t.deadline = Some(
                            Instant::now()
                                + Duration::from_millis(
                                    t.row.timeout_ms + self.cfg.timeout_grace_ms,
                                ),
                        );
                        // Not written to the store: after a restart a
                        // running task is recovered exactly like a
                        // dispatched one, and the terminal write carries
                        // `started_ms`. One write per task fewer.
                    }
                }
            }
            FromAgent::Rejected { task_id, reason } => {
                let ours = self.tasks.get(&task_id).is_some_and(|t| {
                    t.row.device.as_deref() == Some(device) && !t.row.state.is_terminal()
                });
                if ours {
                    if let Some(d) = self.devices.get_mut(device) {
                        d.busy_until = Some(Instant::now() + Duration::from_millis(250));
                    }
                    // A device that cannot store tasks uses up an attempt:
                    // the task fails with the reason instead of bouncing forever.
                    let (why, counts) = match reason {
                        RejectReason::Busy => ("device busy".to_string(), Requeue::Free),
                        RejectReason::ShuttingDown => {
                            ("device shutting down".to_string(), Requeue::Free)
                        }
                        RejectReason::NoSpace => (
                            format!("device {device}: disk full, no space left to record the task"),
                            Requeue::Failed,
                        ),
                        RejectReason::StorageFailed => (
                            format!("device {device}: storage error, could not record the task"),
                            Requeue::Failed,
                        ),
                    };
                    self.requeue(&task_id, &why, counts)?;
                }
            }
            FromAgent::Finished(outcome) => {
                let id = outcome.task_id.clone();
                if self.tasks.contains_key(&id) {
                    // First result wins, even from a device the task was
                    // taken away from: the work was done.
                    if let Some(t) = self.tasks.get_mut(&id) {
                        if t.row.device.as_deref() != Some(device) {
                            self.unassign(&self.tasks[&id].row.clone());
                            if let Some(t) = self.tasks.get_mut(&id) {
                                t.row.device = Some(device.to_string());
                            }
                        }
                    }
                    match outcome.result {
                        Ok(v) => {
                            let json = serde_json::Value::from(v).to_string();
                            self.terminate(&id, TaskState::Succeeded, Some(json), None)?;
                        }
                        Err(e) => {
                            let msg = format!("{:?}: {}", e.kind, e.message);
                            let attempts_left =
                                self.tasks[&id].row.attempts < self.tasks[&id].row.max_attempts;
                            match e.kind {
                                ErrorKind::Timeout => {
                                    self.terminate(&id, TaskState::TimedOut, None, Some(msg))?;
                                }
                                ErrorKind::Cancelled => {
                                    self.terminate(&id, TaskState::Cancelled, None, Some(msg))?;
                                }
                                _ if e.retryable && attempts_left => {
                                    self.requeue(&id, &msg, Requeue::Failed)?;
                                }
                                _ => {
                                    self.terminate(&id, TaskState::Failed, None, Some(msg))?;
                                }
                            }
                        }
                    }
                }
                // Always confirm, duplicates included, so the agent's outbox drains.
                self.publish(
                    topics::tasks(device),
                    protocol::encode(&ToAgent::ResultAck { task_id: id }),
                );
            }
        }
        Ok(())
    }

    fn on_tick(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        let late: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| {
                let hb = Duration::from_millis(d.status.heartbeat_ms.max(100) as u64);
                d.online && now.duration_since(d.last_seen) > hb * self.cfg.offline_after_missed
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            self.device_lost(&id, "missed heartbeats")?;
        }
        // A dispatch can be lost on the way (a broker restart, a session the
        // broker dropped): one not started after as long as a device is given
        // to show life goes to the same device again. The agent answers a
        // repeat without running it twice (already queued, running or done).
        let mut resend = Vec::new();
        for t in self.tasks.values_mut() {
            if t.row.state != TaskState::Dispatched {
                continue;
            }
            let Some(d) = t.row.device.as_ref().and_then(|d| self.devices.get(d)) else {
                continue;
            };
            let wait = Duration::from_millis(d.status.heartbeat_ms.max(100) as u64)
                * self.cfg.offline_after_missed;
            if d.online && t.last_sent.is_some_and(|s| now.duration_since(s) >= wait) {
                t.last_sent = Some(now);
                resend.push((d.status.device_id.clone(), spec_of(&t.row)));
            }
        }
        for (dev, spec) in resend {
            log::info!(
                "task {}: not started on {dev} yet, sending it again",
                spec.id
            );
            self.publish(topics::tasks(&dev), protocol::encode(&ToAgent::Task(spec)));
        }
        let expired: Vec<(String, Option<String>, u64)> = self
            .tasks
            .values()
            .filter(|t| t.deadline.is_some_and(|d| d <= now))
            .filter(|t| matches!(t.row.state, TaskState::Dispatched | TaskState::Running))
            .map(|t| (t.row.id.clone(), t.row.device.clone(), t.row.timeout_ms))
            .collect();
        for (id, dev, timeout) in expired {
            if let Some(dev) = &dev {
                self.publish(
                    topics::tasks(dev),
                    protocol::encode(&ToAgent::Cancel {
                        task_id: id.clone(),
                    }),
                );
            }
            let msg = format!(
                "no result within {timeout} ms (+{} ms grace) from device {}",
                self.cfg.timeout_grace_ms,
                dev.as_deref().unwrap_or("?")
            );
            self.terminate(&id, TaskState::TimedOut, None, Some(msg))?;
        }
        Ok(())
    }

    fn eligible(&self, d: &Device, t: &Task, now: Instant) -> bool {
        d.online
            && d.busy_until.is_none_or(|b| b <= now)
            && d.assigned.len() < d.capacity()
            && d.status.plugins.contains(&t.row.plugin)
            && t.row
                .target
                .as_ref()
                .is_none_or(|x| *x == d.status.device_id)
            && t.row
                .capability
                .as_ref()
                .is_none_or(|c| d.status.capabilities.contains(c))
    }

    fn dispatch(&mut self) -> Result<(), StoreError> {
        if !self.connected || self.queue.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        // Walk the queue in order with a cursor, not a copy of its first
        // QUEUE_SCAN entries: with thousands queued and a few slots free,
        // copying them cost an allocation per queued task per batch.
        let mut cursor: Option<(Reverse<i64>, u64)> = None;
        for _ in 0..QUEUE_SCAN {
            let next = match cursor {
                None => self.queue.iter().next(),
                Some(c) => self
                    .queue
                    .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                    .next(),
            };
            let Some((key, id)) = next.map(|(k, v)| (*k, v.clone())) else {
                break;
            };
            cursor = Some(key);
            if !self
                .devices
                .values()
                .any(|d| d.online && d.assigned.len() < d.capacity())
            {
                break;
            }
            let t = &self.tasks[&id];
            if t.not_before > now {
                continue;
            }
            let prefer = t
                .prefer
                .as_ref()
                .and_then(|(p, until)| Some((self.devices.get(p)?, *until)));
            if prefer.is_some_and(|(d, until)| !d.online && now < until) {
                // Not back yet: sending it elsewhere could do it twice.
                continue;
            }
            let preferred = prefer.map(|(d, _)| d).filter(|d| self.eligible(d, t, now));
            let chosen = preferred
                .or_else(|| {
                    self.devices
                        .values()
                        .filter(|d| self.eligible(d, t, now))
                        .min_by(|a, b| {
                            let la = a.assigned.len() as f32 / a.capacity() as f32;
                            let lb = b.assigned.len() as f32 / b.capacity() as f32;
                            la.total_cmp(&lb)
                                .then(a.status.load1.total_cmp(&b.status.load1))
                        })
                })
                .map(|d| d.status.device_id.clone());
            let Some(dev) = chosen else { continue };
            self.queue.remove(&key);
            let t = self.tasks.get_mut(&id).expect("queued task is known");
            t.row.state = TaskState::Dispatched;
            t.row.device = Some(dev.clone());
            t.row.attempts += 1;
            t.row.dispatched_ms = Some(crate::now_ms());
            t.deadline =
                Some(now + Duration::from_millis(t.row.timeout_ms + self.cfg.timeout_grace_ms));
            t.last_sent = Some(now);
            let spec = spec_of(&t.row);
            let row = t.row.clone();
            self.store.save(&row)?;
            if let Some(d) = self.devices.get_mut(&dev) {
                d.assigned.insert(id.clone());
            }
            self.effects.push(Effect::Publish {
                topic: topics::tasks(&dev),
                payload: protocol::encode(&ToAgent::Task(spec)),
                retain: false,
                dispatch_of: Some(id),
            });
        }
        Ok(())
    }
}

enum SubmitFail {
    Api(ApiError),
    Store(StoreError),
}

fn spec_of(row: &TaskRow) -> TaskSpec {
    TaskSpec {
        id: row.id.clone(),
        plugin: row.plugin.clone(),
        input: serde_json::from_str::<serde_json::Value>(&row.input)
            .unwrap_or_default()
            .into(),
        timeout_ms: row.timeout_ms,
        attempt: row.attempts,
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler's decisions with a paused clock: no broker, the
    //! client's request channel just collects what would be published.
    use super::*;
    use crate::protocol::TaskOutcome;

    fn cfg() -> SchedulerSection {
        SchedulerSection {
            default_priority: 50,
            aging_ms: 1000,
            default_timeout_ms: 30_000,
            timeout_grace_ms: 2000,
            default_max_attempts: 3,
            retry_backoff_ms: 500,
            retry_backoff_max_ms: 30_000,
            offline_after_missed: 3,
        }
    }

    struct Rig {
        s: Scheduler,
        _dir: tempfile::TempDir,
        _rx: mpsc::Receiver<Command>,
        _el: rumqttc::EventLoop,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "normal").unwrap();
        let (client, el) = AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 10_000);
        let (mut s, _h, rx) = Scheduler::new(cfg(), store, client, 1 << 20).unwrap();
        s.connected = true;
        Rig {
            s,
            _dir: dir,
            _rx: rx,
            _el: el,
        }
    }

    fn status(id: &str, caps: &[&str], slots: u32) -> DeviceStatus {
        DeviceStatus {
            device_id: id.into(),
            online: true,
            board: "sim".into(),
            plugins: vec!["echo".into()],
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            max_concurrency: slots,
            queue_capacity: 0,
            heartbeat_ms: 1000,
            ..Default::default()
        }
    }

    fn heartbeat(s: &mut Scheduler, st: &DeviceStatus) {
        let p = Publish::new(
            topics::status(&st.device_id),
            QoS::AtLeastOnce,
            protocol::encode(st),
        );
        s.handle(Command::Mqtt(MqttEvent::Message(p))).unwrap();
    }

    fn submit(s: &mut Scheduler, req: SubmitRequest) -> String {
        let r = s.submit(req);
        match r {
            Ok(r) => r.id,
            Err(_) => panic!("submit refused"),
        }
    }

    fn req(capability: Option<&str>, target: Option<&str>) -> SubmitRequest {
        SubmitRequest {
            plugin: "echo".into(),
            input: serde_json::json!(1),
            priority: None,
            target: target.map(String::from),
            capability: capability.map(String::from),
            timeout_ms: Some(1000),
            max_attempts: None,
            reply_to: None,
            correlation: None,
        }
    }

    /// A task that neither times out nor runs out of attempts in a test.
    fn long_req() -> SubmitRequest {
        let mut long = req(None, None);
        long.timeout_ms = Some(60_000);
        long.max_attempts = Some(10);
        long
    }

    fn device_of(s: &Scheduler, id: &str) -> Option<String> {
        s.tasks[id].row.device.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn routes_by_capability_target_and_load() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &["gpu"], 4));
        heartbeat(s, &status("b", &[], 4));
        let gpu = submit(s, req(Some("gpu"), None));
        let pinned = submit(s, req(None, Some("b")));
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &gpu).as_deref(), Some("a"));
        assert_eq!(device_of(s, &pinned).as_deref(), Some("b"));
        // Equal load now (1 each): the next two spread over both.
        let x = submit(s, req(None, None));
        let y = submit(s, req(None, None));
        s.dispatch().unwrap();
        let mut got = [device_of(s, &x).unwrap(), device_of(s, &y).unwrap()];
        got.sort();
        assert_eq!(got, ["a".to_string(), "b".to_string()]);
        // A capability nobody has waits in the queue.
        let none = submit(s, req(Some("tpu"), None));
        s.dispatch().unwrap();
        assert_eq!(s.tasks[&none].row.state, TaskState::Queued);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_respected_and_frees_on_results() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 2));
        let ids: Vec<String> = (0..3).map(|_| submit(s, req(None, None))).collect();
        s.dispatch().unwrap();
        let dispatched = ids
            .iter()
            .filter(|i| s.tasks[*i].row.state == TaskState::Dispatched)
            .count();
        assert_eq!(dispatched, 2, "no more than the device's slots");
        let first = ids
            .iter()
            .find(|i| s.tasks[*i].row.state == TaskState::Dispatched)
            .unwrap()
            .clone();
        s.on_agent(
            "a",
            FromAgent::Finished(TaskOutcome {
                task_id: first.clone(),
                result: Ok(Value::Int(1)),
                elapsed_us: 5,
            }),
        )
        .unwrap();
        assert!(!s.tasks.contains_key(&first), "terminal tasks leave memory");
        s.dispatch().unwrap();
        assert!(ids
            .iter()
            .filter(|i| *i != &first)
            .all(|i| s.tasks[i].row.state == TaskState::Dispatched));
    }

    #[tokio::test(start_paused = true)]
    async fn missed_heartbeats_requeue_to_another_device() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 1));
        let id = submit(s, req(None, None));
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("a"));
        heartbeat(s, &status("b", &[], 1));
        // b keeps beating, a falls silent: 3 intervals of 1 s, then offline.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(900)).await;
            heartbeat(s, &status("b", &[], 1));
            s.on_tick().unwrap();
        }
        assert!(!s.devices["a"].online && s.devices["b"].online);
        assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
        // Retry back-off: not before 500 ms.
        s.dispatch().unwrap();
        assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
        tokio::time::advance(Duration::from_millis(501)).await;
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("b"));
        assert_eq!(s.tasks[&id].row.attempts, 2);
        // The last will of an agent keeps its plugin list for routing.
        let mut will = status("b", &[], 0);
        will.online = false;
        will.plugins.clear();
        heartbeat(s, &will);
        assert_eq!(s.devices["b"].status.plugins, vec!["echo".to_string()]);
    }

    /// Found by tests/faults.rs (netns partition): each loss of a device
    /// doubled its tasks' wait, so after a flapping link a task sat queued
    /// for up to 30 s with its device back. A lost device costs an attempt
    /// but only the base delay, however often it happens.
    #[tokio::test(start_paused = true)]
    async fn a_lost_device_costs_an_attempt_but_not_a_growing_wait() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 1));
        let id = submit(s, long_req());
        s.dispatch().unwrap();
        for (lost, next) in [("a", "b"), ("b", "a"), ("a", "b")] {
            assert_eq!(device_of(s, &id).as_deref(), Some(lost));
            // `next` beats, `lost` falls silent until declared lost.
            for _ in 0..4 {
                tokio::time::advance(Duration::from_millis(900)).await;
                heartbeat(s, &status(next, &[], 1));
                s.on_tick().unwrap();
            }
            assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
            tokio::time::advance(Duration::from_millis(501)).await;
            heartbeat(s, &status(next, &[], 1));
            s.dispatch().unwrap();
        }
        assert_eq!(device_of(s, &id).as_deref(), Some("b"));
        assert_eq!(s.tasks[&id].row.attempts, 4);
    }

    /// Found by tests/faults.rs (server SIGKILL under load): after a
    /// restart, a task that was on device `a` went to whichever device came
    /// back first and ran twice. Now it waits for `a` (whose ledger knows
    /// it) as long as `a` would take to be declared lost, then goes on.
    #[tokio::test(start_paused = true)]
    async fn after_a_restart_a_dispatched_task_waits_for_its_device() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let store = Store::open(dir.path(), "normal").unwrap();
            let (client, el) =
                AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 10_000);
            let (mut s, _h, rx) = Scheduler::new(cfg(), store, client, 1 << 20).unwrap();
            s.connected = true;
            (s, rx, el)
        };
        let id = {
            let (mut s, _rx, _el) = open();
            heartbeat(&mut s, &status("a", &[], 2));
            let id = submit(&mut s, req(None, None));
            s.dispatch().unwrap();
            assert_eq!(device_of(&s, &id).as_deref(), Some("a"));
            id
        }; // the server dies here
        {
            let (mut s, _rx, _el) = open();
            heartbeat(&mut s, &status("b", &[], 2));
            for _ in 0..2 {
                s.dispatch().unwrap();
                assert_eq!(s.tasks[&id].row.state, TaskState::Queued, "went to b");
                tokio::time::advance(Duration::from_millis(1000)).await;
                heartbeat(&mut s, &status("b", &[], 2));
            }
            heartbeat(&mut s, &status("a", &[], 2));
            s.dispatch().unwrap();
            assert_eq!(device_of(&s, &id).as_deref(), Some("a"));
            assert_eq!(s.tasks[&id].row.attempts, 1, "the same attempt");
        } // and again; this time `a` stays away
        let (mut s, _rx, _el) = open();
        heartbeat(&mut s, &status("b", &[], 2));
        tokio::time::advance(Duration::from_millis(2900)).await;
        s.dispatch().unwrap();
        assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
        tokio::time::advance(Duration::from_millis(200)).await;
        heartbeat(&mut s, &status("b", &[], 2));
        s.dispatch().unwrap();
        assert_eq!(device_of(&s, &id).as_deref(), Some("b"), "a is lost");
    }

    /// Found by tests/faults.rs (server SIGKILL under load): a dispatch lost
    /// on the way left its task Dispatched until it timed out. It is sent
    /// again to the same device after 3 heartbeat intervals without a start.
    #[tokio::test(start_paused = true)]
    async fn a_dispatch_not_started_is_sent_again() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 2));
        let id = submit(s, long_req());
        s.dispatch().unwrap();
        let sent = |s: &Scheduler| {
            s.effects
                .iter()
                .filter(|e| {
                    matches!(e, Effect::Publish { topic, payload, .. }
                    if topic == &topics::tasks("a")
                        && matches!(protocol::decode::<ToAgent>(payload, usize::MAX),
                            Ok(ToAgent::Task(t)) if t.id == id))
                })
                .count()
        };
        assert_eq!(sent(s), 1);
        tokio::time::advance(Duration::from_millis(2900)).await;
        heartbeat(s, &status("a", &[], 2));
        s.on_tick().unwrap();
        assert_eq!(sent(s), 1, "too early");
        tokio::time::advance(Duration::from_millis(200)).await;
        s.on_tick().unwrap();
        assert_eq!(sent(s), 2, "sent again");
        assert_eq!(s.tasks[&id].row.attempts, 1, "the same attempt");
        // Started: never again.
        s.on_agent(
            "a",
            FromAgent::Started {
                task_id: id.clone(),
            },
        )
        .unwrap();
        tokio::time::advance(Duration::from_millis(2900)).await;
        heartbeat(s, &status("a", &[], 2));
        tokio::time::advance(Duration::from_millis(200)).await;
        s.on_tick().unwrap();
        assert_eq!(sent(s), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn server_side_timeout_and_aging_key() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 4));
        let id = submit(s, req(None, None));
        s.dispatch().unwrap();
        // Keep the device alive; the task never answers.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(1001)).await;
            heartbeat(s, &status("a", &[], 4));
            s.on_tick().unwrap();
        }
        assert!(!s.tasks.contains_key(&id));
        let row = s.store.get(&id).unwrap().unwrap();
        assert_eq!(row.state, TaskState::TimedOut);
        assert!(row.error.unwrap().contains("no result within 1000 ms"));

        // Aging: the key orders by priority * aging - created.
        let mut low = req(None, None);
        low.priority = Some(0);
        let mut high = req(None, None);
        high.priority = Some(100);
        let l = submit(s, low);
        let h = submit(s, high);
        let first = s.queue.values().next().unwrap();
        assert_eq!(first, &h);
        assert_ne!(first, &l);
    }
}
