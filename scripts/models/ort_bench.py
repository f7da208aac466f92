#!/usr/bin/env python3
"""Time ONNX Runtime (CPU, 1 intra-op thread, 1 inter-op thread) on the same
inputs benches/inference.rs feeds tract: every input 0.1, recurrent states
(h, c) zero, shapes as pinned in the manifests. Prints median latency per model
and load time (session creation), plus JSON with --json.
"""
import json
import pathlib
import statistics
import sys
import time
import tomllib

import numpy as np
import onnxruntime as ort

M = pathlib.Path(__file__).resolve().parents[2] / "models"
MODELS = ["sensor_anomaly", "sensor_anomaly_f16", "sensor_anomaly_int8", "silero_vad",
          "ocr_cls", "ocr_cls_f16", "ocr_cls_int8", "ocr_rec", "ocr_det"]


def shape(spec):
    return [d if isinstance(d, int) else spec["pin"][d] for d in spec["shape"]]


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main():
    results = {}
    for name in MODELS:
        m = tomllib.loads((M / f"{name}.toml").read_text())
        path = M / m["path"]
        loads = []
        for _ in range(5):
            t = time.perf_counter()
            sess = session(path)
            loads.append(time.perf_counter() - t)
        feeds = {i["name"]: np.full(shape(i), 0.0 if i["name"] in ("h", "c") else 0.1, np.float32)
                 for i in m["inputs"]}
        for _ in range(5):
            sess.run(None, feeds)
        runs = []
        deadline = time.perf_counter() + 3.0
        while time.perf_counter() < deadline or len(runs) < 20:
            t = time.perf_counter()
            sess.run(None, feeds)
            runs.append(time.perf_counter() - t)
        results[name] = {"run_ms": statistics.median(runs) * 1e3, "load_ms": statistics.median(loads) * 1e3,
                         "iterations": len(runs)}
        print(f"{name:22} run {results[name]['run_ms']:9.3f} ms   load {results[name]['load_ms']:8.1f} ms")
    if "--json" in sys.argv:
        print(json.dumps({"onnxruntime": ort.__version__, "threads": 1, "results": results}, indent=1))


if __name__ == "__main__":
    main()
