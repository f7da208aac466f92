//! Device identities on the embedded broker (issue 12, item 2), with real
//! server and agent processes: `mqtt.auth = "required"` refuses anonymous
//! clients, wrong passwords, revoked identities and a client id that is not
//! the login's (no session takeover); a device reads only its own task
//! topic, publishes only its own status and results, and submits only if
//! granted; tasks still run end to end.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, MqttPeer, Server};
use openclaw::protocol::api::TaskState;
use openclaw::protocol::{self, topics, DeviceStatus};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `openclaw-admin device add ID --data-dir DIR [extra]`: the password.
fn device_add(data: &Path, id: &str, extra: &[&str]) -> String {
    let d = data.display().to_string();
    let mut args = vec!["--json", "device", "add", id, "--data-dir", &d];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["password"].as_str().unwrap().to_string()
}

fn admin(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn devices_log_in_as_themselves_and_reach_only_their_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let pi1 = device_add(&data, "pi-1", &[]);
    let pi2 = device_add(&data, "pi-2", &[]);
    let app = device_add(&data, "erp-1", &["--submit"]);
    // Ids the topic layout cannot hold are refused by name.
    let d = data.display().to_string();
    let (ok, text) = admin(&["device", "add", "a/b", "--data-dir", &d]);
    assert!(!ok && text.contains("\"a/b\" is not valid"), "{text}");
    let (ok, text) = admin(&["device", "add", "pi-1", "--data-dir", &d]);
    assert!(!ok && text.contains("--replace"), "{text}");

    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[mqtt]\nauth = \"required\"\n").unwrap();
    let s = Server::start(&data, &["--config", cfg.to_str().unwrap()]);
    let port = s.mqtt_port;

    // Who may log in.
    assert!(!MqttPeer::login_accepted(port, "anon", None), "anonymous");
    assert!(!MqttPeer::login_accepted(
        port,
        "pi-2",
        Some(("pi-2", "wrong"))
    ));
    assert!(
        !MqttPeer::login_accepted(port, "pi-1", Some(("pi-2", &pi2))),
        "pi-2's login with pi-1's client id (a session takeover)"
    );
    assert!(!MqttPeer::login_accepted(
        port,
        "openclaw-server",
        Some(("openclaw-server", "x"))
    ));
    assert!(MqttPeer::login_accepted(port, "pi-2", Some(("pi-2", &pi2))));

    // A device with its identity runs tasks end to end.
    let _agent = Agent::start_with_login(dir.path(), "pi-1", &s.broker(), &pi1);
    s.wait_online("pi-1");
    let mut req = task("echo", json!({"n": 1}));
    req.target = Some("pi-1".into());
    let id = s.submit(req);
    assert_eq!(s.wait(&id).state, TaskState::Succeeded);

    // pi-2, logged in, tries to read pi-1's tasks and everything else.
    let spy = MqttPeer::connect_as(
        port,
        "pi-2",
        Some(("pi-2", &pi2)),
        &[&topics::tasks("pi-1"), "#", "openclaw/v1/devices/+/results"],
    );
    // It may announce itself, but not a device it is not...
    let fake = DeviceStatus {
        device_id: "ghost".into(),
        online: true,
        board: "sim".into(),
        plugins: vec!["echo".into()],
        capabilities: vec!["plugin:echo".into()],
        max_concurrency: 4,
        queue_capacity: 4,
        heartbeat_ms: 60_000,
        ..Default::default()
    };
    spy.client
        .publish(
            topics::status("ghost"),
            rumqttc::QoS::AtLeastOnce,
            true,
            protocol::encode(&fake),
        )
        .unwrap();
    // ...nor submit without the grant.
    spy.publish(
        topics::SUBMIT,
        serde_json::to_vec(&json!({"plugin": "echo", "input": {"from": "pi-2"}})).unwrap(),
    );
    let mut req = task("echo", json!({"n": 2}));
    req.target = Some("pi-1".into());
    let id2 = s.submit(req);
    assert_eq!(s.wait(&id2).state, TaskState::Succeeded);

    // The granted submitter submits, and gets its replies under its prefix.
    let replies = "openclaw/clients/erp-1/replies";
    let erp = MqttPeer::connect_as(port, "erp-1", Some(("erp-1", &app)), &[replies]);
    let submit = json!({"plugin": "echo", "input": {"from": "erp"}, "target": "pi-1",
                        "reply_to": replies, "correlation": "po-1"});
    erp.publish(topics::SUBMIT, serde_json::to_vec(&submit).unwrap());
    let mut events = Vec::new();
    while events.last().map(String::as_str) != Some("succeeded") {
        let r: Value = serde_json::from_slice(&erp.next_on(replies).payload).unwrap();
        events.push(r["event"].as_str().unwrap().to_string());
    }

    // By now the broker has handled every packet the spy sent before: it
    // received none of pi-1's dispatches or results (wait a little more
    // for stragglers; a message would have come long before).
    let got: Vec<String> =
        std::iter::from_fn(|| spy.rx.recv_timeout(Duration::from_millis(500)).ok())
            .map(|p| p.topic)
            .collect();
    assert!(got.is_empty(), "pi-2 read {got:?}");
    let devices = s.client.devices().unwrap();
    assert!(!devices.iter().any(|d| d.id == "ghost"), "{devices:?}");
    // Only the granted submission became a task.
    // (two through HTTP, one from erp-1; the list shows no inputs)
    let all = s.client.list(None, 100).unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(
        events.first().map(String::as_str),
        Some("accepted"),
        "{events:?}"
    );

    // A revoked identity cannot log in again.
    let (ok, text) = admin(&["device", "revoke", "pi-2", "--data-dir", &d]);
    assert!(ok, "{text}");
    assert!(!MqttPeer::login_accepted(
        port,
        "pi-2",
        Some(("pi-2", &pi2))
    ));
    let (ok, text) = admin(&["--json", "device", "list", "--data-dir", &d]);
    assert!(ok && text.contains("\"revoked_ms\":"), "{text}");
    assert!(!text.contains(&pi1), "a password is listed: {text}");
}
