//! `https://` in the agent's `http` plugin, through a real server and agent:
//! local HTTPS servers (rustls) with certificates from a private CA made by
//! `openssl` for the test. A valid certificate is accepted, from `ca_file`
//! and from the platform's store (`SSL_CERT_FILE`); a wrong host name, an
//! expired certificate and an unknown CA are refused, not retried, with an
//! error naming the host and the reason; the allow-list holds for
//! `https://` as for `http://`.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;
#[path = "support/pki.rs"]
mod pki;

use common::{task, Agent, Server};
use openclaw::protocol::api::TaskState;
use pki::{make_ca, make_cert};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// An HTTPS server on loopback with this certificate: answers each request
/// with JSON naming the request line. Returns the port.
fn https_server(cert: &Path, key: &Path) -> u16 {
    pki::serve(
        Some((cert, key)),
        Arc::new(|path: &str| {
            let answer = json!({"request": format!("GET {path} HTTP/1.1"), "tls": true});
            (200, "application/json", answer.to_string().into_bytes())
        }),
    )
}

fn run(server: &Server, agent: &str, url: &str) -> openclaw::protocol::api::TaskView {
    let mut req = task("http", json!({ "url": url }));
    req.target = Some(agent.into());
    req.max_attempts = Some(3);
    server.wait(&server.submit(req))
}

fn ok(server: &Server, agent: &str, url: &str) -> Value {
    let t = run(server, agent, url);
    assert_eq!(t.state, TaskState::Succeeded, "{agent} {url}: {t:?}");
    t.result.unwrap()
}

/// Fails at the first attempt (a refused certificate is not retried), the
/// error naming the plugin and containing every needle.
fn refused(server: &Server, agent: &str, url: &str, needles: &[&str]) -> String {
    let t = run(server, agent, url);
    assert_eq!(t.state, TaskState::Failed, "{agent} {url}: {t:?}");
    assert_eq!(t.attempts, 1, "retried: {t:?}");
    let e = t.error.clone().unwrap_or_default();
    assert!(e.contains("`http`"), "{url}: {e}");
    for n in needles {
        assert!(e.contains(n), "{url}: `{n}` not in: {e}");
    }
    e
}

#[test]
fn https_with_a_private_ca_through_a_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "corp");
    make_ca(d, "other");
    let (c, k) = make_cert(d, "corp", "good", "DNS:localhost", 2);
    let good = https_server(&c, &k);
    let (c, k) = make_cert(d, "corp", "misnamed", "DNS:api.example.com", 2);
    let misnamed = https_server(&c, &k);
    let (c, k) = make_cert(d, "corp", "expired", "DNS:localhost", -1);
    let expired = https_server(&c, &k);
    let (c, k) = make_cert(d, "other", "stranger", "DNS:localhost", 2);
    let stranger = https_server(&c, &k);

    let server = Server::start(&d.join("srv"), &[]);
    // Agent 1 trusts the CA of its `ca_file` only.
    let _a1 = Agent::start(
        d,
        "https-file",
        &server.broker(),
        &format!(
            "[plugins.http]\nallow = [\"localhost\"]\nca_file = {:?}\n",
            ca.display().to_string()
        ),
    );
    // Agent 2 has no `ca_file`: the platform's store, here pointed at the
    // test CA with SSL_CERT_FILE (as an operator may do system-wide).
    let ssl_cert_file = format!("SSL_CERT_FILE={}", ca.display());
    let _a2 = Agent::start_with(
        d,
        "https-platform",
        &server.broker(),
        "[plugins.http]\nallow = [\"localhost\"]\n",
        &["env", &ssl_cert_file],
    );
    server.wait_online("https-file");
    server.wait_online("https-platform");

    for agent in ["https-file", "https-platform"] {
        let r = ok(&server, agent, &format!("https://localhost:{good}/v1/ping"));
        assert_eq!(r["status"], 200, "{agent}: {r}");
        assert_eq!(
            r["json"]["request"], "GET /v1/ping HTTP/1.1",
            "{agent}: {r}"
        );
        let host = format!("`localhost:{misnamed}`");
        let e = refused(
            &server,
            agent,
            &format!("https://localhost:{misnamed}/"),
            &[&host, "wrong host name", "api.example.com"],
        );
        eprintln!("wrong host name: {e}");
        let host = format!("`localhost:{expired}`");
        let e = refused(
            &server,
            agent,
            &format!("https://localhost:{expired}/"),
            &[&host, "expired"],
        );
        eprintln!("expired: {e}");
        let host = format!("`localhost:{stranger}`");
        let roots = if agent == "https-file" {
            "ca_file"
        } else {
            "the platform's root store"
        };
        let e = refused(
            &server,
            agent,
            &format!("https://localhost:{stranger}/"),
            &[&host, "unknown CA", roots],
        );
        eprintln!("unknown CA: {e}");
        // The allow-list names `localhost`, not 127.0.0.1: refused before
        // any connection, for https:// as for http://.
        refused(
            &server,
            agent,
            &format!("https://127.0.0.1:{good}/"),
            &["allow-list", &format!("127.0.0.1:{good}")],
        );
    }

    // Plain http:// to the TLS port fails too.
    let mut req = task(
        "http",
        json!({ "url": format!("http://localhost:{good}/") }),
    );
    req.target = Some("https-file".into());
    req.max_attempts = Some(1);
    let t = server.wait(&server.submit(req));
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
}

#[test]
fn a_bad_ca_file_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("not-a-ca.pem"), "hello\n").unwrap();
    for (ca_file, needle) in [
        (d.join("missing.pem"), "cannot read"),
        (d.join("not-a-ca.pem"), "no PEM certificate"),
    ] {
        let conf = d.join("agent.toml");
        std::fs::write(
            &conf,
            format!(
                "[plugins.http]\nallow = [\"localhost\"]\nca_file = {:?}\n",
                ca_file.display().to_string()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
            .args(["--config", conf.to_str().unwrap(), "--print-config"])
            .args(["--broker", "mqtt://127.0.0.1:1"])
            .arg("--data-dir")
            .arg(d.join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{ca_file:?} accepted: {err}");
        assert!(
            err.contains("ca_file") && err.contains(needle),
            "{ca_file:?}: {err}"
        );
    }
}
