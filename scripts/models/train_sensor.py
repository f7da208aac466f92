#!/usr/bin/env python3
"""Train and export the sensor anomaly model (models/sensor/sensor_anomaly.onnx).

Synthetic machine-monitoring data, fixed seed: one second of accelerometer signal
at 1 kHz plus a temperature trace per sample, reduced to 8 features. Four classes:
normal, bearing_fault (impulses: high kurtosis/crest), imbalance (strong 1x shaft
tone: high RMS at the shaft frequency), overheating (high and rising temperature).

The classifier is a scikit-learn MLP; the ONNX graph is written directly with the
`onnx` package using only core ops (Sub, Div, MatMul, Add, Relu, Softmax) so every
runtime, tract included, supports it. Run twice: the file is identical (the script
prints its sha256, which models/sensor_anomaly.toml records).
"""
import hashlib
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "models" / "sensor" / "sensor_anomaly.onnx"
CALIB = ROOT / "models" / "sensor" / "calibration.npy"
SEED = 20240601
FS = 1000  # Hz
LABELS = ["normal", "bearing_fault", "imbalance", "overheating"]
FEATURES = ["vib_rms_g", "vib_peak_g", "vib_crest", "vib_kurtosis",
            "shaft_band_ratio", "temp_c", "temp_slope_c_per_min", "temp_std_c"]


def features(vib: np.ndarray, temp: np.ndarray, minutes: np.ndarray, shaft_hz: float) -> np.ndarray:
    rms = np.sqrt(np.mean(vib ** 2))
    peak = np.max(np.abs(vib))
    centered = vib - vib.mean()
    kurt = np.mean(centered ** 4) / (np.mean(centered ** 2) ** 2)
    spec = np.abs(np.fft.rfft(vib)) ** 2
    freqs = np.fft.rfftfreq(len(vib), 1 / FS)
    band = (freqs > shaft_hz - 2) & (freqs < shaft_hz + 2)
    ratio = spec[band].sum() / spec.sum()
    slope = np.polyfit(minutes, temp, 1)[0]
    return np.array([rms, peak, peak / rms, kurt, ratio, temp.mean(), slope, temp.std()])


def sample(rng: np.random.Generator, cls: int) -> np.ndarray:
    t = np.arange(FS) / FS
    shaft_hz = rng.uniform(20, 40)
    vib = 0.05 * np.sin(2 * np.pi * shaft_hz * t + rng.uniform(0, 6.3))
    vib += rng.normal(0, rng.uniform(0.02, 0.05), FS)
    base_temp = rng.uniform(35, 55)
    slope = rng.normal(0, 0.02)
    if cls == 1:  # bearing fault: periodic impacts with ringing
        period = int(FS / rng.uniform(80, 160))
        for start in range(rng.integers(0, period), FS, period):
            n = min(20, FS - start)
            vib[start:start + n] += rng.uniform(0.3, 0.8) * np.exp(-np.arange(n) / 4) * np.sin(np.arange(n) * 2.1)
    elif cls == 2:  # imbalance: strong 1x tone
        vib += rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * shaft_hz * t)
    elif cls == 3:  # overheating: hot and rising
        base_temp = rng.uniform(70, 95)
        slope = rng.uniform(0.3, 1.5)
    minutes = np.arange(60) / 60.0 * 10  # 10 minutes of temperature, 60 points
    temp = base_temp + slope * minutes + rng.normal(0, 0.2, 60)
    return features(vib, temp, minutes, shaft_hz)


def dataset(rng: np.random.Generator, n_per_class: int):
    xs, ys = [], []
    for cls in range(len(LABELS)):
        for _ in range(n_per_class):
            xs.append(sample(rng, cls))
            ys.append(cls)
    return np.array(xs), np.array(ys)


def export(clf: MLPClassifier, mean: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(mean.astype(np.float32), "mean"),
             numpy_helper.from_array(scale.astype(np.float32), "scale")]
    nodes = [helper.make_node("Sub", ["features", "mean"], ["centered"]),
             helper.make_node("Div", ["centered", "scale"], ["h0"])]
    prev = "h0"
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"])]
        prev = f"z{i}"
        if i < len(clf.coefs_) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"a{i}"]))
            prev = f"a{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes, "sensor_anomaly",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", len(FEATURES)])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(LABELS)])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="openclaw-train_sensor", producer_version="1")
    model.ir_version = 8
    helper.set_model_props(model, {"labels": ",".join(LABELS), "features": ",".join(FEATURES)})
    for i, node in enumerate(model.graph.node):
        node.name = f"{node.op_type.lower()}_{i}"  # unnamed nodes get clashing names in converters
    onnx.checker.check_model(model)
    return model


def main():
    rng = np.random.default_rng(SEED)
    x_train, y_train = dataset(rng, 400)
    x_test, y_test = dataset(rng, 100)
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    clf = MLPClassifier(hidden_layer_sizes=(16, 16), random_state=SEED, max_iter=600, tol=1e-6)
    clf.fit((x_train - mean) / scale, y_train)
    acc = clf.score((x_test - mean) / scale, y_test)
    print(f"test accuracy {acc:.4f} on {len(y_test)} samples")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(export(clf, mean, scale).SerializeToString())
    # Calibration/evaluation set for quantization and agreement checks.
    np.save(CALIB, x_test.astype(np.float32))
    np.save(CALIB.with_name("calibration_labels.npy"), y_test.astype(np.int64))
    print(f"{OUT.relative_to(ROOT)} {OUT.stat().st_size} bytes sha256 {hashlib.sha256(OUT.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
