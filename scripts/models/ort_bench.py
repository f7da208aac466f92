#!/usr/bin/env python3
"""Time ONNX Runtime (CPU, 1 intra-op thread, 1 inter-op thread) on the same
inputs benches/inference.rs feeds tract: every input 0.1, recurrent states
(h, c) zero, shapes as pinned in the manifests. Prints median latency per model
and load time (session creation), plus JSON with --json.
--batch: also the batch sizes benches/inference.rs tries (per-item time).
--mem: peak memory per model, one child process each (peak RSS, VmHWM, after
`import onnxruntime` as the baseline, then after session creation and one run;
not ru_maxrss: Linux carries it over exec from the parent).
--threads N: intra-op threads (default 1, as tract runs).
--profile NAME: ONNX Runtime's per-op times for one model, by op kind (compare
with `cargo bench --bench inference_profile -- NAME`).
"""
import json
import pathlib
import statistics
import subprocess
import sys
import time
import tomllib

import numpy as np
import onnxruntime as ort

M = pathlib.Path(__file__).resolve().parents[2] / "models"
MODELS = ["sensor_anomaly", "sensor_anomaly_f16", "sensor_anomaly_int8", "silero_vad",
          "ocr_cls", "ocr_cls_f16", "ocr_cls_int8", "ocr_rec", "ocr_det"]
# Same as BATCHES in benches/inference.rs.
BATCHES = [("sensor_anomaly", "batch", [1, 8, 64]), ("silero_vad", "sequence_length", [8, 32, 128]),
           ("ocr_cls", "batch", [1, 4, 8, 16]), ("ocr_cls_f16", "batch", [1, 8]),
           ("ocr_cls_int8", "batch", [1, 8]), ("ocr_rec", "batch", [1, 4, 8]), ("ocr_det", "batch", [1, 2])]
THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1


def shape(spec, override=None):
    pins = {**spec.get("pin", {}), **(override or {})}
    return [d if isinstance(d, int) else pins[d] for d in spec["shape"]]


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(m, override=None):
    return {i["name"]: np.full(shape(i, override), 0.0 if i["name"] in ("h", "c") else 0.1, np.float32)
            for i in m["inputs"]}


def median_run(sess, x, seconds=3.0):
    for _ in range(5):
        sess.run(None, x)
    runs = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(runs) < 20:
        t = time.perf_counter()
        sess.run(None, x)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), len(runs)


def peak_kib():
    status = pathlib.Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def memory_child(name):
    m = tomllib.loads((M / f"{name}.toml").read_text())
    base = peak_kib()
    sess = session(M / m["path"])
    load = peak_kib()
    sess.run(None, feeds(m))
    run = peak_kib()
    print(json.dumps({"model": name, "baseline_kib": base, "peak_load_kib": load - base,
                      "peak_load_run_kib": run - base}))


def profile(name, runs=50):
    m = tomllib.loads((M / f"{name}.toml").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    sess = ort.InferenceSession(str(M / m["path"]), so, providers=["CPUExecutionProvider"])
    x = feeds(m)
    for _ in range(runs):
        sess.run(None, x)
    trace = json.loads(pathlib.Path(sess.end_profiling()).read_text())
    kinds, total = {}, 0.0
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            k = ev["args"]["op_name"]
            n, us = kinds.get(k, (0, 0.0))
            kinds[k] = (n + 1, us + ev["dur"])
            total += ev["dur"]
    print(f"{name}: ONNX Runtime {ort.__version__}, {total / runs / 1e3:.3f} ms per run in ops")
    for k, (n, us) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"  {us / runs / 1e3:8.3f} ms {100 * us / total:5.1f}%  {n // runs:3} x {k}")


def main():
    if "--profile" in sys.argv:
        return profile(sys.argv[sys.argv.index("--profile") + 1])
    if "--mem-child" in sys.argv:
        return memory_child(sys.argv[sys.argv.index("--mem-child") + 1])
    results = {}
    for name in MODELS:
        m = tomllib.loads((M / f"{name}.toml").read_text())
        path = M / m["path"]
        loads = []
        for _ in range(5):
            t = time.perf_counter()
            sess = session(path)
            loads.append(time.perf_counter() - t)
        run, n = median_run(sess, feeds(m))
        results[name] = {"run_ms": run * 1e3, "load_ms": statistics.median(loads) * 1e3, "iterations": n}
        print(f"{name:22} run {results[name]['run_ms']:9.3f} ms   load {results[name]['load_ms']:8.1f} ms")
    batches = {}
    if "--batch" in sys.argv:
        for name, symbol, sizes in BATCHES:
            m = tomllib.loads((M / f"{name}.toml").read_text())
            sess = session(M / m["path"])
            for b in sizes:
                run, _ = median_run(sess, feeds(m, {symbol: b}), 2.0)
                batches[f"{name}/{b}"] = {"run_ms": run * 1e3, "per_item_ms": run * 1e3 / b}
                print(f"{name:22} {symbol} {b:4}: {run * 1e3:9.3f} ms, {run * 1e3 / b:9.4f} ms per item")
    memory = {}
    if "--mem" in sys.argv:
        for name in MODELS:
            out = subprocess.run([sys.executable, __file__, "--mem-child", name, "--threads", str(THREADS)],
                                 check=True, capture_output=True, text=True).stdout
            memory[name] = json.loads(out.strip().splitlines()[-1])
            print(f"{name:22} peak KiB load {memory[name]['peak_load_kib']:8}  load+run "
                  f"{memory[name]['peak_load_run_kib']:8}")
    if "--json" in sys.argv:
        print(json.dumps({"onnxruntime": ort.__version__, "threads": THREADS, "results": results,
                          "batches": batches, "memory": memory}, indent=1))

if __name__ == "__main__":
    main()
