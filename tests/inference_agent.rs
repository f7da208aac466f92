//! The `infer` and `vad` plugins answering real tasks through a real server
//! and agent, checked against ONNX Runtime's golden outputs.
#![cfg(all(
    feature = "server",
    feature = "agent",
    feature = "admin",
    feature = "inference"
))]

mod common;

use common::golden::{
    assert_probabilities, assert_same_segments, ort_segments, plugins_config, repo, segments,
    sensor_cases,
};
use common::{task, Agent, Server};
use openclaw::protocol::api::TaskState;
use serde_json::json;

#[test]
fn vad_and_infer_answer_through_a_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "ai-1", &server.broker(), &plugins_config());
    server.wait_online("ai-1");
    let d = server.client.devices().unwrap();
    let caps = &d.iter().find(|d| d.id == "ai-1").unwrap().capabilities;
    assert!(caps.contains(&"model:silero_vad".to_string()), "{caps:?}");

    let want = ort_segments();
    let t = server.wait(&server.submit(task("vad", json!({"wav": "vad_speech_16k.wav"}))));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let r = t.result.unwrap();
    assert_same_segments(&segments(&r), &want);
    assert!((r["duration_s"].as_f64().unwrap() - 151653.0 / 16000.0).abs() < 1e-6);

    // The same audio inline, routed by capability.
    let bytes = std::fs::read(repo().join("models/golden/vad_speech_16k.wav")).unwrap();
    let mut req = task("vad", json!({ "wav_base64": base64(&bytes) }));
    req.capability = Some("model:silero_vad".into());
    let t = server.wait(&server.submit(req));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_same_segments(&segments(&t.result.unwrap()), &want);

    // Generic inference against ORT's golden probabilities.
    for (input, want) in sensor_cases() {
        let t = server.wait(&server.submit(task("infer", input)));
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_probabilities(&t.result.unwrap(), &want);
    }

    // Bad input: clear errors naming plugin and field; the agent keeps going.
    let bad = [
        (
            json!({"model": "sensor_anomaly", "inputs": [{"name": "features", "shape": [1, 7], "data": [0, 0, 0, 0, 0, 0, 0]}]}),
            "features",
        ),
        (
            json!({"model": "sensor_anomaly", "inputs": [{"name": "features", "shape": [1, 8], "data": [1]}]}),
            "inputs[0].data",
        ),
        (
            json!({"model": "no_such_model", "inputs": []}),
            "no_such_model",
        ),
        (json!({"inputs": []}), "`model`"),
    ];
    for (input, needle) in bad {
        let t = server.wait(&server.submit(task("infer", input.clone())));
        assert_eq!(t.state, TaskState::Failed, "{input}");
        let e = t.error.unwrap();
        assert!(e.contains("infer") && e.contains(needle), "{input}: {e}");
    }
    for (input, needle) in [
        (json!({"wav": "../silero_vad.toml"}), "plain relative path"),
        (json!({"wav": "/etc/passwd"}), "plain relative path"),
        (json!({"wav": "no-such.wav"}), "no-such.wav"),
        (json!({"wav": "ocr_page.pgm"}), "wav"),
        (json!({"wav_base64": "!!!"}), "wav_base64"),
        (json!({}), "exactly one of"),
    ] {
        let t = server.wait(&server.submit(task("vad", input.clone())));
        assert_eq!(t.state, TaskState::Failed, "{input}");
        let e = t.error.unwrap();
        assert!(e.contains("vad") && e.contains(needle), "{input}: {e}");
    }
    assert!(agent.alive());
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
