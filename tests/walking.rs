//! End-to-end tests of the walking system with real processes: the server
//! (embedded rumqttd or a real mosquitto), agents on the simulated board,
//! SQLite on disk, SIGKILL for crashes.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, Mosquitto, Server};
use openclaw::admin::AdminError;
use openclaw::protocol::api::TaskState;
use serde_json::json;
use std::time::Duration;

fn api_status(e: AdminError) -> (u16, String) {
    match e {
        AdminError::Api { status, message } => (status, message),
        other => panic!("expected an API error, got {other}"),
    }
}

#[test]
fn echo_and_sysinfo_through_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _agent = Agent::start(dir.path(), "sim-1", &server.broker(), "");
    server.wait_online("sim-1");

    let id = server.submit(task("echo", json!({"hello": "edge", "n": [1, 2.5]})));
    let t = server.wait(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!({"hello": "edge", "n": [1, 2.5]})));
    assert_eq!(t.device.as_deref(), Some("sim-1"));
    assert!(t.dispatched_ms.is_some() && t.finished_ms.is_some());

    let t = server.wait(&server.submit(task("sysinfo", json!(null))));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let r = t.result.unwrap();
    assert!(r["mem_total_kb"].as_u64().unwrap() > 0, "{r}");
    assert!(r["disk_total_bytes"].as_u64().unwrap() > 0, "{r}");

    let devices = server.client.devices().unwrap();
    let d = devices.iter().find(|d| d.id == "sim-1").unwrap();
    assert_eq!(d.board, "sim");
    assert!(d.plugins.contains(&"echo".to_string()));
    assert!(d.capabilities.contains(&"plugin:sysinfo".to_string()));
    assert!(d.mem_total_kb > 0 && d.last_heartbeat_ms > 0);
    let h = server.client.health().unwrap();
    assert_eq!(h["mqtt_connected"], true);
}

#[test]
fn round_trip_through_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let server = Server::start_with_broker(&dir.path().join("srv"), broker.port, &[]);
    let _agent = Agent::start(dir.path(), "mq-1", &server.broker(), "");
    server.wait_online("mq-1");
    let ids: Vec<String> = (0..20)
        .map(|i| server.submit(task("echo", json!({ "i": i }))))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.result, Some(json!({ "i": i })));
    }
}

#[test]
fn server_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "r-1", &server.broker(), "");
    server.wait_online("r-1");
    // Some tasks running on the agent when the server dies...
    let running: Vec<String> = (0..3)
        .map(|i| server.submit(task("echo", json!({"sleep_ms": 1500, "i": i}))))
        .collect();
    // ...and, with the agent gone, some only queued.
    agent.stop();
    server.wait_offline("r-1");
    let queued: Vec<String> = (0..10)
        .map(|i| server.submit(task("echo", json!({ "q": i }))))
        .collect();
    for id in &queued {
        assert_eq!(
            server.client.task(id, None).unwrap().state,
            TaskState::Queued
        );
    }
    server.restart();
    let _agent = Agent::start(dir.path(), "r-1", &server.broker(), "");
    for (i, id) in queued.iter().enumerate() {
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.result, Some(json!({ "q": i })));
    }
    for id in &running {
        // Cancelled by the agent's graceful stop, then retried after restart.
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    }
}

#[test]
fn server_sigkill_mid_run_then_agent_results_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("srv"), &[]);
    let _agent = Agent::start(dir.path(), "k-1", &server.broker(), "");
    server.wait_online("k-1");
    let ids: Vec<String> = (0..4)
        .map(|i| server.submit(task("echo", json!({"sleep_ms": 1000, "i": i}))))
        .collect();
    // Wait until the agent runs them, then kill the server under it.
    let start = std::time::Instant::now();
    while !ids
        .iter()
        .all(|id| server.client.task(id, None).unwrap().state == TaskState::Running)
    {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    server.restart();
    for (i, id) in ids.iter().enumerate() {
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.result, Some(json!({"sleep_ms": 1000, "i": i})));
    }
}

#[test]
fn tasks_of_a_dead_agent_go_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut a = Agent::start(dir.path(), "dead-a", &server.broker(), "");
    server.wait_online("dead-a");
    let ids: Vec<String> = (0..4)
        .map(|i| server.submit(task("echo", json!({"sleep_ms": 3000, "i": i}))))
        .collect();
    let start = std::time::Instant::now();
    while !ids
        .iter()
        .all(|id| server.client.task(id, None).unwrap().device.as_deref() == Some("dead-a"))
    {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _b = Agent::start(dir.path(), "live-b", &server.broker(), "");
    server.wait_online("live-b");
    a.kill();
    for id in &ids {
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.device.as_deref(), Some("live-b"));
        assert_eq!(
            t.attempts, 2,
            "one attempt on the dead agent, one on the live one"
        );
    }
    server.wait_offline("dead-a");
}

#[test]
fn priority_orders_and_aging_prevents_starvation() {
    let dir = tempfile::tempdir().unwrap();
    // One point of priority per 10 ms of waiting.
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[scheduler]\naging_ms = 10\n").unwrap();
    let server = Server::start(
        &dir.path().join("srv"),
        &["--config", cfg.to_str().unwrap()],
    );
    let _agent = Agent::start(
        dir.path(),
        "one-at-a-time",
        &server.broker(),
        "max_concurrency = 1\nqueue_capacity = 0\n",
    );
    server.wait_online("one-at-a-time");
    let with_prio = |p: u8, tag: &str, sleep: u64| {
        let mut r = task("echo", json!({"tag": tag, "sleep_ms": sleep}));
        r.priority = Some(p);
        server.submit(r)
    };
    // Occupy the only slot, then queue low before high: high must run first.
    let blocker = with_prio(50, "blocker", 600);
    let low = with_prio(0, "low", 0);
    let high = with_prio(100, "high", 0);
    let (b, l, h) = (server.wait(&blocker), server.wait(&low), server.wait(&high));
    // Both were waiting when the slot freed up, or nothing was tested.
    assert!(
        h.created_ms < b.finished_ms.unwrap(),
        "the blocker {b:?} ended before high {h:?} was queued"
    );
    assert!(b.started_ms <= h.started_ms);
    assert!(
        h.started_ms < l.started_ms,
        "high {h:?} should start before low {l:?}"
    );

    // Aging: a low task that waited 1.5 s (150 points) beats a fresh high one.
    let blocker = with_prio(50, "blocker2", 1800);
    let old_low = with_prio(0, "old-low", 0);
    std::thread::sleep(Duration::from_millis(1500));
    let fresh_high = with_prio(100, "fresh-high", 0);
    // The old task must still be queued now, behind the blocker: if the
    // blocker had finished early it would have run alone and this half
    // would pass without testing aging.
    let state = server.client.task(&old_low, None).unwrap().state;
    assert_eq!(
        state,
        TaskState::Queued,
        "old-low did not wait for the slot"
    );
    let b = server.wait(&blocker);
    let (ol, fh) = (server.wait(&old_low), server.wait(&fresh_high));
    assert!(
        fh.created_ms < b.finished_ms.unwrap(),
        "the blocker {b:?} ended before fresh-high {fh:?} was queued"
    );
    assert!(
        ol.started_ms < fh.started_ms,
        "aged low {ol:?} should start before fresh high {fh:?}"
    );
}

#[test]
fn failures_timeouts_retries_panics_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "f-1", &server.broker(), "");
    server.wait_online("f-1");

    let t = server.wait(&server.submit(task("echo", json!({"fail": "bad part"}))));
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.error.as_deref().unwrap().contains("bad part"), "{t:?}");
    assert_eq!(t.attempts, 1);

    // Retryable failures run again (not answered from the agent's ledger):
    // echo names the attempt that failed.
    let mut r = task("echo", json!({"fail": "flaky", "retryable": true}));
    r.max_attempts = Some(3);
    let t = server.wait(&server.submit(r));
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.attempts, 3, "{t:?}");
    assert!(
        t.error.as_deref().unwrap().contains("flaky (attempt 3)"),
        "{t:?}"
    );

    let mut r = task("echo", json!({"sleep_ms": 10_000}));
    r.timeout_ms = Some(300);
    let t = server.wait(&server.submit(r));
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}");

    let t = server.wait(&server.submit(task("echo", json!({"panic": true}))));
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.error.as_deref().unwrap().contains("panicked"), "{t:?}");
    assert!(
        agent.alive(),
        "a panicking plugin must not take the agent down"
    );

    let id = server.submit(task("echo", json!({"sleep_ms": 10_000})));
    let start = std::time::Instant::now();
    while server.client.task(&id, None).unwrap().state != TaskState::Running {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = server.client.cancel(&id).unwrap();
    assert_eq!(t.state, TaskState::Cancelled);
    let (code, msg) = api_status(server.client.cancel(&id).unwrap_err());
    assert_eq!(code, 409, "{msg}");

    // Still serving after all that.
    let t = server.wait(&server.submit(task("echo", json!("still here"))));
    assert_eq!(t.result, Some(json!("still here")));
}

#[test]
fn admin_cli_init_submit_task_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _agent = Agent::start(dir.path(), "cli-1", &server.broker(), "");
    server.wait_online("cli-1");
    let admin = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
            .arg("--server")
            .arg(&server.http)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let cfg_dir = dir.path().join("cfg");
    let models = dir.path().join("local_models");
    let (ok, out, err) = admin(&[
        "init",
        "--dir",
        cfg_dir.to_str().unwrap(),
        "--model-path",
        models.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("server.toml"), "{out}");
    assert!(models.is_dir());
    // The starter files are valid configurations.
    openclaw::server::ServerConfig::load(Some(&cfg_dir.join("server.toml")), Default::default())
        .unwrap();
    openclaw::agent::AgentConfig::load(Some(&cfg_dir.join("agent.toml")), Default::default())
        .unwrap();
    let (ok, _, err) = admin(&["init", "--dir", cfg_dir.to_str().unwrap()]);
    assert!(!ok && err.contains("already exists"), "{err}");

    let (ok, out, err) = admin(&[
        "--json",
        "submit",
        "--plugin",
        "echo",
        "--input",
        r#"{"via":"cli"}"#,
        "--priority",
        "70",
        "--target",
        "cli-1",
        "--wait",
    ]);
    assert!(ok, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["state"], "succeeded");
    assert_eq!(t["result"], json!({"via": "cli"}));
    assert_eq!(t["priority"], 70);

    let id = t["id"].as_str().unwrap();
    let (ok, out, _) = admin(&["task", id]);
    assert!(
        ok && out.contains("succeeded") && out.contains("cli-1"),
        "{out}"
    );

    let (ok, out, _) = admin(&["--json", "devices"]);
    assert!(ok);
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d[0]["id"], "cli-1");
    assert_eq!(d[0]["online"], true);

    let (ok, _, err) = admin(&["submit", "--plugin", "echo", "--input", "{broken"]);
    assert!(!ok && err.contains("--input is not valid JSON"), "{err}");
    let (ok, _, err) = admin(&["submit", "--plugin", "nope"]);
    assert!(
        !ok && err.contains("422") && err.contains("unknown plugin"),
        "{err}"
    );
    let (ok, _, err) = admin(&[
        "submit",
        "--plugin",
        "echo",
        "--input",
        r#"{"fail":"no"}"#,
        "--wait",
    ]);
    assert!(!ok && err.contains("ended failed"), "{err}");
}

/// `POST /v1/tasks?wait_ms=` submits and answers with the finished task in
/// the same request (200), or with its current view (202) when the wait
/// runs out; and `?state=running` lists a running task (the store does not
/// record `running`, so the list comes from the scheduler's memory).
#[test]
fn submit_and_wait_in_one_request_and_list_running() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _agent = Agent::start(dir.path(), "sw-1", &server.broker(), "");
    server.wait_online("sw-1");

    let c = &server.client;
    let t = c
        .submit_wait(&task("echo", json!({"a": 1})), Duration::from_secs(30))
        .unwrap();
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!({"a": 1})));
    assert_eq!(t.device.as_deref(), Some("sw-1"));

    // The wait runs out first: the current, unfinished view.
    let slow = c
        .submit_wait(
            &task("echo", json!({"sleep_ms": 3000})),
            Duration::from_millis(300),
        )
        .unwrap();
    assert!(!slow.state.is_terminal(), "{slow:?}");
    let start = std::time::Instant::now();
    let running = loop {
        let l = c.list(Some("running"), 10).unwrap();
        if !l.is_empty() {
            break l;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].id, slow.id);
    assert_eq!(running[0].state, TaskState::Running);
    assert!(c.list(Some("queued"), 10).unwrap().is_empty());
    let done = server.wait(&slow.id);
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert!(done.started_ms.is_some(), "{done:?}");
    assert!(c.list(Some("running"), 10).unwrap().is_empty());
}
