"""Small helpers over onnx-graphsurgeon graphs, shared by the rewrite passes.

Every pass is a function ``Graph -> Graph`` that reports what it changed through a
:class:`PassLog`; an unsupported pattern is a :class:`RewriteError` naming the node.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

LOG = logging.getLogger("deployq.exporters")
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its warnings are about its own optional deps
IR_VERSION = 10
WEIGHT_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops whose input 1 is a layer's weight  # onnxruntime 1.20+ loads IR 10; opset 21 (int16 Q/DQ) needs IR >= 10


class RewriteError(ValueError):
    """A pattern the rewriter cannot handle; the message names the node or tensor."""


@dataclass
class PassLog:
    """Counts of what each pass changed, and notes on what it left alone (and why)."""

    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def note(self, message: str) -> None:
        self.notes.append(message)
        LOG.info(message)

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "no changes"


def producer(tensor: gs.Tensor) -> Optional[gs.Node]:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def constant_value(tensor: gs.Tensor) -> Optional[np.ndarray]:
    """The value of an initializer / Constant-node output, or None for computed tensors."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


class Names:
    """Fresh names for new tensors and nodes of a graph: a base name, or ``base_1``, ``base_2``, ...
    if taken. The names in use are read once, so naming stays cheap on graphs with thousands of
    tensors."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def layer_bias(node: gs.Node) -> Optional[tuple[gs.Node, int]]:
    """(node, input index) of a weight layer's bias: input 2 of Conv / ConvTranspose / Gemm; for a
    MatMul (how torch exports a Linear applied to a tensor of rank > 2), the constant operand of
    the Add that follows it. None if the layer has no bias."""
    if node.op != "MatMul":
        return (node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
    users = consumers(node.outputs[0])
    if len(users) != 1 or users[0].op != "Add" or node.outputs[0] in users[0].outputs:
        return None
    add = users[0]
    for index, tensor in enumerate(add.inputs):
        if tensor is not node.outputs[0] and constant_value(tensor) is not None:
            return add, index
    return None


def layer_output(node: gs.Node) -> gs.Tensor:
    """The tensor a weight layer produces, its bias added (after the Add of a MatMul layer)."""
    where = layer_bias(node) if node.op == "MatMul" else None
    return where[0].outputs[0] if where is not None else node.outputs[0]


def layer_axis(node: gs.Node) -> int:
    """Output-channel axis of the weight (input 1) of Conv / ConvTranspose / Gemm / MatMul."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return 1
    raise RewriteError(f"node {node.name!r} ({node.op}) is not a weight layer")


def to_model(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """Export a graph with the opset and IR version deployq targets."""
    graph.opset = opset
    model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model.producer_name = "deployq"
    return model

