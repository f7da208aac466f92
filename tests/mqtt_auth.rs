//! Device identities on the embedded broker (issue 12, item 2), with real
//! server and agent processes: `mqtt.auth = "required"` refuses anonymous
//! clients, wrong passwords, revoked identities and a client id that is not
//! the login's (no session takeover); a device reads only its own task
//! topic, publishes only its own status and results, and submits only if
//! granted; tasks still run end to end. The same identities and rules on a
//! real mosquitto 2 through `openclaw-admin broker-config`.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, Mosquitto, MqttPeer, Server};
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

/// Announces a device `ghost` (retained) that the publisher is not.
fn forge_ghost(spy: &MqttPeer) {
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
}

/// A submission from a client not granted submitting.
fn submit_ungranted(spy: &MqttPeer) {
    spy.publish(
        topics::SUBMIT,
        serde_json::to_vec(&json!({"plugin": "echo", "input": {"from": "pi-2"}})).unwrap(),
    );
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
    forge_ghost(&spy);
    // ...nor submit without the grant.
    submit_ungranted(&spy);
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

/// A granted submitter names where the server answers (`reply_to`), and the
/// server may publish anywhere: without a check, erp-1 could make it answer
/// into another submitter's reply topic (forged replies under a
/// correlation erp-2 chose) or into the sink every denied subscription was
/// changed to (which every device with a denied filter reads).
#[test]
fn a_submitter_gets_replies_only_under_its_own_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let pi1 = device_add(&data, "pi-1", &[]);
    let pi2 = device_add(&data, "pi-2", &[]);
    let erp1 = device_add(&data, "erp-1", &["--submit"]);
    let erp2 = device_add(&data, "erp-2", &["--submit"]);
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[mqtt]\nauth = \"required\"\n").unwrap();
    let s = Server::start(&data, &["--config", cfg.to_str().unwrap()]);
    let port = s.mqtt_port;
    let _agent = Agent::start_with_login(dir.path(), "pi-1", &s.broker(), &pi1);
    s.wait_online("pi-1");

    // pi-2 asked for everything: its filter became the sink's.
    let sink_reader = MqttPeer::connect_as(port, "pi-2", Some(("pi-2", &pi2)), &["#"]);
    let victim_topic = "openclaw/clients/erp-2/replies";
    let victim = MqttPeer::connect_as(port, "erp-2", Some(("erp-2", &erp2)), &[victim_topic]);
    let own = "openclaw/clients/erp-1/replies";
    let erp = MqttPeer::connect_as(port, "erp-1", Some(("erp-1", &erp1)), &[own]);
    for (topic, corr) in [
        (victim_topic, "po-1"),
        ("openclaw-denied/subscribe", "x"),
        ("elsewhere/replies", "y"),
    ] {
        // A valid submission and a broken one (answered with "rejected").
        let ok = json!({"plugin": "echo", "input": {"forged": true}, "target": "pi-1",
                        "reply_to": topic, "correlation": corr});
        erp.publish(topics::SUBMIT, serde_json::to_vec(&ok).unwrap());
        let broken = json!({"plugin": 7, "reply_to": topic, "correlation": corr});
        erp.publish(topics::SUBMIT, serde_json::to_vec(&broken).unwrap());
    }
    // Its own prefix still works, and by its answer the ones before were handled.
    let submit = json!({"plugin": "echo", "input": {}, "target": "pi-1",
                        "reply_to": own, "correlation": "mine"});
    erp.publish(topics::SUBMIT, serde_json::to_vec(&submit).unwrap());
    loop {
        let r: Value = serde_json::from_slice(&erp.next_on(own).payload).unwrap();
        if r["event"] == "succeeded" && r["correlation"] == "mine" {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(1000));
    let got: Vec<String> =
        std::iter::from_fn(|| victim.rx.recv_timeout(Duration::from_millis(200)).ok())
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect();
    assert!(
        got.is_empty(),
        "erp-2 got replies it never asked for: {got:?}"
    );
    let got: Vec<String> =
        std::iter::from_fn(|| sink_reader.rx.recv_timeout(Duration::from_millis(200)).ok())
            .map(|p| p.topic)
            .collect();
    assert!(got.is_empty(), "pi-2 read {got:?}");
    // None of the forged submissions became a task.
    let all = s.client.list(None, 100).unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
}

/// `mqtt.auth` applies to the embedded broker only: with an external one it
/// would silently protect nothing.
#[test]
fn auth_required_with_an_external_broker_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        "[mqtt]\nembedded = false\nbroker = \"mqtt://127.0.0.1:1\"\nauth = \"required\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
        .args(["--config", cfg.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("srv"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Unchecked, the server would run on, retrying its broker.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "still running: {err}");
    assert!(err.contains("mqtt.auth"), "{err}");
}

/// The embedded broker listens on loopback unless told otherwise; told to
/// listen on the network with no logins, the server refuses to start and
/// says why, unless `mqtt.allow_anonymous` says that is meant.
#[test]
fn an_anonymous_broker_on_the_network_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let print = |conf: &str| {
        let cfg = dir.path().join("server.toml");
        std::fs::write(&cfg, conf).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
            .args(["--config", cfg.to_str().unwrap(), "--print-config"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = print("");
    assert!(ok, "{text}");
    let v: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(v["mqtt"]["host"].as_str(), Some("127.0.0.1"), "{text}");
    let (ok, text) = print("[mqtt]\nhost = \"0.0.0.0\"\n");
    assert!(
        !ok && text.contains("mqtt.auth")
            && text.contains("0.0.0.0")
            && text.contains("allow_anonymous"),
        "{text}"
    );
    let (ok, text) = print("[mqtt]\nhost = \"0.0.0.0\"\nallow_anonymous = true\n");
    assert!(ok, "{text}");
    let (ok, text) = print("[mqtt]\nhost = \"0.0.0.0\"\nauth = \"required\"\n");
    assert!(ok, "{text}");
}

/// A SIGKILLed server comes back with a new secret of its own; devices log
/// in again with theirs and run tasks. Failed logins cost little (timed
/// and printed, not asserted), even with 64 KiB names and passwords.
#[test]
fn devices_log_in_again_after_a_server_crash_and_bad_logins_are_cheap() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let pi1 = device_add(&data, "pi-1", &[]);
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[mqtt]\nauth = \"required\"\n").unwrap();
    let mut s = Server::start(&data, &["--config", cfg.to_str().unwrap()]);
    let _agent = Agent::start_with_login(dir.path(), "pi-1", &s.broker(), &pi1);
    s.wait_online("pi-1");

    let t = std::time::Instant::now();
    let n = 200;
    for i in 0..n {
        assert!(!MqttPeer::login_accepted(
            s.mqtt_port,
            "pi-1",
            Some(("pi-1", &format!("wrong-{i}")))
        ));
    }
    eprintln!("{n} wrong passwords: {:?} each", t.elapsed() / n);
    let big = "x".repeat(64 << 10);
    let t = std::time::Instant::now();
    assert!(!MqttPeer::login_accepted(
        s.mqtt_port,
        &big,
        Some((&big, &big))
    ));
    eprintln!("a 64 KiB login: {:?}", t.elapsed());
    // The device's own session was not disturbed by the failed logins.
    let mut req = task("echo", json!({"n": 1}));
    req.target = Some("pi-1".into());
    let id = s.submit(req);
    assert_eq!(s.wait(&id).state, TaskState::Succeeded);

    s.restart();
    s.wait_online("pi-1");
    let mut req = task("echo", json!({"n": 2}));
    req.target = Some("pi-1".into());
    let id = s.submit(req);
    assert_eq!(s.wait(&id).state, TaskState::Succeeded);
}

/// Revoking an identity ends the session it has open: the broker closes
/// the connection within a few seconds (`REVOCATION_CHECK`), the client's
/// logins are refused from then on, and the server takes no more results
/// from it (before, a revoked agent that stayed connected ran and
/// reported tasks indefinitely; later it only lost its rights but stayed
/// connected, subscribed to its tasks).
#[test]
fn a_revoked_device_session_is_closed_and_its_results_are_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let pi1 = device_add(&data, "pi-1", &[]);
    let pi2 = device_add(&data, "pi-2", &[]);
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[mqtt]\nauth = \"required\"\n").unwrap();
    let s = Server::start(&data, &["--config", cfg.to_str().unwrap()]);
    let _agent = Agent::start_with_login(dir.path(), "pi-1", &s.broker(), &pi1);
    s.wait_online("pi-1");
    // A bare client as pi-2, to watch its connection from the outside.
    let mut opts = rumqttc::MqttOptions::new("pi-2", "127.0.0.1", s.mqtt_port);
    opts.set_credentials("pi-2", pi2.as_str());
    opts.set_clean_session(false);
    let (client, mut conn) = rumqttc::Client::new(opts, 16);
    client
        .subscribe(topics::tasks("pi-2"), rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let done = match &ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    tx.send("subscribed".to_string()).is_err()
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    tx.send(format!("connack {:?}", a.code)).is_err()
                }
                Ok(_) => false,
                Err(e) => tx.send(format!("error: {e}")).is_err(),
            };
            if done {
                break;
            }
            if ev.is_err() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(20)).expect("an event");
    assert_eq!(next(), "connack Success");
    assert_eq!(next(), "subscribed");
    let d = data.display().to_string();
    for id in ["pi-1", "pi-2"] {
        let (ok, text) = admin(&["device", "revoke", id, "--data-dir", &d]);
        assert!(ok, "{text}");
    }
    // The open session is closed by the broker...
    let closed = next();
    assert!(closed.starts_with("error:"), "{closed}");
    // ...and each try to come back is refused at CONNECT (rumqttd closes
    // the connection without a CONNACK).
    for _ in 0..3 {
        let again = next();
        assert!(again.starts_with("error:"), "{again}");
    }
    drop(client);
    // The agent's session was closed as well: the server sees it go.
    s.wait_offline("pi-1");
    let mut req = task("echo", json!({"n": 1}));
    req.target = Some("pi-1".into());
    let id = s.submit(req);
    let t = s.client.wait(&id, Duration::from_secs(5)).unwrap();
    assert_ne!(t.state, TaskState::Succeeded, "{t:?}");
}

/// Filters that would reach another device's tasks by wildcard, shared
/// subscription, a trailing level or case are all denied.
#[test]
fn filter_tricks_do_not_reach_another_device_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let pi1 = device_add(&data, "pi-1", &[]);
    let pi2 = device_add(&data, "pi-2", &[]);
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[mqtt]\nauth = \"required\"\n").unwrap();
    let s = Server::start(&data, &["--config", cfg.to_str().unwrap()]);
    let _agent = Agent::start_with_login(dir.path(), "pi-1", &s.broker(), &pi1);
    s.wait_online("pi-1");
    let spy = MqttPeer::connect_as(
        s.mqtt_port,
        "pi-2",
        Some(("pi-2", &pi2)),
        &[
            "$share/g/openclaw/v1/devices/pi-1/tasks",
            "$share/g/openclaw/v1/devices/pi-2/tasks",
            "openclaw/v1/devices/pi-1/tasks/#",
            "openclaw/v1/devices/pi-2/tasks/../../pi-1/tasks",
            "+/v1/devices/pi-1/tasks",
            "openclaw/v1/devices/+/tasks",
            "openclaw/v1/devices/pi-1/tasks/",
            "OPENCLAW/v1/devices/pi-1/tasks",
            "openclaw-denied/publish",
        ],
    );
    for n in 0..3 {
        let mut req = task("echo", json!({ "n": n }));
        req.target = Some("pi-1".into());
        let id = s.submit(req);
        assert_eq!(s.wait(&id).state, TaskState::Succeeded);
    }
    let got: Vec<String> =
        std::iter::from_fn(|| spy.rx.recv_timeout(Duration::from_millis(500)).ok())
            .map(|p| p.topic)
            .collect();
    assert!(got.is_empty(), "pi-2 read {got:?}");
}

/// `openclaw-admin broker-config` gives a real mosquitto 2 the same
/// identities and topic rules: anonymous and wrong logins are refused; a
/// device runs tasks with its password; another device reads none of its
/// tasks, cannot announce a device it is not or submit without the grant;
/// connecting with another device's client id gets its own (its user name)
/// instead of taking the other's session over; after `device revoke`, the
/// files written again and mosquitto reloaded, the revoked login is
/// refused while the server's own login (kept across runs) still works.
#[test]
fn broker_config_gives_mosquitto_the_same_identities_and_rules() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("srv");
    let pi1 = device_add(&data, "pi-1", &[]);
    let pi2 = device_add(&data, "pi-2", &[]);
    let port = common::free_port();
    let out = d.join("mq");
    let (ds, os, ps) = (
        data.display().to_string(),
        out.display().to_string(),
        port.to_string(),
    );
    let config = [
        "--json",
        "broker-config",
        "--out",
        &os,
        "--data-dir",
        &ds,
        "--port",
        &ps,
        "--bind",
        "127.0.0.1",
    ];
    let (ok, text) = admin(&config);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["devices"], 2, "{v}");
    assert_eq!(v["new_server_password"], true, "{v}");
    // mosquitto, started as root, reads its files as its own user.
    let conf = out.join("mosquitto.conf");
    let log = d.join("mosquitto.log");
    let mut c = std::fs::read_to_string(&conf).unwrap();
    c.push_str(&format!(
        "persistence false\nlog_dest file {}\nlog_type all\n",
        log.display()
    ));
    std::fs::write(&conf, c).unwrap();
    for p in [d, &out] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    for f in ["passwd", "acl", "mosquitto.conf"] {
        std::fs::set_permissions(out.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let broker = Mosquitto::start_file(&conf, port);

    assert!(!MqttPeer::login_accepted(port, "anon", None), "anonymous");
    assert!(!MqttPeer::login_accepted(
        port,
        "pi-2",
        Some(("pi-2", "wrong"))
    ));
    assert!(MqttPeer::login_accepted(port, "pi-2", Some(("pi-2", &pi2))));

    let server_toml = out.join("server.toml");
    let s = Server::start_with_broker(&data, port, &["--config", server_toml.to_str().unwrap()]);
    let url = format!("mqtt://127.0.0.1:{port}");
    let _agent = Agent::start_with_login(d, "pi-1", &url, &pi1);
    s.wait_online("pi-1");
    let run_on_pi1 = |n: u32| {
        let mut req = task("echo", json!({ "n": n }));
        req.target = Some("pi-1".into());
        let id = s.submit(req);
        let t = s.wait(&id);
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    };
    run_on_pi1(1);

    // pi-2's login with pi-1's client id: mosquitto gives it pi-2 instead.
    let logins = |text: &str| text.matches("u'pi-2'").count();
    let seen = logins(&std::fs::read_to_string(&log).unwrap_or_default());
    let spy = MqttPeer::connect_as(
        port,
        "pi-1",
        Some(("pi-2", &pi2)),
        &[&topics::tasks("pi-1"), "#", "openclaw/v1/devices/+/results"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if logins(&text) > seen {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no login of pi-2 logged: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !text.contains("Client pi-1 already connected"),
        "pi-2 took over pi-1's session: {text}"
    );
    forge_ghost(&spy);
    submit_ungranted(&spy);
    run_on_pi1(2);
    let got: Vec<String> =
        std::iter::from_fn(|| spy.rx.recv_timeout(Duration::from_millis(500)).ok())
            .map(|p| p.topic)
            .collect();
    assert!(got.is_empty(), "pi-2 read {got:?}");
    let devices = s.client.devices().unwrap();
    assert!(!devices.iter().any(|d| d.id == "ghost"), "{devices:?}");
    assert_eq!(s.client.list(None, 100).unwrap().len(), 2);

    // Revoked, written again, reloaded: pi-2 is out, the server is not.
    let before = std::fs::read_to_string(&server_toml).unwrap();
    let (ok, text) = admin(&["device", "revoke", "pi-2", "--data-dir", &ds]);
    assert!(ok, "{text}");
    let (ok, text) = admin(&config);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["devices"], 1, "{v}");
    assert_eq!(v["new_server_password"], false, "{v}");
    assert_eq!(std::fs::read_to_string(&server_toml).unwrap(), before);
    std::fs::set_permissions(out.join("passwd"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(out.join("acl"), std::fs::Permissions::from_mode(0o644)).unwrap();
    broker.reload();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while MqttPeer::login_accepted(port, "pi-2", Some(("pi-2", &pi2))) {
        assert!(
            std::time::Instant::now() < deadline,
            "pi-2 still logs in after the reload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run_on_pi1(3);
}
