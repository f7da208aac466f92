//! Workflows end to end, on real processes: a server with its embedded
//! broker and edge agents running the built-in plugins (`sysinfo`, `echo`,
//! and `exec` commands that block until the test opens a gate file, so
//! "both running at once" and "killed while a step runs" are states the
//! test waits for, not timings). With feature `llm`, a model step on the
//! real Qwen GGUF.

mod common;

use common::{Agent, Server};
use openclaw::admin::AdminError;
use openclaw::protocol::api::TaskState;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// exec commands `gate_a` and `gate_b`: each waits for its file in `dir`.
fn gated_exec(dir: &Path) -> String {
    let mut c = String::from("[plugins.exec]\nmax_output_bytes = 256\ntimeout_ms = 120000\n");
    for g in ["a", "b"] {
        let f = dir.join(format!("gate-{g}"));
        c.push_str(&format!(
            "[plugins.exec.commands.gate_{g}]\nprogram = \"/bin/sh\"\n\
             args = [\"-c\", \"while [ ! -e {} ]; do /bin/sleep 0.05; done; echo opened-{g}\"]\n",
            f.display()
        ));
    }
    c
}

fn open_gate(dir: &Path, g: &str) {
    std::fs::write(dir.join(format!("gate-{g}")), "").unwrap();
}

fn start(server: &Server, toml: &str, inputs: Value) -> Result<String, AdminError> {
    let inputs: Map<String, Value> = inputs.as_object().cloned().unwrap_or_default();
    server.client.workflow_start(toml, &inputs)
}

/// Waits for the run to end; its view.
fn wait_end(server: &Server, id: &str) -> Value {
    server.workflow_end(id, Duration::from_secs(120))
}

/// Waits until `pred` holds for the run's view.
fn wait_view(server: &Server, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    server.workflow_until(id, what, Duration::from_secs(60), pred)
}

fn step<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id}: {v:#}"))
}

fn task_id(v: &Value, id: &str) -> String {
    step(v, id)["task_id"].as_str().unwrap().to_string()
}

/// Waits until the task is running on its device.
fn wait_task_running(server: &Server, id: &str) {
    let t = Instant::now();
    loop {
        let task = server.client.task(id, None).unwrap();
        if task.state == TaskState::Running {
            return;
        }
        assert!(!task.state.is_terminal(), "{task:?}");
        assert!(t.elapsed() < Duration::from_secs(60), "{task:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const INVENTORY: &str = r#"
name = "inventory"
[inputs]
device = "nowhere"
[[steps]]
id = "cpu"
plugin = "sysinfo"
target = "{{ inputs.device }}"
retries = 1
timeout_ms = 10000
route = "edge"
[[steps]]
id = "note"
plugin = "echo"
target = "{{ inputs.device }}"
input = { cpus = "{{ steps.cpu.output.cpus }}", text = "{{ inputs.device }} has {{ steps.cpu.output.cpus }} CPUs" }
[output]
value = { cpus = "{{ steps.note.output.cpus }}", text = "{{ steps.note.output.text }}" }
schema = { type = "object", properties = { cpus = { type = "integer" }, text = { type = "string" } }, required = ["cpus", "text"] }
"#;

#[test]
fn a_dag_of_plugin_steps_runs_with_templated_inputs_to_its_checked_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    server.wait_online("dev-a");
    let id = start(&server, INVENTORY, json!({"device": "dev-a"})).unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(v["name"], "inventory");
    assert_eq!(v["inputs"], json!({"device": "dev-a"}));
    let cpu = server.client.task(&task_id(&v, "cpu"), None).unwrap();
    assert_eq!(cpu.device.as_deref(), Some("dev-a"));
    assert_eq!(cpu.max_attempts, 2, "retries = 1 is a second attempt");
    let cpus = cpu.result.as_ref().unwrap()["cpus"].as_u64().unwrap();
    // A whole-string template kept the number; an embedded one is text.
    let note = server.client.task(&task_id(&v, "note"), None).unwrap();
    assert_eq!(note.input["cpus"], json!(cpus), "{:?}", note.input);
    assert_eq!(
        v["output"],
        json!({"cpus": cpus, "text": format!("dev-a has {cpus} CPUs")})
    );
    for s in ["cpu", "note"] {
        assert_eq!(step(&v, s)["state"], "succeeded");
        assert_eq!(step(&v, s)["device"], "dev-a");
        assert!(step(&v, s)["attempts"].as_u64().unwrap() >= 1);
    }
    // The run is listed, and read back the same from the store later.
    let list = server.client.workflow_list(10).unwrap();
    assert_eq!(list["runs"][0]["id"], id.as_str(), "{list:#}");

    // An output the schema refuses fails the run, naming the field.
    let strict = INVENTORY.replace(
        "cpus = { type = \"integer\" }",
        "cpus = { type = \"string\" }",
    );
    let id = start(&server, &strict, json!({"device": "dev-a"})).unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "failed", "{v:#}");
    let e = v["error"].as_str().unwrap();
    assert!(e.starts_with("output: ") && e.contains("cpus"), "{e}");
}

#[test]
fn independent_steps_run_at_the_same_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(
        dir.path(),
        "dev-a",
        &server.broker(),
        &gated_exec(dir.path()),
    );
    server.wait_online("dev-a");
    let wf = r#"
name = "fan-out"
[[steps]]
id = "left"
plugin = "exec"
input = { command = "gate_a" }
[[steps]]
id = "right"
plugin = "exec"
input = { command = "gate_b" }
[[steps]]
id = "join"
plugin = "echo"
input = ["{{ steps.left.output.stdout }}", "{{ steps.right.output.stdout }}"]
"#;
    let id = start(&server, wf, json!({})).unwrap();
    let v = wait_view(&server, &id, "both tasks submitted", |v| {
        ["left", "right"]
            .iter()
            .all(|s| step(v, s)["task_id"].is_string())
    });
    assert_eq!(step(&v, "join")["state"], "waiting", "{v:#}");
    let (l, r) = (task_id(&v, "left"), task_id(&v, "right"));
    // Neither can end before its gate opens: both running is at once.
    wait_task_running(&server, &l);
    wait_task_running(&server, &r);
    assert_eq!(
        server.client.task(&l, None).unwrap().state,
        TaskState::Running
    );
    let v = server.client.workflow_get(&id, None).unwrap();
    assert_eq!(step(&v, "left")["state"], "running");
    assert_eq!(step(&v, "right")["state"], "running");
    assert_eq!(step(&v, "join")["state"], "waiting");
    open_gate(dir.path(), "a");
    open_gate(dir.path(), "b");
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    // No [output]: the steps nothing needs, by id.
    assert_eq!(v["output"], json!({"join": ["opened-a\n", "opened-b\n"]}));
}

#[test]
fn bad_workflows_are_refused_at_submission_naming_the_step_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    server.wait_online("dev-a");
    let s = |id: &str, extra: &str| format!("[[steps]]\nid = \"{id}\"\nplugin = \"echo\"\n{extra}");
    for (toml, want) in [
        (
            format!(
                "name = \"c\"\n{}{}{}",
                s("a", "needs = [\"c\"]\n"),
                s("b", "input = \"{{ steps.a.output }}\"\n"),
                s("c", "needs = [\"b\"]\n")
            ),
            "a cycle: a -> c -> b -> a",
        ),
        (
            format!("name = \"u\"\n{}", s("a", "needs = [\"ghost\"]\n")),
            "step `a`: `needs`: no step `ghost`",
        ),
        (
            format!(
                "name = \"u\"\n{}{}",
                s("a", ""),
                s("b", "input = { x = \"{{ steps.ghost.output }}\" }\n")
            ),
            "step `b`: `input.x`: no step `ghost`",
        ),
        (
            format!("name = \"d\"\n{}{}", s("a", ""), s("a", "")),
            "step `a`: `id`: a second step",
        ),
        (
            format!(
                "name = \"p\"\n{}{}",
                s("a", ""),
                s("b", "input = \"{{ steps.a.outptu }}\"\n")
            ),
            "step `b`: `input`: `{{ steps.a.outptu }}`",
        ),
        (
            "name = \"x\"\n[[steps]]\nid = \"a\"\nplugin = \"no-such-plugin\"\n".to_string(),
            "step `a`: plugin `no-such-plugin`: no known device offers it",
        ),
        (
            format!("name = \"k\"\n{}", s("a", "timeout = 5\n")),
            "step `a`: unknown field `timeout`",
        ),
        ("name = \"t\"\n[[steps]\n".to_string(), "not valid TOML"),
    ] {
        match start(&server, &toml, json!({})) {
            Err(AdminError::Api { status, message }) => {
                assert_eq!(status, 400, "{message}");
                assert!(message.contains(want), "want {want:?} in {message:?}");
            }
            other => panic!("{toml}\naccepted: {other:?}"),
        }
    }
    // An input the file does not declare.
    match start(&server, INVENTORY, json!({"devcie": "dev-a"})) {
        Err(AdminError::Api { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("`inputs.devcie`"), "{message}");
        }
        other => panic!("accepted: {other:?}"),
    }
    let list = server.client.workflow_list(10).unwrap();
    assert_eq!(list["runs"], json!([]), "nothing stored");
    assert!(server.client.list(None, 100).unwrap().is_empty(), "no task");
    assert!(server.client.health().is_ok());
}

#[test]
fn a_failing_step_fails_the_run_skips_its_dependents_and_cancels_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(
        dir.path(),
        "dev-a",
        &server.broker(),
        &gated_exec(dir.path()),
    );
    server.wait_online("dev-a");
    let wf = r#"
name = "breaks"
[[steps]]
id = "slow"
plugin = "exec"
input = { command = "gate_a" }
[[steps]]
id = "bad"
plugin = "echo"
needs = ["gate"]
input = { fail = "boom" }
retries = 0
[[steps]]
id = "gate"
plugin = "echo"
input = { n = 1 }
[[steps]]
id = "after"
plugin = "echo"
input = "{{ steps.bad.output }}"
"#;
    let id = start(&server, wf, json!({})).unwrap();
    // `bad` waits for `gate`, so `slow` is running by the time it fails.
    let v = wait_view(&server, &id, "slow submitted", |v| {
        step(v, "slow")["task_id"].is_string()
    });
    let slow = task_id(&v, "slow");
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "failed", "{v:#}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("step `bad`") && e.contains("boom"), "{e}");
    assert_eq!(step(&v, "bad")["state"], "failed");
    assert!(step(&v, "bad")["error"].as_str().unwrap().contains("boom"));
    assert_eq!(step(&v, "gate")["state"], "succeeded");
    assert_eq!(step(&v, "after")["state"], "skipped");
    assert!(step(&v, "after")["task_id"].is_null());
    assert_eq!(step(&v, "slow")["state"], "cancelled", "{v:#}");
    let t = server.client.wait(&slow, Duration::from_secs(30)).unwrap();
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
}

#[test]
fn retries_are_further_attempts_of_the_steps_task() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    server.wait_online("dev-a");
    let wf = "name = \"flaky\"\n[[steps]]\nid = \"f\"\nplugin = \"echo\"\nretries = 2\n\
              input = { fail = \"flaky\", retryable = true }\n";
    let id = start(&server, wf, json!({})).unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "failed", "{v:#}");
    let f = step(&v, "f");
    assert_eq!(f["attempts"], 3, "{v:#}");
    let t = server.client.task(&task_id(&v, "f"), None).unwrap();
    assert_eq!((t.attempts, t.max_attempts), (3, 3));
    assert!(f["error"].as_str().unwrap().contains("flaky"), "{v:#}");
}

#[test]
fn a_run_survives_a_server_sigkill_without_resubmitting_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(
        dir.path(),
        "dev-a",
        &server.broker(),
        &gated_exec(dir.path()),
    );
    server.wait_online("dev-a");
    let wf = r#"
name = "durable"
[[steps]]
id = "first"
plugin = "echo"
input = { n = 7 }
[[steps]]
id = "held"
plugin = "exec"
needs = ["first"]
input = { command = "gate_a" }
[[steps]]
id = "last"
plugin = "echo"
input = { n = "{{ steps.first.output.n }}", out = "{{ steps.held.output.stdout }}" }
"#;
    let id = start(&server, wf, json!({})).unwrap();
    let v = wait_view(&server, &id, "held submitted", |v| {
        step(v, "held")["task_id"].is_string()
    });
    let first = task_id(&v, "first");
    let held = task_id(&v, "held");
    assert_eq!(step(&v, "first")["state"], "succeeded");
    wait_task_running(&server, &held);
    let mut server = server;
    server.restart();
    server.wait_online("dev-a");
    let v = server.client.workflow_get(&id, None).unwrap();
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(task_id(&v, "held"), held);
    open_gate(dir.path(), "a");
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(
        task_id(&v, "first"),
        first,
        "the finished step kept its task"
    );
    assert_eq!(task_id(&v, "held"), held, "the running step was waited for");
    assert_eq!(v["output"], json!({"last": {"n": 7, "out": "opened-a\n"}}));
    let tasks = server.client.list(None, 100).unwrap();
    let count = |p: &str| tasks.iter().filter(|t| t.plugin == p).count();
    assert_eq!((count("echo"), count("exec")), (2, 1), "{tasks:?}");
}

#[test]
fn the_cli_runs_a_file_and_prints_each_step_and_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    server.wait_online("dev-a");
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, INVENTORY).unwrap();
    let admin = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
            .arg("--server")
            .arg(server.client.base())
            .args(args)
            .output()
            .unwrap()
    };
    let f = file.to_str().unwrap();
    let out = admin(&["workflow", "run", f, "--input", "device=dev-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[cpu] running (task "), "{text}");
    assert!(text.contains("[cpu] succeeded on dev-a: "), "{text}");
    assert!(text.contains("[note] succeeded on dev-a: "), "{text}");
    let json_at = text.find("output: ").expect("the output") + "output: ".len();
    let output: Value = serde_json::from_str(&text[json_at..]).unwrap();
    assert!(output["cpus"].as_u64().unwrap() >= 1, "{output}");
    // A run that fails exits non-zero, saying why.
    let out = admin(&["workflow", "run", f, "--input", "device=ghost"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `cpu`"), "{err}");
    // A refused file too, naming the step.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"b\"\n[[steps]]\nid = \"x\"\nplugin = \"echo\"\nneeds = [\"x\"]\n",
    )
    .unwrap();
    let out = admin(&["workflow", "run", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step `x`") && err.contains("400"), "{err}");
    // --no-wait prints the id; show reads it back.
    let out = admin(&["workflow", "run", f, "--input", "device=dev-a", "--no-wait"]);
    assert!(out.status.success());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("wf-"), "{id}");
    wait_end(&server, &id);
    let out = admin(&["--json", "workflow", "show", &id]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "succeeded", "{v:#}");
}

const APPROVED: &str = r#"
name = "approved"
[[steps]]
id = "look"
plugin = "sysinfo"
target = "dev-a"
[[steps]]
id = "act"
plugin = "echo"
target = "dev-a"
approve = true
input = { cpus = "{{ steps.look.output.cpus }}" }
[[steps]]
id = "after"
plugin = "echo"
input = { done = "{{ steps.act.output.cpus }}" }
"#;

fn awaiting(v: &Value, id: &str) -> bool {
    step(v, id)["state"] == "awaiting_approval"
}

/// A step with `approve = true`: its call is rendered and shown, no task
/// exists until an operator approves it (the CLI here), the wait survives
/// a server SIGKILL, and approving what does not wait is refused.
#[test]
fn a_step_that_needs_approval_shows_its_call_and_runs_once_approved() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    server.wait_online("dev-a");
    let id = start(&server, APPROVED, json!({})).unwrap();
    let v = wait_view(&server, &id, "act awaiting approval", |v| {
        awaiting(v, "act")
    });
    assert_eq!(v["state"], "running");
    let act = step(&v, "act");
    assert!(
        act["task_id"].is_null(),
        "no task before the approval: {v:#}"
    );
    let cpus = step(&v, "look")["output"]["cpus"].clone();
    assert!(cpus.is_u64(), "{v:#}");
    let p = &act["proposed"];
    assert_eq!(p["plugin"], "echo", "{p}");
    assert_eq!(p["input"], json!({"cpus": cpus}));
    assert_eq!(p["target"], "dev-a");
    assert!(
        p["capability"].is_null() && p["max_attempts"].is_null(),
        "{p}"
    );
    assert!(act["approval_deadline_ms"].as_u64().unwrap() > v["created_ms"].as_u64().unwrap());
    assert_eq!(step(&v, "after")["state"], "waiting");

    server.restart();
    let v = wait_view(&server, &id, "still awaiting after a restart", |v| {
        awaiting(v, "act")
    });
    assert!(step(&v, "act")["task_id"].is_null(), "{v:#}");
    let e = server
        .client
        .workflow_decide(&id, Some("look"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not await approval"), "{e}");

    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
        .arg("--server")
        .arg(server.client.base())
        .args(["workflow", "approve", &id, "--step", "act"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(step(&v, "act")["approved_by"], "(auth off)");
    assert_eq!(step(&v, "after")["output"], json!({"done": cpus}));
    let e = server
        .client
        .workflow_decide(&id, None, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no step awaiting approval"), "{e}");
}

/// A denial and an approval that never comes fail the run without the
/// step's task; with two steps waiting the decision must name one.
#[test]
fn a_denied_or_unanswered_approval_fails_the_run_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    server.wait_online("dev-a");

    let id = start(&server, APPROVED, json!({})).unwrap();
    wait_view(&server, &id, "act awaiting approval", |v| {
        awaiting(v, "act")
    });
    server.client.workflow_decide(&id, None, false).unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "failed", "{v:#}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("step `act`: denied by (auth off)"), "{e}");
    assert!(step(&v, "act")["task_id"].is_null());
    assert_eq!(step(&v, "after")["state"], "skipped");

    let quick = APPROVED.replace(
        "approve = true",
        "approve = true\napproval_timeout_ms = 300",
    );
    let id = start(&server, &quick, json!({})).unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "failed", "{v:#}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no approval within 300 ms"),
        "{v:#}"
    );
    assert!(step(&v, "act")["task_id"].is_null());

    // A call too big to be shown whole is not put to an operator.
    let big = r#"
name = "big"
[inputs]
blob = ""
[[steps]]
id = "act"
plugin = "echo"
approve = true
input = { blob = "{{ inputs.blob }}" }
"#;
    let id = start(&server, big, json!({"blob": "x".repeat(300 * 1024)})).unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "failed", "{v:#}");
    let e = step(&v, "act")["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("more than the 262144 an approval shows; not submitted"),
        "{e}"
    );
    assert!(step(&v, "act")["proposed"].is_null() && step(&v, "act")["task_id"].is_null());

    let two = r#"
name = "two"
[[steps]]
id = "x"
plugin = "echo"
approve = true
input = "x"
[[steps]]
id = "y"
plugin = "echo"
approve = true
input = "y"
"#;
    let id = start(&server, two, json!({})).unwrap();
    wait_view(&server, &id, "both awaiting", |v| {
        awaiting(v, "x") && awaiting(v, "y")
    });
    let e = server
        .client
        .workflow_decide(&id, None, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("steps x, y await approval: name one"), "{e}");
    server.client.workflow_decide(&id, Some("y"), true).unwrap();
    server.client.workflow_decide(&id, Some("x"), true).unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(v["output"], json!({"x": "x", "y": "y"}));
}

#[cfg(feature = "llm")]
mod with_a_model {
    use super::*;

    /// A model step after a plugin step: its prompt carries the plugin's
    /// output, its reply is held to a schema and parsed as JSON.
    #[test]
    fn a_model_step_answers_from_an_earlier_steps_output_in_its_schema() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("srv"), &[]);
        let _node = Agent::start_on(
            dir.path(),
            "heavy-1",
            &server.broker(),
            &common::qwen_node_config(2048, 1),
            "pc",
        );
        let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
        server.wait_online("dev-a");
        server.wait_devices("the heavy node serving the model", |d| {
            d.iter().any(|d| {
                d.online
                    && d.capabilities
                        .iter()
                        .any(|c| c == &format!("llm:{}", common::QWEN))
            })
        });
        let wf = format!(
            r#"
name = "summary"
[[steps]]
id = "cpu"
plugin = "sysinfo"
target = "dev-a"
[[steps]]
id = "summary"
model = "{}"
prompt = "A device reports {{{{ steps.cpu.output.cpus }}}} CPUs. Answer in JSON with the field cpus set to that number."
schema = {{ type = "object", properties = {{ cpus = {{ type = "integer" }} }}, required = ["cpus"], additionalProperties = false }}
max_tokens = 32
[output]
value = {{ reported = "{{{{ steps.cpu.output.cpus }}}}", model = "{{{{ steps.summary.output.cpus }}}}" }}
"#,
            common::QWEN
        );
        let id = start(&server, &wf, json!({})).unwrap();
        let t = Instant::now();
        let v = loop {
            let v = server.client.workflow_get(&id, Some(30_000)).unwrap();
            if v["state"] != "running" {
                break v;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "{v:#}");
        };
        assert_eq!(v["state"], "succeeded", "{v:#}");
        let llm = server.client.task(&task_id(&v, "summary"), None).unwrap();
        assert_eq!(llm.plugin, "llm");
        assert_eq!(llm.device.as_deref(), Some("heavy-1"));
        assert!(v["output"]["model"].is_u64(), "parsed JSON: {v:#}");
        assert_eq!(v["output"]["model"], v["output"]["reported"], "{v:#}");
    }
}

/// A server with room for one queued task, whose device dev-a has been
/// online once and is offline now (its tasks queue).
fn room_for_one_and_dev_a_offline(dir: &std::path::Path) -> Server {
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, "[scheduler]\nmax_queued_tasks = 1\n").unwrap();
    let server = Server::start(&dir.join("srv"), &["--config", cfg.to_str().unwrap()]);
    let mut a = Agent::start(dir, "dev-a", &server.broker(), "");
    server.wait_online("dev-a");
    a.stop();
    server.wait_devices("dev-a offline", |d| {
        d.iter().any(|d| d.id == "dev-a" && !d.online)
    });
    server
}

/// A full queue (`scheduler.max_queued_tasks`) is waited out, not taken as
/// the step's failure: with room for one queued task and its device
/// offline, step `a` queues and step `b` waits for room (shown `running`
/// without a task); once the device is back both run and the run succeeds.
#[test]
fn a_step_waits_for_room_in_a_full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let server = room_for_one_and_dev_a_offline(dir.path());
    let wf = r#"
name = "two"
[[steps]]
id = "a"
plugin = "echo"
target = "dev-a"
input = { n = 1 }
[[steps]]
id = "b"
plugin = "echo"
target = "dev-a"
input = { n = 2 }
"#;
    let id = start(&server, wf, json!({})).unwrap();
    let v = wait_view(&server, &id, "a queued, b waiting for room", |v| {
        let (sa, sb) = (step(v, "a"), step(v, "b"));
        let queued = |s: &Value| s["state"] == "running" && s["task_id"].is_string();
        let waiting = |s: &Value| s["state"] == "running" && s["task_id"].is_null();
        (queued(sa) && waiting(sb)) || (queued(sb) && waiting(sa))
    });
    assert_eq!(v["state"], "running", "{v:#}");
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), "");
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(step(&v, "a")["output"], json!({"n": 1}), "{v:#}");
    assert_eq!(step(&v, "b")["output"], json!({"n": 2}), "{v:#}");
}

/// While a step waits for room in a full queue, the rest of the run goes
/// on: another step comes to await its approval, and a denial is heard at
/// once (it ends the wait, and the run).
#[test]
fn a_run_goes_on_while_a_step_waits_for_room() {
    let dir = tempfile::tempdir().unwrap();
    let server = room_for_one_and_dev_a_offline(dir.path());
    let wf = r#"
name = "three"
[[steps]]
id = "a"
plugin = "echo"
target = "dev-a"
input = { n = 1 }
[[steps]]
id = "b"
plugin = "echo"
target = "dev-a"
input = { n = 2 }
[[steps]]
id = "c"
plugin = "echo"
target = "dev-a"
input = { n = 3 }
approve = true
"#;
    let id = start(&server, wf, json!({})).unwrap();
    let waiting = |s: &Value| s["state"] == "running" && s["task_id"].is_null();
    wait_view(
        &server,
        &id,
        "c awaiting approval while a or b waits",
        |v| {
            step(v, "c")["state"] == "awaiting_approval"
                && (waiting(step(v, "a")) || waiting(step(v, "b")))
        },
    );
    server
        .client
        .workflow_decide(&id, Some("c"), false)
        .unwrap();
    let v = wait_end(&server, &id);
    assert_eq!(v["state"], "failed", "{v:#}");
    assert!(
        v["error"].as_str().unwrap().contains("step `c`: denied"),
        "{v:#}"
    );
    let waited = if step(&v, "a")["task_id"].is_null() {
        "a"
    } else {
        "b"
    };
    let w = step(&v, waited);
    assert_eq!(w["state"], "cancelled", "{v:#}");
    assert!(w["error"].as_str().unwrap().contains("cancelled"), "{v:#}");
}
