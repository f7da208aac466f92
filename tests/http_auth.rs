//! API tokens against a real server process (issue 12, item 1): no token,
//! a malformed, unknown, wrong-secret, expired and revoked one, the wrong
//! role, the gateway's OpenAI-shaped 401, the rate limit, the audit log,
//! tokens made offline while the server runs, and the refusal to serve
//! without authentication on a non-loopback address.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{offline_token, Agent, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// One request; (status, headers' WWW-Authenticate and Retry-After, body).
struct Answer {
    status: u16,
    www: Option<String>,
    retry_after: Option<String>,
    body: Value,
}

fn call(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut resp = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        ("DELETE", _) => {
            let mut r = agent.delete(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        (_, b) => {
            let mut r = agent.post(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send_json(b.unwrap_or(Value::Null))
        }
    }
    .unwrap();
    let h = |k: &str| {
        resp.headers()
            .get(k)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (www, retry_after) = (h("www-authenticate"), h("retry-after"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    Answer {
        status,
        www,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// `openclaw-admin ARGS`; (success, stdout, stderr).
fn admin(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
        .args(args)
        .env_remove("OPENCLAW_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn id_of(token: &str) -> &str {
    &token[3..19]
}

/// Polls until `f` holds (a token change read through the server's cache).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server with `--auth required` whose one device, `gone-1` (which
/// offers `echo`), came online and was killed: submitted tasks wait for it,
/// so there is one to cancel. Its client sends `root`.
fn gone_device_server(dir: &Path, data: &Path, root: &str) -> Server {
    let mut s = Server::start(data, &["--auth", "required"]);
    s.client = s.client.clone().with_token(Some(root.to_string()));
    let mut agent = Agent::start(dir, "gone-1", &s.broker(), "");
    s.wait_online("gone-1");
    agent.kill();
    s.wait_offline("gone-1");
    s
}

fn submit_body() -> Value {
    json!({"plugin": "echo", "input": {"x": 1}})
}

#[test]
fn tokens_roles_expiry_revocation_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let mut s = Server::start(&data, &["--auth", "required"]);
    let url = |p: &str| format!("{}{p}", s.http);

    // Probes need no token; everything else does.
    assert_eq!(call("GET", &url("/healthz"), None, None).status, 200);
    let a = call("GET", &url("/v1/tasks"), None, None);
    assert_eq!(a.status, 401, "{:?}", a.body);
    assert_eq!(a.www.as_deref(), Some("Bearer realm=\"openclaw\""));
    assert!(
        a.body["error"].as_str().unwrap().contains("Bearer"),
        "{:?}",
        a.body
    );
    // Unknown paths too: no route list for strangers.
    assert_eq!(call("GET", &url("/nope"), None, None).status, 401);

    // The first admin token, made offline while the server runs.
    let root = offline_token(&data, "admin", &["--name", "root"]);
    assert_eq!(
        call("GET", &url("/v1/tasks"), Some(&root), None).status,
        200
    );
    // A device that offers `echo` and is gone: submitted tasks wait for
    // it, so there is one to cancel.
    s.client = s.client.clone().with_token(Some(root.clone()));
    let mut agent = Agent::start(dir.path(), "gone-1", &s.broker(), "");
    s.wait_online("gone-1");
    agent.kill();
    s.wait_offline("gone-1");

    // Malformed, unknown id, right id with a wrong secret.
    let wrong_secret = format!("oc_{}_{}", id_of(&root), "0".repeat(64));
    for (bad, says) in [
        ("nonsense".to_string(), "does not start with oc_"),
        (
            format!("oc_{}_{}", "f".repeat(16), "0".repeat(64)),
            "no token with id",
        ),
        (wrong_secret, "wrong secret"),
    ] {
        let a = call("GET", &url("/v1/tasks"), Some(&bad), None);
        assert_eq!(a.status, 401, "{bad}");
        assert!(a.www.unwrap().contains("invalid_token"));
        let e = a.body["error"].as_str().unwrap();
        assert!(e.contains(says), "{bad}: {e}");
    }
    let a = call("GET", &url("/v1/tasks"), None, None);
    assert_eq!(a.status, 401);

    // Tokens made through the API, with the CLI.
    let mk = |role: &str, extra: &[&str]| {
        let mut args = vec!["--server", &s.http, "--token", &root, "token", "create"];
        args.extend_from_slice(&["--role", role]);
        args.extend_from_slice(extra);
        let (ok, out, err) = admin(&args);
        assert!(ok, "{err}");
        out
    };
    let viewer = mk("viewer", &["--name", "dash"]);
    let operator = mk("operator", &[]);
    let short = mk("operator", &["--expires", "1s"]);

    // Roles: a viewer reads, cannot submit; an operator submits, cannot
    // manage tokens.
    assert_eq!(
        call("GET", &url("/v1/devices"), Some(&viewer), None).status,
        200
    );
    let a = call(
        "POST",
        &url("/v1/tasks"),
        Some(&viewer),
        Some(submit_body()),
    );
    assert_eq!(a.status, 403, "{:?}", a.body);
    let e = a.body["error"].as_str().unwrap();
    assert!(e.contains("viewer") && e.contains("operator role"), "{e}");
    let a = call(
        "POST",
        &url("/v1/tasks"),
        Some(&operator),
        Some(submit_body()),
    );
    assert_eq!(a.status, 202, "{:?}", a.body);
    let task = a.body["id"].as_str().unwrap().to_string();
    let a = call(
        "DELETE",
        &url(&format!("/v1/tasks/{task}")),
        Some(&operator),
        None,
    );
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        call("GET", &url("/v1/tokens"), Some(&operator), None).status,
        403
    );
    assert_eq!(
        call("GET", &url("/v1/audit"), Some(&viewer), None).status,
        403
    );
    // A bad role by name.
    let a = call(
        "POST",
        &url("/v1/tokens"),
        Some(&root),
        Some(json!({"role": "god"})),
    );
    assert_eq!(a.status, 400);
    assert!(a.body["error"].as_str().unwrap().contains("\"god\""));

    // The gateway answers in OpenAI's shape.
    let a = call(
        "POST",
        &url("/v1/chat/completions"),
        None,
        Some(json!({"model": "m", "messages": []})),
    );
    assert_eq!(a.status, 401);
    assert_eq!(
        a.body["error"]["type"], "authentication_error",
        "{:?}",
        a.body
    );
    let a = call("GET", &url("/v1/models"), Some(&viewer), None);
    assert_eq!(a.status, 200, "{:?}", a.body);

    // Expiry.
    eventually("the 1 s token expires", || {
        let a = call("GET", &url("/v1/tasks"), Some(&short), None);
        a.status == 401 && a.body["error"].as_str().unwrap().contains("expired")
    });

    // Revocation through the API takes effect at once...
    let (ok, _, err) = admin(&[
        "--server",
        &s.http,
        "--token",
        &root,
        "token",
        "revoke",
        id_of(&operator),
    ]);
    assert!(ok, "{err}");
    let a = call("GET", &url("/v1/tasks"), Some(&operator), None);
    assert_eq!(a.status, 401);
    assert!(a.body["error"].as_str().unwrap().contains("revoked"));
    // ...and offline, on the data dir, within the server's cache time.
    let d = data.display().to_string();
    let (ok, _, err) = admin(&["token", "revoke", id_of(&viewer), "--data-dir", &d]);
    assert!(ok, "{err}");
    eventually("the offline revocation is seen", || {
        call("GET", &url("/v1/tasks"), Some(&viewer), None).status == 401
    });
    let (ok, _, err) = admin(&["token", "revoke", "0123456789abcdef", "--data-dir", &d]);
    assert!(
        !ok && err.contains("no token with id 0123456789abcdef"),
        "{err}"
    );

    // The list never shows secrets; the audit log says who did what.
    let (ok, list, err) = admin(&["--json", "token", "list", "--data-dir", &d]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 4, "{list}");
    assert!(
        !list.to_string().contains(&root[20..]),
        "a secret is listed"
    );
    let op = id_of(&operator).to_string();
    eventually("the audit log has the operator's submit and cancel", || {
        let a = call("GET", &url("/v1/audit?limit=100"), Some(&root), None);
        let rows = a.body.as_array().cloned().unwrap_or_default();
        let has = |action: &str, token: &str, target: &str| {
            rows.iter()
                .any(|r| r["action"] == action && r["token"] == token && r["target"] == target)
        };
        has("task.submit", &op, &task)
            && has("task.cancel", &op, &task)
            && has("token.create", id_of(&root), id_of(&viewer))
            && has("token.revoke", id_of(&root), &op)
    });
}

#[test]
fn a_token_over_its_rate_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        "[http]\nrate_limit_per_s = 0.5\nrate_limit_burst = 3\n",
    )
    .unwrap();
    let root = offline_token(&data, "admin", &[]);
    let other = offline_token(&data, "viewer", &[]);
    let s = Server::start(
        &data,
        &["--auth", "required", "--config", cfg.to_str().unwrap()],
    );
    let url = format!("{}/v1/tasks", s.http);
    let codes: Vec<u16> = (0..4)
        .map(|_| call("GET", &url, Some(&root), None).status)
        .collect();
    assert_eq!(codes[..3], [200, 200, 200], "{codes:?}");
    assert_eq!(codes[3], 429, "{codes:?}");
    let a = call("GET", &url, Some(&root), None);
    assert_eq!(a.status, 429);
    let wait: u64 = a.retry_after.unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    // Another token has its own bucket.
    assert_eq!(call("GET", &url, Some(&other), None).status, 200);
}

#[test]
fn no_authentication_on_a_network_address_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
        .args(["--host", "0.0.0.0", "--auth", "off", "--print-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http.auth")
            && err.contains("0.0.0.0")
            && err.contains("allow_unauthenticated"),
        "{err}"
    );
    let cfg = dir.path().join("open.toml");
    std::fs::write(&cfg, "[http]\nallow_unauthenticated = true\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
        .args([
            "--host",
            "0.0.0.0",
            "--auth",
            "off",
            "--print-config",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Loopback without authentication is fine, and the default needs tokens.
    for args in [&["--host", "127.0.0.1", "--auth", "off"][..], &[]] {
        let out = Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
            .args(args)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if args.is_empty() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("auth = \"required\""), "{text}");
        }
    }
}

/// Review (s9): a process holding a write transaction on auth.db. Before,
/// the audit writer gave up on its batch after the 5 s busy timeout
/// (accepted submits never reached the log), and a token creation waiting
/// on the lock held the one store connection, so every lookup of a token
/// not yet cached waited behind it. Now an action the log cannot record is
/// refused with a 503 that says so, every accepted one is written once the
/// lock goes, and lookups do not wait on writes.
#[test]
fn a_locked_auth_db_refuses_unrecorded_actions_and_loses_no_accepted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let root = offline_token(&data, "admin", &[]);
    let operator = offline_token(&data, "operator", &[]);
    let fresh = offline_token(&data, "viewer", &[]);
    let s = gone_device_server(dir.path(), &data, &root);
    let url = |p: &str| format!("{}{p}", s.http);
    assert_eq!(
        call("GET", &url("/v1/tasks"), Some(&root), None).status,
        200
    );

    let lock = rusqlite::Connection::open(data.join("auth.db")).unwrap();
    lock.execute_batch(
        "BEGIN IMMEDIATE; INSERT INTO audit (at_ms, action, target) VALUES (0, 'x', 'lock');",
    )
    .unwrap();

    // A creation waits on the lock; a token never seen is looked up anyway.
    let create = {
        let (u, r) = (url("/v1/tokens"), root.clone());
        std::thread::spawn(move || call("POST", &u, Some(&r), Some(json!({"role": "viewer"}))))
    };
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let a = call("GET", &url("/v1/tasks"), Some(&fresh), None);
    let took = t.elapsed();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(
        took < Duration::from_secs(3),
        "a lookup waited {took:?} on a write"
    );
    let c = create.join().unwrap();
    assert!(
        c.status == 503 || c.status == 201,
        "{} {:?}",
        c.status,
        c.body
    );

    // Submits: accepted (and recorded later) or refused, saying why.
    let mut accepted = Vec::new();
    let start = Instant::now();
    loop {
        let t = Instant::now();
        let a = call(
            "POST",
            &url("/v1/tasks"),
            Some(&operator),
            Some(submit_body()),
        );
        assert!(t.elapsed() < Duration::from_secs(15), "a submit hung");
        match a.status {
            202 => accepted.push(a.body["id"].as_str().unwrap().to_string()),
            503 => {
                let e = a.body["error"].as_str().unwrap();
                assert!(e.contains("audit"), "{e}");
                break;
            }
            s => panic!("{s}: {:?}", a.body),
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "submits were still accepted after 30 s of a locked audit log"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The refusal did nothing: the queue holds only the accepted ones.
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    eventually("every accepted submit is in the audit log", || {
        let a = call("GET", &url("/v1/audit?limit=1000"), Some(&root), None);
        let rows = a.body.as_array().cloned().unwrap_or_default();
        accepted.iter().all(|id| {
            rows.iter()
                .any(|r| r["action"] == "task.submit" && r["target"] == id.as_str())
        })
    });
    eventually("submits are accepted again", || {
        call(
            "POST",
            &url("/v1/tasks"),
            Some(&operator),
            Some(submit_body()),
        )
        .status
            == 202
    });
}

/// Review (s9): two `Authorization` headers are ambiguous (a proxy may read
/// the other one): refused, whichever comes first.
#[test]
fn several_authorization_headers_are_refused() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let root = offline_token(&data, "admin", &[]);
    let s = Server::start(&data, &["--auth", "required"]);
    let raw = |headers: &str| {
        let mut c = std::net::TcpStream::connect(s.http.trim_start_matches("http://")).unwrap();
        write!(
            c,
            "GET /v1/tokens HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    let one = raw(&format!("Authorization: Bearer {root}\r\n"));
    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
    for h in [
        format!("Authorization: Bearer {root}\r\nAuthorization: Bearer junk\r\n"),
        format!("Authorization: Bearer junk\r\nAuthorization: Bearer {root}\r\n"),
        format!("Authorization: Bearer {root}\r\nAuthorization: Bearer {root}\r\n"),
    ] {
        let a = raw(&h);
        assert!(a.starts_with("HTTP/1.1 401"), "{h}: {a}");
        assert!(a.contains("Authorization headers"), "{a}");
    }
}

/// Review (s9): auth.db deleted or replaced while the server runs. Before,
/// the server kept reading and writing the deleted file: tokens made
/// offline into the new one were refused ("no token with id") for good,
/// and audit rows went where no one would read them. Now a missing file is
/// a 503 that says so, and a new file is used as soon as it is there.
#[test]
fn a_deleted_or_replaced_auth_db_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let root = offline_token(&data, "admin", &[]);
    let fresh = offline_token(&data, "viewer", &[]);
    let s = Server::start(&data, &["--auth", "required"]);
    let url = |p: &str| format!("{}{p}", s.http);
    assert_eq!(
        call("GET", &url("/v1/tasks"), Some(&root), None).status,
        200
    );
    let moved = dir.path().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    for f in ["auth.db", "auth.db-wal", "auth.db-shm"] {
        let _ = std::fs::rename(data.join(f), moved.join(f));
    }
    // A token not yet read: the store is gone, and the answer says so.
    let a = call("GET", &url("/v1/tasks"), Some(&fresh), None);
    assert_eq!(a.status, 503, "{:?}", a.body);
    let e = a.body["error"].as_str().unwrap();
    assert!(
        e.contains("auth.db") && e.contains("no longer there"),
        "{e}"
    );
    // A new store made offline is used.
    let new_root = offline_token(&data, "admin", &["--name", "after"]);
    eventually("the new auth.db is read", || {
        call("GET", &url("/v1/tasks"), Some(&new_root), None).status == 200
    });
    let a = call(
        "POST",
        &url("/v1/tokens"),
        Some(&new_root),
        Some(json!({"role": "viewer"})),
    );
    assert_eq!(a.status, 201, "{:?}", a.body);
    let made = a.body["id"].as_str().unwrap().to_string();
    let d = data.display().to_string();
    let (ok, list, err) = admin(&["--json", "token", "list", "--data-dir", &d]);
    assert!(ok, "{err}");
    assert!(
        list.contains(&made),
        "made through the API into the old file: {list}"
    );
    eventually("its creation is in the new file's audit log", || {
        let a = call("GET", &url("/v1/audit"), Some(&new_root), None);
        a.body.as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["action"] == "token.create" && r["target"] == made.as_str())
        })
    });
}

/// Review (s9): tokens made or revoked offline (`--data-dir`: the way to
/// mint the first admin token) left no trace in the audit log.
#[test]
fn offline_token_changes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let d = data.display().to_string();
    let root = offline_token(&data, "admin", &[]);
    let victim = offline_token(&data, "viewer", &[]);
    let (ok, _, err) = admin(&["token", "revoke", id_of(&victim), "--data-dir", &d]);
    assert!(ok, "{err}");
    let s = Server::start(&data, &["--auth", "required"]);
    let a = call("GET", &format!("{}/v1/audit", s.http), Some(&root), None);
    assert_eq!(a.status, 200, "{:?}", a.body);
    let rows = a.body.as_array().unwrap();
    let has = |action: &str, id: &str| {
        rows.iter().any(|r| {
            r["action"] == action
                && r["token"].is_null()
                && r["target"].as_str().unwrap().starts_with(id)
                && r["target"].as_str().unwrap().contains("offline")
        })
    };
    assert!(has("token.create", id_of(&root)), "{rows:?}");
    assert!(has("token.create", id_of(&victim)), "{rows:?}");
    assert!(has("token.revoke", id_of(&victim)), "{rows:?}");
}

/// Review (s9): with `http.auth = "off"` on loopback any web page the
/// machine's user opens could submit and cancel tasks (a cross-site
/// `fetch` with `Content-Type: text/plain` needs no preflight, and the
/// body was parsed as JSON whatever its type). Browsers send `Origin` on
/// such requests; without a token they are refused.
#[test]
fn without_authentication_browser_requests_are_refused() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("srv"), &[]);
    let raw = |head: &str, body: &str| {
        let mut c = std::net::TcpStream::connect(s.http.trim_start_matches("http://")).unwrap();
        write!(
            c,
            "{head}\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    let body = r#"{"plugin": "echo", "input": {}}"#;
    let csrf = raw(
        "POST /v1/tasks HTTP/1.1\r\nOrigin: https://evil.example\r\nContent-Type: text/plain",
        body,
    );
    assert!(csrf.starts_with("HTTP/1.1 403"), "{csrf}");
    assert!(csrf.contains("Origin"), "{csrf}");
    let read = raw("GET /v1/tasks HTTP/1.1\r\nOrigin: null", "");
    assert!(read.starts_with("HTTP/1.1 403"), "{read}");
    // Not from a browser: as before (422: no device offers echo).
    let plain = raw(
        "POST /v1/tasks HTTP/1.1\r\nContent-Type: application/json",
        body,
    );
    assert!(plain.starts_with("HTTP/1.1 422"), "{plain}");
    assert!(raw("GET /v1/tasks HTTP/1.1", "").starts_with("HTTP/1.1 200"));
    assert!(raw("GET /healthz HTTP/1.1\r\nOrigin: null", "").starts_with("HTTP/1.1 200"));
}

/// Review (s9): a server stopped (SIGTERM) while auth.db is write-locked
/// lost the audit rows of actions it had accepted. They are now kept in
/// DATA_DIR/audit-unwritten.jsonl and taken into the log at the next start.
#[test]
fn audit_rows_not_written_at_exit_are_kept_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let root = offline_token(&data, "admin", &[]);
    let operator = offline_token(&data, "operator", &[]);
    let mut s = Server::start(&data, &["--auth", "required"]);
    let url = |s: &Server, p: &str| format!("{}{p}", s.http);
    s.client = s.client.clone().with_token(Some(root.clone()));
    let mut agent = Agent::start(dir.path(), "gone-1", &s.broker(), "");
    s.wait_online("gone-1");
    agent.kill();
    s.wait_offline("gone-1");
    assert_eq!(
        call("GET", &url(&s, "/v1/tasks"), Some(&operator), None).status,
        200
    );
    let lock = rusqlite::Connection::open(data.join("auth.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE; DELETE FROM audit WHERE 0;")
        .unwrap();
    let a = call(
        "POST",
        &url(&s, "/v1/tasks"),
        Some(&operator),
        Some(submit_body()),
    );
    assert_eq!(a.status, 202, "{:?}", a.body);
    let task = a.body["id"].as_str().unwrap().to_string();
    let st = Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        s.wait_exit(Duration::from_secs(30)).is_some(),
        "no exit after SIGTERM"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let s = Server::start(&data, &["--auth", "required"]);
    let a = call("GET", &url(&s, "/v1/audit"), Some(&root), None);
    let rows = a.body.as_array().cloned().unwrap_or_default();
    assert!(
        rows.iter()
            .any(|r| r["action"] == "task.submit" && r["target"] == task.as_str()),
        "the accepted submit is not in the audit log: {rows:?}"
    );
    assert!(!data.join("audit-unwritten.jsonl").exists());
}

/// Review (s9): a client that went away while its submit waited on the
/// scheduler (here: the task store write-locked by another process) had
/// its task accepted and run, but the handler was dropped before it wrote
/// the audit row.
#[test]
fn a_submit_whose_client_went_away_is_still_audited() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let root = offline_token(&data, "admin", &[]);
    let operator = offline_token(&data, "operator", &[]);
    let s = gone_device_server(dir.path(), &data, &root);
    let url = |p: &str| format!("{}{p}", s.http);
    assert_eq!(
        call("GET", &url("/v1/tasks"), Some(&operator), None).status,
        200
    );
    let lock = rusqlite::Connection::open(data.join("openclaw.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = submit_body().to_string();
    let mut c = std::net::TcpStream::connect(s.http.trim_start_matches("http://")).unwrap();
    write!(
        c,
        "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {operator}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let ids = std::cell::RefCell::new(Vec::<String>::new());
    eventually("the submit is stored", || {
        let a = call("GET", &url("/v1/tasks"), Some(&root), None);
        *ids.borrow_mut() = a
            .body
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|t| t["id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        !ids.borrow().is_empty()
    });
    let ids = ids.into_inner();
    eventually("its audit row is written", || {
        let a = call("GET", &url("/v1/audit"), Some(&root), None);
        let rows = a.body.as_array().cloned().unwrap_or_default();
        ids.iter().all(|id| {
            rows.iter()
                .any(|r| r["action"] == "task.submit" && r["target"] == id.as_str())
        })
    });
}

/// Review (s9): a token change and its audit row were two commits (offline:
/// two statements; online: the token, then a queued row), so a crash or a
/// failing audit insert between them left a token no log knew of. Now one
/// transaction: here an audit insert that fails makes the creation fail.
#[test]
fn a_token_is_not_made_without_its_audit_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let root = offline_token(&data, "admin", &[]);
    let db = rusqlite::Connection::open(data.join("auth.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'no'); END;",
    )
    .unwrap();
    let d = data.display().to_string();
    let (ok, _, _) = admin(&["token", "create", "--role", "admin", "--data-dir", &d]);
    assert!(!ok);
    let (ok, _, _) = admin(&["token", "revoke", id_of(&root), "--data-dir", &d]);
    assert!(!ok);
    let s = Server::start(&data, &["--auth", "required"]);
    let a = call(
        "POST",
        &format!("{}/v1/tokens", s.http),
        Some(&root),
        Some(json!({"role": "admin"})),
    );
    assert_eq!(a.status, 503, "{:?}", a.body);
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "tokens were made with no audit row");
    let revoked: Option<i64> = db
        .query_row("SELECT revoked_ms FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(revoked, None, "revoked with no audit row");
}
