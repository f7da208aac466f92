//! Where tract spends its time: per-op profile of a model's optimized plan.
//!
//! `cargo bench --bench inference_profile -- MODEL [RUNS]` loads MODEL through
//! the same path the agent uses (sha256, pinned facts, `into_optimized`), runs it
//! RUNS times (default 50) on the bench's constant inputs and prints the plan's
//! ops with their share of the run time, grouped by op kind and then per node.
//! Used to find why tract was slower than ONNX Runtime (docs/inference.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use openclaw::inference::{LoadedModel, ModelRepo};

mod common;
use common::inputs;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{SimpleState, TValue};
use tract_onnx::tract_core::plan::eval;

fn main() {
    // cargo bench passes `--bench`; skip flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(name) = args.first() else {
        eprintln!("usage: cargo bench --bench inference_profile -- MODEL [RUNS]");
        return;
    };
    let runs: u32 = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(50);
    // OPENCLAW_MODELS_DIR: another manifest directory (trying out variants).
    let dir = std::env::var_os("OPENCLAW_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let repo = ModelRepo::open(&dir).expect("models directory");
    let m = LoadedModel::load(&repo, name).unwrap_or_else(|e| panic!("{e}"));
    let inputs: TVec<TValue> = inputs(&m)
        .into_iter()
        .map(|t| t.to_tract().expect("input").into_tvalue())
        .collect();
    let plan = m.plan();
    let model = plan.model();
    let mut per_node: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut state = SimpleState::new(plan).expect("state");
    // Warm up once, then time every node's eval.
    state.run(inputs.clone()).expect("run");
    let started = Instant::now();
    for _ in 0..runs {
        state
            .run_plan_with_eval(inputs.clone(), |ctx, st, node, input| {
                let t = Instant::now();
                let out = eval(ctx, st, node, input);
                *per_node.entry(node.id).or_default() += t.elapsed();
                out
            })
            .expect("run");
    }
    let wall = started.elapsed() / runs;
    let total: Duration = per_node.values().sum::<Duration>() / runs;
    println!(
        "{name}: {} nodes in the optimized plan, {:.3} ms per run ({:.3} ms in ops)",
        model.nodes().len(),
        wall.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3
    );
    let mut by_kind: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
    for (id, d) in &per_node {
        let e = by_kind
            .entry(model.node(*id).op().name().to_string())
            .or_default();
        e.0 += 1;
        e.1 += *d / runs;
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by_key(|(_, (_, d))| std::cmp::Reverse(*d));
    println!("\nby op kind:");
    for (kind, (n, d)) in &kinds {
        println!(
            "  {:>8.3} ms {:>5.1}%  {n:>3} x {kind}",
            d.as_secs_f64() * 1e3,
            100.0 * d.as_secs_f64() / total.as_secs_f64()
        );
    }
    let mut nodes: Vec<_> = per_node.iter().collect();
    nodes.sort_by_key(|(_, d)| std::cmp::Reverse(**d));
    println!("\ntop nodes:");
    for (id, d) in nodes.iter().take(15) {
        let node = model.node(**id);
        let out = &node.outputs[0].fact;
        let info = node.op().info().unwrap_or_default().join("; ");
        println!(
            "  {:>8.3} ms  {} {} -> {:?} {}",
            (**d / runs).as_secs_f64() * 1e3,
            node.op().name(),
            node.name,
            out,
            info.chars().take(160).collect::<String>()
        );
    }
}
