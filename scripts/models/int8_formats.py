#!/usr/bin/env python3
"""Which int8 ONNX format runs fast in tract? Builds the angle classifier (ocr_cls)
in each format ONNX Runtime's tools produce, with a manifest per file, into OUT
(default /tmp/openclaw-int8), and times ONNX Runtime on them (1 thread, input 0.1).
tract's side, per-op, with the same files:

    for v in qdq_act qdq_act_pc qop_conv dynamic weight_only; do
      OPENCLAW_MODELS_DIR=OUT cargo bench --no-default-features --features inference \\
        --bench inference_profile -- $v 50; done

Formats: qdq_act (QDQ, activations and weights quantized, per-tensor: the variant
committed before), qdq_act_pc (same, per-channel weights), qop_conv (QOperator:
QLinearConv/QLinearMatMul, other ops f32), dynamic (quantize_dynamic: ConvInteger +
DynamicQuantizeLinear), weight_only (what quantize.py commits). Needs models/cache/.
"""
import hashlib
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quantize as Q  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = ROOT / "models" / "cache" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def manifest(name, file):
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    return f'''name = "{name}"
path = "{file.name}"
sha256 = "{sha}"
licence = "Apache-2.0"
precision = "int8"
variant_of = "ocr_cls"
description = "int8 format experiment"

[source]
kind = "committed"
script = "scripts/models/int8_formats.py"
derived_from = "ocr_cls"

[[inputs]]
name = "x"
dtype = "f32"
shape = ["batch", 3, 48, 192]
pin = {{ batch = 1 }}

[[outputs]]
name = "save_infer_model/scale_0.tmp_1"

[postprocess]
kind = "classes"
labels = ["0", "180"]
'''


def ort_ms(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = {"x": np.full((1, 3, 48, 192), 0.1, np.float32)}
    for _ in range(5):
        s.run(None, x)
    runs = []
    deadline = time.perf_counter() + 2.0
    while time.perf_counter() < deadline or len(runs) < 20:
        t = time.perf_counter()
        s.run(None, x)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1e3


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/openclaw-int8")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = pathlib.Path(tmp) / "pre.onnx"
        quant_pre_process(str(SRC), str(pre), skip_symbolic_shape=True)
        m = Q.unique_node_names(onnx.load(pre))
        pre.write_bytes(m.SerializeToString())
        pre13 = pathlib.Path(tmp) / "pre13.onnx"
        pre13.write_bytes(version_converter.convert_version(m, 13).SerializeToString())
        softmax = [n.name for n in m.graph.node if n.op_type == "Softmax"]
        common = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=softmax)
        calib = lambda: Q.Reader("x", Q.cls_calibration())  # noqa: E731
        files = {}
        for name, src, kw in [
            ("qdq_act", pre, dict(quant_format=QuantFormat.QDQ, per_channel=False)),
            ("qdq_act_pc", pre13, dict(quant_format=QuantFormat.QDQ, per_channel=True)),
            ("qop_conv", pre, dict(quant_format=QuantFormat.QOperator, per_channel=False,
                                   op_types_to_quantize=["Conv", "MatMul"])),
        ]:
            files[name] = out / f"{name}.onnx"
            quantize_static(str(src), str(files[name]), calib(), **common, **kw)
        files["dynamic"] = out / "dynamic.onnx"
        quantize_dynamic(str(pre), str(files["dynamic"]), op_types_to_quantize=["Conv", "MatMul"],
                         weight_type=QuantType.QUInt8)
        files["weight_only"] = out / "weight_only.onnx"
        Q.int8(SRC, files["weight_only"], "x", Q.cls_calibration())
    (out / "ocr_cls_f32.onnx").write_bytes(SRC.read_bytes())
    files = {"ocr_cls_f32": out / "ocr_cls_f32.onnx", **files}
    for name, f in files.items():
        model = Q.unique_node_names(onnx.load(f))
        f.write_bytes(model.SerializeToString())
        (out / f"{name}.toml").write_text(manifest(name, f))
        print(f"{name:12} {f.stat().st_size:8} bytes  ORT {ort_ms(f):7.3f} ms")


if __name__ == "__main__":
    main()
