"""global_pool pass: spatial ReduceMean -> GlobalAveragePool, alone on hand-built graphs and in an export."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import helper

import deployq
from deployq.examples import zoo
from deployq.exporters.graph import to_model
from deployq.exporters.global_pool import spatial_mean_to_global_pool
from deployq.qat import checkpoint as ck
from deployq.qat.loading import resolve_model
from deployq.deploy.export import export
from onnx_builders import make_model, run, value
from test_export import optimized_ops


def mean_graph(axes, keepdims=1, shape=(2, 3, 5, 7), opset=21):
    """x -> ReduceMean(axes) -> y, the axes as an input (opset >= 18) or an attribute (before)."""
    if opset >= 18:
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=keepdims)
        inits = {"axes": np.array(axes, np.int64)}
    else:
        node = helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=axes, keepdims=keepdims)
        inits = {}
    out = np.zeros(shape).mean(axis=tuple(axes), keepdims=bool(keepdims)).shape
    return make_model([node], [value("x", list(shape))], [value("y", list(out))], inits, opset=opset)


def rewrite(model):
    graph = gs.import_onnx(model)
    spatial_mean_to_global_pool(graph)
    return to_model(graph.cleanup(), model.opset_import[0].version)


@pytest.mark.parametrize("axes, opset", [([-1, -2], 21), ([2, 3], 21), ([3, 2], 13)])
def test_spatial_mean_becomes_global_average_pool_with_the_same_values(axes, opset):
    model = mean_graph(axes, opset=opset)
    out = rewrite(model)
    assert [(n.op_type, n.name, list(n.output)) for n in out.graph.node] == [("GlobalAveragePool", "mean", ["y"])]
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
    want = x.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    got = run(out, {"x": x})[0]
    assert got.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, run(model, {"x": x})[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axes, keepdims, shape", [([-1, -2], 0, (2, 3, 5, 7)),  # a different output shape
                                                    ([1], 1, (2, 3, 5, 7)),  # over channels
                                                    ([-1], 1, (2, 3, 5, 7)),  # over the width only
                                                    ([2], 1, (2, 3, 5, 7)),  # over the height only
                                                    ([-1], 1, (2, 3, 5)),  # rank 3
                                                    ([1, 2, 3], 1, (2, 3, 5, 7))])
def test_other_means_are_left_alone(axes, keepdims, shape):
    out = rewrite(mean_graph(axes, keepdims, shape))
    assert [n.op_type for n in out.graph.node] == ["ReduceMean"]


@pytest.mark.parametrize("axes, rewritten", [([-1, -2], True), ([-1], False), ([1, 2, 3], False)])
def test_symbolic_height_and_width(axes, rewritten):
    """An export with --dynamic-hw: the shape is ('batch', 3, 'h', 'w'); only the spatial mean
    becomes a pool, and the rewritten model agrees with the original at any size."""
    model = mean_graph(axes)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    for i, name in ((2, "h"), (3, "w")):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = name
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    out = rewrite(model)
    assert ([n.op_type for n in out.graph.node] == ["GlobalAveragePool"]) == rewritten
    x = np.random.default_rng(1).normal(size=(1, 3, 9, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6, atol=1e-7)


def test_channel_attention_export_pools_in_integers_and_checks_exactly(tmp_path):
    """The squeeze of a squeeze-and-excitation block runs as onnxruntime's QLinearGlobalAveragePool
    in the exported int8 model, and `check` still finds torch and onnxruntime within 1 LSB."""
    model = zoo.channel_attention()
    x = torch.rand(1, 3, 16, 16)
    qmodel = deployq.prepare(model, x)
    deployq.calibrate(qmodel, [torch.rand(2, 3, 16, 16) for _ in range(3)], progress=False)
    path = ck.save(tmp_path / "ca.pt", qmodel, factory="deployq.examples.zoo:channel_attention",
                   inputs=[ck.InputSpec("x", (1, 3, 16, 16))])
    result = export(resolve_model(ckpt=str(path)), tmp_path / "out", ort_format=False, progress=False)
    ops = [n.op_type for n in result.quant_model.graph.node]
    assert "GlobalAveragePool" in ops and "ReduceMean" not in ops
    assert "ReduceMean" not in [n.op_type for n in result.float_model.graph.node]
    _, optimized = optimized_ops(result.files["int8"].read_bytes(), tmp_path / "opt.onnx")
    assert "QLinearGlobalAveragePool" in optimized
    assert deployq.check(qmodel, result.files["int8"], inputs=[torch.rand(2, 3, 16, 16)]).ok(max_lsb=1)
