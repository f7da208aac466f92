//! Hostile tests of over-the-air updates: malformed and cut-off uploads,
//! hostile deploy requests and paths, forged MQTT offers, a flood of
//! bad downloads during a rollout, and a server SIGKILL mid-rollout.
mod common;

use common::ota::*;
use common::Server;
use openclaw::release::api::ReleaseView;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn server_with(dir: &Path, extra: &str) -> Server {
    let conf = dir.join("server.toml");
    std::fs::write(
        &conf,
        format!("[releases]\nresend_ms = 1000\ntarget_timeout_ms = 60000\n{extra}"),
    )
    .unwrap();
    Server::start(&dir.join("data"), &["--config", conf.to_str().unwrap()])
}

/// A raw HTTP/1.1 exchange: writes `req`, returns the status line (or
/// empty if the server closed without answering).
fn raw(server: &Server, req: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.http_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn healthy(server: &Server) {
    let r = ureq::get(&format!("{}/healthz", server.http))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .expect("server answers /healthz");
    assert_eq!(r.status().as_u16(), 200);
}

fn uploads_left(server: &Server) -> Vec<String> {
    std::fs::read_dir(server.data_dir.join("releases"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".upload-"))
                .collect()
        })
        .unwrap_or_default()
}

fn signing_key(path: &Path) -> ed25519_dalek::SigningKey {
    openclaw::release::key_from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A signed manifest text (one line) for `bin` with `f` applied first.
fn manifest_for(
    key: &ed25519_dalek::SigningKey,
    server: &Server,
    id: &str,
    counter: u64,
    bin: &[u8],
    f: impl FnOnce(&mut openclaw::release::Manifest),
) -> String {
    use sha2::Digest;
    let now = openclaw::now_ms();
    let mut m = openclaw::release::Manifest {
        id: id.into(),
        version: "9.9.9".into(),
        counter,
        target: openclaw::agent::ota::TARGET.into(),
        board: "sim".into(),
        sha256: openclaw::hex(&sha2::Sha256::digest(bin)),
        size: bin.len() as u64,
        url: format!("{}/v1/releases/{id}/binary", server.http),
        created_ms: now,
        expires_ms: now + 3_600_000,
        key_id: String::new(),
    };
    f(&mut m);
    m.sign(key).unwrap().trim_end().to_string()
}

fn post_release(server: &Server, manifest: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut req = ureq::post(&format!("{}/v1/releases", server.http));
    if let Some(m) = manifest {
        req = req.header(openclaw::release::api::MANIFEST_HEADER, m);
    }
    match req.config().http_status_as_error(false).build().send(body) {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

fn post_deploy(server: &Server, id: &str, body: &str) -> (u16, String) {
    match ureq::post(&format!("{}/v1/releases/{id}/deploy", server.http))
        .header("Content-Type", "application/json")
        .config()
        .http_status_as_error(false)
        .build()
        .send(body.as_bytes())
    {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

fn get_status(server: &Server, path: &str, bearer: Option<&str>) -> u16 {
    let mut req = ureq::get(&format!("{}{path}", server.http));
    if let Some(b) = bearer {
        req = req.header("Authorization", &format!("Bearer {b}"));
    }
    match req.config().http_status_as_error(false).build().call() {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

fn wait_no_uploads(server: &Server, what: &str) {
    let start = Instant::now();
    while !uploads_left(server).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        uploads_left(server).is_empty(),
        "{what}: `.upload-*` files left in DATA/releases: {:?}",
        uploads_left(server)
    );
}

#[test]
fn malformed_uploads_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let server = server_with(root, "max_binary_bytes = 100000\n");
    let key = openclaw::release::generate_key().unwrap();
    let bin = vec![7u8; 5000];

    // No header, garbage, an oversized header, a non-ASCII one.
    let (s, _) = post_release(&server, None, &bin);
    assert_eq!(s, 400, "no header");
    let (s, _) = post_release(&server, Some("{not json"), &bin);
    assert_eq!(s, 400, "garbage header");
    let huge = "x".repeat(64 << 10);
    let (s, _) = post_release(&server, Some(&huge), &bin);
    assert!(
        s == 400 || s == 431 || s == 413 || s == 0,
        "huge header: {s}"
    );
    healthy(&server);
    let line = raw(
        &server,
        b"POST /v1/releases HTTP/1.1\r\nHost: x\r\nopenclaw-manifest: \xff\xfe\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert!(line.contains(" 400 "), "non-ASCII header: {line}");

    // Size beyond releases.max_binary_bytes: refused before the body.
    let big = manifest_for(&key, &server, "big", 1, &bin, |m| m.size = 10_000_000);
    let (s, b) = post_release(&server, Some(&big), &bin);
    assert_eq!(s, 413, "{b}");

    // Longer and shorter bodies than the manifest says.
    let m = manifest_for(&key, &server, "r1", 1, &bin, |_| {});
    let mut longer = bin.clone();
    longer.extend_from_slice(b"more");
    let (s, b) = post_release(&server, Some(&m), &longer);
    assert_eq!(s, 400, "longer: {b}");
    let (s, b) = post_release(&server, Some(&m), &bin[..100]);
    assert_eq!(s, 400, "shorter: {b}");
    // Same length, another binary.
    let (s, b) = post_release(&server, Some(&m), &vec![8u8; 5000]);
    assert_eq!(s, 400, "other sha: {b}");
    wait_no_uploads(&server, "after refused uploads");
    healthy(&server);

    // Then the right one is stored, once.
    let (s, b) = post_release(&server, Some(&m), &bin);
    assert_eq!(s, 201, "{b}");
    let (s, b) = post_release(&server, Some(&m), &bin);
    assert_eq!(s, 409, "{b}");
    let list: Vec<ReleaseView> = serde_json::from_str(
        &ureq::get(&format!("{}/v1/releases", server.http))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].id, "r1");
    wait_no_uploads(&server, "after a good upload and a duplicate");
    assert!(server.data_dir.join("releases/r1.bin").exists());
}

#[test]
fn an_upload_cut_off_midway_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let server = server_with(root, "");
    let key = openclaw::release::generate_key().unwrap();
    let bin = vec![9u8; 200_000];
    let m = manifest_for(&key, &server, "cut", 1, &bin, |_| {});
    for round in 0..3 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.http_port)).unwrap();
        let head = format!(
            "POST /v1/releases HTTP/1.1\r\nHost: x\r\n{}: {m}\r\nContent-Length: {}\r\n\r\n",
            openclaw::release::api::MANIFEST_HEADER,
            bin.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&bin[..bin.len() / 2]).unwrap();
        s.flush().unwrap();
        // Let the server start streaming it to its temp file.
        std::thread::sleep(Duration::from_millis(500));
        drop(s); // the client goes away mid-body
        std::thread::sleep(Duration::from_millis(500));
        healthy(&server);
        wait_no_uploads(&server, &format!("round {round}: client closed mid-body"));
    }
    // And it can still be uploaded whole.
    let (s, b) = post_release(&server, Some(&m), &bin);
    assert_eq!(s, 201, "{b}");
    wait_no_uploads(&server, "after the whole upload");
}

#[test]
fn a_server_killed_during_an_upload_cleans_up_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut server = server_with(root, "");
    let key = openclaw::release::generate_key().unwrap();
    let bin = vec![3u8; 200_000];
    let m = manifest_for(&key, &server, "killed", 1, &bin, |_| {});
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.http_port)).unwrap();
    let head = format!(
        "POST /v1/releases HTTP/1.1\r\nHost: x\r\n{}: {m}\r\nContent-Length: {}\r\n\r\n",
        openclaw::release::api::MANIFEST_HEADER,
        bin.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&bin[..bin.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let during = uploads_left(&server);
    server.restart();
    drop(s);
    healthy(&server);
    wait_no_uploads(
        &server,
        &format!("after SIGKILL mid-upload and a restart (during: {during:?})"),
    );
    let (st, b) = post_release(&server, Some(&m), &bin);
    assert_eq!(st, 201, "{b}");
}

#[test]
fn hostile_deploy_requests_and_paths_are_refused() {
    let r = rig();
    let _dev = r.device("hd-1", None);
    create(&r.server, &r.key, &new_binary(&r.root, "h2"), "h2", 2);
    for (body, what) in [
        ("{", "bad json"),
        ("{\"devices\": [\"hd-1\"], \"evil\": 1}", "unknown field"),
        ("{\"canary_percent\": 0}", "canary 0"),
        ("{\"canary_percent\": 101}", "canary 101"),
        ("{\"canary_percent\": 300}", "canary beyond u8"),
        ("{\"canary_percent\": -1}", "canary negative"),
        ("{\"max_failure_percent\": 101}", "max failure 101"),
        ("{\"devices\": [\"nosuch\"]}", "unknown device"),
        ("{\"devices\": []}", "no devices"),
        ("{\"devices\": [\"../../etc\"]}", "traversal device"),
        (
            "{\"devices\": null, \"canary_percent\": \"10%\"}",
            "canary string",
        ),
    ] {
        let (s, b) = post_deploy(&r.server, "h2", body);
        assert!(s == 400 || s == 404 || s == 422, "{what}: {s} {b}");
        let v = show(&r.server, "h2");
        assert_eq!(v.state, "new", "{what}: nothing deployed: {v:?}");
    }
    for p in [
        "/v1/releases/../../etc/passwd/binary",
        "/v1/releases/..%2F..%2Fetc%2Fpasswd/binary",
        "/v1/releases/%2e%2e%2f%2e%2e%2freleases/binary",
        "/v1/releases/..%2Freleases.db%00/binary",
        "/v1/releases/h2%2F..%2F..%2Freleases.db/binary",
    ] {
        let s = get_status(&r.server, p, Some("whatever"));
        assert!(s == 404 || s == 400, "{p}: {s}");
        let s = get_status(&r.server, p, None);
        assert!(s == 404 || s == 400, "{p}: {s}");
    }
    // An empty bearer is not the grant either.
    assert_eq!(
        get_status(&r.server, "/v1/releases/h2/binary", Some("")),
        404
    );
    assert_eq!(get_status(&r.server, "/v1/releases/h2/binary", None), 404);
    healthy(&r.server);
    // A real deploy still works afterwards.
    admin_ok(&r.server, &["release", "deploy", "h2"]);
    let v = settled(&r.server, "h2", Duration::from_secs(60));
    assert_eq!(v.state, "done", "{v:?}");
    wait_running(&r.server, "hd-1", "h2");
}

#[test]
fn a_json_array_is_not_a_deploy_request() {
    // serde's derive takes a sequence for a struct: `[]` is every field
    // absent, i.e. "deploy to every device of the board".
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), "");
    let key = openclaw::release::generate_key().unwrap();
    let bin = vec![1u8; 100];
    let m = manifest_for(&key, &server, "arr", 1, &bin, |_| {});
    assert_eq!(post_release(&server, Some(&m), &bin).0, 201);
    for body in ["[]", "[null, null, null]", "[[\"x\"]]"] {
        let (s, b) = post_deploy(&server, "arr", body);
        assert_eq!(s, 400, "deploy body `{body}` should be refused: {s} {b}");
    }
}

#[test]
fn forged_mqtt_offers_are_refused_and_the_agent_stays_up() {
    let r = rig();
    let dev = r.device("fo-1", None);
    let peer = common::MqttPeer::connect(r.server.mqtt_port, "forger", &[]);
    let topic = openclaw::protocol::topics::tasks("fo-1");
    let key = signing_key(&r.key);
    let attacker = openclaw::release::generate_key().unwrap();
    let binp = new_binary(&r.root, "f2");
    let bin = std::fs::read(&binp).unwrap();
    let send = |m: String, grant: String| {
        peer.publish(
            &topic,
            openclaw::protocol::encode(&openclaw::protocol::ToAgent::Update(
                openclaw::protocol::UpdateOffer { manifest: m, grant },
            )),
        );
    };
    let good = manifest_for(&key, &r.server, "f2", 2, &bin, |_| {});
    // A real signed manifest whose signature is altered (last hex digit).
    let mut badsig = good.clone();
    let pos = badsig.rfind('"').unwrap() - 1;
    let c = badsig.as_bytes()[pos];
    badsig.replace_range(pos..pos + 1, if c == b'0' { "1" } else { "0" });
    send(format!("{badsig}\n"), "g".into());
    // Signed by an untrusted key.
    send(
        format!(
            "{}\n",
            manifest_for(&attacker, &r.server, "f2", 99, &bin, |_| {})
        ),
        "g".into(),
    );
    // A traversal id: the good manifest's text with the id swapped.
    send(
        format!(
            "{}\n",
            good.replace("\"id\":\"f2\"", "\"id\":\"../../tmp/x\"")
        ),
        "g".into(),
    );
    send(
        format!("{}\n", good.replace("\"id\":\"f2\"", "\"id\":\"..\"")),
        "g".into(),
    );
    // A megabyte manifest, a megabyte grant on a real one (its download is
    // refused: the release is not on the server at all).
    send("{".repeat(1 << 20), "g".into());
    send(format!("{good}\n"), "G".repeat(1 << 20));
    // Not JSON, empty.
    send(String::new(), String::new());
    send("\u{0}\u{1}garbage".into(), "\r\nX-Injected: 1".into());
    // A forged confirmation of a release not on trial.
    peer.publish(
        &topic,
        openclaw::protocol::encode(&openclaw::protocol::ToAgent::UpdateConfirmed {
            release: "f2".into(),
        }),
    );
    peer.publish(
        &topic,
        openclaw::protocol::encode(&openclaw::protocol::ToAgent::UpdateConfirmed {
            release: "../../etc".into(),
        }),
    );
    // Raw garbage on the topic too.
    peer.publish(&topic, vec![0xff; 1000]);
    std::thread::sleep(Duration::from_secs(4));
    let (online, release, _) = device_view(&r.server, "fo-1").unwrap();
    assert!(online, "fo-1 went offline");
    assert_eq!(release.as_deref(), Some("a"));
    assert_eq!(dev.seen.lock().unwrap().starts, vec!["a"], "no restart");
    assert_eq!(dev.link("current"), "a");
    assert_eq!(dev.link("good"), "a");
    let rel: Vec<String> = std::fs::read_dir(dev.prefix.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(rel, vec!["a"], "nothing installed or left: {rel:?}");
    assert!(!r.root.join("tmp/x").exists());
    // Tasks still run.
    let t = r.server.wait(
        &r.server
            .submit(common::task("echo", serde_json::json!({"x": 1}))),
    );
    assert!(common::succeeded(&t), "{t:?}");
    // And a real rollout of the same id goes through afterwards (the
    // forged offers burnt no counter and no id).
    create(&r.server, &r.key, &binp, "f2", 2);
    admin_ok(&r.server, &["release", "deploy", "f2"]);
    let v = settled(&r.server, "f2", Duration::from_secs(60));
    assert_eq!(v.state, "done", "{v:?}");
    assert_eq!(target_state(&v, "fo-1").0, "succeeded", "{v:?}");
    wait_running(&r.server, "fo-1", "f2");
}

#[test]
fn forged_offers_during_a_rollout_do_not_fail_the_device() {
    let r = rig();
    let _dev = r.device("fr-1", None);
    let peer = common::MqttPeer::connect(r.server.mqtt_port, "forger2", &[]);
    let topic = openclaw::protocol::topics::tasks("fr-1");
    let attacker = openclaw::release::generate_key().unwrap();
    let binp = new_binary(&r.root, "r2");
    let bin = std::fs::read(&binp).unwrap();
    create(&r.server, &r.key, &binp, "r2", 2);
    // The forged offers name r2, before and while it rolls out: one with
    // a bad signature, one by an untrusted key, one with a wrong size.
    let forged = |i: u32| {
        let m = match i % 3 {
            0 => manifest_for(&attacker, &r.server, "r2", 2, &bin, |_| {}),
            1 => {
                let k = signing_key(&r.key);
                let g = manifest_for(&k, &r.server, "r2", 2, &bin, |_| {});
                g.replace("\"version\":\"9.9.9\"", "\"version\":\"6.6.6\"")
            }
            _ => manifest_for(&attacker, &r.server, "r2", 2, b"evil", |_| {}),
        };
        openclaw::protocol::encode(&openclaw::protocol::ToAgent::Update(
            openclaw::protocol::UpdateOffer {
                manifest: format!("{m}\n"),
                grant: "nope".into(),
            },
        ))
    };
    for i in 0..3 {
        peer.publish(&topic, forged(i));
    }
    std::thread::sleep(Duration::from_millis(500));
    admin_ok(&r.server, &["release", "deploy", "r2"]);
    for i in 0..30 {
        peer.publish(&topic, forged(i));
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = settled(&r.server, "r2", Duration::from_secs(60));
    assert_eq!(v.state, "done", "forged offers failed the rollout: {v:?}");
    assert_eq!(target_state(&v, "fr-1").0, "succeeded", "{v:?}");
    wait_running(&r.server, "fr-1", "r2");
}

#[test]
fn a_flood_of_bad_downloads_does_not_stop_a_rollout() {
    let r = rig();
    let devs: Vec<Device> = ["fl-1", "fl-2"]
        .iter()
        .map(|id| r.device(id, None))
        .collect();
    create(&r.server, &r.key, &new_binary(&r.root, "fl2"), "fl2", 2);
    let stop = Arc::new(AtomicBool::new(false));
    let mut floods = Vec::new();
    for t in 0..6 {
        let (stop, url) = (stop.clone(), r.server.http.clone());
        floods.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let id = if n.is_multiple_of(2) { "fl2" } else { "nosuch" };
                let _ = ureq::get(&format!("{url}/v1/releases/{id}/binary"))
                    .header("Authorization", &format!("Bearer wrong{t}{n}"))
                    .config()
                    .http_status_as_error(false)
                    .build()
                    .call();
                n += 1;
            }
            n
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    admin_ok(&r.server, &["release", "deploy", "fl2"]);
    let v = settled(&r.server, "fl2", Duration::from_secs(90));
    stop.store(true, Ordering::SeqCst);
    let total: u64 = floods.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(total > 100, "the flood ran: {total}");
    assert_eq!(v.state, "done", "{v:?}");
    for (d, id) in devs.iter().zip(["fl-1", "fl-2"]) {
        assert_eq!(target_state(&v, id).0, "succeeded", "{v:?}");
        wait_running(&r.server, id, "fl2");
        assert_eq!(d.link("current"), "fl2");
    }
}

#[test]
fn a_server_sigkilled_mid_rollout_finishes_it_after_restart() {
    let mut r = rig();
    let devs: Vec<Device> = ["rs-1", "rs-2", "rs-3"]
        .iter()
        .map(|id| r.device(id, None))
        .collect();
    create(&r.server, &r.key, &new_binary(&r.root, "rs2"), "rs2", 2);
    admin_ok(&r.server, &["release", "deploy", "rs2", "--canary", "34%"]);
    // Kill it shortly after the offers went out, then again later.
    std::thread::sleep(Duration::from_millis(300));
    r.server.restart();
    std::thread::sleep(Duration::from_millis(1500));
    r.server.restart();
    let v = settled(&r.server, "rs2", Duration::from_secs(120));
    assert_eq!(v.state, "done", "{v:?}");
    for (d, id) in devs.iter().zip(["rs-1", "rs-2", "rs-3"]) {
        assert_eq!(target_state(&v, id).0, "succeeded", "{id}: {v:?}");
        wait_running(&r.server, id, "rs2");
        assert_eq!(d.link("current"), "rs2", "{id}");
        r.server.wait_devices(&format!("{id} confirmed rs2"), |ds| {
            ds.iter().any(|x| {
                x.id == id
                    && x.update.as_ref().is_some_and(|u| {
                        u.release == "rs2" && u.state == openclaw::protocol::UpdateState::Confirmed
                    })
            })
        });
    }
    // Wait for good to follow (the agent moves it after confirmation).
    let start = Instant::now();
    while devs.iter().any(|d| d.link("good") != "rs2") && start.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for d in &devs {
        assert_eq!(d.link("good"), "rs2");
        assert_eq!(d.seen.lock().unwrap().starts, vec!["a", "rs2"]);
    }
}

#[test]
fn a_server_sigkilled_while_a_device_is_on_trial_still_confirms_it() {
    let mut r = rig();
    let dev = r.device("tr-1", None);
    create(&r.server, &r.key, &new_binary(&r.root, "tr2"), "tr2", 2);
    admin_ok(&r.server, &["release", "deploy", "tr2"]);
    // Wait until the device switched (switching or trial), then kill.
    let start = Instant::now();
    loop {
        if dev.link("current") == "tr2" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never switched");
        std::thread::sleep(Duration::from_millis(10));
    }
    r.server.restart();
    let v = settled(&r.server, "tr2", Duration::from_secs(60));
    assert_eq!(v.state, "done", "{v:?}");
    assert_eq!(target_state(&v, "tr-1").0, "succeeded", "{v:?}");
    r.server.wait_devices("tr-1 confirmed tr2", |ds| {
        ds.iter().any(|x| {
            x.id == "tr-1"
                && x.release.as_deref() == Some("tr2")
                && x.update.as_ref().is_some_and(|u| {
                    u.release == "tr2" && u.state == openclaw::protocol::UpdateState::Confirmed
                })
        })
    });
    let start = Instant::now();
    while dev.link("good") != "tr2" && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(dev.link("good"), "tr2");
    assert_eq!(dev.seen.lock().unwrap().starts, vec!["a", "tr2"]);
}

/// One forged (unsigned) offer of the rolling release's id, sent exactly
/// while the device runs it on trial, is enough to make it roll back.
#[test]
fn one_forged_offer_during_the_trial_does_not_roll_a_good_release_back() {
    let r = rig();
    let dev = r.device("ft-1", None);
    let peer = common::MqttPeer::connect(r.server.mqtt_port, "forger3", &[]);
    let topic = openclaw::protocol::topics::tasks("ft-1");
    let attacker = openclaw::release::generate_key().unwrap();
    let binp = new_binary(&r.root, "t2");
    let bin = std::fs::read(&binp).unwrap();
    create(&r.server, &r.key, &binp, "t2", 2);
    let forged = openclaw::protocol::encode(&openclaw::protocol::ToAgent::Update(
        openclaw::protocol::UpdateOffer {
            manifest: format!(
                "{}\n",
                manifest_for(&attacker, &r.server, "t2", 2, &bin, |_| {})
            ),
            grant: "nope".into(),
        },
    ));
    admin_ok(&r.server, &["release", "deploy", "t2"]);
    // The moment it switched, before the server can confirm.
    let start = Instant::now();
    while dev.link("current") != "t2" {
        assert!(start.elapsed() < Duration::from_secs(60), "never switched");
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..20 {
        peer.publish(&topic, forged.clone());
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = settled(&r.server, "t2", Duration::from_secs(60));
    assert_eq!(
        target_state(&v, "ft-1").0,
        "succeeded",
        "a forged offer during the trial failed a good release: {v:?}"
    );
    assert_eq!(dev.link("current"), "t2");
}
