"""Pass 4, cleanup: drop dead nodes and unread initializers, sort the nodes, then check the model.

A node is dead when none of its outputs reaches a graph output (a BatchNormalization that was
folded away, a weight's float copy once its integer initializer replaced it); an initializer is
unread when only dead nodes took it. :func:`cleanup` counts both in the pass log. :func:`finalize` runs
ONNX shape inference (types checked, strict) and the full checker on the exported model, so that a
graph the other passes left inconsistent fails here, naming the problem, instead of in
onnxruntime on a user's device.
"""

from __future__ import annotations

from typing import Optional

import onnx
import onnx_graphsurgeon as gs

from deployq.exporters.graph import PassLog, RewriteError


def _initializers(graph: gs.Graph) -> int:
    return sum(isinstance(t, gs.Constant) for t in graph.tensors().values())


def cleanup(graph: gs.Graph, log: Optional[PassLog] = None) -> gs.Graph:
    """Remove dead nodes and unread initializers, then sort `graph` topologically (in place)."""
    log = log or PassLog()
    nodes, initializers = len(graph.nodes), _initializers(graph)
    graph.cleanup().toposort()
    if nodes - len(graph.nodes):
        log.count("dead nodes removed", nodes - len(graph.nodes))
    if initializers - _initializers(graph):
        log.count("unread initializers removed", initializers - _initializers(graph))
    return graph


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference and the full ONNX checker; a failure is a RewriteError naming the problem."""
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise RewriteError(f"the rewritten graph is not valid ONNX: {err}") from None
    return model
