#!/usr/bin/env python3
"""Make the f16 and int8 variants of the sensor model and the OCR angle classifier.

f16: onnxconverter-common, keep_io_types=True (inputs/outputs stay f32, so callers
do not change; Cast nodes sit at the edges).
int8: onnxruntime.quantization.quantize_static, QDQ format, MinMax
calibration on fixed data (uint8 activations, int8 weights per output channel;
the classifier is converted to opset 13 for that), then the activation
QuantizeLinear/DequantizeLinear pairs are removed: weight-only int8. tract 0.23
does not fuse DQ -> Conv -> Q into an integer conv, so with activation Q/DQ the
convs still ran in f32 and the 144 scalar QuantizeLinear ops made the classifier
7x slower than f32; QOperator (QLinearConv) and dynamic (ConvInteger) formats
were slower still (docs/inference.md, scripts/models/int8_formats.py). With
DQ only on the weights, tract folds them into f32 constants at load: the file is
int8, the compute f32.
Outputs are committed (each well under 2 MB); the script prints their sha256 for
the manifests. Needs models/cache/ filled by fetch.sh (openclaw-admin models fetch) for the classifier.
"""
import hashlib
import pathlib

import numpy as np
import onnx
from onnx import version_converter
from onnxconverter_common import float16
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
import tempfile
from collections import Counter

ROOT = pathlib.Path(__file__).resolve().parents[2]
M = ROOT / "models"


class Reader(CalibrationDataReader):
    def __init__(self, name, batches):
        self.it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def cls_calibration():
    # Text-line-like images: dark strokes on light background, normalized like
    # PP-OCR ((x/255 - 0.5) / 0.5). Fixed seed.
    rng = np.random.default_rng(7)
    out = []
    for _ in range(32):
        img = np.full((48, 192), 230.0) + rng.normal(0, 8, (48, 192))
        for _ in range(rng.integers(4, 12)):
            x0, w = rng.integers(4, 180), rng.integers(3, 14)
            y0, h = rng.integers(8, 20), rng.integers(10, 26)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 60)
        img = np.clip(img, 0, 255)
        chw = np.repeat(img[None], 3, axis=0) / 255.0
        out.append(((chw - 0.5) / 0.5)[None].astype(np.float32))
    return out


def unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    # Converters leave some nodes unnamed; tract then names them after their
    # output, which can clash with an inserted Cast node of that name.
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type.lower()}_n{i}"
        seen.add(node.name)
    return model


def f16(src: pathlib.Path, dst: pathlib.Path):
    model = float16.convert_float_to_float16(onnx.load(src), keep_io_types=True)
    dst.write_bytes(unique_node_names(model).SerializeToString())


def int8(src: pathlib.Path, dst: pathlib.Path, input_name: str, batches):
    # Pre-processing folds Constant nodes into initializers and BatchNorm into Conv,
    # without which the PaddleOCR export keeps its weights in f32.
    with tempfile.TemporaryDirectory() as tmp:
        pre = pathlib.Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(pre)
        # Per-channel DequantizeLinear (axis) needs opset 13; the classifier is opset 11.
        if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
            model = version_converter.convert_version(model, 13)
        model = unique_node_names(model)
        pre.write_bytes(model.SerializeToString())
        # Softmax stays f32: with a quantized Softmax output (Q/DQ around it)
        # tract 0.23 returns saturated probabilities (checked: 100/400 correct on
        # the sensor eval set vs 400/400 with Softmax left in f32).
        softmax = [n.name for n in model.graph.node if n.op_type == "Softmax"]
        _int8(pre, dst, input_name, batches, softmax)


def _int8(src: pathlib.Path, dst: pathlib.Path, input_name: str, batches, exclude):
    quantize_static(str(src), str(dst), Reader(input_name, batches), quant_format=QuantFormat.QDQ,
                    nodes_to_exclude=exclude,
                    # Relu/Clip are otherwise folded into the activation Q ranges,
                    # which weights_only() removes.
                    extra_options={"QDQKeepRemovableActivations": True},
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    model = weights_only(onnx.load(dst))
    onnx.checker.check_model(model)
    # Same computation as the source graph: only DequantizeLinear nodes added.
    ops = lambda m: Counter(n.op_type for n in m.graph.node if n.op_type != "DequantizeLinear")
    assert ops(model) == ops(onnx.load(src)), (ops(model), ops(onnx.load(src)))
    dst.write_bytes(unique_node_names(model).SerializeToString())


def weights_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop QuantizeLinear -> DequantizeLinear pairs on activations (QDQ format),
    keeping DequantizeLinear on initializers (the int8 weights, int32 biases)."""
    g = model.graph
    consts = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    nodes = list(g.node)
    rename, drop = {}, set()
    for qi, q in enumerate(nodes):
        if q.op_type != "QuantizeLinear" or q.input[0] in consts or q.output[0] in outputs:
            continue
        users = [i for i, n in enumerate(nodes) if q.output[0] in n.input]
        if not users or any(nodes[i].op_type != "DequantizeLinear" or nodes[i].output[0] in outputs
                            for i in users):
            continue
        drop.add(qi)
        for i in users:
            drop.add(i)
            rename[nodes[i].output[0]] = q.input[0]
    keep = [onnx.NodeProto.FromString(n.SerializeToString()) for i, n in enumerate(nodes) if i not in drop]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    # Scales and zero points of the removed pairs are left unused.
    used = {i for n in keep for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    # value_info of removed tensors would be stale.
    live = {o for n in keep for o in n.output}
    vi = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vi)
    return model


def main():
    sensor = M / "sensor" / "sensor_anomaly.onnx"
    calib = np.load(M / "sensor" / "calibration.npy")
    f16(sensor, M / "sensor" / "sensor_anomaly_f16.onnx")
    int8(sensor, M / "sensor" / "sensor_anomaly_int8.onnx", "features",
         [calib[i:i + 1] for i in range(0, len(calib), 4)])
    cls = M / "cache" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    f16(cls, M / "derived" / "ocr_cls_f16.onnx")
    int8(cls, M / "derived" / "ocr_cls_int8.onnx", "x", cls_calibration())
    for p in [M / "sensor" / "sensor_anomaly_f16.onnx", M / "sensor" / "sensor_anomaly_int8.onnx",
              M / "derived" / "ocr_cls_f16.onnx", M / "derived" / "ocr_cls_int8.onnx"]:
        print(f"{p.relative_to(ROOT)} {p.stat().st_size} bytes sha256 {hashlib.sha256(p.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
