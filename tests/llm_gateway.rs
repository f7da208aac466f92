//! The OpenAI-compatible gateway end to end: the server, a heavy node (an
//! agent on board `pc` with the `llm` plugin and the real
//! Qwen2.5-Coder-0.5B-Instruct GGUF), and the official `openai` Python
//! client (`tests/llm/openai_client.py`), plus what the client cannot
//! show: a client that disconnects cancels its task, and the task API
//! shows the text so far.
#![cfg(feature = "llm")]

mod common;
#[path = "support/llama_server.rs"]
mod llama_server;

use common::{Agent, Server};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MODEL: &str = common::QWEN;
const NODE: &str = "heavy-1";

fn node_config() -> String {
    common::qwen_node_config(2048, 2)
}

struct Rig {
    server: Server,
    _agent: Agent,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let agent = Agent::start_on(dir.path(), NODE, &server.broker(), &node_config(), "pc");
    server.wait_devices("the heavy node serving the model", |d| {
        d.iter().any(|d| {
            d.id == NODE && d.online && d.capabilities.iter().any(|c| c == &format!("llm:{MODEL}"))
        })
    });
    Rig {
        server,
        _agent: agent,
        _dir: dir,
    }
}

fn python() -> String {
    // scripts/test.sh puts its venv (with `openai`) first on PATH.
    "python3".into()
}

#[test]
fn the_official_openai_client_lists_chats_streams_and_gets_errors() {
    let _one = one_at_a_time();
    let r = rig();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llm/openai_client.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(format!("{}/v1", r.server.client.base()))
        .arg(MODEL)
        .output()
        .expect("python3 with the openai package (scripts/lib/python-env.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the openai client's checks failed:\n{stdout}\n{stderr}"
    );
    for check in [
        "models_list",
        "chat",
        "chat_stream",
        "unknown_model_404",
        "bad_parameter_400",
        "malformed_message_400",
        "prompt_over_context_400",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("ok {check}")),
            "check {check} did not pass:\n{stdout}\n{stderr}"
        );
    }
}

/// A raw HTTP/1.1 request on its own connection; the response's reader.
fn post(base: &str, path: &str, body: &str) -> BufReader<std::net::TcpStream> {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    BufReader::new(s)
}

#[test]
fn a_client_that_goes_away_mid_stream_cancels_its_task() {
    let _one = one_at_a_time();
    let r = rig();
    let base = r.server.client.base();
    let body = serde_json::json!({
        "model": MODEL, "stream": true, "max_tokens": 1500, "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, one number a line."}],
    })
    .to_string();
    let mut rd = post(base, "/v1/chat/completions", &body);
    let mut task = None;
    let mut line = String::new();
    loop {
        line.clear();
        rd.read_line(&mut line).unwrap();
        if let Some(v) = line.strip_prefix("openclaw-task: ") {
            task = Some(v.trim().to_string());
        }
        if line == "\r\n" {
            break;
        }
    }
    let task = task.expect("the response names its task (openclaw-task header)");
    // A few events with text, then the client is gone.
    let mut texts = 0;
    while texts < 3 {
        line.clear();
        rd.read_line(&mut line).unwrap();
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            texts += 1;
        }
    }
    // While it runs, the task API shows the text so far.
    let t = r.server.client.task(&task, None).unwrap();
    assert!(!t.state.is_terminal(), "{:?}", t.state);
    assert!(
        t.output.as_deref().is_some_and(|o| !o.is_empty()),
        "no output so far in the task view: {t:?}"
    );
    drop(rd);
    let t = r.server.wait(&task);
    assert_eq!(
        t.state,
        openclaw::protocol::api::TaskState::Cancelled,
        "{:?}",
        t.error
    );
}

#[test]
fn a_chat_without_stream_is_one_json_answer_and_its_task_is_stored() {
    let _one = one_at_a_time();
    let r = rig();
    let base = r.server.client.base();
    let body = serde_json::json!({
        "model": MODEL, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}],
    })
    .to_string();
    let mut rd = post(base, "/v1/chat/completions", &body);
    let mut head = String::new();
    let mut line = String::new();
    let mut len = 0usize;
    loop {
        line.clear();
        rd.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
            len = v.trim().parse().unwrap();
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buf = vec![0; len];
    rd.read_exact(&mut buf).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
    assert_eq!(v["object"], "chat.completion");
    let task = v["openclaw"]["task"].as_str().unwrap().to_string();
    assert_eq!(v["openclaw"]["device"], NODE);
    let t = r.server.wait(&task);
    assert_eq!(t.plugin, "llm");
    assert_eq!(
        t.result.unwrap()["text"],
        v["choices"][0]["message"]["content"]
    );
}

#[test]
fn openclaw_admin_chat_streams_an_answer_and_models_list_shows_the_node() {
    let _one = one_at_a_time();
    let r = rig();
    let admin = env!("CARGO_BIN_EXE_openclaw-admin");
    let base = r.server.client.base().to_string();
    let out = Command::new(admin)
        .args(["--server", &base, "models", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{list} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with(MODEL) && l.contains(NODE)),
        "{list}"
    );
    let out = Command::new(admin)
        .args([
            "--server",
            &base,
            "--json",
            "chat",
            "--model",
            MODEL,
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "Write a Python function that adds two numbers.",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(!v["text"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["completion_tokens"], 16, "{v}");
    assert!(v["first_piece_ms"].as_f64().unwrap() <= v["total_ms"].as_f64().unwrap());
    // The same answer as the task's result, which the server stored.
    let t = r.server.wait(v["task"].as_str().unwrap());
    assert_eq!(t.result.unwrap()["text"], v["text"]);
    // An unknown model: exit 1 and the gateway's message.
    let out = Command::new(admin)
        .args(["--server", &base, "chat", "--model", "nope", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("404") && err.contains("nope"), "{err}");
}

/// Reads one SSE response to its end: the text of its deltas, and whether
/// it ended with `[DONE]` after a finish_reason (an error event fails).
fn read_sse(rd: &mut BufReader<std::net::TcpStream>, mut on_text: impl FnMut(&str)) -> String {
    let mut text = String::new();
    let mut finished = false;
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line).unwrap() == 0 {
            panic!("the stream ended without [DONE]; text so far {text:?}");
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            assert!(finished, "[DONE] without a finish_reason: {text:?}");
            return text;
        }
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "error event: {data}");
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
                if !t.is_empty() {
                    on_text(t);
                }
            }
            finished |= c["finish_reason"].is_string();
        }
    }
}

/// A request whose answer is JSON with a Content-Length: the JSON.
fn post_json(base: &str, path: &str, body: &str) -> serde_json::Value {
    let mut rd = post(base, path, body);
    let mut line = String::new();
    let mut len = 0usize;
    loop {
        line.clear();
        rd.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut buf = vec![0; len];
    rd.read_exact(&mut buf).unwrap();
    serde_json::from_slice(&buf).unwrap()
}

fn skip_headers(rd: &mut BufReader<std::net::TcpStream>) -> Option<String> {
    let mut task = None;
    let mut line = String::new();
    loop {
        line.clear();
        rd.read_line(&mut line).unwrap();
        if let Some(v) = line.strip_prefix("openclaw-task: ") {
            task = Some(v.trim().to_string());
        }
        if line == "\r\n" {
            return task;
        }
    }
}

/// A heavy node is killed (SIGKILL) while it streams an answer: the task
/// goes to the other node, which decodes the same greedy text from the
/// start; the client's stream skips what it already had and goes on, and
/// ends with exactly the answer a request without a stream gets.
#[test]
fn a_stream_whose_node_is_killed_goes_on_from_the_other_node() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let cfg = node_config();
    let mut nodes = [
        Agent::start_on(dir.path(), "heavy-a", &server.broker(), &cfg, "pc"),
        Agent::start_on(dir.path(), "heavy-b", &server.broker(), &cfg, "pc"),
    ];
    server.wait_devices("both heavy nodes serving the model", |d| {
        d.iter()
            .filter(|d| d.online && d.capabilities.iter().any(|c| c == &format!("llm:{MODEL}")))
            .count()
            == 2
    });
    let base = server.client.base().to_string();
    let ask = |stream: bool| {
        serde_json::json!({
            "model": MODEL, "stream": stream, "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a Python function that reverses a string."}],
        })
        .to_string()
    };
    // The reference: the same request without a stream (both nodes load
    // the model once this and the stream ran).
    let reference = post_json(&base, "/v1/chat/completions", &ask(false));
    let reference = reference["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut rd = post(&base, "/v1/chat/completions", &ask(true));
    let task = skip_headers(&mut rd).expect("openclaw-task header");
    let mut killed = None;
    let text = read_sse(&mut rd, |_| {
        if killed.is_none() {
            let t = server.client.task(&task, None).unwrap();
            let holder = t.device.expect("a streaming task has a device");
            let i = if holder == "heavy-a" { 0 } else { 1 };
            nodes[i].kill();
            killed = Some(holder);
        }
    });
    let killed = killed.expect("some text came before the end");
    assert_eq!(text, reference, "the stream after the node was lost");
    let t = server.wait(&task);
    assert_eq!(
        t.state,
        openclaw::protocol::api::TaskState::Succeeded,
        "{:?}",
        t.error
    );
    assert_eq!(t.attempts, 2, "one attempt on each node");
    assert_ne!(t.device.as_deref(), Some(killed.as_str()));
}

/// A heavy node whose model is an `openai` upstream pool of two real
/// OpenAI-compatible servers (llama-cpp-python's): the gateway's answer
/// comes from the first; with it killed (SIGKILL) from the second; with
/// both gone the client gets an error naming the pool's upstreams, and the
/// server and the node stay up.
#[test]
fn a_model_served_by_an_upstream_pool_fails_over_and_then_says_none_is_left() {
    let _one = one_at_a_time();
    if llama_server::peer_skipped(
        "a_model_served_by_an_upstream_pool_fails_over_and_then_says_none_is_left",
    ) {
        return;
    }
    let mut a = llama_server::Server::start();
    let mut b = llama_server::Server::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    // max_concurrent 1: this server interrupts a stream when another
    // request arrives (llama-cpp-python 0.2.62).
    let cfg = format!(
        "[plugins.llm.models.remote-qwen]\nbackend = \"openai\"\nupstream_model = \"qwen\"\n\
         cooldown_ms = 600000\nmax_cooldown_ms = 600000\nhealth_interval_ms = 0\n\
         upstreams = [{{ url = \"{}\", max_concurrent = 1 }}, {{ url = \"{}\", max_concurrent = 1 }}]\n",
        a.url(),
        b.url()
    );
    let mut node = Agent::start_on(dir.path(), "pool-node", &server.broker(), &cfg, "pc");
    server.wait_devices("the node serving the pool's model", |d| {
        d.iter()
            .any(|d| d.online && d.capabilities.iter().any(|c| c == "llm:remote-qwen"))
    });
    let base = server.client.base().to_string();
    let ask = serde_json::json!({
        "model": "remote-qwen", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}],
    })
    .to_string();
    for step in ["both up", "the first killed"] {
        let v = post_json(&base, "/v1/chat/completions", &ask);
        let text = v["choices"][0]["message"]["content"].as_str();
        assert!(text.is_some_and(|t| !t.is_empty()), "{step}: {v}");
        a.kill();
    }
    b.kill();
    let v = post_json(&base, "/v1/chat/completions", &ask);
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("no upstream left"), "{v}");
    assert!(
        msg.contains(&a.url()) && msg.contains(&b.url()),
        "each upstream named: {msg}"
    );
    assert!(node.alive());
    assert!(server.client.devices().is_ok());
}

/// One test of this file at a time: each runs llama.cpp (1 thread), and
/// llama.cpp's threads spin-wait, so two at once on 2 cores fall from ~30
/// to ~1 token/s. `cargo test` runs this file's tests 2 at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}
