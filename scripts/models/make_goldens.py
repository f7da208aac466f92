#!/usr/bin/env python3
"""Run ONNX Runtime on fixed inputs for every model and variant; write golden
files under models/golden/ for tests/inference_golden.rs (no Python at test time).

Inputs are either listed values, committed PGM images (normalized as PP-OCR does:
(v/255 - 0.5) / 0.5, gray replicated to 3 channels) or the committed WAV for VAD.
Outputs are stored whole when small, else every `stride`-th value plus the mean.
`--render` redraws the PGM images with Pillow first (they are committed; only
needed to change them). Needs models/cache/ filled by fetch.sh (openclaw-admin models fetch).
"""
import json
import pathlib
import sys
import tomllib
import wave

import numpy as np
import onnx
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parents[2]
M = ROOT / "models"
G = M / "golden"
MAX_VALUES = 4096


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def manifests():
    return {m["name"]: m for m in (tomllib.loads(p.read_text()) for p in sorted(M.glob("*.toml")))}


def read_pgm(path):
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P5" and parts[3] == b"255", path
    w, h = int(parts[1]), int(parts[2])
    return np.frombuffer(parts[4][: w * h], dtype=np.uint8).reshape(h, w)


def write_pgm(path, img):
    path.write_bytes(b"P5\n%d %d\n255\n" % (img.shape[1], img.shape[0]) + img.astype(np.uint8).tobytes())


def render():
    from PIL import Image, ImageDraw, ImageFont

    def line(text, w, h, size):
        im = Image.new("L", (w, h), 255)
        ImageDraw.Draw(im).text((8, (h - size) // 2 - 2), text, font=ImageFont.load_default(size=size), fill=0)
        return np.array(im)

    write_pgm(G / "ocr_line.pgm", line("OpenClaw 2025", 320, 48, 30))
    cls = line("Edge fleet", 192, 48, 30)
    write_pgm(G / "ocr_cls_line.pgm", cls)
    write_pgm(G / "ocr_cls_line_180.pgm", cls[::-1, ::-1].copy())
    page = Image.new("L", (640, 480), 255)
    d = ImageDraw.Draw(page)
    for i, (text, size) in enumerate([("OpenClaw edge agent", 40), ("Private, local AI on device", 28),
                                      ("Sensor 7: temperature 71.5 C", 24), ("Fleet status: all nodes up", 32)]):
        d.text((40, 40 + i * 100), text, font=ImageFont.load_default(size=size), fill=0)
    write_pgm(G / "ocr_page.pgm", np.array(page))


def pgm_input(file):
    img = read_pgm(G / file).astype(np.float64)
    x = ((img / 255.0 - 0.5) / 0.5).astype(np.float32)
    return np.repeat(x[None, None], 3, axis=1)


def summarize(name, arr):
    flat = arr.astype(np.float64).ravel()
    stride = max(1, -(-flat.size // MAX_VALUES))
    return {"name": name, "shape": list(arr.shape), "stride": stride,
            "values": [float(v) for v in flat[::stride].astype(np.float32)],
            "mean": float(flat.mean()), "max": float(flat.max())}


def ctc_text(probs, dictionary):
    idx = probs[0].argmax(axis=-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0:
            out.append(dictionary[i])
        prev = i
    return "".join(out)


def run_cases(name, m, cases):
    sess = session(M / m["path"])
    out = []
    for case_name, inputs in cases:
        feeds = {k: v for k, (v, _) in inputs.items()}
        res = sess.run([o["name"] for o in m["outputs"]], feeds)
        out.append({"case": case_name,
                    "inputs": [dict(name=k, shape=list(v.shape), **spec) for k, (v, spec) in inputs.items()],
                    "outputs": [summarize(o["name"], r) for o, r in zip(m["outputs"], res)],
                    "_raw": res})
    return out


def fixtures():
    # A tiny valid ONNX model using an operator tract does not implement
    # (Col2Im, opset 18), for the "unsupported op" error test.
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Col2Im", ["x", "image_shape", "block_shape"], ["y"], name="col2im_0")], "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])],
        [helper.make_tensor("image_shape", TensorProto.INT64, [2], [3, 3]),
         helper.make_tensor("block_shape", TensorProto.INT64, [2], [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="openclaw")
    model.ir_version = 8
    onnx.checker.check_model(model)
    (G / "fixtures").mkdir(exist_ok=True)
    (G / "fixtures" / "unsupported_op.onnx").write_bytes(model.SerializeToString())


def main():
    if "--render" in sys.argv:
        render()
    fixtures()
    ms = manifests()
    eval_x = np.load(M / "sensor" / "calibration.npy")
    eval_y = np.load(M / "sensor" / "calibration_labels.npy")
    # One sample of each class for the per-model goldens.
    picks = [int(np.where(eval_y == c)[0][0]) for c in range(4)]
    sensor_cases = [(f"class{c}", {"features": (eval_x[i:i + 1], {"kind": "values",
                     "values": [float(v) for v in eval_x[i]]})}) for c, i in enumerate(picks)]
    cls_cases = [(f, {"x": (pgm_input(f + ".pgm"), {"kind": "pgm", "file": f + ".pgm"})})
                 for f in ["ocr_cls_line", "ocr_cls_line_180"]]
    goldens = {}
    for name in ["sensor_anomaly", "sensor_anomaly_f16", "sensor_anomaly_int8"]:
        goldens[name] = run_cases(name, ms[name], sensor_cases)
    for name in ["ocr_cls", "ocr_cls_f16", "ocr_cls_int8"]:
        goldens[name] = run_cases(name, ms[name], cls_cases)
    goldens["ocr_det"] = run_cases("ocr_det", ms["ocr_det"],
                                   [("page", {"x": (pgm_input("ocr_page.pgm"), {"kind": "pgm", "file": "ocr_page.pgm"})})])
    rec = ms["ocr_rec"]
    goldens["ocr_rec"] = run_cases("ocr_rec", rec,
                                   [("line", {"x": (pgm_input("ocr_line.pgm"), {"kind": "pgm", "file": "ocr_line.pgm"})})])
    meta = {p.key: p.value for p in onnx.load(M / rec["path"], load_external_data=False).metadata_props}
    dictionary = ["blank"] + meta["character"].splitlines() + [" "]
    goldens["ocr_rec"][0]["text"] = ctc_text(goldens["ocr_rec"][0]["_raw"][0], dictionary)
    print("ocr_rec reads:", repr(goldens["ocr_rec"][0]["text"]))

    for name, cases in goldens.items():
        for c in cases:
            c.pop("_raw")
        doc = {"model": name, "sha256": ms[name]["sha256"], "onnxruntime": ort.__version__, "cases": cases}
        (G / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")

    # VAD: per-window probabilities over the committed WAV, frames batched as the Rust helper does.
    vad = ms["silero_vad"]
    with wave.open(str(G / "vad_speech_16k.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    n = -(-len(pcm) // 512)
    padded = np.zeros(n * 512 + 64, np.float32)
    padded[64:64 + len(pcm)] = pcm
    frames = np.stack([padded[i * 512:i * 512 + 576] for i in range(n)])
    seq = vad["inputs"][0]["pin"]["sequence_length"]
    sess = session(M / vad["path"])
    h = np.zeros((1, 1, 128), np.float32)
    c = h.copy()
    probs = []
    for i in range(0, n, seq):
        batch = np.zeros((seq, 576), np.float32)
        batch[: min(seq, n - i)] = frames[i:i + seq]
        p, h, c = sess.run(None, {"input": batch, "h": h, "c": c})
        probs += [float(v) for v in p[: min(seq, n - i)]]
    (G / "silero_vad.json").write_text(json.dumps(
        {"model": "silero_vad", "sha256": vad["sha256"], "onnxruntime": ort.__version__,
         "wav": "vad_speech_16k.wav", "samples": int(len(pcm)), "probs": probs}, indent=1) + "\n")

    # Agreement of the f16/int8 variants with f32 under ONNX Runtime.
    sensor = {v: session(M / ms[v]["path"]).run(None, {"features": eval_x})[0]
              for v in ["sensor_anomaly", "sensor_anomaly_f16", "sensor_anomaly_int8"]}
    agreement = {"sensor_eval": {"samples": int(len(eval_y))}}
    for v, p in sensor.items():
        agreement["sensor_eval"][v] = {
            "accuracy": float((p.argmax(1) == eval_y).mean()),
            "argmax_agrees_with_f32": float((p.argmax(1) == sensor["sensor_anomaly"].argmax(1)).mean()),
            "max_abs_diff_vs_f32": float(np.abs(p - sensor["sensor_anomaly"]).max())}
    (G / "sensor_eval.json").write_text(json.dumps(
        {"labels": [int(v) for v in eval_y], "features": [[float(x) for x in row] for row in eval_x]}) + "\n")
    from quantize import cls_calibration  # same directory
    imgs = cls_calibration() + [x for _, d in cls_cases for x, _ in d.values()]
    cls = {v: np.concatenate([session(M / ms[v]["path"]).run(None, {"x": im})[0] for im in imgs])
           for v in ["ocr_cls", "ocr_cls_f16", "ocr_cls_int8"]}
    agreement["ocr_cls_images"] = {"images": len(imgs)}
    for v, p in cls.items():
        agreement["ocr_cls_images"][v] = {
            "argmax_agrees_with_f32": float((p.argmax(1) == cls["ocr_cls"].argmax(1)).mean()),
            "max_abs_diff_vs_f32": float(np.abs(p - cls["ocr_cls"]).max())}
    (G / "agreement.json").write_text(json.dumps(agreement, indent=1) + "\n")
    print(json.dumps(agreement, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    main()
