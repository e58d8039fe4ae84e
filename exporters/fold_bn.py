"""Pass: fold BatchNormalization into a neighbouring Conv / ConvTranspose / Gemm.

Backward fold (the usual case) - BN after a layer whose output feeds only the BN:

    y = BN(W * x + c)  =>  W' = a ⊙ W,  c' = a·(c − μ) + β,   a = γ / √(σ² + ε)

with a broadcast along the layer's output-channel axis (0 for Conv, 1 for ConvTranspose, 0 for Gemm
with transB=1). This is :func:`deployq.core.folding.fold_batchnorm`, the same code the QAT modules use,
so folded float32 weights are bit-identical to torch's.

Forward fold - BN before a Conv without padding (padding would feed zeros, not BN(0), to the
border), groups = 1, BN output read only by that Conv:

    W * (a⊙x + b) + c  =>  W' = W ⊙ a (along input channels),  c' = c + Σ_{i,k} W[o,i,k]·b[i]

Anything else is left alone with a note saying why (for example, a BN whose input is a tensor a
quantizer must see, listed in `keep`).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import onnx_graphsurgeon as gs

from deployq.core.folding import bn_scale, fold_batchnorm
from deployq.exporters.graph import BN_FOLDABLE_OPS, PassLog, constant_value, consumers, layer_axis, producer



def _bn_params(bn: gs.Node) -> Optional[tuple[np.ndarray, ...]]:
    values = [constant_value(t) for t in bn.inputs[1:5]]
    if any(v is None for v in values):
        return None
    return tuple(v.astype(np.float32) for v in values)


def _set_constant(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray, name: str) -> None:
    """Give `node` a new initializer at input `index` (never mutating one other nodes share)."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and isinstance(old, gs.Constant) and len(consumers(old)) == 1:
        old.values = value
        return
    taken = set(graph.tensors())
    new_name = name if name not in taken else f"{name}_folded"
    i = 1
    while new_name in taken:
        new_name, i = f"{name}_folded{i}", i + 1
    constant = gs.Constant(new_name, value)
    if index < len(node.inputs):
        node.inputs[index] = constant
    else:
        node.inputs.append(constant)


def _why_not_backward(layer: Optional[gs.Node], bn: gs.Node, graph: gs.Graph, keep: set[str]) -> Optional[str]:
    x = bn.inputs[0]
    if layer is None or layer.op not in BN_FOLDABLE_OPS:
        return f"its input comes from {layer.op if layer else 'a graph input'}, not Conv/ConvTranspose/Gemm"
    if len(consumers(x)) != 1 or x in graph.outputs:
        return f"the output of {layer.name!r} is also used elsewhere"
    if x.name in keep:
        return f"{x.name!r} is a quant point"
    if constant_value(layer.inputs[1]) is None:
        return f"the weight of {layer.name!r} is computed, not an initializer"
    if len(layer.inputs) > 2 and constant_value(layer.inputs[2]) is None:
        return f"the bias of {layer.name!r} is computed, not an initializer"
    if layer.op == "ConvTranspose" and layer.attrs.get("group", 1) != 1:
        return f"{layer.name!r} is a grouped ConvTranspose"
    if layer.op == "Gemm" and (layer.attrs.get("alpha", 1.0) != 1.0 or layer.attrs.get("beta", 1.0) != 1.0):
        return f"{layer.name!r} has alpha/beta != 1"
    return None


def _fold_backward(graph: gs.Graph, layer: gs.Node, bn: gs.Node, params: tuple[np.ndarray, ...]) -> None:
    gamma, beta, mean, var = params
    weight = constant_value(layer.inputs[1]).astype(np.float32)
    bias = constant_value(layer.inputs[2]).astype(np.float32) if len(layer.inputs) > 2 else None
    w, b = fold_batchnorm(weight, bias, gamma, beta, mean, var, float(bn.attrs.get("epsilon", 1e-5)),
                          layer_axis(layer))
    _set_constant(graph, layer, 1, w.astype(np.float32), layer.inputs[1].name)
    _set_constant(graph, layer, 2, b.astype(np.float32), f"{layer.name}.bias")
    layer.outputs = list(bn.outputs)
    bn.outputs.clear()


def _forward_target(graph: gs.Graph, bn: gs.Node, keep: set[str]) -> Optional[gs.Node]:
    y = bn.outputs[0]
    users = consumers(y)
    if len(users) != 1 or y in graph.outputs or y.name in keep:
        return None
    conv = users[0]
    if conv.op != "Conv" or conv.inputs[0] is not y or conv.attrs.get("group", 1) != 1:
        return None
    if any(conv.attrs.get("pads", [0])) or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    if constant_value(conv.inputs[1]) is None or (len(conv.inputs) > 2 and constant_value(conv.inputs[2]) is None):
        return None
    return conv


def _fold_forward(graph: gs.Graph, bn: gs.Node, conv: gs.Node, params: tuple[np.ndarray, ...]) -> None:
    gamma, beta, mean, var = params
    a = bn_scale(gamma, var, float(bn.attrs.get("epsilon", 1e-5)))
    shift = (beta - mean * a).astype(np.float32)
    weight = constant_value(conv.inputs[1]).astype(np.float32)
    bias = constant_value(conv.inputs[2]).astype(np.float32) if len(conv.inputs) > 2 else np.zeros(weight.shape[0], np.float32)
    w = weight * a.reshape(1, -1, *([1] * (weight.ndim - 2)))
    per_input = weight.astype(np.float64).reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)
    b = bias + (per_input @ shift.astype(np.float64)).astype(np.float32)
    _set_constant(graph, conv, 1, w.astype(np.float32), conv.inputs[1].name)
    _set_constant(graph, conv, 2, b.astype(np.float32), f"{conv.name}.bias")
    conv.inputs[0] = bn.inputs[0]
    bn.outputs.clear()


def fold_batchnorm_pass(graph: gs.Graph, keep: Iterable[str] = (), log: Optional[PassLog] = None) -> gs.Graph:
    """Fold every BatchNormalization that can be folded; `keep` names tensors that must survive."""
    log = log or PassLog()
    keep = set(keep)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        if bn.attrs.get("training_mode", 0):
            log.note(f"fold_bn: left {bn.name!r}: training_mode=1")
            continue
        if len(bn.outputs) != 1:
            log.note(f"fold_bn: left {bn.name!r}: it also outputs running statistics")
            continue
        params = _bn_params(bn)
        if params is None:
            log.note(f"fold_bn: left {bn.name!r}: its scale/bias/mean/var are computed, not initializers")
            continue
        layer = producer(bn.inputs[0])
        reason = _why_not_backward(layer, bn, graph, keep)
        if reason is None:
            _fold_backward(graph, layer, bn, params)
            log.count("BatchNormalization folded into the preceding layer")
            continue
        conv = _forward_target(graph, bn, keep)
        if conv is not None:
            _fold_forward(graph, bn, conv, params)
            log.count("BatchNormalization folded into the following Conv")
            continue
        log.note(f"fold_bn: left {bn.name!r}: {reason}, and it does not feed a single unpadded Conv")
    graph.cleanup()
    return graph

