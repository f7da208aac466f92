//! The scheduler under a backlog and with a failing or damaged store, with
//! real processes: the server, an agent, SQLite on disk, statuses of
//! made-up devices published over MQTT.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, MqttPeer, Server};
use openclaw::admin::{AdminError, Client};
use openclaw::protocol::api::{SubmitRequest, TaskState};
use openclaw::protocol::{self, topics, DeviceStatus};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A device that existed once: known to the server, offline now.
fn announce_and_leave(server: &Server, id: &str, caps: &[&str]) {
    let peer = MqttPeer::connect(server.mqtt_port, &format!("{id}-peer"), &[]);
    let mut st = DeviceStatus {
        device_id: id.into(),
        online: true,
        board: "sim".into(),
        plugins: vec!["echo".into()],
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        max_concurrency: 4,
        queue_capacity: 0,
        heartbeat_ms: 1000,
        ..Default::default()
    };
    // Again until seen: the server's subscriptions may not be in place yet
    // when it says it is ready, and this status is not retained.
    let start = std::time::Instant::now();
    while !server
        .client
        .devices()
        .unwrap()
        .iter()
        .any(|d| d.id == id && d.online)
    {
        assert!(start.elapsed() < Duration::from_secs(30), "{id} never seen");
        peer.publish(&topics::status(id), protocol::encode(&st));
        std::thread::sleep(Duration::from_millis(200));
    }
    st.online = false;
    peer.publish(&topics::status(id), protocol::encode(&st));
    server.wait_offline(id);
}

/// `n` submissions from 8 threads; all must be accepted.
fn submit_many(url: &str, n: usize, make: impl Fn(usize) -> SubmitRequest + Send + Sync + 'static) {
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (next, make, client) = (next.clone(), make.clone(), Client::new(url));
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                client.submit(&make(i)).expect("parked submission accepted");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Issue 18 item 1: 10,000 tasks no device can take (half for a device
/// that is away, half needing a capability only that device has), all of
/// them older and of higher priority than an echo the online agent can
/// run: the echo runs, before and after a server restart. Before the fix
/// the dispatch pass walked only the first 4,096 queue entries and the echo
/// stayed queued.
#[test]
fn ten_thousand_parked_tasks_do_not_block_a_dispatchable_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[storage]\nsynchronous = \"normal\"\n").unwrap();
    let mut server = Server::start(
        &dir.path().join("srv"),
        &["--config", cfg.to_str().unwrap()],
    );
    announce_and_leave(&server, "away", &["gpu"]);
    let parked = 10_000;
    submit_many(&server.http, parked, |i| {
        let mut r = task("echo", json!({ "parked": i }));
        r.priority = Some(100);
        if i % 2 == 0 {
            r.target = Some("away".into());
        } else {
            r.capability = Some("gpu".into());
        }
        r
    });
    let _agent = Agent::start(dir.path(), "here", &server.broker(), "");
    server.wait_online("here");
    let mut echo = task("echo", json!("through"));
    echo.priority = Some(0);
    let t = server.wait(&server.submit(echo.clone()));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.device.as_deref(), Some("here"));
    let h = server.client.health().unwrap();
    assert_eq!(h["queued"], parked, "{h}");

    server.restart();
    server.wait_online("here");
    let h = server.client.health().unwrap();
    assert_eq!(h["queued"], parked, "the parked tasks came back: {h}");
    let t = server.wait(&server.submit(echo));
    assert_eq!(t.state, TaskState::Succeeded, "after a restart: {t:?}");
    assert_eq!(t.device.as_deref(), Some("here"));
}

/// Issue 18 item 4: past `scheduler.max_queued_tasks` a submission gets
/// 429 with a reason (the limit named); a capability no known device offers
/// is refused with 422 instead of waiting forever.
#[test]
fn admission_limits_answer_429_and_unknown_capabilities_422() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[scheduler]\nmax_queued_tasks = 5\n").unwrap();
    let server = Server::start(
        &dir.path().join("srv"),
        &["--config", cfg.to_str().unwrap()],
    );
    announce_and_leave(&server, "gone", &[]);
    for i in 0..5 {
        let mut r = task("echo", json!(i));
        r.target = Some("gone".into());
        server.submit(r);
    }
    let mut r = task("echo", json!("one too many"));
    r.target = Some("gone".into());
    match server.client.submit(&r) {
        Err(AdminError::Throttled {
            retry_after_s,
            message,
        }) => {
            assert!(retry_after_s >= 1, "{message}");
            assert!(message.contains("scheduler.max_queued_tasks"), "{message}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    let mut r = task("echo", json!(1));
    r.capability = Some("tpu".into());
    match server.client.submit(&r) {
        Err(AdminError::Api { status, message }) => {
            assert_eq!(status, 422, "{message}");
            assert!(message.contains("unknown capability `tpu`"), "{message}");
        }
        other => panic!("expected 422, got {other:?}"),
    }
}

/// Issue 18 item 7: a stored row the server cannot read (a priority of
/// 999) stopped it from starting. Now it starts, without that row, and
/// reading the row names it and the column.
#[test]
fn a_bad_stored_row_is_named_and_the_server_starts_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let mut server = Server::start(&data, &[]);
    let _agent = Agent::start(dir.path(), "row-1", &server.broker(), "");
    server.wait_online("row-1");
    let mut r = task("echo", json!("kept"));
    r.target = Some("row-1".into());
    // Two tasks left queued: the agent is stopped first.
    drop(_agent);
    server.wait_offline("row-1");
    let good = server.submit(r.clone());
    let bad = server.submit(r);
    server.kill();
    let db = rusqlite::Connection::open(data.join("openclaw.db")).unwrap();
    db.execute("UPDATE tasks SET priority = 999 WHERE id = ?1", [&bad])
        .unwrap();
    drop(db);
    server.restart();
    let h = server.client.health().unwrap();
    assert_eq!(h["queued"], 1, "{h}");
    let _agent = Agent::start(dir.path(), "row-1", &server.broker(), "");
    let t = server.wait(&good);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    match server.client.task(&bad, None) {
        Err(AdminError::Api { message, .. }) => {
            assert!(
                message.contains(&bad) && message.contains("`priority`"),
                "{message}"
            );
        }
        other => panic!("expected an error naming the row, got {other:?}"),
    }
}

/// Issue 15 item 2 (second half): a scheduler that stops on its own (here
/// its store lost the `tasks` table, so after a failed batch the state
/// cannot be reloaded) ends the server process with a non-zero status,
/// instead of leaving HTTP answering 503 with nobody to restart it.
#[test]
fn a_scheduler_that_cannot_go_on_ends_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let mut server = Server::start(&data, &[]);
    announce_and_leave(&server, "some", &[]);
    let db = rusqlite::Connection::open(data.join("openclaw.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch("DROP TABLE tasks;").unwrap();
    drop(db);
    let mut r = task("echo", json!(1));
    r.target = Some("some".into());
    let answer = server.client.submit(&r);
    assert!(
        answer.is_err(),
        "accepted without a tasks table: {answer:?}"
    );
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server kept running without its scheduler");
    assert!(!status.success(), "{status:?}");
}

/// Session 14's MCP flood: an agent kept working on tasks the server had
/// cancelled, and took no new work for minutes. Here the cancels never
/// reach it: the agent is stopped (SIGSTOP) until the server gives it up,
/// which puts its tasks back in the queue, and they are cancelled there,
/// where nothing is sent to a device. (The other way there: the broker's
/// log for a device's topic rolls over while the agent lags, dropping
/// what it had not delivered yet.) Back, its heartbeat counts 20 tasks
/// where the server has none open: the server asks which, and cancels
/// them there. Without that, it ran 20 sleeps of 10 minutes.
#[test]
fn an_agent_holding_tasks_whose_cancel_it_missed_lets_them_go() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let cfg = "max_concurrency = 4\nqueue_capacity = 16\n\
               [plugins.exec.commands.nap]\nprogram = \"/bin/sleep\"\nargs = [\"600\"]\n";
    let agent = Agent::start(dir.path(), "napper", &server.broker(), cfg);
    server.wait_online("napper");
    let nap = || {
        let mut r = task("exec", json!({"command": "nap"}));
        r.timeout_ms = Some(700_000);
        r
    };
    let ids: Vec<String> = (0..20).map(|_| server.submit(nap())).collect();
    let holds = |n: u32, m: u32| {
        move |d: &[openclaw::protocol::api::DeviceView]| {
            d.iter()
                .any(|d| d.id == "napper" && d.online && d.running == n && d.queued == m)
        }
    };
    server.wait_devices("napper running 4 and holding 16 more", holds(4, 16));
    agent.signal(libc::SIGSTOP);
    server.wait_offline("napper");
    for id in &ids {
        let t = server.client.cancel(id).expect("cancel");
        assert_eq!(t.state, TaskState::Cancelled);
    }
    agent.signal(libc::SIGCONT);
    server.wait_online("napper");
    server.wait_devices("napper holding nothing", holds(0, 0));
    // And it takes new work at once.
    let id = server.submit(task("echo", json!("after")));
    let t = server.wait(&id);
    assert!(common::succeeded(&t), "{t:?}");
    assert_eq!(t.device.as_deref(), Some("napper"));
}
