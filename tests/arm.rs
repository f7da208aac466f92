//! End to end on ARM: the agent cross-built for `rpi4` (aarch64, with
//! on-device inference, as `openclaw-admin build --board rpi4` makes it)
//! runs under `qemu-aarch64-static`, connects to a server on this machine by
//! host name (`localhost`), and answers an echo task, a `vad` task on real
//! audio and `infer` tasks on the sensor model, matching ONNX Runtime's
//! goldens as the host agent does.
//!
//! Needs the cross toolchain (scripts/cross-toolchain.sh; in CI
//! scripts/test-arm.sh installs it and builds the agent first). Without it
//! this test fails and says so: it is not skipped.
#![cfg(all(feature = "server", feature = "admin", feature = "inference"))]

mod common;

use common::golden::{
    assert_probabilities, assert_same_segments, ort_segments, plugins_config, segments,
    sensor_cases,
};
use common::{task, Server};
use openclaw::admin::build::{self, BuildOptions};
use openclaw::boards::Board;
use openclaw::protocol::api::TaskState;
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command, Stdio};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn aarch64_agent_under_qemu_answers_echo_and_inference_tasks() {
    let board = Board::load("rpi4").unwrap();
    assert_eq!(board.target, "aarch64-unknown-linux-gnu");
    assert!(!board.models.is_empty(), "rpi4 carries models");
    let mut opts = BuildOptions::new("rpi4", Path::new(env!("CARGO_MANIFEST_DIR")));
    // What scripts/build-arm.sh builds for a board that lists models.
    opts.features.push("inference".into());
    if let Err(e) = build::check_toolchain(&opts.cargo, &opts.rustc, &board.target, true) {
        panic!(
            "this test runs the aarch64 agent under qemu and needs the cross toolchain: {e}\n\
             (scripts/test-arm.sh runs scripts/cross-toolchain.sh and scripts/build-arm.sh --board rpi4)"
        );
    }
    // Incremental: scripts/test-arm.sh has built it with the same flags.
    let out = build::build(&opts).unwrap_or_else(|e| panic!("cross build failed: {e}"));
    let head = std::fs::read(&out.binary).unwrap();
    assert_eq!(build::elf_machine(&head).as_deref(), Some("aarch64"));
    eprintln!(
        "aarch64 agent: {} ({} bytes, built/checked in {:.1} s)",
        out.binary.display(),
        out.size,
        out.elapsed.as_secs_f64()
    );

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[mqtt]\nkeep_alive_secs = 2\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
             [agent]\nheartbeat_ms = 500\n{}",
            plugins_config()
        ),
    )
    .unwrap();
    let _agent = Kill(
        Command::new(build::qemu_for(&board.target).unwrap())
            .arg(&out.binary)
            .arg("--config")
            .arg(&cfg)
            .args(["--board", "rpi4", "--id", "arm-e2e", "--broker"])
            // By name: the static glibc agent resolves it (docs/cross.md, NSS).
            .arg(server.broker().replace("127.0.0.1", "localhost"))
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-aarch64-static"),
    );
    server.wait_online("arm-e2e");
    let devices = server.client.devices().unwrap();
    let d = devices.iter().find(|d| d.id == "arm-e2e").unwrap();
    assert_eq!(d.board, "rpi4");
    assert!(d.plugins.contains(&"echo".to_string()), "{:?}", d.plugins);

    let input = json!({"hello": "arm", "n": [1, 2.5, -3], "nested": {"ok": true}});
    let mut t = task("echo", input.clone());
    t.target = Some("arm-e2e".into());
    let r = server.wait(&server.submit(t));
    assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
    assert_eq!(r.device.as_deref(), Some("arm-e2e"));
    assert_eq!(r.result, Some(input));

    // The models the board profile lists are advertised.
    for m in &board.models {
        assert!(
            d.capabilities.contains(&format!("model:{m}")),
            "{m}: {:?}",
            d.capabilities
        );
    }
    // Speech segments from real audio, as ONNX Runtime finds them.
    let mut t = task("vad", json!({"wav": "vad_speech_16k.wav"}));
    t.target = Some("arm-e2e".into());
    t.timeout_ms = Some(120_000);
    let r = server.wait(&server.submit(t));
    assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
    assert_same_segments(&segments(&r.result.unwrap()), &ort_segments());
    // Generic inference on the sensor model, against ORT's probabilities.
    for (input, want) in sensor_cases() {
        let mut t = task("infer", input);
        t.target = Some("arm-e2e".into());
        let r = server.wait(&server.submit(t));
        assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
        assert_probabilities(&r.result.unwrap(), &want);
    }
}
