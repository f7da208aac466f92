#!/usr/bin/env python3
"""Markdown tables from one scripts/models/bench.sh run: criterion's medians
(target/criterion/{run,load,batch_*}/*/new/estimates.json), the child-process
memory table (inference-memory.json) and ort_bench.py's output (its --json block,
run before tract, and its second plain pass, run after).

    python3 scripts/models/bench_table.py [CRITERION_DIR]
"""
import json
import os
import pathlib
import re
import sys

C = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                 os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "criterion"))
MODELS = ["sensor_anomaly", "sensor_anomaly_f16", "sensor_anomaly_int8", "silero_vad",
          "ocr_cls", "ocr_cls_f16", "ocr_cls_int8", "ocr_rec", "ocr_det"]


def median_ms(*parts):
    est = json.loads((C.joinpath(*parts) / "new" / "estimates.json").read_text())
    return est["median"]["point_estimate"] / 1e6


def main():
    text = (C / "inference-ort.txt").read_text()
    start = text.index("{\n")
    depth, end = 0, start
    for i, ch in enumerate(text[start:], start):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            end = i + 1
            break
    ort = json.loads(text[start:end])
    after = {m: float(v) for m, v in re.findall(r"(?m)^(\w+)\s+run\s+([\d.]+) ms", text[end:])}
    mem = {r["model"]: r for r in json.loads((C / "inference-memory.json").read_text())}
    print(f"ONNX Runtime {ort['onnxruntime']}, {ort['threads']} thread(s); tract 1 thread.\n")
    print("| model | tract (ms) | ORT before / after (ms) | tract/ORT | tract load (ms) | ORT load (ms) "
          "| peak KiB tract | peak KiB ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in MODELS:
        t = median_ms("run", m)
        o1, o2 = ort["results"][m]["run_ms"], after.get(m, float("nan"))
        lo, hi = sorted([t / o1, t / o2])
        print(f"| {m} | {t:.4g} | {o1:.4g} / {o2:.4g} | {lo:.2f}-{hi:.2f} | {median_ms('load', m):.3g} "
              f"| {ort['results'][m]['load_ms']:.3g} | {mem[m]['peak_load_run_kib']} "
              f"| {ort['memory'][m]['peak_load_run_kib']} |")
    print("\n| model | batch | tract ms/item | ORT ms/item | tract/ORT |")
    print("|---|---:|---:|---:|---:|")
    for key, v in ort["batches"].items():
        m, b = key.split("/")
        t = median_ms(f"batch_{m}", b) / int(b)
        print(f"| {m} | {b} | {t:.4g} | {v['per_item_ms']:.4g} | {t / v['per_item_ms']:.2f} |")


if __name__ == "__main__":
    main()
