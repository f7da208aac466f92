//! Every bad input gets a clear error, nothing accepted is lost, and no
//! process goes down.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, MqttPeer as Peer, Server};
use openclaw::protocol::api::{Reply, TaskState};
use openclaw::protocol::{self, topics, FromAgent, TaskSpec, ToAgent, Value};
use serde_json::json;
use std::time::Duration;

fn post_raw(server: &Server, body: &[u8]) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(format!("{}/v1/tasks", server.http))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(json!(text)))
}

fn get_raw(server: &Server, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.get(format!("{}{path}", server.http)).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

#[test]
fn http_bad_input_gets_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _agent = Agent::start(dir.path(), "h-1", &server.broker(), "");
    server.wait_online("h-1");
    // Accepted before the barrage; must still complete.
    let before: Vec<String> = (0..5)
        .map(|i| server.submit(task("echo", json!({"sleep_ms": 300, "i": i}))))
        .collect();

    let cases: Vec<(&[u8], u16, &str)> = vec![
        (b"{not json", 400, "invalid JSON body"),
        (
            b"{\"plugin\": \"echo\", \"bogus\": 1}",
            400,
            "unknown field `bogus`",
        ),
        (b"{\"input\": 1}", 400, "missing field `plugin`"),
        (b"{\"plugin\": \"nope\"}", 422, "unknown plugin `nope`"),
        (
            b"{\"plugin\": \"echo\", \"target\": \"ghost\"}",
            404,
            "device `ghost` does not exist",
        ),
        (
            b"{\"plugin\": \"echo\", \"priority\": 200}",
            400,
            "out of range",
        ),
        (
            b"{\"plugin\": \"echo\", \"timeout_ms\": 0}",
            400,
            "timeout_ms",
        ),
        (
            b"{\"plugin\": \"echo\", \"max_attempts\": 0}",
            400,
            "max_attempts",
        ),
        (b"{\"plugin\": \"\"}", 400, "plugin"),
        (
            b"{\"plugin\": \"echo\", \"reply_to\": \"x\"}",
            400,
            "MQTT submissions only",
        ),
    ];
    for (body, code, needle) in cases {
        let (status, err) = post_raw(&server, body);
        assert_eq!(status, code, "{}: {err}", String::from_utf8_lossy(body));
        let msg = err["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{}: {msg}",
            String::from_utf8_lossy(body)
        );
    }
    // Over the body limit: the server answers 413 (JSON) and may close the
    // connection before the whole body is sent, so write it from a thread and
    // ignore a broken pipe.
    {
        use std::io::{Read, Write};
        let addr = server.http.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let body = vec![b'x'; 2 << 20];
        write!(
            s,
            "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&body);
        });
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut resp = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            resp.extend_from_slice(&buf[..n]);
            if resp.windows(4).any(|w| w == b"\r\n\r\n") && resp.ends_with(b"}") {
                break;
            }
        }
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
        assert!(resp.contains("exceeds the limit"), "{resp}");
        drop(s);
        let _ = writer.join();
    }
    // Just under the body limit but over the MQTT payload budget.
    let near = format!(
        "{{\"plugin\": \"echo\", \"input\": \"{}\"}}",
        "x".repeat((1 << 20) - 100)
    );
    let (status, err) = post_raw(&server, near.as_bytes());
    assert_eq!(status, 413, "{err}");
    assert!(err["error"]
        .as_str()
        .unwrap()
        .contains("`input` encodes to"));

    let (status, body) = get_raw(&server, "/v1/tasks/no-such-task");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("does not exist"));
    let (status, body) = get_raw(&server, "/v1/nothing-here");
    assert_eq!(status, 404, "{body}");
    let (status, body) = get_raw(&server, "/v1/tasks/x?wait_ms=soon");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid query string"), "{body}");
    let (status, body) = get_raw(&server, "/v1/tasks?state=weird");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown state"));

    for id in &before {
        assert_eq!(server.wait(id).state, TaskState::Succeeded);
    }
    let t = server.wait(&server.submit(task("echo", json!(1))));
    assert_eq!(t.state, TaskState::Succeeded);
}

#[test]
fn mqtt_bad_payloads_are_survived_and_submit_boundary_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "m-1", &server.broker(), "");
    server.wait_online("m-1");
    let before: Vec<String> = (0..5)
        .map(|i| server.submit(task("echo", json!({"sleep_ms": 300, "i": i}))))
        .collect();

    let peer = Peer::connect(
        server.mqtt_port,
        "test-peer",
        &["test/replies", &topics::results("m-1")],
    );
    let garbage = vec![0xff, 0x13, 0x37, 0x00, 0x42];
    let mut wrong_version = postcard::to_stdvec(&7u16).unwrap();
    wrong_version.extend_from_slice(&[1, 2, 3]);
    for topic in [
        topics::tasks("m-1"),
        topics::results("m-1"),
        topics::status("m-1"),
        topics::results("ghost"),
    ] {
        peer.publish(&topic, garbage.clone());
        peer.publish(&topic, wrong_version.clone());
        peer.publish(&topic, Vec::new());
    }
    peer.publish(topics::SUBMIT, garbage.clone());

    // An unknown plugin sent straight to the agent fails that task with a reason.
    let spec = TaskSpec {
        id: "raw-1".into(),
        plugin: "teleport".into(),
        input: Value::Null,
        timeout_ms: 1000,
        attempt: 1,
    };
    peer.publish(
        &topics::tasks("m-1"),
        protocol::encode(&ToAgent::Task(spec)),
    );
    let outcome = loop {
        let p = peer.next_on(&topics::results("m-1"));
        if let Ok(FromAgent::Finished(o)) = protocol::decode::<FromAgent>(&p.payload, 1 << 20) {
            if o.task_id == "raw-1" {
                break o;
            }
        }
    };
    let err = outcome.result.unwrap_err();
    assert_eq!(err.kind, protocol::ErrorKind::UnknownPlugin);
    assert!(err.message.contains("teleport"), "{}", err.message);

    // The cross-system entry: JSON in, replies on the submitter's topic.
    let submit = json!({"plugin": "echo", "input": {"from": "erp"}, "reply_to": "test/replies", "correlation": "po-17"});
    peer.publish(topics::SUBMIT, serde_json::to_vec(&submit).unwrap());
    let accepted: Reply = serde_json::from_slice(&peer.next_on("test/replies").payload).unwrap();
    assert_eq!(accepted.event, "accepted");
    assert_eq!(accepted.correlation.as_deref(), Some("po-17"));
    let done: Reply = serde_json::from_slice(&peer.next_on("test/replies").payload).unwrap();
    assert_eq!(done.event, "succeeded", "{done:?}");
    assert_eq!(done.result, Some(json!({"from": "erp"})));
    assert_eq!(done.id, accepted.id);

    for bad in [
        json!({"plugin": "nope", "reply_to": "test/replies", "correlation": "c1"}),
        json!({"plugin": "echo", "priority": 999, "reply_to": "test/replies", "correlation": "c2"}),
    ] {
        peer.publish(topics::SUBMIT, serde_json::to_vec(&bad).unwrap());
        let r: Reply = serde_json::from_slice(&peer.next_on("test/replies").payload).unwrap();
        assert_eq!(r.event, "rejected", "{r:?}");
        assert_eq!(r.correlation.as_deref(), bad["correlation"].as_str());
        assert!(r.error.is_some());
    }
    let mut broken =
        br#"{"plugin": "echo", "reply_to": "test/replies", "correlation": "c3", "#.to_vec();
    broken.extend_from_slice(b"oops");
    peer.publish(topics::SUBMIT, broken);
    peer.publish(
        topics::SUBMIT,
        br#"{"plugin": 5, "reply_to": "test/replies", "correlation": "c3"}"#.to_vec(),
    );
    let r: Reply = serde_json::from_slice(&peer.next_on("test/replies").payload).unwrap();
    assert_eq!(r.event, "rejected");
    assert!(r.error.unwrap().contains("invalid submission"));

    // Everything accepted before still completes; both processes still serve.
    for id in &before {
        assert_eq!(server.wait(id).state, TaskState::Succeeded);
    }
    assert!(agent.alive());
    let t = server.wait(&server.submit(task("echo", json!("after"))));
    assert_eq!(t.result, Some(json!("after")));
    server.wait_devices("agent counted malformed payloads", |d| {
        d.iter().any(|d| d.id == "m-1" && d.malformed >= 3)
    });
}

#[test]
fn bad_configs_and_boards_are_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("agent.toml");
    std::fs::write(&f, "[mqtt]\nkeep_alive_secs = \"soon\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
        .arg("--config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.toml") && err.contains("mqtt.keep_alive_secs"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
        .args(["--board", "commodore64", "--print-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown board `commodore64`"));

    let s = dir.path().join("server.toml");
    std::fs::write(&s, "[scheduler]\naging_ms = 0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
        .arg("--config")
        .arg(&s)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.toml") && err.contains("scheduler.aging_ms"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
        .args(["--board", "rpi4", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cortex-a72") && text.contains("[mqtt]"),
        "{text}"
    );
}

#[test]
fn full_agent_rejects_and_repeats_are_answered_not_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _agent = Agent::start(
        dir.path(),
        "bp-1",
        &server.broker(),
        "max_concurrency = 1\nqueue_capacity = 0\n",
    );
    server.wait_online("bp-1");
    let peer = Peer::connect(server.mqtt_port, "bp-peer", &[&topics::results("bp-1")]);
    let spec = |id: &str| TaskSpec {
        id: id.into(),
        plugin: "echo".into(),
        input: Value::from(json!({"sleep_ms": 500, "id": id})),
        timeout_ms: 5000,
        attempt: 1,
    };
    peer.publish(
        &topics::tasks("bp-1"),
        protocol::encode(&ToAgent::Task(spec("bp-a"))),
    );
    peer.publish(
        &topics::tasks("bp-1"),
        protocol::encode(&ToAgent::Task(spec("bp-b"))),
    );
    let mut events = Vec::new();
    let first = loop {
        let p = peer.next_on(&topics::results("bp-1"));
        let msg = protocol::decode::<FromAgent>(&p.payload, 1 << 20).unwrap();
        if let FromAgent::Finished(o) = &msg {
            break o.clone();
        }
        events.push(msg);
    };
    assert!(
        events.contains(&FromAgent::Started {
            task_id: "bp-a".into()
        }),
        "{events:?}"
    );
    assert!(
        events.contains(&FromAgent::Rejected {
            task_id: "bp-b".into(),
            reason: protocol::RejectReason::Busy
        }),
        "the second task finds the only slot taken: {events:?}"
    );
    assert_eq!(first.task_id, "bp-a");

    // Delivered again: not started a second time; answered with the very
    // same outcome while the server's confirmation has not reached the
    // agent, ignored once it has. A task behind it tells when it is handled.
    peer.publish(
        &topics::tasks("bp-1"),
        protocol::encode(&ToAgent::Task(spec("bp-a"))),
    );
    peer.publish(
        &topics::tasks("bp-1"),
        protocol::encode(&ToAgent::Task(spec("bp-c"))),
    );
    loop {
        let p = peer.next_on(&topics::results("bp-1"));
        match protocol::decode::<FromAgent>(&p.payload, 1 << 20).unwrap() {
            FromAgent::Finished(o) if o.task_id == "bp-c" => break,
            FromAgent::Finished(o) => assert_eq!(o, first, "the same result"),
            FromAgent::Started { task_id } => assert_eq!(task_id, "bp-c", "bp-a ran twice"),
            other => panic!("{other:?}"),
        }
    }
}
