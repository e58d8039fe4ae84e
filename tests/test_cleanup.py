"""cleanup pass, alone: dead nodes and unread initializers go, order is fixed, bad graphs are named."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from deployq.exporters.cleanup import cleanup, finalize
from deployq.exporters.graph import PassLog, RewriteError, to_model
from onnx_builders import make_model, run, value


def graph_with_dead_branch():
    """y = relu(x + a); a dead Mul reading `b`, and an initializer `unused` nobody reads."""
    inits = {"a": np.full((1, 4), 0.5, np.float32), "b": np.full((1, 4), 2.0, np.float32),
             "unused": np.zeros(3, np.float32)}
    nodes = [helper.make_node("Add", ["x", "a"], ["t"], name="add"),
             helper.make_node("Mul", ["t", "b"], ["dead"], name="dead_mul"),
             helper.make_node("Relu", ["t"], ["y"], name="relu")]
    return make_model(nodes, [value("x", [1, 4])], [value("y", [1, 4])], inits)


def test_dead_nodes_and_unread_initializers_are_removed_and_counted():
    model = graph_with_dead_branch()
    log = PassLog()
    graph = cleanup(gs.import_onnx(model), log)
    out = finalize(to_model(graph, 21))
    assert [n.name for n in out.graph.node] == ["add", "relu"]
    assert {i.name for i in out.graph.initializer} == {"a"}
    # `b` went with its node; `unused` never entered the graph (onnx-graphsurgeon imports what nodes read)
    assert log.counts == {"dead nodes removed": 1, "unread initializers removed": 1}
    x = np.arange(4, dtype=np.float32).reshape(1, 4) - 2
    np.testing.assert_array_equal(run(out, {"x": x})[0], run(model, {"x": x})[0])


def test_nodes_come_out_in_topological_order():
    graph = gs.import_onnx(graph_with_dead_branch())
    graph.nodes.reverse()  # as a pass that appends new nodes at the end leaves them
    names = [n.name for n in cleanup(graph).nodes]
    assert names == ["add", "relu"]


def test_a_clean_graph_is_left_alone():
    log = PassLog()
    graph = cleanup(cleanup(gs.import_onnx(graph_with_dead_branch())), log)
    assert len(graph.nodes) == 2 and not log.counts


def test_finalize_names_what_is_invalid():
    graph = gs.import_onnx(graph_with_dead_branch())
    add = next(n for n in graph.nodes if n.name == "add")
    add.inputs[1] = gs.Constant("ints", np.ones((1, 4), np.int64))  # float + int64: not valid ONNX
    with pytest.raises(RewriteError, match="not valid ONNX.*Add"):
        finalize(to_model(cleanup(graph), 21))
