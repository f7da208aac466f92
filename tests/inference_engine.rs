#![cfg(feature = "inference")]
//! Engine behaviour on the committed models only (no fetch needed): errors name
//! the model and tensor, the LRU cache is bounded by bytes, concurrent runs share
//! one load, tensors survive postcard, the WAV reader refuses what it cannot read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openclaw::inference::{
    vad, wav, DType, Engine, InferenceError, LoadedModel, ModelManifest, ModelRepo, NamedTensor,
    TensorData,
};

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn features() -> NamedTensor {
    NamedTensor::f32(
        "features",
        vec![1, 8],
        vec![0.05, 0.15, 3.0, 3.0, 0.3, 45.0, 0.0, 0.2],
    )
}

/// A repo in a temp dir holding one manifest, with the model file copied in.
fn temp_repo(manifest: &str, copy: Option<(&str, &str)>) -> (tempfile::TempDir, ModelRepo) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.toml"), manifest).unwrap();
    if let Some((from, to)) = copy {
        std::fs::copy(models_dir().join(from), dir.path().join(to)).unwrap();
    }
    let repo = ModelRepo::open(dir.path()).unwrap();
    (dir, repo)
}

fn sensor_manifest_text() -> String {
    std::fs::read_to_string(models_dir().join("sensor_anomaly.toml")).unwrap()
}

#[test]
fn repo_reads_every_manifest() {
    let repo = ModelRepo::open(models_dir()).unwrap();
    for name in [
        "silero_vad",
        "ocr_det",
        "ocr_rec",
        "ocr_cls",
        "ocr_cls_f16",
        "ocr_cls_int8",
        "sensor_anomaly",
    ] {
        assert!(
            repo.names().contains(&name),
            "{name} missing from {:?}",
            repo.names()
        );
    }
    let m = repo.get("ocr_det").unwrap();
    assert_eq!(m.input_shapes(), vec![vec![1, 3, 480, 640]]);
    let m = ModelManifest::load(models_dir().join("sensor_anomaly_int8.toml")).unwrap();
    assert_eq!(m.variant_of.as_deref(), Some("sensor_anomaly"));
}

#[test]
fn sensor_model_runs_and_classifies() {
    let engine = Engine::new(ModelRepo::open(models_dir()).unwrap(), 1 << 20);
    let out = engine.run("sensor_anomaly", vec![features()]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "probabilities");
    assert_eq!(out[0].shape, vec![1, 4]);
    let p = out[0].as_f32().unwrap();
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    let model = engine.load("sensor_anomaly").unwrap();
    let labels = openclaw::inference::post::labels(&model).unwrap();
    assert_eq!(
        openclaw::inference::post::top_labels(&out[0], &labels)[0].0,
        "normal"
    );
}

#[test]
fn wrong_dtype_shape_and_names_are_reported_with_model_and_tensor() {
    let engine = Engine::new(ModelRepo::open(models_dir()).unwrap(), 1 << 20);
    let run = |t: Vec<NamedTensor>| engine.run("sensor_anomaly", t).unwrap_err();

    let e = run(vec![NamedTensor::new(
        "features",
        vec![1, 8],
        TensorData::I64(vec![0; 8]),
    )]);
    assert!(matches!(e, InferenceError::DTypeMismatch { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "model `sensor_anomaly`: input `features` has dtype i64, expected f32"
    );

    let e = run(vec![NamedTensor::f32(
        "features",
        vec![2, 8],
        vec![0.0; 16],
    )]);
    assert!(matches!(e, InferenceError::ShapeMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("`sensor_anomaly`") && e.to_string().contains("`features`"),
        "{e}"
    );

    let e = run(vec![]);
    assert_eq!(
        e.to_string(),
        "model `sensor_anomaly`: missing input `features`"
    );

    let e = run(vec![
        features(),
        NamedTensor::f32("extra", vec![1], vec![0.0]),
    ]);
    assert!(matches!(e, InferenceError::UnexpectedInput { .. }), "{e}");

    let e = run(vec![NamedTensor::f32("features", vec![1, 8], vec![0.0; 7])]);
    assert!(matches!(e, InferenceError::BadTensor { .. }), "{e}");

    let e = engine.run("no_such_model", vec![]).unwrap_err();
    assert!(
        e.to_string().contains("unknown model `no_such_model`")
            && e.to_string().contains("sensor_anomaly"),
        "{e}"
    );
}

#[test]
fn missing_file_says_how_to_fetch() {
    let text = std::fs::read_to_string(models_dir().join("silero_vad.toml")).unwrap();
    let (_dir, repo) = temp_repo(&text, None);
    let e = Engine::new(repo, 1 << 20)
        .run("silero_vad", vec![])
        .unwrap_err();
    assert!(matches!(e, InferenceError::ModelFileMissing { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("`silero_vad`")
            && msg.contains("scripts/models/fetch.sh")
            && msg.contains("silero-vad==6.2.3"),
        "{msg}"
    );
}

#[test]
fn hash_mismatch_is_refused() {
    let text = sensor_manifest_text();
    let sha = ModelManifest::parse(&text, Path::new("x")).unwrap().sha256;
    let text = text.replace(&sha, &"0".repeat(64));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sensor")).unwrap();
    std::fs::copy(
        models_dir().join("sensor/sensor_anomaly.onnx"),
        dir.path().join("sensor/sensor_anomaly.onnx"),
    )
    .unwrap();
    std::fs::write(dir.path().join("m.toml"), &text).unwrap();
    let repo = ModelRepo::open(dir.path()).unwrap();
    let e = Engine::new(repo, 1 << 20)
        .run("sensor_anomaly", vec![features()])
        .unwrap_err();
    assert!(matches!(e, InferenceError::HashMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains(&sha) && e.to_string().contains("`sensor_anomaly`"),
        "{e}"
    );
}

#[test]
fn unsupported_operator_is_named() {
    let fixture = models_dir().join("golden/fixtures/unsupported_op.onnx");
    let sha = sha256_hex(&std::fs::read(&fixture).unwrap());
    let text = format!(
        r#"name = "col2im"
path = "unsupported_op.onnx"
sha256 = "{sha}"
licence = "Apache-2.0"
precision = "f32"
[source]
kind = "committed"
script = "scripts/models/make_goldens.py"
[[inputs]]
name = "x"
dtype = "f32"
shape = [1, 4, 4]
[[outputs]]
name = "y"
[postprocess]
kind = "none"
"#
    );
    let (_dir, repo) = temp_repo(
        &text,
        Some(("golden/fixtures/unsupported_op.onnx", "unsupported_op.onnx")),
    );
    let e = Engine::new(repo, 1 << 20).load("col2im").unwrap_err();
    assert!(matches!(e, InferenceError::UnsupportedOp { .. }), "{e}");
    assert!(
        e.to_string().contains("`col2im`") && e.to_string().contains("Col2Im"),
        "{e}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn malformed_manifest_names_the_file_and_problem() {
    let text = sensor_manifest_text().replace("pin = { batch = 1 }", "");
    let e = ModelManifest::parse(&text, Path::new("models/x.toml")).unwrap_err();
    assert!(
        e.to_string().contains("models/x.toml")
            && e.to_string().contains("`batch` has no pinned value"),
        "{e}"
    );
}

#[test]
fn cache_is_lru_bounded_by_bytes() {
    let repo = ModelRepo::open(models_dir()).unwrap();
    let size = |n: &str| {
        std::fs::metadata(models_dir().join(&repo.get(n).unwrap().path))
            .unwrap()
            .len() as usize
    };
    let (a, b, c) = (
        "sensor_anomaly",
        "sensor_anomaly_f16",
        "sensor_anomaly_int8",
    );
    // Room for the two largest but not all three.
    let mut sizes = [size(a), size(b), size(c)];
    sizes.sort();
    let (sa, sc) = (size(a), size(c));
    let engine = Engine::new(repo.clone(), sizes[1] + sizes[2]);
    engine.load(a).unwrap();
    engine.load(b).unwrap();
    engine.load(a).unwrap(); // a is now the most recent
    assert_eq!(engine.cache_stats().hits, 1);
    engine.load(c).unwrap(); // evicts b, the least recently used
    assert_eq!(engine.cached_models(), vec![a.to_string(), c.to_string()]);
    let st = engine.cache_stats();
    assert_eq!((st.misses, st.evictions, st.models), (3, 1, 2));
    assert_eq!(st.bytes, sa + sc);
    assert!(st.bytes <= sizes[1] + sizes[2]);

    // A model bigger than the whole budget runs but is not kept.
    let tiny = Engine::new(ModelRepo::open(models_dir()).unwrap(), 10);
    tiny.run(a, vec![features()]).unwrap();
    assert_eq!(tiny.cache_stats().models, 0);
}

#[test]
fn concurrent_runs_share_one_load() {
    let engine = Arc::new(Engine::new(ModelRepo::open(models_dir()).unwrap(), 1 << 20));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut last = Vec::new();
                for _ in 0..20 {
                    last = engine.run("sensor_anomaly", vec![features()]).unwrap();
                }
                last
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    let st = engine.cache_stats();
    assert_eq!(st.misses, 1, "{st:?}");
    assert_eq!(st.hits, 159, "{st:?}");
}

#[test]
fn named_tensor_round_trips_through_postcard_and_json() {
    let ts = vec![
        features(),
        NamedTensor::new("h", vec![2], TensorData::F16(vec![0x3c00, 0xc000])),
        NamedTensor::new("ids", vec![3], TensorData::I64(vec![-1, 0, 1 << 40])),
        NamedTensor::new("mask", vec![2], TensorData::Bool(vec![true, false])),
        NamedTensor::new("px", vec![2], TensorData::U8(vec![0, 255])),
    ];
    let bytes = postcard::to_allocvec(&ts).unwrap();
    let back: Vec<NamedTensor> = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, ts);
    let json = serde_json::to_string(&ts).unwrap();
    assert_eq!(serde_json::from_str::<Vec<NamedTensor>>(&json).unwrap(), ts);
    assert_eq!(back[1].dtype, DType::F16);
    assert_eq!(back[1].to_f32_vec(), vec![1.0, -2.0]);
}

#[test]
fn wav_reader_accepts_16k_mono_and_refuses_the_rest() {
    let samples: Vec<f32> = (0..1600).map(|i| (i as f32 * 0.05).sin() * 0.5).collect();
    let bytes = wav::encode_pcm16(&samples);
    let back = wav::parse_wav(&bytes).unwrap();
    assert_eq!(back.len(), samples.len());
    assert!(back.iter().zip(&samples).all(|(a, b)| (a - b).abs() < 1e-4));

    // f32 WAV (format 3).
    let mut f = bytes.clone();
    f[20..22].copy_from_slice(&3u16.to_le_bytes());
    f[34..36].copy_from_slice(&32u16.to_le_bytes());
    let parsed = wav::parse_wav(&f).unwrap();
    assert_eq!(parsed.len(), samples.len() / 2);

    let mut stereo = bytes.clone();
    stereo[22..24].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        wav::parse_wav(&stereo).unwrap_err().to_string(),
        "wav: unsupported format: 2 channels (need mono 16000 Hz, 16-bit PCM or 32-bit float)"
    );
    let mut rate = bytes.clone();
    rate[24..28].copy_from_slice(&44_100u32.to_le_bytes());
    assert!(wav::parse_wav(&rate)
        .unwrap_err()
        .to_string()
        .contains("44100 Hz"));
    let mut bits = bytes.clone();
    bits[34..36].copy_from_slice(&8u16.to_le_bytes());
    assert!(wav::parse_wav(&bits)
        .unwrap_err()
        .to_string()
        .contains("8-bit integer PCM"));
    assert!(matches!(
        wav::parse_wav(b"OggS....").unwrap_err(),
        wav::WavError::Malformed(_)
    ));

    let pcm = wav::read_wav(models_dir().join("golden/vad_speech_16k.wav")).unwrap();
    assert_eq!(pcm.len(), 151_653);
    let e = wav::read_wav("/nonexistent.wav").unwrap_err();
    assert!(e.to_string().contains("/nonexistent.wav"));
}

#[test]
fn segments_from_probabilities() {
    // 31.25 windows per second; speech from window 32 to 95 (1.024 s - 3.072 s).
    let mut probs = vec![0.02f32; 160];
    probs[32..96].iter_mut().for_each(|p| *p = 0.9);
    probs[60] = 0.2; // one dip shorter than min silence: not a split
    let segs = vad::segments_from_probs(&probs, 160 * vad::WINDOW, &vad::VadParams::default());
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert!((segs[0].start_s - (1.024 - 0.03)).abs() < 1e-3, "{segs:?}");
    assert!((segs[0].end_s - (3.072 + 0.03)).abs() < 1e-3, "{segs:?}");
    // Too short to count.
    let mut short = vec![0.02f32; 100];
    short[10..13].iter_mut().for_each(|p| *p = 0.9);
    assert!(
        vad::segments_from_probs(&short, 100 * vad::WINDOW, &vad::VadParams::default()).is_empty()
    );
}

#[test]
fn f16_models_compute_in_f32_where_the_cpu_has_no_f16_arithmetic() {
    use tract_onnx::prelude::*;
    let repo = ModelRepo::open(models_dir()).unwrap();
    let native = tract_linalg::has_fp16();
    for name in ["sensor_anomaly_f16", "ocr_cls_f16"] {
        let m = LoadedModel::load(&repo, name).unwrap();
        assert_eq!(m.f16_widened(), !native, "{name}");
        let f16_values = m
            .plan()
            .model()
            .nodes()
            .iter()
            .flat_map(|n| &n.outputs)
            .filter(|o| o.fact.datum_type == DatumType::F16)
            .count();
        if native {
            assert!(f16_values > 0, "{name}: plan lost its f16 values");
        } else {
            assert_eq!(f16_values, 0, "{name}: f16 values left in the plan");
        }
    }
    assert!(!LoadedModel::load(&repo, "sensor_anomaly")
        .unwrap()
        .f16_widened());
}
