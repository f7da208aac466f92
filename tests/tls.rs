//! TLS between agent, server and a real mosquitto: mutual TLS with a private
//! CA made by `openssl` for the test, connection by host name (`localhost`,
//! checked against the certificate's name), an echo task answered over it;
//! an agent that trusts another CA never gets in and keeps running. The
//! embedded broker's own TLS listener (`[mqtt.listen_tls]`): mutual TLS,
//! stalled handshakes that hold nobody up and are given up, an agent
//! without a client certificate kept out.

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
    let first = refused_agent(&rogue_dir, &rogue_conf, "rogue", &server);
    assert!(
        first.to_lowercase().contains("certificate") || first.contains("UnknownIssuer"),
        "the error should say the certificate is not trusted: {first}"
    );
}

/// Runs agent `id` with `conf` until it has reported three failed connects
/// and returns the first such line; asserts it is still running and never
/// came online.
fn refused_agent(dir: &Path, conf: &Path, id: &str, server: &Server) -> String {
    let mut agent = Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
        .args(["--config", conf.to_str().unwrap(), "--id", id])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openclaw-agent");
    let lines = BufReader::new(agent.stderr.take().unwrap()).lines();
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
    assert_eq!(
        errors, 3,
        "agent {id} should report its failed TLS connects"
    );
    assert!(agent.try_wait().unwrap().is_none(), "agent {id} exited");
    let devices = server.client.devices().unwrap();
    assert!(
        devices.iter().all(|d| d.id != id),
        "agent {id} got in: {devices:?}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    first
}

/// A fleet CA, the embedded broker's certificate for `localhost` and an
/// agent's client certificate, and a server whose embedded broker speaks
/// mutual TLS with them (`[mqtt.listen_tls]`, handshakes given up after
/// `timeout_ms`). Returns the server, the `mqtts://` URL and the agent's
/// `[mqtt.tls]` section.
fn embedded_tls_server(d: &Path, timeout_ms: u64) -> (Server, String, String) {
    embedded_tls_server_with(d, &format!("handshake_timeout_ms = {timeout_ms}\n"))
}

/// [`embedded_tls_server`] with `extra` in its `[mqtt.listen_tls]`.
fn embedded_tls_server_with(d: &Path, extra: &str) -> (Server, String, String) {
    let ca = pki::make_ca(d, "fleet");
    let (cert, key) = make_cert(
        d,
        "fleet",
        "broker",
        "DNS:localhost,IP:127.0.0.1",
        "serverAuth",
    );
    let (agent_cert, agent_key) = make_cert(d, "fleet", "agent", "DNS:tls-e", "clientAuth");
    let conf = d.join("server.toml");
    std::fs::write(
        &conf,
        format!(
            "[mqtt.listen_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n{extra}",
            cert.display(),
            key.display(),
            ca.display()
        ),
    )
    .unwrap();
    let server = Server::start(&d.join("srv"), &["--config", conf.to_str().unwrap()]);
    let port = server.broker().rsplit(':').next().unwrap().to_string();
    let agent_tls = format!(
        "[mqtt.tls]\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        ca.display(),
        agent_cert.display(),
        agent_key.display()
    );
    (server, format!("mqtts://localhost:{port}"), agent_tls)
}

/// The embedded broker over mutual TLS: an agent with a fleet certificate
/// gets its echo answered while three clients hold TCP connections open
/// without ever starting their handshakes. Upstream rumqttd awaited each
/// handshake inside its accept loop with no deadline, so these three would
/// have kept everyone else out; here the deadline is ten minutes, so only
/// handshakes off the accept loop let the agent in.
#[test]
fn embedded_broker_over_mutual_tls_with_stalled_handshakes_open() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, url, agent_tls) = embedded_tls_server(d, 600_000);
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let stalled: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let _agent = Agent::start(d, "tls-e1", &url, &agent_tls);
    server.wait_online("tls-e1");
    let id = server.submit(task("echo", json!({ "embedded": "tls" })));
    let t = server.wait(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!({ "embedded": "tls" })));
    // They were still open all along (the ten-minute deadline).
    for mut s in stalled {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = std::io::Read::read(&mut s, &mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a stalled connection was closed early: {r:?}"
        );
    }
}

/// `max_handshakes`: with that many stalled handshakes under way, a new
/// connection gives up the oldest (before, each one accepted waited out the
/// deadline with its descriptor and buffers, as many as the accept loop took
/// in that time), and an agent gets in while stalled ones fill every slot.
#[test]
fn embedded_broker_tls_bounds_the_handshakes_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, url, agent_tls) =
        embedded_tls_server_with(d, "handshake_timeout_ms = 600000\nmax_handshakes = 2\n");
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        s
    };
    let closed = |s: &mut std::net::TcpStream| {
        let mut b = [0u8; 16];
        match std::io::Read::read(s, &mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    let mut oldest = connect();
    let _second = connect();
    let _third = connect();
    assert!(
        closed(&mut oldest),
        "the oldest stalled handshake was kept past max_handshakes"
    );
    // Two stalled handshakes hold both slots all along.
    let _agent = Agent::start(d, "tls-m1", &url, &agent_tls);
    server.wait_online("tls-m1");
    let id = server.submit(task("echo", json!({ "bounded": true })));
    assert_eq!(server.wait(&id).state, TaskState::Succeeded);
}

/// With `[mqtt.listen_tls]` and `mqtt.auth = "off"` (the client CA the only
/// gate), the plain loopback listener beside it for the server took any
/// MQTT client on this machine, no certificate asked: it now wants the
/// server's own login (made at each start), and the server still works.
#[test]
fn embedded_tls_loopback_listener_admits_only_the_server() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = pki::make_ca(d, "fleet");
    let (cert, key) = make_cert(d, "fleet", "broker", "DNS:localhost", "serverAuth");
    let conf = d.join("server.toml");
    std::fs::write(
        &conf,
        format!(
            "[mqtt.listen_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
            cert.display(),
            key.display(),
            ca.display()
        ),
    )
    .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
            .args(["--config", conf.to_str().unwrap(), "--host", "127.0.0.1"])
            .args(["--port", "0", "--mqtt-port", "0", "--auth", "off"])
            .arg("--data-dir")
            .arg(d.join("srv"))
            .env("RUST_LOG", "info,rumqttd=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut loopback = None;
    let mut connected = false;
    while loopback.is_none() || !connected {
        let line = lines.next().expect("server ended").unwrap();
        if let Some(rest) = line.split(", and on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap();
            loopback = Some(addr.parse::<std::net::SocketAddr>().unwrap());
        }
        connected |= line.contains("server: connected");
    }
    std::thread::spawn(move || for _ in lines {});
    // MQTT 3.1.1 CONNECT, clean session, client id "x", no login.
    let mut s = std::net::TcpStream::connect(loopback.unwrap()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    s.write_all(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'x',
    ])
    .unwrap();
    let mut ack = [0u8; 4];
    let n = s.read(&mut ack).unwrap_or(0);
    assert!(
        !(n == 4 && ack == [0x20, 2, 0, 0]),
        "an anonymous client got into the loopback listener"
    );
}

/// `handshake_timeout_ms`: a client that opens TCP and says nothing is
/// disconnected once it passes; a client without a certificate from the
/// fleet CA never gets in (the agent says so and keeps retrying).
#[test]
fn embedded_broker_tls_drops_stalled_handshakes_and_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, url, _) = embedded_tls_server(d, 300);
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Event, not time: the broker's close arrives as EOF (or a reset); the
    // read timeout only bounds a broken build.
    stalled
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut b = [0u8; 16];
    match std::io::Read::read(&mut stalled, &mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the stalled handshake was not given up: {other:?}"),
    }

    let ca = d.join("fleet-ca.pem");
    let nocert = d.join("agent-nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    let conf = nocert.join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "[mqtt]\nbroker = \"{url}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n\
             [mqtt.tls]\nca_file = \"{}\"\n",
            ca.display()
        ),
    )
    .unwrap();
    refused_agent(&nocert, &conf, "nocert", &server);
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

    // The embedded broker's TLS: only for the embedded broker, and its
    // files are read at start, each named when wrong.
    let server_err = |conf: &str| {
        let f = dir.path().join("server.toml");
        std::fs::write(&f, conf).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_openclaw-server"))
            .args(["--config", f.to_str().unwrap(), "--print-config"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{conf}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = server_err(
        "[mqtt]\nembedded = false\nbroker = \"mqtt://127.0.0.1:1883\"\n\
         [mqtt.listen_tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n",
    );
    assert!(err.contains("mqtt.listen_tls"), "{err}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no pem here\n").unwrap();
    let err = server_err(&format!(
        "[mqtt.listen_tls]\ncert_file = \"{}\"\nkey_file = \"k.pem\"\n",
        empty.display()
    ));
    assert!(
        err.contains("mqtt.listen_tls.cert_file") && err.contains("no certificate"),
        "{err}"
    );
    let err =
        server_err("[mqtt.listen_tls]\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"k.pem\"\n");
    assert!(err.contains("/nonexistent/c.pem"), "{err}");

    // A certificate rustls cannot read is named as the cert file (it was
    // blamed on the key file), a key of another certificate as the key file.
    let d = dir.path();
    pki::make_ca(d, "cfg");
    let (cert, key) = make_cert(d, "cfg", "b1", "DNS:localhost", "serverAuth");
    let (_, other_key) = make_cert(d, "cfg", "b2", "DNS:localhost", "serverAuth");
    let bad = d.join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let tls = |c: &Path, k: &Path| {
        format!(
            "[mqtt.listen_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            c.display(),
            k.display()
        )
    };
    let err = server_err(&tls(&bad, &key));
    assert!(err.contains("mqtt.listen_tls.cert_file"), "{err}");
    let err = server_err(&tls(&cert, &other_key));
    assert!(err.contains("mqtt.listen_tls.key_file"), "{err}");
}

/// `openclaw-admin init` makes an installation that works as written: the
/// server with its config needs tokens (the one init printed is admin) and
/// runs its broker on mutual TLS with logins; the agent with init's config
/// (the CA, its certificate and its password) comes online and answers a
/// task. Keys, token and passwords are readable by the owner only, and a
/// second init into the same place refuses to overwrite.
#[test]
fn init_makes_an_installation_that_runs_a_task_end_to_end() {
    use openclaw::admin::{AdminError, Client};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("site");
    let init = || {
        Command::new(env!("CARGO_BIN_EXE_openclaw-admin"))
            .args(["--json", "init", "--dir", out.to_str().unwrap()])
            .args(["--model-path", d.join("models").to_str().unwrap()])
            .args([
                "--host",
                "localhost",
                "--host",
                "127.0.0.1",
                "--device",
                "pi-1",
            ])
            .args(["--http-port", "0", "--mqtt-port", "0"])
            .output()
            .unwrap()
    };
    let o = init();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let again = init();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds an installation"), "{err}");
    for f in [
        "pki/ca.key",
        "pki/broker.key",
        "admin.token",
        "server.toml",
        "agents/pi-1/agent.toml",
        "agents/pi-1/client.key",
    ] {
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    let data_mode = std::fs::metadata(out.join("data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(data_mode & 0o777, 0o700, "the data dir");

    let token = v["admin_token"].as_str().unwrap().to_string();
    let server = Server::start(
        Path::new(v["data_dir"].as_str().unwrap()),
        &[
            "--config",
            v["server_config"].as_str().unwrap(),
            "--auth",
            "required",
        ],
    );
    match server.client.devices() {
        Err(AdminError::Api { status: 401, .. }) => {}
        other => panic!("expected 401 without a token, got {other:?}"),
    }
    let client = Client::new(&server.http).with_token(Some(token));
    let port = server.broker().rsplit(':').next().unwrap().to_string();

    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(
        Command::new(env!("CARGO_BIN_EXE_openclaw-agent"))
            .args(["--config", v["agents"]["pi-1"].as_str().unwrap()])
            .args([
                "--broker",
                &format!("mqtts://localhost:{port}"),
                "--board",
                "sim",
            ])
            .arg("--data-dir")
            .arg(d.join("agent"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !client
        .devices()
        .unwrap()
        .iter()
        .any(|x| x.id == "pi-1" && x.online)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "pi-1 never came online"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = client
        .submit(&task("echo", json!({ "from": "init" })))
        .unwrap();
    let t = client
        .wait(&r.id, std::time::Duration::from_secs(60))
        .unwrap();
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result, Some(json!({ "from": "init" })));
}
