//! Per-model latency at batch 1 and load time, tract, one thread.
//! Inputs are constant (0.1 everywhere; recurrent states zero), the same as
//! scripts/models/ort_bench.py feeds ONNX Runtime, so the two can be compared.
//! Needs models/cache/ (scripts/models/fetch.sh).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use openclaw::inference::{LoadedModel, ModelRepo, NamedTensor};

const MODELS: &[&str] = &[
    "sensor_anomaly",
    "sensor_anomaly_f16",
    "sensor_anomaly_int8",
    "silero_vad",
    "ocr_cls",
    "ocr_cls_f16",
    "ocr_cls_int8",
    "ocr_rec",
    "ocr_det",
];

fn repo() -> ModelRepo {
    ModelRepo::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")).expect("models/")
}

fn inputs(m: &LoadedModel) -> Vec<NamedTensor> {
    m.manifest()
        .inputs
        .iter()
        .zip(m.input_shapes())
        .map(|(spec, shape)| {
            let fill = if matches!(spec.name.as_str(), "h" | "c") {
                0.0
            } else {
                0.1
            };
            NamedTensor::f32(
                spec.name.clone(),
                shape.clone(),
                vec![fill; shape.iter().product()],
            )
        })
        .collect()
}

fn latency(c: &mut Criterion) {
    let repo = repo();
    let mut g = c.benchmark_group("run");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for name in MODELS {
        let m = LoadedModel::load(&repo, name).unwrap_or_else(|e| panic!("{e}"));
        let x = inputs(&m);
        g.bench_function(*name, |b| b.iter(|| m.run(x.clone()).unwrap()));
    }
    g.finish();
}

fn load(c: &mut Criterion) {
    let repo = repo();
    let mut g = c.benchmark_group("load");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(3));
    for name in MODELS {
        g.bench_function(*name, |b| {
            b.iter(|| LoadedModel::load(&repo, name).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, latency, load);
criterion_main!(benches);
