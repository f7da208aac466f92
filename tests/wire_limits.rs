//! Hostile wire payloads against real processes: one MQTT publish from any
//! client must not take the server or an agent down (issue 15, item 1).
//!
//! `protocol::Value` nests; without a depth limit a 100 KB publish of
//! 50,000 nested lists overflowed the decoding thread's stack ("thread
//! 'tokio-rt-worker' has overflowed its stack", SIGABRT), which no
//! `catch_unwind` stops, and a persistent session delivered it again after
//! every restart.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, MqttPeer, Server};
use openclaw::protocol::api::TaskState;
use openclaw::protocol::{self, topics, FromAgent, TaskOutcome, TaskSpec, ToAgent, Value};
use serde_json::json;
use std::time::{Duration, Instant};

/// `levels` nested `Value::List`s, as the bytes postcard would write for
/// them (building the `Value` itself would need as deep a recursion to
/// encode and to drop): `6 1` per level (variant `List`, one element), then
/// `0` (`Null`).
fn nested_value(levels: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 * levels + 1);
    for _ in 0..levels {
        v.extend_from_slice(&[6, 1]);
    }
    v.push(0);
    v
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `Envelope { 1, FromAgent::Finished(TaskOutcome { id, Ok(nested), 0 }) }`.
fn nested_finished(id: &str, levels: usize) -> Vec<u8> {
    let mut b = vec![1, 2]; // version 1, variant Finished
    varint(id.len() as u64, &mut b);
    b.extend_from_slice(id.as_bytes());
    b.push(0); // Ok
    b.extend(nested_value(levels));
    b.push(0); // elapsed_us
    b
}

/// `Envelope { 1, ToAgent::Task(TaskSpec { id, "echo", nested, 1000, 1 }) }`.
fn nested_task(id: &str, levels: usize) -> Vec<u8> {
    let mut b = vec![1, 0]; // version 1, variant Task
    for s in [id, "echo"] {
        varint(s.len() as u64, &mut b);
        b.extend_from_slice(s.as_bytes());
    }
    b.extend(nested_value(levels));
    varint(1000, &mut b);
    b.push(1);
    b
}

/// A value nested `levels` deep, built without recursion.
fn deep(levels: usize) -> Value {
    let mut v = Value::Null;
    for _ in 0..levels {
        v = Value::List(vec![v]);
    }
    v
}

/// The hand-built payloads are what `encode` writes (checked shallow).
#[test]
fn payload_builders_match_the_encoder() {
    let fin = FromAgent::Finished(TaskOutcome {
        task_id: "t".into(),
        result: Ok(deep(3)),
        elapsed_us: 0,
    });
    assert_eq!(nested_finished("t", 3), protocol::encode(&fin));
    let t = ToAgent::Task(TaskSpec {
        id: "t".into(),
        plugin: "echo".into(),
        input: deep(3),
        timeout_ms: 1000,
        attempt: 1,
    });
    assert_eq!(nested_task("t", 3), protocol::encode(&t));
}

/// Answers HTTP for `for_how_long`, polled; fails naming what did not.
fn keeps_answering(server: &Server, for_how_long: Duration) {
    let start = Instant::now();
    while start.elapsed() < for_how_long {
        server
            .client
            .health()
            .expect("the server stopped answering HTTP after the nested publish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_deeply_nested_result_does_not_crash_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    // An agent online first: its status reached the server, so the server
    // is subscribed (its ready line can come before that).
    let _agent = Agent::start(dir.path(), "good-1", &server.broker(), "");
    server.wait_online("good-1");
    let payload = nested_finished("evil-1", 50_000);
    assert!(payload.len() > 100_000 && payload.len() < 1 << 20);
    // A persistent session, like a client that would get it again.
    let peer = MqttPeer::connect(server.mqtt_port, "evil", &[]);
    peer.publish(&topics::results("evil"), payload.clone());
    // One that decodes, behind it: the server has read past the bad one.
    peer.publish(
        &topics::results("evil"),
        protocol::encode(&FromAgent::Started {
            task_id: "x".into(),
        }),
    );
    keeps_answering(&server, Duration::from_secs(2));

    // And it still does its job.
    let t = server.wait(&server.submit(task("echo", json!({"after": "evil"}))));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!({"after": "evil"})));
    // Nested within the limit still goes through: 100 levels of JSON.
    let mut input = json!(1);
    for _ in 0..100 {
        input = json!([input]);
    }
    let t = server.wait(&server.submit(task("echo", input.clone())));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(input));
    keeps_answering(&server, Duration::from_millis(200));
}

#[test]
fn a_deeply_nested_task_does_not_crash_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "deep-1", &server.broker(), "");
    server.wait_online("deep-1");
    let peer = MqttPeer::connect(server.mqtt_port, "deep-peer", &[]);
    peer.publish(&topics::tasks("deep-1"), nested_task("evil-t", 50_000));
    server.wait_devices("the agent counted the nested task as malformed", |d| {
        d.iter()
            .any(|d| d.id == "deep-1" && d.online && d.malformed >= 1)
    });
    assert!(agent.alive(), "the agent died on a nested task");
    let t = server.wait(&server.submit(task("echo", json!("after"))));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert!(agent.alive());
}

/// A status is network input too: `max_concurrency + queue_capacity` in
/// `u32` overflowed (a panic in a debug build, which stopped the
/// scheduler; a wrapped capacity in a release build).
#[test]
fn a_status_with_huge_limits_does_not_overflow_the_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _agent = Agent::start(dir.path(), "good-2", &server.broker(), "");
    server.wait_online("good-2");
    let peer = MqttPeer::connect(server.mqtt_port, "big", &[]);
    let status = protocol::DeviceStatus {
        device_id: "big".into(),
        online: true,
        board: "sim".into(),
        plugins: vec!["echo".into()],
        max_concurrency: u32::MAX,
        queue_capacity: u32::MAX,
        heartbeat_ms: 60_000,
        ..Default::default()
    };
    peer.publish(&topics::status("big"), protocol::encode(&status));
    server.wait_online("big");
    // A dispatch pass that counts its capacity.
    let mut req = task("echo", json!(1));
    req.target = Some("big".into());
    let id = server.submit(req);
    let start = Instant::now();
    loop {
        let t = server.client.task(&id, None).expect("the server answers");
        if t.state == TaskState::Dispatched {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = server.wait(&server.submit(task("echo", json!("ok"))));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
}
