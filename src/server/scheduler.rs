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
//! rate, the order between two of them never changes, so the queue is
//! keyed once by `priority * aging - created` (higher first). The queue
//! itself ([`super::queue`]) keeps tasks in lanes by what they need, so tasks
//! no device can take are never walked by a dispatch pass.
//!
//! If the store fails (a statement or the `COMMIT`), the batch is rolled
//! back, its effects are dropped (clients hear "nothing was accepted"), the
//! in-memory state is reloaded from the store, and the batch's MQTT messages
//! are handled again in a later batch before they are acknowledged. If the
//! state cannot be reloaded, [`Scheduler::run`] returns the error and the
//! server process ends.

use super::config::SchedulerSection;
use super::queue::{self, Needs, Queue};
use super::store::{Store, StoreError, TaskRow};
use crate::mqtt::MqttEvent;
use crate::protocol::api::{
    DeviceView, Reply, Route, SubmitRequest, SubmitResponse, TaskState, TaskView, ToolView,
};
use crate::protocol::{
    self, topics, Catalog, DeviceStatus, ErrorKind, FromAgent, RejectReason, TaskSpec, ToAgent,
    Value,
};
use rumqttc::{AsyncClient, Publish, QoS};
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
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
    /// Admission: the queue is full; try again after `retry_after_s`.
    #[error("{message}")]
    Busy { message: String, retry_after_s: u64 },
}

/// Why the scheduler stopped on its own (the server then exits non-zero).
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("the task store failed and the state could not be reloaded from it: {0}")]
    Reload(StoreError),
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
    /// `Started`, `Rejected` and `Finished` messages for an open task from a
    /// device it was never dispatched to (the id from the topic): not
    /// recorded, changed nothing. Since the server started.
    #[serde(default)]
    pub forged_results: u64,
    /// Statuses on one device's topic naming another device: ignored.
    #[serde(default)]
    pub forged_statuses: u64,
}

/// Which devices a [`Command::DevicesWhere`] wants.
pub type DevicePick = Box<dyn Fn(&str, &DeviceStatus) -> bool + Send>;

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
    /// The tasks now `running` and when they started: the store does not
    /// record that state, so lists (read from the store outside the
    /// scheduler) take it from here.
    Running {
        resp: oneshot::Sender<HashMap<String, u64>>,
    },
    Cancel {
        id: String,
        resp: oneshot::Sender<Result<TaskView, ApiError>>,
    },
    Devices {
        resp: oneshot::Sender<Vec<DeviceView>>,
    },
    /// The views of the devices `wanted` picks (by id and status): a
    /// caller that follows a few devices often does not copy them all.
    DevicesWhere {
        wanted: DevicePick,
        resp: oneshot::Sender<Vec<DeviceView>>,
    },
    Health {
        resp: oneshot::Sender<Health>,
    },
    /// A live reader of an open task's output (`None`: the task is not
    /// open). Its channel closes when the task ends.
    Subscribe {
        id: String,
        resp: oneshot::Sender<Option<mpsc::Receiver<super::streams::StreamEvent>>>,
    },
    Mqtt(MqttEvent),
    /// A dispatch publish could not be queued on the client. It names the
    /// dispatch (device, attempt, serial): a report that arrives after the
    /// task was taken back and dispatched again must not re-queue the new
    /// dispatch, or the task runs twice.
    DispatchFailed {
        id: String,
        device: String,
        attempt: u32,
        serial: u64,
    },
}

/// Handle used by the HTTP layer.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    /// How long [`SchedulerHandle::ask`] waits for the scheduler.
    deadline: Duration,
}

impl SchedulerHandle {
    /// The same handle with another deadline for [`SchedulerHandle::ask`].
    pub fn with_deadline(mut self, deadline: Duration) -> SchedulerHandle {
        self.deadline = deadline;
        self
    }

    /// Sends a command and waits for its answer, at most the handle's
    /// deadline (a full channel or a stalled scheduler gives 503, not a hang).
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let asked = async {
            self.tx
                .send(make(tx))
                .await
                .map_err(|_| ApiError::Unavailable("scheduler is shutting down".into()))?;
            rx.await
                .map_err(|_| ApiError::Unavailable("scheduler dropped the request".into()))
        };
        tokio::time::timeout(self.deadline, asked)
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::Unavailable(format!(
                    "the scheduler did not answer within {} ms",
                    self.deadline.as_millis()
                )))
            })
    }

    /// Submits a task. Only the hand-over is bounded by the deadline: once
    /// the scheduler has the request its answer is awaited, however late,
    /// so a task it accepts always reaches its caller (and the caller's
    /// audit row) instead of running unrecorded behind a 503.
    pub async fn submit(&self, req: SubmitRequest) -> Result<SubmitResponse, ApiError> {
        let (tx, rx) = oneshot::channel();
        match tokio::time::timeout(
            self.deadline,
            self.tx.send(Command::Submit { req, resp: tx }),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(ApiError::Unavailable("scheduler is shutting down".into())),
            Err(_) => {
                return Err(ApiError::Unavailable(format!(
                    "the scheduler did not take the request within {} ms",
                    self.deadline.as_millis()
                )))
            }
        }
        rx.await
            .map_err(|_| ApiError::Unavailable("scheduler dropped the request".into()))?
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
    /// A long-poll waiter told that its task ended: only once committed.
    Notify {
        id: String,
        view: Box<TaskView>,
        waiter: Waiter,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        /// The dispatch to undo if the publish cannot be queued: task id,
        /// device, attempt and dispatch serial.
        dispatch_of: Option<(String, String, u32, u64)>,
    },
    /// The MQTT ack of a message handled in this batch, with the client
    /// connection it came on (`None`: the broker sends it again, see
    /// [`Scheduler::on_connected`]).
    Ack(Publish, Option<u64>),
    Reply(Box<dyn FnOnce(bool) + Send>),
}

struct Task {
    row: TaskRow,
    deadline: Option<Instant>,
    /// The device that had it before a server restart, and until when the
    /// task waits for that device to come back rather than go to another:
    /// it may have run it already, and only its ledger knows.
    prefer: Option<(String, Instant)>,
    /// When the task was last published to its device (while dispatched).
    last_sent: Option<Instant>,
    /// How often it was sent again in this dispatch: each repeat waits
    /// twice as long as the one before (up to four times), as a task that
    /// waits in a busy agent's inbox for a slot is not started either.
    resends: u32,
    /// Which dispatch this is (unique per scheduler; while dispatched).
    serial: u64,
    /// While queued: its retry back-off, and when its queue time-to-live
    /// runs out. Memory only, so a reload after a failed commit takes them
    /// from the tasks it replaces.
    not_before: Instant,
    expires: Option<Instant>,
}

/// What memory alone knows of a queued task's timing.
struct QueueTimes {
    prefer: Option<(String, Instant)>,
    not_before: Instant,
    expires: Option<Instant>,
}

impl QueueTimes {
    fn of(t: &Task) -> QueueTimes {
        QueueTimes {
            prefer: t.prefer.clone(),
            not_before: t.not_before,
            expires: t.expires,
        }
    }
}

struct Device {
    status: DeviceStatus,
    online: bool,
    last_seen: Instant,
    last_seen_ms: u64,
    assigned: HashSet<String>,
    busy_until: Option<Instant>,
    /// Its plugins with their schemas (`server::tools`), once it sent them.
    tools: Option<Arc<[ToolView]>>,
    /// When the catalog was last asked for and not received yet.
    describe_asked: Option<Instant>,
    /// When it was last asked which tasks it holds ([`ToAgent::ListTasks`]),
    /// and whether that answer is still awaited (only an asked-for
    /// `Holding` is read: each can make hundreds of cancels).
    tasks_asked: Option<(Instant, bool)>,
}

impl Device {
    fn capacity(&self) -> usize {
        // Both come from the device's own (unauthenticated) status: a sum that
        // overflows must not panic or wrap to a tiny capacity.
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
            release: s.release.clone(),
            update: s.update.clone(),
            tools: self.tools.clone(),
        }
    }

    /// Whether its catalog should be asked for: none yet, or it lists
    /// other plugins than the heartbeat; not again within
    /// [`DESCRIBE_RETRY`] of an unanswered ask.
    fn wants_catalog(&self, now: Instant) -> bool {
        let stale = match &self.tools {
            None => true,
            Some(t) => {
                t.len() != self.status.plugins.len()
                    || t.iter().any(|t| !self.status.plugins.contains(&t.name))
            }
        };
        stale
            && self
                .describe_asked
                .is_none_or(|at| now.duration_since(at) >= DESCRIBE_RETRY)
    }
}

/// How long an unanswered `Describe` waits before it is sent again.
const DESCRIBE_RETRY: Duration = Duration::from_secs(30);

/// Least time between two [`ToAgent::ListTasks`] to one device. Its counts
/// exceed ours for a moment in normal work too (a task still stopping
/// after its result keeps its slot), so the ask is rate-limited rather
/// than waited for.
const LIST_TASKS_EVERY: Duration = Duration::from_secs(5);
/// Added to [`LIST_TASKS_EVERY`] after an answer that named no closed task.
const QUIET_LIST_TASKS: Duration = Duration::from_secs(55);

/// Scheduler state; lives in one task.
pub struct Scheduler {
    cfg: SchedulerSection,
    store: Store,
    client: AsyncClient,
    max_payload: usize,
    tasks: HashMap<String, Task>,
    queue: Queue,
    /// Bytes of input held by unfinished tasks (admission).
    held_bytes: usize,
    seq: u64,
    devices: BTreeMap<String, Device>,
    waiters: HashMap<String, Vec<Waiter>>,
    /// What streaming tasks sent so far, and their live readers.
    streams: super::streams::Streams,
    connected: bool,
    effects: Vec<Effect>,
    self_tx: mpsc::WeakSender<Command>,
    /// MQTT messages of batches that failed to commit, with the client
    /// connection each came on: handled again (and only then acknowledged,
    /// if that connection is still the current one) once the store takes
    /// writes.
    replay: Vec<(Publish, u64)>,
    /// The client's connection: one more at every ConnAck. A packet id
    /// means something only on the connection it came on.
    epoch: u64,
    /// Tasks taken out of memory in the current batch, with their queue
    /// timing: if the batch fails, the reload puts them back as they were.
    forgotten: HashMap<String, QueueTimes>,
    /// After a store failure, no writes before this time.
    store_retry_at: Option<Instant>,
    store_failures: u32,
    /// Next sweep of finished tasks past `retention_ms`.
    next_retention: Instant,
    /// Statuses from unknown devices ignored at the `max_devices` bound.
    devices_refused: u64,
    /// Where each open task was dispatched, per attempt (also in the store,
    /// so it survives a restart): a result counts only from these devices.
    /// At most [`MAX_DISPATCHES`] entries per task.
    history: HashMap<String, Vec<(u32, String)>>,
    /// Results from devices a task was never dispatched to (see [`Health`]).
    forged_results: u64,
    /// Statuses naming another device than their topic's (see [`Health`]).
    forged_statuses: u64,
    /// Topic device ids already logged for such a status (logged once each,
    /// up to [`MAX_WARNED`] ids, then only at powers of two).
    status_warned: HashSet<String>,
    /// Device checks made by dispatch passes (tests measure a pass's work).
    #[cfg(test)]
    checks: std::cell::Cell<u64>,
}

/// The dispatch history keeps at most this many (attempt, device) entries
/// per task, dropping the oldest attempt's first. Only a task bounced
/// between more devices than this (each refusing it busy, say) loses some,
/// and then a late result from such a device is refused as forged.
pub const MAX_DISPATCHES: usize = 64;
/// Distinct topic ids a mismatched status is logged for, one line each.
const MAX_WARNED: usize = 1024;

/// Retention deletes at most this many finished tasks per batch...
const RETENTION_ROWS: u32 = 500;
/// ...and at most this many bytes of their inputs and results.
const RETENTION_BYTES: u64 = 16 << 20;

/// `now + ms`, saturating far in the future instead of overflowing.
fn after(now: Instant, ms: u64) -> Instant {
    now.checked_add(Duration::from_millis(ms))
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// What a heartbeat interval times the misses allowed comes to.
fn silence(heartbeat_ms: u32, missed: u32) -> u64 {
    (heartbeat_ms.max(100) as u64).saturating_mul(missed as u64)
}

impl Scheduler {
    /// Loads known devices and unfinished tasks from the store. Rows that
    /// cannot be read are logged (row and column named) and left out.
    pub fn new(
        cfg: SchedulerSection,
        store: Store,
        client: AsyncClient,
        max_payload: usize,
    ) -> Result<(Scheduler, SchedulerHandle, mpsc::Receiver<Command>), StoreError> {
        let (tx, rx) = mpsc::channel(4096);
        let now = Instant::now();
        let mut s = Scheduler {
            cfg,
            store,
            client,
            max_payload,
            tasks: HashMap::new(),
            queue: Queue::new(),
            held_bytes: 0,
            seq: 0,
            devices: BTreeMap::new(),
            waiters: HashMap::new(),
            streams: Default::default(),
            connected: false,
            effects: Vec::new(),
            self_tx: tx.downgrade(),
            replay: Vec::new(),
            epoch: 0,
            forgotten: HashMap::new(),
            store_retry_at: None,
            store_failures: 0,
            next_retention: now,
            devices_refused: 0,
            history: HashMap::new(),
            forged_results: 0,
            forged_statuses: 0,
            status_warned: HashSet::new(),
            #[cfg(test)]
            checks: std::cell::Cell::new(0),
        };
        for (id, bytes, last_seen_ms) in s.store.devices()? {
            match DeviceStatus::decode(&bytes, usize::MAX) {
                Ok(status) => {
                    s.devices.insert(
                        id,
                        Device {
                            status,
                            online: false,
                            last_seen: now,
                            last_seen_ms,
                            assigned: HashSet::new(),
                            busy_until: None,
                            tools: None,
                            describe_asked: None,
                            tasks_asked: None,
                        },
                    );
                }
                Err(e) => {
                    log::warn!("task store: device row `{id}`: status unreadable ({e}); left out")
                }
            }
        }
        let mut recovered = 0;
        s.store.begin()?;
        for mut row in s.store.unfinished_readable()? {
            // As long as the server would wait before declaring the device
            // lost (its heartbeat interval times offline_after_missed).
            let prefer = row.device.take().map(|d| {
                let hb = s.devices.get(&d).map_or(5000, |x| x.status.heartbeat_ms);
                let wait = silence(hb, s.cfg.offline_after_missed);
                (d, after(now, wait))
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
        s.history = s.store.open_dispatches()?;
        s.history.retain(|id, _| s.tasks.contains_key(id));
        if recovered > 0 {
            log::info!("scheduler: recovered {recovered} unfinished task(s) from the store");
        }
        Ok((
            s,
            SchedulerHandle {
                tx,
                deadline: Duration::from_secs(30),
            },
            rx,
        ))
    }

    /// Runs until `shutdown` is cancelled, or until the store failed and the
    /// state could not be reloaded from it (an error: the server exits).
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> Result<(), SchedulerError> {
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
            self.batch(&mut batch, ticked)?;
        }
        log::info!("scheduler stopped");
        Ok(())
    }

    /// One batch: one transaction, then its effects, or, if the store failed
    /// anywhere in it, a rollback and a reload.
    fn batch(&mut self, batch: &mut Vec<Command>, ticked: bool) -> Result<(), SchedulerError> {
        let now = Instant::now();
        self.forgotten.clear();
        let mut ok = self.store_retry_at.is_none_or(|t| t <= now);
        if ok {
            if let Err(e) = self.store.begin() {
                log::error!("scheduler: cannot start a transaction: {e}");
                ok = false;
                self.store_failed(now);
            }
        }
        let wrote = ok;
        // Messages of a failed batch first, as they came.
        for (p, epoch) in std::mem::take(&mut self.replay) {
            if !ok {
                self.replay.push((p, epoch));
                continue;
            }
            if let Err(e) = self.on_message(p, epoch) {
                log::error!("scheduler: {e}");
                ok = false;
            }
        }
        for cmd in batch.drain(..) {
            if !ok {
                self.refuse(cmd);
                continue;
            }
            if let Err(e) = self.handle(cmd) {
                log::error!("scheduler: {e}");
                ok = false;
            }
        }
        if ok && ticked {
            if let Err(e) = self.on_tick() {
                log::error!("scheduler: {e}");
                ok = false;
            }
        }
        if ok {
            if let Err(e) = self.dispatch() {
                log::error!("scheduler: dispatch: {e}");
                ok = false;
            }
        }
        if ok {
            let store = &mut self.store;
            match crate::blocking(|| store.commit()) {
                Ok(()) => {
                    if self.store_failures > 0 {
                        log::info!("scheduler: the task store takes writes again");
                    }
                    self.store_failures = 0;
                    self.store_retry_at = None;
                    self.forgotten.clear();
                    self.flush();
                    return Ok(());
                }
                Err(e) => {
                    log::error!("scheduler: commit failed, refusing this batch: {e}");
                    ok = false;
                }
            }
        }
        debug_assert!(!ok);
        if wrote {
            // Memory may now hold what the store does not: roll back, answer
            // with errors, keep the messages for later, and start again from
            // what the store holds.
            self.store.rollback();
            self.store_failed(now);
            self.discard_effects();
            self.reload().map_err(SchedulerError::Reload)?;
        } else {
            self.discard_effects();
        }
        Ok(())
    }

    fn store_failed(&mut self, now: Instant) {
        self.store_failures = self.store_failures.saturating_add(1);
        // 100 ms, doubling to 5 s: a full disk is not hammered.
        let wait = (100u64 << self.store_failures.min(6).saturating_sub(1)).min(5000);
        self.store_retry_at = Some(after(now, wait));
    }

    /// A command met while the store is failing: reads are answered, writes
    /// refused, MQTT messages kept to be handled (and acked) later.
    fn refuse(&mut self, cmd: Command) {
        let unavailable = || {
            ApiError::Unavailable(
                "the task store is failing; nothing was accepted, try again".into(),
            )
        };
        match cmd {
            Command::Submit { resp, .. } => {
                let _ = resp.send(Err(unavailable()));
            }
            Command::Cancel { resp, .. } => {
                let _ = resp.send(Err(unavailable()));
            }
            Command::Mqtt(MqttEvent::Message(p)) => self.replay.push((p, self.epoch)),
            Command::Mqtt(MqttEvent::Connected { session_present }) => {
                self.on_connected(session_present)
            }
            Command::Mqtt(MqttEvent::Disconnected(_)) => self.connected = false,
            // Re-sent by the not-started check once the store works.
            Command::DispatchFailed { .. } => {}
            read => {
                if let Err(e) = self.handle(read) {
                    log::error!("scheduler: {e}");
                }
            }
        }
    }

    /// After a failed batch: clients told nothing was accepted, waiters put
    /// back, the batch's messages kept for replay, publishes dropped.
    fn discard_effects(&mut self) {
        let mut acked = Vec::new();
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::Reply(f) => f(false),
                Effect::Notify { id, waiter, .. } => {
                    self.waiters.entry(id).or_default().push(waiter)
                }
                Effect::Ack(p, Some(epoch)) => acked.push((p, epoch)),
                // The broker sends it again: handling this copy too would
                // do it twice.
                Effect::Ack(_, None) => {}
                Effect::Publish { .. } => {}
            }
        }
        acked.append(&mut self.replay);
        self.replay = acked;
    }

    /// Replaces the in-memory tasks by what the store holds. Devices stay
    /// (their state is soft: heartbeats); their assignments are rebuilt.
    fn reload(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        let old = std::mem::take(&mut self.tasks);
        self.queue = Queue::new();
        self.held_bytes = 0;
        for d in self.devices.values_mut() {
            d.assigned.clear();
        }
        let rows = self.store.unfinished_readable()?;
        self.history = self.store.open_dispatches()?;
        let n = rows.len();
        for mut row in rows {
            let prev = old.get(&row.id);
            let dev = row.device.clone();
            let on_device = row.state != TaskState::Queued
                && dev.as_ref().is_some_and(|d| self.devices.contains_key(d));
            if !on_device {
                if row.state != TaskState::Queued {
                    // Its device is unknown here: retried as the same attempt.
                    row.attempts = row.attempts.saturating_sub(1);
                    row.state = TaskState::Queued;
                    row.device = None;
                }
                // What only memory knew (the device it waits for, its
                // back-off, its time-to-live), from the task as it was, or
                // as it was when the failed batch ended it.
                let times = prev
                    .map(QueueTimes::of)
                    .or_else(|| self.forgotten.remove(&row.id));
                match times {
                    Some(q) => self.enqueue_as(row, q.not_before, q.prefer, q.expires),
                    None => self.enqueue(row, now, None),
                }
                continue;
            }
            // Dispatched in an earlier, committed batch: still on its device.
            let dev = dev.expect("checked");
            let mut t = Task {
                deadline: Some(after(
                    now,
                    row.timeout_ms.saturating_add(self.cfg.timeout_grace_ms),
                )),
                prefer: None,
                last_sent: Some(now),
                resends: 0,
                serial: 0,
                not_before: now,
                expires: None,
                row,
            };
            if let Some(p) = prev.filter(|p| {
                p.row.device.as_deref() == Some(dev.as_str()) && p.row.attempts == t.row.attempts
            }) {
                // The store does not record `running`; memory does.
                if p.row.state == TaskState::Running {
                    t.row.state = TaskState::Running;
                    t.row.started_ms = p.row.started_ms;
                }
                t.deadline = p.deadline.or(t.deadline);
                t.last_sent = p.last_sent.or(t.last_sent);
                t.resends = p.resends;
                t.serial = p.serial;
            }
            self.held_bytes += t.row.input.len();
            if let Some(d) = self.devices.get_mut(&dev) {
                d.assigned.insert(t.row.id.clone());
            }
            self.tasks.insert(t.row.id.clone(), t);
        }
        // Streams of tasks that are not open any more.
        let tasks = &self.tasks;
        self.streams.retain(|id| tasks.contains_key(id));
        // Waiters whose task is not unfinished after all: answer from the store.
        let gone: Vec<String> = self
            .waiters
            .keys()
            .filter(|id| !self.tasks.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            let v = self
                .store
                .get(&id)
                .map(|r| r.map(|r| r.view()))
                .map_err(|e| ApiError::Unavailable(e.to_string()));
            for w in self.waiters.remove(&id).unwrap_or_default() {
                let _ = w.send(v.clone());
            }
        }
        self.forgotten.clear();
        log::warn!(
            "scheduler: state reloaded from the store after a failed batch: {n} unfinished task(s), {} message(s) to handle again",
            self.replay.len()
        );
        Ok(())
    }

    /// The effects of a committed batch.
    fn flush(&mut self) {
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::Reply(f) => f(true),
                Effect::Notify { view, waiter, .. } => {
                    let _ = waiter.send(Ok(Some(*view)));
                }
                // A packet id from an earlier connection would ack whatever
                // message has that id now.
                Effect::Ack(p, Some(epoch)) if epoch == self.epoch => {
                    let _ = self.client.try_ack(&p);
                }
                Effect::Ack(..) => {}
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
                        if let (Some((id, device, attempt, serial)), Some(tx)) =
                            (dispatch_of, self.self_tx.upgrade())
                        {
                            let _ = tx.try_send(Command::DispatchFailed {
                                id,
                                device,
                                attempt,
                                serial,
                            });
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
                    Err(SubmitFail::Store(e)) => {
                        let _ = resp.send(Err(ApiError::Unavailable(format!(
                            "the task store failed ({e}); nothing was accepted"
                        ))));
                        return Err(e);
                    }
                };
                self.reply(resp, r);
            }
            Command::Get { id, resp } => {
                let v = match self.tasks.get(&id) {
                    Some(t) => {
                        let mut v = t.row.view();
                        v.output = self.streams.text(&id).map(str::to_string);
                        Ok(Some(v))
                    }
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
            Command::Running { resp } => {
                let running = self
                    .tasks
                    .values()
                    .filter(|t| t.row.state == TaskState::Running)
                    .map(|t| (t.row.id.clone(), t.row.started_ms.unwrap_or(0)))
                    .collect();
                let _ = resp.send(running);
            }
            Command::Cancel { id, resp } => match self.cancel(&id) {
                Ok(r) => self.reply(resp, r),
                Err(e) => {
                    let _ = resp.send(Err(ApiError::Unavailable(format!(
                        "the task store failed ({e}); nothing was changed"
                    ))));
                    return Err(e);
                }
            },
            Command::Devices { resp } => {
                let _ = resp.send(self.devices.values().map(Device::view).collect());
            }
            Command::DevicesWhere { wanted, resp } => {
                let _ = resp.send(
                    self.devices
                        .iter()
                        .filter(|(id, d)| wanted(id, &d.status))
                        .map(|(_, d)| d.view())
                        .collect(),
                );
            }
            Command::Health { resp } => {
                let in_flight = self.tasks.len() - self.queue.len();
                let _ = resp.send(Health {
                    status: if self.store_retry_at.is_some() {
                        "store failing".into()
                    } else {
                        "ok".into()
                    },
                    mqtt_connected: self.connected,
                    queued: self.queue.len(),
                    in_flight,
                    devices_online: self.devices.values().filter(|d| d.online).count(),
                    devices_known: self.devices.len(),
                    forged_results: self.forged_results,
                    forged_statuses: self.forged_statuses,
                });
            }
            Command::Subscribe { id, resp } => {
                let rx = self
                    .tasks
                    .contains_key(&id)
                    .then(|| self.streams.subscribe(&id));
                let _ = resp.send(rx);
            }
            Command::Mqtt(ev) => self.on_mqtt(ev)?,
            Command::DispatchFailed {
                id,
                device,
                attempt,
                serial,
            } => {
                if let Some(t) = self.tasks.get(&id) {
                    // Only the dispatch that failed: the task may have been
                    // taken back and dispatched again since, and that one
                    // was published.
                    if t.row.state == TaskState::Dispatched
                        && t.row.device.as_deref() == Some(device.as_str())
                        && t.row.attempts == attempt
                        && t.serial == serial
                    {
                        let mut row = t.row.clone();
                        self.unassign(&row);
                        row.attempts = row.attempts.saturating_sub(1);
                        row.state = TaskState::Queued;
                        row.device = None;
                        self.forget(&id);
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
        let asked = req.route.unwrap_or_default();
        if asked == Route::Queue && req.reply_to.is_none() {
            return bad(
                "`route` \"queue\" is for submissions answered on `reply_to` (over MQTT, \
                 openclaw/v1/submit); give a `reply_to`, or use \"auto\""
                    .into(),
            );
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
        if let Some(cap) = &req.capability {
            // As for plugins: a capability nobody known offers would wait
            // forever (`timeout_ms` only starts at dispatch).
            let fits = |d: &Device| {
                d.status.plugins.contains(&req.plugin)
                    && d.status.capabilities.contains(cap)
                    && req.target.as_ref().is_none_or(|t| *t == d.status.device_id)
            };
            if !self.devices.values().any(fits) {
                let mut all: Vec<&str> = self
                    .devices
                    .values()
                    .filter(|d| req.target.as_ref().is_none_or(|t| *t == d.status.device_id))
                    .filter(|d| d.status.plugins.contains(&req.plugin))
                    .flat_map(|d| d.status.capabilities.iter().map(String::as_str))
                    .collect();
                all.sort();
                all.dedup();
                let mut known = all.iter().take(20).copied().collect::<Vec<_>>().join(", ");
                if all.len() > 20 {
                    let _ = write!(known, " and {} more", all.len() - 20);
                }
                return Err(SubmitFail::Api(ApiError::Unprocessable(format!(
                    "unknown capability `{cap}`: no known device{} offers it with plugin `{}` (known: {})",
                    req.target.as_ref().map(|t| format!(" `{t}`")).unwrap_or_default(),
                    req.plugin,
                    if known.is_empty() { "none".into() } else { known }
                ))));
            }
        }
        if let Some(class) = route_class(asked, &req.plugin) {
            // As for capabilities: a class nobody known is of would wait forever.
            // All of the task's needs on one device (as `can_take` and
            // `eligible` check them): a class on one device and the
            // capability on another would be a lane nobody ever serves.
            let fits = |d: &Device| {
                d.status.plugins.contains(&req.plugin)
                    && d.status.capabilities.iter().any(|c| c == class)
                    && req.target.as_ref().is_none_or(|t| *t == d.status.device_id)
                    && req
                        .capability
                        .as_ref()
                        .is_none_or(|c| d.status.capabilities.contains(c))
            };
            if !self.devices.values().any(fits) {
                let route = resolve_route(asked, &req.plugin, req.reply_to.is_some());
                return Err(SubmitFail::Api(ApiError::Unprocessable(format!(
                    "route `{}`{}: no known device{} of {class} offers plugin `{}`{}",
                    route.as_str(),
                    if asked == Route::Auto {
                        format!(" (auto: plugin `{HEAVY_PLUGIN}` runs on heavy nodes)")
                    } else {
                        String::new()
                    },
                    req.target
                        .as_ref()
                        .map(|t| format!(" `{t}`"))
                        .unwrap_or_default(),
                    req.plugin,
                    req.capability
                        .as_ref()
                        .map(|c| format!(" with capability `{c}`"))
                        .unwrap_or_default()
                ))));
            }
        }
        // Counted before the input is serialised: under load, refusals
        // must stay cheap for the loop that makes them.
        if self.tasks.len() >= self.cfg.max_queued_tasks {
            return Err(SubmitFail::Api(ApiError::Busy {
                message: format!(
                    "the queue is full: {} unfinished task(s), the limit is {} \
                     (scheduler.max_queued_tasks); try again later",
                    self.tasks.len(),
                    self.cfg.max_queued_tasks
                ),
                retry_after_s: 1,
            }));
        }
        let input = req.input.to_string();
        // One input over the whole budget would never fit, however long the
        // client waits: say so instead of "try again later".
        if input.len() as u64 > self.cfg.max_queued_bytes {
            return Err(SubmitFail::Api(ApiError::TooLarge(format!(
                "the task's input is {} bytes, more than all unfinished tasks may hold together \
                 ({} bytes, scheduler.max_queued_bytes)",
                input.len(),
                self.cfg.max_queued_bytes
            ))));
        }
        if (self.held_bytes + input.len()) as u64 > self.cfg.max_queued_bytes {
            return Err(SubmitFail::Api(ApiError::Busy {
                message: format!(
                    "the queue is full: unfinished tasks hold {} bytes of input, this one {} more, \
                     the limit is {} (scheduler.max_queued_bytes); try again later",
                    self.held_bytes,
                    input.len(),
                    self.cfg.max_queued_bytes
                ),
                retry_after_s: 1,
            }));
        }
        let row = TaskRow {
            // Time-ordered (UUID v7): new ids go to the end of the primary
            // key index, so a batch of submissions dirties a page or two of
            // it instead of one random page each (fewer WAL writes per
            // commit).
            id: uuid::Uuid::now_v7().to_string(),
            plugin: req.plugin,
            input,
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
            route: asked,
            placement: None,
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

    /// Puts a task in the queue (replacing any entry it has there).
    /// `not_before`: retry back-off; `prefer`: the device it waits for
    /// (after a restart) until the given time.
    fn enqueue(&mut self, row: TaskRow, not_before: Instant, prefer: Option<(String, Instant)>) {
        let expires =
            (self.cfg.queue_ttl_ms > 0).then(|| after(Instant::now(), self.cfg.queue_ttl_ms));
        self.enqueue_as(row, not_before, prefer, expires);
    }

    /// [`Scheduler::enqueue`] with the queue time-to-live's end given.
    fn enqueue_as(
        &mut self,
        row: TaskRow,
        not_before: Instant,
        prefer: Option<(String, Instant)>,
        expires: Option<Instant>,
    ) {
        let now = Instant::now();
        self.seq += 1;
        let key = (
            Reverse(queue::score(
                row.priority,
                self.cfg.aging_ms,
                row.created_ms,
            )),
            self.seq,
        );
        let needs = Needs {
            plugin: row.plugin.clone(),
            target: row.target.clone(),
            capability: row.capability.clone(),
            class: route_class(row.route, &row.plugin),
        };
        // A task recovered after a restart waits while its device is away.
        let away = prefer
            .as_ref()
            .filter(|(p, until)| now < *until && self.devices.get(p).is_some_and(|d| !d.online));
        let hold = match away {
            Some((p, until)) => Some(((*until).max(not_before), Some(p.clone()))),
            None if not_before > now => Some((not_before, None)),
            None => None,
        };
        self.queue.insert(row.id.clone(), needs, key, hold, expires);
        self.held_bytes += row.input.len();
        if let Some(old) = self.tasks.insert(
            row.id.clone(),
            Task {
                deadline: None,
                prefer,
                last_sent: None,
                resends: 0,
                serial: 0,
                not_before,
                expires,
                row,
            },
        ) {
            self.held_bytes -= old.row.input.len();
        }
    }

    /// Takes a task out of memory and the queue.
    fn forget(&mut self, id: &str) -> Option<Task> {
        self.queue.remove(id);
        let t = self.tasks.remove(id)?;
        self.held_bytes -= t.row.input.len();
        self.forgotten
            .entry(id.to_string())
            .or_insert_with(|| QueueTimes::of(&t));
        Some(t)
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
        let mut t = self.forget(id).expect("terminate of a known task");
        // The store keeps it (until retention); memory needs it only while open.
        self.history.remove(id);
        self.streams.end(id);
        self.unassign(&t.row);
        t.row.state = state;
        t.row.result = result;
        t.row.error = error;
        t.row.finished_ms = Some(crate::now_ms());
        self.store.save(&t.row)?;
        let view = t.row.view();
        for waiter in self.waiters.remove(id).unwrap_or_default() {
            self.effects.push(Effect::Notify {
                id: id.to_string(),
                view: Box::new(view.clone()),
                waiter,
            });
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
        if t.row.state == TaskState::Queued {
            // Already back in the queue (its device was lost): once is enough.
            return Ok(());
        }
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
        self.forget(id);
        let delay = match how {
            Requeue::Failed => {
                // Saturating: a large `retry_backoff_ms` must not lose bits.
                let exp = row.attempts.saturating_sub(1).min(16);
                self.cfg
                    .retry_backoff_ms
                    .saturating_mul(1u64 << exp)
                    .min(self.cfg.retry_backoff_max_ms)
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
        self.enqueue(row, after(Instant::now(), delay), None);
        Ok(())
    }

    fn on_mqtt(&mut self, ev: MqttEvent) -> Result<(), StoreError> {
        match ev {
            MqttEvent::Connected { session_present } => {
                self.on_connected(session_present);
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
            MqttEvent::Message(p) => self.on_message(p, self.epoch)?,
        }
        Ok(())
    }

    /// A message that came on client connection `epoch`.
    fn on_message(&mut self, p: Publish, epoch: u64) -> Result<(), StoreError> {
        match self.on_publish(&p) {
            Ok(()) => {
                self.effects.push(Effect::Ack(p, Some(epoch)));
                Ok(())
            }
            Err(e) => {
                // Not acked: handled again once the store takes writes.
                self.replay.push((p, epoch));
                Err(e)
            }
        }
    }

    /// A ConnAck. With the session kept, the broker sends again every
    /// message of the previous connection that was not acked: the copies
    /// kept for replay (and the acks not sent yet) of that connection are
    /// dropped, or a submission would make two tasks. Without a session
    /// nothing comes again: the kept copies are still handled, but never
    /// acked (their packet ids belong to the old connection).
    fn on_connected(&mut self, session_present: bool) {
        self.connected = true;
        let previous = self.epoch;
        self.epoch += 1;
        if session_present {
            self.replay.retain(|(_, e)| *e != previous);
            for effect in &mut self.effects {
                if let Effect::Ack(_, e) = effect {
                    if *e == Some(previous) {
                        *e = None;
                    }
                }
            }
        }
    }

    fn on_publish(&mut self, p: &Publish) -> Result<(), StoreError> {
        if p.topic == topics::SUBMIT {
            return self.on_mqtt_submit(&p.payload);
        }
        let Some((device, kind)) = topics::parse(&p.topic) else {
            log::warn!("ignoring message on unexpected topic {}", p.topic);
            return Ok(());
        };
        if !topics::valid_device_id(device) {
            // No device of ours has such an id (e.g. `x+y`: rumqttd takes
            // a wildcard character in a published topic, and our answers
            // to it would fail to publish, each with a warning).
            let n = match kind {
                topics::Kind::Status => {
                    self.forged_statuses += 1;
                    self.forged_statuses
                }
                _ => {
                    self.forged_results += 1;
                    self.forged_results
                }
            };
            if n.is_power_of_two() {
                let shown: String = device.chars().take(64).collect();
                log::warn!(
                    "ignoring messages on a topic whose device id is not valid (`{shown}`, {} bytes; {n} so far)",
                    device.len()
                );
            }
            return Ok(());
        }
        let device = device.to_string();
        match kind {
            topics::Kind::Status => match DeviceStatus::decode(&p.payload, self.max_payload) {
                Ok(s) if s.device_id == device => self.on_status(s)?,
                Ok(s) => self.forged_status(&device, &s.device_id),
                Err(e) => log::warn!("malformed status on {}: {e}", p.topic),
            },
            topics::Kind::Results => {
                match protocol::decode::<FromAgent>(&p.payload, self.max_payload) {
                    Ok(FromAgent::Catalog(c)) => self.on_catalog(&device, c),
                    Ok(FromAgent::Holding { tasks }) => self.on_holding(&device, tasks),
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
        if !self.devices.contains_key(&id) && self.devices.len() >= self.cfg.max_devices {
            // Statuses are unauthenticated: a flood of made-up ids must not
            // grow memory and the store without end.
            self.devices_refused += 1;
            if self.devices_refused.is_power_of_two() {
                log::warn!(
                    "status from unknown device `{id}` ignored: {} devices known, the limit is {} \
                     (scheduler.max_devices); {} ignored so far",
                    self.devices.len(),
                    self.cfg.max_devices,
                    self.devices_refused
                );
            }
            return Ok(());
        }
        self.store.save_device(&id, &protocol::encode(&s), now_ms)?;
        let dev = self.devices.entry(id.clone()).or_insert_with(|| Device {
            status: s.clone(),
            online: false,
            last_seen: now,
            last_seen_ms: now_ms,
            assigned: HashSet::new(),
            busy_until: None,
            tools: None,
            describe_asked: None,
            tasks_asked: None,
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
            // Back from away: maybe restarted with other plugins or pins.
            dev.describe_asked = None;
            if dev.tools.is_some() {
                dev.tools = None;
            }
        }
        // It holds more than we have open there: a cancel did not reach it
        // (see `ToAgent::ListTasks`). Its answer names them.
        let held = (dev.status.running as usize).saturating_add(dev.status.queued as usize);
        if online
            && held > dev.assigned.len()
            && dev
                .tasks_asked
                .is_none_or(|(at, _)| now.duration_since(at) >= LIST_TASKS_EVERY)
        {
            dev.tasks_asked = Some((now, true));
            self.publish(topics::tasks(&id), protocol::encode(&ToAgent::ListTasks));
        }
        let dev = self.devices.get_mut(&id).expect("inserted above");
        if online && dev.wants_catalog(now) {
            dev.describe_asked = Some(now);
            self.publish(topics::tasks(&id), protocol::encode(&ToAgent::Describe));
        }
        if online && !was_online {
            log::info!("device {id} is online");
            // Tasks recovered after a restart that wait for it.
            self.queue.device_back(&id);
        }
        if !online && was_online {
            self.device_lost(&id, "device went offline")?;
        }
        Ok(())
    }

    /// The tasks a device says it holds: those closed here (finished,
    /// cancelled, timed out, or unknown) are cancelled there. Tasks still
    /// open but taken from it (re-queued while it was away, or running
    /// elsewhere) are left: their first result still wins.
    fn on_holding(&mut self, device: &str, tasks: Vec<String>) {
        let Some(dev) = self.devices.get_mut(device) else {
            return;
        };
        match &mut dev.tasks_asked {
            Some((_, awaited @ true)) => *awaited = false,
            _ => {
                log::debug!("device {device}: a task list it was not asked for; ignored");
                return;
            }
        }
        let mut closed = Vec::new();
        for id in tasks.into_iter().take(protocol::MAX_HELD_TASKS) {
            if id.len() <= protocol::MAX_TASK_ID_BYTES
                && !self.tasks.contains_key(&id)
                && !closed.contains(&id)
            {
                closed.push(id);
            }
        }
        if closed.is_empty() {
            // Its counts exceed ours without a lost cancel (tasks still
            // stopping after their result): ask a busy device once a
            // minute, not every 5 s.
            if let Some(dev) = self.devices.get_mut(device) {
                dev.tasks_asked = Some((Instant::now() + QUIET_LIST_TASKS, false));
            }
            return;
        }
        log::info!(
            "device {device} holds {} task(s) closed here (their cancel was lost or never sent); cancelling them there",
            closed.len()
        );
        for task_id in closed {
            self.publish(
                topics::tasks(device),
                protocol::encode(&ToAgent::Cancel { task_id }),
            );
        }
    }

    /// A device's plugins with their schemas, on its own results topic
    /// (whoever may publish there speaks for it, as for its results).
    fn on_catalog(&mut self, device: &str, c: Catalog) {
        let Some(dev) = self.devices.get_mut(device) else {
            log::debug!("catalog from unknown device `{device}` ignored");
            return;
        };
        if dev.describe_asked.is_none() {
            // Agents send one only when asked: another is someone else's.
            log::warn!("device {device}: a catalog it was not asked for; ignored");
            return;
        }
        let (tools, refused) = super::tools::accept(c);
        for why in &refused {
            log::warn!("device {device}: catalog: {why}; left out");
        }
        log::info!("device {device}: {} tool(s) in its catalog", tools.len());
        dev.tools = Some(tools.into());
        dev.describe_asked = None;
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

    /// A status on `topic_id`'s topic that names `named`: statuses are not
    /// authenticated, and one client must not speak for another device
    /// (take it offline, say, retained). Ignored and counted; logged once
    /// per topic id, so a flood does not flood the log.
    fn forged_status(&mut self, topic_id: &str, named: &str) {
        self.forged_statuses += 1;
        let first = self.status_warned.len() < MAX_WARNED
            && self.status_warned.insert(topic_id.to_string());
        let known = self.status_warned.contains(topic_id);
        if first || (!known && self.forged_statuses.is_power_of_two()) {
            log::warn!(
                "status on {} names another device `{named}`; ignored ({} such status(es) so \
                 far{})",
                topics::status(topic_id),
                self.forged_statuses,
                if first {
                    "; not logged again for this topic"
                } else {
                    ""
                }
            );
        }
    }

    /// Records in the store and in memory that attempt `attempt` of task
    /// `id` was sent to `device`, within [`MAX_DISPATCHES`] entries.
    fn record_dispatch(&mut self, id: &str, attempt: u32, device: &str) -> Result<(), StoreError> {
        let h = self.history.entry(id.to_string()).or_default();
        if h.iter().any(|(a, d)| *a == attempt && d == device) {
            // The same dispatch again (a restart retries the same attempt,
            // or a failed batch is replayed). Written all the same (it is
            // `INSERT OR IGNORE`): memory may hold an entry whose batch
            // was rolled back, and the store must have it.
            return self.store.add_dispatch(id, attempt, device);
        }
        if h.len() >= MAX_DISPATCHES {
            let oldest = (0..h.len()).min_by_key(|&i| h[i].0).expect("not empty");
            let (a, d) = h.remove(oldest);
            self.store.drop_dispatch(id, a, &d)?;
        }
        h.push((attempt, device.to_string()));
        self.store.add_dispatch(id, attempt, device)
    }

    /// Whether open task `id` was ever dispatched to `device`.
    fn sent_to(&self, id: &str, device: &str) -> bool {
        let holds = self.tasks.get(id).is_some_and(|t| {
            t.row.state != TaskState::Queued && t.row.device.as_deref() == Some(device)
        });
        holds
            || self
                .history
                .get(id)
                .is_some_and(|h| h.iter().any(|(_, d)| d == device))
    }

    /// A message about open task `id` from a device it was never sent to:
    /// anyone can publish on any results topic. Counted; logged at powers
    /// of two, so a flood does not flood the log.
    fn forged_result(&mut self, what: &str, id: &str, device: &str) {
        self.forged_results += 1;
        if self.forged_results.is_power_of_two() {
            log::warn!(
                "{what} for task {id} on {}: the task was never dispatched to `{device}`; \
                 ignored ({} such message(s) so far)",
                topics::results(device),
                self.forged_results
            );
        }
    }

    fn on_agent(&mut self, device: &str, msg: FromAgent) -> Result<(), StoreError> {
        // Only messages about open tasks can change anything; those count
        // only from a device the task was dispatched to.
        let about = match &msg {
            FromAgent::Started { task_id } => ("Started", task_id),
            FromAgent::Rejected { task_id, .. } => ("Rejected", task_id),
            FromAgent::Finished(o) => ("Finished", &o.task_id),
            FromAgent::Chunk { task_id, .. } => ("Chunk", task_id),
            // Not about a task (the event loop hands it over before).
            FromAgent::Catalog(_) => ("Catalog", &String::new()),
            FromAgent::Holding { .. } => ("Holding", &String::new()),
        };
        if self.tasks.contains_key(about.1) && !self.sent_to(about.1, device) {
            let (what, id) = (about.0, about.1.clone());
            self.forged_result(what, &id, device);
            // Not acked: the sender may be a real device the history lost
            // (past its bound, or a store from before it); acked, its
            // result left its outbox and its ledger answered the task's
            // next dispatch with "already done": lost for good. Unacked it
            // is re-sent, a bounded number of times.
            return Ok(());
        }
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
                                    t.row.timeout_ms.saturating_add(self.cfg.timeout_grace_ms),
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
                let holder = self.tasks.get(&id).map(|t| {
                    t.row.state != TaskState::Queued && t.row.device.as_deref() == Some(device)
                });
                let retry = matches!(&outcome.result, Err(e) if e.retryable
                    && !matches!(e.kind, ErrorKind::Timeout | ErrorKind::Cancelled));
                if holder == Some(false) && retry {
                    // A retryable failure of an attempt the task was already
                    // taken from (its device was lost; the agent's outbox
                    // delivered it late): that attempt was counted then, and
                    // the task waits in the queue or runs elsewhere. Queueing
                    // it again would put it in the queue twice.
                    log::info!(
                        "task {id}: late retryable failure from {device}, which no longer has it; ignored"
                    );
                } else if holder.is_some() {
                    // First result wins, also from a device the task was
                    // dispatched to and then taken away from (the work was
                    // done); a device it never went to was refused above.
                    if holder == Some(false) {
                        let row = self.tasks[&id].row.clone();
                        if let (Some(other), true) = (&row.device, row.state != TaskState::Queued) {
                            self.publish(
                                topics::tasks(other),
                                protocol::encode(&ToAgent::Cancel {
                                    task_id: id.clone(),
                                }),
                            );
                        }
                        self.unassign(&row);
                        if let Some(t) = self.tasks.get_mut(&id) {
                            t.row.device = Some(device.to_string());
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
            FromAgent::Chunk { task_id, seq, text } => {
                // Only from the device that holds the task now: a chunk of
                // an attempt taken away must not mix into the new one's.
                if let Some(t) = self.tasks.get(&task_id) {
                    if t.row.device.as_deref() == Some(device)
                        && matches!(t.row.state, TaskState::Dispatched | TaskState::Running)
                    {
                        let attempt = t.row.attempts;
                        self.streams.chunk(&task_id, attempt, seq, text);
                    }
                }
            }
            FromAgent::Catalog(c) => self.on_catalog(device, c),
            FromAgent::Holding { tasks } => self.on_holding(device, tasks),
        }
        Ok(())
    }

    fn on_tick(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        let missed = self.cfg.offline_after_missed;
        let late: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| {
                let wait = Duration::from_millis(silence(d.status.heartbeat_ms, missed));
                d.online && now.duration_since(d.last_seen) > wait
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            self.device_lost(&id, "missed heartbeats")?;
        }
        // A device lost in a batch whose commit failed: the reload gave it
        // back the tasks the store still has on it, but it is offline now,
        // so neither its status (handled again, no change any more) nor the
        // silence check above would take them back. A committed batch never
        // leaves an offline device with tasks.
        let stranded: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| !d.online && !d.assigned.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in stranded {
            self.device_lost(
                &id,
                "offline (its loss is applied again after a failed commit)",
            )?;
        }
        // Only tasks in flight are looked at (every one is assigned to a
        // device), not the whole queue: a large backlog costs the tick nothing.
        //
        // A dispatch can be lost on the way (a broker restart, a session the
        // broker dropped): one not started after as long as a device is given
        // to show life goes to the same device again. The agent answers a
        // repeat without running it twice (already queued, running or done).
        let mut resend = Vec::new();
        let mut expired: Vec<(String, Option<String>, u64)> = Vec::new();
        for d in self.devices.values() {
            let wait = Duration::from_millis(silence(d.status.heartbeat_ms, missed));
            for id in &d.assigned {
                let Some(t) = self.tasks.get_mut(id) else {
                    continue;
                };
                if t.deadline.is_some_and(|x| x <= now)
                    && matches!(t.row.state, TaskState::Dispatched | TaskState::Running)
                {
                    expired.push((t.row.id.clone(), t.row.device.clone(), t.row.timeout_ms));
                    continue;
                }
                let backoff = 1u32 << t.resends.min(2);
                if t.row.state == TaskState::Dispatched
                    && d.online
                    && t.last_sent
                        .is_some_and(|s| now.duration_since(s) >= wait * backoff)
                {
                    t.last_sent = Some(now);
                    t.resends = t.resends.saturating_add(1);
                    resend.push((d.status.device_id.clone(), spec_of(&t.row), t.resends));
                }
            }
        }
        for (dev, spec, n) in resend {
            // Once at info: the repeats of a task queued on a busy agent
            // would fill the log.
            let level = if n == 1 {
                log::Level::Info
            } else {
                log::Level::Debug
            };
            log::log!(
                level,
                "task {}: not started on {dev} yet, sending it again (repeat {n})",
                spec.id
            );
            self.publish(topics::tasks(&dev), protocol::encode(&ToAgent::Task(spec)));
        }
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
        // Queue time-to-live (indexed by time: no scan).
        for id in self.queue.take_expired(now) {
            if self.tasks.contains_key(&id) {
                let msg = format!(
                    "not dispatched within {} ms in the queue (scheduler.queue_ttl_ms): no device could take it",
                    self.cfg.queue_ttl_ms
                );
                self.terminate(&id, TaskState::TimedOut, None, Some(msg))?;
            }
        }
        if self.cfg.retention_ms > 0 && now >= self.next_retention {
            self.next_retention = after(now, 60_000);
            let cutoff = crate::now_ms().saturating_sub(self.cfg.retention_ms);
            // A bounded bite per tick, in rows and bytes: this runs inside
            // the batch's transaction, and a backlog of old rows must not
            // make one commit huge and stall the scheduler.
            let (n, more) =
                self.store
                    .delete_finished_before(cutoff, RETENTION_ROWS, RETENTION_BYTES)?;
            if n > 0 {
                log::info!(
                    "retention: deleted {n} task(s) finished more than {} ms ago{}",
                    self.cfg.retention_ms,
                    if more { "; more at the next tick" } else { "" }
                );
            }
            if more {
                self.next_retention = now;
            }
        }
        Ok(())
    }

    /// Whether `d` can take some task now.
    fn has_room(&self, d: &Device, now: Instant) -> bool {
        #[cfg(test)]
        self.checks.set(self.checks.get() + 1);
        d.online && d.busy_until.is_none_or(|b| b <= now) && d.assigned.len() < d.capacity()
    }

    /// Whether `d` can take a task with these needs now.
    fn can_take(&self, d: &Device, needs: &Needs, now: Instant) -> bool {
        #[cfg(test)]
        self.checks.set(self.checks.get() + 1);
        d.online
            && d.busy_until.is_none_or(|b| b <= now)
            && d.assigned.len() < d.capacity()
            && d.status.plugins.contains(&needs.plugin)
            && needs
                .target
                .as_ref()
                .is_none_or(|x| *x == d.status.device_id)
            && needs
                .capability
                .as_ref()
                .is_none_or(|c| d.status.capabilities.contains(c))
            && needs
                .class
                .is_none_or(|c| d.status.capabilities.iter().any(|x| x == c))
    }

    fn eligible(&self, d: &Device, t: &Task, now: Instant) -> bool {
        #[cfg(test)]
        self.checks.set(self.checks.get() + 1);
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
            && route_class(t.row.route, &t.row.plugin)
                .is_none_or(|c| d.status.capabilities.iter().any(|x| x == c))
    }

    fn dispatch(&mut self) -> Result<(), StoreError> {
        if !self.connected || self.queue.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        self.queue.release_due(now);
        // The devices that can take a task now: one look at each device,
        // then work only for these and the lanes they can serve. A lane for
        // a device without room is never looked at (before, every lane was
        // checked against every device: lanes x devices per pass).
        let free: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| self.has_room(d, now))
            .map(|(id, _)| id.clone())
            .collect();
        if free.is_empty() {
            return Ok(());
        }
        // The heads of the lanes some free device can serve, best first:
        // a targeted lane through its device, the untargeted ones (few) by
        // a look at the free devices.
        let mut heads: BTreeMap<queue::Key, queue::LaneId> = BTreeMap::new();
        for id in &free {
            let d = &self.devices[id];
            for (lane, needs, key) in self.queue.lanes_for_target(id) {
                if self.can_take(d, needs, now) {
                    heads.insert(key, lane);
                }
            }
        }
        for (lane, needs, key) in self.queue.untargeted_lanes() {
            if free
                .iter()
                .any(|f| self.can_take(&self.devices[f], needs, now))
            {
                heads.insert(key, lane);
            }
        }
        // Free devices that still have room.
        let mut room = free.len();
        while let Some((_, lane)) = heads.pop_first() {
            if room == 0 {
                break;
            }
            let Some((_, id)) = self.queue.head(lane) else {
                continue;
            };
            let id = id.to_string();
            let Some(t) = self.tasks.get(&id) else {
                // Cannot happen (the queue and the tasks change together);
                // never let it stop dispatching.
                log::error!("scheduler: queued task {id} is unknown; dropped from the queue");
                self.queue.remove(&id);
                if let Some((k, _)) = self.queue.head(lane) {
                    heads.insert(k, lane);
                }
                continue;
            };
            let prefer = t
                .prefer
                .as_ref()
                .and_then(|(p, until)| Some((self.devices.get(p)?, *until)));
            if let Some((d, until)) = prefer.filter(|(d, until)| !d.online && now < *until) {
                // Its device went away again: sending it elsewhere could do it twice.
                let dev = d.status.device_id.clone();
                self.queue.hold(&id, until, Some(dev));
                if let Some((k, _)) = self.queue.head(lane) {
                    heads.insert(k, lane);
                }
                continue;
            }
            let preferred = prefer.map(|(d, _)| d).filter(|d| self.eligible(d, t, now));
            let (chosen, why) = match preferred {
                Some(d) => (Some(d), Why::Preferred),
                None => {
                    let candidates: Box<dyn Iterator<Item = &Device>> = match &t.row.target {
                        Some(target) => Box::new(self.devices.get(target).into_iter()),
                        None => Box::new(free.iter().filter_map(|f| self.devices.get(f))),
                    };
                    // One pass, no allocation per task: the count of
                    // eligible devices (for the placement) and the first
                    // least loaded of them (as `min_by` picks it).
                    let mut n = 0;
                    let mut best: Option<&Device> = None;
                    for d in candidates.filter(|d| self.eligible(d, t, now)) {
                        n += 1;
                        let better = best.is_none_or(|b| {
                            let ld = d.assigned.len() as f32 / d.capacity() as f32;
                            let lb = b.assigned.len() as f32 / b.capacity() as f32;
                            ld.total_cmp(&lb)
                                .then(d.status.load1.total_cmp(&b.status.load1))
                                .is_lt()
                        });
                        if better {
                            best = Some(d);
                        }
                    }
                    (best, Why::LeastLoaded(n))
                }
            };
            // Nobody has room for this lane any more: it waits for the next pass.
            let Some(chosen) = chosen else { continue };
            let placement = placement(&t.row, chosen, why);
            let dev = chosen.status.device_id.clone();
            self.queue.remove(&id);
            let t = self.tasks.get_mut(&id).expect("queued task is known");
            t.row.state = TaskState::Dispatched;
            t.row.device = Some(dev.clone());
            t.row.placement = Some(placement);
            t.row.attempts += 1;
            t.row.dispatched_ms = Some(crate::now_ms());
            t.deadline = Some(after(
                now,
                t.row.timeout_ms.saturating_add(self.cfg.timeout_grace_ms),
            ));
            t.last_sent = Some(now);
            t.resends = 0;
            self.seq += 1;
            t.serial = self.seq;
            let dispatch_of = Some((id.clone(), dev.clone(), t.row.attempts, t.serial));
            let spec = spec_of(&t.row);
            let row = t.row.clone();
            self.store.save(&row)?;
            self.record_dispatch(&id, row.attempts, &dev)?;
            if let Some(d) = self.devices.get_mut(&dev) {
                d.assigned.insert(id.clone());
                if d.assigned.len() >= d.capacity() {
                    room = room.saturating_sub(1);
                }
            }
            self.effects.push(Effect::Publish {
                topic: topics::tasks(&dev),
                payload: protocol::encode(&ToAgent::Task(spec)),
                retain: false,
                dispatch_of,
            });
            if let Some((k, _)) = self.queue.head(lane) {
                heads.insert(k, lane);
            }
        }
        Ok(())
    }
}

enum SubmitFail {
    Api(ApiError),
    Store(StoreError),
}

/// How a dispatch chose its device.
#[derive(Debug, Clone, Copy)]
enum Why {
    /// The device that held the task before (it came back in time).
    Preferred,
    /// The least loaded of this many eligible devices with room.
    LeastLoaded(usize),
}

/// The task view's `placement`: the route, what a device had to offer, and
/// why this one, in a sentence.
fn placement(row: &TaskRow, d: &Device, why: Why) -> String {
    let route = resolve_route(row.route, &row.plugin, row.reply_to.is_some());
    let mut s = format!("route {}", route.as_str());
    if row.route == Route::Auto {
        s.push_str(match route {
            Route::Heavy => " (auto: plugin llm runs on heavy nodes)",
            Route::Queue => " (auto: answered on reply_to)",
            _ => " (auto)",
        });
    }
    let mut needs = vec![format!("plugin {}", row.plugin)];
    if let Some(c) = route_class(row.route, &row.plugin) {
        needs.push(c.to_string());
    }
    if let Some(c) = &row.capability {
        needs.push(c.clone());
    }
    let _ = write!(
        s,
        "; {} offers {}; ",
        d.status.device_id,
        needs.join(" and ")
    );
    match why {
        Why::Preferred => s.push_str("it ran this task before and came back in time"),
        Why::LeastLoaded(_) if row.target.is_some() => s.push_str("the task's target"),
        Why::LeastLoaded(n) => {
            let _ = write!(
                s,
                "least loaded of {n} eligible device{} with room ({} of {} slots in use, load {:.2})",
                if n == 1 { "" } else { "s" },
                d.assigned.len(),
                d.capacity(),
                d.status.load1
            );
        }
    }
    s
}

/// The plugin whose tasks `auto` routes to heavy nodes.
pub const HEAVY_PLUGIN: &str = "llm";

/// `auto` resolved: `heavy` for a language model, `queue` for a submission
/// answered on `reply_to`, else `edge`.
pub fn resolve_route(asked: Route, plugin: &str, reply_to: bool) -> Route {
    match asked {
        Route::Auto if plugin == HEAVY_PLUGIN => Route::Heavy,
        Route::Auto if reply_to => Route::Queue,
        Route::Auto => Route::Edge,
        r => r,
    }
}

/// The device class the route `asked` at submission holds a task to:
/// `heavy` (asked, or `auto` for a language model) only heavy nodes; `edge`
/// asked by name only edge devices. An `auto` task that resolved to `edge`
/// or `queue` may run on any device that offers its plugin (heavy nodes run
/// edge plugins too).
fn route_class(asked: Route, plugin: &str) -> Option<&'static str> {
    match resolve_route(asked, plugin, false) {
        Route::Heavy => Some("class:heavy"),
        Route::Edge if asked == Route::Edge => Some("class:edge"),
        _ => None,
    }
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
            max_queued_tasks: 100_000,
            max_queued_bytes: 1 << 30,
            queue_ttl_ms: 0,
            max_devices: 100,
            retention_ms: 0,
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
            route: None,
        }
    }

    /// A task that neither times out nor runs out of attempts in a test.
    fn long_req() -> SubmitRequest {
        let mut long = req(None, None);
        long.timeout_ms = Some(60_000);
        long.max_attempts = Some(10);
        long
    }

    /// A retryable failure of `id`, as an agent reports it.
    fn flaky(id: &str) -> FromAgent {
        FromAgent::Finished(TaskOutcome {
            task_id: id.into(),
            result: Err(crate::protocol::TaskError {
                kind: ErrorKind::Failed,
                message: "flaky".into(),
                retryable: true,
            }),
            elapsed_us: 5,
        })
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
        // A capability no known device offers is refused, like a plugin
        // (issue 18 item 4): it would wait forever.
        match s.submit(req(Some("tpu"), None)) {
            Err(SubmitFail::Api(ApiError::Unprocessable(m))) => {
                assert!(
                    m.contains("unknown capability `tpu`") && m.contains("gpu"),
                    "{m}"
                )
            }
            _ => panic!("a capability nobody has was accepted"),
        }
        // Offered, but not by the target named.
        match s.submit(req(Some("gpu"), Some("b"))) {
            Err(SubmitFail::Api(ApiError::Unprocessable(m))) => {
                assert!(m.contains("`b`"), "{m}")
            }
            _ => panic!("a capability the target lacks was accepted"),
        }
        // A known device that offers it but is offline: accepted, waits.
        let mut a = status("a", &["gpu"], 4);
        a.online = false;
        heartbeat(s, &a);
        let waits = submit(s, req(Some("gpu"), None));
        s.dispatch().unwrap();
        assert_eq!(s.tasks[&waits].row.state, TaskState::Queued);
    }

    /// Issue 11's routes: `heavy` only on heavy nodes (and `auto` sends the
    /// `llm` plugin there), `edge` by name only on edge devices, `auto` for
    /// anything else on any device; `queue` needs `reply_to`; a route no
    /// known device can serve is refused by name; the view says which route
    /// was taken and why its device was chosen.
    #[tokio::test(start_paused = true)]
    async fn routes_pick_the_device_class_and_say_why() {
        let mut r = rig();
        let s = &mut r.s;
        let mut heavy = status("pc-1", &["class:heavy"], 4);
        heavy.plugins.push("llm".into());
        heartbeat(s, &heavy);
        heartbeat(s, &status("pi-1", &["class:edge"], 4));
        let routed = |route: Option<Route>, plugin: &str| {
            let mut q = req(None, None);
            q.route = route;
            q.plugin = plugin.into();
            q
        };
        let llm = submit(s, routed(None, "llm"));
        let to_heavy = submit(s, routed(Some(Route::Heavy), "echo"));
        let to_edge = submit(s, routed(Some(Route::Edge), "echo"));
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &llm).as_deref(), Some("pc-1"));
        assert_eq!(device_of(s, &to_heavy).as_deref(), Some("pc-1"));
        assert_eq!(device_of(s, &to_edge).as_deref(), Some("pi-1"));
        let v = s.tasks[&llm].row.view();
        assert_eq!(v.route, Route::Heavy);
        let why = v.placement.unwrap();
        assert!(
            why.contains("route heavy (auto: plugin llm runs on heavy nodes)")
                && why.contains("pc-1 offers plugin llm and class:heavy")
                && why.contains("least loaded of 1 eligible device"),
            "{why}"
        );
        let why = s.tasks[&to_edge].row.view().placement.unwrap();
        assert!(
            why.starts_with("route edge; pi-1 offers plugin echo and class:edge"),
            "{why}"
        );
        // `auto` for an edge plugin: any device that has it, heavy too.
        let ids: Vec<String> = (0..6).map(|_| submit(s, routed(None, "echo"))).collect();
        s.dispatch().unwrap();
        let on: HashSet<String> = ids.iter().filter_map(|i| device_of(s, i)).collect();
        assert_eq!(on.len(), 2, "auto edge tasks used both devices: {on:?}");
        assert_eq!(s.tasks[&ids[0]].row.view().route, Route::Edge);
        // `queue` is for answers on `reply_to`.
        match s.submit(routed(Some(Route::Queue), "echo")) {
            Err(SubmitFail::Api(ApiError::BadRequest(m))) => {
                assert!(
                    m.contains("`route` \"queue\"") && m.contains("reply_to"),
                    "{m}"
                )
            }
            _ => panic!("route queue without reply_to was accepted"),
        }
        let mut q = routed(None, "echo");
        q.reply_to = Some("erp/replies".into());
        let queued = submit(s, q);
        assert_eq!(s.tasks[&queued].row.view().route, Route::Queue);
        // No heavy node offers sysinfo: refused, naming route and class.
        let mut pi2 = status("pi-2", &["class:edge"], 4);
        pi2.plugins.push("sysinfo".into());
        heartbeat(s, &pi2);
        match s.submit(routed(Some(Route::Heavy), "sysinfo")) {
            Err(SubmitFail::Api(ApiError::Unprocessable(m))) => assert!(
                m.contains("route `heavy`") && m.contains("class:heavy") && m.contains("sysinfo"),
                "{m}"
            ),
            _ => panic!("a heavy route nobody can serve was accepted"),
        }
        // The route survives in the store.
        let stored = s.store.get(&to_edge).unwrap().unwrap();
        assert_eq!(stored.route, Route::Edge);
        assert!(stored.placement.unwrap().contains("pi-1"));
    }

    /// A route's class and a capability must be on one device: with the
    /// class on one (a heavy node without `gpu`) and the capability on
    /// another (an edge board with it), no device can ever take the task,
    /// so it is refused at submission instead of waiting forever.
    #[tokio::test(start_paused = true)]
    async fn a_route_class_and_a_capability_on_different_devices_are_refused() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("pc-1", &["class:heavy"], 4));
        heartbeat(s, &status("pi-1", &["class:edge", "gpu"], 4));
        let mut q = req(Some("gpu"), None);
        q.route = Some(Route::Heavy);
        match s.submit(q.clone()) {
            Err(SubmitFail::Api(ApiError::Unprocessable(m))) => assert!(
                m.contains("route `heavy`")
                    && m.contains("class:heavy")
                    && m.contains("capability `gpu`"),
                "{m}"
            ),
            Ok(r) => {
                s.dispatch().unwrap();
                panic!(
                    "accepted, and never dispatched: {:?}",
                    s.tasks[&r.id].row.state
                )
            }
            Err(_) => panic!("refused for another reason"),
        }
        // Once a heavy node has it too, the same submission runs there.
        heartbeat(s, &status("pc-2", &["class:heavy", "gpu"], 4));
        let id = submit(s, q);
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("pc-2"));
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
        // Each repeat waits twice as long as the last, up to four times
        // (heartbeats keep the device online meanwhile).
        let mut at = 3100;
        for (gap, n) in [(6000, 3), (12000, 4), (12000, 5)] {
            let mut t = 0;
            while t + 1000 < gap {
                tokio::time::advance(Duration::from_millis(1000)).await;
                t += 1000;
                heartbeat(s, &status("a", &[], 2));
                s.on_tick().unwrap();
                assert_eq!(sent(s), n - 1, "too early at {} ms", at + t);
            }
            tokio::time::advance(Duration::from_millis((gap - t) as u64)).await;
            heartbeat(s, &status("a", &[], 2));
            s.on_tick().unwrap();
            assert_eq!(sent(s), n, "repeat {} at {} ms", n - 1, at + gap);
            at += gap;
        }
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
        assert_eq!(sent(s), 5, "sent again after it started");
    }

    /// Session 14's MCP flood: an agent kept working on tasks whose cancel
    /// never reached it, and took no new work for minutes. A status that
    /// counts more tasks than are open there gets a `ListTasks` (at most
    /// every 5 s); the answer's closed tasks are cancelled there, open ones
    /// left, and an answer nobody asked for is ignored.
    #[tokio::test(start_paused = true)]
    async fn a_device_holding_closed_tasks_is_told_to_cancel_them() {
        let mut r = rig();
        let s = &mut r.s;
        let to_a = |s: &Scheduler| -> Vec<ToAgent> {
            s.effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Publish { topic, payload, .. } if topic == &topics::tasks("a") => {
                        protocol::decode::<ToAgent>(payload, usize::MAX).ok()
                    }
                    _ => None,
                })
                .collect()
        };
        let asks = |s: &Scheduler| {
            to_a(s)
                .iter()
                .filter(|m| matches!(m, ToAgent::ListTasks))
                .count()
        };
        heartbeat(s, &status("a", &[], 2));
        let open = submit(s, long_req());
        s.dispatch().unwrap();
        // Counts that match what is open there: nothing asked.
        let mut st = status("a", &[], 2);
        st.running = 1;
        heartbeat(s, &st);
        assert_eq!(asks(s), 0);
        // Three more than open: asked once, not again within 5 s.
        st.queued = 3;
        heartbeat(s, &st);
        tokio::time::advance(Duration::from_millis(4900)).await;
        heartbeat(s, &st);
        assert_eq!(asks(s), 1);
        let holding = |tasks: &[&str]| {
            protocol::encode(&FromAgent::Holding {
                tasks: tasks.iter().map(|t| t.to_string()).collect(),
            })
        };
        let finished = submit(s, long_req());
        s.cancel(&finished).unwrap().unwrap();
        let cancels = |s: &Scheduler| -> Vec<String> {
            to_a(s)
                .into_iter()
                .filter_map(|m| match m {
                    ToAgent::Cancel { task_id } => Some(task_id),
                    _ => None,
                })
                .collect()
        };
        let from_a = |s: &mut Scheduler, payload: Vec<u8>| {
            let p = Publish::new(topics::results("a"), QoS::AtLeastOnce, payload);
            s.handle(Command::Mqtt(MqttEvent::Message(p))).unwrap();
        };
        let before = cancels(s).len();
        let answer = holding(&[&open, &finished, "gone-1", "gone-1"]);
        from_a(s, answer.clone());
        assert_eq!(
            cancels(s)[before..],
            [finished.clone(), "gone-1".to_string()],
            "closed ones only, once each"
        );
        // Answered: a second copy (or a forger's) changes nothing.
        from_a(s, answer.clone());
        assert_eq!(cancels(s).len(), before + 2);
        tokio::time::advance(Duration::from_millis(200)).await;
        heartbeat(s, &st);
        assert_eq!(asks(s), 2, "asked again after 5 s while the counts differ");
        // An answer naming nothing closed: asked again after a minute.
        from_a(s, holding(&[&open]));
        tokio::time::advance(Duration::from_secs(59)).await;
        heartbeat(s, &st);
        assert_eq!(asks(s), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        heartbeat(s, &st);
        assert_eq!(asks(s), 3);
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
        let first = s.queue.first_ready().unwrap();
        assert_eq!(first, h);
        assert_ne!(first, l);
    }

    /// Issue 18 item 1: ten thousand tasks no device can take (an offline
    /// target, a capability only an offline device has) queued ahead of an
    /// echo the online device can run: the echo must dispatch.
    #[tokio::test(start_paused = true)]
    async fn parked_tasks_do_not_block_a_dispatchable_one() {
        let mut r = rig();
        let s = &mut r.s;
        let mut away = status("away", &["gpu"], 4);
        heartbeat(s, &away);
        away.online = false;
        heartbeat(s, &away);
        heartbeat(s, &status("b", &[], 1));
        for i in 0..10_000 {
            if i % 2 == 0 {
                submit(s, req(None, Some("away")));
            } else {
                submit(s, req(Some("gpu"), None));
            }
        }
        let echo = submit(s, req(None, None));
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &echo).as_deref(), Some("b"));
    }

    /// Issue 15 item 2: dispatch, the device is lost (the task is back in
    /// the queue), the agent's outbox then delivers a retryable failure for
    /// the old attempt: the task must be in the queue once, dispatched once.
    #[tokio::test(start_paused = true)]
    async fn a_late_retryable_result_does_not_queue_a_task_twice() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 1));
        let id = submit(s, long_req());
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("a"));
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(900)).await;
            heartbeat(s, &status("b", &[], 1));
            heartbeat(s, &status("c", &[], 1));
            s.on_tick().unwrap();
        }
        assert!(!s.devices["a"].online);
        assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
        s.on_agent("a", flaky(&id)).unwrap();
        assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
        tokio::time::advance(Duration::from_millis(60_000)).await;
        heartbeat(s, &status("b", &[], 1));
        heartbeat(s, &status("c", &[], 1));
        s.dispatch().unwrap();
        s.dispatch().unwrap();
        let holders: Vec<&String> = s
            .devices
            .iter()
            .filter(|(_, d)| d.assigned.contains(&id))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(holders.len(), 1, "dispatched to {holders:?}");
        assert_eq!(s.queue.len(), 0, "a stale queue entry is left");
        // A cancel now, then a dispatch pass: no panic, nothing left.
        let r = s.cancel(&id).unwrap();
        assert!(r.is_ok());
        s.dispatch().unwrap();
        assert!(s.devices.values().all(|d| !d.assigned.contains(&id)));
    }

    /// Issue 18 item 1, across a restart: the parked tasks come back from
    /// the store and still do not hold up a task the online device can run.
    #[tokio::test(start_paused = true)]
    async fn parked_tasks_do_not_block_after_a_restart_either() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let store = Store::open(dir.path(), "normal").unwrap();
            let (client, el) =
                AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 10_000);
            let (mut s, _h, rx) = Scheduler::new(cfg(), store, client, 1 << 20).unwrap();
            s.connected = true;
            (s, rx, el)
        };
        {
            let (mut s, _rx, _el) = open();
            let mut away = status("away", &["gpu"], 4);
            heartbeat(&mut s, &away);
            away.online = false;
            heartbeat(&mut s, &away);
            s.store.begin().unwrap();
            for i in 0..10_000 {
                if i % 2 == 0 {
                    submit(&mut s, req(None, Some("away")));
                } else {
                    submit(&mut s, req(Some("gpu"), None));
                }
            }
            s.store.commit().unwrap();
        }
        let (mut s, _rx, _el) = open();
        assert_eq!(s.queue.len(), 10_000);
        heartbeat(&mut s, &status("b", &[], 1));
        let echo = submit(&mut s, req(None, None));
        s.dispatch().unwrap();
        assert_eq!(device_of(&s, &echo).as_deref(), Some("b"));
        // And when `away` is back, its tasks go to it.
        heartbeat(&mut s, &status("away", &["gpu"], 4));
        s.dispatch().unwrap();
        assert_eq!(s.devices["away"].assigned.len(), 4);
    }

    fn status_msg(st: &DeviceStatus) -> Command {
        Command::Mqtt(MqttEvent::Message(Publish::new(
            topics::status(&st.device_id),
            QoS::AtLeastOnce,
            protocol::encode(st),
        )))
    }

    fn result_msg(dev: &str, id: &str) -> Command {
        Command::Mqtt(MqttEvent::Message(Publish::new(
            topics::results(dev),
            QoS::AtLeastOnce,
            protocol::encode(&FromAgent::Finished(TaskOutcome {
                task_id: id.to_string(),
                result: Ok(Value::Int(7)),
                elapsed_us: 5,
            })),
        )))
    }

    /// Issue 15 item 6: a failed COMMIT (a deferred foreign key violated
    /// by a trigger, so SQLite refuses exactly the COMMIT) must leave
    /// memory as the store is: the submission answered "not accepted" is
    /// never written, the result handled in that batch is not lost (its
    /// message is kept unacked and handled again), and the long-poll waiter
    /// is not told the task ended until it has.
    #[tokio::test(start_paused = true)]
    async fn a_failed_commit_reloads_and_replays_the_batch() {
        let mut r = rig();
        let s = &mut r.s;
        let mut batch = vec![status_msg(&status("a", &[], 2))];
        s.batch(&mut batch, false).unwrap();
        let (tx, mut x_rx) = oneshot::channel();
        let mut batch = vec![Command::Submit {
            req: long_req(),
            resp: tx,
        }];
        s.batch(&mut batch, false).unwrap();
        let x = x_rx.try_recv().unwrap().unwrap().id;
        assert_eq!(device_of(s, &x).as_deref(), Some("a"));
        let (tx, mut waiter) = oneshot::channel();
        s.batch(
            &mut vec![Command::Wait {
                id: x.clone(),
                resp: tx,
            }],
            false,
        )
        .unwrap();

        s.store
            .conn()
            .execute_batch(
                "PRAGMA foreign_keys = ON;
                 CREATE TABLE parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE poison (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
                 CREATE TRIGGER poison_insert AFTER INSERT ON tasks BEGIN INSERT INTO poison VALUES (1); END;",
            )
            .unwrap();
        let (tx, mut y_rx) = oneshot::channel();
        let mut batch = vec![
            result_msg("a", &x),
            Command::Submit {
                req: long_req(),
                resp: tx,
            },
        ];
        s.batch(&mut batch, false).unwrap();
        let e = y_rx.try_recv().unwrap().unwrap_err();
        assert!(matches!(e, ApiError::Unavailable(_)), "{e:?}");
        assert!(
            waiter.try_recv().is_err(),
            "the waiter heard of an uncommitted end"
        );
        // Memory is what the store says: x still on `a`, nothing else.
        assert_eq!(s.tasks.len(), 1);
        assert_eq!(s.tasks[&x].row.state, TaskState::Dispatched);
        assert!(s.devices["a"].assigned.contains(&x));
        assert_eq!(
            s.store.get(&x).unwrap().unwrap().state,
            TaskState::Dispatched
        );
        assert_eq!(s.replay.len(), 1, "the result is kept, unacked");
        assert_eq!(s.store.list(None, 100).unwrap().len(), 1, "y was written");

        // While the store is failing (its back-off) writes are refused.
        let (tx, mut z_rx) = oneshot::channel();
        s.batch(
            &mut vec![Command::Submit {
                req: long_req(),
                resp: tx,
            }],
            false,
        )
        .unwrap();
        assert!(matches!(
            z_rx.try_recv().unwrap(),
            Err(ApiError::Unavailable(_))
        ));
        assert_eq!(s.replay.len(), 1);

        // The store works again: the kept result is handled and acked.
        s.store
            .conn()
            .execute_batch("DROP TRIGGER poison_insert;")
            .unwrap();
        tokio::time::advance(Duration::from_millis(200)).await;
        s.batch(&mut Vec::new(), false).unwrap();
        assert!(s.replay.is_empty());
        assert!(s.tasks.is_empty());
        assert_eq!(
            s.store.get(&x).unwrap().unwrap().state,
            TaskState::Succeeded
        );
        let v = waiter.try_recv().unwrap().unwrap().unwrap();
        assert_eq!(v.state, TaskState::Succeeded);
        assert!(s.devices["a"].assigned.is_empty());
        assert_eq!(s.store.list(None, 100).unwrap().len(), 1);
    }

    /// Issue 18 item 4 / 15 item 8: admission bounds, by count and bytes.
    #[tokio::test(start_paused = true)]
    async fn admission_is_bounded_by_count_and_bytes() {
        let mut r = rig();
        let s = &mut r.s;
        s.cfg.max_queued_tasks = 3;
        heartbeat(s, &status("a", &[], 1));
        for _ in 0..3 {
            submit(s, req(None, None));
        }
        match s.submit(req(None, None)) {
            Err(SubmitFail::Api(ApiError::Busy {
                message,
                retry_after_s,
            })) => {
                assert!(message.contains("scheduler.max_queued_tasks"), "{message}");
                assert!(retry_after_s >= 1);
            }
            _ => panic!("admitted past max_queued_tasks"),
        }
        s.cfg.max_queued_tasks = 100;
        // Three tasks of input `1` hold 3 bytes; 18 more pass the 20.
        s.cfg.max_queued_bytes = 20;
        let mut big = req(None, None);
        big.input = serde_json::json!("0123456789abcdef");
        match s.submit(big) {
            Err(SubmitFail::Api(ApiError::Busy { message, .. })) => {
                assert!(message.contains("scheduler.max_queued_bytes"), "{message}")
            }
            _ => panic!("admitted past max_queued_bytes"),
        }
        // One input over the whole budget could never fit: refused as too
        // large, not "try again later" (a workflow step would wait in vain).
        let mut huge = req(None, None);
        huge.input = serde_json::json!("a string of more than twenty bytes");
        match s.submit(huge) {
            Err(SubmitFail::Api(ApiError::TooLarge(message))) => {
                assert!(message.contains("36 bytes"), "{message}");
                assert!(message.contains("scheduler.max_queued_bytes"), "{message}")
            }
            _ => panic!("an input over the whole budget was not refused as too large"),
        }
        // Over MQTT the submitter hears why.
        let sub = serde_json::json!({"plugin": "echo", "input": "0123456789abcdef",
            "reply_to": "app/replies", "correlation": "c1"});
        s.on_mqtt_submit(sub.to_string().as_bytes()).unwrap();
        let rejected = s.effects.iter().any(|e| {
            matches!(e, Effect::Publish { topic, payload, .. }
            if topic == "app/replies"
                && String::from_utf8_lossy(payload).contains("queue is full")
                && String::from_utf8_lossy(payload).contains("rejected"))
        });
        assert!(rejected);
        // Bytes come back when tasks end.
        let held = s.held_bytes;
        let id = s.tasks.keys().next().unwrap().clone();
        s.cancel(&id).unwrap().unwrap();
        assert!(s.held_bytes < held);
    }

    /// Issue 18 item 4: `queue_ttl_ms`, and a bound on devices made from statuses.
    #[tokio::test(start_paused = true)]
    async fn queue_ttl_and_device_bound() {
        let mut r = rig();
        let s = &mut r.s;
        s.cfg.queue_ttl_ms = 1000;
        s.cfg.max_devices = 2;
        let mut away = status("away", &[], 1);
        heartbeat(s, &away);
        away.online = false;
        heartbeat(s, &away);
        let id = submit(s, req(None, Some("away")));
        tokio::time::advance(Duration::from_millis(999)).await;
        s.on_tick().unwrap();
        assert!(s.tasks.contains_key(&id));
        tokio::time::advance(Duration::from_millis(2)).await;
        s.on_tick().unwrap();
        assert!(!s.tasks.contains_key(&id) && s.queue.is_empty());
        let row = s.store.get(&id).unwrap().unwrap();
        assert_eq!(row.state, TaskState::TimedOut);
        assert!(row.error.unwrap().contains("queue_ttl_ms"));

        heartbeat(s, &status("b", &[], 1));
        heartbeat(s, &status("c", &[], 1));
        assert_eq!(s.devices.len(), 2, "a third made-up device was kept");
        assert_eq!(s.store.devices().unwrap().len(), 2);
        // Known ones still beat.
        heartbeat(s, &status("b", &[], 3));
        assert_eq!(s.devices["b"].status.max_concurrency, 3);
    }

    /// Issue 15 item 8: finished tasks older than `retention_ms` are deleted.
    #[tokio::test(start_paused = true)]
    async fn retention_deletes_old_finished_tasks() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 2));
        let old = submit(s, req(None, None));
        let recent = submit(s, req(None, None));
        let open = submit(s, req(None, None));
        s.cancel(&old).unwrap().unwrap();
        s.cancel(&recent).unwrap().unwrap();
        s.store
            .conn()
            .execute("UPDATE tasks SET finished_ms = 1 WHERE id = ?1", [&old])
            .unwrap();
        s.cfg.retention_ms = 86_400_000;
        s.on_tick().unwrap();
        assert!(s.store.get(&old).unwrap().is_none());
        assert!(s.store.get(&recent).unwrap().is_some());
        assert!(s.store.get(&open).unwrap().is_some());
    }

    /// Issue 18 item 6 (the scheduler's arithmetic): a huge `aging_ms` must
    /// not overflow the key and invert the order; huge back-off and grace
    /// values must not overflow a shift or an `Instant`.
    #[tokio::test(start_paused = true)]
    async fn huge_config_values_do_not_overflow() {
        let mut r = rig();
        let s = &mut r.s;
        s.cfg.aging_ms = u64::MAX;
        s.cfg.retry_backoff_ms = u64::MAX / 3;
        s.cfg.retry_backoff_max_ms = u64::MAX;
        s.cfg.timeout_grace_ms = u64::MAX;
        heartbeat(s, &status("a", &[], 1));
        let mut low = long_req();
        low.priority = Some(1);
        let mut high = long_req();
        high.priority = Some(100);
        let _l = submit(s, low);
        let h = submit(s, high);
        assert_eq!(s.queue.first_ready(), Some(h.as_str()));
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &h).as_deref(), Some("a"));
        for _ in 0..2 {
            let t = s
                .tasks
                .values()
                .find(|t| t.row.state == TaskState::Dispatched);
            let Some(id) = t.map(|t| t.row.id.clone()) else {
                break;
            };
            s.on_agent("a", flaky(&id)).unwrap();
            assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
            s.on_tick().unwrap();
            s.dispatch().unwrap();
        }
    }

    /// A device's capacity and a started task's deadline are sums of values
    /// from the network and the config: they saturate instead of panicking
    /// (debug) or wrapping (release).
    #[tokio::test(start_paused = true)]
    async fn sums_of_network_and_config_values_saturate() {
        let mut r = rig();
        let s = &mut r.s;
        s.cfg.timeout_grace_ms = u64::MAX;
        let mut st = status("a", &[], u32::MAX);
        st.queue_capacity = u32::MAX;
        heartbeat(s, &st);
        assert!(s.devices["a"].capacity() >= u32::MAX as usize);
        let id = submit(s, long_req());
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("a"));
        s.on_agent(
            "a",
            FromAgent::Started {
                task_id: id.clone(),
            },
        )
        .unwrap();
        assert_eq!(s.tasks[&id].row.state, TaskState::Running);
    }

    /// Makes the store refuse the next COMMIT that wrote a task row (`on`:
    /// `INSERT` or `UPDATE`): a deferred foreign key broken by a trigger.
    fn poison(s: &Scheduler, on: &str) {
        s.store
            .conn()
            .execute_batch(&format!(
                "PRAGMA foreign_keys = ON;
                 CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE IF NOT EXISTS poison (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
                 CREATE TRIGGER poison_task AFTER {on} ON tasks BEGIN INSERT INTO poison VALUES (1); END;"
            ))
            .unwrap();
    }

    fn cure(s: &Scheduler) {
        s.store
            .conn()
            .execute_batch("DROP TRIGGER poison_task;")
            .unwrap();
    }

    fn offline(id: &str) -> DeviceStatus {
        let mut st = status(id, &[], 1);
        st.online = false;
        st
    }

    /// Review finding 1: a device declared lost in a batch whose commit
    /// failed kept its tasks. The reload put them back on it (the store
    /// still had them there), and nothing took them back: its status,
    /// handled again, no longer changed anything, and the silence check
    /// looks at online devices only.
    #[tokio::test(start_paused = true)]
    async fn a_device_lost_in_a_failed_batch_gives_its_tasks_back() {
        let mut r = rig();
        let s = &mut r.s;
        s.batch(&mut vec![status_msg(&status("a", &[], 1))], false)
            .unwrap();
        let (tx, mut rx) = oneshot::channel();
        s.batch(
            &mut vec![Command::Submit {
                req: long_req(),
                resp: tx,
            }],
            false,
        )
        .unwrap();
        let x = rx.try_recv().unwrap().unwrap().id;
        assert_eq!(device_of(s, &x).as_deref(), Some("a"));
        s.batch(&mut vec![status_msg(&status("b", &[], 1))], false)
            .unwrap();

        poison(s, "UPDATE");
        s.batch(&mut vec![status_msg(&offline("a"))], false)
            .unwrap();
        assert_eq!(
            s.store.get(&x).unwrap().unwrap().device.as_deref(),
            Some("a"),
            "the loss was not committed"
        );
        assert!(!s.devices["a"].online);
        cure(s);
        // The store works again; `b` keeps beating, ticks run.
        for _ in 0..8 {
            tokio::time::advance(Duration::from_millis(200)).await;
            s.batch(&mut vec![status_msg(&status("b", &[], 1))], true)
                .unwrap();
        }
        assert!(s.replay.is_empty());
        assert!(
            s.devices["a"].assigned.is_empty(),
            "the lost device still holds its task"
        );
        assert_eq!(device_of(s, &x).as_deref(), Some("b"));
        let row = s.store.get(&x).unwrap().unwrap();
        assert_eq!(row.device.as_deref(), Some("b"));
        assert_eq!(row.attempts, 2, "the loss counted an attempt, once");
    }

    /// Review finding 2: the reload after a failed commit rebuilt the queue
    /// from the store alone, and lost what only memory knew: the device a
    /// recovered task waits for, a retry's back-off, the queue
    /// time-to-live (restarted at the reload).
    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_preference_backoff_and_queue_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let store = Store::open(dir.path(), "normal").unwrap();
            let (client, el) =
                AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 10_000);
            let mut c = cfg();
            c.queue_ttl_ms = 10_000;
            c.retry_backoff_ms = 5000;
            let (mut s, _h, rx) = Scheduler::new(c, store, client, 1 << 20).unwrap();
            s.connected = true;
            (s, rx, el)
        };
        let z = {
            let (mut s, _rx, _el) = open();
            heartbeat(&mut s, &status("p", &[], 1));
            let z = submit(&mut s, long_req());
            s.dispatch().unwrap();
            assert_eq!(device_of(&s, &z).as_deref(), Some("p"));
            z
        }; // the server restarts: `z` waits up to 3 s for `p`
        let (mut s, _rx, _el) = open();
        let s = &mut s;
        heartbeat(s, &status("away", &[], 1));
        heartbeat(s, &offline("away"));
        heartbeat(s, &status("a", &[], 4));
        let x = submit(s, req(None, Some("away"))); // expires at 10 s
        let y = submit(s, long_req());
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &y).as_deref(), Some("a"));
        assert_eq!(s.tasks[&z].row.state, TaskState::Queued);
        s.on_agent("a", flaky(&y)).unwrap();
        assert_eq!(s.tasks[&y].row.state, TaskState::Queued); // until 5 s

        tokio::time::advance(Duration::from_millis(2000)).await;
        poison(s, "INSERT");
        let (tx, _rx2) = oneshot::channel();
        s.batch(
            &mut vec![
                status_msg(&status("a", &[], 4)),
                Command::Submit {
                    req: long_req(),
                    resp: tx,
                },
            ],
            false,
        )
        .unwrap();
        assert!(s.store_retry_at.is_some(), "the batch failed and reloaded");
        cure(s);
        let beat = |s: &mut Scheduler| {
            s.batch(&mut vec![status_msg(&status("a", &[], 4))], true)
                .unwrap()
        };
        tokio::time::advance(Duration::from_millis(200)).await;
        beat(s);
        assert_eq!(
            s.tasks[&z].row.state,
            TaskState::Queued,
            "went to `a` while it waits for `p`"
        );
        assert_eq!(
            s.tasks[&y].row.state,
            TaskState::Queued,
            "retried before its back-off"
        );
        tokio::time::advance(Duration::from_millis(900)).await; // 3.1 s
        beat(s);
        assert_eq!(device_of(s, &z).as_deref(), Some("a"), "`p` had its time");
        assert_eq!(s.tasks[&y].row.state, TaskState::Queued);
        tokio::time::advance(Duration::from_millis(2000)).await; // 5.1 s
        beat(s);
        assert_eq!(device_of(s, &y).as_deref(), Some("a"));
        for _ in 0..6 {
            tokio::time::advance(Duration::from_millis(900)).await; // to 10.5 s
            beat(s);
        }
        assert!(
            !s.tasks.contains_key(&x),
            "the queue time-to-live restarted at the reload"
        );
        assert_eq!(s.store.get(&x).unwrap().unwrap().state, TaskState::TimedOut);
    }

    /// Review finding 3: a `DispatchFailed` that arrives after its task was
    /// taken back (device lost) and dispatched again re-queued the new
    /// dispatch, which had been published: the task ran twice.
    #[tokio::test(start_paused = true)]
    async fn a_stale_dispatch_failure_leaves_the_new_dispatch_alone() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 1));
        let id = submit(s, long_req());
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("a"));
        let first = Command::DispatchFailed {
            id: id.clone(),
            device: "a".into(),
            attempt: 1,
            serial: s.tasks[&id].serial,
        };
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(900)).await;
            heartbeat(s, &status("b", &[], 1));
            s.on_tick().unwrap();
        }
        tokio::time::advance(Duration::from_millis(501)).await;
        heartbeat(s, &status("b", &[], 1));
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("b"));
        // The report of the first dispatch's failed publish comes late.
        s.handle(first).unwrap();
        assert_eq!(s.tasks[&id].row.state, TaskState::Dispatched);
        assert_eq!(device_of(s, &id).as_deref(), Some("b"));
        assert!(s.devices["b"].assigned.contains(&id));
        assert!(!s.queue.contains(&id));
        // The failure of the current dispatch still puts it back, free.
        let current = Command::DispatchFailed {
            id: id.clone(),
            device: "b".into(),
            attempt: 2,
            serial: s.tasks[&id].serial,
        };
        s.handle(current).unwrap();
        assert_eq!(s.tasks[&id].row.state, TaskState::Queued);
        assert_eq!(s.tasks[&id].row.attempts, 1);
        assert!(s.devices["b"].assigned.is_empty());
    }

    fn submit_msg(pkid: u16, correlation: &str) -> Publish {
        let body = serde_json::json!({"plugin": "echo", "input": 1, "correlation": correlation});
        let mut p = Publish::new(topics::SUBMIT, QoS::AtLeastOnce, body.to_string());
        p.pkid = pkid;
        p
    }

    fn stored_tasks(s: &Scheduler, correlation: &str) -> usize {
        s.store
            .list(None, 1000)
            .unwrap()
            .iter()
            .filter(|r| r.correlation.as_deref() == Some(correlation))
            .count()
    }

    /// Review finding 4: an MQTT submission kept for replay during a store
    /// outage was handled twice when the client reconnected meanwhile: once
    /// from the kept copy, once as the broker's redelivery (the session was
    /// kept and the message never acked). Without a session the broker
    /// sends nothing again: the kept copy is handled, but not acked with a
    /// packet id of the old connection.
    #[tokio::test(start_paused = true)]
    async fn a_reconnect_during_a_store_outage_does_not_submit_twice() {
        let mut r = rig();
        let s = &mut r.s;
        s.batch(&mut vec![status_msg(&status("a", &[], 0))], false)
            .unwrap();
        poison(s, "INSERT");
        let mut batch = vec![Command::Mqtt(MqttEvent::Message(submit_msg(7, "kept")))];
        s.batch(&mut batch, false).unwrap();
        assert_eq!(s.replay.len(), 1);
        // Reconnected with the session; the broker sends it again.
        let mut batch = vec![
            Command::Mqtt(MqttEvent::Disconnected("gone".into())),
            Command::Mqtt(MqttEvent::Connected {
                session_present: true,
            }),
            Command::Mqtt(MqttEvent::Message(submit_msg(1, "kept"))),
        ];
        s.batch(&mut batch, false).unwrap();
        cure(s);
        tokio::time::advance(Duration::from_millis(200)).await;
        s.batch(&mut Vec::new(), false).unwrap();
        assert!(s.replay.is_empty());
        assert_eq!(stored_tasks(s, "kept"), 1, "one submission, one task");

        // Without a session: the kept copy is the only one.
        poison(s, "INSERT");
        tokio::time::advance(Duration::from_millis(200)).await;
        s.batch(
            &mut vec![Command::Mqtt(MqttEvent::Message(submit_msg(8, "lone")))],
            false,
        )
        .unwrap();
        assert_eq!(s.replay.len(), 1);
        s.batch(
            &mut vec![Command::Mqtt(MqttEvent::Connected {
                session_present: false,
            })],
            false,
        )
        .unwrap();
        cure(s);
        tokio::time::advance(Duration::from_millis(400)).await;
        // The replay, by hand, to see the ack it leaves.
        s.store.begin().unwrap();
        for (p, e) in std::mem::take(&mut s.replay) {
            s.on_message(p, e).unwrap();
        }
        let stale = s
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::Ack(p, Some(ep)) if p.pkid == 8 && *ep != s.epoch))
            .count();
        assert_eq!(
            stale, 1,
            "the ack carries its old connection, so flush skips it"
        );
        s.store.commit().unwrap();
        s.flush();
        assert_eq!(stored_tasks(s, "lone"), 1, "not lost");
    }

    /// Review finding 7: retention deleted up to 10,000 rows in one batch's
    /// transaction; a backlog of big old rows made that commit huge. Now a
    /// batch deletes at most `RETENTION_ROWS` rows and `RETENTION_BYTES`,
    /// and the next tick goes on.
    #[tokio::test(start_paused = true)]
    async fn retention_deletes_in_bounded_chunks() {
        let mut r = rig();
        let s = &mut r.s;
        s.cfg.retention_ms = 86_400_000;
        let seed = |s: &mut Scheduler, n: usize, bytes: usize, tag: &str| {
            s.store.begin().unwrap();
            for i in 0..n {
                s.store
                    .save(&TaskRow {
                        id: format!("{tag}-{i:06}"),
                        plugin: "echo".into(),
                        input: format!("\"{}\"", "x".repeat(bytes)),
                        priority: 50,
                        target: None,
                        capability: None,
                        timeout_ms: 1000,
                        max_attempts: 1,
                        reply_to: None,
                        correlation: None,
                        state: TaskState::Succeeded,
                        attempts: 1,
                        device: None,
                        result: Some("1".into()),
                        error: None,
                        created_ms: 1,
                        dispatched_ms: None,
                        started_ms: None,
                        finished_ms: Some(1 + i as u64),
                        route: Route::Auto,
                        placement: None,
                    })
                    .unwrap();
            }
            s.store.commit().unwrap();
        };
        let left = |s: &Scheduler| s.store.list(None, 100_000).unwrap().len();
        seed(s, 1200, 10, "small");
        s.on_tick().unwrap();
        assert_eq!(
            left(s),
            700,
            "one batch deletes 500 (RETENTION_ROWS), not all"
        );
        // The next tick goes on (no minute's wait while there is a backlog).
        tokio::time::advance(Duration::from_millis(100)).await;
        s.on_tick().unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        s.on_tick().unwrap();
        assert_eq!(left(s), 0);

        // In bytes: 40 rows of 1 MiB, at most 16 MiB a batch.
        seed(s, 40, 1 << 20, "big");
        s.next_retention = Instant::now(); // not a minute's wait
        tokio::time::advance(Duration::from_millis(100)).await;
        s.on_tick().unwrap();
        let deleted = 40 - left(s);
        assert!(
            deleted >= 1 && deleted as u64 * (1 << 20) <= RETENTION_BYTES,
            "{deleted} MiB-sized rows deleted in one batch"
        );
        for _ in 0..40 {
            tokio::time::advance(Duration::from_millis(100)).await;
            s.on_tick().unwrap();
        }
        assert_eq!(left(s), 0);
    }

    /// `devices` online devices with one slot each, every one busy with a
    /// task and with one more task waiting for it (a lane each), plus a
    /// device `free` with room for many and a task any device can run.
    fn many_full_devices_and_parked_lanes(s: &mut Scheduler, devices: usize) -> String {
        s.cfg.max_devices = devices + 10;
        for i in 0..devices {
            let id = format!("d{i:05}");
            heartbeat(s, &status(&id, &[], 1));
            submit(s, req(None, Some(&id)));
            submit(s, req(None, Some(&id)));
        }
        s.dispatch().unwrap();
        assert!(s.devices.values().all(|d| d.assigned.len() == 1));
        assert_eq!(s.queue.lane_count(), devices);
        heartbeat(s, &status("free", &[], 1_000_000));
        submit(s, req(None, None))
    }

    /// Review finding 5: a dispatch pass checked every lane against every
    /// device (lanes x devices). With 2,000 full devices, each with a lane
    /// of its own waiting, and one free device, a pass must cost about one
    /// check per device, not millions.
    #[tokio::test(start_paused = true)]
    async fn a_dispatch_pass_is_proportional_to_free_devices_not_lanes_times_devices() {
        let mut r = rig();
        let s = &mut r.s;
        let n = 2000;
        let any = many_full_devices_and_parked_lanes(s, n);
        s.checks.set(0);
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &any).as_deref(), Some("free"));
        let checks = s.checks.get();
        assert!(
            checks <= 2 * n as u64 + 10,
            "{checks} device checks for one pass over {n} devices and {n} lanes"
        );
        // And a pass with nothing to do is as cheap.
        s.checks.set(0);
        s.dispatch().unwrap();
        assert!(s.checks.get() <= n as u64 + 1, "{}", s.checks.get());
    }

    /// The figures in BENCHMARKS.md ("Dispatch pass with many devices and
    /// lanes"): time per pass and device checks per pass.
    /// `cargo test --release --all-features --lib dispatch_pass_figures -- --ignored --nocapture`
    #[tokio::test(start_paused = true)]
    #[ignore]
    async fn dispatch_pass_figures() {
        for n in [500, 2000] {
            let mut r = rig();
            let s = &mut r.s;
            let _ = many_full_devices_and_parked_lanes(s, n);
            // `free` takes the one task: every pass then finds nothing to do.
            s.dispatch().unwrap();
            s.checks.set(0);
            let passes = 20;
            let start = std::time::Instant::now();
            for _ in 0..passes {
                s.dispatch().unwrap();
            }
            let per = start.elapsed() / passes;
            println!(
                "devices {n}, lanes {n}: {per:?} per pass, {} device checks per pass",
                s.checks.get() / passes as u64
            );
        }
    }

    fn done(id: &str, text: &str) -> FromAgent {
        FromAgent::Finished(TaskOutcome {
            task_id: id.into(),
            result: Ok(Value::Str(text.into())),
            elapsed_us: 1,
        })
    }

    /// Issue item 3: a result counts only from a device the task was
    /// dispatched to, the one that has it or one it was taken from; from
    /// any other it changes nothing and is counted (the `ResultAck` still
    /// goes out: tests/forged_messages.rs sees it).
    #[tokio::test(start_paused = true)]
    async fn results_count_only_from_devices_the_task_was_sent_to() {
        let mut r = rig();
        let s = &mut r.s;
        heartbeat(s, &status("a", &[], 1));
        let id = submit(s, long_req());
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("a"));
        let started = FromAgent::Started {
            task_id: id.clone(),
        };
        s.on_agent("evil", started).unwrap();
        s.on_agent("evil", done(&id, "forged")).unwrap();
        let rejected = FromAgent::Rejected {
            task_id: id.clone(),
            reason: RejectReason::Busy,
        };
        s.on_agent("evil", rejected).unwrap();
        assert_eq!(s.tasks[&id].row.state, TaskState::Dispatched);
        assert_eq!(device_of(s, &id).as_deref(), Some("a"));
        assert_eq!(s.forged_results, 3);
        // `a` is lost and the task goes to `b`: `a`'s late result still
        // counts (the work was done there), and `b` is told to stop.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(900)).await;
            heartbeat(s, &status("b", &[], 1));
            s.on_tick().unwrap();
        }
        tokio::time::advance(Duration::from_millis(1000)).await;
        heartbeat(s, &status("b", &[], 1));
        s.dispatch().unwrap();
        assert_eq!(device_of(s, &id).as_deref(), Some("b"));
        assert_eq!(
            s.store.dispatches(&id).unwrap(),
            [(1, "a".to_string()), (2, "b".to_string())]
        );
        s.on_agent("a", done(&id, "late")).unwrap();
        assert!(!s.tasks.contains_key(&id));
        let row = s.store.get(&id).unwrap().unwrap();
        assert_eq!(row.state, TaskState::Succeeded);
        assert_eq!(row.device.as_deref(), Some("a"));
        assert_eq!(s.forged_results, 3);
    }

    /// The history keeps at most [`MAX_DISPATCHES`] entries per task, in
    /// memory and in the store: a task refused busy by 70 devices in turn
    /// forgets the oldest.
    #[tokio::test(start_paused = true)]
    async fn the_dispatch_history_is_bounded_per_task() {
        let mut r = rig();
        let s = &mut r.s;
        for i in 0..70 {
            heartbeat(s, &status(&format!("d{i:02}"), &[], 1));
        }
        let id = submit(s, long_req());
        let mut seen = Vec::new();
        for _ in 0..70 {
            s.dispatch().unwrap();
            let dev = device_of(s, &id).expect("dispatched");
            seen.push(dev.clone());
            let busy = FromAgent::Rejected {
                task_id: id.clone(),
                reason: RejectReason::Busy,
            };
            s.on_agent(&dev, busy).unwrap();
        }
        s.dispatch().unwrap();
        let last = device_of(s, &id);
        assert_eq!(s.history[&id].len(), MAX_DISPATCHES);
        assert_eq!(s.store.dispatches(&id).unwrap().len(), MAX_DISPATCHES);
        // The first device was forgotten: its result is refused now.
        s.on_agent(&seen[0], done(&id, "too old")).unwrap();
        assert!(s.tasks.contains_key(&id));
        assert_eq!(s.forged_results, 1);
        // The latest one counts.
        if let Some(dev) = last {
            s.on_agent(&dev, done(&id, "ok")).unwrap();
        } else {
            s.on_agent(&seen[69], done(&id, "ok")).unwrap();
        }
        assert!(!s.tasks.contains_key(&id));
    }
}
