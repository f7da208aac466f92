#!/bin/sh
# tract and ONNX Runtime in one run, same inputs, one thread each:
# latency at batch 1, per-item time at larger batches, load time, peak memory.
# Output: $OUT (default target dir's criterion/) inference-{tract,ort}.txt, ort JSON.
# The bench profile is overridden to opt-level 3 without LTO (the release
# profile's fat LTO takes too long to build on a small machine).
set -eu
cd "$(dirname "$0")/../.."
OUT=${OUT:-${CARGO_TARGET_DIR:-target}/criterion}
mkdir -p "$OUT"
export CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_OPT_LEVEL=3 CARGO_PROFILE_BENCH_CODEGEN_UNITS=16
cargo bench --no-default-features --features inference --bench inference --no-run
python3 scripts/models/ort_bench.py --batch --mem --json | tee "$OUT/inference-ort.txt"
cargo bench --no-default-features --features inference --bench inference -- --noplot | tee "$OUT/inference-tract.txt"
python3 scripts/models/ort_bench.py | tee -a "$OUT/inference-ort.txt"
uptime | tee -a "$OUT/inference-tract.txt"
