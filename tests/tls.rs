//! TLS between agent, server and a real mosquitto: mutual TLS with a private
//! CA made by `openssl` for the test, connection by host name (`localhost`,
//! checked against the certificate's name), an echo task answered over it;
//! an agent that trusts another CA never gets in and keeps running.

mod common;
#[path = "support/pki.rs"]
mod pki;

use common::{task, Agent, Mosquitto, Server};
use openclaw::protocol::api::TaskState;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `make_cert` as the broker tests need it: extended key usage `eku`.
fn make_cert(dir: &Path, ca: &str, name: &str, san: &str, eku: &str) -> (PathBuf, PathBuf) {
    pki::make_cert_for(dir, ca, name, san, eku, 2)
}

#[test]
fn agent_and_server_over_mutual_tls_to_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = pki::make_ca(d, "fleet");
    let (broker_cert, broker_key) = make_cert(
        d,
        "fleet",
        "broker",
        "DNS:localhost,IP:127.0.0.1",
        "serverAuth",
    );
    let (srv_cert, srv_key) = make_cert(d, "fleet", "server", "DNS:openclaw-server", "clientAuth");
    let (agent_cert, agent_key) = make_cert(d, "fleet", "agent", "DNS:tls-1", "clientAuth");
    // mosquitto started as root drops to its own user, which must be able
    // to read the (throwaway) certificates and keys.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in std::fs::read_dir(d).unwrap() {
        std::fs::set_permissions(f.unwrap().path(), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    // One TLS listener that requires a client certificate.
    let broker = Mosquitto::start_with(
        d,
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            ca.display(),
            broker_cert.display(),
            broker_key.display()
        ),
    );
    let url = format!("mqtts://localhost:{}", broker.port);

    let srv_conf = d.join("server.toml");
    std::fs::write(
        &srv_conf,
        format!(
            "[mqtt]\nembedded = false\nbroker = \"{url}\"\n[mqtt.tls]\nca_file = \"{}\"\n\
             client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            ca.display(),
            srv_cert.display(),
            srv_key.display()
        ),
    )
    .unwrap();
    let server = Server::start(&d.join("srv"), &["--config", srv_conf.to_str().unwrap()]);

    let tls = |cert: &Path, key: &Path| {
        format!(
            "[mqtt.tls]\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        )
    };
    let _agent = Agent::start(d, "tls-1", &url, &tls(&agent_cert, &agent_key));
    server.wait_online("tls-1");
    let id = server.submit(task("echo", json!({ "over": "tls" })));
    let t = server.wait(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!({ "over": "tls" })));

    // An agent that trusts another CA refuses the broker's certificate: it
    // says why, keeps retrying with back-off, and does not exit.
    let other = pki::make_ca(d, "other");
    let rogue_dir = d.join("agent-rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let rogue_conf = rogue_dir.join("agent.toml");
    std::fs::write(
        &rogue_conf,
        format!(
            "[mqtt]\nbroker = \"{url}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n\
             [mqtt.tls]\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            other.display(),
            agent_cert.display(),
            agent_key.display()
        ),
    )
    .unwrap();
    let mut rogue = Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
        .args(["--config", rogue_conf.to_str().unwrap(), "--id", "rogue"])
        .arg("--data-dir")
        .arg(&rogue_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openclaw-agent");
    let lines = BufReader::new(rogue.stderr.take().unwrap()).lines();
    let mut errors = 0;
    let mut first = String::new();
    for line in lines.map_while(Result::ok) {
        if line.contains("connection error") {
            if first.is_empty() {
                first = line.clone();
            }
            errors += 1;
            if errors == 3 {
                break;
            }
        }
    }
    assert_eq!(errors, 3, "the agent should report its failed TLS connects");
    assert!(
        first.to_lowercase().contains("certificate") || first.contains("UnknownIssuer"),
        "the error should say the certificate is not trusted: {first}"
    );
    assert!(rogue.try_wait().unwrap().is_none(), "the agent exited");
    let devices = server.client.devices().unwrap();
    assert!(
        devices.iter().all(|d| d.id != "rogue"),
        "an agent with the wrong CA got in: {devices:?}"
    );
    let _ = rogue.kill();
    let _ = rogue.wait();
}

#[test]
fn tls_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
        .args(["--broker", "mqtts://localhost:8883", "--print-config"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.tls.ca_file"), "{err}");
}
