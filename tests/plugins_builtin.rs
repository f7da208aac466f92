//! The built-in plugins (file, http, exec, transform, anomaly, publish) and
//! process plugins (a shell plugin and the Python SDK's bom_extractor)
//! answering real tasks through a real server and agent. Every bad input,
//! dead peer and timeout fails its task with an error naming the plugin and
//! field, and the agent keeps serving.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, MqttPeer, Server};
use openclaw::protocol::api::{TaskState, TaskView};
use rumqttc::QoS;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ok(server: &Server, plugin: &str, input: Value) -> Value {
    let t = server.wait(&server.submit(task(plugin, input.clone())));
    assert_eq!(t.state, TaskState::Succeeded, "{plugin} {input}: {t:?}");
    t.result.unwrap()
}

fn fails(server: &Server, plugin: &str, input: Value) -> TaskView {
    let t = server.wait(&server.submit(task(plugin, input.clone())));
    assert_eq!(t.state, TaskState::Failed, "{plugin} {input}: {t:?}");
    t
}

/// Each (input, needle): the task fails with an error naming the plugin and
/// containing the needle (the field, usually).
fn all_fail(server: &Server, plugin: &str, cases: &[(Value, &str)]) {
    for (input, needle) in cases {
        let t = fails(server, plugin, input.clone());
        let e = t.error.unwrap_or_default();
        assert!(
            e.contains(&format!("`{plugin}`")) && e.contains(needle),
            "{plugin} {input}: {e}"
        );
    }
}

/// A tiny HTTP server: answers each request with a JSON echo of it.
fn http_echo() -> u16 {
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
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap();
                    }
                    headers.insert(k.to_ascii_lowercase(), json!(v.trim()));
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let status = if first.contains("/missing") {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                let answer = json!({"request": first.trim_end(), "headers": headers,
                    "body": String::from_utf8_lossy(&body)})
                .to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            });
        }
    });
    port
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

#[test]
fn file_http_exec_transform_anomaly_through_a_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("files");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("in")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "s").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("link")).unwrap();
    std::fs::write(root.join("big"), vec![b'x'; 5000]).unwrap();
    let port = http_echo();
    // Accepts connections and never answers: the timeout case.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let dead_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = format!(
        "[plugins.file]\nroot = {root}\nmax_read_bytes = 4096\n\
         [plugins.http]\nallow = [\"127.0.0.1\"]\n\
         [plugins.exec]\nmax_output_bytes = 64\n\
         [plugins.exec.commands.greet]\nprogram = \"/bin/echo\"\nargs = [\"hello\", \"{{input.who}}\"]\n\
         [plugins.exec.commands.sh]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"{{input.script}}\"]\ntimeout_ms = 500\n\
         [plugins.transform]\n\
         [plugins.anomaly]\n",
        root = toml_str(&root)
    );
    if cfg!(feature = "inference") {
        config.push_str(&format!(
            "models_dir = {}\n",
            toml_str(&repo().join("models"))
        ));
    }
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "pb-1", &server.broker(), &config);
    server.wait_online("pb-1");
    let d = server.client.devices().unwrap();
    let caps = &d.iter().find(|d| d.id == "pb-1").unwrap().capabilities;
    for c in [
        "plugin:file",
        "plugin:http",
        "plugin:exec",
        "exec:greet",
        "plugin:transform",
        "plugin:anomaly",
    ] {
        assert!(caps.contains(&c.to_string()), "{c}: {caps:?}");
    }

    // file
    ok(
        &server,
        "file",
        json!({"op": "write", "path": "in/a.csv", "content": "line,qty\nA,2\nB,5\nA,3\n"}),
    );
    let r = ok(&server, "file", json!({"op": "read", "path": "in/a.csv"}));
    assert_eq!(r["content"], "line,qty\nA,2\nB,5\nA,3\n");
    let r = ok(&server, "file", json!({"op": "hash", "path": "in/a.csv"}));
    assert_eq!(r["sha256"].as_str().unwrap().len(), 64);
    ok(
        &server,
        "file",
        json!({"op": "move", "from": "in/a.csv", "to": "b.csv"}),
    );
    let r = ok(&server, "file", json!({"op": "list"}));
    let names: Vec<&str> = r["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b.csv", "big", "in", "link"]);
    ok(&server, "file", json!({"op": "delete", "path": "b.csv"}));
    assert!(!root.join("b.csv").exists());
    all_fail(
        &server,
        "file",
        &[
            (json!({"op": "read", "path": "../outside/secret"}), "`path`"),
            (json!({"op": "read", "path": "/etc/passwd"}), "`path`"),
            (json!({"op": "read", "path": "link"}), "outside the root"),
            (
                json!({"op": "write", "path": "link", "content": "x"}),
                "`path`",
            ),
            (json!({"op": "move", "from": "big", "to": "../big"}), "`to`"),
            (json!({"op": "read", "path": "big"}), "max_read_bytes"),
            (json!({"op": "chmod", "path": "big"}), "`op`"),
            (json!({"path": "big"}), "`op`"),
            (json!("read big"), "`input`"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "s"
    );

    // http
    let r = ok(
        &server,
        "http",
        json!({"url": format!("http://127.0.0.1:{port}/v1/x"), "method": "PUT",
        "headers": {"authorization": "Bearer t"}, "json": {"n": 1}}),
    );
    assert_eq!(r["status"], 200);
    assert_eq!(r["json"]["request"], "PUT /v1/x HTTP/1.1");
    assert_eq!(r["json"]["headers"]["authorization"], "Bearer t");
    assert_eq!(r["json"]["body"], "{\"n\":1}");
    let r = ok(
        &server,
        "http",
        json!({"url": format!("http://127.0.0.1:{port}/missing")}),
    );
    assert_eq!(r["status"], 404);
    all_fail(
        &server,
        "http",
        &[
            (json!({"url": "http://localhost:1/"}), "allow-list"),
            (json!({"url": "http://10.0.0.1/"}), "allow-list"),
            (
                json!({"url": format!("http://127.0.0.1:{dead_port}/")}),
                "`url`",
            ),
            (
                json!({"url": format!("http://127.0.0.1:{silent_port}/"), "timeout_ms": 300}),
                "timeout_ms",
            ),
            (
                json!({"url": format!("http://127.0.0.1:{port}/"), "method": "GET", "body": "x"}),
                "`body`",
            ),
            (json!({"method": "GET"}), "`url`"),
        ],
    );
    drop(silent);

    // exec
    let r = ok(
        &server,
        "exec",
        json!({"command": "greet", "who": "edge; reboot"}),
    );
    assert_eq!(r["stdout"], "hello edge; reboot\n");
    assert_eq!(r["exit_code"], 0);
    let r = ok(
        &server,
        "exec",
        json!({"command": "sh", "script": "yes | head -c 10000; exit 4"}),
    );
    assert_eq!(r["exit_code"], 4);
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 64);
    all_fail(
        &server,
        "exec",
        &[
            (json!({"command": "sh", "script": "sleep 5"}), "timeout_ms"),
            (json!({"command": "rm"}), "`command`"),
            (json!({"command": "greet"}), "`who`"),
            (json!({"command": "greet", "who": "--help"}), "`who`"),
        ],
    );

    // transform: the CSV written above, shaped and aggregated.
    let r = ok(
        &server,
        "transform",
        json!({"csv": "line,qty,t\nA,2,31\nB,5,29\nA,3,35\n",
        "filter": [{"field": "t", "op": ">", "value": 30}],
        "aggregate": {"group_by": "line", "sum": ["qty"], "count": true, "mean": ["t"]}}),
    );
    assert_eq!(
        r["records"],
        json!([{"line": "A", "count": 2, "sum_qty": 5, "mean_t": 33}])
    );
    let r = ok(
        &server,
        "transform",
        json!({"records": [{"a": 1}, {"a": 2}],
        "map": {"b": {"field": "a", "mul": 2.5}}, "select": ["b"], "format": "csv"}),
    );
    assert_eq!(r["csv"], "b\n2.5\n5\n");
    all_fail(
        &server,
        "transform",
        &[
            (json!({}), "`records`"),
            (
                json!({"records": [{"a": 1}], "filter": [{"field": "a", "op": "~", "value": 1}]}),
                "`filter[0].op`",
            ),
            (
                json!({"records": [{"a": "x"}], "aggregate": {"sum": ["a"]}}),
                "`aggregate.sum`",
            ),
        ],
    );

    // anomaly
    let r = ok(
        &server,
        "anomaly",
        json!({"values": [20, 21, 35, 36, 28, 24, 20], "high": 30, "low": 25}),
    );
    assert_eq!(
        r["alarm"],
        json!([false, false, true, true, true, false, false])
    );
    assert_eq!(
        r["alarms"],
        json!([{"start_index": 2, "end_index": 4, "start": 2, "end": 4, "points": 3, "peak": 36.0}])
    );
    all_fail(
        &server,
        "anomaly",
        &[
            (json!({"values": [1, "x"]}), "`values[1]`"),
            (json!({"values": [1, 2], "high": 1, "low": 5}), "`low`"),
            (json!({"values": [1, 2], "window": 0}), "`window`"),
            (json!({"series": [1, 2]}), "`series`: unknown field"),
        ],
    );
    #[cfg(feature = "inference")]
    {
        let g: Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("models/golden/sensor_anomaly.json")).unwrap(),
        )
        .unwrap();
        let cases = g["cases"].as_array().unwrap();
        let rows: Vec<Value> = cases
            .iter()
            .map(|c| c["inputs"][0]["values"].clone())
            .collect();
        let r = ok(
            &server,
            "anomaly",
            json!({"model": "sensor_anomaly", "features": rows}),
        );
        for (case, got) in cases.iter().zip(r["classes"].as_array().unwrap()) {
            let want = case["outputs"][0]["values"].as_array().unwrap();
            for (a, b) in got["probabilities"].as_array().unwrap().iter().zip(want) {
                assert!(
                    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5,
                    "{case}"
                );
            }
        }
        assert_eq!(r["classes"][0]["label"], "normal");
        all_fail(
            &server,
            "anomaly",
            &[(json!({"features": [[1, 2, 3]]}), "`features[0]`")],
        );
    }

    // After all that the agent is still the same process, still serving.
    assert!(agent.alive());
    ok(&server, "echo", json!({"still": "here"}));
}

#[test]
fn publish_puts_messages_on_the_broker_and_refuses_our_tree() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let dead_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "[plugins.publish]\nbroker = \"{}\"\nmax_payload_bytes = 1000\n",
        server.broker()
    );
    let mut agent = Agent::start(dir.path(), "pub-1", &server.broker(), &config);
    server.wait_online("pub-1");
    let peer = MqttPeer::connect(server.mqtt_port, "pb-peer", &["plant/#"]);

    let r = ok(
        &server,
        "publish",
        json!({"topic": "plant/line1/temp", "json": {"t": 31.5}, "qos": 1}),
    );
    assert_eq!(r["qos"], 1);
    let p = peer.next();
    assert_eq!(p.topic, "plant/line1/temp");
    assert_eq!(&p.payload[..], b"{\"t\":31.5}");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    ok(
        &server,
        "publish",
        json!({"topic": "plant/line1/state", "payload": "running", "retain": true}),
    );
    let p = peer.next();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("plant/line1/state", &b"running"[..])
    );
    // Retained: a late subscriber still gets it.
    let late = MqttPeer::connect(server.mqtt_port, "pb-late", &["plant/line1/state"]);
    let p = late.next();
    assert!(p.retain && &p.payload[..] == b"running", "{p:?}");

    all_fail(
        &server,
        "publish",
        &[
            (
                json!({"topic": "openclaw/devices/pub-1/tasks", "payload": "x"}),
                "`topic`",
            ),
            (json!({"topic": "plant/#", "payload": "x"}), "`topic`"),
            (json!({"topic": "plant/+/t", "payload": "x"}), "`topic`"),
            (
                json!({"topic": "plant/x", "payload": "x", "qos": 2}),
                "`qos`",
            ),
            (
                json!({"topic": "plant/x", "payload": "x".repeat(1001)}),
                "max_payload_bytes",
            ),
            (json!({"payload": "x"}), "`topic`"),
        ],
    );
    agent.stop();

    // A second agent whose publish broker is dead: the task fails clearly.
    let config = format!(
        "[plugins.publish]\nbroker = \"mqtt://127.0.0.1:{dead_port}\"\nconnect_timeout_ms = 500\n"
    );
    let mut agent = Agent::start(dir.path(), "pub-2", &server.broker(), &config);
    server.wait_online("pub-2");
    let mut req = task("publish", json!({"topic": "plant/x", "payload": "x"}));
    req.target = Some("pub-2".into());
    let t = server.wait(&server.submit(req));
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let e = t.error.unwrap();
    assert!(e.contains("`publish`") && e.contains("`broker`"), "{e}");
    assert!(agent.alive());
}

const SHELL_PLUGIN: &str = r#"#!/bin/sh
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
  case "$line" in
    *'"validate"'*) echo '{"type":"result","id":"validate","output":true}' ;;
    *'"do":"ok"'*) echo "{\"type\":\"result\",\"id\":\"$id\",\"output\":{\"pid\":$$}}" ;;
    *'"do":"crash"'*) kill -9 $$ ;;
    *'"do":"hang"'*) sleep 60 ;;
    *'"do":"garbage"'*) echo '<html>oops</html>' ;;
    *'"do":"huge"'*) head -c 100000 /dev/zero | tr '\0' 'x'; echo ;;
  esac
done
"#;

#[test]
fn process_plugins_in_any_language_through_a_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let shp = plugins.join("shp");
    std::fs::create_dir_all(&shp).unwrap();
    std::fs::write(shp.join("run.sh"), SHELL_PLUGIN).unwrap();
    std::fs::write(
        shp.join("plugin.toml"),
        "name = \"shp\"\ncommand = \"/bin/sh\"\nargs = [\"run.sh\"]\ntimeout_ms = 3000\n\
         max_line_bytes = 4096\ncapabilities = [\"shell-demo\"]\n\
         [input]\nrequired = [\"do\"]\ntypes = { do = \"string\" }\n",
    )
    .unwrap();
    let config = format!(
        "[plugins.process]\ndirs = [{}, {}]\n",
        toml_str(&plugins),
        toml_str(&repo().join("sdk/python/examples/bom_extractor"))
    );
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "proc-1", &server.broker(), &config);
    server.wait_online("proc-1");
    let d = server.client.devices().unwrap();
    let caps = &d.iter().find(|d| d.id == "proc-1").unwrap().capabilities;
    for c in ["plugin:shp", "shell-demo", "plugin:bom_extractor", "bom"] {
        assert!(caps.contains(&c.to_string()), "{c}: {caps:?}");
    }

    // The Python SDK example.
    let r = ok(
        &server,
        "bom_extractor",
        json!({"lines": [
        "R1 10k 0603 x4", "C3,C4 100nF O402", "LED1 red 0805 xl", "Page 2 of 3"]}),
    );
    assert_eq!(
        r["parts"][0],
        json!({"ref": "R1", "refs": ["R1"], "value": "10k", "package": "0603", "qty": 4, "line": 0})
    );
    assert_eq!(r["parts"][1]["qty"], 2);
    assert_eq!(r["parts"][1]["package"], "0402");
    assert_eq!(r["parts"][2]["qty"], 1);
    assert_eq!(r["unparsed"], json!([{"line": 3, "text": "Page 2 of 3"}]));
    assert_eq!(r["total_qty"], 7);
    all_fail(
        &server,
        "bom_extractor",
        &[
            (json!({}), "`lines`"),
            (json!({"lines": "R1 10k"}), "`lines`"),
            (json!({"lines": [1]}), "lines[0]"),
        ],
    );

    // The shell plugin: reused, then each kind of misbehaviour fails only
    // its own task and the next task gets a fresh process.
    let a = ok(&server, "shp", json!({"do": "ok"}));
    let b = ok(&server, "shp", json!({"do": "ok"}));
    assert_eq!(a["pid"], b["pid"], "the process is reused");
    let mut last = a["pid"].clone();
    for (what, needle) in [
        ("crash", "signal 9"),
        ("hang", "timeout_ms"),
        ("garbage", "not a protocol message"),
        ("huge", "max_line_bytes"),
    ] {
        let started = Instant::now();
        let t = fails(&server, "shp", json!({"do": what}));
        let e = t.error.unwrap();
        assert!(e.contains("`shp`") && e.contains(needle), "{what}: {e}");
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        let r = ok(&server, "shp", json!({"do": "ok"}));
        assert_ne!(r["pid"], last, "{what}: a new process");
        last = r["pid"].clone();
    }
    all_fail(
        &server,
        "shp",
        &[(json!({}), "`do`"), (json!({"do": 5}), "`do`")],
    );
    assert!(agent.alive());
}

/// The SDK's own Python tests (protocol edge cases, the bom parser), so CI
/// runs them with the rest.
#[test]
fn python_sdk_unit_tests_pass() {
    let out = std::process::Command::new("python3")
        .args(["-m", "unittest", "discover", "-s"])
        .arg(repo().join("sdk/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Ran ") && text.contains("OK"), "{text}");
}

/// The agent checks input against each plugin's declaration before
/// `execute`, and holds a plugin to its concurrency limit (`concurrency = 1`
/// here): its tasks wait in the agent's queue and run one after another.
#[test]
fn declared_schema_and_concurrency_are_enforced_by_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let config = "[plugins.echo]\nconcurrency = 1\n[plugins.sysinfo]\n";
    let mut agent = Agent::start(dir.path(), "decl-1", &server.broker(), config);
    server.wait_online("decl-1");

    // The schema's own wording ("expected integer", "unknown field"), not
    // the plugins' in-execute checks: refused before `execute`.
    all_fail(
        &server,
        "echo",
        &[
            (json!({"sleep_ms": "soon"}), "`sleep_ms`: expected integer"),
            (json!({"sleep_ms": -1}), "`sleep_ms`: -1 is out of range"),
            (json!({"panic": "yes"}), "`panic`: expected boolean"),
        ],
    );
    all_fail(
        &server,
        "sysinfo",
        &[
            (json!({"verbose": true}), "`verbose`: unknown field"),
            (json!([1]), "`input`: expected null or object"),
        ],
    );

    let ids: Vec<String> = (0..3)
        .map(|i| server.submit(task("echo", json!({"sleep_ms": 300, "n": i}))))
        .collect();
    let other = server.submit(task("sysinfo", json!({})));
    let mut done: Vec<TaskView> = ids.iter().map(|id| server.wait(id)).collect();
    let other = server.wait(&other);
    assert_eq!(other.state, TaskState::Succeeded, "{other:?}");
    for t in &done {
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    }
    done.sort_by_key(|t| t.started_ms);
    for w in done.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        // One at a time: the next starts only after the previous finished.
        assert!(
            b.started_ms.unwrap() >= a.finished_ms.unwrap(),
            "overlap: {a:?} {b:?}"
        );
    }
    // A plugin at its limit does not hold up the others: sysinfo, queued
    // behind the echoes, ran while they waited for their slot.
    assert!(
        other.finished_ms.unwrap() < done[2].started_ms.unwrap(),
        "sysinfo waited for echo: {other:?} {:?}",
        done[2]
    );
    assert!(agent.alive());
}
