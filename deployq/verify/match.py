"""Pairing a QDQ model's quant points with the float model's tensors (for ``deployq diff``).

Matching is by name (docs/design.md, contract 1), not by suffix heuristics: a quant point is the
tensor a QuantizeLinear quantizes, and the float model has a tensor of the same name. That holds
for deployq's exports and for ``onnxruntime.quantization.quantize_static`` alike. BatchNorm that
the quantized model folded is folded in a copy of the float model (deployq's own fold pass)
before weights and conv outputs are compared; a fused activation is compared output to output.
Each quant point becomes the one record (:class:`~deployq.core.qparams.QuantPoint`) that
``qparams.json`` uses, read off the ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from deployq.core.qformula import dequantize_np, quantize_np
from deployq.core.qparams import QParamsError, QuantPoint
from deployq.core.runtime import ModelFileError
from deployq.exporters import fold_batchnorm_copy
from deployq.exporters.graph import (ACTIVATION_OPS, DATA_MOVEMENT_OPS, WEIGHT_LAYER_OPS, base_name, layout_view,
                                     narrowing_clip_bits, quantized_tensor)

__all__ = ["MatchedPoint", "Matching", "match", "match_inputs", "weight_value", "with_types"]


@dataclass
class MatchedPoint:
    """One quant point of the QDQ model (its :class:`~deployq.core.qparams.QuantPoint` record),
    paired with the float model's tensor of that name, and where it lives in the two graphs."""

    record: QuantPoint
    value: str = ""  # quant model: dequantized tensor (activations)
    codes: str = ""  # quant model: QuantizeLinear output (activations)
    source: str = ""  # quant model: the tensor QuantizeLinear reads
    inputs: tuple[str, ...] = ()  # nearest upstream quant points
    float_weight: Optional[np.ndarray] = None
    quant_weight: Optional[np.ndarray] = None
    # the MaxPool that alone reads the point in both models (its attributes): the row compares what
    # the pool outputs, since what it discards never reaches a reader (and deployq calibrates such
    # a point on the pool's output, clipping values the pool drops)
    pool: Optional[dict] = None

    name = property(lambda self: self.record.name)
    kind = property(lambda self: self.record.kind)
    op = property(lambda self: self.record.op)
    bits = property(lambda self: self.record.bits)
    signed = property(lambda self: self.record.signed)
    axis = property(lambda self: self.record.axis)
    qmin = property(lambda self: self.record.qmin)
    qmax = property(lambda self: self.record.qmax)
    layer = property(lambda self: self.record.layer, doc="node producing the layer output (activations) or reading the weight")
    scale = property(lambda self: self.record.scale_array)
    zero_point = property(lambda self: self.record.zero_point_array)


def _record(name: str, kind: str, op: str, bits: int, scale: np.ndarray, zp: np.ndarray, axis: Optional[int],
            layer: Optional[str]) -> QuantPoint:
    try:
        return QuantPoint(name, kind, bits, zp.dtype.kind == "i", axis=axis, op=op, layer=layer).with_qparams(scale, zp)
    except QParamsError as err:
        raise ModelFileError(f"{err} (the model is corrupt or was edited)") from None


@dataclass
class Matching:
    points: list[MatchedPoint]
    float_model: onnx.ModelProto  # BN folded, as the quant model saw it
    unmatched: list[str] = field(default_factory=list)

    @property
    def activations(self) -> list[MatchedPoint]:
        return [p for p in self.points if p.kind == "activation"]

    @property
    def weights(self) -> list[MatchedPoint]:
        return [p for p in self.points if p.kind == "weight"]


def _const(inits: dict[str, onnx.TensorProto], name: str) -> Optional[np.ndarray]:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with ONNX shape inference run: the local and kernel views cut graphs at tensors
    whose element type must be known, and models from other tools (``quantize_static``) often
    carry no value_info. A model shape inference cannot handle is returned as it is."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
        return model


def match(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> Matching:
    """Pair every QuantizeLinear of `quant_model` (and every quantized weight) with `float_model`."""
    qg = quant_model.graph
    inits = {i.name: i for i in qg.initializer}
    producers = {o: n for n in qg.node for o in n.output}
    quantized = {base_name(quantized_tensor(n, producers, inits)[0]) for n in qg.node if n.op_type == "QuantizeLinear"}
    folded = fold_batchnorm_copy(float_model, quantized)
    walk = _Walk(float_model, quant_model, inits, producers, _tensor_names(float_model) | _tensor_names(folded))
    for node in qg.node:  # topological order in a valid model
        if node.op_type == "QuantizeLinear":
            walk.visit(node)
    points = walk.points + _weights(quant_model, float_model, folded, inits, producers)
    if not points:
        raise ModelFileError("the models have no quant point in common: the second model has no "
                             "QuantizeLinear whose input tensor is named as a tensor of the first")
    if walk.unmatched and all(p.op == "input" for p in points if p.kind == "activation"):
        raise ModelFileError(f"the models share only their inputs: none of the {len(walk.unmatched)} quantized "
                             f"tensors inside the second model (e.g. {walk.unmatched[0]!r}) is named as a tensor of "
                             "the first; diff pairs tensors by name, so compare a quantized model with the float "
                             "model it came from")
    order = {p.name: i for i, p in enumerate(points)}
    points.sort(key=lambda p: order[p.name])
    return Matching(points, folded, walk.unmatched)


class _Walk:
    """The activation quant points of a QDQ graph, found one QuantizeLinear at a time in graph order."""

    def __init__(self, float_model: onnx.ModelProto, quant_model: onnx.ModelProto, inits: dict, producers: dict,
                 float_tensors: set[str]) -> None:
        self.inits, self.producers, self.float_tensors = inits, producers, float_tensors
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in quant_model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.float_readers: dict[str, list[onnx.NodeProto]] = {}
        for n in float_model.graph.node:
            for i in n.input:
                self.float_readers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in quant_model.graph.output}
        # tensors a pass wrote in another layout (its record, not its naming): {copy: the tensor it stands for}
        self.copies = layout_view(quant_model)[1]
        self.copy_of = {of: name for name, of in self.copies.items()}
        self.points: list[MatchedPoint] = []
        self.by_value: dict[str, MatchedPoint] = {}  # dequantized tensor -> its quant point
        self.by_name: dict[str, MatchedPoint] = {}
        self.unmatched: list[str] = []

    def visit(self, node: onnx.NodeProto) -> None:
        inits, producers, by_name = self.inits, self.producers, self.by_name
        source, clip = quantized_tensor(node, producers, inits)
        if source in inits:  # a float weight quantized at run time: a weight (_weights), not an activation
            return
        name = base_name(source)
        dq = next((c for c in self.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        scale, zp = _const(inits, node.input[1]), _const(inits, node.input[2]) if len(node.input) > 2 else None
        if dq is None or scale is None:
            return
        zp = zp if zp is not None else np.zeros((), np.uint8)
        _check_scale(scale, name, node.name)
        upstream = _upstream(source, producers, self.by_value)
        maker = producers.get(source)
        copy = self.copy_of.get(name)
        blocks = by_name.get(copy) if copy is not None and upstream == (copy,) else None
        if blocks is not None and maker.op_type == "DepthToSpace" and _same(blocks, scale, zp):
            # a ConvTranspose rewritten as Conv + DepthToSpace (a device profile): the layer's quant point
            # is this tensor, in the layout the float model has; the Conv's block-layout copy is not one
            self.points.remove(blocks)
            del by_name[blocks.name]
            upstream, layer, op = blocks.inputs, blocks.layer, "ConvTranspose"
        elif (maker is not None and maker.op_type in DATA_MOVEMENT_OPS and len(upstream) == 1
                and _same(by_name[upstream[0]], scale, zp)):
            self.by_value[dq.output[0]] = by_name[upstream[0]]  # carried through data movement, not a new point
            return
        else:
            layer, op = _layer_of(maker, producers), maker.op_type if maker else "input"
        # a block-layout copy stays a point until its DepthToSpace above takes its place, also where
        # the float model is the user's own file with the ConvTranspose itself
        if name not in self.float_tensors and self.copies.get(name) not in self.float_tensors:
            self.unmatched.append(name)
            return
        axis = next((a.i for a in node.attribute if a.name == "axis"), None) if scale.ndim else None
        bits = narrowing_clip_bits(clip, node, inits, producers) if clip else 8 * zp.dtype.itemsize
        point = MatchedPoint(_record(name, "activation", op, bits, scale, zp, axis, layer),
                             value=dq.output[0], codes=node.output[0], source=source, inputs=upstream)
        if name in self.graph_outputs and dq.output[0] != name:
            point.value = dq.output[0]
        point.pool = _only_max_pool(self.consumers.get(dq.output[0], []), self.float_readers.get(name, []))
        self.points.append(point)
        self.by_value[dq.output[0]] = point
        by_name[name] = point


def _check_scale(scale: np.ndarray, name: str, node: str) -> None:
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        bad = scale[~(np.isfinite(scale) & (scale > 0))].ravel()[:3].tolist()
        raise ModelFileError(f"quant point {name!r}: node {node!r} has scale {bad}; a scale must be positive "
                             "and finite (the model is corrupt or was edited)")


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        names.update(n.output)
    return names


def _same(point: MatchedPoint, scale: np.ndarray, zp: np.ndarray) -> bool:
    return (np.array_equal(point.scale.ravel(), scale.astype(np.float32).ravel())
            and np.array_equal(point.zero_point.ravel(), zp.astype(np.int64).ravel()))


def _upstream(tensor: str, producers: dict[str, onnx.NodeProto], by_value: dict[str, MatchedPoint]) -> tuple[str, ...]:
    """The quant points whose dequantized values feed `tensor` (nearest ones, walking back)."""
    found: list[str] = []
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in by_value:
            found.append(t)
            continue
        node = producers.get(t)
        if node is None or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue  # a graph input, or the quantization of a weight / bias
        stack.extend(i for i in node.input if i)
    return tuple(dict.fromkeys(by_value[t].name for t in found))


def _only_max_pool(quant_readers: list[onnx.NodeProto], float_readers: list[onnx.NodeProto]) -> Optional[dict]:
    """The attributes of the MaxPool that alone reads a tensor in both models, if one does."""
    if len(quant_readers) != 1 or len(float_readers) != 1 or quant_readers[0].op_type != "MaxPool":
        return None
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                  for n in (quant_readers[0], float_readers[0])]
    return attributes[0] if float_readers[0].op_type == "MaxPool" and attributes[0] == attributes[1] else None


def _layer_of(node: Optional[onnx.NodeProto], producers: dict[str, onnx.NodeProto]) -> Optional[str]:
    """The weight layer whose output (possibly through a fused activation) is this tensor."""
    if node is None:
        return None
    if node.op_type in WEIGHT_LAYER_OPS:
        return node.name or node.output[0]
    if node.op_type in ACTIVATION_OPS:
        before = producers.get(node.input[0])
        if before is not None and before.op_type in WEIGHT_LAYER_OPS:
            return before.name or before.output[0]
    return None


def _weights(quant_model: onnx.ModelProto, float_model: onnx.ModelProto, folded: onnx.ModelProto,
             inits: dict, producers: dict) -> list[MatchedPoint]:
    """Every layer whose weight input comes from DequantizeLinear of an initializer."""
    float_layers = {}
    for model in (float_model, folded):  # a layer in both (same name) is compared with folded weights
        f_inits = {i.name: i for i in model.graph.initializer}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        for n in model.graph.node:
            if n.op_type in WEIGHT_LAYER_OPS and len(n.input) > 1 and n.input[1] in f_inits:
                weight = numpy_helper.to_array(f_inits[n.input[1]])
                # known by its output, by its node name, and by the output of an activation right
                # after it (quantizers remove a Relu / Clip that the output range makes redundant)
                keys = [n.output[0], f"node:{n.name}"]
                after = readers.get(n.output[0], [])
                if len(after) == 1 and after[0].op_type in ACTIVATION_OPS:
                    keys.append(after[0].output[0])
                for key in keys:
                    float_layers[(n.op_type, key)] = weight
        moved, copies = layout_view(model)  # a ConvTranspose a pass wrote as Conv, for another tool's export
        for n in model.graph.node:
            if n.op_type in WEIGHT_LAYER_OPS and len(n.input) > 1 and n.input[1] in moved:
                float_layers[("ConvTranspose", copies.get(n.output[0], ""))] = moved[n.input[1]]
    points = []
    for node in quant_model.graph.node:
        if node.op_type not in WEIGHT_LAYER_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        scale = _const(inits, dq.input[1])
        zp = _const(inits, dq.input[2]) if len(dq.input) > 2 else None
        if scale is None:
            continue
        _check_scale(scale, dq.input[0], dq.name)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1 if scale.ndim and node.op_type == "ConvTranspose" else 0)
        axis = axis if scale.ndim else None
        codes = _weight_codes(dq, zp, axis, inits, producers)
        if codes is None:
            continue
        zp = zp if zp is not None else np.zeros((), codes.dtype)
        weight = dequantize_np(codes, scale, zp, axis)
        reference = float_layers.get((node.op_type, base_name(node.output[0])))
        if reference is None and node.name:
            reference = float_layers.get((node.op_type, f"node:{node.name}"))
        if reference is None or reference.shape != weight.shape:
            continue
        stored = dq.input[0] if dq.input[0] in inits else producers[dq.input[0]].input[0]
        name = stored[: -len("_quantized")] if stored.endswith("_quantized") else stored
        bits = 8 if codes.dtype.itemsize == 1 else _weight_bits(codes)
        record = _record(name, "weight", node.op_type, bits, np.asarray(scale), np.asarray(zp), axis,
                         node.name or node.output[0])
        points.append(MatchedPoint(record, float_weight=reference.astype(np.float32), quant_weight=weight))
    return points


def weight_value(tensor: str, inits: dict, producers: dict) -> Optional[np.ndarray]:
    """A layer's weight input as the float values it computes with: an initializer, or the
    DequantizeLinear of stored codes or of a QuantizeLinear over a float initializer; None else."""
    if tensor in inits:
        return _const(inits, tensor)
    dq = producers.get(tensor)
    scale = _const(inits, dq.input[1]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if scale is None:
        return None
    zp = _const(inits, dq.input[2]) if len(dq.input) > 2 else None
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if scale.ndim else None
    codes = _weight_codes(dq, zp, axis, inits, producers)
    return None if codes is None else dequantize_np(codes, scale, zp if zp is not None else np.zeros((), codes.dtype), axis)


def _weight_codes(dq: onnx.NodeProto, zp: Optional[np.ndarray], axis: Optional[int], inits: dict,
                  producers: dict) -> Optional[np.ndarray]:
    """A DequantizeLinear's weight codes: its stored initializer, or (AIMET's default export) the
    codes its QuantizeLinear makes of a float initializer at run time, computed as ONNX does."""
    if dq.input[0] in inits:
        return _const(inits, dq.input[0])
    q = producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits:
        return None
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    info = np.iinfo(dtype)
    codes = quantize_np(_const(inits, q.input[0]), _const(inits, q.input[1]),
                        zp if zp is not None else np.zeros((), dtype), info.min, info.max, axis)
    return codes.astype(dtype)


def _weight_bits(codes: np.ndarray) -> int:
    """Width of 16-bit-stored weight codes, read off the codes they use (10 for the 10-bit layers):
    signed b-bit codes span [-2^(b-1), 2^(b-1) - 1], unsigned ones [0, 2^b - 1]."""
    c = codes.astype(np.int64)
    if codes.dtype.kind == "i":
        reach = max(int(c.max(initial=0)), -int(c.min(initial=0)) - 1, 1)
        return max(9, min(16, reach.bit_length() + 1))
    return max(9, min(16, max(int(c.max(initial=1)), 1).bit_length()))


def match_inputs(quant_model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """{graph input: (lo, hi)} of the inputs quantized right away: the range their codes cover."""
    inits = {i.name: i for i in quant_model.graph.initializer}
    inputs = {i.name for i in quant_model.graph.input}
    producers = {o: n for n in quant_model.graph.node for o in n.output}
    ranges = {}
    for node in quant_model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source, clip = quantized_tensor(node, producers, inits)
        if source not in inputs or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if scale.ndim:
            continue
        if zp.dtype.itemsize == 1:
            qmin, qmax = (-128, 127) if zp.dtype.kind == "i" else (0, 255)
            ranges[source] = ((qmin - float(zp)) * float(scale), (qmax - float(zp)) * float(scale))
        elif clip is not None:
            lo, hi = _const(inits, clip.input[1]), _const(inits, clip.input[2])
            if lo is not None and hi is not None:
                ranges[source] = (float(lo), float(hi))
    return ranges
