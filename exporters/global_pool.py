"""Pass: a ReduceMean over the spatial axes of a 4-D tensor becomes GlobalAveragePool.

torch exports ``nn.AdaptiveAvgPool2d(1)`` and ``x.mean((2, 3), keepdim=True)`` (the squeeze of a
squeeze-and-excitation block, the low-light example's channel attention) as
``ReduceMean(axes=[-1, -2], keepdims=1)``. Both ops compute the same mean of the same values, one
per (batch, channel); the node keeps its name and its output tensor, so every quant point, and
every tensor ``diff`` pairs, is unchanged.

Why: onnxruntime's CPU provider turns ``DQ -> GlobalAveragePool -> Q`` into the integer kernel
QLinearGlobalAveragePool, which reads the channels-last codes its QLinearConv writes, whereas a
ReduceMean stays float on a dequantized tensor in the layout the integer convolutions left behind.
Measured on the example at width 32, 256×256, 1 thread (onnxruntime 1.31): the four ReduceMean
nodes took 24 % of the all-8-bit model's time, and the rewrite makes that model 24 % faster with
outputs equal bit for bit (``benchmarks/bench_latency.py``).

Only keepdims=1 over exactly the last two axes of a rank-4 tensor is rewritten: that is
GlobalAveragePool's output shape. Any other ReduceMean is left alone.
"""

from __future__ import annotations

from typing import Optional

import onnx_graphsurgeon as gs

from deployq.exporters.graph import PassLog, constant_value


def _axes(node: gs.Node) -> Optional[list[int]]:
    """The axes a ReduceMean reduces: its second input from opset 18, its attribute before."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def is_spatial_mean(node: gs.Node) -> bool:
    """True for a ReduceMean over the last two axes of a 4-D tensor, dimensions kept."""
    if node.op != "ReduceMean" or not node.inputs or node.attrs.get("keepdims", 1) != 1:
        return False
    shape = node.inputs[0].shape
    axes = _axes(node)
    if shape is None or len(shape) != 4 or axes is None:
        return False
    return sorted(a % 4 for a in axes) == [2, 3]


def spatial_mean_to_global_pool(graph: gs.Graph, log: Optional[PassLog] = None) -> gs.Graph:
    """Rewrite every spatial ReduceMean of `graph` as GlobalAveragePool (in place; names kept)."""
    log = log or PassLog()
    for node in graph.nodes:
        if is_spatial_mean(node):
            node.op = "GlobalAveragePool"
            node.inputs = node.inputs[:1]
            node.attrs = {}
            log.count("ReduceMean -> GlobalAveragePool")
    return graph
