"""fold_bn pass, alone: hand-built graphs and a torch-exported graph give the same outputs."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import helper

import deployq
from deployq.examples import zoo
from deployq.exporters.fold_bn import fold_batchnorm_pass
from deployq.exporters.graph import PassLog, to_model
from deployq.deploy.float_graph import export_float
from onnx_builders import bn_params, make_model, run, value


def fold(model, keep=()):
    log = PassLog()
    graph = fold_batchnorm_pass(gs.import_onnx(model), keep, log)
    return to_model(graph, 21), log


def assert_same(before, after, feeds):
    a, b = run(before, feeds)[0], run(after, feeds)[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def layer_bn_graph(rng, op):
    c_in, c_out = 3, 5
    if op == "Conv":
        w, attrs, x_shape, y_shape = rng.normal(size=(c_out, c_in, 3, 3)), {"pads": [1, 1, 1, 1]}, [1, c_in, 8, 8], [1, c_out, 8, 8]
    elif op == "ConvTranspose":
        w, attrs, x_shape, y_shape = rng.normal(size=(c_in, c_out, 2, 2)), {"strides": [2, 2]}, [1, c_in, 4, 4], [1, c_out, 8, 8]
    else:
        w, attrs, x_shape, y_shape = rng.normal(size=(c_out, c_in)), {"transB": 1}, [2, c_in], [2, c_out]
    p = bn_params(rng, c_out)
    inits = {"W": w.astype(np.float32), "B": rng.normal(size=c_out).astype(np.float32), **p}
    nodes = [helper.make_node(op, ["x", "W", "B"], ["t"], name="layer", **attrs),
             helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3)]
    return make_model(nodes, [value("x", x_shape)], [value("y", y_shape)], inits), x_shape


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm"])
def test_backward_fold_on_hand_built_graphs(op, rng):
    model, shape = layer_bn_graph(rng, op)
    folded, log = fold(model)
    assert [n.op_type for n in folded.graph.node] == [op]
    assert folded.graph.node[0].output[0] == "y"  # the BN's output name survives
    assert_same(model, folded, {"x": rng.normal(size=shape).astype(np.float32)})


def test_forward_fold_into_an_unpadded_conv(rng):
    p = bn_params(rng, 3)
    inits = {"W": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), **p}
    nodes = [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["t"], name="bn"),
             helper.make_node("Conv", ["t", "W"], ["y"], name="conv")]
    model = make_model(nodes, [value("x", [1, 3, 5, 5])], [value("y", [1, 4, 5, 5])], inits)
    folded, log = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert log.counts["BatchNormalization folded into the following Conv"] == 1
    assert_same(model, folded, {"x": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)})


def test_unfoldable_bn_is_left_alone_and_explained(rng):
    p = bn_params(rng, 3)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    model = make_model(nodes, [value("x", [1, 3, 4, 4])], [value("y", [1, 3, 4, 4])], p)
    folded, log = fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "BatchNormalization"]
    assert any("left 'bn'" in note and "Relu" in note for note in log.notes)


def test_a_quant_point_between_layer_and_bn_blocks_the_fold(rng):
    model, shape = layer_bn_graph(rng, "Conv")
    folded, log = fold(model, keep={"t"})
    assert "BatchNormalization" in [n.op_type for n in folded.graph.node]
    assert any("quant point" in note for note in log.notes)


def test_fold_on_a_torch_exported_graph():
    qmodel = deployq.prepare(zoo.resnet(), torch.randn(1, 3, 16, 16))
    exported = export_float(qmodel, (torch.randn(1, 3, 16, 16),))
    assert sum(n.op_type == "BatchNormalization" for n in exported.graph.node) == 5
    folded, _ = fold(exported)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    assert_same(exported, folded, {"x": x})
    np.testing.assert_allclose(run(folded, {"x": x})[0], zoo.resnet()(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-4)
