//! Over-the-air releases on the server: stored signed manifests and
//! binaries, rollouts in waves with a failure threshold, and the download
//! route devices fetch from.
//!
//! One task owns the release store (`DATA/releases.db`, binaries in
//! `DATA/releases/ID.bin`) and every rollout. Once a second while a
//! rollout runs it reads the devices from the scheduler and moves each
//! target on: `waiting` → `sent` (a [`ToAgent::Update`] on the device's
//! task topic, with the release's download grant) → `succeeded` (its
//! status names the release as running: the server confirms it with
//! [`ToAgent::UpdateConfirmed`]) or `failed` (its status reports the
//! update failed or was rolled back, or nothing came within
//! `releases.target_timeout_ms`; a device offline that long since its wave
//! began fails too). An offer nobody acted on is sent again every
//! `releases.resend_ms` (a device killed mid-install forgets it). As soon
//! as more than `max_failure_percent` of the wave's devices failed, the
//! rollout pauses: nobody new is offered it, the devices already offered
//! it are still followed and confirmed. A wave done within the threshold,
//! the next begins, or the rollout is done. Deploying a paused release
//! again offers it to the failed devices and goes on. The server does not check signatures: agents do, against their
//! own `[ota] keys`; it checks only that the binary is the manifest's.

use super::auth::tokens::{ct_eq, random_hex};
use super::scheduler::{ApiError, Command as SchedCommand, SchedulerHandle};
use crate::protocol::api::DeviceView;
use crate::protocol::{self, topics, ToAgent, UpdateOffer, UpdateState};
use crate::release::api::{DeployRequest, ReleaseView, TargetView};
use crate::release::{self, Manifest};
use rumqttc::{AsyncClient, QoS};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// `[releases]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReleasesSection {
    /// The largest binary `POST /v1/releases` takes.
    pub max_binary_bytes: u64,
    /// A device that has not succeeded or failed this long after the
    /// first offer counts as failed.
    pub target_timeout_ms: u64,
    /// An offer without an answer is sent again this often.
    pub resend_ms: u64,
    /// Default pause threshold of a deploy.
    pub max_failure_percent: u8,
}

/// Errors of the release store.
#[derive(Debug, thiserror::Error)]
pub enum ReleasesError {
    #[error("release store {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("release store: {0}")]
    Io(String),
}

struct Row {
    manifest: Manifest,
    text: String,
    grant: String,
    state: String,
    reason: Option<String>,
    canary_percent: Option<u8>,
    max_failure_percent: u8,
    wave: u32,
}

#[derive(Clone)]
struct Target {
    device: String,
    wave: u32,
    state: String,
    message: String,
    sent_ms: u64,
    updated_ms: u64,
}

struct Store {
    conn: Connection,
    bins: PathBuf,
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> ReleasesError + '_ {
    move |source| ReleasesError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

impl Store {
    fn open(data_dir: &Path) -> Result<Store, ReleasesError> {
        let path = data_dir.join("releases.db");
        let e = sql(&path);
        let conn = Connection::open(&path).map_err(&e)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS releases (
                id TEXT PRIMARY KEY, manifest TEXT NOT NULL, grant TEXT NOT NULL,
                state TEXT NOT NULL, reason TEXT, canary_percent INTEGER,
                max_failure_percent INTEGER NOT NULL, wave INTEGER NOT NULL,
                created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS targets (
                release_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL,
                state TEXT NOT NULL, message TEXT NOT NULL, sent_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL, PRIMARY KEY (release_id, device_id));",
        )
        .map_err(&e)?;
        let bins = data_dir.join("releases");
        std::fs::create_dir_all(&bins)
            .map_err(|err| ReleasesError::Io(format!("{}: {err}", bins.display())))?;
        // Uploads a crash (or a client gone) left half-written.
        if let Ok(entries) = std::fs::read_dir(&bins) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".upload-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Store { conn, bins })
    }

    fn bin(&self, id: &str) -> PathBuf {
        self.bins.join(format!("{id}.bin"))
    }

    fn get(&self, id: &str) -> rusqlite::Result<Option<Row>> {
        self.conn
            .query_row(
                "SELECT manifest, grant, state, reason, canary_percent, max_failure_percent, wave
                 FROM releases WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<u8>>(4)?,
                        r.get::<_, u8>(5)?,
                        r.get::<_, u32>(6)?,
                    ))
                },
            )
            .optional()
            .map(|o| {
                o.and_then(|(text, grant, state, reason, canary, maxf, wave)| {
                    // Stored only after parse; a row that no longer parses
                    // (edited by hand) is left out, not a panic.
                    let (manifest, _) = release::parse(text.as_bytes()).ok()?;
                    Some(Row {
                        manifest,
                        text,
                        grant,
                        state,
                        reason,
                        canary_percent: canary,
                        max_failure_percent: maxf,
                        wave,
                    })
                })
            })
    }

    fn ids(&self, state: Option<&str>) -> rusqlite::Result<Vec<String>> {
        let mut st = self.conn.prepare(
            "SELECT id FROM releases WHERE ?1 IS NULL OR state = ?1 ORDER BY created_ms, id",
        )?;
        let rows = st.query_map([state], |r| r.get(0))?;
        rows.collect()
    }

    fn targets(&self, id: &str) -> rusqlite::Result<Vec<Target>> {
        let mut st = self.conn.prepare(
            "SELECT device_id, wave, state, message, sent_ms, updated_ms FROM targets
             WHERE release_id = ?1 ORDER BY wave, device_id",
        )?;
        let rows = st.query_map([id], |r| {
            Ok(Target {
                device: r.get(0)?,
                wave: r.get(1)?,
                state: r.get(2)?,
                message: r.get(3)?,
                sent_ms: r.get(4)?,
                updated_ms: r.get(5)?,
            })
        })?;
        rows.collect()
    }

    fn set_target(&self, id: &str, t: &Target) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO targets (release_id, device_id, wave, state, message, sent_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (release_id, device_id) DO UPDATE SET wave = ?3, state = ?4,
               message = ?5, sent_ms = ?6, updated_ms = ?7",
            params![
                id,
                t.device,
                t.wave,
                t.state,
                t.message,
                t.sent_ms,
                t.updated_ms
            ],
        )?;
        Ok(())
    }

    fn set_state(
        &self,
        id: &str,
        state: &str,
        reason: Option<&str>,
        wave: u32,
    ) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE releases SET state = ?2, reason = ?3, wave = ?4 WHERE id = ?1",
            params![id, state, reason, wave],
        )?;
        Ok(())
    }

    fn view(&self, id: &str) -> rusqlite::Result<Option<ReleaseView>> {
        let Some(r) = self.get(id)? else {
            return Ok(None);
        };
        let targets = self
            .targets(id)?
            .into_iter()
            .map(|t| TargetView {
                device: t.device,
                wave: t.wave,
                state: t.state,
                message: t.message,
                updated_ms: t.updated_ms,
            })
            .collect();
        let m = r.manifest;
        Ok(Some(ReleaseView {
            id: m.id,
            board: m.board,
            target: m.target,
            version: m.version,
            counter: m.counter,
            size: m.size,
            sha256: m.sha256,
            key_id: m.key_id,
            created_ms: m.created_ms,
            expires_ms: m.expires_ms,
            state: r.state,
            reason: r.reason,
            canary_percent: r.canary_percent,
            max_failure_percent: r.max_failure_percent,
            wave: r.wave,
            targets,
        }))
    }
}

/// A binary received by `POST /v1/releases`, in a temporary file.
pub struct Upload {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// What the release task is asked.
pub enum Cmd {
    Create {
        manifest: String,
        upload: Upload,
        resp: oneshot::Sender<Result<ReleaseView, ApiError>>,
    },
    List {
        resp: oneshot::Sender<Result<Vec<ReleaseView>, ApiError>>,
    },
    Get {
        id: String,
        resp: oneshot::Sender<Result<ReleaseView, ApiError>>,
    },
    Deploy {
        id: String,
        req: DeployRequest,
        resp: oneshot::Sender<Result<ReleaseView, ApiError>>,
    },
    /// The binary's path and size, if `grant` is the release's.
    Binary {
        id: String,
        grant: String,
        resp: oneshot::Sender<Result<(PathBuf, u64), ApiError>>,
    },
}

/// The handle HTTP handlers use.
#[derive(Clone)]
pub struct ReleasesHandle {
    tx: mpsc::Sender<Cmd>,
    /// Where uploads are staged (the binaries' directory: renamed, not copied).
    pub upload_dir: PathBuf,
    pub max_binary_bytes: u64,
}

impl ReleasesHandle {
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Cmd,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ApiError::Unavailable("the release task has stopped".into()))?;
        rx.await
            .map_err(|_| ApiError::Unavailable("the release task has stopped".into()))?
    }
}

/// The task that owns releases and rollouts.
pub struct Releases {
    store: Store,
    cfg: ReleasesSection,
    client: AsyncClient,
    sched: SchedulerHandle,
    /// When each (release, device) was last offered, this run.
    offered: HashMap<(String, String), u64>,
}

fn unavailable(e: rusqlite::Error) -> ApiError {
    ApiError::Unavailable(format!("the release store failed: {e}"))
}

impl Releases {
    /// Opens the store; run the task with [`Releases::run`].
    pub fn new(
        data_dir: &Path,
        cfg: ReleasesSection,
        client: AsyncClient,
        sched: SchedulerHandle,
    ) -> Result<(Releases, ReleasesHandle, mpsc::Receiver<Cmd>), ReleasesError> {
        let store = Store::open(data_dir)?;
        let (tx, rx) = mpsc::channel(64);
        let handle = ReleasesHandle {
            tx,
            upload_dir: store.bins.clone(),
            max_binary_bytes: cfg.max_binary_bytes,
        };
        Ok((
            Releases {
                store,
                cfg,
                client,
                sched,
                offered: HashMap::new(),
            },
            handle,
            rx,
        ))
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = tick.tick() => {
                    if let Err(e) = self.tick().await {
                        log::warn!("releases: rollout pass failed: {e}");
                    }
                }
            }
        }
    }

    /// The devices, from the scheduler. A clone of its handle, so no
    /// borrow of `self` (whose SQLite connection is not `Sync`) is held
    /// across the await.
    async fn devices(sched: SchedulerHandle) -> Result<HashMap<String, DeviceView>, ApiError> {
        let list = sched.ask(|resp| SchedCommand::Devices { resp }).await?;
        Ok(list.into_iter().map(|d| (d.id.clone(), d)).collect())
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Create {
                manifest,
                upload,
                resp,
            } => {
                let r = self.create(&manifest, &upload);
                if r.is_err() {
                    let _ = std::fs::remove_file(&upload.path);
                }
                let _ = resp.send(r);
            }
            Cmd::List { resp } => {
                let r = (|| {
                    let mut out = Vec::new();
                    for id in self.store.ids(None)? {
                        out.extend(self.store.view(&id)?);
                    }
                    Ok(out)
                })()
                .map_err(unavailable);
                let _ = resp.send(r);
            }
            Cmd::Get { id, resp } => {
                let r = match self.store.view(&id) {
                    Ok(Some(v)) => Ok(v),
                    Ok(None) => Err(ApiError::NotFound(format!("no release `{id}`"))),
                    Err(e) => Err(unavailable(e)),
                };
                let _ = resp.send(r);
            }
            Cmd::Deploy { id, req, resp } => {
                let r = match Self::devices(self.sched.clone()).await {
                    Ok(devices) => self.deploy(&id, req, &devices),
                    Err(e) => Err(e),
                };
                let _ = resp.send(r);
            }
            Cmd::Binary { id, grant, resp } => {
                let r = match self.store.get(&id) {
                    Ok(Some(r)) if ct_eq(r.grant.as_bytes(), grant.as_bytes()) => {
                        let path = self.store.bin(&id);
                        match std::fs::metadata(&path) {
                            Ok(md) => Ok((path, md.len())),
                            Err(e) => Err(ApiError::Unavailable(format!(
                                "release {id}'s binary cannot be read: {e}"
                            ))),
                        }
                    }
                    // Unknown and wrong grant alike: no probing for ids.
                    Ok(_) => Err(ApiError::NotFound(format!(
                        "no release `{id}` for this grant"
                    ))),
                    Err(e) => Err(unavailable(e)),
                };
                let _ = resp.send(r);
            }
        }
    }

    fn create(&mut self, text: &str, up: &Upload) -> Result<ReleaseView, ApiError> {
        let (m, _) = release::parse(text.as_bytes())
            .map_err(|e| ApiError::BadRequest(format!("manifest: {e}")))?;
        if up.size != m.size || up.sha256 != m.sha256 {
            return Err(ApiError::BadRequest(format!(
                "the binary ({} bytes, sha256 {}) is not the manifest's ({} bytes, sha256 {})",
                up.size, up.sha256, m.size, m.sha256
            )));
        }
        if self.store.get(&m.id).map_err(unavailable)?.is_some() {
            return Err(ApiError::Conflict(format!("release `{}` exists", m.id)));
        }
        // A binary without its row: a crash between the two; replaced.
        let _ = std::fs::remove_file(self.store.bin(&m.id));
        let grant = random_hex(32).map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let bin = self.store.bin(&m.id);
        std::fs::rename(&up.path, &bin)
            .map_err(|e| ApiError::Unavailable(format!("storing the binary: {e}")))?;
        let r = self.store.conn.execute(
            "INSERT INTO releases (id, manifest, grant, state, reason, canary_percent,
               max_failure_percent, wave, created_ms)
             VALUES (?1, ?2, ?3, 'new', NULL, NULL, ?4, 0, ?5)",
            params![
                m.id,
                text,
                grant,
                self.cfg.max_failure_percent,
                crate::now_ms()
            ],
        );
        if let Err(e) = r {
            let _ = std::fs::remove_file(&bin);
            return Err(unavailable(e));
        }
        log::info!(
            "release {} stored: board {}, version {}, counter {}, {} bytes",
            m.id,
            m.board,
            m.version,
            m.counter,
            m.size
        );
        self.store
            .view(&m.id)
            .map_err(unavailable)?
            .ok_or_else(|| ApiError::Unavailable("the release vanished".into()))
    }

    fn deploy(
        &mut self,
        id: &str,
        req: DeployRequest,
        devices: &HashMap<String, DeviceView>,
    ) -> Result<ReleaseView, ApiError> {
        let r = self
            .store
            .get(id)
            .map_err(unavailable)?
            .ok_or_else(|| ApiError::NotFound(format!("no release `{id}`")))?;
        let board = &r.manifest.board;
        match r.state.as_str() {
            "new" => {}
            "paused" => {
                // Resume: the failed devices of the waves so far are
                // offered it again, under the threshold given now (if any).
                if req.devices.is_some() || req.canary_percent.is_some() {
                    return Err(ApiError::BadRequest(format!(
                        "release `{id}` is paused: deploying it again resumes its rollout, \
                         whose devices and canary were set at the first deploy \
                         (only max_failure_percent may change)"
                    )));
                }
                let max_failure = req.max_failure_percent.unwrap_or(r.max_failure_percent);
                if max_failure > 100 {
                    return Err(ApiError::BadRequest(format!(
                        "`max_failure_percent` is {max_failure}: it must be 0 to 100"
                    )));
                }
                let now = crate::now_ms();
                let mut retried = 0;
                for mut t in self.store.targets(id).map_err(unavailable)? {
                    if t.wave <= r.wave && t.state == "failed" {
                        t.state = "waiting".into();
                        t.message = String::new();
                        t.updated_ms = now;
                        self.store.set_target(id, &t).map_err(unavailable)?;
                        self.offered.remove(&(id.to_string(), t.device.clone()));
                        retried += 1;
                    }
                }
                self.store
                    .conn
                    .execute(
                        "UPDATE releases SET state = 'rolling', reason = NULL,
                           max_failure_percent = ?2 WHERE id = ?1",
                        params![id, max_failure],
                    )
                    .map_err(unavailable)?;
                log::info!(
                    "release {id}: rollout resumed at wave {}, {retried} failed device(s) offered it again",
                    r.wave
                );
                return self
                    .store
                    .view(id)
                    .map_err(unavailable)?
                    .ok_or_else(|| ApiError::Unavailable("the release vanished".into()));
            }
            s => {
                return Err(ApiError::Conflict(format!(
                    "release `{id}` is {s}: it was deployed already"
                )))
            }
        }
        for other in self.store.ids(Some("rolling")).map_err(unavailable)? {
            if let Some(o) = self.store.get(&other).map_err(unavailable)? {
                if &o.manifest.board == board {
                    return Err(ApiError::Conflict(format!(
                        "release `{other}` is rolling out to board `{board}`: one rollout per board at a time"
                    )));
                }
            }
        }
        if crate::now_ms() > r.manifest.expires_ms {
            return Err(ApiError::Conflict(format!(
                "release `{id}` expired at unix ms {}: sign a new one",
                r.manifest.expires_ms
            )));
        }
        if let Some(p) = req.canary_percent {
            if !(1..=100).contains(&p) {
                return Err(ApiError::BadRequest(format!(
                    "`canary_percent` is {p}: it must be 1 to 100"
                )));
            }
        }
        let max_failure = req.max_failure_percent.unwrap_or(r.max_failure_percent);
        if max_failure > 100 {
            return Err(ApiError::BadRequest(format!(
                "`max_failure_percent` is {max_failure}: it must be 0 to 100"
            )));
        }
        let mut chosen: Vec<String> = match &req.devices {
            Some(list) => {
                if list.is_empty() {
                    return Err(ApiError::BadRequest("`devices` is empty".into()));
                }
                for d in list {
                    match devices.get(d) {
                        None => {
                            return Err(ApiError::BadRequest(format!(
                                "device `{}` is not known to this server",
                                d.chars().take(128).collect::<String>()
                            )))
                        }
                        Some(v) if &v.board != board => {
                            return Err(ApiError::BadRequest(format!(
                                "device `{d}` is a `{}`, the release is for `{board}`",
                                v.board
                            )))
                        }
                        _ => {}
                    }
                }
                list.clone()
            }
            // Agents that cannot be updated over the air (no [ota], or from
            // before it) are left out, not counted as failures; named
            // with `devices`, they are.
            None => devices
                .values()
                .filter(|d| &d.board == board && d.release.is_some())
                .map(|d| d.id.clone())
                .collect(),
        };
        chosen.sort();
        chosen.dedup();
        if chosen.is_empty() {
            return Err(ApiError::Conflict(format!(
                "no device of board `{board}` that can be updated over the air is known to this server"
            )));
        }
        let canary = req
            .canary_percent
            .map(|p| (chosen.len() * p as usize).div_ceil(100).max(1));
        let now = crate::now_ms();
        for (i, d) in chosen.iter().enumerate() {
            let wave = match canary {
                Some(n) if i >= n => 2,
                _ => 1,
            };
            self.store
                .set_target(
                    id,
                    &Target {
                        device: d.clone(),
                        wave,
                        state: "waiting".into(),
                        message: String::new(),
                        sent_ms: 0,
                        updated_ms: now,
                    },
                )
                .map_err(unavailable)?;
        }
        self.store
            .conn
            .execute(
                "UPDATE releases SET state = 'rolling', canary_percent = ?2,
                   max_failure_percent = ?3, wave = 1 WHERE id = ?1",
                params![id, req.canary_percent, max_failure],
            )
            .map_err(unavailable)?;
        log::info!(
            "release {id}: rollout to {} device(s){}",
            chosen.len(),
            canary.map_or(String::new(), |n| format!(", {n} first"))
        );
        self.store
            .view(id)
            .map_err(unavailable)?
            .ok_or_else(|| ApiError::Unavailable("the release vanished".into()))
    }

    fn offer(&mut self, r: &Row, device: &str) {
        let msg = ToAgent::Update(UpdateOffer {
            manifest: r.text.clone(),
            grant: r.grant.clone(),
        });
        match self.client.try_publish(
            topics::tasks(device),
            QoS::AtLeastOnce,
            false,
            protocol::encode(&msg),
        ) {
            Ok(()) => {
                self.offered
                    .insert((r.manifest.id.clone(), device.to_string()), crate::now_ms());
            }
            Err(e) => log::warn!(
                "releases: offer of {} to {device} not sent: {e}",
                r.manifest.id
            ),
        }
    }

    fn confirm(&self, release: &str, device: &str) {
        let msg = ToAgent::UpdateConfirmed {
            release: release.to_string(),
        };
        if let Err(e) = self.client.try_publish(
            topics::tasks(device),
            QoS::AtLeastOnce,
            false,
            protocol::encode(&msg),
        ) {
            log::warn!("releases: confirmation of {release} to {device} not sent: {e}");
        }
    }

    /// One pass over the rollouts that are running.
    async fn tick(&mut self) -> Result<(), String> {
        let rolling = self.store.ids(Some("rolling")).map_err(|e| e.to_string())?;
        if rolling.is_empty() && self.store.ids(None).map_err(|e| e.to_string())?.is_empty() {
            return Ok(());
        }
        // A paused rollout still follows the devices it offered it to (a
        // device on trial must be confirmed, or it rolls back), but offers
        // it to nobody new.
        let paused = self.store.ids(Some("paused")).map_err(|e| e.to_string())?;
        // Only the devices a pass looks at (those of live rollouts, and any
        // on trial), not a copy of the whole fleet every second.
        let mut followed = std::collections::HashSet::new();
        for id in rolling.iter().chain(&paused) {
            for t in self.store.targets(id).map_err(|e| e.to_string())? {
                followed.insert(t.device);
            }
        }
        let wanted: super::scheduler::DevicePick = Box::new(move |id, s| {
            followed.contains(id)
                || s.update
                    .as_ref()
                    .is_some_and(|u| u.state == UpdateState::Trial)
        });
        let devices: HashMap<String, DeviceView> = self
            .sched
            .ask(|resp| SchedCommand::DevicesWhere { wanted, resp })
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        for id in rolling.iter().chain(&paused) {
            self.advance(id, &devices).map_err(|e| e.to_string())?;
        }
        // A device that restarted on trial after its target succeeded
        // (the confirmation lost) is confirmed again, whatever the state
        // of the rollout (paused, done): else it rolls a confirmed
        // release back at its deadline.
        for d in devices.values() {
            if let (Some(rel), Some(u)) = (&d.release, &d.update) {
                if u.state == UpdateState::Trial && &u.release == rel {
                    let ours = self
                        .store
                        .targets(rel)
                        .map_err(|e| e.to_string())?
                        .iter()
                        .any(|t| t.device == d.id && t.state == "succeeded");
                    if ours {
                        self.confirm(rel, &d.id);
                    }
                }
            }
        }
        Ok(())
    }

    fn advance(&mut self, id: &str, devices: &HashMap<String, DeviceView>) -> rusqlite::Result<()> {
        let Some(r) = self.store.get(id)? else {
            return Ok(());
        };
        let now = crate::now_ms();
        let offer_sha = crate::hex(&<sha2::Sha256 as sha2::Digest>::digest(r.text.as_bytes()));
        let mut targets = self.store.targets(id)?;
        for t in targets.iter_mut().filter(|t| t.wave <= r.wave) {
            let before = (t.state.clone(), t.message.clone());
            let dev = devices.get(&t.device);
            let report = dev
                .and_then(|d| d.update.as_ref())
                .filter(|u| u.release == id);
            let running = dev.is_some_and(|d| d.release.as_deref() == Some(id));
            match t.state.as_str() {
                "waiting" if r.state == "paused" => {}
                "waiting" => match dev {
                    Some(d) if d.online && d.release.is_none() => {
                        t.state = "failed".into();
                        t.message = "the agent cannot be updated over the air ([ota] prefix and keys not set, or an agent from before OTA)".into();
                    }
                    Some(_) if running => {
                        t.state = "succeeded".into();
                        t.message = "already running it".into();
                    }
                    Some(d) if d.online => {
                        self.offer(&r, &t.device);
                        t.state = "sent".into();
                        t.sent_ms = now;
                    }
                    // Offline (or forgotten) since its wave began: the
                    // rollout does not wait for it forever.
                    _ if now.saturating_sub(t.updated_ms) > self.cfg.target_timeout_ms => {
                        t.state = "failed".into();
                        t.message = format!(
                            "offline for releases.target_timeout_ms ({} ms) since its wave began",
                            self.cfg.target_timeout_ms
                        );
                    }
                    _ => {}
                },
                // A refusal counts only for the manifest this server sent.
                "sent" => match report
                    .filter(|u| u.state != UpdateState::Failed || u.offer_sha256 == offer_sha)
                    .map(|u| u.state)
                {
                    Some(UpdateState::Failed) | Some(UpdateState::RolledBack) => {
                        t.state = "failed".into();
                        t.message = report.map(|u| u.message.clone()).unwrap_or_default();
                    }
                    Some(UpdateState::Trial) if running => {
                        self.confirm(id, &t.device);
                        t.state = "succeeded".into();
                    }
                    Some(UpdateState::Confirmed) if running => {
                        t.state = "succeeded".into();
                    }
                    // Running it, whatever else the report says (not a
                    // failure of this offer): it restarted into it.
                    _ if running => {
                        self.confirm(id, &t.device);
                        t.state = "succeeded".into();
                    }
                    _ if now.saturating_sub(t.sent_ms) > self.cfg.target_timeout_ms => {
                        t.state = "failed".into();
                        t.message = format!(
                            "no outcome within releases.target_timeout_ms ({} ms) of the offer",
                            self.cfg.target_timeout_ms
                        );
                    }
                    state => {
                        let working = matches!(
                            state,
                            Some(UpdateState::Installing)
                                | Some(UpdateState::Switching)
                                | Some(UpdateState::Trial)
                        );
                        let last = self
                            .offered
                            .get(&(id.to_string(), t.device.clone()))
                            .copied()
                            .unwrap_or(0);
                        if !working
                            && dev.is_some_and(|d| d.online)
                            && now.saturating_sub(last) >= self.cfg.resend_ms
                        {
                            self.offer(&r, &t.device);
                        }
                    }
                },
                _ => {}
            }
            if (t.state.clone(), t.message.clone()) != before {
                t.updated_ms = now;
                self.store.set_target(id, t)?;
                log::info!(
                    "release {id}: device {} {}{}",
                    t.device,
                    t.state,
                    if t.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", t.message)
                    }
                );
            }
        }
        let open = targets
            .iter()
            .any(|t| t.wave <= r.wave && (t.state == "waiting" || t.state == "sent"));
        let all = targets.iter().filter(|t| t.wave <= r.wave).count();
        let failed = targets
            .iter()
            .filter(|t| t.wave <= r.wave && t.state == "failed")
            .count();
        let last = targets.iter().map(|t| t.wave).max().unwrap_or(1);
        // Checked as failures come in, not only when the wave is over:
        // past the threshold of the whole wave, nobody else is offered it.
        let over = failed > 0 && failed * 100 > all * r.max_failure_percent as usize;
        if (open && !over) || r.state == "paused" {
            return Ok(());
        }
        if over {
            let why = format!(
                "{failed} of {all} device(s) failed ({}%), above max_failure_percent ({}%); \
                 `release deploy {id}` again offers it to the failed ones and goes on",
                failed * 100 / all.max(1),
                r.max_failure_percent
            );
            log::warn!("release {id}: rollout paused: {why}");
            self.store.set_state(id, "paused", Some(&why), r.wave)?;
        } else if r.wave < last {
            log::info!(
                "release {id}: wave {} done, starting wave {}",
                r.wave,
                r.wave + 1
            );
            // Its devices' time starts now.
            for t in targets.iter_mut().filter(|t| t.wave == r.wave + 1) {
                t.updated_ms = now;
                self.store.set_target(id, t)?;
            }
            self.store.set_state(id, "rolling", None, r.wave + 1)?;
        } else {
            log::info!("release {id}: rollout done ({failed} of {all} failed)");
            self.store.set_state(id, "done", None, r.wave)?;
        }
        Ok(())
    }
}

/// The routes: `POST /v1/releases` (the binary as the body, the signed
/// manifest in the `OpenClaw-Manifest` header), `GET /v1/releases`,
/// `GET /v1/releases/{id}`, `POST /v1/releases/{id}/deploy`, and
/// `GET /v1/releases/{id}/binary` for devices (its grant as the bearer
/// token; no API token).
pub fn router(h: ReleasesHandle, auth: std::sync::Arc<super::auth::Auth>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/releases", get(list).post(create))
        .route("/v1/releases/{id}", get(one))
        .route("/v1/releases/{id}/deploy", post(deploy))
        .route("/v1/releases/{id}/binary", get(binary))
        .with_state((h, auth))
}

type RState = axum::extract::State<(ReleasesHandle, std::sync::Arc<super::auth::Auth>)>;
use axum::extract::{Extension, Path as UrlPath};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::release::api::MANIFEST_HEADER;

async fn create(
    axum::extract::State((h, auth)): RState,
    Extension(caller): Extension<super::auth::Caller>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let manifest = headers
        .get(MANIFEST_HEADER)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no `{MANIFEST_HEADER}` header: it carries the signed manifest (openclaw-admin release create)"
            ))
        })?
        .to_str()
        .map_err(|_| ApiError::BadRequest(format!("`{MANIFEST_HEADER}` is not ASCII")))?;
    let manifest = format!("{}\n", manifest.trim_end());
    // Checked before the body is read: a bad manifest costs no upload.
    let (m, _) = release::parse(manifest.as_bytes())
        .map_err(|e| ApiError::BadRequest(format!("manifest: {e}")))?;
    if m.size > h.max_binary_bytes {
        return Err(ApiError::TooLarge(format!(
            "the manifest's binary is {} bytes, more than releases.max_binary_bytes ({})",
            m.size, h.max_binary_bytes
        )));
    }
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let upload = receive(&h, body, m.size).await?;
    let v = super::http::detached(async move {
        let v = h
            .ask(|resp| Cmd::Create {
                manifest,
                upload,
                resp,
            })
            .await?;
        slot.record("release.create", &v.id);
        Ok(v)
    })
    .await?;
    Ok((axum::http::StatusCode::CREATED, Json(v)).into_response())
}

/// Streams the body into a temporary file, hashing it; stops past `max`.
async fn receive(h: &ReleasesHandle, body: axum::body::Body, max: u64) -> Result<Upload, ApiError> {
    use http_body::Body as _;
    use tokio::io::AsyncWriteExt;
    let name = random_hex(8).map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let path = h.upload_dir.join(format!(".upload-{name}"));
    let fail = |path: &Path, e: std::io::Error| {
        let _ = std::fs::remove_file(path);
        ApiError::Unavailable(format!("storing the upload: {e}"))
    };
    let mut f = tokio::fs::File::create(&path)
        .await
        .map_err(|e| fail(&path, e))?;
    // A client gone mid-upload drops this future: the file goes with it.
    struct Partial(Option<PathBuf>);
    impl Drop for Partial {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let mut partial = Partial(Some(path.clone()));
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    let mut size: u64 = 0;
    let mut body = body;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(ApiError::BadRequest(format!(
                    "the upload broke off after {size} bytes: {e}"
                )));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if size > max {
            let _ = std::fs::remove_file(&path);
            return Err(ApiError::BadRequest(format!(
                "the binary is longer than the manifest's {max} bytes"
            )));
        }
        sha2::Digest::update(&mut hash, &data);
        f.write_all(&data).await.map_err(|e| fail(&path, e))?;
    }
    f.sync_all().await.map_err(|e| fail(&path, e))?;
    partial.0 = None;
    Ok(Upload {
        path,
        size,
        sha256: crate::hex(&sha2::Digest::finalize(hash)),
    })
}

async fn list(axum::extract::State((h, _)): RState) -> Result<Response, ApiError> {
    Ok(Json(h.ask(|resp| Cmd::List { resp }).await?).into_response())
}

async fn one(
    axum::extract::State((h, _)): RState,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(h.ask(|resp| Cmd::Get { id, resp }).await?).into_response())
}

async fn deploy(
    axum::extract::State((h, auth)): RState,
    Extension(caller): Extension<super::auth::Caller>,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: DeployRequest = if body.is_empty() {
        DeployRequest::default()
    } else {
        // An object only: serde would also take a JSON array as the struct.
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object (devices, canary_percent, max_failure_percent)"
                    .into(),
            ));
        }
        serde_json::from_value(v)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?
    };
    let slot = auth.reserve_audit(&caller).map_err(ApiError::Unavailable)?;
    let v = super::http::detached(async move {
        let v = h.ask(|resp| Cmd::Deploy { id, req, resp }).await?;
        slot.record("release.deploy", &v.id);
        Ok(v)
    })
    .await?;
    Ok(Json(v).into_response())
}

async fn binary(
    axum::extract::State((h, _)): RState,
    UrlPath(id): UrlPath<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let grant = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let (path, len) = h.ask(|resp| Cmd::Binary { id, grant, resp }).await?;
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Unavailable(format!("release binary: {e}")))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (axum::http::header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}
