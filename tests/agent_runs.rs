//! Agent runs end to end, on real processes: a server with its embedded
//! broker, edge agents whose catalogs (plugins with their JSON Schemas)
//! reach `GET /v1/devices` and `GET /v1/tools`, and (feature `llm`) a
//! heavy node with the real Qwen2.5-Coder-0.5B-Instruct GGUF planning
//! through them: `openclaw-admin agent run`, approvals, a denied call, and
//! a run that survives its server being SIGKILLed while it waits.

mod common;

use common::{wait_tools, Agent, Server};

fn exec_config() -> &'static str {
    "[plugins.exec]\nmax_output_bytes = 256\n\
     [plugins.exec.commands.hostname]\nprogram = \"/bin/echo\"\nargs = [\"host-of-dev-a\"]\n"
}

#[test]
fn each_devices_plugins_and_schemas_reach_the_server_as_tools() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), exec_config());
    let _b = Agent::start(dir.path(), "dev-b", &server.broker(), "");
    let tools = wait_tools(&server, |t| {
        ["exec__dev-a", "sysinfo__dev-a", "sysinfo__dev-b"]
            .iter()
            .all(|n| t.iter().any(|x| x["name"] == *n))
    });
    // One tool per plugin and device, named after both.
    let exec = tools.iter().find(|t| t["name"] == "exec__dev-a").unwrap();
    assert_eq!(exec["device"], "dev-a");
    assert_eq!(exec["effects"], "always", "{exec}");
    assert_eq!(exec["input_schema"]["type"], "object", "{exec}");
    assert!(
        exec["input_schema"]["properties"]["command"]["enum"]
            .as_array()
            .is_some_and(|e| e.iter().any(|c| c == "hostname")),
        "the configured commands are in the schema: {exec}"
    );
    let sys = tools
        .iter()
        .find(|t| t["name"] == "sysinfo__dev-b")
        .unwrap();
    assert_eq!(sys["plugin"], "sysinfo");
    assert_eq!(sys["effects"], "none");
    assert!(!sys["description"].as_str().unwrap_or("").is_empty());
    // The device list shows each device's plugins with their schemas.
    let devices = server.client.devices().unwrap();
    let a = devices.iter().find(|d| d.id == "dev-a").unwrap();
    let a_tools = a.tools.as_deref().expect("dev-a's catalog");
    let names: Vec<&str> = a_tools.iter().map(|t| t.name.as_str()).collect();
    assert!(
        names.contains(&"exec") && names.contains(&"sysinfo"),
        "{names:?}"
    );
    // A server restart forgets nothing for good: it asks again.
    let mut server = server;
    server.restart();
    server.wait_online("dev-a");
    wait_tools(&server, |t| t.iter().any(|x| x["name"] == "exec__dev-a"));
}

#[test]
fn a_forged_catalog_is_checked_and_bad_entries_are_left_out() {
    use openclaw::protocol::{self, topics, Catalog, FromAgent, ToolDecl};
    use openclaw::schema::Effects;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    wait_tools(&server, |t| t.iter().any(|x| x["name"] == "sysinfo__dev-a"));
    let peer = common::MqttPeer::connect(server.mqtt_port, "intruder", &[]);
    let decl = |name: &str, schema: String| ToolDecl {
        name: name.into(),
        version: "1".into(),
        description: "x".into(),
        input_schema: schema,
        effects: Effects::None,
    };
    let deep = "{\"items\":".repeat(5000) + &"}".repeat(5000);
    let forged = Catalog {
        plugins: vec![
            decl("good", "{\"type\":\"object\"}".into()),
            decl("../evil", "{}".into()),
            decl("deep", deep),
            decl("bad", "{\"type\":\"object\",\"pattern\":1}".into()),
        ],
    };
    let sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    peer.publish(
        &topics::results("dev-a"),
        protocol::encode(&FromAgent::Catalog(forged)),
    );
    // What failed the checks never shows; the forged list (other plugins
    // than dev-a's heartbeat names) makes the server ask dev-a again, so
    // its real catalog is back within a heartbeat or two.
    server.wait_devices("two heartbeats after the forged catalog", |d| {
        d.iter()
            .any(|d| d.id == "dev-a" && d.last_heartbeat_ms > sent + 700)
    });
    let tools = wait_tools(&server, |t| {
        t.iter().any(|x| x["name"] == "sysinfo__dev-a")
            && t.iter().any(|x| x["name"] == "echo__dev-a")
    });
    for t in &tools {
        let n = t["plugin"].as_str().unwrap();
        assert!(!["../evil", "deep", "bad"].contains(&n), "{tools:?}");
    }
    assert!(server.client.health().is_ok());
}

#[cfg(feature = "llm")]
mod with_a_model {
    use super::*;
    use serde_json::Value;
    use std::process::Command;
    use std::time::{Duration, Instant};

    const MODEL: &str = common::QWEN;

    fn node_config() -> String {
        common::qwen_node_config(4096, 1)
    }

    struct Rig {
        server: Server,
        _agents: Vec<Agent>,
        _dir: tempfile::TempDir,
    }

    /// A server, a heavy node, and two edge devices (dev-a with exec).
    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("srv"), &[]);
        let node = Agent::start_on(
            dir.path(),
            "heavy-1",
            &server.broker(),
            &node_config(),
            "pc",
        );
        let a = Agent::start(dir.path(), "dev-a", &server.broker(), exec_config());
        let b = Agent::start(dir.path(), "dev-b", &server.broker(), "");
        server.wait_devices("the heavy node serving the model", |d| {
            d.iter().any(|d| {
                d.id == "heavy-1"
                    && d.online
                    && d.capabilities.iter().any(|c| c == &format!("llm:{MODEL}"))
            })
        });
        wait_tools(&server, |t| {
            ["exec__dev-a", "sysinfo__dev-a", "sysinfo__dev-b"]
                .iter()
                .all(|n| t.iter().any(|x| x["name"] == *n))
        });
        Rig {
            server,
            _agents: vec![node, a, b],
            _dir: dir,
        }
    }

    fn admin(server: &Server, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
            .arg("--server")
            .arg(server.client.base())
            .args(args)
            .output()
            .expect("run openclaw-admin")
    }

    fn steps<'a>(run: &'a Value, kind: &str) -> Vec<&'a Value> {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == kind)
            .collect()
    }

    fn wait_state(server: &Server, id: &str, state: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = server.client.agent_get(id, Some(5000)).unwrap();
            if v["state"] == state {
                return v;
            }
            assert!(
                !v["state"].as_str().is_some_and(|s| {
                    ["succeeded", "failed", "cancelled"].contains(&s) && s != state
                }),
                "run ended {} while waiting for {state}: {v:#}",
                v["state"]
            );
            assert!(start.elapsed() < Duration::from_secs(600), "{v:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The done-when: the sysinfo task runs on the device the goal
    /// names, and its value is in the answer.
    #[test]
    fn agent_run_answers_from_the_sysinfo_task_on_the_named_device() {
        let r = rig();
        let out = admin(
            &r.server,
            &[
                "--json",
                "agent",
                "run",
                "--model",
                MODEL,
                "--tools",
                "sysinfo",
                "How many CPUs does device dev-b have?",
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run: Value = serde_json::from_str(&stdout).expect("the run as JSON");
        assert_eq!(run["state"], "succeeded", "{run:#}");
        let calls = steps(&run, "tool_call");
        let call = calls
            .iter()
            .find(|c| c["device"] == "dev-b")
            .unwrap_or_else(|| panic!("no call on dev-b: {run:#}"));
        assert_eq!(call["plugin"], "sysinfo");
        let task_id = call["task_id"].as_str().unwrap();
        let task = r.server.client.task(task_id, None).unwrap();
        assert_eq!(task.device.as_deref(), Some("dev-b"));
        let cpus = task.result.as_ref().unwrap()["cpus"].as_u64().unwrap();
        let answer = run["answer"].as_str().unwrap();
        assert!(
            answer.contains(&cpus.to_string()),
            "the answer `{answer}` lacks the {cpus} CPUs the task found"
        );
        // Without --json the steps are printed as they happen.
        let out = admin(
            &r.server,
            &[
                "agent",
                "run",
                "--model",
                MODEL,
                "--tools",
                "sysinfo",
                "--target",
                "dev-a",
                "How many CPUs does this device have?",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("call sysinfo on dev-a"), "{text}");
        assert!(text.contains("answer: "), "{text}");
    }

    #[test]
    fn a_world_changing_call_waits_for_approval_and_a_denied_one_never_runs() {
        let r = rig();
        let c = &r.server.client;
        let start = |goal: &str| {
            c.agent_start(&openclaw::admin::agent::RunOptions {
                goal: goal.into(),
                model: MODEL.into(),
                tools: vec!["exec".into()],
                target: Some("dev-a".into()),
                max_steps: Some(1),
                tool_choice: Some("required".into()),
                ..Default::default()
            })
            .unwrap()
        };
        // Denied: the model hears it, answers, and no exec task exists.
        let id = start("Run the hostname command on dev-a.");
        let v = wait_state(&r.server, &id, "awaiting_approval");
        let ap = steps(&v, "approval");
        assert_eq!(ap.len(), 1, "{v:#}");
        assert_eq!(ap[0]["call"]["plugin"], "exec");
        assert_eq!(ap[0]["decision"], "pending");
        let out = admin(&r.server, &["agent", "deny", &id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = wait_state(&r.server, &id, "succeeded");
        assert_eq!(steps(&v, "approval")[0]["decision"], "denied", "{v:#}");
        assert!(steps(&v, "tool_call").is_empty(), "{v:#}");
        let tasks = c.list(None, 1000).unwrap();
        assert!(tasks.iter().all(|t| t.plugin != "exec"), "an exec task ran");
        // Deciding twice is refused.
        let out = admin(&r.server, &["agent", "approve", &id]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not awaiting_approval"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Cancelled while it waits: the answer is the ended run, not the
        // waiting one, and the call never runs.
        let id = start("Run the hostname command on dev-a.");
        wait_state(&r.server, &id, "awaiting_approval");
        let v = c.agent_act(&id, "cancel").unwrap();
        assert_eq!(v["state"], "cancelled", "{v:#}");
        assert!(steps(&v, "tool_call").is_empty(), "{v:#}");

        // Approved, across a SIGKILL of the server while it waits: the run
        // resumes from its stored steps and the call runs once.
        let id = start("Run the hostname command on dev-a.");
        wait_state(&r.server, &id, "awaiting_approval");
        let mut server = r.server;
        server.restart();
        server.wait_online("dev-a");
        let v = wait_state(&server, &id, "awaiting_approval");
        assert_eq!(steps(&v, "approval").len(), 1, "{v:#}");
        // A decision for an approval other than the pending one (a late
        // or repeated request) is refused, naming the pending one.
        let n = steps(&v, "approval")[0]["n"].as_u64().unwrap();
        let e = server
            .client
            .agent_act(&id, &format!("approve?approval={}", n + 7))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("(step {n} is)")),
            "{e:#}"
        );
        // Two approvals at once: one decides, the other is a conflict (it
        // is not kept for a later call), and the answer shows the decision.
        let answers: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| s.spawn(|| server.client.agent_act(&id, "approve")))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok: Vec<_> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
        assert_eq!(ok.len(), 1, "{answers:?}");
        assert_eq!(
            steps(ok[0], "approval")[0]["decision"],
            "approved",
            "{:#}",
            ok[0]
        );
        let err = answers.iter().find_map(|a| a.as_ref().err()).unwrap();
        assert!(
            format!("{err:#}").contains("decided already")
                || format!("{err:#}").contains("not awaiting_approval"),
            "{err:#}"
        );
        let v = wait_state(&server, &id, "succeeded");
        let calls = steps(&v, "tool_call");
        assert_eq!(calls.len(), 1, "{v:#}");
        assert_eq!(calls[0]["device"], "dev-a");
        let res = steps(&v, "tool_result");
        assert!(
            res[0]["result"].to_string().contains("host-of-dev-a"),
            "{v:#}"
        );
    }
}
