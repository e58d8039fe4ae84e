"""insert_qdq and fuse_activation passes, alone on hand-built graphs, against numpy QDQ semantics."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import helper, numpy_helper

from deployq.core import qparams as qp
from deployq.exporters.cleanup import cleanup, finalize
from deployq.exporters.graph import RewriteError, to_model
from deployq.exporters.insert_qdq import insert_qdq
from onnx_builders import make_model, run, value


def fq(x, s, zp, qmin, qmax):
    """Independent numpy QDQ: (clip(rint(x / s) + zp) − zp) · s."""
    return ((np.clip(np.rint(np.float32(x) / np.float32(s)) + zp, qmin, qmax) - zp) * np.float32(s)).astype(np.float32)


def conv_relu_graph(rng):
    inits = {"W": np.random.default_rng(7).normal(size=(4, 2, 3, 3)).astype(np.float32),
             "B": np.random.default_rng(8).normal(size=4).astype(np.float32), "shape": np.array([1, -1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("MaxPool", ["relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["pool", "shape"], ["out"], name="flat")]
    return make_model(nodes, [value("x", [1, 2, 6, 6])], [value("out", [1, 36])], inits)


def records(rng, x_bits=8, relu_bits=8):
    w_scale = (rng.random(4) * 0.1 + 0.05).astype(np.float32)
    return {
        "x": qp.make("x", "input", x_bits, False, False, None, 0.02 if x_bits == 8 else 0.02 / 4, 128 if x_bits == 8 else 512),
        "conv.weight": qp.make("conv.weight", "weight", 8, True, True, 0, w_scale, np.zeros(4), layer="conv", input="x"),
        "relu": qp.make("relu", "activation", relu_bits, False, False, None, 0.05, 0),
    }


def rewritten(model, recs, carry_bits=8):
    graph = gs.import_onnx(model)
    return finalize(to_model(cleanup(insert_qdq(graph, recs, carry_bits=carry_bits)), 21))


def test_reference_view_matches_numpy_qdq_semantics(rng):
    base = conv_relu_graph(rng)
    w, b = (numpy_helper.to_array(i) for i in base.graph.initializer[:2])
    recs = records(rng)
    model = rewritten(base, recs)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    s_w = np.asarray(recs["conv.weight"].scale, np.float32)
    codes = np.clip(np.rint(w / s_w[:, None, None, None]), -128, 127)
    np.testing.assert_array_equal(inits["conv.weight_quantized"], codes)
    assert inits["conv.weight_quantized"].dtype == np.int8
    bias_scale = np.float32(recs["x"].scale[0]) * s_w
    np.testing.assert_array_equal(inits["conv.bias_scale"], bias_scale)
    np.testing.assert_array_equal(inits["conv.bias_quantized"], np.rint(b / bias_scale).astype(np.int32))

    x = rng.normal(size=(1, 2, 6, 6)).astype(np.float32)
    xq = fq(x, recs["x"].scale[0], 128, 0, 255)
    conv = torch.nn.functional.conv2d(torch.from_numpy(xq), torch.from_numpy((codes * s_w[:, None, None, None]).astype(np.float32)),
                                      torch.from_numpy((np.rint(b / bias_scale) * bias_scale).astype(np.float32)), padding=1).numpy()
    relu = fq(np.maximum(conv, 0), 0.05, 0, 0, 255)
    want = torch.nn.functional.max_pool2d(torch.from_numpy(relu), 2).reshape(1, -1).numpy()
    got = run(model, {"x": x})[0]
    assert np.abs(got - want).max() <= 0.05 + 1e-6  # at most one step, from float summation order
    assert np.mean(got == want) > 0.95


def test_names_follow_the_convention_and_outputs_keep_their_names(rng):
    model = rewritten(conv_relu_graph(rng), records(rng))
    names = {n.name: n.op_type for n in model.graph.node}
    assert names["relu_QuantizeLinear"] == "QuantizeLinear" and names["x_DequantizeLinear"] == "DequantizeLinear"
    assert [o.name for o in model.graph.output] == ["out"]
    carried = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("pool", "out_prequant")]
    assert len(carried) == 2  # max-pool and reshape carry the relu's qparams


@pytest.mark.parametrize("carry_bits, carried", [(8, 0), (16, 2)])
def test_wide_codes_are_carried_through_data_movement_only_where_asked(rng, carry_bits, carried):
    """A 10-bit tensor's max-pool and reshape get no Q/DQ pair on the CPU (no 16-bit kernel would use
    it); a device that moves 16-bit codes (QNN) carries them. The values are the same either way."""
    recs = records(rng, relu_bits=10)
    model = rewritten(conv_relu_graph(rng), recs, carry_bits=carry_bits)
    pairs = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("pool", "out_prequant")]
    assert len(pairs) == carried
    x = np.random.default_rng(3).normal(size=(1, 2, 6, 6)).astype(np.float32)
    other = rewritten(conv_relu_graph(rng), recs, carry_bits=24 - carry_bits)
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(other, {"x": x})[0])


def test_ten_bit_activation_is_clipped_then_16_bit(rng):
    recs = records(rng, x_bits=10)
    model = rewritten(conv_relu_graph(rng), recs)
    nodes = {n.name: n for n in model.graph.node}
    q = nodes["x_QuantizeLinear"]
    assert nodes["x_Clip"].input[0] == "x" and q.input[0] == nodes["x_Clip"].output[0]
    zp = next(i for i in model.graph.initializer if i.name == q.input[2])
    assert numpy_helper.to_array(zp).dtype == np.uint16
    x = np.linspace(-30, 30, 72, dtype=np.float32).reshape(1, 2, 6, 6)
    s = recs["x"].scale[0]
    extra = model.graph.output.add()
    extra.name = "x_DequantizeLinear_Output"
    got = run(model, {"x": x}, outputs=["x_DequantizeLinear_Output"])[0]
    np.testing.assert_array_equal(got, fq(x, s, 512, 0, 1023))  # never saturates at 65535, never at 255


def test_quant_points_are_exactly_the_records(rng):
    """The pass adds no placement of its own: a record between a layer and its activation is
    quantized there (prepare never writes one), and no record means no Q/DQ."""
    recs = records(rng)
    recs["conv"] = qp.make("conv", "activation", 8, False, False, None, 0.05, 10)
    model = rewritten(conv_relu_graph(rng), recs)
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert {"conv", "relu", "x"} <= quantized
    del recs["relu"]
    model = rewritten(conv_relu_graph(rng), recs)
    assert "relu" not in {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_missing_tensors_and_layers_are_named(rng):
    recs = records(rng)
    recs["nope"] = qp.make("nope", "activation", 8, False, False, None, 0.1, 0)
    with pytest.raises(RewriteError, match="'nope' has no tensor"):
        rewritten(conv_relu_graph(rng), recs)
    recs = records(rng)
    recs["conv.weight"] = qp.make("conv.weight", "weight", 8, True, True, 0, np.ones(4), np.zeros(4), layer="conv2")
    with pytest.raises(RewriteError, match="no Conv/ConvTranspose/Gemm/MatMul node named 'conv2'"):
        rewritten(conv_relu_graph(rng), recs)


def test_input_disagreement_between_torch_and_onnx_is_an_error(rng):
    recs = records(rng)
    recs["conv.weight"] = qp.make("conv.weight", "weight", 8, True, True, 0, np.ones(4), np.zeros(4), layer="conv", input="other")
    with pytest.raises(RewriteError, match="its input is quant point 'other'"):
        rewritten(conv_relu_graph(rng), recs)
