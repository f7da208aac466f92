//! The edge agent: receives tasks over MQTT, runs them through the plugin
//! registry with bounded concurrency, and sends results and heartbeats.
//!
//! Tasks are acknowledged to the broker only after they are in the agent's
//! queue (manual acks). Results stay in an outbox until the server confirms
//! them with `ResultAck`, and are re-sent on every reconnect and
//! periodically, so a broker restart or a network cut loses none. A task id
//! seen again is answered (an unconfirmed result is re-sent) or ignored (the
//! ledger of finished ids), never rerun.
//!
//! Inbox, outbox and ledger are durable (see [`journal`]): a task is written
//! to `{data_dir}/journal` before its publish is acked, and a result before
//! it is sent. After a crash the agent re-sends unconfirmed results, ignores
//! ledgered ids, and runs again the tasks that were accepted
//! but not finished. That last part is at least once: a plugin whose effect
//! happened just before the crash, with its `Finished` not yet written, runs
//! a second time. The window is the plugin's own run plus one journal write;
//! nothing that was recorded as finished is ever run again (while it is in
//! the ledger window, `agent.ledger_size`).
//!
//! A task may be what killed the agent (an allocation it could not get, a
//! stack overflow, the OOM killer). The journal records each start, so the
//! tasks that were running at a crash are known after it: they run again
//! one at a time, with nothing else running (new tasks wait in the queue).
//! One the agent dies under while it runs alone like this is failed
//! (`Failed`, not retryable) at the next start instead of run a third time,
//! so a task that kills the agent costs two restarts, not a crash loop, and
//! the tasks that only happened to run beside it still finish.
//!
//! A task's concurrency slot is held until its plugin's work has really
//! ended, not only until its result was sent (see [`crate::plugins::Work`]):
//! after a timeout or a cancel the result goes out at once, the plugin gets
//! a moment to stop by itself, then its future is dropped; a blocking
//! thread that is still running keeps the slot until it returns. At
//! shutdown the agent waits `agent.shutdown_timeout_ms` at most for running
//! work, then exits anyway.

pub mod config;
mod journal;
pub mod ota;
pub mod sd_notify;

pub use config::AgentConfig;

use crate::boards::Board;
use crate::mqtt::{spawn_event_loop, Backoff, MqttEvent};
use crate::plugins::{sysinfo, OutputStream, PluginError, Registry, TaskContext, Work};
use crate::protocol::{
    self, topics, DeviceStatus, ErrorKind, FromAgent, RejectReason, StorageCounters, TaskError,
    TaskOutcome, TaskSpec, ToAgent,
};
use crate::storage::StorageError;
use journal::{Journal, Record};
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Capacity of the fixed inbox; the effective bound is the configured queue capacity.
const INBOX: usize = crate::boards::MAX_QUEUE_CAPACITY as usize;

/// Most events handled under one journal commit.
const GROUP: usize = 256;

/// After a timeout or cancel, how long a plugin's future may take to stop
/// by itself (exec kills its process group, a process plugin its worker)
/// before the agent drops it.
const STOP_GRACE: Duration = Duration::from_millis(1000);

/// What waits for the journal commit of the batch it was decided in.
enum Deferred {
    /// Ack an MQTT publish (a task it carried is now on disk).
    Ack(rumqttc::Publish),
    /// Start a task whose slot is reserved in `running`.
    Start(TaskSpec, CancellationToken),
    /// Publish a result from the outbox.
    Send(String),
    /// Publish an event whose record (e.g. `Released`) had to be durable
    /// first.
    Event(FromAgent),
}

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("agent storage: {0}")]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Tls(#[from] crate::mqtt::TlsError),
}

/// A configured agent, ready to run.
pub struct Agent {
    cfg: AgentConfig,
    board: Board,
    registry: Registry,
}

enum Event {
    Mqtt(MqttEvent),
    /// A task's result; `true` when its work is still running (it timed out
    /// or was cancelled and has not stopped yet): its slot stays taken until
    /// [`Event::WorkEnded`].
    Finished(TaskOutcome, bool),
    /// Everything the task's plugin started has ended.
    WorkEnded(String),
    /// An update's install ended (`ota::Updater::on_offer`).
    UpdatePrepared(Result<crate::release::Manifest, String>),
}

/// How [`Agent::run_to_end`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Shut down as asked.
    Stopped,
    /// Switched releases (an update, or back from one): the process
    /// exits for its supervisor to start `current` again.
    Restart(String),
}

/// The exit code that asks systemd (`Restart=on-failure`) to start the
/// switched-to release.
pub const RESTART_EXIT_CODE: i32 = 75;

impl Agent {
    /// Loads the board, builds and validates the plugins.
    pub fn new(cfg: AgentConfig) -> Result<Agent, AgentError> {
        let board = Board::load(&cfg.board)?;
        let registry = Registry::from_config(&cfg.plugins, &board)?;
        Ok(Agent {
            cfg,
            board,
            registry,
        })
    }

    /// The board profile in use.
    pub fn board(&self) -> &Board {
        &self.board
    }

    /// The plugin registry.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Effective (max_concurrency, queue_capacity): config if set, else board limits.
    pub fn limits(&self) -> (usize, usize) {
        let a = &self.cfg.agent;
        let limits = &self.board.limits;
        (
            a.max_concurrency.unwrap_or(limits.max_concurrency) as usize,
            (a.queue_capacity.unwrap_or(limits.queue_capacity) as usize).min(INBOX),
        )
    }

    /// Runs until `shutdown` is cancelled (or an update switched releases:
    /// see [`Agent::run_to_end`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        self.run_to_end(shutdown).await.map(|_| ())
    }

    /// Runs until `shutdown` is cancelled or an update switched releases,
    /// and says which.
    pub async fn run_to_end(self, shutdown: CancellationToken) -> Result<RunEnd, AgentError> {
        std::fs::create_dir_all(&self.cfg.data_dir).map_err(|source| AgentError::DataDir {
            path: self.cfg.data_dir.display().to_string(),
            source,
        })?;
        let (journal, recovered) = Journal::open(
            &self.cfg.data_dir.join("journal"),
            self.cfg.storage.log_options(),
            self.cfg.agent.ledger_size,
        )?;
        let (host, port) =
            crate::config::parse_broker_url(&self.cfg.mqtt.broker).expect("validated at load");
        let id = self.cfg.id.clone();
        let (max_concurrency, queue_capacity) = self.limits();

        let mut opts = MqttOptions::new(id.clone(), host, port);
        opts.set_keep_alive(Duration::from_secs(self.cfg.mqtt.keep_alive_secs))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(
                self.cfg.mqtt.max_payload_bytes + 1024,
                self.cfg.mqtt.max_payload_bytes + 1024,
            );
        let mut will_status = DeviceStatus {
            device_id: id.clone(),
            online: false,
            board: self.board.name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        crate::mqtt::apply_tls(&mut opts, &self.cfg.mqtt.broker, &self.cfg.mqtt.tls)?;
        if let Some(pass) = &self.cfg.mqtt.password {
            let user = self.cfg.mqtt.username.clone().unwrap_or_else(|| id.clone());
            opts.set_credentials(user, pass.clone());
        }
        will_status.heartbeat_ms = self.cfg.agent.heartbeat_ms as u32;
        opts.set_last_will(LastWill::new(
            topics::status(&id),
            protocol::encode(&will_status),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, eventloop) = crate::mqtt::client(opts, 1024);
        let (tx, mut rx) = mpsc::channel::<Event>(1024);
        let (mqtt_tx, mut mqtt_rx) = mpsc::channel::<MqttEvent>(1024);
        let loop_stop = CancellationToken::new();
        let loop_handle = spawn_event_loop(
            eventloop,
            vec![(topics::tasks(&id), QoS::AtLeastOnce)],
            mqtt_tx,
            Backoff::new(
                Duration::from_millis(self.cfg.mqtt.reconnect_min_ms),
                Duration::from_millis(self.cfg.mqtt.reconnect_max_ms),
            ),
            loop_stop.clone(),
            format!("agent {id}"),
        );
        // Forward MQTT events into the manager's single channel.
        let fwd_tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = mqtt_rx.recv().await {
                if fwd_tx.send(Event::Mqtt(ev)).await.is_err() {
                    break;
                }
            }
        });

        log::info!(
            "agent {id} on board {} with plugins {:?}, concurrency {max_concurrency}, queue {queue_capacity}",
            self.board.name,
            self.registry.names()
        );
        let mut m = Manager {
            status_topic: topics::status(&id),
            results_topic: topics::results(&id),
            id,
            client: client.clone(),
            ota: ota::Updater::new(&self.cfg.ota, &self.board.name),
            registry: self.registry,
            board: self.board,
            cfg: self.cfg,
            inbox: heapless::Deque::new(),
            queue_capacity,
            max_concurrency,
            running: HashMap::new(),
            lingering: HashMap::new(),
            suspects: VecDeque::new(),
            alone: None,
            parked: VecDeque::new(),
            parked_retry: (Instant::now(), PARKED_RETRY_MIN),
            parked_logged: false,
            restoring: false,
            errors_covered: 0,
            per_plugin: HashMap::new(),
            outbox: HashMap::new(),
            ledger: HashMap::new(),
            ledger_order: VecDeque::new(),
            events: tx,
            malformed: 0,
            connected: false,
            last_heartbeat: Instant::now() - Duration::from_secs(3600),
            journal,
            replayed: 0,
            deferred: Vec::new(),
        };
        m.errors_covered = m.journal.stats().write_errors;
        m.restore(recovered);
        m.commit()?;
        // Ready once the journal is replayed and plugins are built; the
        // broker may be down for hours and the agent still serves.
        let notify = sd_notify::Notifier::from_env();
        notify.ready(&format!("agent {} serving", m.id));
        let mut watchdog = tokio::time::interval(
            notify
                .watchdog_interval()
                .unwrap_or(Duration::from_secs(3600)),
        );
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The tick also drives batched fsyncs, so it runs at least as often.
        let tick_ms = match m.cfg.storage.fsync {
            config::FsyncMode::Batch => m.cfg.storage.batch_ms.clamp(1, 200),
            _ => 200,
        };
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fatal: Option<StorageError> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        // Group commit: take what else is waiting, journal
                        // it all, sync once, then act (see `commit`).
                        m.on_event(ev);
                        for _ in 1..GROUP {
                            match rx.try_recv() {
                                Ok(ev) => m.on_event(ev),
                                Err(_) => break,
                            }
                        }
                        if let Err(e) = m.commit() {
                            fatal = Some(e);
                            break;
                        }
                        if m.ota.restart.is_some() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    m.on_tick();
                    // A batched sync on the tick failed; or the commit of
                    // what the tick recorded (a parked task started).
                    if let Err(e) = m.journal.check().and_then(|_| m.commit()) {
                        fatal = Some(e);
                        break;
                    }
                    if m.ota.restart.is_some() {
                        break;
                    }
                }
                // From this loop, not a timer task of its own: a loop that
                // stops turning stops the pings, and systemd restarts us.
                _ = watchdog.tick(), if notify.watchdog_interval().is_some() => notify.watchdog(),
            }
        }
        if let Some(e) = fatal {
            // No goodbye: the journal cannot record what it would hand
            // back. The broker publishes the last will when the process
            // is gone, and the server re-queues this device's tasks.
            notify.stopping();
            log::error!("agent {}: stopping on a journal failure: {e}", m.id);
            return Err(AgentError::Storage(e));
        }
        notify.stopping();
        // Records refused earlier (a full disk that is back): on disk now,
        // or a finished task runs again at the next start.
        if m.journal.stats().write_errors > m.errors_covered && m.journal.writable() {
            if let Err(e) = m.compact_now() {
                log::warn!("agent {}: snapshot at shutdown failed: {e}", m.id);
            }
        }
        // Say goodbye so the server re-routes at once rather than after the
        // keep-alive runs out. It re-queues what was here, so the journal
        // hands those tasks back (`Released`) rather than running them again
        // at the next start. A `Released` the disk refuses makes this stop a
        // crash for that task: the server re-queues it, and the next start
        // runs it again (docs/plugins.md).
        let handed_back: Vec<String> = m.held().collect();
        for (token, _) in m.running.values() {
            token.cancel();
        }
        for task_id in handed_back {
            let _ = m.journal.append_unsynced(&Record::Released { task_id });
        }
        if let Err(e) = m.journal.sync() {
            log::warn!("agent {}: journal sync at shutdown failed: {e}", m.id);
        }
        let mut bye = m.status();
        bye.online = false;
        let _ = client.try_publish(
            m.status_topic.clone(),
            QoS::AtLeastOnce,
            true,
            protocol::encode(&bye),
        );
        // The cancelled work stops (or not) while the goodbye goes out; a
        // thread in a call nothing can interrupt does not hold the exit
        // past the deadline.
        let mut live: HashSet<String> = m
            .running
            .keys()
            .chain(m.lingering.keys())
            .cloned()
            .collect();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(m.cfg.agent.shutdown_timeout_ms);
        while !live.is_empty() {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Finished(o, false)) => { live.remove(&o.task_id); }
                    Some(Event::WorkEnded(id)) => { live.remove(&id); }
                    Some(_) => {}
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    log::warn!(
                        "agent {}: {} task(s) still running {} ms after the shutdown began; exiting anyway",
                        m.id,
                        live.len(),
                        m.cfg.agent.shutdown_timeout_ms
                    );
                    break;
                }
            }
        }
        let _ = client.try_disconnect();
        if tokio::time::timeout(Duration::from_secs(2), loop_handle)
            .await
            .is_err()
        {
            loop_stop.cancel();
        }
        log::info!("agent {} stopped", m.id);
        Ok(match m.ota.restart {
            Some(r) => RunEnd::Restart(r),
            None => RunEnd::Stopped,
        })
    }
}

struct Pending {
    bytes: Vec<u8>,
    last_sent: Option<Instant>,
    /// Sends on this connection; each unconfirmed one doubles the wait.
    sends: u32,
}

/// Longest `timeout_ms` a task may carry (a day: the server's own bound).
const MAX_TASK_TIMEOUT_MS: u64 = 86_400_000;

/// Results re-sent per tick at most, so a backlog never fills the MQTT
/// client's queue and crowds out the heartbeat.
const RESEND_BUDGET: usize = 128;

/// Pieces of a streaming task's output held between its plugin and MQTT.
const OUTPUT_BOUND: usize = 64;
/// Longest wait, once a streaming task ended, for its output to be out.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Most bytes one `Chunk` message carries: pieces that queue up while
/// MQTT is slow are sent together, up to this.
const CHUNK_MAX_BYTES: usize = 16 << 10;

/// Publishes a streaming task's output as `Chunk` messages numbered from
/// 0, in order, until the plugin drops its sender. Pieces waiting when one
/// is sent go out together (fewer messages under load, same text), never
/// more than `max_text` bytes in one message: a piece larger than that is
/// split at a character boundary (one over the MQTT payload limit would
/// fail the connection at every reconnect).
///
/// It never waits on rumqttc's request queue, which the agent's own loop
/// shares (heartbeats, acks, results): when the queue is full it keeps the
/// text and tries again shortly, and stops reading the plugin's channel
/// while it holds `max_text` bytes, so the plugin waits instead.
async fn forward_output(
    client: rumqttc::AsyncClient,
    topic: String,
    task_id: String,
    mut rx: tokio::sync::mpsc::Receiver<String>,
    max_text: usize,
) {
    let max_text = max_text.max(64);
    let mut seq = 0u32;
    let mut held = String::new();
    let mut open = true;
    loop {
        if held.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(t) => held = t,
                None => return,
            }
        }
        while open && held.len() < max_text {
            match rx.try_recv() {
                Ok(more) => held.push_str(&more),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let mut cut = held.len().min(max_text);
        while !held.is_char_boundary(cut) {
            cut -= 1;
        }
        let msg = FromAgent::Chunk {
            task_id: task_id.clone(),
            seq,
            text: held[..cut].to_string(),
        };
        match client.try_publish(
            topic.clone(),
            QoS::AtLeastOnce,
            false,
            protocol::encode(&msg),
        ) {
            Ok(()) => {
                held.drain(..cut);
                seq = seq.wrapping_add(1);
            }
            Err(_) => {
                // The queue is full (or the agent is stopping, and this
                // task with it): leave the queue to the agent's own
                // messages for a moment; the text waits here.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// First and longest wait before a parked task is tried again (see
/// `Manager::parked`).
const PARKED_RETRY_MIN: Duration = Duration::from_secs(1);
const PARKED_RETRY_MAX: Duration = Duration::from_secs(30);

struct Manager {
    id: String,
    client: AsyncClient,
    registry: Registry,
    board: Board,
    cfg: AgentConfig,
    status_topic: String,
    results_topic: String,
    inbox: heapless::Deque<TaskSpec, INBOX>,
    queue_capacity: usize,
    max_concurrency: usize,
    /// Running tasks: their cancel token and spec (for journal snapshots).
    running: HashMap<String, (CancellationToken, TaskSpec)>,
    /// Tasks whose result is out but whose work has not ended (timed out
    /// or cancelled, still stopping), by plugin: they keep their slots.
    lingering: HashMap<String, String>,
    /// Tasks that were running when the agent died, waiting to run again
    /// alone (see the module docs).
    suspects: VecDeque<TaskSpec>,
    /// The suspect running alone now.
    alone: Option<String>,
    /// Tasks whose start could not be recorded and whose hand-back could
    /// not be recorded either (a full disk), each with whether it runs
    /// alone. Handed back without a durable `Released`, a task ran again at
    /// the next start after the server had given it up or re-queued it, so
    /// these wait, neither run nor handed back, and are tried again on the
    /// tick until the journal takes records; nothing else starts meanwhile.
    parked: VecDeque<(TaskSpec, bool)>,
    /// When the parked tasks and a catch-up snapshot are tried next (once
    /// the journal's probe says it takes writes), and the wait after that.
    parked_retry: (Instant, Duration),
    /// Whether this episode of parked tasks was logged.
    parked_logged: bool,
    /// Set while the journal's recovered state is put back: a compaction
    /// then would snapshot a state missing the tasks not placed yet.
    restoring: bool,
    /// The journal's `write_errors` when a snapshot last covered them:
    /// fewer than now, and records are missing from the disk.
    errors_covered: u64,
    /// Running tasks per plugin, held under each plugin's declared
    /// concurrency; tasks beyond it wait in `inbox` like tasks beyond
    /// `max_concurrency`.
    per_plugin: HashMap<String, usize>,
    /// Results the server has not confirmed yet.
    outbox: HashMap<String, Pending>,
    /// Finished ids (the window of `agent.ledger_size`), each with whether
    /// its result was a retryable failure. Results themselves are kept only
    /// in the outbox, until the server confirms them.
    ledger: HashMap<String, bool>,
    ledger_order: VecDeque<String>,
    events: mpsc::Sender<Event>,
    malformed: u64,
    connected: bool,
    last_heartbeat: Instant,
    journal: Journal,
    /// Tasks found accepted but unfinished at start, run again.
    replayed: u64,
    /// Effects held back until the batch's journal records are on disk.
    deferred: Vec<Deferred>,
    /// Over-the-air updates.
    ota: ota::Updater,
}

impl Manager {
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Mqtt(ev) => self.on_mqtt(ev),
            Event::Finished(outcome, still) => self.on_finished(outcome, still),
            Event::WorkEnded(id) => self.on_work_ended(&id),
            Event::UpdatePrepared(r) => {
                if self.ota.on_prepared(r) {
                    self.publish_status();
                }
            }
        }
    }

    /// Ends a batch: one journal sync for every record it wrote, then the
    /// effects that had to wait for it, in order. Nothing is acked, started
    /// or published before the record that justifies it is durable.
    ///
    /// A failed sync is fatal (issue 15, item 7): none of the batch's
    /// effects happen (an acked publish whose task never reached the disk
    /// was lost at the next crash), and the error goes up so the agent
    /// exits non-zero and systemd restarts it on the journal as it is on
    /// disk. Unacked, the publishes are delivered again after the restart;
    /// a retried fsync could "succeed" after the kernel dropped the pages.
    fn commit(&mut self) -> Result<(), StorageError> {
        let journal = &mut self.journal;
        if let Err(e) = crate::blocking(|| journal.commit()).and_then(|_| self.journal.check()) {
            log::error!(
                "agent {}: journal sync failed, stopping without acking {} effect(s) of this batch: {e}",
                self.id,
                self.deferred.len()
            );
            self.deferred.clear();
            return Err(e);
        }
        for d in std::mem::take(&mut self.deferred) {
            match d {
                Deferred::Ack(p) => {
                    if let Err(e) = self.client.try_ack(&p) {
                        log::warn!("agent {}: ack failed: {e}", self.id);
                    }
                }
                Deferred::Start(spec, token) => self.start(spec, token),
                // A result whose record could not be written (a full disk)
                // is sent anyway: the server has it then.
                Deferred::Send(id) => self.send_result(&id),
                Deferred::Event(ev) => self.publish_event(&ev),
            }
        }
        Ok(())
    }

    fn on_mqtt(&mut self, ev: MqttEvent) {
        match ev {
            MqttEvent::Connected { .. } => {
                self.connected = true;
                self.publish_status();
                // The broker may have lost the session and rumqttc drops its
                // own unacked publishes then: the outbox is the record.
                // All due again, but sent by `on_tick` (after this batch's
                // commit) within its per-tick budget: sending the whole
                // outbox here filled the client's queue and, fleet-wide
                // after a broker restart, hit the broker with every agent's
                // backlog at once (issue 15, item 10).
                for p in self.outbox.values_mut() {
                    p.sends = 0;
                    p.last_sent = None;
                }
            }
            MqttEvent::Disconnected(_) => self.connected = false,
            MqttEvent::Message(p) => {
                match protocol::decode::<ToAgent>(&p.payload, self.cfg.mqtt.max_payload_bytes) {
                    Ok(msg) => self.on_message(msg),
                    Err(e) => {
                        self.malformed += 1;
                        log::warn!(
                            "agent {}: ignoring payload on {}: {e} ({} malformed so far)",
                            self.id,
                            p.topic,
                            self.malformed
                        );
                    }
                }
                // Acked only once the task is queued (or answered) and
                // its record is on disk: after the batch's commit.
                self.deferred.push(Deferred::Ack(p));
            }
        }
    }

    fn on_message(&mut self, msg: ToAgent) {
        match msg {
            ToAgent::Task(spec) => self.on_task(spec),
            ToAgent::Cancel { task_id } => {
                if let Some((token, _)) = self.running.get(&task_id) {
                    token.cancel();
                } else if let Some(pos) = self.suspects.iter().position(|t| t.id == task_id) {
                    self.suspects.remove(pos);
                    self.cancelled_before_start(task_id);
                    self.launch_waiting();
                } else if let Some(pos) = self.parked.iter().position(|(t, _)| t.id == task_id) {
                    if let Some((_, true)) = self.parked.remove(pos) {
                        self.alone = None;
                    }
                    self.cancelled_before_start(task_id);
                    self.launch_waiting();
                } else if let Some(pos) = self.inbox.iter().position(|t| t.id == task_id) {
                    let mut kept = heapless::Deque::new();
                    for (i, t) in std::mem::take(&mut self.inbox).into_iter().enumerate() {
                        if i != pos {
                            let _ = kept.push_back(t);
                        }
                    }
                    self.inbox = kept;
                    self.cancelled_before_start(task_id);
                }
            }
            ToAgent::Update(offer) => {
                let tx = self.events.clone();
                let changed = self.ota.on_offer(offer, move |r| {
                    let _ = tx.blocking_send(Event::UpdatePrepared(r));
                });
                if changed {
                    self.publish_status();
                }
            }
            ToAgent::UpdateConfirmed { release } => {
                if self.ota.on_confirmed(&release) {
                    self.publish_status();
                }
            }
            ToAgent::Describe => {
                // Not journaled: the server asks again if it is lost.
                self.publish_event(&FromAgent::Catalog(self.registry.catalog()));
            }
            ToAgent::ListTasks => {
                // Not journaled either: asked again while the counts differ.
                let tasks = self.held().take(protocol::MAX_HELD_TASKS).collect();
                self.publish_event(&FromAgent::Holding { tasks });
            }
            ToAgent::ResultAck { task_id } => {
                if self.outbox.remove(&task_id).is_some() {
                    // Unsynced: if it is lost, the result is sent once more
                    // and the server acks the duplicate.
                    if let Err(e) = self.journal.append_unsynced(&Record::Acked { task_id }) {
                        log::warn!("agent {}: journal: {e}", self.id);
                    }
                    self.maybe_compact();
                }
            }
        }
    }

    /// Finishes a task that was waiting (in the inbox or as a suspect) when
    /// its cancel came.
    fn cancelled_before_start(&mut self, task_id: String) {
        self.finish(TaskOutcome {
            task_id,
            result: Err(error(
                ErrorKind::Cancelled,
                "cancelled before it started",
                false,
            )),
            elapsed_us: 0,
        });
    }

    fn on_task(&mut self, spec: TaskSpec) {
        // Server ids are UUIDs; a longer one is not ours, and ids are what
        // the ledger holds (its bound in bytes is `ledger_size` of these).
        if spec.id.is_empty() || spec.id.len() > protocol::MAX_TASK_ID_BYTES {
            self.malformed += 1;
            log::warn!(
                "agent {}: ignoring a task whose id is {} bytes long (1..={} allowed)",
                self.id,
                spec.id.len(),
                protocol::MAX_TASK_ID_BYTES
            );
            return;
        }
        if self.running.contains_key(&spec.id)
            || self.inbox.iter().any(|t| t.id == spec.id)
            || self.suspects.iter().any(|t| t.id == spec.id)
            || self.parked.iter().any(|(t, _)| t.id == spec.id)
        {
            log::debug!("agent {}: task {} already here", self.id, spec.id);
            return;
        }
        let retry = self.ledger.get(&spec.id) == Some(&true);
        if retry {
            // The server retries a retryable failure under the same id: run
            // it again rather than answer the old failure from the ledger.
            log::info!(
                "agent {}: retrying task {} (attempt {})",
                self.id,
                spec.id,
                spec.attempt
            );
            self.ledger.remove(&spec.id);
            self.ledger_order.retain(|id| id != &spec.id);
            // The old failure, if still unconfirmed, must not be re-sent
            // while the new attempt runs: the server would take it for
            // this attempt's result (results carry no attempt).
            if self.outbox.remove(&spec.id).is_some() {
                let _ = self.journal.append_unsynced(&Record::Acked {
                    task_id: spec.id.clone(),
                });
            }
        } else if let Some(p) = self.outbox.get_mut(&spec.id) {
            // Delivered again before the server confirmed the result: send
            // it again now, never run twice.
            log::info!(
                "agent {}: task {} already done, resending result",
                self.id,
                spec.id
            );
            p.sends = 0;
            p.last_sent = None;
            self.send_result(&spec.id);
            return;
        }
        if self.ledger.contains_key(&spec.id) {
            // Done and confirmed: the server has the result and asks for a
            // task only while it is open, so this is a stale re-delivery.
            log::info!(
                "agent {}: task {} already done and confirmed; not run again",
                self.id,
                spec.id
            );
            return;
        }
        if self.registry.get(&spec.plugin).is_none() {
            self.unknown_plugin(spec);
            return;
        }
        // From the network: a deadline of `now + u64::MAX ms` would panic
        // when the task starts. The server never sends more than a day.
        if spec.timeout_ms > MAX_TASK_TIMEOUT_MS {
            let msg = format!(
                "timeout_ms {} is out of range 1..={MAX_TASK_TIMEOUT_MS}",
                spec.timeout_ms
            );
            self.finish(TaskOutcome {
                task_id: spec.id,
                result: Err(error(ErrorKind::InvalidInput, &msg, false)),
                elapsed_us: 0,
            });
            return;
        }
        // Checked against the plugin's declaration before it is queued:
        // a bad task never waits for a slot or reaches `execute`.
        if let Err(e) = self.registry.check_input(&spec.plugin, &spec.input) {
            self.finish(TaskOutcome {
                task_id: spec.id,
                result: Err(plugin_error(e)),
                elapsed_us: 0,
            });
            return;
        }
        let run_now = self.has_room(&spec.plugin);
        if !run_now && self.inbox.len() >= self.queue_capacity {
            log::info!("agent {}: busy, rejecting task {}", self.id, spec.id);
            self.publish_event(&FromAgent::Rejected {
                task_id: spec.id,
                reason: RejectReason::Busy,
            });
            return;
        }
        // On disk before the publish is acked (the ack waits for the
        // batch's commit): a task the broker considers delivered is never
        // lost by a crash.
        if let Err(e) = self.journal.append_grouped(&Record::Accepted(spec.clone())) {
            log::error!(
                "agent {}: cannot record task {}, handing it back: {e}",
                self.id,
                spec.id
            );
            self.reject_for_storage(spec.id, &e);
            return;
        }
        if run_now {
            self.launch(spec);
        } else {
            let _ = self.inbox.push_back(spec);
        }
        // Only now: a snapshot is the live state (`running` and `inbox`),
        // and compacting between the append and here wrote one without
        // this task and deleted the segment holding its `Accepted` record,
        // then acked it (issue 15, item 4).
        self.maybe_compact();
    }

    fn unknown_plugin(&mut self, spec: TaskSpec) {
        let msg = format!(
            "unknown plugin `{}` (this agent has: {})",
            spec.plugin,
            self.registry.names().join(", ")
        );
        self.finish(TaskOutcome {
            task_id: spec.id,
            result: Err(error(ErrorKind::UnknownPlugin, &msg, false)),
            elapsed_us: 0,
        });
    }

    /// Takes back the state found in the journal at start.
    fn restore(&mut self, rec: journal::Recovered) {
        self.restoring = true;
        self.restore_state(rec);
        self.restoring = false;
        self.maybe_compact();
    }

    fn restore_state(&mut self, rec: journal::Recovered) {
        for (id, retryable) in rec.ledger {
            self.ledger.insert(id.clone(), retryable);
            self.ledger_order.push_back(id);
        }
        for (id, bytes) in rec.outbox {
            self.outbox.insert(
                id,
                Pending {
                    bytes,
                    last_sent: None,
                    sends: 0,
                },
            );
        }
        self.replayed = rec.pending.len() as u64;
        let started: HashMap<String, bool> = rec.started.into_iter().collect();
        log::info!(
            "agent {}: journal recovered: {} ledgered, {} result(s) to re-send, {} task(s) to run again ({} were running), {} damaged record(s) skipped",
            self.id,
            self.ledger.len(),
            self.outbox.len(),
            rec.pending.len(),
            started.len(),
            self.journal.skipped()
        );
        for spec in rec.pending {
            if self.registry.get(&spec.plugin).is_none() {
                self.unknown_plugin(spec);
                continue;
            }
            match started.get(&spec.id) {
                Some(true) => {
                    // Ran alone when the agent died, after it had already
                    // died once with it running: it is what kills the agent.
                    log::error!(
                        "agent {}: task {} (plugin `{}`) was running alone when the agent died, the second crash it was running in; failing it instead of running it again",
                        self.id,
                        spec.id,
                        spec.plugin
                    );
                    let msg = format!(
                        "the agent crashed twice while this task ran (plugin `{}`), the second time with nothing else running; it is not run again",
                        spec.plugin
                    );
                    self.finish(TaskOutcome {
                        task_id: spec.id,
                        result: Err(error(ErrorKind::Failed, &msg, false)),
                        elapsed_us: 0,
                    });
                }
                Some(false) => {
                    // Running at a crash: maybe its cause. Run again alone.
                    log::warn!(
                        "agent {}: task {} was running when the agent stopped unexpectedly; running it again, alone",
                        self.id,
                        spec.id
                    );
                    self.suspects.push_back(spec);
                }
                None => {
                    // Accepted, never started: run again (at least once; see
                    // the module docs).
                    log::warn!(
                        "agent {}: task {} was accepted before a restart; running it now",
                        self.id,
                        spec.id
                    );
                    if self.inbox.len() < INBOX {
                        // Over queue_capacity only if the configuration shrank.
                        let _ = self.inbox.push_back(spec);
                    } else {
                        let _ = self.journal.append(&Record::Released {
                            task_id: spec.id.clone(),
                        });
                        self.publish_event(&FromAgent::Rejected {
                            task_id: spec.id,
                            reason: RejectReason::Busy,
                        });
                    }
                }
            }
        }
        self.launch_waiting();
    }

    /// Rewrites the journal as the live state once it has grown enough.
    fn maybe_compact(&mut self) {
        if self.restoring || !self.journal.wants_compaction() {
            return;
        }
        if let Err(e) = self.compact_now() {
            log::warn!("agent {}: journal compaction failed: {e}", self.id);
        }
    }

    /// Rewrites the journal as the live state now. Also how records that
    /// could not be written (a full disk: a result, its confirmation, a
    /// hand-back) reach the disk later: the snapshot states what they
    /// would have, so a restart neither runs a finished task again nor
    /// forgets an unconfirmed result.
    fn compact_now(&mut self) -> Result<(), StorageError> {
        let state = journal::Recovered {
            pending: self
                .running
                .values()
                .map(|(_, spec)| spec.clone())
                .chain(self.suspects.iter().cloned())
                .chain(self.inbox.iter().cloned())
                .chain(self.parked.iter().map(|(t, _)| t.clone()))
                .collect(),
            // Every running task has started (alone: the suspect running by
            // itself); a waiting suspect keeps the mark of its first run.
            started: self
                .running
                .keys()
                .map(|id| (id.clone(), self.alone.as_deref() == Some(id.as_str())))
                .chain(self.suspects.iter().map(|t| (t.id.clone(), false)))
                // A parked suspect keeps its mark as a waiting one does.
                .chain(
                    self.parked
                        .iter()
                        .filter(|(_, alone)| *alone)
                        .map(|(t, _)| (t.id.clone(), false)),
                )
                .collect(),
            ledger: self
                .ledger_order
                .iter()
                .filter_map(|id| self.ledger.get(id).map(|r| (id.clone(), *r)))
                .collect(),
            outbox: self
                .outbox
                .iter()
                .map(|(id, p)| (id.clone(), p.bytes.clone()))
                .collect(),
        };
        self.journal.compact(&journal::snapshot_records(&state))
    }

    /// The ids of the tasks this agent holds: running (not those finished
    /// and still stopping), waiting, interrupted by a crash, or parked.
    fn held(&self) -> impl Iterator<Item = String> + '_ {
        self.running
            .keys()
            .cloned()
            .chain(self.inbox.iter().map(|t| t.id.clone()))
            .chain(self.suspects.iter().map(|t| t.id.clone()))
            .chain(self.parked.iter().map(|(t, _)| t.id.clone()))
    }

    /// Tasks holding a slot: running, or finished but still stopping.
    fn busy(&self) -> usize {
        self.running.len() + self.lingering.len()
    }

    /// Whether a task of `plugin` may start now: under both the agent's
    /// and the plugin's concurrency limit, and no task interrupted by a
    /// crash is waiting to run alone.
    fn has_room(&self, plugin: &str) -> bool {
        self.suspects.is_empty()
            && self.parked.is_empty()
            && self.alone.is_none()
            && self.busy() < self.max_concurrency
            && self.per_plugin.get(plugin).copied().unwrap_or(0) < self.registry.concurrency(plugin)
    }

    /// Gives back a running task's slots (the agent's and its plugin's).
    fn free_slot(&mut self, task_id: &str) {
        if let Some((_, spec)) = self.running.remove(task_id) {
            if let Some(n) = self.per_plugin.get_mut(&spec.plugin) {
                *n = n.saturating_sub(1);
            }
        }
        if self.alone.as_deref() == Some(task_id) {
            self.alone = None;
        }
    }

    /// Starts waiting tasks in arrival order, skipping those whose plugin
    /// is at its limit. Tasks interrupted by a crash go first, one at a
    /// time with nothing else running.
    fn launch_waiting(&mut self) {
        if self.alone.is_some() || !self.parked.is_empty() {
            return;
        }
        if !self.suspects.is_empty() {
            if self.busy() == 0 {
                if let Some(spec) = self.suspects.pop_front() {
                    self.alone = Some(spec.id.clone());
                    self.launch_as(spec, true);
                }
            }
            return;
        }
        while self.busy() < self.max_concurrency {
            let Some(pos) = self.inbox.iter().position(|t| self.has_room(&t.plugin)) else {
                break;
            };
            let spec = if pos == 0 {
                self.inbox.pop_front()
            } else {
                let mut kept = heapless::Deque::new();
                let mut taken = None;
                for (i, t) in std::mem::take(&mut self.inbox).into_iter().enumerate() {
                    if i == pos {
                        taken = Some(t);
                    } else {
                        let _ = kept.push_back(t);
                    }
                }
                self.inbox = kept;
                taken
            };
            match spec {
                Some(spec) => self.launch(spec),
                None => break,
            }
        }
    }

    /// Takes a concurrency slot for `spec` now (the agent's and its
    /// plugin's); the plugin starts after the batch's journal commit.
    fn launch(&mut self, spec: TaskSpec) {
        self.launch_as(spec, false)
    }

    /// Hands a task back because the journal could not record it; not
    /// "busy": the server tells the submitter why.
    fn reject_for_storage(&mut self, task_id: String, e: &StorageError) {
        let reason = storage_reject_reason(e);
        self.publish_event(&FromAgent::Rejected { task_id, reason });
    }

    fn launch_as(&mut self, spec: TaskSpec, alone: bool) {
        // Durable with the batch, before the plugin starts: after a crash
        // the agent knows this task was running (see the module docs).
        if let Err(e) = self.journal.append_grouped(&Record::Started {
            task_id: spec.id.clone(),
            alone,
        }) {
            // Run without it, a task that crashes the agent would be run
            // again as never started, outside the quarantine: hand it back.
            // The rejection waits for the batch's commit, so `Released` is
            // durable first: published before it, a crash then ran the task
            // again at the next start after the server had re-queued or
            // failed it.
            if let Err(re) = self.journal.append_grouped(&Record::Released {
                task_id: spec.id.clone(),
            }) {
                // Not handed back then either (see `parked`): accepted on
                // disk, it is still this agent's to run, once.
                if !self.parked_logged {
                    // Once an episode: it is retried on every tick.
                    self.parked_logged = true;
                    log::error!(
                        "agent {}: cannot record the start of {} ({e}) nor hand it back ({re}); \
                         it waits until the journal takes records again",
                        self.id,
                        spec.id
                    );
                }
                self.parked.push_back((spec, alone));
                return;
            }
            log::error!(
                "agent {}: cannot record the start of {}, handing it back: {e}",
                self.id,
                spec.id
            );
            let was_alone = self.alone.as_deref() == Some(spec.id.as_str());
            if was_alone {
                self.alone = None;
            }
            self.deferred.push(Deferred::Event(FromAgent::Rejected {
                task_id: spec.id,
                reason: storage_reject_reason(&e),
            }));
            if was_alone {
                // Nothing runs that would end and start the next suspect
                // (one launch per suspect: bounded by the queue).
                self.launch_waiting();
            }
            return;
        }
        self.occupy(spec);
    }

    /// After failed journal writes, on every tick while the journal's
    /// probe says it takes writes again (and no wait from a failed try is
    /// running: doubling, up to [`PARKED_RETRY_MAX`]): writes the live state
    /// as a snapshot, so what was refused is on disk within a tick of the
    /// disk coming back (a crash in a longer window ran a finished task
    /// again), then tries the parked tasks again.
    fn retry_parked(&mut self) {
        let (at, wait) = self.parked_retry;
        let behind = self.journal.stats().write_errors > self.errors_covered;
        if (!behind && self.parked.is_empty()) || Instant::now() < at || !self.journal.writable() {
            return;
        }
        let backoff = (Instant::now() + wait, (wait * 2).min(PARKED_RETRY_MAX));
        if behind {
            match self.compact_now() {
                Ok(()) => {
                    log::info!(
                        "agent {}: the journal takes records again; what it missed is recorded",
                        self.id
                    );
                    self.errors_covered = self.journal.stats().write_errors;
                }
                Err(e @ StorageError::TooLarge { .. }) => {
                    // Not the disk: the live state does not fit
                    // `storage.max_bytes`, and trying again every tick or
                    // every 30 s would not change that.
                    log::warn!(
                        "agent {}: the live state cannot be snapshotted ({e}); records refused \
                         earlier stay missing (raise storage.max_bytes)",
                        self.id
                    );
                    self.errors_covered = self.journal.stats().write_errors;
                }
                Err(e) => {
                    log::debug!("agent {}: journal still refuses records: {e}", self.id);
                    self.parked_retry = backoff;
                    return;
                }
            }
        }
        let n = self.parked.len();
        for (spec, alone) in std::mem::take(&mut self.parked) {
            self.launch_as(spec, alone);
        }
        if !self.parked.is_empty() {
            self.parked_retry = backoff;
            return;
        }
        if n > 0 {
            log::info!(
                "agent {}: {n} parked task(s) started or handed back",
                self.id
            );
            self.parked_logged = false;
            // Also when one was handed back on this try: what waited
            // behind it starts now, not when some other task ends.
            self.launch_waiting();
        }
        self.parked_retry = (Instant::now(), PARKED_RETRY_MIN);
    }

    /// Takes the task's slots and starts it after the batch's commit.
    fn occupy(&mut self, spec: TaskSpec) {
        *self.per_plugin.entry(spec.plugin.clone()).or_insert(0) += 1;
        let token = CancellationToken::new();
        self.running
            .insert(spec.id.clone(), (token.clone(), spec.clone()));
        self.deferred.push(Deferred::Start(spec, token));
    }

    fn start(&mut self, spec: TaskSpec, token: CancellationToken) {
        let Some(plugin) = self.registry.get(&spec.plugin) else {
            // Checked before launch; never leave a slot taken.
            self.free_slot(&spec.id);
            return;
        };
        self.publish_event(&FromAgent::Started {
            task_id: spec.id.clone(),
        });
        let events = self.events.clone();
        let timeout = Duration::from_millis(spec.timeout_ms.max(1));
        let id = self.id.clone();
        let (output, forwarder) = if plugin.streams() {
            let (output, rx) = OutputStream::channel(OUTPUT_BOUND);
            // Room in one message for the envelope and the task id.
            let max_text = self
                .cfg
                .mqtt
                .max_payload_bytes
                .saturating_sub(256 + spec.id.len())
                .min(CHUNK_MAX_BYTES);
            let fwd = tokio::spawn(forward_output(
                self.client.clone(),
                self.results_topic.clone(),
                spec.id.clone(),
                rx,
                max_text,
            ));
            (output, Some(fwd))
        } else {
            (OutputStream::default(), None)
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let ctx = TaskContext {
                id: spec.id.clone(),
                input: spec.input,
                deadline: started + timeout,
                cancel: token.clone(),
                attempt: spec.attempt,
                output,
            };
            let name = spec.plugin.clone();
            let (work, mut work_ended) = Work::new();
            // Its own task, so a panic is caught by the JoinHandle.
            let mut handle = tokio::spawn(work.scope(async move { plugin.execute(ctx).await }));
            let abort = handle.abort_handle();
            let timed_out = || {
                Err(error(
                    ErrorKind::Timeout,
                    &format!(
                        "plugin `{name}` did not finish within {} ms",
                        timeout.as_millis()
                    ),
                    false,
                ))
            };
            let mut result = tokio::select! {
                r = &mut handle => match r {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(plugin_error(e)),
                    Err(j) if j.is_panic() => {
                        let p = j.into_panic();
                        let what = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        Err(error(ErrorKind::Panicked, &format!("plugin `{name}` panicked: {what}"), false))
                    }
                    Err(_) => Err(error(ErrorKind::Cancelled, "cancelled", false)),
                },
                _ = tokio::time::sleep(timeout) => {
                    token.cancel();
                    timed_out()
                }
                _ = token.cancelled() => Err(error(ErrorKind::Cancelled, "cancelled", false)),
            };
            // A plugin that gave up at the task's own deadline (its timer
            // and ours fire together) reports the task's timeout.
            if matches!(&result, Err(e) if e.kind != ErrorKind::Timeout && e.kind != ErrorKind::Panicked)
                && started.elapsed() >= timeout
                && !token.is_cancelled()
            {
                result = timed_out();
            }
            token.cancel();
            if let Some(mut fwd) = forwarder {
                // Every piece published before the result, so the server
                // has the whole stream when the task ends. The stream ends
                // with the plugin's last sender; a thread stuck in a call
                // (or still stopping after a cancel) keeps one, and the
                // result must not wait for that longer than a moment.
                if !handle.is_finished() {
                    fwd.abort();
                }
                if tokio::time::timeout(OUTPUT_DRAIN, &mut fwd).await.is_err() {
                    fwd.abort();
                }
            }
            let running = !handle.is_finished() || !work_ended.ended();
            let task_id = spec.id;
            let _ = events
                .send(Event::Finished(
                    TaskOutcome {
                        task_id: task_id.clone(),
                        result,
                        elapsed_us: started.elapsed().as_micros() as u64,
                    },
                    running,
                ))
                .await;
            if !running {
                return;
            }
            // The result is out; the slot stays taken until the work ends.
            if tokio::time::timeout(STOP_GRACE, &mut handle).await.is_err() {
                abort.abort();
                let _ = handle.await;
            }
            let since = Instant::now();
            let mut waiting = std::pin::pin!(work_ended.wait());
            loop {
                tokio::select! {
                    _ = &mut waiting => break,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => log::warn!(
                        "agent {id}: task {task_id} (plugin `{name}`) ended {} s ago but its work is still running; its slot stays taken",
                        since.elapsed().as_secs()
                    ),
                }
            }
            let _ = events.send(Event::WorkEnded(task_id)).await;
        });
    }

    fn on_finished(&mut self, outcome: TaskOutcome, still_running: bool) {
        if self.alone.as_deref() == Some(outcome.task_id.as_str()) {
            self.alone = None;
        }
        if still_running {
            // Out of `running` (the result is recorded, a re-delivery is
            // answered from the ledger) but its slots stay taken.
            if let Some((_, spec)) = self.running.remove(&outcome.task_id) {
                self.lingering.insert(outcome.task_id.clone(), spec.plugin);
            }
        } else {
            self.free_slot(&outcome.task_id);
        }
        self.finish(outcome);
        self.launch_waiting();
    }

    fn on_work_ended(&mut self, task_id: &str) {
        if let Some(plugin) = self.lingering.remove(task_id) {
            if let Some(n) = self.per_plugin.get_mut(&plugin) {
                *n = n.saturating_sub(1);
            }
        }
        self.launch_waiting();
    }

    /// Records a result in ledger and outbox, then sends it.
    fn finish(&mut self, mut outcome: TaskOutcome) {
        // A result nested deeper than the server decodes would be refused
        // there as malformed and re-sent forever.
        let depth = outcome.result.as_ref().map_or(0, |v| v.depth());
        if depth > protocol::MAX_VALUE_DEPTH {
            let msg = format!(
                "result nests lists or maps {depth} levels deep; the limit is {}",
                protocol::MAX_VALUE_DEPTH
            );
            outcome.result = Err(error(ErrorKind::TooLarge, &msg, false));
        }
        let mut bytes = protocol::encode(&FromAgent::Finished(outcome.clone()));
        if bytes.len() > self.cfg.mqtt.max_payload_bytes {
            let msg = format!(
                "result of {} bytes exceeds the payload limit of {} bytes",
                bytes.len(),
                self.cfg.mqtt.max_payload_bytes
            );
            outcome.result = Err(error(ErrorKind::TooLarge, &msg, false));
            bytes = protocol::encode(&FromAgent::Finished(outcome.clone()));
        }
        let retryable = outcome.result.as_ref().is_err_and(|e| e.retryable);
        let id = outcome.task_id;
        // Written before it is sent: once the server may have the result,
        // a restart must answer from the ledger, not run the task again.
        if let Err(e) = self.journal.append_grouped(&Record::Finished {
            task_id: id.clone(),
            result: bytes.clone(),
            acked: false,
        }) {
            log::error!(
                "agent {}: cannot record the result of {id} (sending it anyway): {e}",
                self.id
            );
        }
        if self.ledger.insert(id.clone(), retryable).is_none() {
            self.ledger_order.push_back(id.clone());
        }
        while self.ledger_order.len() > self.cfg.agent.ledger_size {
            if let Some(old) = self.ledger_order.pop_front() {
                self.ledger.remove(&old);
            }
        }
        self.outbox.insert(
            id.clone(),
            Pending {
                bytes,
                last_sent: None,
                sends: 0,
            },
        );
        self.deferred.push(Deferred::Send(id));
        self.maybe_compact();
    }

    fn send_result(&mut self, id: &str) {
        if !self.connected {
            return;
        }
        if let Some(p) = self.outbox.get_mut(id) {
            match self.client.try_publish(
                self.results_topic.clone(),
                QoS::AtLeastOnce,
                false,
                p.bytes.clone(),
            ) {
                Ok(()) => {
                    p.last_sent = Some(Instant::now());
                    p.sends += 1;
                }
                Err(e) => log::debug!("agent {}: result {id} not sent yet: {e}", self.id),
            }
        }
    }

    fn publish_event(&self, ev: &FromAgent) {
        if let Err(e) = self.client.try_publish(
            self.results_topic.clone(),
            QoS::AtLeastOnce,
            false,
            protocol::encode(ev),
        ) {
            log::debug!("agent {}: event not sent: {e}", self.id);
        }
    }

    fn on_tick(&mut self) {
        if let Err(e) = self.journal.sync_if_due() {
            log::warn!("agent {}: journal sync failed: {e}", self.id);
        }
        self.retry_parked();
        if self.ota.on_tick() {
            self.publish_status();
        }
        if !self.connected {
            return;
        }
        if self.last_heartbeat.elapsed() >= Duration::from_millis(self.cfg.agent.heartbeat_ms) {
            self.publish_status();
        }
        // An unconfirmed result waits twice as long before each re-send (up
        // to 64x): on a slow link, re-sending everything every period piled
        // copies into the client's queue faster than the link drained it,
        // and the heartbeat behind them went late, so the server gave the
        // device up. A new connection starts every result over.
        let resend = Duration::from_millis(self.cfg.agent.result_resend_ms);
        let due: Vec<String> = self
            .outbox
            .iter()
            .filter(|(_, p)| {
                let wait = resend * (1u32 << p.sends.saturating_sub(1).min(6));
                p.last_sent.is_none_or(|t| t.elapsed() >= wait)
            })
            .take(RESEND_BUDGET)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.send_result(&id);
        }
    }

    fn status(&self) -> DeviceStatus {
        let mem = sysinfo::memory();
        let mut plugins = self.registry.names();
        plugins.sort();
        DeviceStatus {
            device_id: self.id.clone(),
            online: true,
            board: self.board.name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            plugins,
            capabilities: self.capabilities(),
            max_concurrency: self.max_concurrency as u32,
            queue_capacity: self.queue_capacity as u32,
            running: self.busy() as u32,
            queued: (self.inbox.len() + self.parked.len()) as u32,
            load1: sysinfo::load_average()[0],
            mem_total_kb: mem.total_kb,
            mem_available_kb: mem.available_kb,
            rss_kb: sysinfo::rss_kb(),
            temperature_c: sysinfo::temperature(self.board.thermal_zone.as_deref()),
            heartbeat_ms: self.cfg.agent.heartbeat_ms as u32,
            malformed: self.malformed,
            sent_ms: crate::now_ms(),
            storage: {
                let s = self.journal.stats();
                StorageCounters {
                    recovered_skipped: self.journal.skipped(),
                    replayed_tasks: self.replayed,
                    segments_dropped: s.segments_dropped,
                    write_errors: s.write_errors,
                }
            },
            release: self.ota.release.clone(),
            update: self.ota.report.clone(),
        }
    }

    fn capabilities(&self) -> Vec<String> {
        let mut caps = self.registry.capabilities();
        caps.push(format!("board:{}", self.board.name));
        caps.push(match self.board.class {
            crate::boards::BoardClass::Edge => "class:edge".to_string(),
            crate::boards::BoardClass::Heavy => "class:heavy".to_string(),
        });
        // An edge board's models are its ONNX ones; a heavy node's GGUF
        // models are offered by the `llm` plugin, and only those it can
        // hold (placement by memory), so the board's list is not repeated.
        if self.board.class == crate::boards::BoardClass::Edge {
            caps.extend(self.board.models.iter().map(|m| format!("model:{m}")));
        }
        caps.sort();
        caps.dedup();
        caps
    }

    fn publish_status(&mut self) {
        let status = self.status();
        match self.client.try_publish(
            self.status_topic.clone(),
            QoS::AtLeastOnce,
            true,
            protocol::encode(&status),
        ) {
            Ok(()) => self.last_heartbeat = Instant::now(),
            Err(e) => log::debug!("agent {}: heartbeat not sent: {e}", self.id),
        }
    }
}

fn error(kind: ErrorKind, message: &str, retryable: bool) -> TaskError {
    TaskError {
        kind,
        message: message.to_string(),
        retryable,
    }
}

fn plugin_error(e: PluginError) -> TaskError {
    let (kind, retryable) = match &e {
        PluginError::InvalidInput { .. } => (ErrorKind::InvalidInput, false),
        PluginError::Unknown(_) => (ErrorKind::UnknownPlugin, false),
        PluginError::Cancelled(_) => (ErrorKind::Cancelled, false),
        PluginError::Failed { retryable, .. } => (ErrorKind::Failed, *retryable),
        PluginError::Config { .. } => (ErrorKind::Failed, false),
        PluginError::TooLarge { .. } => (ErrorKind::TooLarge, false),
    };
    error(kind, &e.to_string(), retryable)
}

/// What the server is told when the journal could not record a task.
fn storage_reject_reason(e: &StorageError) -> RejectReason {
    match e {
        StorageError::NoSpace { .. } => RejectReason::NoSpace,
        _ => RejectReason::StorageFailed,
    }
}
