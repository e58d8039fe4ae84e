"""Pass (device profiles): a ConvTranspose whose kernel equals its stride becomes Conv 1×1 + DepthToSpace.

With kernel = stride = s, no padding, no dilation and one group, no two taps of a ConvTranspose
overlap, so every output pixel is one dot product:

    y[c, h·s + i, w·s + j] = Σ_ci x[ci, h, w] · W[ci, c, i, j] + b[c]

which is a 1×1 Conv to s²·C channels, channel k = (i·s + j)·C + c with weight W[ci, c, i, j] and
bias b[c], followed by ``DepthToSpace(blocksize=s, mode="DCR")``. The arithmetic is the same sums
of the same products, so the integer codes are unchanged: weight codes are permuted (never
re-quantized), per-channel scales and int32 bias codes are tiled s² times.

Why: NNAPI and CoreML take no ConvTranspose (each one cuts the model into another partition), and
onnxruntime's CPU provider runs a QDQ ConvTranspose in float while a QDQ Conv runs as QLinearConv.

In a QDQ graph the layer's quant point T (its output, or its fused activation's) must stay in the
original layout, because ``check`` and ``diff`` read it by name. So the pointwise chain between the
layer and T runs in the s²·C-channel layout and is quantized there with T's own qparams (a copy of
T's [Clip ->] Q -> DQ, numerically the same as quantizing after the permutation), and DepthToSpace
moves the codes' values into T's layout, where T's Q/DQ is then the identity:

    DQ(x) -> ConvTranspose -> [act] -> T -> Q -> DQ
    DQ(x) -> Conv 1×1 -> [act] -> T_space_to_depth -> Q -> DQ -> DepthToSpace -> T -> Q -> DQ

onnxruntime fuses the first half into QLinearConv and runs DepthToSpace on the codes. A float graph
gets the same rewrite without the Q/DQ copy, so a float model and its QDQ model rewritten alike
still share every tensor name that ``diff`` pairs.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import onnx_graphsurgeon as gs

from deployq.exporters.graph import (CONV_TRANSPOSE_BLOCKS, DEPTH_TO_SPACE, Names, PassLog, constant_value, consumers,
                                     producer, to_blocks)

POINTWISE_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus")
SUFFIX = "_space_to_depth"


def _tile(values: np.ndarray, s: int) -> np.ndarray:
    """A per-output-channel vector for C channels -> for s²·C channels (one value stays one value)."""
    return np.tile(values, s * s) if values.size > 1 else values


def _constant_operand(tensor: gs.Tensor, channels: int, axis: int) -> Optional[str]:
    """None for a float constant, or the only reader of DequantizeLinear(constant codes, constant
    qparams) per tensor or per output channel (`axis`); else why not."""
    if constant_value(tensor) is not None:
        return None
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or len(consumers(tensor)) != 1:
        return f"its {tensor.name!r} is computed, not a constant"
    if not all(constant_value(t) is not None for t in dq.inputs if t.name):
        return f"the qparams of {tensor.name!r} are computed"
    scale = constant_value(dq.inputs[1])
    ndim = np.ndim(constant_value(dq.inputs[0]))
    if scale.size > 1 and (scale.size != channels or dq.attrs.get("axis", 1) % max(ndim, 1) != axis):
        return f"{tensor.name!r} is quantized along another axis than its output channels"
    return None


def why_not(node: gs.Node) -> Optional[str]:
    """None if `node` is a ConvTranspose this pass rewrites, else the reason it does not."""
    a = node.attrs
    kernel, strides = list(a.get("kernel_shape", [])), list(a.get("strides", []))
    if len(kernel) != 2 or kernel[0] != kernel[1]:
        return "it is not a 2-D ConvTranspose with a square kernel"
    if strides != kernel or kernel[0] < 2:
        return f"its kernel {kernel} differs from its strides {strides} (the taps overlap)" if strides != kernel \
            else "its kernel and stride are 1 (it is a plain Conv)"
    if any(a.get("pads", [0])) or any(a.get("output_padding", [0])) or a.get("output_shape"):
        return "it pads or crops its output"
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={a['auto_pad']}"
    if any(d != 1 for d in a.get("dilations", [1])) or a.get("group", 1) != 1:
        return "it is dilated or grouped"
    weight = constant_value(node.inputs[1])
    if weight is None and producer(node.inputs[1]) is not None and producer(node.inputs[1]).op == "DequantizeLinear":
        weight = constant_value(producer(node.inputs[1]).inputs[0])
    if weight is None or weight.ndim != 4:
        return "its weight is computed, not a constant"
    channels = weight.shape[1]
    reasons = [_constant_operand(node.inputs[1], channels, 1)]
    if len(node.inputs) > 2 and node.inputs[2].name:
        reasons.append(_constant_operand(node.inputs[2], channels, 0))
    return next((r for r in reasons if r), None)


class _Rewriter:
    def __init__(self, graph: gs.Graph, log: PassLog, points: Optional[set[str]]) -> None:
        self.graph, self.log, self.name, self.points = graph, log, Names(graph), points

    def _constant(self, tensor: gs.Tensor, fn: Callable[[np.ndarray], np.ndarray]) -> gs.Constant:
        """`fn` applied to a constant: in place when only one node reads it (the weight codes keep
        their name, which ``check`` reads), else as a new initializer."""
        values = fn(np.asarray(constant_value(tensor)))
        if isinstance(tensor, gs.Constant) and len(consumers(tensor)) == 1:
            tensor.values = values
            return tensor
        return gs.Constant(self.name(f"{tensor.name}_blocks"), values)

    def _operand(self, node: gs.Node, index: int, s: int, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Rewrite input `index` of the layer: a float constant, or DequantizeLinear of constant codes."""
        tensor = node.inputs[index]
        if constant_value(tensor) is not None:
            node.inputs[index] = self._constant(tensor, fn)
            return
        dq = producer(tensor)
        dq.inputs[0] = self._constant(dq.inputs[0], fn)
        for i in (1, 2):
            if len(dq.inputs) > i and dq.inputs[i].name:
                dq.inputs[i] = self._constant(dq.inputs[i], lambda v: _tile(v, s))
        if np.size(constant_value(dq.inputs[1])) > 1:
            dq.attrs["axis"] = 0

    def _point(self, tensor: gs.Tensor) -> gs.Tensor:
        """The quant point the layer's pointwise chain ends at: the first tensor named in `points`
        (the same one in a float graph and its QDQ graph), or where the single-reader chain ends."""
        while tensor not in self.graph.outputs and (self.points is None or tensor.name not in self.points):
            users = consumers(tensor)
            if len(users) != 1 or users[0].op not in POINTWISE_OPS or len(users[0].inputs) != 1:
                break
            tensor = users[0].outputs[0]
        return tensor

    def _quantization(self, point: gs.Tensor) -> list[gs.Node]:
        """[Clip ->] QuantizeLinear -> DequantizeLinear reading `point` with constant per-tensor qparams, or []."""
        for user in consumers(point):
            chain = [user]
            if user.op == "Clip" and len(consumers(user.outputs[0])) == 1:
                chain.append(consumers(user.outputs[0])[0])
            q = chain[-1]
            if q.op != "QuantizeLinear":
                continue
            dq = next((u for u in consumers(q.outputs[0]) if u.op == "DequantizeLinear"), None)
            scale = constant_value(q.inputs[1])
            if dq is None or scale is None:
                continue
            if scale.size > 1:
                self.log.note(f"{point.name!r} is quantized per channel: the Conv before its DepthToSpace runs in float")
                return []
            return chain + [dq]
        return []

    def rewrite(self, node: gs.Node) -> None:
        s = int(node.attrs["kernel_shape"][0])
        self._operand(node, 1, s, to_blocks)
        weight = node.inputs[1] if constant_value(node.inputs[1]) is not None else producer(node.inputs[1]).inputs[0]
        self.log.layouts[weight.name] = {"of": weight.name, "layout": CONV_TRANSPOSE_BLOCKS, "blocksize": s}
        if len(node.inputs) > 2 and node.inputs[2].name:
            self._operand(node, 2, s, lambda b: _tile(b, s))
        node.op = "Conv"
        node.attrs = {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1],
                      "group": 1}
        point = self._point(node.outputs[0])
        tensor = node.outputs[0]
        while tensor is not point:  # shapes recorded in the old layout are stale; inference fills them again
            tensor.shape = None
            tensor = consumers(tensor)[0].outputs[0]
        for operand in node.inputs[1:]:
            if isinstance(operand, gs.Variable):
                operand.shape = None
        made = producer(point)
        base = point.name.removesuffix("_prequant")  # a graph output's pre-quantization value (insert_qdq)
        blocks = gs.Variable(self.name(base + SUFFIX), dtype=point.dtype)
        self.log.layouts[blocks.name] = {"of": base, "layout": DEPTH_TO_SPACE, "blocksize": s}
        made.outputs[made.outputs.index(point)] = blocks
        value = blocks
        for original in self._quantization(point):  # T's own [Clip ->] Q -> DQ, in block layout
            out = original.outputs[0]
            suffix = out.name[len(point.name):] if out.name.startswith(point.name) else f"_{original.op}_Output"
            copy = gs.Variable(self.name(blocks.name + suffix), dtype=out.dtype)
            self.graph.nodes.append(gs.Node(original.op, self.name(f"{blocks.name}_{original.op}"), dict(original.attrs),
                                            [value, *original.inputs[1:]], [copy]))
            value = copy
        self.graph.nodes.append(gs.Node("DepthToSpace", self.name(f"{point.name}_DepthToSpace"),
                                        {"blocksize": s, "mode": "DCR"}, [value], [point]))
        self.log.count("ConvTranspose -> Conv + DepthToSpace")


def convtranspose_to_depth_to_space(graph: gs.Graph, log: Optional[PassLog] = None,
                                     points: Optional[set[str]] = None) -> gs.Graph:
    """Rewrite every ConvTranspose with kernel = stride (see the module docstring); leave the
    others, with a note saying why. `points`: the names of the activation quant points, so that a
    float graph and its QDQ graph are cut at the same tensor. Returns `graph`, changed in place and sorted."""
    log = log or PassLog()
    rewriter = _Rewriter(graph, log, points)
    for node in [n for n in graph.nodes if n.op == "ConvTranspose"]:
        reason = why_not(node)
        if reason is None:
            rewriter.rewrite(node)
            continue
        log.note(f"ConvTranspose {node.name!r} stays (not a Conv + DepthToSpace): {reason}")
    return graph.toposort()
