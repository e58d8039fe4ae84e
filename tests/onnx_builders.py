"""Hand-built ONNX graphs for testing rewrite passes alone (no torch export involved)."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, initializers, opset=21):
    graph = helper.make_graph(nodes, "test", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def run(model, feeds, optimize=False, outputs=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def bn_params(rng, c):
    return {"gamma": (1 + 0.3 * rng.normal(size=c)).astype(np.float32), "beta": (0.2 * rng.normal(size=c)).astype(np.float32),
            "mean": (0.3 * rng.normal(size=c)).astype(np.float32), "var": (0.5 + rng.random(c)).astype(np.float32)}
