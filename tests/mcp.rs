//! The MCP server end to end, on real processes: a server with
//! `--auth required` and its embedded broker, two edge agents whose
//! catalogs are the tools, and the official MCP Python SDK (`mcp==2.3.0`,
//! `tests/mcp/mcp_client.py`) listing and calling them, with the raw HTTP
//! checks the SDK cannot make (cancellation by notification, keep-alive
//! comments, hostile requests). The tasks behind the calls are checked
//! here afterwards: cancelled ones cancelled, every call audited.

mod common;

use common::{offline_token, wait_tools, Agent, Server};
use openclaw::protocol::api::TaskState;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// dev-a's exec commands: one quick, two slow (one past the keep-alive
/// period), one whose output is larger than an MCP reply carries.
fn exec_config() -> &'static str {
    "[plugins.exec]\nmax_output_bytes = 400000\n\
     [plugins.exec.commands.hostname]\nprogram = \"/bin/echo\"\nargs = [\"host-of-dev-a\"]\n\
     [plugins.exec.commands.nap]\nprogram = \"/bin/sleep\"\nargs = [\"30\"]\n\
     [plugins.exec.commands.doze]\nprogram = \"/bin/sleep\"\nargs = [\"17\"]\n\
     [plugins.exec.commands.many]\nprogram = \"/usr/bin/seq\"\nargs = [\"1\", \"60000\"]\n"
}

/// Runs one phase of the client script; the lines it printed.
fn client(phase: &str, server: &Server, op: &str, viewer: &str) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/mcp_client.py");
    // scripts/test.sh puts its venv (with `mcp`) first on PATH.
    let out = Command::new("python3")
        .arg(&script)
        .args([phase, &format!("{}/mcp", server.http), op, viewer])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{phase}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(String::from).collect()
}

fn has(lines: &[String], checks: &[&str]) {
    for c in checks {
        assert!(
            lines.iter().any(|l| l == &format!("ok {c}")),
            "{c} missing: {lines:?}"
        );
    }
}

#[test]
fn the_official_mcp_client_lists_and_calls_the_fleets_tools() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    std::fs::create_dir_all(&data).unwrap();
    let op = offline_token(&data, "operator", &[]);
    let viewer = offline_token(&data, "viewer", &[]);
    let admin = offline_token(&data, "admin", &[]);
    let mut server = Server::start(&data, &["--auth", "required"]);
    server.client = server.client.clone().with_token(Some(admin.clone()));
    let _a = Agent::start(dir.path(), "dev-a", &server.broker(), exec_config());
    let mut b = Agent::start(dir.path(), "dev-b", &server.broker(), "");
    wait_tools(&server, |t| {
        ["exec__dev-a", "sysinfo__dev-a", "sysinfo__dev-b"]
            .iter()
            .all(|n| t.iter().any(|x| x["name"] == *n))
    });

    let lines = client("main", &server, &op, &viewer);
    has(
        &lines,
        &[
            "tools_list",
            "call_sysinfo",
            "call_exec",
            "bad_arguments_tool_error",
            "unknown_tool_error",
            "ping_after_errors",
            "large_result_named",
            "abandoned_call",
            "auto_mode_client",
            "viewer_lists_but_cannot_call",
            "no_token_401",
            "notification_cancels",
            "keep_alive_then_answer",
            "hostile_requests",
        ],
    );

    // The tasks behind the calls: the big result is whole in the store; both
    // naps (one abandoned, one cancelled by notification) were cancelled
    // on dev-a, not left to run their 30 s.
    let big = lines
        .iter()
        .find_map(|l| l.strip_prefix("task big "))
        .expect("the big result's task");
    let t = server.wait(big);
    assert_eq!(t.state, TaskState::Succeeded);
    let stdout = t.result.as_ref().unwrap()["stdout"].as_str().unwrap();
    assert!(
        stdout.ends_with("59999\n60000\n"),
        "{}",
        &stdout[stdout.len() - 20..]
    );
    let listed = server.client.list(None, 100).unwrap();
    let mut naps = Vec::new();
    for l in &listed {
        let t = server.client.task(&l.id, None).unwrap();
        if t.input["command"] == "nap" {
            naps.push(t.id);
        }
    }
    assert_eq!(naps.len(), 2, "{listed:?}");
    for id in &naps {
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
        let took = t.finished_ms.unwrap_or(0) - t.created_ms;
        assert!(took < 25_000, "the nap ran {took} ms: not cancelled");
    }
    // Every call that became a task is audited as `mcp.call` by the
    // operator's token, never by the viewer's.
    let audit = server.client.audit(200).unwrap();
    let calls: Vec<_> = audit.iter().filter(|a| a["action"] == "mcp.call").collect();
    assert!(calls.len() >= 7, "{audit:?}");
    assert!(calls.iter().all(|a| a["role"] == "operator"), "{calls:?}");
    assert!(calls
        .iter()
        .any(|a| a["target"].as_str().unwrap_or("").contains(big)));

    // dev-b goes away: its tool leaves the list, dev-a's keep their names,
    // and a call to the gone one is a tool error naming why.
    b.stop();
    server.wait_offline("dev-b");
    let lines = client("offline", &server, &op, &viewer);
    has(&lines, &["offline_device_tool_error"]);
    let start = Instant::now();
    while server.client.health().is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "server down");
    }
}
