//! Containment of process plugins (and of exec's commands, for the kill
//! only): a cgroup v2 per plugin (and one per
//! worker process under it) where the agent can make one, and a count of
//! processes and memory by the agent where the kernel cannot enforce them.
//!
//! At the first use the agent finds the cgroup v2 hierarchy
//! (`/proc/self/mountinfo`) and its own cgroup (`/proc/self/cgroup`), and
//! creates `openclaw-<pid>/` under it. When the `memory` and `pids`
//! controllers are available there it enables them (first moving itself
//! into a leaf `openclaw-agent/` if its cgroup holds processes and is not
//! the root: cgroup v2 allows controllers only for cgroups without
//! processes of their own, which is what systemd's `Delegate=yes` gives a
//! service), and each worker cgroup gets `memory.max` (`max_memory_mb`,
//! with `memory.swap.max` 0) and `pids.max` (`max_threads`: the pids
//! controller counts threads, not processes): the kernel enforces both for
//! the process and everything it starts. `max_processes` is always counted
//! by the agent (`cgroup.procs`), so a multithreaded program is held to its
//! process count and its thread count, each by its own name. Each worker joins
//! its cgroup before `exec` (written from the child, so nothing it starts
//! can be outside), and `cgroup.kill` ends the whole tree, children that
//! called `setsid` included.
//!
//! Which limit applies where, said in the log at start and in every error:
//! - cgroup v2 with both controllers: `memory.max` and `pids.max` (kernel),
//!   processes counted by the agent every 100 ms;
//! - cgroup v2 without them (a hybrid layout where `memory` and `pids` are
//!   bound to cgroup v1, or not delegated): the cgroup still holds the tree
//!   (`cgroup.procs`, `cgroup.kill`), and the agent counts its processes,
//!   their threads and their resident memory every 100 ms and kills the
//!   tree past a limit;
//! - no usable cgroup v2: the same count over the worker's process group
//!   (a `setsid` child is not seen or killed then).

use std::ffi::CString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How often the agent counts processes and memory where the kernel does not.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// The agent's cgroup setup, found once.
#[derive(Debug)]
pub(crate) struct Hierarchy {
    /// `openclaw-<pid>` under the agent's cgroup.
    base: PathBuf,
    /// Whether `memory.max` and `pids.max` are enforced by the kernel.
    pub controllers: bool,
}

static HIERARCHY: OnceLock<Option<Hierarchy>> = OnceLock::new();
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The hierarchy, or `None` where the agent cannot make cgroups.
pub(crate) fn hierarchy() -> Option<&'static Hierarchy> {
    HIERARCHY
        .get_or_init(|| match detect() {
            Ok(h) => {
                log::info!(
                    "process plugins: one cgroup v2 per plugin under {} ({})",
                    h.base.display(),
                    if h.controllers {
                        "memory.max and pids.max enforced by the kernel"
                    } else {
                        "no memory/pids controller there: processes and memory counted by the agent every 100 ms"
                    }
                );
                Some(h)
            }
            Err(e) => {
                log::warn!(
                    "process plugins: no cgroup v2 for them ({e}); processes and memory of each plugin's process group counted by the agent every 100 ms (a setsid child escapes)"
                );
                None
            }
        })
        .as_ref()
}

/// What enforces the limits, for messages.
pub(crate) fn mechanism(what: &str) -> String {
    match hierarchy() {
        Some(h) if h.controllers => format!("cgroup v2 {what}"),
        Some(_) => "counted by the agent: its cgroup v2 has no memory/pids controller".into(),
        None => "counted by the agent over the process group: no cgroup v2".into(),
    }
}

fn cgroup2_mount() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in text.lines() {
        // ... mount-point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mp.replace("\\040", " ")));
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount"))
}

fn own_cgroup() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup v2 entry in /proc/self/cgroup",
            )
        })
}

fn write(path: &Path, text: &str) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(text.as_bytes())
}

fn has_controllers(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.controllers")).is_ok_and(|c| {
        let c: Vec<&str> = c.split_whitespace().collect();
        c.contains(&"memory") && c.contains(&"pids")
    })
}

fn enable(dir: &Path) -> io::Result<()> {
    write(&dir.join("cgroup.subtree_control"), "+memory +pids")
}

/// Kills every process in `dir` (and below), then removes the folders.
fn remove_tree(dir: &Path) {
    kill_tree(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kill_tree(dir: &Path) {
    if write(&dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // Kernels before 5.14: signal what is listed, until nothing is.
    for _ in 0..100 {
        let pids = procs(dir);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    let mut out: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(procs(&e.path()));
            }
        }
    }
    out
}

fn detect() -> io::Result<Hierarchy> {
    let mount = cgroup2_mount()?;
    let here = mount.join(own_cgroup()?);
    // Leftovers of an agent that died: its pid is gone.
    if let Ok(rd) = std::fs::read_dir(&here) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix("openclaw-")
                .and_then(|p| p.parse::<u32>().ok())
            {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    remove_tree(&e.path());
                }
            }
        }
    }
    let mut controllers = has_controllers(&here);
    if controllers && enable(&here).is_err() {
        // Processes in a non-root cgroup forbid controllers for its
        // children: move this agent into a leaf of its own first.
        let moved = here != mount && {
            let leaf = here.join("openclaw-agent");
            let _ = std::fs::create_dir(&leaf);
            write(&leaf.join("cgroup.procs"), "0").is_ok()
        };
        controllers = moved && enable(&here).is_ok();
    }
    let base = here.join(format!("openclaw-{}", std::process::id()));
    match std::fs::create_dir(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", base.display()))),
    }
    // Joining must work: a cgroup we cannot move processes into is useless.
    if !base.join("cgroup.procs").exists() {
        return Err(io::Error::other(format!(
            "{} is not a cgroup",
            base.display()
        )));
    }
    controllers = controllers && has_controllers(&base) && enable(&base).is_ok();
    Ok(Hierarchy { base, controllers })
}

/// One worker's cgroup: `openclaw-<pid>/<plugin>/w<n>`. Dropped, it kills
/// what is left in it and removes itself.
#[derive(Debug)]
pub(crate) struct Group {
    dir: PathBuf,
    /// `cgroup.procs`, for the child to join before exec.
    procs_file: CString,
}

impl Group {
    /// A new cgroup for one worker of `plugin`, limits set where enforced
    /// (`u64::MAX`: no limit). `max_threads` goes to `pids.max`, which
    /// counts threads (tasks), not processes.
    pub fn create(plugin: &str, memory_bytes: u64, max_threads: u64) -> io::Result<Group> {
        let h = hierarchy().ok_or_else(|| io::Error::other("no cgroup v2"))?;
        let parent = h.base.join(plugin);
        match std::fs::create_dir(&parent) {
            Ok(()) => {
                if h.controllers {
                    enable(&parent)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let dir = parent.join(format!("w{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&dir)?;
        let g = Group {
            procs_file: CString::new(dir.join("cgroup.procs").display().to_string())
                .map_err(io::Error::other)?,
            dir,
        };
        let limit = |v: u64| {
            if v == u64::MAX {
                "max".to_string()
            } else {
                v.to_string()
            }
        };
        if h.controllers {
            write(&g.dir.join("memory.max"), &limit(memory_bytes))?;
            if memory_bytes != u64::MAX {
                let _ = write(&g.dir.join("memory.swap.max"), "0");
            }
            write(&g.dir.join("pids.max"), &limit(max_threads))?;
        }
        Ok(g)
    }

    /// Moves the calling process into this cgroup. Only async-signal-safe
    /// calls: for `pre_exec`, between fork and exec.
    pub fn join_from_child(&self) -> io::Result<()> {
        // SAFETY: open/write/close on a path prepared before the fork.
        unsafe {
            let fd = libc::open(self.procs_file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let e = io::Error::last_os_error();
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(e)
            }
        }
    }

    /// Processes in it now.
    pub fn pids(&self) -> Vec<i32> {
        procs(&self.dir)
    }

    /// Kills everything in it (`cgroup.kill`).
    pub fn kill(&self) {
        kill_tree(&self.dir);
    }

    /// Why the kernel stopped it, if it did: limits hit so far.
    pub fn limit_events(&self, max_memory_mb: u64, max_threads: u64) -> Option<String> {
        let count = |file: &str, key: &str| -> u64 {
            std::fs::read_to_string(self.dir.join(file))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0)
        };
        if count("memory.events", "oom_kill ") > 0 {
            return Some(format!(
                "it and its children reached max_memory_mb ({max_memory_mb}) (cgroup v2 memory.max) and were killed"
            ));
        }
        if count("pids.events", "max ") > 0 {
            return Some(format!(
                "it and its children reached max_threads ({max_threads}) (cgroup v2 pids.max, which counts threads): further forks and new threads failed"
            ));
        }
        None
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Killed now; the folder goes once the processes have exited (off
        // the async threads: that can take a moment).
        kill_tree(&self.dir);
        let dir = std::mem::take(&mut self.dir);
        std::thread::spawn(move || remove_tree(&dir));
    }
}

/// Processes whose process group is `pgid` (no cgroup: the fallback's view).
pub(crate) fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = after.split_whitespace();
        let state = f.next();
        if state == Some("Z") {
            continue;
        }
        if f.nth(1).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// Threads of processes, all together (what `pids.max` counts).
pub(crate) fn threads(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Resident memory of processes, bytes.
pub(crate) fn rss_bytes(pids: &[i32]) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/statm")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
        .sum()
}
