#!/usr/bin/env python3
"""Make the f16 and int8 variants of the sensor model and the OCR angle classifier.

f16: onnxconverter-common, keep_io_types=True (inputs/outputs stay f32, so callers
do not change; Cast nodes sit at the edges).
int8: onnxruntime.quantization.quantize_static, QDQ format, per-tensor, MinMax
calibration on fixed data (uint8 activations, int8 weights).
Outputs are committed (each well under 2 MB); the script prints their sha256 for
the manifests. Needs models/cache/ filled by fetch.py for the classifier.
"""
import hashlib
import pathlib

import numpy as np
import onnx
from onnxconverter_common import float16
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
import tempfile

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
        model = unique_node_names(onnx.load(pre))
        pre.write_bytes(model.SerializeToString())
        # Softmax stays f32: with a quantized Softmax output (Q/DQ around it)
        # tract 0.23 returns saturated probabilities (checked: 100/400 correct on
        # the sensor eval set vs 400/400 with Softmax left in f32).
        softmax = [n.name for n in model.graph.node if n.op_type == "Softmax"]
        _int8(pre, dst, input_name, batches, softmax)


def _int8(src: pathlib.Path, dst: pathlib.Path, input_name: str, batches, exclude):
    quantize_static(str(src), str(dst), Reader(input_name, batches), quant_format=QuantFormat.QDQ,
                    nodes_to_exclude=exclude,
                    per_channel=False, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    dst.write_bytes(unique_node_names(onnx.load(dst)).SerializeToString())


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
