"""Pass: group Conv / ConvTranspose / Gemm with the activation that follows it.

Inside a group there is no quantization: the activation's output is the group's quant point,
exactly as in the fused QAT module (docs/design.md, contract 3). ONNX has no standard fused Conv+act op, so
the pass rewrites nothing; it returns the groups, and :mod:`deployq.exporters.insert_qdq` refuses
to put a quantizer inside one. The activation kinds are those of ``QConfig.fuse_activations``:

    relu -> Relu,  relu6 / hardtanh -> Clip,  leaky_relu -> LeakyRelu

onnxruntime's CPU integer kernels absorb Relu and Clip into QLinearConv's requantization; a
LeakyRelu between Conv and Q keeps the convolution in float (measured, onnxruntime 1.31), which is
why LeakyReLU is not fused by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import onnx_graphsurgeon as gs

from deployq.exporters.graph import ONNX_ACTIVATIONS, WEIGHT_LAYER_OPS, PassLog, consumers



@dataclass(frozen=True)
class FusedGroup:
    layer: str  # node name
    activation: str  # node name
    inner: str  # the tensor between them (never quantized)
    output: str  # the group's output tensor (the quant point)


def find_fused_groups(graph: gs.Graph, kinds: Iterable[str], log: Optional[PassLog] = None) -> list[FusedGroup]:
    log = log or PassLog()
    ops = {op for kind in kinds for op in ONNX_ACTIVATIONS[kind]}
    groups = []
    for node in graph.nodes:
        if node.op not in WEIGHT_LAYER_OPS or len(node.outputs) != 1:
            continue
        inner = node.outputs[0]
        users = consumers(inner)
        if len(users) != 1 or inner in graph.outputs or users[0].op not in ops:
            continue
        act = users[0]
        groups.append(FusedGroup(node.name, act.name, inner.name, act.outputs[0].name))
    log.count("Conv+activation groups", len(groups))
    return groups
