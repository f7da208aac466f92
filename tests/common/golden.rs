//! ONNX Runtime's golden outputs (models/golden/, made by
//! scripts/models/make_goldens.py) and the checks that compare a task's result
//! with them; shared by the host and the ARM inference tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The source tree.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Agent config enabling `infer` and `vad` on the repository's models, with
/// the golden folder as the VAD's audio root.
pub fn plugins_config() -> String {
    let models = repo().join("models");
    format!(
        "[plugins.infer]\nmodels_dir = {m:?}\n[plugins.vad]\nmodels_dir = {m:?}\naudio_root = {a:?}\n",
        m = models.display().to_string(),
        a = models.join("golden").display().to_string()
    )
}

/// A golden JSON file.
pub fn golden(name: &str) -> serde_json::Value {
    let p = repo().join("models/golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Speech segments ONNX Runtime's probabilities give for the golden WAV.
#[cfg(feature = "inference")]
pub fn ort_segments() -> Vec<(f64, f64)> {
    use openclaw::inference::vad;
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

/// The `segments` of a `vad` result.
pub fn segments(result: &serde_json::Value) -> Vec<(f64, f64)> {
    result["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start_s"].as_f64().unwrap(), s["end_s"].as_f64().unwrap()))
        .collect()
}

/// Same segments within one 32 ms window.
pub fn assert_same_segments(got: &[(f64, f64)], want: &[(f64, f64)]) {
    assert!(!want.is_empty(), "the golden WAV has speech");
    assert_eq!(got.len(), want.len(), "got {got:?}, ORT {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.0 - w.0).abs() <= 0.033 && (g.1 - w.1).abs() <= 0.033,
            "got {got:?}, ORT {want:?}"
        );
    }
}

/// `(infer task input, ORT's probabilities)` for each golden case of the
/// sensor model.
pub fn sensor_cases() -> Vec<(serde_json::Value, Vec<f64>)> {
    sensor_cases_of("sensor_anomaly")
}

/// [`sensor_cases`] for one variant of the sensor model (`sensor_anomaly`,
/// `_f16`, `_int8`), with ONNX Runtime's probabilities for that variant.
pub fn sensor_cases_of(model: &str) -> Vec<(serde_json::Value, Vec<f64>)> {
    let g = golden(&format!("{model}.json"));
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let inp = &case["inputs"][0];
            let input = serde_json::json!({"model": model, "inputs": [
                {"name": inp["name"], "dtype": "f32", "shape": inp["shape"], "data": inp["values"]}]});
            let want = case["outputs"][0]["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            (input, want)
        })
        .collect()
}

/// The `probabilities` output of an `infer` result, within 1e-5 of `want`.
pub fn assert_probabilities(result: &serde_json::Value, want: &[f64]) {
    assert_probabilities_within(result, want, 1e-5)
}

/// The `probabilities` output of an `infer` result, within `tol` of `want`.
pub fn assert_probabilities_within(result: &serde_json::Value, want: &[f64], tol: f64) {
    let probs = result["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .expect("probabilities output");
    let got = probs["data"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{result}");
    for (a, b) in got.iter().zip(want) {
        assert!((a.as_f64().unwrap() - b).abs() < tol, "{result}");
    }
}
