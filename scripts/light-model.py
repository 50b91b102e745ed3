"""Builds the light model used for overhead benchmarks and lifecycle tests: a 64x64 grey image,
flattened, one dense layer and a softmax over two labels. Its weights are SYNTHETIC (a fixed
pseudo-random seed): it measures the service, never anything clinical.
Usage: .cache/kserve-venv/bin/python scripts/light-model.py models/synthetic-light/1/model.onnx"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIDE, LABELS = 64, 2
rng = np.random.default_rng(20261122)
weights = (rng.standard_normal((SIDE * SIDE, LABELS)) * 0.02).astype(np.float32)
bias = np.array([0.1, -0.1], dtype=np.float32)
graph = helper.make_graph(
    [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ],
    "synthetic_light",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", SIDE, SIDE, 1])],
    [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", LABELS])],
    initializer=[
        numpy_helper.from_array(np.array([-1, SIDE * SIDE], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(bias, "bias"),
    ],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="medai-flow scripts/light-model.py")
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
