//! The plugins under hostile input (issue 16), each case through a real
//! server and a real `openclaw-agent` process: output bombs, a task that
//! kills the agent, a root escape race, FIFOs and sockets, work that
//! outlives its timeout, children that outlive their task, option
//! injection through numbers, steering headers, process plugins that fork,
//! leak or flood the log, and defaults that cannot be met; then the holes a
//! review found in those fixes (CSV output, JSON returned twice, long
//! listings, openat2 refused, the size walk's entry limit, threads counted
//! as processes, a start that cannot be journaled).
//!
//! The tests in this file run one at a time (they measure CPU time and
//! count processes); each has its own server and agent.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, MqttPeer, Server};
use openclaw::protocol::api::{SubmitRequest, TaskState, TaskView};
use openclaw::protocol::{self, topics, FromAgent};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A server that takes request bodies up to 4 MiB: the admin client sends
/// pretty-printed JSON, about twice the size of the compact input that has
/// to fit under the MQTT payload limit.
fn big_server(dir: &Path) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, "[http]\nmax_body_bytes = 4194304\n").unwrap();
    Server::start(&dir.join("data"), &["--config", cfg.to_str().unwrap()])
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn req(plugin: &str, input: Value, timeout_ms: u64) -> SubmitRequest {
    let mut r = task(plugin, input);
    r.timeout_ms = Some(timeout_ms);
    r.max_attempts = Some(1);
    r
}

/// Waits for a terminal state, failing at once if the agent process died.
fn wait_alive(server: &Server, agent: &mut Agent, id: &str, limit: Duration) -> TaskView {
    let start = Instant::now();
    loop {
        assert!(agent.alive(), "the agent died while task {id} ran");
        let t = server
            .client
            .task(id, Some(Duration::from_millis(500)))
            .expect("task");
        if t.state.is_terminal() {
            return t;
        }
        assert!(
            start.elapsed() < limit,
            "task {id} not finished within {limit:?}: {:?}",
            t.state
        );
    }
}

fn run(server: &Server, agent: &mut Agent, r: SubmitRequest) -> TaskView {
    let id = server.submit(r);
    wait_alive(server, agent, &id, Duration::from_secs(60))
}

fn ok(server: &Server, agent: &mut Agent, plugin: &str, input: Value) -> Value {
    let what = short(&format!("{plugin} {input}"));
    let t = run(server, agent, req(plugin, input, 30_000));
    assert_eq!(t.state, TaskState::Succeeded, "{what}: {:?}", t.error);
    t.result.unwrap()
}

/// The task fails (state `Failed`) with an error containing every needle.
fn fails(server: &Server, agent: &mut Agent, r: SubmitRequest, needles: &[&str]) -> TaskView {
    let what = short(&format!("{} {}", r.plugin, r.input));
    let t = run(server, agent, r);
    let e = t.error.clone().unwrap_or_default();
    assert_eq!(t.state, TaskState::Failed, "{what}: {e}");
    for n in needles {
        assert!(e.contains(n), "{what}: `{n}` not in: {e}");
    }
    t
}

/// At most 200 characters of `s`, for messages about huge inputs.
fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Pid of the agent process started with `--id id` by this test process
/// (its child: an agent left over from a killed earlier run, now a child
/// of init, has the same command line, and limiting that one made a test
/// wait in vain).
fn agent_pid(id: &str) -> i32 {
    let want = format!("\0--id\0{id}\0");
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        // Field 4 of /proc/PID/stat, after the parenthesized name.
        let ppid = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string))
            });
        if cmd.contains("openclaw-agent")
            && cmd.contains(&want)
            && ppid.as_deref() == Some(me.as_str())
        {
            return pid;
        }
    }
    panic!("no agent process with id {id} started by this test");
}

/// User plus system CPU time of a process, seconds.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn threads(pid: i32) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Pids of live processes whose command line contains `needle` (NULs as spaces).
fn procs_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd: String = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if cmd.contains(needle) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// Waits up to `limit` for no process matching `needle`; returns the survivors.
fn survivors(needle: &str, limit: Duration) -> Vec<i32> {
    let start = Instant::now();
    loop {
        let left = procs_with(needle);
        if left.is_empty() || start.elapsed() >= limit {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_all(needle: &str) {
    for pid in procs_with(needle) {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// The default `max_response_bytes` (672 KiB, see http.rs).
const DEFAULT_RESPONSE_CAP: usize = 688_128;

/// A JSON object just under the default response cap.
fn json_near_cap() -> Vec<u8> {
    json!({"data": "a".repeat(DEFAULT_RESPONSE_CAP - 2000)})
        .to_string()
        .into_bytes()
}

/// A JSON list of floats just under the default response cap: each
/// `1.5,` (4 bytes of text) is 9 bytes parsed (a tag and an f64).
fn json_floats() -> Vec<u8> {
    let n = (DEFAULT_RESPONSE_CAP - 2000) / 4;
    format!("[{}1.5]", "1.5,".repeat(n - 1)).into_bytes()
}

/// A small HTTP server: `/big-text` and `/big-bin` answer 2 MiB bodies,
/// `/json-near-cap` and `/json-floats` JSON just under the default cap,
/// anything else a JSON echo of the request line and headers.
fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    return;
                }
                let (mut len, mut headers) = (0, serde_json::Map::new());
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() {
                        return;
                    }
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let Some((k, v)) = h.split_once(':') else {
                        return;
                    };
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    headers.insert(k.to_ascii_lowercase(), json!(v.trim()));
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let (ctype, answer): (&str, Vec<u8>) = if first.contains("/big-text") {
                    ("text/plain", vec![b'a'; 2 << 20])
                } else if first.contains("/json-near-cap") {
                    ("application/json", json_near_cap())
                } else if first.contains("/json-floats") {
                    ("application/json", json_floats())
                } else if first.contains("/big-bin") {
                    ("application/octet-stream", vec![0xff; 2 << 20])
                } else {
                    (
                        "application/json",
                        json!({"request": first.trim_end(), "headers": headers})
                            .to_string()
                            .into_bytes(),
                    )
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    answer.len()
                );
                let _ = s.write_all(&answer);
            });
        }
    });
    port
}

/// Item 1: a transform or aggregate whose result would take gigabytes fails
/// at once against its budget; the agent (given a 6 GiB address space, so
/// an unbounded build aborts it instead of exhausting the machine) lives.
#[test]
fn output_bombs_fail_against_a_budget_and_the_agent_lives() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let server = big_server(&dir.path().join("srv"));
    let prefix = ["sh", "-c", "ulimit -v 6291456; exec \"$0\" \"$@\""];
    let mut agent = Agent::start_with(
        dir.path(),
        "bomb-1",
        &server.broker(),
        "[plugins.transform]\n",
        &prefix,
    );
    server.wait_online("bomb-1");
    let empties: Vec<Value> = (0..100_000).map(|_| json!({})).collect();
    let started = Instant::now();
    // 900 KB of input asking for ~60 GB: 100,000 copies of 600,000 characters.
    fails(
        &server,
        &mut agent,
        req(
            "transform",
            json!({"records": empties, "map": {"x": {"value": "y".repeat(600_000)}}}),
            60_000,
        ),
        &["`transform`", "max_work_bytes"],
    );
    // Groups x fields: 20,000 groups times 40,000 sums.
    let recs: Vec<Value> = (0..20_000).map(|i| json!({ "g": i })).collect();
    let fields: Vec<String> = (0..40_000).map(|i| format!("f{i}")).collect();
    fails(
        &server,
        &mut agent,
        req(
            "transform",
            json!({"records": recs, "aggregate": {"group_by": "g", "sum": fields}}),
            60_000,
        ),
        &["`transform`", "`aggregate`", "max_work_bytes"],
    );
    // select: 50,000 records times 30,000 new (null) fields.
    let recs: Vec<Value> = (0..50_000).map(|_| json!({})).collect();
    let fields: Vec<String> = (0..30_000).map(|i| format!("s{i}")).collect();
    fails(
        &server,
        &mut agent,
        req(
            "transform",
            json!({"records": recs, "select": fields}),
            60_000,
        ),
        &["`transform`", "`select`", "max_work_bytes"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused only after {:?}",
        started.elapsed()
    );
    // Normal work still runs, on the same process.
    let r = ok(
        &server,
        &mut agent,
        "transform",
        json!({"records": [{"a": 1}, {"a": 2}], "map": {"b": {"field": "a", "mul": 2}}}),
    );
    assert_eq!(r["records"], json!([{"a": 1, "b": 2}, {"a": 2, "b": 4}]));
    assert!(agent.alive());
}

/// Item 1: a task that kills the agent every time it runs. After the first
/// crash the tasks that were running are run again one at a time; the one
/// the agent dies under while it runs alone is failed, not run again. The
/// innocent task that was running beside it at the first crash succeeds.
#[test]
fn a_task_that_kills_the_agent_is_not_run_again_blindly() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let server = big_server(&dir.path().join("srv"));
    let cfg =
        "[plugins.exec.commands.sh]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"{input.script}\"]\n";
    let id = "loop-1";
    let mut agent = Agent::start(dir.path(), id, &server.broker(), cfg);
    server.wait_online(id);
    let peer = MqttPeer::connect(server.mqtt_port, "loop-peer", &[&topics::results(id)]);
    // Attempts to spare: the server re-dispatches after each device loss,
    // and the agent's own answer decides.
    let mut innocent = req("echo", json!({"sleep_ms": 1500}), 30_000);
    innocent.max_attempts = Some(10);
    let innocent = server.submit(innocent);
    std::thread::sleep(Duration::from_millis(300));
    let mut killer = req(
        "exec",
        json!({"command": "sh", "script": "kill -9 $PPID; sleep 5"}),
        30_000,
    );
    killer.max_attempts = Some(10);
    let killer = server.submit(killer);
    // systemd's Restart=always, by hand: restart the agent whenever it dies.
    let mut crashes = 0;
    let mut stable_since = Instant::now();
    let begun = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(6) {
        assert!(
            begun.elapsed() < Duration::from_secs(90),
            "no stable agent after {crashes} crashes"
        );
        if !agent.alive() {
            crashes += 1;
            assert!(
                crashes <= 3,
                "the agent died {crashes} times: the killer task is run again on every start"
            );
            agent = Agent::start(dir.path(), id, &server.broker(), cfg);
            stable_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(crashes, 2, "first run, then the lone re-run");
    // What the agent said about each task on its results topic.
    let mut finished = std::collections::HashMap::new();
    while let Ok(p) = peer.rx.recv_timeout(Duration::from_millis(500)) {
        if let Ok(FromAgent::Finished(o)) = protocol::decode::<FromAgent>(&p.payload, 1 << 20) {
            finished.insert(o.task_id.clone(), o.result);
        }
    }
    let k = finished.get(&killer).expect("the killer task was answered");
    let e = k.as_ref().expect_err("the killer task failed");
    assert!(
        e.message.contains("crashed") && !e.retryable,
        "killer: {e:?}"
    );
    let i = finished
        .get(&innocent)
        .expect("the innocent task was answered");
    assert!(i.is_ok(), "innocent: {i:?}");
    let t = server.wait(&innocent);
    assert_eq!(t.state, TaskState::Succeeded, "innocent: {:?}", t.error);
    let t = server.wait(&killer);
    assert_eq!(t.state, TaskState::Failed, "killer: {:?}", t.error);
    assert!(t.error.unwrap_or_default().contains("crashed twice"));
    assert!(agent.alive());
}

/// Item 2: something else swaps `y` (and the folder `d`) between a regular
/// file and a symlink to a file outside the root while write and read tasks
/// run: nothing is written outside, nothing outside is read.
#[test]
fn file_root_escape_race_is_closed() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "SECRET").unwrap();
    std::fs::write(outside.join("y"), "SECRET").unwrap();
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "max_concurrency = 8\nqueue_capacity = 256\n[plugins.file]\nroot = {}\nconcurrency = 8\n",
        toml_str(&root)
    );
    let mut agent = Agent::start(dir.path(), "race-1", &server.broker(), &cfg);
    server.wait_online("race-1");
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, root, outside) = (stop.clone(), root.clone(), outside.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (tf, tl) = (root.join(".tf"), root.join(".tl"));
                let (df, dl) = (root.join(".df"), root.join(".dl"));
                let _ = std::fs::write(&tf, "inside");
                let _ = std::fs::rename(&tf, root.join("y"));
                let _ = std::fs::create_dir(&df);
                let _ = std::fs::remove_dir_all(root.join("d"));
                let _ = std::fs::rename(&df, root.join("d"));
                let _ = std::os::unix::fs::symlink(outside.join("secret"), &tl);
                let _ = std::fs::rename(&tl, root.join("y"));
                let _ = std::os::unix::fs::symlink(&outside, &dl);
                let _ = std::fs::remove_dir_all(root.join("d"));
                let _ = std::fs::rename(&dl, root.join("d"));
                if i.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
        })
    };
    let mut leaked = Vec::new();
    let started = Instant::now();
    for round in 0..15 {
        let ids: Vec<String> = (0..100)
            .map(|i| {
                let path = if i % 4 < 2 { "y" } else { "d/y" };
                let input = if i % 2 == 0 {
                    json!({"op": "write", "path": path, "content": "PWNED"})
                } else {
                    json!({"op": "read", "path": path})
                };
                server.submit(req("file", input, 10_000))
            })
            .collect();
        for id in &ids {
            let t = wait_alive(&server, &mut agent, id, Duration::from_secs(60));
            if let Some(r) = &t.result {
                if r["content"] == "SECRET" {
                    leaked.push(format!("round {round}: read {:?}", t.input));
                }
            }
        }
        for f in ["secret", "y"] {
            if std::fs::read_to_string(outside.join(f)).unwrap() != "SECRET" {
                leaked.push(format!("round {round}: wrote outside/{f}"));
                std::fs::write(outside.join(f), "SECRET").unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    eprintln!("race: 1500 tasks in {:?}", started.elapsed());
    assert!(leaked.is_empty(), "escaped the root: {leaked:?}");
    assert!(agent.alive());
}

/// Item 2: FIFOs and sockets are refused before any I/O (a write to a FIFO
/// used to block a thread in `open` for good), a dangling symlink can be
/// deleted, symlinks are never followed.
#[test]
fn file_refuses_special_files_and_deletes_dangling_links() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "SECRET").unwrap();
    let fifo = std::ffi::CString::new(root.join("fifo").display().to_string()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    std::os::unix::fs::symlink(root.join("gone"), root.join("dangling")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("out")).unwrap();
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!("[plugins.file]\nroot = {}\n", toml_str(&root));
    let mut agent = Agent::start(dir.path(), "fifo-1", &server.broker(), &cfg);
    server.wait_online("fifo-1");
    let pid = agent_pid("fifo-1");
    let threads_before = threads(pid);
    for _ in 0..40 {
        fails(
            &server,
            &mut agent,
            req(
                "file",
                json!({"op": "write", "path": "fifo", "content": "x"}),
                200,
            ),
            &["`file`", "`path`", "not a regular file"],
        );
    }
    for input in [
        json!({"op": "read", "path": "fifo"}),
        json!({"op": "hash", "path": "fifo"}),
        json!({"op": "write", "path": "fifo", "content": "x", "append": true}),
        json!({"op": "read", "path": "sock"}),
        json!({"op": "write", "path": "sock", "content": "x"}),
    ] {
        fails(
            &server,
            &mut agent,
            req("file", input, 2000),
            &["`file`", "not a regular file"],
        );
    }
    // Symlinks: never followed, whatever they point at.
    for input in [
        json!({"op": "read", "path": "out"}),
        json!({"op": "write", "path": "out", "content": "x"}),
        json!({"op": "write", "path": "dangling", "content": "x"}),
    ] {
        fails(
            &server,
            &mut agent,
            req("file", input, 2000),
            &["`file`", "symlink"],
        );
    }
    assert!(!root.join("gone").exists());
    let r = ok(
        &server,
        &mut agent,
        "file",
        json!({"op": "delete", "path": "dangling"}),
    );
    assert_eq!(r["deleted"], true);
    assert!(root.join("dangling").symlink_metadata().is_err());
    ok(
        &server,
        &mut agent,
        "file",
        json!({"op": "delete", "path": "out"}),
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "SECRET"
    );
    // No thread was left behind in an `open` that never returns.
    assert!(
        threads(pid) <= threads_before + 8,
        "{} threads, {threads_before} before",
        threads(pid)
    );
    ok(
        &server,
        &mut agent,
        "file",
        json!({"op": "write", "path": "ok.txt", "content": "fine"}),
    );
    assert!(agent.alive());
}

/// Item 2: appends are capped per file and in total.
#[test]
fn file_appends_are_capped_per_file_and_in_total() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "[plugins.file]\nroot = {}\nmax_file_bytes = 100\nmax_total_bytes = 250\n",
        toml_str(&root)
    );
    let mut agent = Agent::start(dir.path(), "cap-1", &server.broker(), &cfg);
    server.wait_online("cap-1");
    let w = |path: &str, n: usize, append: bool| json!({"op": "write", "path": path, "content": "x".repeat(n), "append": append});
    ok(&server, &mut agent, "file", w("a", 60, true));
    fails(
        &server,
        &mut agent,
        req("file", w("a", 60, true), 5000),
        &["`file`", "max_file_bytes"],
    );
    ok(&server, &mut agent, "file", w("b", 90, false));
    ok(&server, &mut agent, "file", w("c", 90, false));
    fails(
        &server,
        &mut agent,
        req("file", w("d", 90, true), 5000),
        &["`file`", "max_total_bytes"],
    );
    // Rewriting a file counts its new size, not old plus new.
    ok(&server, &mut agent, "file", w("c", 95, false));
    assert_eq!(std::fs::metadata(root.join("a")).unwrap().len(), 60);
    assert!(!root.join("d").exists());
    assert!(agent.alive());
}

/// A heavy transform: 30,000 records, each compared against a list of
/// 40,000 numbers that never match (over a billion comparisons).
fn heavy_transform() -> Value {
    let recs: Vec<Value> = (0..30_000).map(|i| json!({ "a": i })).collect();
    let list: Vec<i64> = (0..40_000).map(|i| 1_000_000 + i).collect();
    json!({"records": recs, "filter": [{"field": "a", "op": "in", "value": list}]})
}

/// Item 3: a task that timed out stops working (no CPU burnt afterwards),
/// and its slot stays taken while its work is still running (an http call
/// the client library cannot interrupt holds its plugin's only slot).
#[test]
fn timed_out_work_stops_and_keeps_its_slot_until_it_ends() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = http_server();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let server = big_server(&dir.path().join("srv"));
    let cfg = "max_concurrency = 8\nqueue_capacity = 32\n\
               [plugins.transform]\nconcurrency = 2\n\
               [plugins.http]\nallow = [\"127.0.0.1\"]\nconcurrency = 1\n";
    let mut agent = Agent::start(dir.path(), "slot-1", &server.broker(), cfg);
    server.wait_online("slot-1");
    let pid = agent_pid("slot-1");

    let input = heavy_transform();
    let ids: Vec<String> = (0..6)
        .map(|_| server.submit(req("transform", input.clone(), 700)))
        .collect();
    for id in &ids {
        let t = wait_alive(&server, &mut agent, id, Duration::from_secs(60));
        assert_eq!(t.state, TaskState::TimedOut, "{:?}", t.error);
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(2));
    let burnt = cpu_secs(pid) - before;
    eprintln!("slots: {burnt:.2} s of agent CPU in the 2 s after six transforms timed out");
    assert!(
        burnt < 0.5,
        "{burnt:.2} s of CPU in the 2 s after every transform had timed out"
    );

    // `a` times out after 300 ms, but its call waits up to 3 s for an
    // answer that never comes; `b`, for the same plugin (concurrency 1),
    // starts only once that call has really ended.
    let a = server.submit(req(
        "http",
        json!({"url": format!("http://127.0.0.1:{silent_port}/"), "timeout_ms": 3000}),
        300,
    ));
    std::thread::sleep(Duration::from_millis(100));
    let b = server.submit(req(
        "http",
        json!({"url": format!("http://127.0.0.1:{port}/x")}),
        30_000,
    ));
    let a = wait_alive(&server, &mut agent, &a, Duration::from_secs(30));
    let b = wait_alive(&server, &mut agent, &b, Duration::from_secs(30));
    assert_eq!(a.state, TaskState::TimedOut, "{:?}", a.error);
    assert_eq!(b.state, TaskState::Succeeded, "{:?}", b.error);
    let waited = b.started_ms.unwrap() - a.started_ms.unwrap();
    eprintln!("slots: the second http task started {waited} ms after the first");
    assert!(
        waited >= 2500,
        "b started {waited} ms after a: a's slot was given away while its call still ran"
    );
    drop(silent);
    assert!(agent.alive());
}

/// Item 3: `hash` is capped by size; SIGTERM ends the agent within its
/// shutdown deadline even while a transform computes and an http call
/// waits on a silent server.
#[test]
fn hash_is_capped_and_sigterm_ends_the_agent_within_its_deadline() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(100 << 30).unwrap();
    drop(sparse);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "[plugins.file]\nroot = {}\n[plugins.transform]\n[plugins.http]\nallow = [\"127.0.0.1\"]\n",
        toml_str(&root)
    );
    let mut agent = Agent::start(dir.path(), "term-1", &server.broker(), &cfg);
    server.wait_online("term-1");
    // Refused by its size, not by the 5 s timeout a read of 100 GiB would
    // end in (that error would not name the key).
    fails(
        &server,
        &mut agent,
        req("file", json!({"op": "hash", "path": "sparse"}), 5000),
        &["`file`", "max_hash_bytes"],
    );

    let pid = agent_pid("term-1");
    let t = server.submit(req("transform", heavy_transform(), 120_000));
    let h = server.submit(req(
        "http",
        json!({"url": format!("http://127.0.0.1:{silent_port}/"), "timeout_ms": 60000}),
        120_000,
    ));
    for id in [&t, &h] {
        let start = Instant::now();
        while server.client.task(id, None).unwrap().started_ms.is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{id} not started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let sent = Instant::now();
    while agent.alive() && sent.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("shutdown: exited {:?} after SIGTERM", sent.elapsed());
    // Without the deadline (5 s) the http call would hold it for 60 s.
    assert!(
        !agent.alive(),
        "still running 20 s after SIGTERM (a blocking call held the runtime)"
    );
    drop(silent);
}

const SH_CMD: &str =
    "[plugins.exec.commands.sh]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"{input.script}\"]\n";

/// Item 4: exec's children die with their task, whether it times out or is
/// cancelled, and the agent stops reading their output.
#[test]
fn exec_children_die_with_their_task() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let server = big_server(&dir.path().join("srv"));
    let mut agent = Agent::start(dir.path(), "kids-1", &server.broker(), SH_CMD);
    server.wait_online("kids-1");
    let pid = agent_pid("kids-1");

    // The agent's task timeout (1 s) comes before exec's own (30 s).
    let t = run(
        &server,
        &mut agent,
        req(
            "exec",
            json!({"command": "sh", "script": "sleep 3011 & sleep 3012 & wait"}),
            1000,
        ),
    );
    assert_eq!(t.state, TaskState::TimedOut, "{:?}", t.error);
    let left = survivors("sleep 301", Duration::from_secs(2));
    kill_all("sleep 301");
    assert!(left.is_empty(), "survived the timeout: {left:?}");

    // Cancelled while running.
    let id = server.submit(req(
        "exec",
        json!({"command": "sh", "script": "sleep 3021 & sleep 3022 & wait"}),
        60_000,
    ));
    let start = Instant::now();
    while procs_with("sleep 3022").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.client.cancel(&id).unwrap();
    let t = wait_alive(&server, &mut agent, &id, Duration::from_secs(30));
    assert_eq!(t.state, TaskState::Cancelled, "{:?}", t.error);
    let left = survivors("sleep 302", Duration::from_secs(2));
    kill_all("sleep 302");
    assert!(left.is_empty(), "survived the cancel: {left:?}");

    // A child flooding stderr: once the task timed out the agent neither
    // runs it nor reads it.
    let t = run(
        &server,
        &mut agent,
        req(
            "exec",
            json!({"command": "sh", "script": "yes >&2 & sleep 3031"}),
            1000,
        ),
    );
    assert_eq!(t.state, TaskState::TimedOut, "{:?}", t.error);
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(2));
    let burnt = cpu_secs(pid) - before;
    let left = survivors("sleep 3031", Duration::from_millis(100));
    kill_all("sleep 3031");
    assert!(left.is_empty(), "survived: {left:?}");
    eprintln!("exec: {burnt:.2} s of agent CPU in the 2 s after a stderr flood timed out");
    assert!(burnt < 0.3, "the agent used {burnt:.2} s of CPU in 2 s");

    // A grandchild in its own session holding stdout open: the command's
    // result still comes back as soon as the command itself exits.
    // (Waiting for the grandchild, it would time out after 10 s.)
    let t = run(
        &server,
        &mut agent,
        req(
            "exec",
            json!({"command": "sh", "script": "setsid sleep 3041 & echo done"}),
            10_000,
        ),
    );
    assert_eq!(t.state, TaskState::Succeeded, "{:?}", t.error);
    assert_eq!(t.result.unwrap()["stdout"], "done\n");
    // Where the agent has a cgroup v2 (this machine), the command's cgroup
    // takes the escaped process with it.
    let escaped = survivors("sleep 3041", Duration::from_secs(2));
    kill_all("sleep 3041");
    if has_cgroup_v2() {
        assert!(
            escaped.is_empty(),
            "a setsid child of exec survived: {escaped:?}"
        );
    } else {
        eprintln!(
            "\n!!!!!!!! SKIPPED exec_children_die_with_their_task (setsid child): no cgroup v2 under /sys/fs/cgroup !!!!!!!!\n"
        );
    }
    assert!(agent.alive());
}

/// Item 5: a filled value starting with `-` is refused whatever its JSON
/// type: `{"path": -1}` used to run `ls -1`.
#[test]
fn exec_values_never_become_options() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("a"), "").unwrap();
    std::fs::write(work.join("b"), "").unwrap();
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "[plugins.exec.commands.ls]\nprogram = \"/bin/ls\"\nargs = [\"{{input.path}}\"]\ncwd = {}\n\
         [plugins.exec.commands.kill]\nprogram = \"/bin/kill\"\nargs = [\"-0\", \"{{input.pid}}\"]\n",
        toml_str(&work)
    );
    let mut agent = Agent::start(dir.path(), "opt-1", &server.broker(), &cfg);
    server.wait_online("opt-1");
    let r = ok(
        &server,
        &mut agent,
        "exec",
        json!({"command": "ls", "path": "."}),
    );
    assert_eq!(r["stdout"], "a\nb\n");
    for input in [
        json!({"command": "ls", "path": -1}),
        json!({"command": "ls", "path": -1.5}),
        json!({"command": "ls", "path": "-l"}),
        json!({"command": "kill", "pid": -1}),
        // strtol skips leading whitespace: `kill -0 " -1"` is kill(-1, 0).
        json!({"command": "kill", "pid": " -1"}),
        json!({"command": "kill", "pid": "\t-1"}),
    ] {
        let field = if input.get("pid").is_some() {
            "`pid`"
        } else {
            "`path`"
        };
        fails(
            &server,
            &mut agent,
            req("exec", input, 5000),
            &["`exec`", field, "must not start with `-`"],
        );
    }
    let r = ok(
        &server,
        &mut agent,
        "exec",
        json!({"command": "kill", "pid": std::process::id()}),
    );
    assert_eq!(r["exit_code"], 0);
    assert!(agent.alive());
}

/// Item 6: a task cannot set the headers that decide where and how its
/// request goes (`host` reached another backend behind a reverse proxy).
#[test]
fn http_task_headers_cannot_steer_the_request() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = http_server();
    let server = big_server(&dir.path().join("srv"));
    let cfg = "[plugins.http]\nallow = [\"127.0.0.1\"]\n";
    let mut agent = Agent::start(dir.path(), "hdr-1", &server.broker(), cfg);
    server.wait_online("hdr-1");
    let url = format!("http://127.0.0.1:{port}/x");
    for (name, value) in [
        ("host", "internal-admin.example:8443"),
        ("Host", "internal-admin.example"),
        ("content-length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("connection", "upgrade"),
    ] {
        fails(
            &server,
            &mut agent,
            req(
                "http",
                json!({"url": url, "method": "POST", "body": "x", "headers": {name: value}}),
                5000,
            ),
            &["`http`", &format!("`headers.{name}`")],
        );
    }
    let r = ok(
        &server,
        &mut agent,
        "http",
        json!({"url": url, "headers": {"x-api-key": "k"}}),
    );
    assert_eq!(r["json"]["headers"]["x-api-key"], "k");
    assert_eq!(r["json"]["headers"]["host"], format!("127.0.0.1:{port}"));
    assert!(agent.alive());
}

const CONTAIN_PY: &str = r#"import json, os, subprocess, sys, threading, time
procs = []
held = None
def answer(m, out):
    print(json.dumps({"type": "result", "id": m["id"], "output": out}), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if held is not None:
        held.set()
        held = None
    if m["type"] == "validate":
        answer(m, True)
        continue
    do = m["input"]["do"]
    if do == "env":
        answer(m, dict(os.environ))
    elif do == "fork":
        for i in range(m["input"]["n"]):
            procs.append(subprocess.Popen(["sleep", "3051"]))
        answer(m, len(procs))
    elif do == "memory":
        code = "x = b'x' * (150 << 20)\nimport time\ntime.sleep(60)"
        for i in range(6):
            procs.append(subprocess.Popen([sys.executable, "-c", code]))
        time.sleep(20)
        answer(m, "all allocated")
    elif do == "setsid":
        subprocess.Popen(["setsid", "sleep", "3061"])
        time.sleep(60)
    elif do == "log":
        print(json.dumps({"type": "log", "level": "warn", "message": "LOGTEST\x1b[2J\rforged line\x07" + "z" * 100000}), flush=True)
        sys.stderr.write("ERRTEST\x1b[31mred\x1b[0m\r" + "q" * 100000 + "\n")
        sys.stderr.flush()
        answer(m, "logged")
    elif do == "hang":
        time.sleep(60)
    elif do == "threads":
        # Threads that live until the next message, so the agent's count
        # at the answer sees them all. Small stacks: RLIMIT_AS
        # (max_memory_mb) counts each thread's reserved stack.
        threading.stack_size(256 << 10)
        held = threading.Event()
        for i in range(m["input"]["n"]):
            threading.Thread(target=held.wait, daemon=True).start()
        answer(m, threading.active_count())
"#;

fn contain_plugin(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("plugins").join("contain");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("contain.py"), CONTAIN_PY).unwrap();
    std::fs::write(
        p.join("plugin.toml"),
        format!(
            "name = \"contain\"\ncommand = \"python3\"\nargs = [\"contain.py\"]\n\
             timeout_ms = 30000\nmax_memory_mb = 256\n{extra}\n\
             [input]\nrequired = [\"do\"]\n"
        ),
    )
    .unwrap();
    p
}

/// Item 7: a process plugin gets a clean environment, cannot take more
/// than its memory or its process count through children, loses children
/// that left its process group, and cannot forge or flood the agent's log.
#[test]
fn process_plugins_are_contained() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let p = contain_plugin(dir.path(), "");
    let server = big_server(&dir.path().join("srv"));
    let log = dir.path().join("agent.log");
    let redirect = format!("exec \"$0\" \"$@\" 2>>{}", log.display());
    let prefix = [
        "env",
        "OPENCLAW_TEST_SECRET=hunter2",
        "sh",
        "-c",
        redirect.as_str(),
    ];
    let cfg = format!("[plugins.process]\ndirs = [{}]\n", toml_str(&p));
    let mut agent = Agent::start_with(dir.path(), "cont-1", &server.broker(), &cfg, &prefix);
    server.wait_online("cont-1");

    let env = ok(&server, &mut agent, "contain", json!({"do": "env"}));
    let names: Vec<&String> = env.as_object().unwrap().keys().collect();
    assert!(
        env.get("OPENCLAW_TEST_SECRET").is_none(),
        "the agent's environment leaked: {names:?}"
    );
    assert!(
        env.get("PATH").is_some() && env.get("HOME").is_some(),
        "{names:?}"
    );
    assert!(env.get("RUST_LOG").is_none(), "{names:?}");

    // A fork bomb, bounded for the test's sake: 200 children against the
    // default limit of 64 processes.
    fails(
        &server,
        &mut agent,
        req("contain", json!({"do": "fork", "n": 200}), 20_000),
        &["`contain`", "max_processes"],
    );
    let left = survivors("sleep 3051", Duration::from_secs(3));
    kill_all("sleep 3051");
    assert!(left.is_empty(), "{} children survived", left.len());

    // Six children of 150 MB each against max_memory_mb = 256.
    fails(
        &server,
        &mut agent,
        req("contain", json!({"do": "memory"}), 25_000),
        &["`contain`", "max_memory_mb"],
    );

    // A child in its own session, the task timing out.
    let t = run(
        &server,
        &mut agent,
        req("contain", json!({"do": "setsid"}), 1500),
    );
    assert_eq!(t.state, TaskState::TimedOut, "{:?}", t.error);
    let left = survivors("sleep 3061", Duration::from_secs(3));
    kill_all("sleep 3061");
    // Only a cgroup holds a child that left the process group (the agent
    // says at start which applies); without one, that is the documented
    // fallback, and this check says it did not run.
    if has_cgroup_v2() {
        assert!(left.is_empty(), "a setsid child survived: {left:?}");
    } else {
        eprintln!(
            "\n!!!!!!!! SKIPPED process_plugins_are_contained (setsid child): no cgroup v2 under /sys/fs/cgroup; survivors {left:?} !!!!!!!!\n"
        );
    }

    // Control characters and floods in the log.
    ok(&server, &mut agent, "contain", json!({"do": "log"}));
    std::thread::sleep(Duration::from_millis(500));
    let text = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("LOGTEST") || l.contains("ERRTEST"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(
            !l.chars().any(|c| c.is_control()),
            "control characters in: {:?}",
            &l[..l.len().min(200)]
        );
        assert!(l.len() < 2500, "a log line of {} bytes", l.len());
    }
    assert!(agent.alive());
}

/// Item 7: the manifest adds variables, and sets the process limit; the
/// error says which mechanism enforced it.
#[test]
fn process_plugin_manifest_env_and_process_limit() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let p = contain_plugin(
        dir.path(),
        "max_processes = 8\n[env]\nPLUGIN_MODE = \"test\"",
    );
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!("[plugins.process]\ndirs = [{}]\n", toml_str(&p));
    let mut agent = Agent::start(dir.path(), "cont-2", &server.broker(), &cfg);
    server.wait_online("cont-2");
    let env = ok(&server, &mut agent, "contain", json!({"do": "env"}));
    assert_eq!(env["PLUGIN_MODE"], "test");
    let r = ok(
        &server,
        &mut agent,
        "contain",
        json!({"do": "fork", "n": 3}),
    );
    assert_eq!(r, json!(3));
    let t = fails(
        &server,
        &mut agent,
        req("contain", json!({"do": "fork", "n": 20}), 20_000),
        &["`contain`", "max_processes (8)"],
    );
    let e = t.error.unwrap();
    assert!(e.contains("pids.max") || e.contains("counted"), "{e}");
    let left = survivors("sleep 3051", Duration::from_secs(3));
    kill_all("sleep 3051");
    assert!(left.is_empty(), "{} children survived", left.len());
    assert!(agent.alive());
}

/// Item 8: the default caps leave room for the result's envelope and
/// base64 under the MQTT payload limit: a capped response comes back
/// `truncated`, a file at the cap comes back; and a process plugin's
/// timeout names the deadline that expired.
#[test]
fn default_caps_fit_in_a_result_and_timeouts_name_their_deadline() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let port = http_server();
    let p = contain_plugin(dir.path(), "");
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "[plugins.http]\nallow = [\"127.0.0.1\"]\n[plugins.file]\nroot = {}\n\
         [plugins.process]\ndirs = [{}]\n",
        toml_str(&root),
        toml_str(&p)
    );
    let mut agent = Agent::start(dir.path(), "caps-1", &server.broker(), &cfg);
    server.wait_online("caps-1");
    for path in ["big-text", "big-bin"] {
        let r = ok(
            &server,
            &mut agent,
            "http",
            json!({"url": format!("http://127.0.0.1:{port}/{path}")}),
        );
        assert_eq!(r["truncated"], true, "{path}");
        assert_eq!(r["status"], 200);
    }
    for size in [500_000usize, 1 << 20] {
        std::fs::write(root.join("blob"), vec![0xa5u8; size]).unwrap();
        let t = run(
            &server,
            &mut agent,
            req(
                "file",
                json!({"op": "read", "path": "blob", "encoding": "base64"}),
                30_000,
            ),
        );
        let e = t.error.clone().unwrap_or_default();
        match t.state {
            TaskState::Succeeded => {
                assert_eq!(t.result.unwrap()["size"], size, "{size}");
            }
            _ => assert!(
                e.contains("max_read_bytes") && !e.contains("payload limit"),
                "{size}: {e}"
            ),
        }
    }
    // The task's deadline (1 s) expires long before the manifest's 30 s.
    let t = run(
        &server,
        &mut agent,
        req("contain", json!({"do": "hang"}), 1000),
    );
    let e = t.error.clone().unwrap_or_default();
    assert!(!e.contains("30000"), "names the manifest's timeout: {e}");
    assert!(e.contains("1000 ms"), "{e}");
    assert!(agent.alive());
}

// The review of issue 16's fixes: holes found afterwards, each through a
// real agent.

/// Peak resident memory of a process (VmHWM), bytes.
fn peak_rss(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb << 10
}

/// Review 1: CSV output is budgeted while it is built. 12,000 records with
/// a field each of its own (150 KB of input, 1.4 MB of records) make a CSV
/// of 12,000 x 12,000 cells (144 MB) that can never come back: it fails
/// at the result limit, naming it, without building it.
#[test]
fn transform_csv_output_is_budgeted_as_it_is_built() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let server = big_server(&dir.path().join("srv"));
    let mut agent = Agent::start(
        dir.path(),
        "csv-1",
        &server.broker(),
        "[plugins.transform]\n",
    );
    server.wait_online("csv-1");
    let pid = agent_pid("csv-1");
    // Warm up (the first task's allocations), then measure.
    ok(
        &server,
        &mut agent,
        "transform",
        json!({"records": [{"a": 1}], "format": "csv"}),
    );
    let before = peak_rss(pid);
    let recs: Vec<Value> = (0..12_000).map(|i| json!({ format!("k{i}"): 1 })).collect();
    let t = fails(
        &server,
        &mut agent,
        req(
            "transform",
            json!({"records": recs, "format": "csv"}),
            60_000,
        ),
        &["`transform`", "`csv`", "max_output_bytes (1048576"],
    );
    let after = peak_rss(pid);
    eprintln!("csv bomb: peak RSS grew by {} KiB", (after - before) >> 10);
    assert!(
        after < before + (48 << 20),
        "peak RSS grew by {} MiB: the CSV was built ({:?})",
        (after - before) >> 20,
        t.error
    );
    // A CSV that fits still comes back.
    let r = ok(
        &server,
        &mut agent,
        "transform",
        json!({"records": [{"a": 1, "b": "x,y"}, {"a": 2}], "format": "csv"}),
    );
    assert_eq!(r["csv"], "a,b\n1,\"x,y\"\n2,\n");
    assert!(agent.alive());
}

/// Review 2: a JSON response just under `max_response_bytes` comes back
/// (once, as `json`, not also as `body`); one that would take more room
/// parsed than its text (a long list of floats) comes back as `body`.
#[test]
fn http_json_under_the_cap_comes_back_once() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = http_server();
    let server = big_server(&dir.path().join("srv"));
    let cfg = "[plugins.http]\nallow = [\"127.0.0.1\"]\n";
    let mut agent = Agent::start(dir.path(), "json-1", &server.broker(), cfg);
    server.wait_online("json-1");
    let r = ok(
        &server,
        &mut agent,
        "http",
        json!({"url": format!("http://127.0.0.1:{port}/json-near-cap")}),
    );
    assert_eq!(r["truncated"], false);
    assert_eq!(
        r["json"]["data"].as_str().map(str::len),
        Some(DEFAULT_RESPONSE_CAP - 2000)
    );
    assert!(r.get("body").is_none(), "the JSON came back twice");
    let r = ok(
        &server,
        &mut agent,
        "http",
        json!({"url": format!("http://127.0.0.1:{port}/json-floats")}),
    );
    assert_eq!(r["truncated"], false);
    assert!(r.get("json").is_none());
    assert_eq!(
        r["body"].as_str().map(str::len),
        Some(json_floats().len()),
        "the floats come back as text"
    );
    // Small JSON is still parsed.
    let r = ok(
        &server,
        &mut agent,
        "http",
        json!({"url": format!("http://127.0.0.1:{port}/echo")}),
    );
    assert_eq!(r["json"]["request"], "GET /echo HTTP/1.1");
    assert!(agent.alive());
}

/// Review 3: `list` of a folder whose entries take more than a result
/// (10,000 names of 200 bytes: about 2.4 MB) comes back cut, `truncated`.
#[test]
fn file_list_is_bounded_in_bytes() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let many = root.join("many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..10_000 {
        std::fs::File::create(many.join(format!("{i:05}{}", "n".repeat(195)))).unwrap();
    }
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!("[plugins.file]\nroot = {}\n", toml_str(&root));
    let mut agent = Agent::start(dir.path(), "list-1", &server.broker(), &cfg);
    server.wait_online("list-1");
    let r = ok(
        &server,
        &mut agent,
        "file",
        json!({"op": "list", "path": "many"}),
    );
    assert_eq!(r["truncated"], true);
    let n = r["entries"].as_array().unwrap().len();
    assert!(n > 1000 && n < 10_000, "{n} entries");
    assert!(
        r.to_string().len() < 1 << 20,
        "{} bytes",
        r.to_string().len()
    );
    // A small folder is listed whole.
    let r = ok(&server, &mut agent, "file", json!({"op": "list"}));
    assert_eq!(r["truncated"], false);
    assert_eq!(r["entries"][0]["name"], "many");
    assert!(agent.alive());
}

/// Installs a seccomp filter that fails `openat2` with errno `$1`, then
/// execs the rest of its arguments: an agent in a container whose
/// seccomp profile refuses the call (EPERM, Docker before 20.10) or a
/// kernel that refuses its flags (EINVAL).
const NO_OPENAT2_PY: &str = r#"import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class F(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class P(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(F))]
errno = int(sys.argv[1])
prog = (F * 4)(
    F(0x20, 0, 0, 0),                    # A = syscall number
    F(0x15, 0, 1, 437),                  # openat2?
    F(0x06, 0, 0, 0x00050000 | errno),   # SECCOMP_RET_ERRNO | errno
    F(0x06, 0, 0, 0x7fff0000),           # SECCOMP_RET_ALLOW
)
fprog = P(4, prog)
u = ctypes.c_ulong
assert libc.prctl(38, u(1), u(0), u(0), u(0)) == 0, "PR_SET_NO_NEW_PRIVS"
assert libc.prctl(22, u(2), ctypes.byref(fprog), u(0), u(0)) == 0, "PR_SET_SECCOMP"
os.execv(sys.argv[2], sys.argv[2:])
"#;

/// Review 4: where `openat2` fails with EPERM (a seccomp filter) or EINVAL,
/// the file plugin resolves paths with its component walk, which keeps
/// every guarantee: tasks work, symlinks and `..` are still refused.
#[test]
fn file_without_openat2_uses_the_safe_walk() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "SECRET").unwrap();
    std::fs::write(root.join("sub/in.txt"), "inside").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("out")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("outdir")).unwrap();
    let script = dir.path().join("no_openat2.py");
    std::fs::write(&script, NO_OPENAT2_PY).unwrap();
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!("[plugins.file]\nroot = {}\n", toml_str(&root));
    for (errno, id) in [(libc::EPERM, "noat2-eperm"), (libc::EINVAL, "noat2-einval")] {
        let errno = errno.to_string();
        let prefix = ["python3", script.to_str().unwrap(), errno.as_str()];
        let mut agent = Agent::start_with(dir.path(), id, &server.broker(), &cfg, &prefix);
        server.wait_online(id);
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent_pid(id))).unwrap();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "the agent runs without the filter"
        );
        let r = ok(
            &server,
            &mut agent,
            "file",
            json!({"op": "read", "path": "sub/in.txt"}),
        );
        assert_eq!(r["content"], "inside", "{id}");
        ok(
            &server,
            &mut agent,
            "file",
            json!({"op": "write", "path": format!("sub/{id}"), "content": "w"}),
        );
        assert_eq!(
            std::fs::read_to_string(root.join("sub").join(id)).unwrap(),
            "w"
        );
        let r = ok(
            &server,
            &mut agent,
            "file",
            json!({"op": "list", "path": "sub"}),
        );
        let names: Vec<&str> = r["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(
            names.contains(&"in.txt") && names.contains(&id),
            "{names:?}"
        );
        for input in [
            json!({"op": "read", "path": "out"}),
            json!({"op": "read", "path": "outdir/secret"}),
            json!({"op": "write", "path": "outdir/new", "content": "x"}),
            json!({"op": "list", "path": "outdir"}),
        ] {
            fails(
                &server,
                &mut agent,
                req("file", input, 5000),
                &["`file`", "`path`", "symlink"],
            );
        }
        fails(
            &server,
            &mut agent,
            req(
                "file",
                json!({"op": "read", "path": "sub/../../outside/secret"}),
                5000,
            ),
            &["`file`", "`path`", "plain relative path"],
        );
        assert!(!outside.join("new").exists());
        assert!(agent.alive());
    }
}

/// Review 5: the walk that measures the root for `max_total_bytes` looks at
/// 200,000 entries at most. With more, the total cannot be known: a write
/// that grows the root is refused, naming the limit, instead of counted
/// against an under-count. Here 200,100 files of 1000 bytes (sparse) hold
/// 200,100,000 bytes against max_total_bytes = 200,050,000; a walk that
/// stops at 200,000 entries sees 200,000,000 and would allow more.
#[test]
fn file_total_size_walk_fails_closed_past_its_entry_limit() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..200_100 {
        let f = std::fs::File::create(root.join(format!("f{i}"))).unwrap();
        f.set_len(1000).unwrap();
    }
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "[plugins.file]\nroot = {}\nmax_total_bytes = 200050000\n",
        toml_str(&root)
    );
    let mut agent = Agent::start(dir.path(), "walk-1", &server.broker(), &cfg);
    server.wait_online("walk-1");
    fails(
        &server,
        &mut agent,
        req(
            "file",
            json!({"op": "write", "path": "new", "content": "0123456789"}),
            60_000,
        ),
        &["`file`", "max_total_bytes", "200000 entries"],
    );
    assert!(!root.join("new").exists());
    // What does not grow the root still works.
    let r = ok(
        &server,
        &mut agent,
        "file",
        json!({"op": "read", "path": "f7"}),
    );
    assert_eq!(r["size"], 1000);
    ok(
        &server,
        &mut agent,
        "file",
        json!({"op": "delete", "path": "f7"}),
    );
    assert!(agent.alive());
}

/// Review 6: `max_processes` counts processes, not threads; the kernel's
/// `pids.max` (which counts threads) gets `max_threads`. A plugin running
/// 30 threads in one process is within max_processes = 8 (the pyenv shim
/// that starts python3 runs a few processes itself); 60 threads against
/// max_threads = 40 are stopped, naming that limit.
#[test]
fn process_plugin_threads_are_not_processes() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let p = contain_plugin(dir.path(), "max_processes = 8\nmax_threads = 40");
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!("[plugins.process]\ndirs = [{}]\n", toml_str(&p));
    let mut agent = Agent::start(dir.path(), "thr-1", &server.broker(), &cfg);
    server.wait_online("thr-1");
    let r = ok(
        &server,
        &mut agent,
        "contain",
        json!({"do": "threads", "n": 30}),
    );
    assert_eq!(r, json!(31));
    // Another answer from the same process: it was not killed.
    let r = ok(
        &server,
        &mut agent,
        "contain",
        json!({"do": "fork", "n": 0}),
    );
    assert_eq!(r, json!(0));
    let t = fails(
        &server,
        &mut agent,
        req("contain", json!({"do": "threads", "n": 60}), 20_000),
        &["`contain`", "max_threads (40)"],
    );
    let e = t.error.unwrap();
    assert!(e.contains("pids.max") || e.contains("counted"), "{e}");
    assert!(agent.alive());
}

/// An agent whose journal refuses every write (its file size limit set to
/// 0 from outside: each append fails with EFBIG) just as a queued `exec`
/// task, which appends `ran` to `count` each time it runs, would start,
/// and the blocker before it (which appends `blocker`) ends.
struct Unrecordable {
    server: Server,
    agent: Agent,
    peer: MqttPeer,
    pid: i32,
    waiting: String,
    count: PathBuf,
    cfg: String,
}

impl Unrecordable {
    const ID: &'static str = "start-1";

    fn start(dir: &Path) -> Unrecordable {
        let fifo = dir.join("go");
        let count = dir.join("count");
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let server = big_server(&dir.join("srv"));
        let cfg = format!(
            // Still in the [agent] table the harness writes.
            "max_concurrency = 1\n\
             [plugins.exec.commands.wait]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"echo blocker >> {1}; read x < {0}\"]\n\
             [plugins.exec.commands.count]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"echo ran >> {1}\"]\n",
            fifo.display(),
            count.display()
        );
        let agent = Self::agent(dir, &server, &cfg);
        server.wait_online(Self::ID);
        let pid = agent_pid(Self::ID);
        let peer = MqttPeer::connect(
            server.mqtt_port,
            "start-peer",
            &[&topics::results(Self::ID)],
        );
        let blocker = server.submit(req("exec", json!({"command": "wait"}), 60_000));
        // The blocker runs (its reader has the FIFO open), then the next task
        // waits for its slot: accepted, in the agent's queue.
        let mut go = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let waiting = server.submit(req("exec", json!({"command": "count"}), 60_000));
        server.wait_devices("the count task queued on the agent", |d| {
            d.iter().any(|d| d.id == Self::ID && d.queued == 1)
        });
        let u = Unrecordable {
            server,
            agent,
            peer,
            pid,
            waiting,
            count,
            cfg,
        };
        u.set_fsize(0);
        writeln!(go, "go").unwrap();
        drop(go);
        let b = u.server.wait(&blocker);
        assert_eq!(b.state, TaskState::Succeeded, "{:?}", b.error);
        // The blocker's `Finished`, the waiting task's `Started` and its
        // `Released` all failed; nothing runs and nothing else is queued.
        u.server
            .wait_devices("the count task parked on the agent", |d| {
                d.iter().any(|d| {
                    d.id == Self::ID
                        && d.running == 0
                        && d.queued == 1
                        && d.storage.write_errors >= 3
                })
            });
        u
    }

    fn agent(dir: &Path, server: &Server, cfg: &str) -> Agent {
        // SIGXFSZ ignored (inherited through exec): a write past the limit
        // fails with EFBIG instead of killing the agent.
        let prefix = ["sh", "-c", "trap '' XFSZ; exec \"$0\" \"$@\""];
        Agent::start_with(dir, Self::ID, &server.broker(), cfg, &prefix)
    }

    fn set_fsize(&self, limit: u64) {
        let l = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(
            unsafe { libc::prlimit(self.pid, libc::RLIMIT_FSIZE, &l, std::ptr::null_mut()) },
            0
        );
    }

    /// How often the task ran, and whether the agent said it started or
    /// handed it back, as seen on its results topic so far.
    fn seen(&self) -> (usize, bool, bool) {
        let (runs, started, rejected, _) = self.seen_all();
        (runs, started, rejected)
    }

    /// [`Unrecordable::seen`], and how often the blocker ran.
    fn seen_all(&self) -> (usize, bool, bool, usize) {
        let (mut started, mut rejected) = (false, false);
        while let Ok(p) = self.peer.rx.recv_timeout(Duration::from_millis(300)) {
            match protocol::decode::<FromAgent>(&p.payload, 1 << 20) {
                Ok(FromAgent::Started { task_id }) => started |= task_id == self.waiting,
                Ok(FromAgent::Rejected { task_id, .. }) => rejected |= task_id == self.waiting,
                _ => {}
            }
        }
        let lines = std::fs::read_to_string(&self.count).unwrap_or_default();
        let n = |what: &str| lines.lines().filter(|l| *l == what).count();
        (n("ran"), started, rejected, n("blocker"))
    }
}

/// Review 7 and its full-disk case: a task whose `Started` record cannot be
/// written is not run (after a crash nobody would know it had been running,
/// and the crash quarantine would not hold it). When its `Released` record
/// cannot be written either, it is not handed back: the server would give
/// it up or re-queue it, and the agent, finding it accepted on disk, ran it
/// again at the next start. It waits, runs once when the disk is back, and
/// not again after a restart.
#[test]
fn a_task_whose_start_cannot_be_recorded_waits_and_runs_once() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut u = Unrecordable::start(dir.path());
    let (runs, started, rejected) = u.seen();
    assert_eq!(
        (runs, started, rejected),
        (0, false, false),
        "ran or handed back without a record of it"
    );
    let t = u.server.client.task(&u.waiting, None).unwrap();
    assert!(
        !t.state.is_terminal(),
        "given up while parked: {:?}",
        t.state
    );
    assert!(u.agent.alive());
    // The disk back, the parked task runs, once, and then everything else.
    u.set_fsize(libc::RLIM_INFINITY);
    let t = u.server.wait(&u.waiting);
    assert_eq!(t.state, TaskState::Succeeded, "{:?}", t.error);
    let (runs, _, rejected) = u.seen();
    assert_eq!((runs, rejected), (1, false));
    // Nothing of it is left to run at the next start: handed back
    // without a record, it ran again here after the server had failed it.
    u.agent.stop();
    u.agent = Unrecordable::agent(dir.path(), &u.server, &u.cfg);
    u.server.wait_online(Unrecordable::ID);
    let r = ok(&u.server, &mut u.agent, "echo", json!({"y": 2}));
    assert_eq!(r, json!({"y": 2}));
    // Nor is the blocker, whose `Finished` record the full disk refused
    // (its result was sent anyway): the snapshot written when the disk
    // came back holds it as done.
    let (runs, _, _, blocker) = u.seen_all();
    assert_eq!(
        (runs, blocker),
        (1, 1),
        "ran again after a restart (task, blocker)"
    );
}

// ---------------------------------------------------------------------
// Review of the parked-task change (243a317): findings, each a test that
// fails today (ignored, so the branch builds and the suite stays green).
// ---------------------------------------------------------------------

/// Sets the file size limit of process `pid` (EFBIG past it; the agents
/// here ignore SIGXFSZ).
fn set_fsize_of(pid: i32, limit: u64) {
    let l = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &l, std::ptr::null_mut()) },
        0
    );
}

/// Whether a cgroup v2 hierarchy is mounted where the agent looks for one.
fn has_cgroup_v2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.procs").exists()
        || std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
}

/// Polls `pred` every 50 ms for up to `limit`, failing with `what`.
fn poll(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < limit, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines_of(path: &Path, what: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == what)
        .count()
}

const XFSZ_IGNORED: [&str; 3] = ["sh", "-c", "trap '' XFSZ; exec \"$0\" \"$@\""];

/// An agent (max_concurrency 1, SIGXFSZ ignored) whose `blocker` exec task
/// appends `blocker` to `count` and then waits for the file `go`; the disk
/// (RLIMIT_FSIZE 0) fails while it runs, and it then finishes: its
/// `Finished` and `Acked` records are refused. Returns once both were.
struct RefusedFinish {
    server: Server,
    agent: Agent,
    pid: i32,
    count: PathBuf,
    cfg: String,
}

impl RefusedFinish {
    const ID: &'static str = "refused-1";

    /// After the agent stopped (`after` says how): once the server has
    /// seen it go (a task submitted before its goodbye or last will went to
    /// the old process and was re-queued when the news came), starts it
    /// again, runs a task behind anything replayed (max_concurrency 1), and
    /// checks that the blocker, finished and confirmed, did not run again.
    fn restart_and_check(&mut self, dir: &Path, after: &str) {
        self.server.wait_devices("the agent offline", |d| {
            d.iter().any(|d| d.id == Self::ID && !d.online)
        });
        self.agent = Agent::start_with(
            dir,
            Self::ID,
            &self.server.broker(),
            &self.cfg,
            &XFSZ_IGNORED,
        );
        self.server.wait_online(Self::ID);
        let v = ok(
            &self.server,
            &mut self.agent,
            "echo",
            json!({"after": after}),
        );
        assert_eq!(v, json!({"after": after}));
        assert_eq!(
            lines_of(&self.count, "blocker"),
            1,
            "the blocker, finished and confirmed, ran again after {after}"
        );
    }

    fn start(dir: &Path) -> RefusedFinish {
        let count = dir.join("count");
        let go = dir.join("go");
        let server = big_server(&dir.join("srv"));
        let cfg = format!(
            "max_concurrency = 1\n\
             [plugins.exec.commands.blocker]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"echo blocker >> {0}; while [ ! -e {1} ]; do sleep 0.05; done\"]\n",
            count.display(),
            go.display()
        );
        let agent = Agent::start_with(dir, Self::ID, &server.broker(), &cfg, &XFSZ_IGNORED);
        server.wait_online(Self::ID);
        let pid = agent_pid(Self::ID);
        let blocker = server.submit(req("exec", json!({"command": "blocker"}), 60_000));
        // Running: its `Accepted` and `Started` records are on disk.
        poll("the blocker running", Duration::from_secs(30), || {
            lines_of(&count, "blocker") == 1
        });
        set_fsize_of(pid, 0);
        std::fs::write(&go, b"").unwrap();
        let b = server.wait(&blocker);
        assert_eq!(b.state, TaskState::Succeeded, "{:?}", b.error);
        // Its `Finished` and (after the server's confirmation) `Acked`
        // refused. (Before the probe, catch-up snapshots were tried here
        // at +0, +1, +2, +4, +8 s, the next 16 s away; now none is tried
        // while the probe write fails.)
        server.wait_devices("the Finished and Acked records refused", |d| {
            d.iter()
                .any(|d| d.id == Self::ID && d.storage.write_errors >= 2)
        });
        RefusedFinish {
            server,
            agent,
            pid,
            count,
            cfg,
        }
    }
}

/// Review finding (high): the catch-up snapshot is only written by the
/// tick's back-off (up to 30 s after the disk is back), and not at all on a
/// graceful stop. The natural sequence "disk full; the operator frees space
/// and restarts the service" therefore loses the refused `Finished`: the
/// restarted agent finds the task accepted and started but not finished,
/// and runs it again although the server has had (and confirmed) its result
/// for a while. The same holds for a SIGKILL (or power cut) in the back-off
/// window after the disk is back. Expected: on a stop, when records were
/// refused (`write_errors > errors_covered`), try the snapshot first (and
/// ideally retry soon after an error, not on the parked back-off).
#[test]
fn a_finished_task_is_not_run_again_after_a_stop_once_the_disk_is_back() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut r = RefusedFinish::start(dir.path());
    // The disk is back, and the agent stops at once (before or after its
    // tick noticed: the stop writes the snapshot too).
    set_fsize_of(r.pid, libc::RLIM_INFINITY);
    r.agent.stop();
    r.restart_and_check(dir.path(), "a stop");
}

/// Review finding (medium; same root cause as the test above): the disk
/// is back, but the agent notices only at the next catch-up attempt of the
/// parked back-off, up to 30 s later (here at least 16 s). A SIGKILL (or a
/// power cut, an OOM kill) in that window runs the finished and confirmed
/// task again at the next start. Expected: a refused record is caught up
/// within a tick or so of the disk taking writes again (probe cheaply, or
/// keep the back-off short while nothing is parked).
#[test]
fn a_finished_task_is_not_run_again_after_a_kill_once_the_disk_is_back() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut r = RefusedFinish::start(dir.path());
    set_fsize_of(r.pid, libc::RLIM_INFINITY);
    // Several ticks with the disk back (statuses every 300 ms).
    let (beats, last) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    r.server
        .wait_devices("ten heartbeats with the disk back", |d| {
            if let Some(d) = d.iter().find(|d| d.id == RefusedFinish::ID) {
                if d.last_heartbeat_ms != last.get() {
                    last.set(d.last_heartbeat_ms);
                    beats.set(beats.get() + 1);
                }
            }
            beats.get() >= 10
        });
    r.agent.kill();
    r.restart_and_check(dir.path(), "a kill with the disk back for 3 s");
}

/// Review finding (high, lost task): when a parked task was handed back on
/// a retry (its `Started` refused, its `Released` written), the tasks
/// queued behind it never started: `retry_parked` called `launch_waiting`
/// only when the retry ended with no write error. It now does whenever the
/// parked tasks are gone. That exact case needs the disk to fill again
/// between two writes (a retry now waits for the probe and a catch-up
/// snapshot first); what this runs is the rest of it: a parked task with
/// one queued behind it, both run when the disk is back, the parked one
/// once.
#[test]
fn a_parked_task_and_the_queue_behind_it_run_when_the_disk_is_back() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    const ID: &str = "stall-1";
    let fifo = dir.path().join("go");
    let count = dir.path().join("count");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "max_concurrency = 1\n\
         [plugins.exec.commands.wait]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"read x < {0}\"]\n\
         [plugins.exec.commands.count]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"echo ran >> {1}\"]\n",
        fifo.display(),
        count.display()
    );
    let mut agent = Agent::start_with(dir.path(), ID, &server.broker(), &cfg, &XFSZ_IGNORED);
    server.wait_online(ID);
    let pid = agent_pid(ID);
    let blocker = server.submit(req("exec", json!({"command": "wait"}), 60_000));
    let mut go = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    // `w` will be parked and then handed back; `x` waits behind it.
    let w = server.submit(req("exec", json!({"command": "count"}), 60_000));
    let x = server.submit(req("echo", json!({"x": 1}), 120_000));
    server.wait_devices("two tasks queued behind the blocker", |d| {
        d.iter()
            .any(|d| d.id == ID && d.running == 1 && d.queued == 2)
    });
    set_fsize_of(pid, 0);
    writeln!(go, "go").unwrap();
    drop(go);
    let b = server.wait(&blocker);
    assert_eq!(b.state, TaskState::Succeeded, "{:?}", b.error);
    // The blocker's `Finished` and `Acked`, `w`'s `Started` and `Released`
    // refused: `w` is parked.
    server.wait_devices("w parked", |d| {
        d.iter()
            .any(|d| d.id == ID && d.running == 0 && d.queued == 2 && d.storage.write_errors >= 4)
    });
    assert_eq!(lines_of(&count, "ran"), 0);
    // The disk fully back: `w` runs once, and `x` behind it.
    set_fsize_of(pid, libc::RLIM_INFINITY);
    for (name, id) in [("w", &w), ("x", &x)] {
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Succeeded, "{name}: {:?}", t.error);
    }
    assert_eq!(lines_of(&count, "ran"), 1);
    assert!(agent.alive());
}

/// Review finding (medium, documented only for crashes): a graceful stop
/// while a task is parked says goodbye, so the server takes the task back
/// (here it fails it: one attempt), and "hands it back" in the journal with
/// a `Released` record that the full disk refuses, exactly the hand-back
/// without a durable record that the change set out to remove. The
/// restarted agent (disk fine) finds it accepted and runs it, after the
/// server has failed it. The goodbye comment in `Agent::run` ("the journal
/// hands those tasks back rather than running them again") is not true for
/// parked tasks; docs/plugins.md only mentions a crash.
#[test]
#[ignore = "known, documented: a stop while the disk refuses records is a crash for a parked task (docs/plugins.md)"]
fn a_task_parked_at_a_graceful_stop_does_not_run_after_the_server_gave_it_up() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut u = Unrecordable::start(dir.path());
    u.agent.stop();
    let t = u.server.wait(&u.waiting);
    assert_eq!(t.state, TaskState::Failed, "{:?}", t.error);
    // The disk is fine for the new process (a new rlimit).
    u.agent = Unrecordable::agent(dir.path(), &u.server, &u.cfg);
    u.server.wait_online(Unrecordable::ID);
    let r = ok(&u.server, &mut u.agent, "echo", json!({"y": 3}));
    assert_eq!(r, json!({"y": 3}));
    let (runs, _, _, _) = u.seen_all();
    assert_eq!(
        runs, 0,
        "the parked task ran after the restart although the server had failed it ({:?})",
        t.error
    );
}

/// Review finding (high; root cause of
/// `a_finished_task_is_not_run_again_after_a_stop_once_the_disk_is_back`,
/// worse symptom): a parked task that the server cancels is finished as
/// cancelled and not run while the agent lives (this part holds), but its
/// `Finished` is refused, and the disk coming back is noticed only at the
/// next catch-up attempt of the back-off (here at least 16 s away). A task
/// accepted, run and recorded in between proves the journal takes records
/// again; a graceful stop then, and the restarted agent runs the task the
/// server cancelled, and the blocker (finished and confirmed) once more.
/// (Found by accident: the first version of this test did not wait for the
/// back-off and failed the same way.)
#[test]
fn a_parked_task_cancelled_is_not_run_then_or_after_a_restart() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut u = Unrecordable::start(dir.path());
    u.server.client.cancel(&u.waiting).unwrap();
    let t = u.server.wait(&u.waiting);
    assert_eq!(t.state, TaskState::Cancelled, "{:?}", t.error);
    // The cancel's `Finished` refused too (blocker's `Finished`, the
    // task's `Started` and `Released`, its `Finished`).
    u.server.wait_devices("the cancel's record refused", |d| {
        d.iter()
            .any(|d| d.id == Unrecordable::ID && d.storage.write_errors >= 4)
    });
    u.set_fsize(libc::RLIM_INFINITY);
    let r = ok(&u.server, &mut u.agent, "echo", json!({"c": 1}));
    assert_eq!(r, json!({"c": 1}));
    let (runs, started, _, blocker) = u.seen_all();
    assert_eq!(
        (runs, started, blocker),
        (0, false, 1),
        "while the agent lives"
    );
    u.agent.stop();
    u.agent = Unrecordable::agent(dir.path(), &u.server, &u.cfg);
    u.server.wait_online(Unrecordable::ID);
    let r = ok(&u.server, &mut u.agent, "echo", json!({"c": 2}));
    assert_eq!(r, json!({"c": 2}));
    let (runs, started, _, blocker) = u.seen_all();
    assert_eq!(
        (runs, started, blocker),
        (0, false, 1),
        "after the restart: (runs of the cancelled task, its Started seen, blocker runs)"
    );
}

/// Review of 243a317, held: a suspect (running at a SIGKILL) restarted on
/// a full disk is parked, not run; when the disk is back it runs once,
/// alone, and is not run a third time after another kill.
#[test]
fn a_parked_suspect_runs_once_alone_when_the_disk_is_back() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    const ID: &str = "psus-1";
    let count = dir.path().join("count");
    let go = dir.path().join("go");
    let server = big_server(&dir.path().join("srv"));
    let cfg = format!(
        "max_concurrency = 2\n\
         [plugins.exec.commands.slow]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"echo ran >> {0}; while [ ! -e {1} ]; do sleep 0.05; done\"]\n",
        count.display(),
        go.display()
    );
    let mut agent = Agent::start_with(dir.path(), ID, &server.broker(), &cfg, &XFSZ_IGNORED);
    server.wait_online(ID);
    let mut r = req("exec", json!({"command": "slow"}), 120_000);
    r.max_attempts = Some(5);
    let s = server.submit(r);
    poll("the task running", Duration::from_secs(30), || {
        lines_of(&count, "ran") == 1
    });
    agent.kill();
    // Restarted with every journal write failing from the start.
    let full = [
        "sh",
        "-c",
        "trap '' XFSZ; ulimit -S -f 0; exec \"$0\" \"$@\"",
    ];
    let mut agent = Agent::start_with(dir.path(), ID, &server.broker(), &cfg, &full);
    server.wait_devices("the suspect parked", |d| {
        d.iter().any(|d| {
            d.id == ID && d.online && d.running == 0 && d.queued == 1 && d.storage.write_errors >= 2
        })
    });
    assert_eq!(lines_of(&count, "ran"), 1, "run while parked");
    set_fsize_of(agent_pid(ID), libc::RLIM_INFINITY);
    poll("the suspect run again", Duration::from_secs(60), || {
        lines_of(&count, "ran") == 2
    });
    server.wait_devices("the suspect running alone", |d| {
        d.iter()
            .any(|d| d.id == ID && d.running == 1 && d.queued == 0)
    });
    std::fs::write(&go, b"").unwrap();
    let t = server.wait(&s);
    assert_eq!(t.state, TaskState::Succeeded, "{:?}", t.error);
    agent.kill();
    // The kill seen first: until the broker's last will arrives the
    // server still has the dead agent online, and the check's echo task
    // (one attempt) sent to it failed with "device went offline" (CI, and
    // 4 runs in 40 pinned to one busy core).
    server.wait_offline(ID);
    let mut agent = Agent::start_with(dir.path(), ID, &server.broker(), &cfg, &XFSZ_IGNORED);
    server.wait_online(ID);
    let v = ok(&server, &mut agent, "echo", json!({"s": 1}));
    assert_eq!(v, json!({"s": 1}));
    assert_eq!(lines_of(&count, "ran"), 2, "run a third time");
}
