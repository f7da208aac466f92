//! The `infer` and `vad` plugins answering real tasks through a real server
//! and agent, checked against ONNX Runtime's golden outputs.
#![cfg(all(
    feature = "server",
    feature = "agent",
    feature = "admin",
    feature = "inference"
))]

mod common;

use common::{task, Agent, Server};
use openclaw::inference::vad;
use openclaw::protocol::api::TaskState;
use serde_json::json;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn plugins_config() -> String {
    let models = repo().join("models");
    format!(
        "[plugins.infer]\nmodels_dir = {m:?}\n[plugins.vad]\nmodels_dir = {m:?}\naudio_root = {a:?}\n",
        m = models.display().to_string(),
        a = models.join("golden").display().to_string()
    )
}

fn golden(name: &str) -> serde_json::Value {
    let p = repo().join("models/golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Speech segments ONNX Runtime's probabilities give for the golden WAV.
fn ort_segments() -> Vec<(f64, f64)> {
    let g = golden("silero_vad.json");
    let probs: Vec<f32> = g["probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap() as f32)
        .collect();
    let n = g["samples"].as_u64().unwrap() as usize;
    vad::segments_from_probs(&probs, n, &vad::VadParams::default())
        .into_iter()
        .map(|s| (s.start_s as f64, s.end_s as f64))
        .collect()
}

fn segments(result: &serde_json::Value) -> Vec<(f64, f64)> {
    result["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start_s"].as_f64().unwrap(), s["end_s"].as_f64().unwrap()))
        .collect()
}

fn assert_same_segments(got: &[(f64, f64)], want: &[(f64, f64)]) {
    assert!(!want.is_empty(), "the golden WAV has speech");
    assert_eq!(got.len(), want.len(), "got {got:?}, ORT {want:?}");
    for (g, w) in got.iter().zip(want) {
        // One 32 ms window of slack.
        assert!(
            (g.0 - w.0).abs() <= 0.033 && (g.1 - w.1).abs() <= 0.033,
            "got {got:?}, ORT {want:?}"
        );
    }
}

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
    let g = golden("sensor_anomaly.json");
    for case in g["cases"].as_array().unwrap() {
        let inp = &case["inputs"][0];
        let input = json!({"model": "sensor_anomaly", "inputs": [
            {"name": inp["name"], "dtype": "f32", "shape": inp["shape"], "data": inp["values"]}]});
        let t = server.wait(&server.submit(task("infer", input)));
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        let out = &t.result.unwrap()["outputs"];
        let probs = out
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "probabilities")
            .expect("probabilities output");
        let want = case["outputs"][0]["values"].as_array().unwrap();
        for (a, b) in probs["data"].as_array().unwrap().iter().zip(want) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5);
        }
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
