//! Over-the-air updates on the device: check, download, install beside the
//! running release, switch, and switch back when the new one does not prove
//! itself.
//!
//! The layout is the one `openclaw-admin flash` makes, plus `good` and `ota/`:
//!
//! ```text
//! PREFIX/releases/ID/           one release (bin/openclaw-agent, agent.toml, ...,
//!                               manifest.json: the signed manifest it came with)
//! PREFIX/current -> releases/ID what the unit runs
//! PREFIX/good -> releases/ID    the last release the server confirmed; the unit's
//!                               guard (ExecStartPre) runs from here
//! PREFIX/ota/pending.json       the release on trial: previous, starts, deadline
//! PREFIX/ota/rolled-back.json   the last rollback and why (reported in the status)
//! PREFIX/ota/installed.json     the highest counter confirmed (no downgrades)
//! ```
//!
//! Steps, each safe to be killed after ([`fault`] names them for the tests):
//! verify the manifest (keys, target, board, expiry, counter), download into
//! `releases/.download-ID` with the manifest's size as the cap, check size
//! and sha256, stage `releases/.staging-ID` (the binary, and the running
//! release's other files, hard-linked), rename it to `releases/ID`, run the
//! new binary's self-check, write `pending.json`, switch `current` (one
//! rename), restart. A kill before the switch leaves the old release
//! running and `pending.json`, if written, stale: it is dropped at the next
//! start and the server offers the update again. After the switch, every
//! start of the unit first runs [`guard`] from the `good` release, which a
//! broken new binary cannot stop: past `max_starts` starts or the deadline
//! it switches back. The new agent itself switches back at the deadline if
//! the server has not confirmed it ([`confirm`]) by then.

use crate::agent::config::OtaSection;
use crate::protocol::{UpdateReport, UpdateState};
use crate::release::{self, Manifest, ReleaseError};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The target triple this agent was built for.
pub const TARGET: &str = env!("OPENCLAW_TARGET");

/// Downloads tried before an update fails for the network's sake.
const DOWNLOAD_ATTEMPTS: u32 = 5;

/// Test hook: the agent kills itself with SIGKILL when it reaches the
/// install step this names (`tests/ota.rs`). Never set in production.
const KILL_AT_ENV: &str = "OPENCLAW_TEST_KILL_AT";

/// Why an update was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error("updates are not set up on this agent: {0}")]
    NotConfigured(&'static str),
    #[error("{0}")]
    Manifest(#[from] ReleaseError),
    #[error("release {id} is built for {got}, this agent runs on {TARGET}")]
    WrongTarget { id: String, got: String },
    #[error("release {id} is for board `{got}`, this agent's board is `{board}`")]
    WrongBoard {
        id: String,
        got: String,
        board: String,
    },
    #[error("release {id} expired at unix ms {expires_ms} (now {now_ms})")]
    Expired {
        id: String,
        expires_ms: u64,
        now_ms: u64,
    },
    #[error(
        "release {id} has counter {counter}, not above {installed} (the highest installed here): a downgrade or a replay"
    )]
    Downgrade {
        id: String,
        counter: u64,
        installed: u64,
    },
    #[error("release {id} is {size} bytes, more than ota.max_download_bytes ({max})")]
    TooBig { id: String, size: u64, max: u64 },
    #[error("release {0} is the one running")]
    Running(String),
    #[error("release {0} is on trial: a new update waits until the server confirms it")]
    OnTrial(String),
    #[error("release {id} was rolled back here ({reason}): not installed again")]
    RolledBack { id: String, reason: String },
    #[error("download of {url}: {message}")]
    Download { url: String, message: String },
    #[error("the download is {got} bytes, the manifest says {want}")]
    Size { got: u64, want: u64 },
    #[error("the download's sha256 is {got}, the manifest says {want}: the binary was altered")]
    Sha256 { got: String, want: String },
    #[error("the new binary's self-check failed: {0}")]
    SelfCheck(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OtaError + 'a {
    move |source| OtaError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Kills the process with SIGKILL if the test hook names `step`.
pub fn fault(step: &str) {
    if std::env::var(KILL_AT_ENV).is_ok_and(|s| s == step) {
        log::warn!("{KILL_AT_ENV}={step}: killing this process");
        // SAFETY: kill(2) on our own pid has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// The release on trial (`ota/pending.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub release: String,
    pub previous: String,
    pub counter: u64,
    /// Starts of the unit since the switch (counted by [`guard`]).
    pub starts: u32,
    pub max_starts: u32,
    /// Unix ms; not confirmed by then, it is rolled back.
    pub deadline_ms: u64,
}

/// The last rollback (`ota/rolled-back.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    pub release: String,
    pub back_to: String,
    pub reason: String,
}

/// The highest counter confirmed here (`ota/installed.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Installed {
    counter: u64,
    release: String,
}

/// Paths of an install.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: PathBuf,
}

impl Layout {
    pub fn new(prefix: impl Into<PathBuf>) -> Layout {
        Layout {
            prefix: prefix.into(),
        }
    }
    fn releases(&self) -> PathBuf {
        self.prefix.join("releases")
    }
    fn release(&self, id: &str) -> PathBuf {
        self.releases().join(id)
    }
    fn state(&self, name: &str) -> PathBuf {
        self.prefix.join("ota").join(name)
    }
    /// The release a link (`current`, `good`) points to.
    pub fn linked(&self, link: &str) -> Option<String> {
        let t = std::fs::read_link(self.prefix.join(link)).ok()?;
        let id = t.file_name()?.to_str()?.to_string();
        release::valid_id(&id).then_some(id)
    }
    /// The release `current` points to.
    pub fn current(&self) -> Option<String> {
        self.linked("current")
    }
    /// Points `link` at `releases/ID` with one rename.
    fn point(&self, link: &str, id: &str) -> Result<(), OtaError> {
        let tmp = self.prefix.join(format!(".{link}.new"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("releases/{id}"), &tmp).map_err(io("link", &tmp))?;
        let dst = self.prefix.join(link);
        std::fs::rename(&tmp, &dst).map_err(io("switch", &dst))?;
        sync_dir(&self.prefix)
    }
}

fn sync_dir(dir: &Path) -> Result<(), OtaError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, OtaError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| OtaError::Io {
                what: "read",
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Writes `path` whole or not at all: a temporary file, synced, renamed.
fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), OtaError> {
    let dir = path.parent().expect("state files are in ota/");
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io("write", &tmp))?;
    f.write_all(&serde_json::to_vec(v).expect("state serializes"))
        .and_then(|_| f.sync_all())
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    sync_dir(dir)
}

fn remove(path: &Path) -> Result<(), OtaError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// What the agent learns of its install at start.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    /// The release it runs.
    pub release: Option<String>,
    /// It runs on trial.
    pub trial: Option<Pending>,
    /// Its last update, for the status.
    pub report: Option<UpdateReport>,
}

/// Reads the install's state at the agent's start (after [`guard`] ran).
pub fn startup(l: &Layout) -> Result<Startup, OtaError> {
    finish_confirm(l)?;
    let release = l.current();
    let mut s = Startup {
        release: release.clone(),
        ..Startup::default()
    };
    let rolled: Option<RolledBack> = read_json(&l.state("rolled-back.json"))?;
    if let Some(p) = read_json::<Pending>(&l.state("pending.json"))? {
        if Some(&p.release) == release.as_ref() {
            s.report = Some(UpdateReport {
                release: p.release.clone(),
                state: UpdateState::Trial,
                message: String::new(),
                offer_sha256: String::new(),
            });
            s.trial = Some(p);
            return Ok(s);
        }
        // Killed between writing it and the switch (or switched back):
        // nothing to report as failed, the server offers it again.
        log::info!(
            "OTA: release {} was not switched to (interrupted); dropping its trial",
            p.release
        );
        remove(&l.state("pending.json"))?;
    }
    if let Some(r) = rolled {
        s.report = Some(UpdateReport {
            release: r.release,
            state: UpdateState::RolledBack,
            message: r.reason,
            offer_sha256: String::new(),
        });
    } else if let Some(i) = read_json::<Installed>(&l.state("installed.json"))? {
        if Some(&i.release) == release.as_ref() && s.report.is_none() {
            s.report = Some(UpdateReport {
                release: i.release,
                state: UpdateState::Confirmed,
                message: String::new(),
                offer_sha256: String::new(),
            });
        }
    }
    // Not on trial: what runs is good (an install flash made has no `good`).
    if let Some(r) = &release {
        if l.linked("good").as_ref() != Some(r) {
            l.point("good", r)?;
        }
    }
    Ok(s)
}

/// The unit's `ExecStartPre`, run from the `good` release before every
/// start: counts the starts of a release on trial and switches back past
/// `max_starts` or the deadline. Says what it did.
pub fn guard(prefix: &Path, now_ms: u64) -> Result<String, OtaError> {
    let l = Layout::new(prefix);
    if let Some(r) = finish_confirm(&l)? {
        return Ok(format!("release {r} was confirmed; its trial is over"));
    }
    let Some(mut p) = read_json::<Pending>(&l.state("pending.json"))? else {
        return Ok("no release on trial".into());
    };
    if l.current().as_ref() != Some(&p.release) {
        return Ok(format!(
            "release {} was not switched to; the agent drops its trial",
            p.release
        ));
    }
    p.starts = p.starts.saturating_add(1);
    if p.starts > p.max_starts {
        let why = format!(
            "release {} started {} times without the server confirming it (ota.max_starts {})",
            p.release,
            p.starts - 1,
            p.max_starts
        );
        roll_back(&l, &p, &why)?;
        return Ok(format!("rolled back to {}: {why}", p.previous));
    }
    if now_ms > p.deadline_ms {
        let why = format!(
            "release {} was not confirmed by the server before its deadline",
            p.release
        );
        roll_back(&l, &p, &why)?;
        return Ok(format!("rolled back to {}: {why}", p.previous));
    }
    write_json(&l.state("pending.json"), &p)?;
    Ok(format!(
        "release {} on trial: start {} of {}",
        p.release, p.starts, p.max_starts
    ))
}

/// A confirmation killed after `installed.json` named the release on trial
/// is finished (the server had confirmed it): `good` and the end of the
/// trial, never a rollback of a confirmed release. Returns it, if so.
fn finish_confirm(l: &Layout) -> Result<Option<String>, OtaError> {
    let Some(p) = read_json::<Pending>(&l.state("pending.json"))? else {
        return Ok(None);
    };
    let installed = read_json::<Installed>(&l.state("installed.json"))?;
    if installed.is_none_or(|i| i.release != p.release) || l.current().as_ref() != Some(&p.release)
    {
        return Ok(None);
    }
    if l.linked("good").as_ref() != Some(&p.release) {
        l.point("good", &p.release)?;
    }
    remove(&l.state("rolled-back.json"))?;
    remove(&l.state("pending.json"))?;
    prune(l, &[&p.release, &p.previous]);
    Ok(Some(p.release))
}

/// Switches back to the previous release: the link first (a rename needs
/// next to no space: a full disk does not stop it), then the reason (best
/// effort), then the trial is over.
pub fn roll_back(l: &Layout, p: &Pending, reason: &str) -> Result<(), OtaError> {
    let prev = l.release(&p.previous);
    if !prev.join("bin/openclaw-agent").is_file() {
        return Err(OtaError::Io {
            what: "roll back to",
            path: prev.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "its binary is gone"),
        });
    }
    log::warn!("OTA: rolling back to {}: {reason}", p.previous);
    l.point("current", &p.previous)?;
    fault("rollback-switched");
    // Killed here, the device is back on its release and the server offers
    // the update again: one more try, which ends noted.
    if let Err(e) = write_json(
        &l.state("rolled-back.json"),
        &RolledBack {
            release: p.release.clone(),
            back_to: p.previous.clone(),
            reason: reason.to_string(),
        },
    ) {
        log::warn!("OTA: the rollback's reason could not be written: {e}");
    }
    fault("rollback-noted");
    remove(&l.state("pending.json"))
}

/// Ends the trial of `release`: it is kept. `false` if it was not on trial
/// (already confirmed: the server says it again after a restart).
pub fn confirm(l: &Layout, release: &str) -> Result<bool, OtaError> {
    let Some(p) = read_json::<Pending>(&l.state("pending.json"))? else {
        return Ok(false);
    };
    if p.release != release || l.current().as_deref() != Some(release) {
        return Ok(false);
    }
    write_json(
        &l.state("installed.json"),
        &Installed {
            counter: p.counter,
            release: release.to_string(),
        },
    )?;
    fault("confirming");
    l.point("good", release)?;
    fault("confirmed-good");
    remove(&l.state("rolled-back.json"))?;
    remove(&l.state("pending.json"))?;
    prune(l, &[release, &p.previous]);
    Ok(true)
}

/// Removes releases other than `keep`, and leftovers of interrupted
/// installs. Failures only warn: the space is the only thing at stake.
fn prune(l: &Layout, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(l.releases()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if keep.contains(&name.as_str()) {
            continue;
        }
        let leftover = name.starts_with(".staging-") || name.starts_with(".download-");
        if !leftover && !release::valid_id(&name) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if let Err(err) = r {
            log::warn!("OTA: could not remove {}: {err}", p.display());
        }
    }
}

/// The highest counter this install has accepted: the confirmed one, or
/// the running release's manifest (an install flash made has none: 0).
fn installed_counter(l: &Layout, current: &str) -> Result<u64, OtaError> {
    let confirmed = read_json::<Installed>(&l.state("installed.json"))?.map_or(0, |i| i.counter);
    let running = std::fs::read(l.release(current).join("manifest.json"))
        .ok()
        .and_then(|t| release::parse(&t).ok())
        .map_or(0, |(m, _)| m.counter);
    Ok(confirmed.max(running))
}

/// Checks an offered manifest against this agent, before any download.
pub fn check_offer(
    l: &Layout,
    cfg: &OtaSection,
    board: &str,
    manifest: &[u8],
    now_ms: u64,
) -> Result<(Manifest, String), OtaError> {
    let keys: Vec<_> = cfg
        .keys
        .iter()
        .filter_map(|k| release::parse_public_key(k).ok())
        .collect();
    if keys.is_empty() {
        return Err(OtaError::NotConfigured("no trusted keys in ota.keys"));
    }
    let m = release::verify(manifest, &keys)?;
    if m.target != TARGET {
        return Err(OtaError::WrongTarget {
            id: m.id,
            got: m.target,
        });
    }
    if m.board != board {
        return Err(OtaError::WrongBoard {
            id: m.id,
            got: m.board,
            board: board.into(),
        });
    }
    if now_ms > m.expires_ms {
        return Err(OtaError::Expired {
            id: m.id,
            expires_ms: m.expires_ms,
            now_ms,
        });
    }
    let current = l.current().ok_or(OtaError::NotConfigured(
        "ota.prefix has no `current` release link",
    ))?;
    if let Some(p) = read_json::<Pending>(&l.state("pending.json"))? {
        if p.release == current {
            return Err(OtaError::OnTrial(current));
        }
    }
    if m.id == current {
        return Err(OtaError::Running(m.id));
    }
    if let Some(r) = read_json::<RolledBack>(&l.state("rolled-back.json"))? {
        if r.release == m.id {
            return Err(OtaError::RolledBack {
                id: m.id,
                reason: r.reason,
            });
        }
    }
    let installed = installed_counter(l, &current)?;
    if m.counter <= installed {
        return Err(OtaError::Downgrade {
            id: m.id,
            counter: m.counter,
            installed,
        });
    }
    if m.size > cfg.max_download_bytes {
        return Err(OtaError::TooBig {
            id: m.id,
            size: m.size,
            max: cfg.max_download_bytes,
        });
    }
    Ok((m, current))
}

/// Downloads, checks and installs a release beside the running one, and
/// runs its self-check: `releases/ID` is then complete. Blocking.
pub fn prepare(
    l: &Layout,
    cfg: &OtaSection,
    board: &str,
    manifest: &[u8],
    grant: &str,
) -> Result<Manifest, OtaError> {
    let (m, current) = check_offer(l, cfg, board, manifest, crate::now_ms())?;
    let releases = l.releases();
    let download = releases.join(format!(".download-{}", m.id));
    // A server restarting, a link dropping: tried again, 1 + 2 + 4 + 8 s
    // apart, before the update fails (a wrong binary fails at once).
    let mut wait = Duration::from_secs(1);
    for attempt in 1.. {
        match fetch(&m, grant, &download) {
            Err(e @ OtaError::Download { .. }) if attempt < DOWNLOAD_ATTEMPTS => {
                log::warn!("OTA: {e}; trying again in {} s", wait.as_secs());
                std::thread::sleep(wait);
                wait *= 2;
            }
            r => {
                r?;
                break;
            }
        }
    }
    fault("downloaded");

    let staging = releases.join(format!(".staging-{}", m.id));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io("clear", &staging))?;
    }
    let from = l.release(&current);
    copy_tree(&from, &staging, Path::new(""), &|rel| {
        rel != Path::new("bin/openclaw-agent") && rel != Path::new("manifest.json")
    })?;
    // Paths into the running release (models, credentials) follow the copy.
    let toml_path = staging.join("agent.toml");
    if let Ok(text) = std::fs::read_to_string(&toml_path) {
        let old = format!("{}/", from.display());
        let new = format!("{}/", l.release(&m.id).display());
        if text.contains(&old) {
            let _ = std::fs::remove_file(&toml_path); // a hard link: not the old file's
            write_file(&toml_path, text.replace(&old, &new).as_bytes(), 0o600)?;
        }
    }
    let bin_dir = staging.join("bin");
    std::fs::create_dir_all(&bin_dir).map_err(io("create", &bin_dir))?;
    let bin = bin_dir.join("openclaw-agent");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&download, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", &download))?;
    }
    std::fs::rename(&download, &bin).map_err(io("move", &bin))?;
    write_file(&staging.join("manifest.json"), manifest, 0o644)?;
    sync_dir(&bin_dir)?;
    sync_dir(&staging)?;
    fault("staged");
    let dst = l.release(&m.id);
    if dst.exists() {
        // An earlier attempt's: not running (checked above), not on trial.
        std::fs::remove_dir_all(&dst).map_err(io("clear", &dst))?;
    }
    std::fs::rename(&staging, &dst).map_err(io("rename", &dst))?;
    sync_dir(&releases)?;
    self_check(&dst, Duration::from_millis(cfg.self_check_timeout_ms))?;
    Ok(m)
}

/// Starts the trial and switches `current` to the prepared release.
pub fn switch(l: &Layout, cfg: &OtaSection, m: &Manifest) -> Result<Pending, OtaError> {
    let previous = l.current().ok_or(OtaError::NotConfigured(
        "ota.prefix has no `current` release link",
    ))?;
    let p = Pending {
        release: m.id.clone(),
        previous,
        counter: m.counter,
        starts: 0,
        max_starts: cfg.max_starts,
        deadline_ms: crate::now_ms().saturating_add(cfg.confirm_timeout_ms),
    };
    write_json(&l.state("pending.json"), &p)?;
    fault("pending");
    l.point("current", &m.id)?;
    fault("switched");
    Ok(p)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), OtaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io("write", path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io("write", path))
}

/// Copies `from/rel` into `to/rel`: directories made, files hard-linked
/// (releases never change a file in place) or copied where links fail.
fn copy_tree(
    from: &Path,
    to: &Path,
    rel: &Path,
    take: &dyn Fn(&Path) -> bool,
) -> Result<(), OtaError> {
    let src = from.join(rel);
    let dst = to.join(rel);
    std::fs::create_dir_all(&dst).map_err(io("create", &dst))?;
    for e in std::fs::read_dir(&src).map_err(io("read", &src))? {
        let e = e.map_err(io("read", &src))?;
        let r = rel.join(e.file_name());
        if !take(&r) {
            continue;
        }
        let ty = e.file_type().map_err(io("read", &e.path()))?;
        if ty.is_dir() {
            copy_tree(from, to, &r, take)?;
        } else if ty.is_file() {
            let d = to.join(&r);
            if std::fs::hard_link(e.path(), &d).is_err() {
                std::fs::copy(e.path(), &d).map_err(io("copy", &d))?;
            }
        }
    }
    Ok(())
}

/// GETs the binary into `path`, stopping past the manifest's size, and
/// checks its size and sha256.
fn fetch(m: &Manifest, grant: &str, path: &Path) -> Result<(), OtaError> {
    let fail = |message: String| OtaError::Download {
        url: m.url.clone(),
        message,
    };
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(10)))
        // The whole body's time: a minute plus 32 KiB/s, so slow links get
        // time and a stalled one does not hold the update forever.
        .timeout_recv_body(Some(Duration::from_secs(60 + m.size / (32 << 10))));
    if m.url.starts_with("https://") {
        let (tls, why) = crate::plugins::http::platform_tls_config();
        if let Some(why) = why {
            log::warn!("OTA: {why}");
        }
        config = config.tls_config(tls);
    }
    let agent: ureq::Agent = config.build().into();
    let mut resp = agent
        .get(&m.url)
        .header("Authorization", format!("Bearer {grant}"))
        .call()
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp
            .body_mut()
            .with_config()
            .limit(4096)
            .read_to_string()
            .unwrap_or_default();
        return Err(fail(format!("HTTP {status}: {}", body.trim())));
    }
    let r = save(m, &mut resp, path);
    if r.is_err() {
        // Also on a full disk: the partial file must not keep it full.
        let _ = std::fs::remove_file(path);
    }
    r
}

fn save(
    m: &Manifest,
    resp: &mut ureq::http::Response<ureq::Body>,
    path: &Path,
) -> Result<(), OtaError> {
    let mut reader = resp
        .body_mut()
        .with_config()
        .limit(m.size.saturating_add(1))
        .reader();
    let mut f = std::fs::File::create(path).map_err(io("write", path))?;
    let mut hash = Sha256::new();
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // The limit (size + 1) is never reached: the loop stops past size.
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(OtaError::Download {
                    url: m.url.clone(),
                    message: format!("after {got} bytes: {e}"),
                })
            }
        };
        got += n as u64;
        if got > m.size {
            break;
        }
        hash.update(&buf[..n]);
        f.write_all(&buf[..n]).map_err(io("write", path))?;
    }
    if got != m.size {
        return Err(OtaError::Size { got, want: m.size });
    }
    f.sync_all().map_err(io("sync", path))?;
    let sha = crate::hex(&hash.finalize());
    if sha != m.sha256 {
        return Err(OtaError::Sha256 {
            got: sha,
            want: m.sha256.clone(),
        });
    }
    Ok(())
}

/// Runs `DIR/bin/openclaw-agent --config DIR/agent.toml --print-config`:
/// the new binary starts on this CPU, reads its config and builds its
/// plugins, as flash checks a release.
fn self_check(dir: &Path, limit: Duration) -> Result<(), OtaError> {
    let bin = dir.join("bin/openclaw-agent");
    let mut cmd = std::process::Command::new(&bin);
    if dir.join("agent.toml").is_file() {
        cmd.arg("--config").arg(dir.join("agent.toml"));
    }
    // stderr to a file, not a pipe: a chatty binary must not block on a
    // full pipe nobody reads until it exits.
    let log_path = dir.join(".self-check.log");
    let log = std::fs::File::create(&log_path).map_err(io("write", &log_path))?;
    let mut child = cmd
        .arg("--print-config")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| OtaError::SelfCheck(format!("{} did not start: {e}", bin.display())))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Ok(f) = std::fs::File::open(&log_path) {
                    let _ = f.take(4096).read_to_string(&mut err);
                }
                let _ = std::fs::remove_file(&log_path);
                return if status.success() {
                    Ok(())
                } else {
                    Err(OtaError::SelfCheck(format!(
                        "`{} --print-config` {status}: {}",
                        bin.display(),
                        err.trim()
                    )))
                };
            }
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(OtaError::SelfCheck(format!(
                    "`{} --print-config` did not end within {} ms",
                    bin.display(),
                    limit.as_millis()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(OtaError::SelfCheck(e.to_string())),
        }
    }
}

/// The agent's side of updates, owned by its manager loop: the offers it
/// takes, the install it runs on a blocking thread, its trial, and what
/// its status reports.
pub struct Updater {
    layout: Option<Layout>,
    cfg: OtaSection,
    board: String,
    /// The release this process runs.
    pub release: Option<String>,
    trial: Option<Pending>,
    /// The last update, for the status.
    pub report: Option<UpdateReport>,
    /// The release being installed on a blocking thread, and its offer's sha256.
    busy: Option<(String, String)>,
    /// Set when the process is to exit and be restarted (into the release
    /// named, already switched to).
    pub restart: Option<String>,
}

impl Updater {
    /// Reads the install's state (`[ota] prefix`); without a prefix or
    /// keys the agent reports no release and the server offers it nothing.
    pub fn new(cfg: &OtaSection, board: &str) -> Updater {
        let mut u = Updater {
            layout: None,
            cfg: cfg.clone(),
            board: board.to_string(),
            release: None,
            trial: None,
            report: None,
            busy: None,
            restart: None,
        };
        if cfg.prefix.as_os_str().is_empty() {
            return u;
        }
        if cfg.keys.is_empty() {
            log::warn!(
                "OTA: ota.prefix is set but ota.keys is empty: over-the-air updates are off \
                 (flash --ota-key, or [ota] keys)"
            );
            return u;
        }
        let l = Layout::new(&cfg.prefix);
        match startup(&l) {
            Ok(s) => {
                if s.release.is_none() {
                    log::warn!(
                        "OTA: {} has no `current` release link: updates are off",
                        cfg.prefix.display()
                    );
                    return u;
                }
                if let Some(t) = &s.trial {
                    log::info!(
                        "OTA: release {} on trial (start {} of {}): switching back to {} unless the server confirms it",
                        t.release,
                        t.starts,
                        t.max_starts,
                        t.previous
                    );
                }
                u.release = s.release;
                u.trial = s.trial;
                u.report = s.report;
                u.layout = Some(l);
            }
            Err(e) => log::warn!("OTA: cannot read the install's state: {e}; updates are off"),
        }
        u
    }

    /// An offer from the server: checked at once, installed on a blocking
    /// thread that calls `done` with the outcome. Returns whether the
    /// status changed.
    pub fn on_offer(
        &mut self,
        offer: crate::protocol::UpdateOffer,
        done: impl FnOnce(Result<Manifest, String>) + Send + 'static,
    ) -> bool {
        // The id is read unverified: the report also names the offer's
        // sha256, which the server matches with the manifest it sent, so
        // a forged offer naming a real release cannot fail its rollout.
        let id = release::parse(offer.manifest.as_bytes())
            .map(|(m, _)| m.id)
            .unwrap_or_else(|_| "?".into());
        let sha = crate::hex(&Sha256::digest(offer.manifest.as_bytes()));
        let Some(l) = self.layout.clone() else {
            log::warn!("OTA: update {id} offered, but updates are not set up here ([ota])");
            return self.set(
                &id,
                UpdateState::Failed,
                "updates are not set up on this agent ([ota] prefix and keys)".into(),
            );
        };
        if self.busy.is_some() || self.restart.is_some() || self.trial.is_some() {
            // One install at a time, and none on trial: the server offers
            // it again. Nor is the report of the running one replaced (a
            // forged offer must not turn a trial's report into a failure,
            // which the server would never confirm).
            log::info!("OTA: update {id} not taken now: an update is under way");
            return false;
        }
        if let Err(e) = check_offer(
            &l,
            &self.cfg,
            &self.board,
            offer.manifest.as_bytes(),
            crate::now_ms(),
        ) {
            // A duplicate of what runs or is on trial (a redelivery after
            // the restart), or an update while on trial: not a failure;
            // the server offers it again once this one is confirmed.
            if let OtaError::Running(_) | OtaError::OnTrial(_) = e {
                log::info!("OTA: update {id} not taken now: {e}");
                return false;
            }
            log::warn!("OTA: update {id} refused: {e}");
            return self.set_offer(&id, UpdateState::Failed, e.to_string(), sha);
        }
        log::info!("OTA: installing release {id}");
        self.busy = Some((id.clone(), sha.clone()));
        let (cfg, board) = (self.cfg.clone(), self.board.clone());
        tokio::task::spawn_blocking(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                prepare(&l, &cfg, &board, offer.manifest.as_bytes(), &offer.grant)
            }));
            done(match r {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("the install panicked".into()),
            });
        });
        self.set_offer(&id, UpdateState::Installing, String::new(), sha)
    }

    /// The install ended: switch to it and ask for a restart, or report why not.
    pub fn on_prepared(&mut self, r: Result<Manifest, String>) -> bool {
        let (id, sha) = self
            .busy
            .take()
            .unwrap_or_else(|| ("?".into(), String::new()));
        let Some(l) = self.layout.clone() else {
            return false;
        };
        let r = r.and_then(|m| switch(&l, &self.cfg, &m).map_err(|e| e.to_string()));
        match r {
            Ok(p) => {
                log::info!("OTA: switched to release {}; restarting into it", p.release);
                self.restart = Some(p.release);
                self.set(&id, UpdateState::Switching, String::new())
            }
            Err(e) => {
                log::warn!("OTA: update {id} failed: {e}");
                self.set_offer(&id, UpdateState::Failed, e, sha)
            }
        }
    }

    /// The server saw this release running: keep it.
    pub fn on_confirmed(&mut self, release: &str) -> bool {
        let (Some(l), Some(t)) = (&self.layout, &self.trial) else {
            return false;
        };
        if t.release != release {
            return false;
        }
        match confirm(l, release) {
            Ok(false) => false,
            Ok(true) => {
                log::info!("OTA: release {release} confirmed by the server");
                self.trial = None;
                self.set(release, UpdateState::Confirmed, String::new())
            }
            Err(e) => {
                log::warn!("OTA: confirming {release}: {e}");
                false
            }
        }
    }

    /// On trial past the deadline: switch back and ask for a restart.
    pub fn on_tick(&mut self) -> bool {
        let (Some(l), Some(t)) = (&self.layout, &self.trial) else {
            return false;
        };
        if crate::now_ms() <= t.deadline_ms || self.restart.is_some() {
            return false;
        }
        let why = format!(
            "release {} was not confirmed by the server within ota.confirm_timeout_ms of the switch",
            t.release
        );
        match roll_back(l, t, &why) {
            Ok(()) => {
                let (rel, prev) = (t.release.clone(), t.previous.clone());
                self.trial = None;
                self.restart = Some(prev);
                self.set(&rel, UpdateState::RolledBack, why)
            }
            Err(e) => {
                log::warn!("OTA: cannot roll back: {e}; staying on {}", t.release);
                // Once: the trial ends here, on the release that runs.
                self.trial = None;
                false
            }
        }
    }

    fn set(&mut self, release: &str, state: UpdateState, message: String) -> bool {
        self.set_offer(release, state, message, String::new())
    }

    fn set_offer(
        &mut self,
        release: &str,
        state: UpdateState,
        message: String,
        offer: String,
    ) -> bool {
        self.report = Some(UpdateReport {
            release: release.to_string(),
            state,
            message,
            offer_sha256: offer,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(prefix: &Path, id: &str) {
        let bin = prefix.join("releases").join(id).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("openclaw-agent"), id).unwrap();
    }

    fn trial(l: &Layout, release: &str, previous: &str, max_starts: u32, deadline_ms: u64) {
        write_json(
            &l.state("pending.json"),
            &Pending {
                release: release.into(),
                previous: previous.into(),
                counter: 2,
                starts: 0,
                max_starts,
                deadline_ms,
            },
        )
        .unwrap();
        l.point("current", release).unwrap();
    }

    #[test]
    fn the_guard_rolls_back_after_max_starts() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        install(d.path(), "a");
        install(d.path(), "b");
        l.point("current", "a").unwrap();
        assert_eq!(startup(&l).unwrap().release.as_deref(), Some("a"));
        assert_eq!(l.linked("good").as_deref(), Some("a"), "startup sets good");
        trial(&l, "b", "a", 2, u64::MAX);
        for n in 1..=2 {
            assert!(guard(d.path(), 0)
                .unwrap()
                .contains(&format!("start {n} of 2")));
            let s = startup(&l).unwrap();
            assert_eq!(s.trial.as_ref().unwrap().starts, n);
            assert_eq!(
                l.linked("good").as_deref(),
                Some("a"),
                "a trial is not good"
            );
        }
        assert!(guard(d.path(), 0).unwrap().starts_with("rolled back to a"));
        assert_eq!(l.current().as_deref(), Some("a"));
        let s = startup(&l).unwrap();
        assert!(s.trial.is_none());
        let r = s.report.unwrap();
        assert_eq!(
            (r.release.as_str(), r.state),
            ("b", UpdateState::RolledBack)
        );
        assert!(r.message.contains("started 2 times"), "{}", r.message);
    }

    #[test]
    fn the_guard_rolls_back_past_the_deadline_and_confirm_keeps() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        install(d.path(), "a");
        install(d.path(), "b");
        install(d.path(), "old");
        trial(&l, "b", "a", 3, 100);
        assert!(guard(d.path(), 101).unwrap().contains("deadline"));
        assert_eq!(l.current().as_deref(), Some("a"));

        trial(&l, "b", "a", 3, u64::MAX);
        assert!(!confirm(&l, "a").unwrap(), "not the release on trial");
        assert!(confirm(&l, "b").unwrap());
        assert!(!confirm(&l, "b").unwrap(), "twice is a no-op");
        assert_eq!(l.linked("good").as_deref(), Some("b"));
        let s = startup(&l).unwrap();
        assert_eq!(s.report.unwrap().state, UpdateState::Confirmed);
        assert_eq!(installed_counter(&l, "b").unwrap(), 2);
        assert!(!d.path().join("releases/old").exists(), "pruned");
        assert!(
            d.path().join("releases/a").exists(),
            "the previous one kept"
        );
    }

    #[test]
    fn a_trial_never_switched_to_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        install(d.path(), "a");
        install(d.path(), "b");
        trial(&l, "b", "a", 3, u64::MAX);
        // As if killed after pending.json, before the switch.
        l.point("current", "a").unwrap();
        assert!(guard(d.path(), 0).unwrap().contains("not switched"));
        let s = startup(&l).unwrap();
        assert!(s.trial.is_none());
        assert!(s.report.is_none(), "the server offers it again");
        assert!(!l.state("pending.json").exists());
    }

    fn cfg(key: &ed25519_dalek::SigningKey) -> OtaSection {
        OtaSection {
            prefix: PathBuf::new(),
            keys: vec![release::public_key_hex(&key.verifying_key())],
            max_download_bytes: 1000,
            confirm_timeout_ms: 1000,
            max_starts: 3,
            self_check_timeout_ms: 1000,
        }
    }

    fn offer(key: &ed25519_dalek::SigningKey, f: impl FnOnce(&mut Manifest)) -> String {
        let now = crate::now_ms();
        let mut m = Manifest {
            id: "b".into(),
            version: "1".into(),
            counter: 2,
            target: TARGET.into(),
            board: "sim".into(),
            sha256: "0".repeat(64),
            size: 10,
            url: "http://127.0.0.1:1/x".into(),
            created_ms: now - 10,
            expires_ms: now + 60_000,
            key_id: String::new(),
        };
        f(&mut m);
        m.sign(key).unwrap()
    }

    #[test]
    fn offers_are_checked_against_this_agent() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        install(d.path(), "a");
        l.point("current", "a").unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let c = cfg(&key);
        let check = |text: String| check_offer(&l, &c, "sim", text.as_bytes(), crate::now_ms());
        assert!(check(offer(&key, |_| {})).is_ok());
        let e = |f: fn(&mut Manifest)| check(offer(&key, f)).unwrap_err().to_string();
        assert!(
            e(|m| m.target = "riscv64gc-unknown-linux-gnu".into()).contains("built for riscv64")
        );
        assert!(e(|m| m.board = "rpi4".into()).contains("board `rpi4`"));
        assert!(e(|m| {
            m.created_ms = 1;
            m.expires_ms = 2;
        })
        .contains("expired"));
        assert!(e(|m| m.size = 1001).contains("max_download_bytes"));
        assert!(e(|m| m.id = "a".into()).contains("is the one running"));
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        assert!(check(offer(&other, |_| {}))
            .unwrap_err()
            .to_string()
            .contains("not among the trusted keys"));
        // The running release's manifest sets the floor for counters.
        std::fs::write(
            d.path().join("releases/a/manifest.json"),
            offer(&key, |m| {
                m.id = "a".into();
                m.counter = 5;
            }),
        )
        .unwrap();
        assert!(e(|m| m.counter = 5).contains("downgrade"));
        assert!(check(offer(&key, |m| m.counter = 6)).is_ok());
        let none = OtaSection {
            keys: vec![],
            ..c.clone()
        };
        assert!(matches!(
            check_offer(&l, &none, "sim", offer(&key, |_| {}).as_bytes(), 0),
            Err(OtaError::NotConfigured(_))
        ));
    }
}
