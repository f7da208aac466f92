//! Over-the-air updates end to end: a real server, real agents in the
//! release layout `flash` makes, real `openclaw-admin release` commands.
//! Each device runs under a small supervisor that does what the unit
//! `flash` installs does under systemd: `ExecStartPre` (the guard, from
//! `good`), `ExecStart` (from `current`), and `Restart=on-failure`.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::ota::*;

/// What a case does to the stored binary after the upload.
type Spoil = Box<dyn Fn(&Path)>;

#[test]
fn an_update_is_installed_confirmed_and_bad_ones_are_refused() {
    let r = rig();
    let dev = r.device("ota-1", None);
    assert_eq!(
        dev.link("good"),
        "a",
        "the agent marks what flash installed as good"
    );

    create(&r.server, &r.key, &new_binary(&r.root, "b"), "b", 2);
    let v = show(&r.server, "b");
    assert_eq!((v.state.as_str(), v.counter), ("new", 2));
    admin_ok(&r.server, &["release", "deploy", "b", "--devices", "ota-1"]);
    let v = settled(&r.server, "b", Duration::from_secs(60));
    assert_eq!(v.state, "done", "{v:?}");
    assert_eq!(target_state(&v, "ota-1").0, "succeeded", "{v:?}");
    wait_running(&r.server, "ota-1", "b");
    r.server.wait_devices("ota-1 confirmed b", |d| {
        d.iter().any(|d| {
            d.id == "ota-1"
                && d.update.as_ref().is_some_and(|u| {
                    u.release == "b" && u.state == openclaw::protocol::UpdateState::Confirmed
                })
        })
    });
    assert_eq!(dev.link("current"), "b");
    assert_eq!(dev.link("good"), "b");
    assert!(
        dev.prefix.join("releases/a/bin/openclaw-agent").exists(),
        "the previous release is kept"
    );
    assert_eq!(dev.seen.lock().unwrap().starts, vec!["a", "b"]);
    // Tasks still run on the new release.
    let t = r.server.wait(
        &r.server
            .submit(common::task("echo", serde_json::json!({"x": 1}))),
    );
    assert!(common::succeeded(&t), "{t:?}");

    // Each bad release is refused by the agent, which stays on b.
    let other = r.root.join("other.key");
    admin_ok(
        &r.server,
        &["release", "keygen", "--out", other.to_str().unwrap()],
    );
    let cases: Vec<(&str, u64, Spoil, &str, PathBuf)> = vec![
        (
            "downgrade",
            1,
            Box::new(|_: &Path| {}),
            "downgrade",
            r.key.clone(),
        ),
        (
            "wrongkey",
            5,
            Box::new(|_: &Path| {}),
            "not among the trusted keys",
            other.clone(),
        ),
        (
            "tampered",
            6,
            Box::new(|bin: &Path| {
                let mut b = std::fs::read(bin).unwrap();
                let n = b.len() / 2;
                b[n] ^= 0x40;
                std::fs::write(bin, b).unwrap();
            }),
            "sha256",
            r.key.clone(),
        ),
        (
            "truncated",
            7,
            Box::new(|bin: &Path| {
                let b = std::fs::read(bin).unwrap();
                std::fs::write(bin, &b[..b.len() / 3]).unwrap();
            }),
            "the manifest says",
            r.key.clone(),
        ),
    ];
    for (id, counter, spoil, why, key) in cases {
        create(&r.server, &key, &new_binary(&r.root, id), id, counter);
        spoil(&r.server.data_dir.join(format!("releases/{id}.bin")));
        admin_ok(&r.server, &["release", "deploy", id]);
        let v = settled(&r.server, id, Duration::from_secs(60));
        let (state, message) = target_state(&v, "ota-1");
        assert_eq!(state, "failed", "{id}: {v:?}");
        assert!(
            message.contains(why),
            "{id}: `{message}` should say `{why}`"
        );
        assert_eq!(
            v.state, "paused",
            "{id}: one of one failed pauses it: {v:?}"
        );
        assert_eq!(dev.link("current"), "b", "{id}");
        assert!(
            !dev.prefix.join(format!("releases/{id}")).exists(),
            "{id} was not installed"
        );
    }
    assert_eq!(
        dev.seen.lock().unwrap().starts,
        vec!["a", "b"],
        "no restart for a refused release"
    );
    let (online, release, _) = device_view(&r.server, "ota-1").unwrap();
    assert!(online && release.as_deref() == Some("b"));

    // The server refuses what it can tell is wrong before any device sees it.
    let o = admin(&r.server, &["release", "deploy", "nosuch"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no release `nosuch`"));
    let o = admin(&r.server, &["release", "deploy", "b"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("deployed already"));
    let mismatched = r.root.join("mismatched");
    std::fs::write(&mismatched, b"x").unwrap();
    // The signed URL may not be loopback; with one given, the id is taken.
    let create_b = |url: Option<&str>| {
        let (bin, key) = (mismatched.to_str().unwrap(), r.key.to_str().unwrap());
        let mut args = vec![
            "release",
            "create",
            "--board",
            "sim",
            "--binary",
            bin,
            "--key",
            key,
            "--id",
            "b",
            "--counter",
            "9",
        ];
        args.extend(url.map(|u| ["--url", u]).into_iter().flatten());
        String::from_utf8_lossy(&admin(&r.server, &args).stderr).into_owned()
    };
    let err = create_b(None);
    assert!(err.contains("is loopback"), "{err}");
    let err = create_b(Some("http://10.0.0.1:8080/v1/releases/b/binary"));
    assert!(err.contains("release `b` exists"), "{err}");
    // The download needs the rollout's grant.
    let resp = ureq::get(&format!("{}/v1/releases/b/binary", r.server.http))
        .header("Authorization", "Bearer nope")
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

#[test]
fn a_release_that_cannot_start_is_rolled_back_and_the_canary_pauses_the_rest() {
    let r = rig();
    let devs: Vec<Device> = ["can-1", "can-2", "can-3"]
        .iter()
        .map(|id| r.device(id, None))
        .collect();
    create(&r.server, &r.key, &broken_binary(&r.root), "broken", 2);
    admin_ok(
        &r.server,
        &["release", "deploy", "broken", "--canary", "33%"],
    );
    let v = settled(&r.server, "broken", Duration::from_secs(60));
    assert_eq!(v.state, "paused", "{v:?}");
    assert!(
        v.reason.as_deref().unwrap_or("").contains("1 of 1"),
        "{v:?}"
    );
    let (state, message) = target_state(&v, "can-1");
    assert_eq!(state, "failed");
    assert!(message.contains("started 2 times"), "{message}");
    for d in ["can-2", "can-3"] {
        assert_eq!(target_state(&v, d).0, "waiting", "{v:?}");
    }
    // can-1 went to the broken release, failed twice, and is back on a.
    wait_running(&r.server, "can-1", "a");
    let c1 = &devs[0];
    assert_eq!(c1.link("current"), "a");
    assert_eq!(c1.link("good"), "a");
    let starts = c1.seen.lock().unwrap().starts.clone();
    assert_eq!(starts, vec!["a", "broken", "broken", "a"], "{starts:?}");
    // The others never heard of it.
    for d in &devs[1..] {
        assert_eq!(d.seen.lock().unwrap().starts, vec!["a"]);
        assert!(!d.prefix.join("releases/broken").exists());
    }

    // Resumed with every failure allowed: can-1 is offered it again and
    // refuses a release rolled back there; then the rest get it, and roll
    // it back too.
    admin_ok(
        &r.server,
        &["release", "deploy", "broken", "--max-failure", "100%"],
    );
    let v = settled(&r.server, "broken", Duration::from_secs(90));
    assert_eq!(v.state, "done", "{v:?}");
    let (state, message) = target_state(&v, "can-1");
    assert_eq!(state, "failed");
    assert!(message.contains("was rolled back here"), "{message}");
    assert_eq!(
        devs[0].seen.lock().unwrap().starts,
        vec!["a", "broken", "broken", "a"]
    );
    for (d, id) in devs[1..].iter().zip(["can-2", "can-3"]) {
        let (state, message) = target_state(&v, id);
        assert_eq!(state, "failed", "{id}");
        assert!(message.contains("started 2 times"), "{id}: {message}");
        wait_running(&r.server, id, "a");
        assert_eq!(d.link("current"), "a", "{id}");
    }
}

#[test]
fn sigkill_at_every_install_step_ends_on_a_working_release() {
    let r = rig();
    let mut counter = 2;
    let mut running = "a".to_string();
    for step in [
        "downloaded",
        "staged",
        "pending",
        "switched",
        "confirming",
        "confirmed-good",
    ] {
        let prefix = r.root.join("kill-1");
        let dev = if prefix.exists() {
            let d = Device::run(&prefix, Some(step));
            wait_running(&r.server, "kill-1", &running);
            d
        } else {
            r.device("kill-1", Some(step))
        };
        let id = format!("k{counter}");
        create(&r.server, &r.key, &new_binary(&r.root, &id), &id, counter);
        admin_ok(&r.server, &["release", "deploy", &id]);
        let v = settled(&r.server, &id, Duration::from_secs(90));
        assert_eq!(v.state, "done", "{step}: {v:?}");
        assert_eq!(target_state(&v, "kill-1").0, "succeeded", "{step}: {v:?}");
        wait_running(&r.server, "kill-1", &id);
        r.server
            .wait_devices(&format!("{step}: {id} confirmed"), |d| {
                d.iter().any(|d| {
                    d.id == "kill-1"
                        && d.update.as_ref().is_some_and(|u| {
                            u.release == id && u.state == openclaw::protocol::UpdateState::Confirmed
                        })
                })
            });
        // After the Confirmed report: a kill in the confirmation comes
        // after the server marked the target succeeded.
        assert_eq!(
            dev.seen.lock().unwrap().killed,
            1,
            "{step}: the hook fired once"
        );
        assert_eq!(dev.link("good"), id, "{step}");
        drop(dev);
        running = id;
        counter += 1;
    }
    // Killed while switching back: the broken release is left all the same.
    for step in ["rollback-noted", "rollback-switched"] {
        let dev = Device::run(&r.root.join("kill-1"), Some(step));
        wait_running(&r.server, "kill-1", &running);
        let id = format!("broken{counter}");
        create(&r.server, &r.key, &broken_binary(&r.root), &id, counter);
        admin_ok(&r.server, &["release", "deploy", &id]);
        let v = settled(&r.server, &id, Duration::from_secs(90));
        assert_eq!(target_state(&v, "kill-1").0, "failed", "{step}: {v:?}");
        wait_running(&r.server, "kill-1", &running);
        assert_eq!(dev.link("current"), running, "{step}");
        assert_eq!(
            dev.seen.lock().unwrap().killed,
            1,
            "{step}: the hook fired once"
        );
        drop(dev);
        counter += 1;
    }
}
