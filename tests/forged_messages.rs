//! The server checks, whatever the broker lets through (issue item 3):
//! with real processes, a raw MQTT client acting as a device publishes
//! results and statuses it has no business sending, and a second server is
//! started on a data dir already in use.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, MqttPeer, Server};
use openclaw::protocol::api::TaskState;
use openclaw::protocol::{
    self, topics, DeviceStatus, FromAgent, RejectReason, TaskOutcome, ToAgent, Value,
};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A device's status, as an agent would send it. A long heartbeat: the
/// server must not declare the peer lost while the test runs.
fn status(id: &str, online: bool) -> DeviceStatus {
    DeviceStatus {
        device_id: id.into(),
        online,
        board: "sim".into(),
        plugins: vec!["echo".into()],
        capabilities: vec!["plugin:echo".into()],
        max_concurrency: 4,
        queue_capacity: 4,
        heartbeat_ms: 60_000,
        ..Default::default()
    }
}

/// Publishes a retained status on `topic_id`'s status topic.
fn announce(peer: &MqttPeer, topic_id: &str, st: &DeviceStatus) {
    peer.client
        .publish(
            topics::status(topic_id),
            rumqttc::QoS::AtLeastOnce,
            true,
            protocol::encode(st),
        )
        .unwrap();
}

fn finished(id: &str, text: &str) -> Vec<u8> {
    protocol::encode(&FromAgent::Finished(TaskOutcome {
        task_id: id.into(),
        result: Ok(Value::Str(text.into())),
        elapsed_us: 1,
    }))
}

/// Publishes `payloads` on `device`'s results topic until the server
/// answers the last one (a `Finished`) with a `ResultAck` for `id` on
/// `device`'s tasks topic (`peer` subscribes to it). Again after a while
/// without one: right after a start the server may not have subscribed
/// yet, and a publish nobody subscribes to is dropped.
fn publish_until_acked(peer: &MqttPeer, device: &str, id: &str, payloads: &[Vec<u8>]) {
    let start = Instant::now();
    loop {
        for p in payloads {
            peer.publish(&topics::results(device), p.clone());
        }
        let round = Instant::now();
        while round.elapsed() < Duration::from_secs(2) {
            let Ok(p) = peer.rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            if p.topic != topics::tasks(device) {
                continue;
            }
            if let Ok(ToAgent::ResultAck { task_id }) =
                protocol::decode::<ToAgent>(&p.payload, 1 << 20)
            {
                if task_id == id {
                    return;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no ResultAck for {id} on {}",
            topics::tasks(device)
        );
    }
}

/// Publishes `payloads` on `device`'s results topic until `/healthz`
/// counts at least `n` forged results (again after a while without: right
/// after a start the server may not have subscribed yet), then checks that
/// none of them was acked: a refused `Finished` is not, since the sender may
/// be a real device missing from the history (its result must stay in its
/// outbox, not be confirmed and lost).
fn publish_until_refused(
    server: &Server,
    peer: &MqttPeer,
    device: &str,
    n: u64,
    payloads: &[Vec<u8>],
) {
    let start = Instant::now();
    'outer: loop {
        for p in payloads {
            peer.publish(&topics::results(device), p.clone());
        }
        let round = Instant::now();
        while round.elapsed() < Duration::from_secs(2) {
            if health_u64(server, "forged_results") >= n {
                break 'outer;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "fewer than {n} forged results counted"
        );
    }
    while let Ok(p) = peer.rx.recv_timeout(Duration::from_millis(300)) {
        if let Ok(ToAgent::ResultAck { task_id }) = protocol::decode::<ToAgent>(&p.payload, 1 << 20)
        {
            panic!("a refused result was acked: {task_id} on {}", p.topic);
        }
    }
}

/// The next task dispatched on `peer`'s tasks topic.
fn next_task(peer: &MqttPeer, device: &str) -> String {
    loop {
        let p = peer.next_on(&topics::tasks(device));
        if let Ok(ToAgent::Task(spec)) = protocol::decode::<ToAgent>(&p.payload, 1 << 20) {
            return spec.id;
        }
    }
}

fn health_u64(server: &Server, key: &str) -> u64 {
    let h = server.client.health().expect("healthz");
    h[key]
        .as_u64()
        .unwrap_or_else(|| panic!("/healthz has no `{key}`: {h}"))
}

/// A task dispatched to `dev-1` (a raw client that never answers on its
/// own); `evil` publishes `Started`, `Rejected` and `Finished` for it on
/// its own results topic. Nothing changes: the task stays dispatched to
/// dev-1, evil's `Finished` is not acknowledged, and `/healthz` counts
/// them; dev-1's real result then wins. After
/// a restart the dispatch history is still there: evil is still refused and
/// dev-1's late result (its outbox re-sending it) still counts. Before the
/// fix evil's `Finished` ended the task as succeeded on device `evil`.
#[test]
fn a_result_counts_only_from_a_device_the_task_was_dispatched_to() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let dev = MqttPeer::connect(server.mqtt_port, "dev-1", &[&topics::tasks("dev-1")]);
    announce(&dev, "dev-1", &status("dev-1", true));
    server.wait_online("dev-1");

    let id = server.submit(task("echo", json!({"n": 1})));
    assert_eq!(next_task(&dev, "dev-1"), id);

    let evil = MqttPeer::connect(server.mqtt_port, "evil", &[&topics::tasks("evil")]);
    let started = protocol::encode(&FromAgent::Started {
        task_id: id.clone(),
    });
    let rejected = protocol::encode(&FromAgent::Rejected {
        task_id: id.clone(),
        reason: RejectReason::Busy,
    });
    publish_until_refused(
        &server,
        &evil,
        "evil",
        3,
        &[started, rejected, finished(&id, "forged")],
    );
    let t = server.client.task(&id, None).unwrap();
    assert_eq!(t.state, TaskState::Dispatched, "{t:?}");
    assert_eq!(t.device.as_deref(), Some("dev-1"), "{t:?}");
    assert_eq!(t.result, None, "{t:?}");
    let forged = health_u64(&server, "forged_results");
    assert!(
        forged >= 3,
        "Started, Rejected and Finished counted: {forged}"
    );

    publish_until_acked(&dev, "dev-1", &id, &[finished(&id, "real")]);
    let t = server.wait(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!("real")), "{t:?}");
    assert_eq!(t.device.as_deref(), Some("dev-1"), "{t:?}");

    // Across a restart (SIGKILL): the task is recovered to the queue,
    // waiting for dev-1, and only the history says where it was.
    let id = server.submit(task("echo", json!({"n": 2})));
    assert_eq!(next_task(&dev, "dev-1"), id);
    drop((dev, evil));
    server.restart();
    // New client ids: the old clients must not take theirs back.
    let evil = MqttPeer::connect(server.mqtt_port, "evil-2", &[&topics::tasks("evil")]);
    publish_until_refused(&server, &evil, "evil", 1, &[finished(&id, "forged")]);
    let t = server.client.task(&id, None).unwrap();
    assert!(
        !t.state.is_terminal(),
        "evil ended it after a restart: {t:?}"
    );
    assert!(health_u64(&server, "forged_results") >= 1);
    let dev = MqttPeer::connect(server.mqtt_port, "dev-1-2", &[&topics::tasks("dev-1")]);
    publish_until_acked(&dev, "dev-1", &id, &[finished(&id, "real after restart")]);
    let t = server.wait(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!("real after restart")), "{t:?}");
    assert_eq!(t.device.as_deref(), Some("dev-1"), "{t:?}");
}

/// `evil` publishes, retained on its own status topic, a status naming
/// dev-1 as offline, then a hundred more: dev-1 stays online and every one
/// is counted in `/healthz` (and logged once). Before, such statuses were
/// ignored too, but not counted, and each was logged.
#[test]
fn a_status_counts_only_from_the_device_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let dev = MqttPeer::connect(server.mqtt_port, "dev-1", &[]);
    announce(&dev, "dev-1", &status("dev-1", true));
    server.wait_online("dev-1");

    let evil = MqttPeer::connect(server.mqtt_port, "evil", &[]);
    for _ in 0..101 {
        announce(&evil, "evil", &status("dev-1", false));
    }
    // Then a true status on the same topic: once it is seen, the ones
    // before it (same client, same topic: in order) were handled.
    announce(&evil, "evil", &status("evil", true));
    server.wait_online("evil");
    let devices = server.client.devices().unwrap();
    let d = devices.iter().find(|d| d.id == "dev-1").unwrap();
    assert!(d.online, "a status from evil took dev-1 offline: {d:?}");
    assert_eq!(health_u64(&server, "forged_statuses"), 101);
}

/// A retained status published raw (rumqttc itself refuses such topics) on
/// `openclaw/v1/devices/x+y/status`, naming `x+y`: rumqttd takes a wildcard
/// character in a published topic. Before, `x+y` became an online device,
/// and every task dispatched to it failed to publish and came straight
/// back to it (a tight loop, a warning each); now no device has an id that
/// is not one, and the message is counted.
#[test]
fn a_topic_whose_device_id_is_not_valid_adds_no_device() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let topic = topics::status("x+y");
    let payload = protocol::encode(&status("x+y", true));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.mqtt_port)).unwrap();
    let id = b"raw-1";
    let mut connect = vec![0x10, 12 + id.len() as u8, 0, 4];
    connect.extend_from_slice(b"MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60, 0, id.len() as u8]);
    connect.extend_from_slice(id);
    s.write_all(&connect).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack[0], 0x20, "CONNACK");
    // PUBLISH, QoS 0, retained; the remaining length as a varint.
    let mut body = vec![0, topic.len() as u8];
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&payload);
    let mut publish = vec![0x31];
    let mut n = body.len();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        publish.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    publish.extend_from_slice(&body);
    let start = Instant::now();
    while health_u64(&server, "forged_statuses") == 0 {
        // Again until the server (subscribed after its start) has it.
        s.write_all(&publish).unwrap();
        assert!(start.elapsed() < Duration::from_secs(30), "never counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let devices = server.client.devices().unwrap();
    assert!(
        devices.iter().all(|d| d.id != "x+y"),
        "a device with the id `x+y`: {devices:?}"
    );
}

/// A second server on a data dir in use exits non-zero at once, naming the
/// data dir and the first server's pid, and never opens the store; once the
/// first is SIGKILLed, the lock is gone and a server starts there. Before,
/// the second one started and both used the one SQLite file.
#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Server::start(dir.path(), &[]);
    let mut second = Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
        .args(["--host", "127.0.0.1", "--port", "0", "--mqtt-port", "0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info,rumqttd=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let code = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = second.kill();
            let out = second.wait_with_output().unwrap();
            panic!(
                "the second server is still running on the same data dir: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!code.success(), "exit {code:?}: {stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "names the data dir: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "names the holder's pid {}: {stderr}",
        first.pid()
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ready"),
        "it said it was ready"
    );

    first.kill();
    let again = Server::start(dir.path(), &[]);
    again.client.health().expect("the new server answers");
}
