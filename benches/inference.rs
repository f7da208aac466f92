//! tract, one thread: per-model latency at batch 1, throughput per item at larger
//! batches, load time, and peak memory per model (a child process per model).
//! Inputs are constant (0.1 everywhere; recurrent states zero), the same as
//! scripts/models/ort_bench.py feeds ONNX Runtime, so the two can be compared.
//! Needs models/cache/ (scripts/models/fetch.sh).
//!
//! Memory: for each model this binary re-runs itself with `OPENCLAW_BENCH_MEM=name`;
//! the child reads its peak RSS (VmHWM, what getrusage's ru_maxrss reports) before
//! loading, after loading and after one run, and its resident set after the run.
//! The table is printed before criterion starts and written to
//! `$CARGO_TARGET_DIR/criterion/inference-memory.json`.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};
use openclaw::inference::{LoadedModel, ModelRepo};

mod common;
use common::inputs;

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

/// Batch sizes tried per model (symbol `batch`; for VAD, windows per call).
const BATCHES: &[(&str, &str, &[usize])] = &[
    ("sensor_anomaly", "batch", &[1, 8, 64]),
    ("silero_vad", "sequence_length", &[8, 32, 128]),
    ("ocr_cls", "batch", &[1, 4, 8, 16]),
    ("ocr_cls_f16", "batch", &[1, 8]),
    ("ocr_cls_int8", "batch", &[1, 8]),
    ("ocr_rec", "batch", &[1, 4, 8]),
    ("ocr_det", "batch", &[1, 2]),
];

const MEM_CHILD: &str = "OPENCLAW_BENCH_MEM";

fn repo() -> ModelRepo {
    ModelRepo::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")).expect("models/")
}

/// The repository with `symbol` of `name`'s inputs pinned to `value`.
fn repinned(repo: &ModelRepo, name: &str, symbol: &str, value: usize) -> ModelRepo {
    let mut m = repo.get(name).expect("manifest").clone();
    for input in &mut m.inputs {
        if let Some(v) = input.pin.get_mut(symbol) {
            *v = value;
        }
    }
    ModelRepo::from_manifests(repo.dir(), vec![m])
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

fn batch(c: &mut Criterion) {
    let repo = repo();
    for (name, symbol, sizes) in BATCHES {
        let mut g = c.benchmark_group(format!("batch/{name}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for &n in *sizes {
            let r = repinned(&repo, name, symbol, n);
            let m = LoadedModel::load(&r, name).unwrap_or_else(|e| panic!("{name} at {n}: {e}"));
            let x = inputs(&m);
            // Per-item throughput: criterion prints elements/s.
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("{n}"), |b| b.iter(|| m.run(x.clone()).unwrap()));
        }
        g.finish();
    }
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

/// `VmHWM` (peak) and `VmRSS` (current) of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/self/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Child: load `name`, run it once, print JSON with peak and resident deltas.
fn memory_child(name: &str) {
    let repo = repo();
    let (base, _) = rss_kib();
    let m = LoadedModel::load(&repo, name).unwrap_or_else(|e| panic!("{e}"));
    let (after_load, _) = rss_kib();
    let x = inputs(&m);
    m.run(x).unwrap_or_else(|e| panic!("{e}"));
    let (after_run, resident) = rss_kib();
    println!(
        "{}",
        serde_json::json!({
            "model": name,
            "baseline_kib": base,
            "peak_load_kib": after_load - base,
            "peak_load_run_kib": after_run - base,
            "resident_after_run_kib": resident.saturating_sub(base),
            "f16_widened": m.f16_widened(),
        })
    );
}

fn memory() {
    let exe = std::env::current_exe().expect("current exe");
    let mut rows = Vec::new();
    println!("peak memory, one process per model (KiB above the process baseline):");
    println!(
        "{:22} {:>10} {:>14} {:>12}",
        "model", "load peak", "load+run peak", "resident"
    );
    for name in MODELS {
        let out = std::process::Command::new(&exe)
            .env(MEM_CHILD, name)
            .output()
            .expect("spawn memory child");
        assert!(
            out.status.success(),
            "memory child for {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("child JSON");
        println!(
            "{:22} {:>10} {:>14} {:>12}",
            name, v["peak_load_kib"], v["peak_load_run_kib"], v["resident_after_run_kib"]
        );
        rows.push(v);
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(
            dir.join("inference-memory.json"),
            serde_json::to_string_pretty(&rows).unwrap_or_default(),
        );
    }
}

criterion_group!(benches, latency, batch, load);

fn main() {
    if let Ok(name) = std::env::var(MEM_CHILD) {
        memory_child(&name);
        return;
    }
    // `cargo bench -- FILTER` runs only matching criterion benches; the memory
    // table comes with every run unless OPENCLAW_BENCH_NO_MEM is set.
    if std::env::var_os("OPENCLAW_BENCH_NO_MEM").is_none() {
        memory();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
