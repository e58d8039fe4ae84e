"""Pairing by graph position, for a QDQ model whose tensors are not named as the float model's.

deployq's exports and ``quantize_static`` keep the float model's tensor names, and :mod:`.match`
pairs by name. Another tool's export of the same network often does not: AIMET's and the
TorchScript ONNX exporter's ``/conv1/Conv_output_0``, against deployq's module paths. Then:

1. the graphs' inputs and outputs pair by order;
2. each weight layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) pairs with the
   float layer whose weights are nearest to its dequantized ones: same shape, within
   :data:`MAX_WEIGHT_ERROR` (BatchNorm folded on both sides first; a float layer a rewrite pass
   wrote in another layout, deployq's ConvTranspose as Conv + DepthToSpace, taken back to the
   layout its record names, and paired at the tensor that holds its output in that layout); then
   the layers left over, with their weights' channels balanced (:func:`balanced`): a tool's
   cross-layer equalization rescales them;
3. every other op pairs forward from there: an op of the quantized model whose inputs are paired
   (through their Q -> DQ) pairs with the float model's op of the same type reading those inputs.

Where the quantized model dropped an activation because its quantizer clips the same values (a
ReLU before a quantizer whose zero point is the lowest code), its tensor pairs with the float
activation's output. The paired tensors are renamed in a copy of the quantized model, and
:mod:`.match` pairs by name as always; a tensor no rule reaches keeps its name and is reported as
unmatched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from deployq.exporters import fold_batchnorm_copy
from deployq.exporters.graph import PREQUANT_SUFFIXES, WEIGHT_LAYER_OPS, base_name, layout_view, quantized_tensor

from .match import weight_value

__all__ = ["MAX_WEIGHT_ERROR", "PositionPairing", "balanced", "names_differ", "pair_by_position"]

# ||w_quant - w_float|| / ||w_float|| of two layers taken for the same one: 8-bit weights are ~1 %
# off, 4-bit per-channel ~10 %; unrelated layers of one shape are ~140 % (independent weights)
MAX_WEIGHT_ERROR = 0.3


@dataclass
class PositionPairing:
    model: onnx.ModelProto  # the quantized model with the float model's names
    renamed: dict[str, str]  # quantized model's tensor -> float model's tensor
    layers: int  # weight layers aligned
    quant_layers: int  # weight layers of the quantized model

    def note(self) -> str:
        return (f"tensor names differ from the float model's: paired by graph position, {self.layers} of "
                f"{self.quant_layers} weight layers aligned by their weights")


def names_differ(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> bool:
    """True when fewer than half of the tensors `quant_model` quantizes (besides its inputs) are
    named as a tensor of `float_model`: it is not an export that kept the float model's names."""
    names = {t for n in float_model.graph.node for t in n.output}
    inits = {i.name: i for i in quant_model.graph.initializer}
    producers = {o: n for n in quant_model.graph.node for o in n.output}
    inputs = {i.name for i in quant_model.graph.input}
    quantized = {base_name(quantized_tensor(n, producers, inits)[0]) for n in quant_model.graph.node
                 if n.op_type == "QuantizeLinear"}
    quantized = {t for t in quantized if t not in inputs and t not in inits}
    return bool(quantized) and 2 * len(quantized & names) < len(quantized)


@dataclass
class _Layer:
    node: onnx.NodeProto
    weight: np.ndarray  # (out, in, ...) for every op: Gemm and MatMul weights transposed to it
    op: str  # the layer as the network has it (a ConvTranspose that a pass wrote as Conv: ConvTranspose)
    output: str  # the tensor that holds its output in the network's own layout


def _layers(model: onnx.ModelProto, undo_passes: bool = True) -> list[_Layer]:
    """The weight layers of `model`; where a pass recorded a layout change (exporters.graph's layout
    records), a second entry for the same node in the layout before the pass."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    moved, copies = layout_view(model) if undo_passes else ({}, {})
    layers = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_LAYER_OPS or len(node.input) < 2:
            continue
        if node.input[1] in moved:  # a ConvTranspose written as a 1x1 Conv + DepthToSpace: also as it was
            layers.append(_Layer(node, moved[node.input[1]], "ConvTranspose", copies.get(node.output[0], "")))
        weight = weight_value(node.input[1], inits, producers)
        if weight is None or weight.ndim < 2:
            continue
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attribute(node, "transB", 0)):
            weight = weight.T
        layers.append(_Layer(node, weight, node.op_type, node.output[0]))
    return layers


class _Graph:
    """Who makes and who reads each tensor of a graph, and what counts as a constant."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.known: dict[str, bool] = {}  # constant() of the tensors asked about
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)

    def constant(self, tensor: str) -> bool:
        """An initializer, a Constant's output, or what an op computes from constants alone (a PReLU
        slope that AIMET's export dequantizes and unsqueezes; the float graph holds it as one
        initializer). An op without inputs (RandomNormal) is not one."""
        if tensor not in self.known:
            node = self.producer.get(tensor)
            self.known[tensor] = tensor in self.inits or (node is not None and (node.op_type == "Constant" or (
                bool(node.input) and all(self.constant(t) for t in node.input if t))))
        return self.known[tensor]

    def value(self, tensor: str) -> str:
        """The tensor a dequantized value was quantized from (`tensor` itself if it is not one)."""
        dq = self.producer.get(tensor)
        q = self.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor

    def variable_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [self.value(t) for t in node.input if t and not self.constant(t)]

    def quantizer(self, tensor: str) -> Optional[onnx.NodeProto]:
        readers = self.readers.get(tensor, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == "QuantizeLinear" else None

    def absorbs_relu(self, tensor: str) -> bool:
        """True if `tensor` alone feeds a quantizer whose zero point is its type's lowest code: its
        range starts at 0, so it clips what a ReLU would."""
        q = self.quantizer(tensor)
        if q is None or len(q.input) < 3 or q.input[2] not in self.inits:
            return False
        zp = numpy_helper.to_array(self.inits[q.input[2]])
        return np.issubdtype(zp.dtype, np.integer) and bool(np.all(zp == np.iinfo(zp.dtype).min))


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _comparable(q: _Layer, f: _Layer) -> bool:
    """Two layers of one kind (Gemm and MatMul alike) and one weight shape."""
    return (q.op == f.op or {q.op, f.op} <= {"Gemm", "MatMul"}) and q.weight.shape == f.weight.shape


def _weight_error(q: _Layer, f: _Layer) -> float:
    """||w_q - w_f|| / ||w_f|| of two :func:`_comparable` layers."""
    norm = np.linalg.norm(f.weight)
    return float(np.linalg.norm(q.weight - f.weight) / norm) if norm > 0 else np.inf


def balanced(weight: np.ndarray, rounds: int = 30) -> np.ndarray:
    """`weight` (out, in, ...) with every output channel and every input channel scaled to the same
    norm (alternating, as Sinkhorn balances a matrix), then to a norm of 1: the same array for
    diag(a)·W·diag(b) with any positive a and b. Cross-layer equalization (AIMET's CLE, deployq's
    `--ptq cle`) rescales channels so; the balanced forms of the two still agree."""
    w = weight.reshape(weight.shape[0], weight.shape[1], -1).astype(np.float64)
    for _ in range(rounds):
        rows = np.sqrt((w * w).sum(axis=(1, 2), keepdims=True))
        w = w / np.where(rows > 0, rows, 1.0)
        cols = np.sqrt((w * w).sum(axis=(0, 2), keepdims=True))
        w = w / np.where(cols > 0, cols, 1.0)
    norm = np.linalg.norm(w)
    return w / norm if norm > 0 else w


def _align(quant: list[_Layer], floating: list[_Layer]) -> list[tuple[_Layer, _Layer]]:
    """Each quantized layer, in graph order, with the float layer not yet taken whose weights are
    nearest to its own, if within :data:`MAX_WEIGHT_ERROR`. Weights, not order, decide: two
    exporters may visit parallel branches in different orders. Layers left over are then compared
    by their :func:`balanced` weights, which a tool's channel rescaling (CLE) leaves as they were."""
    matched: dict[int, _Layer] = {}  # id of a quantized layer -> its float layer
    taken: set[int] = set()  # a float node is taken once, in whichever of its layouts it paired
    forms: dict[int, np.ndarray] = {}  # balanced weights, each computed once

    def balanced_error(q: _Layer, f: _Layer) -> float:
        for layer in (q, f):
            if id(layer) not in forms:
                forms[id(layer)] = balanced(layer.weight)
        return float(np.linalg.norm(forms[id(q)] - forms[id(f)]))

    for measure in (_weight_error, balanced_error):
        for q in quant:
            if id(q) in matched:
                continue
            errors = [(measure(q, f) if _comparable(q, f) else np.inf, j)
                      for j, f in enumerate(floating) if id(f.node) not in taken]
            error, j = min(errors, default=(np.inf, -1))
            if error <= MAX_WEIGHT_ERROR:
                matched[id(q)] = floating[j]
                taken.add(id(floating[j].node))
    return [(q, matched[id(q)]) for q in quant if id(q) in matched]


def pair_by_position(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> PositionPairing:
    """`quant_model` with its tensors renamed to `float_model`'s where the module docstring pairs them."""
    ours, theirs = _Graph(quant_model), _Graph(float_model)
    renamed: dict[str, str] = {}
    for mine, other in ((quant_model.graph.input, float_model.graph.input),
                        (quant_model.graph.output, float_model.graph.output)):
        if len(mine) == len(other):
            renamed.update({a.name: b.name for a, b in zip(mine, other) if a.name != b.name})
    graph_names = set(renamed.values())

    def pair(tensor: str, target: str) -> None:
        after = theirs.readers.get(target, [])
        if (len(after) == 1 and after[0].op_type == "Relu" and ours.absorbs_relu(tensor)
                and not any(r.op_type == "Relu" for r in ours.readers.get(tensor, []))):
            target = after[0].output[0]  # the tool dropped the ReLU its quantizer clips anyway
        # a quantized graph output is its DequantizeLinear's; the value before it takes the suffix
        # that exporters give it (and match reads back)
        renamed.setdefault(tensor, target + PREQUANT_SUFFIXES[0] if target in graph_names else target)

    quant = _layers(quant_model, undo_passes=False)  # one entry per layer: the counts are the user's
    pairs = _align(quant, _layers(fold_batchnorm_copy(float_model)))
    aligned = {id(q.node): f for q, f in pairs}
    layers = {id(q.node) for q in quant}
    for node in quant_model.graph.node:  # graph order: an op's inputs are paired before it
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.output[0] in renamed:
            continue
        if id(node) in layers:  # a weight layer pairs by its weights only, never by where it is
            if id(node) in aligned and aligned[id(node)].output in theirs.producer:
                pair(node.output[0], aligned[id(node)].output)
                _name_weight(node, aligned[id(node)].node.input[1], ours, renamed)
            continue
        inputs = [renamed.get(t, t) for t in ours.variable_inputs(node)]
        if not inputs or any(t not in theirs.readers for t in inputs):
            continue
        same = [n for n in theirs.readers[inputs[0]] if n.op_type == node.op_type and len(n.output) == len(node.output)
                and sorted(theirs.variable_inputs(n)) == sorted(inputs)]
        if len(same) == 1:
            for mine, other in zip(node.output, same[0].output):
                pair(mine, other)
    return PositionPairing(_renamed(quant_model, renamed), renamed, len(pairs), len(quant))


def _name_weight(layer: onnx.NodeProto, name: str, ours: _Graph, renamed: dict[str, str]) -> None:
    """Name the quantized layer's stored weight as the float model names it (the weight's diff
    row): its codes, or the float weight its QuantizeLinear quantizes at run time."""
    dq = ours.producer.get(layer.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return
    if dq.input[0] in ours.inits:
        renamed[dq.input[0]] = name + "_quantized"
        return
    q = ours.producer.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in ours.inits:
        renamed[q.input[0]] = name


def _renamed(model: onnx.ModelProto, renamed: dict[str, str]) -> onnx.ModelProto:
    """A copy of `model` with tensors renamed; a tensor already holding a target name moves aside."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.initializer}
    targets = set(renamed.values())
    mapping = dict(renamed)
    for name in taken & targets:
        if name not in mapping:
            mapping[name] = _free(f"{name}_theirs", taken | targets)
    g = model.graph
    for node in g.node:
        node.input[:] = [mapping.get(t, t) for t in node.input]
        node.output[:] = [mapping.get(t, t) for t in node.output]
    for item in (*g.input, *g.output, *g.value_info, *g.initializer):
        item.name = mapping.get(item.name, item.name)
    return model


def _free(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    return name
