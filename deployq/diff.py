"""Layer-by-layer comparison of a float ONNX model and its QDQ model (``deployq diff``).

Matching is by name (docs/design.md, contract 1), not by suffix heuristics: a quant point is the tensor a
QuantizeLinear quantizes, and the float model has a tensor of the same name. That holds for
deployq's exports and for ``onnxruntime.quantization.quantize_static`` alike. BatchNorm that the
quantized model folded is folded in a copy of the float model (deployq's own fold pass) before
weights and conv outputs are compared; a fused activation is compared output to output.

Modes:
    accumulated  both whole models; each layer's error includes what flowed in from above
    local        every layer reads the *float* model's values, so each quant point shows its own
                 layer's error only (quantized weights + output rounding)
    sensitivity  only one quant point (and the weights of the layer producing it) quantized,
                 everything else float; the model output's error, ranked
    kernel       real integer-kernel error: for each quant point, the sub-model from the codes
                 feeding it to its own codes runs fully optimized (fused integer kernels) on the
                 reference view's codes; never extra outputs on an optimized graph, which would
                 break fusion

Metrics stream batch by batch (sums, not tensors): SQNR = 10·log10(Σx² / Σ(x − x̂)²) in dB,
cosine similarity, MSE, max |error|, and for quantized tensors the error in LSB units: the
distance between the quant model's code and the code of the float value (0 = exact rounding).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from deployq.exporters.depth_to_space import SUFFIX as BLOCKS_SUFFIX
from deployq.exporters.fold_bn import fold_batchnorm_pass
from deployq.exporters.graph import WEIGHT_LAYER_OPS, to_model
from deployq.exporters.insert_qdq import DATA_MOVEMENT_OPS
from deployq.progress import progress_bar
from deployq.qformula import dequantize_np, onnx_integer_dtype, qrange, quantize_np
from deployq.sim import (ModelFileError, base_name, cpu_isa, isa_text, narrowing_clip_bits, quantized_tensor,
                         run, session)

MODES = ("accumulated", "local", "sensitivity", "kernel")
LAYER_OPS = WEIGHT_LAYER_OPS
ACTIVATION_OPS = ("Relu", "LeakyRelu", "Clip")
LSB_BINS = ("0", "1", ">1")
SAMPLE = 4096  # float values kept per quant point for the report's value histogram
# ----------------------------------------------------------------------------------- matching


@dataclass
class QPoint:
    """One quantized tensor of the QDQ model, paired with the float model's tensor of that name."""

    name: str
    kind: str  # "activation" | "weight"
    op: str
    bits: int
    signed: bool
    scale: np.ndarray
    zero_point: np.ndarray
    axis: Optional[int]
    value: str = ""  # quant model: dequantized tensor (activations)
    codes: str = ""  # quant model: QuantizeLinear output (activations)
    source: str = ""  # quant model: the tensor QuantizeLinear reads
    inputs: tuple[str, ...] = ()  # nearest upstream quant points
    layer: Optional[str] = None  # node producing this activation's layer output, if a weight layer
    float_weight: Optional[np.ndarray] = None
    quant_weight: Optional[np.ndarray] = None

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]


@dataclass
class Matching:
    points: list[QPoint]
    float_model: onnx.ModelProto  # BN folded, as the quant model saw it
    unmatched: list[str] = field(default_factory=list)

    @property
    def activations(self) -> list[QPoint]:
        return [p for p in self.points if p.kind == "activation"]

    @property
    def weights(self) -> list[QPoint]:
        return [p for p in self.points if p.kind == "weight"]


def _const(inits: dict[str, onnx.TensorProto], name: str) -> Optional[np.ndarray]:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _fold_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = fold_batchnorm_pass(gs.import_onnx(model))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    return to_model(graph, opset)


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
    folded = _fold_copy(float_model)
    float_tensors = _tensor_names(float_model) | _tensor_names(folded)
    qg = quant_model.graph
    inits = {i.name: i for i in qg.initializer}
    producers = {o: n for n in qg.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in qg.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in qg.output}
    points: list[QPoint] = []
    by_value: dict[str, QPoint] = {}  # dequantized tensor -> its quant point
    by_name: dict[str, QPoint] = {}
    unmatched = []
    for node in qg.node:  # topological order in a valid model
        if node.op_type != "QuantizeLinear":
            continue
        source, clip = quantized_tensor(node, producers, inits)
        name = base_name(source)
        dq = next((c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        scale, zp = _const(inits, node.input[1]), _const(inits, node.input[2]) if len(node.input) > 2 else None
        if dq is None or scale is None:
            continue
        zp = zp if zp is not None else np.zeros((), np.uint8)
        _check_scale(scale, name, node.name)
        upstream = _upstream(source, producers, by_value)
        maker = producers.get(source)
        blocks = by_name.get(name + BLOCKS_SUFFIX) if upstream == (name + BLOCKS_SUFFIX,) else None
        if blocks is not None and maker.op_type == "DepthToSpace" and _same(blocks, scale, zp):
            # a ConvTranspose rewritten as Conv + DepthToSpace (a device profile): the layer's quant point
            # is this tensor, in the layout the float model has; the Conv's block-layout copy is not one
            points.remove(blocks)
            del by_name[blocks.name]
            upstream, layer, op = blocks.inputs, blocks.layer, "ConvTranspose"
        elif (maker is not None and maker.op_type in DATA_MOVEMENT_OPS and len(upstream) == 1
                and _same(by_name[upstream[0]], scale, zp)):
            by_value[dq.output[0]] = by_name[upstream[0]]  # carried through data movement, not a new point
            continue
        else:
            layer, op = _layer_of(maker, producers), maker.op_type if maker else "input"
        if name not in float_tensors:
            unmatched.append(name)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None) if scale.ndim else None
        point = QPoint(name, "activation", op,
                       narrowing_clip_bits(clip, node, inits, producers) if clip else 8 * zp.dtype.itemsize,
                       zp.dtype.kind == "i", scale.astype(np.float32),
                       zp.astype(np.int64), axis, value=dq.output[0], codes=node.output[0], source=source,
                       inputs=upstream, layer=layer)
        if name in graph_outputs and dq.output[0] != name:
            point.value = dq.output[0]
        points.append(point)
        by_value[dq.output[0]] = point
        by_name[name] = point
    points.extend(_weights(quant_model, float_model, folded, inits, producers))
    if not points:
        raise ModelFileError("the models have no quant point in common: the second model has no "
                             "QuantizeLinear whose input tensor is named as a tensor of the first")
    if unmatched and all(p.op == "input" for p in points if p.kind == "activation"):
        raise ModelFileError(f"the models share only their inputs: none of the {len(unmatched)} quantized tensors "
                             f"inside the second model (e.g. {unmatched[0]!r}) is named as a tensor of the first; "
                             "diff pairs tensors by name, so compare a quantized model with the float model it came from")
    order = {p.name: i for i, p in enumerate(points)}
    points.sort(key=lambda p: order[p.name])
    return Matching(points, folded, unmatched)


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


def _same(point: QPoint, scale: np.ndarray, zp: np.ndarray) -> bool:
    return np.array_equal(point.scale, scale.astype(np.float32)) and np.array_equal(point.zero_point, zp.astype(np.int64))


def _upstream(tensor: str, producers: dict[str, onnx.NodeProto], by_value: dict[str, QPoint]) -> tuple[str, ...]:
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


def _layer_of(node: Optional[onnx.NodeProto], producers: dict[str, onnx.NodeProto]) -> Optional[str]:
    """The weight layer whose output (possibly through a fused activation) is this tensor."""
    if node is None:
        return None
    if node.op_type in LAYER_OPS:
        return node.name or node.output[0]
    if node.op_type in ACTIVATION_OPS:
        before = producers.get(node.input[0])
        if before is not None and before.op_type in LAYER_OPS:
            return before.name or before.output[0]
    return None


def _weights(quant_model: onnx.ModelProto, float_model: onnx.ModelProto, folded: onnx.ModelProto,
             inits: dict, producers: dict) -> list[QPoint]:
    """Every layer whose weight input comes from DequantizeLinear of an initializer."""
    float_layers = {}
    for model in (float_model, folded):  # a layer in both (same name) is compared with folded weights
        f_inits = {i.name: i for i in model.graph.initializer}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        for n in model.graph.node:
            if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in f_inits:
                weight = numpy_helper.to_array(f_inits[n.input[1]])
                # known by its output, by its node name, and by the output of an activation right
                # after it (quantizers remove a Relu / Clip that the output range makes redundant)
                keys = [n.output[0], f"node:{n.name}"]
                after = readers.get(n.output[0], [])
                if len(after) == 1 and after[0].op_type in ACTIVATION_OPS:
                    keys.append(after[0].output[0])
                for key in keys:
                    float_layers[(n.op_type, key)] = weight
    points = []
    for node in quant_model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        codes = _const(inits, dq.input[0])
        scale = _const(inits, dq.input[1])
        zp = _const(inits, dq.input[2]) if len(dq.input) > 2 else np.zeros_like(codes.reshape(-1)[:1]).reshape(())
        _check_scale(scale, dq.input[0], dq.name)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1 if scale.ndim and node.op_type == "ConvTranspose" else 0)
        axis = axis if scale.ndim else None
        weight = dequantize_np(codes, scale, zp, axis)
        reference = float_layers.get((node.op_type, base_name(node.output[0])))
        if reference is None and node.name:
            reference = float_layers.get((node.op_type, f"node:{node.name}"))
        if reference is None or reference.shape != weight.shape:
            continue
        name = dq.input[0][: -len("_quantized")] if dq.input[0].endswith("_quantized") else dq.input[0]
        bits = 8 if codes.dtype.itemsize == 1 else _weight_bits(codes)
        points.append(QPoint(name, "weight", node.op_type, bits, codes.dtype.kind == "i", np.asarray(scale, np.float32),
                             np.asarray(zp, np.int64), axis, layer=node.name or node.output[0],
                             float_weight=reference.astype(np.float32), quant_weight=weight))
    return points


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


# -------------------------------------------------------------------------------------- metrics


@dataclass
class Stats:
    """Streaming error statistics of a quantized tensor against its float reference."""

    n: int = 0
    ref_sq: float = 0.0
    err_sq: float = 0.0
    dot: float = 0.0
    quant_sq: float = 0.0
    max_err: float = 0.0
    lsb: list[int] = field(default_factory=lambda: [0, 0, 0])
    sample: Optional[np.ndarray] = None  # a quant point's float values (evenly spaced, up to SAMPLE) for its histogram
    example: Optional[tuple[np.ndarray, np.ndarray]] = None  # a model output: (float, quantized) of the first item

    def _keep(self, ref: np.ndarray, quant: np.ndarray, point: Optional[QPoint]) -> None:
        if point is None:
            if self.example is None and ref.ndim >= 1 and len(ref):
                self.example = (np.array(ref[0], np.float32), np.array(quant[0], np.float32))
            return
        have = 0 if self.sample is None else self.sample.size
        if have < SAMPLE and ref.size:
            flat = ref.ravel()
            taken = flat[::max(1, flat.size // SAMPLE)][:SAMPLE - have].astype(np.float32)
            self.sample = taken if self.sample is None else np.concatenate([self.sample, taken])

    def add(self, ref: np.ndarray, quant: np.ndarray, point: Optional[QPoint] = None,
            codes: Optional[np.ndarray] = None) -> None:
        if ref.shape != quant.shape:
            raise ModelFileError(f"{point.name if point else 'tensor'}: float shape {ref.shape} vs quantized {quant.shape}")
        self._keep(ref, quant, point)
        r, q = ref.astype(np.float64).ravel(), quant.astype(np.float64).ravel()
        e = r - q
        self.n += r.size
        self.ref_sq += float(r @ r)
        self.err_sq += float(e @ e)
        self.dot += float(r @ q)
        self.quant_sq += float(q @ q)
        self.max_err = max(self.max_err, float(np.abs(e).max(initial=0.0)))
        if point is not None:
            self.add_lsb(ref, point, codes if codes is not None else quant, codes is not None)

    def add_lsb(self, ref: np.ndarray, point: QPoint, quant: np.ndarray, are_codes: bool) -> None:
        """Distance, in codes, between the quantized tensor and the float value's own code."""
        axis = point.axis
        want = quantize_np(ref, point.scale, point.zero_point, point.qmin, point.qmax, axis)
        have = quant.astype(np.int64) if are_codes else quantize_np(quant, point.scale, point.zero_point, point.qmin, point.qmax, axis)
        d = np.abs(want - have)
        self.lsb[0] += int((d == 0).sum())
        self.lsb[1] += int((d == 1).sum())
        self.lsb[2] += int((d > 1).sum())

    @staticmethod
    def _ratio_db(signal: float, noise: float) -> float:
        if noise == 0:
            return math.inf
        if signal == 0:
            return -math.inf
        return 10 * math.log10(signal / noise)

    @property
    def sqnr_db(self) -> float:
        return self._ratio_db(self.ref_sq, self.err_sq)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref_sq * self.quant_sq)
        return self.dot / denom if denom else (1.0 if self.err_sq == 0 else 0.0)

    @property
    def mse(self) -> float:
        return self.err_sq / self.n if self.n else 0.0

    def to_json(self) -> dict:
        lsb_total = sum(self.lsb)
        return {"elements": self.n, "sqnr_db": _finite(self.sqnr_db), "cosine": self.cosine, "mse": self.mse,
                "max_abs_err": self.max_err,
                "lsb_histogram": dict(zip(LSB_BINS, self.lsb)) if lsb_total else None}


def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else (None if math.isnan(v) else (1e9 if v > 0 else -1e9))


@dataclass
class Row:
    point: QPoint
    stats: Stats
    jump: bool = False
    drop_db: Optional[float] = None

    def to_json(self) -> dict:
        p = self.point
        return {"name": p.name, "kind": p.kind, "op": p.op, "bits": p.bits, "signed": p.signed,
                "inputs": list(p.inputs), "jump": self.jump, "drop_db": self.drop_db, **self.stats.to_json()}


@dataclass
class DiffReport:
    mode: str
    rows: list[Row]
    outputs: dict[str, Stats]
    batches: int
    seconds: float
    isa: dict
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    jump_db: float = 6.0
    title: str = "deployq diff"

    def worst(self, k: int = 5) -> list[Row]:
        """The `k` weakest activation quant points (lowest SQNR; most sensitive in sensitivity mode)."""
        return self.ranking()[:k]

    def to_html(self, fail_below: Optional[float] = None) -> str:
        """The report as one self-contained HTML page (what ``deployq diff --html`` writes)."""
        from deployq.report import to_html

        return to_html(self, self.title, fail_below)

    def ranking(self) -> list[Row]:
        """Activation rows, worst first (lowest SQNR)."""
        rows = [r for r in self.rows if r.point.kind == "activation"]
        return sorted(rows, key=lambda r: r.stats.sqnr_db)

    @property
    def first_jump(self) -> Optional[Row]:
        return next((r for r in self.rows if r.jump), None)

    @property
    def gate_sqnr(self) -> float:
        """What --fail-below tests: the model output's SQNR (accumulated, local), or the worst
        quant point's (sensitivity: output SQNR with that point alone quantized; kernel)."""
        if self.outputs:
            return min(s.sqnr_db for s in self.outputs.values())
        ranked = self.ranking()
        return ranked[0].stats.sqnr_db if ranked else math.inf

    def passed(self, fail_below: Optional[float]) -> bool:
        return fail_below is None or self.gate_sqnr >= fail_below

    def verdict(self, fail_below: Optional[float] = None) -> str:
        parts = [self.mode]
        if self.outputs:
            parts.append(f"output SQNR {self.gate_sqnr:.1f} dB, cosine {min(s.cosine for s in self.outputs.values()):.5f}")
        if self.mode == "kernel":
            lsb = [sum(r.stats.lsb[i] for r in self.rows) for i in range(3)]
            total = max(1, sum(lsb))
            parts.append(f"integer kernels vs reference: {100 * lsb[0] / total:.3f}% equal codes, "
                         f"{100 * lsb[2] / total:.3f}% off by more than 1 LSB")
        ranked = self.ranking()
        if ranked:
            worst = ranked[0]
            label = "most sensitive" if self.mode == "sensitivity" else "weakest"
            parts.append(f"{label} {worst.point.name} ({worst.stats.sqnr_db:.1f} dB)")
        if self.first_jump is not None:
            parts.append(f"error jumps at {self.first_jump.point.name} (-{self.first_jump.drop_db:.1f} dB)")
        if fail_below is not None:
            parts.append(("PASS" if self.passed(fail_below) else "FAIL") + f" (--fail-below {fail_below:g} dB)")
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {"mode": self.mode, "batches": self.batches, "seconds": self.seconds, "cpu": self.isa,
                "gate_sqnr_db": _finite(self.gate_sqnr),
                "outputs": {k: v.to_json() for k, v in self.outputs.items()},
                "first_jump": self.first_jump.point.name if self.first_jump else None,
                "ranking": [r.point.name for r in self.ranking()],
                "rows": [r.to_json() for r in self.rows], "unmatched": self.unmatched, "warnings": self.warnings}


def _mark_jumps(rows: list[Row], jump_db: float) -> None:
    by_name = {r.point.name: r for r in rows}
    for row in rows:  # measured from quantized layers on: a model input is near-lossless, so the
        # first layer after it would always look like a jump
        upstream = [by_name[n].stats.sqnr_db for n in row.point.inputs if n in by_name and by_name[n].point.op != "input"]
        if not upstream or not math.isfinite(row.stats.sqnr_db):
            continue
        best = min(upstream)
        if math.isfinite(best):
            row.drop_db = best - row.stats.sqnr_db
            row.jump = row.drop_db >= jump_db
    first = next((r for r in rows if r.jump), None)
    for r in rows:
        r.jump = r is first


# -------------------------------------------------------------------------------------- modes


def _output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _weight_rows(matching: Matching) -> list[Row]:
    rows = []
    for p in matching.weights:
        s = Stats()
        s.add(p.float_weight, p.quant_weight, p)
        rows.append(Row(p, s))
    return rows


def _accumulated(matching: Matching, float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                 batches: list[dict], progress: bool) -> tuple[dict[str, Stats], dict[str, Stats]]:
    acts = matching.activations
    f_sess = session(float_model, optimize=False, extra_outputs=[p.name for p in acts])
    q_sess = session(quant_model, optimize=False,
                     extra_outputs=[p.value for p in acts] + [p.codes for p in acts])
    stats = {p.name: Stats() for p in acts}
    outputs = {name: Stats() for name in _output_names(quant_model)}
    for feeds in progress_bar(batches, "diff", enabled=progress):
        f, q = run(f_sess, feeds), run(q_sess, feeds)
        for p in acts:
            stats[p.name].add(f[p.name], q[p.value], p, q[p.codes])
        for name in outputs:
            outputs[name].add(f[name], q[name])
    return stats, outputs


def local_model(quant_model: onnx.ModelProto, points: list[QPoint]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of the QDQ model in which every layer reads the *float* model's values.

    The consumers of each quant point's DequantizeLinear read a new graph input instead (fed with
    the float model's tensor of that name), and Q/DQ pairs carried through data-movement ops are
    bypassed, so each quant point's own QuantizeLinear sees its layer computed from float inputs
    with quantized weights: the error it shows is that layer's own (weights + output rounding).

    Returns the model and {quant point: name of the graph input that carries its float value}.
    """
    graph = gs.import_onnx(quant_model)
    tensors = graph.tensors()
    input_names = {i.name for i in graph.inputs}
    own = {p.value for p in points}
    feeds = {}
    for p in points:  # the values compared stay reachable once their consumers read float inputs
        for name in (p.value, p.codes):
            if tensors[name] not in graph.outputs:
                graph.outputs.append(tensors[name])
    for p in points:
        if p.source in input_names:
            continue
        x = gs.Variable(f"{p.name}__float", dtype=np.float32)
        graph.inputs.append(x)
        feeds[p.name] = x.name
        value = tensors[p.value]
        for consumer in list(value.outputs):
            consumer.inputs = [x if t is value else t for t in consumer.inputs]
    for node in list(graph.nodes):  # carried Q/DQ pairs: bypass
        if node.op != "DequantizeLinear" or node.outputs[0].name in own or not node.inputs[0].inputs:
            continue
        q = node.inputs[0].inputs[0]
        if q.op != "QuantizeLinear":
            continue
        for consumer in list(node.outputs[0].outputs):
            consumer.inputs = [q.inputs[0] if t is node.outputs[0] else t for t in consumer.inputs]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    opset = next((o.version for o in quant_model.opset_import if o.domain in ("", "ai.onnx")), 21)
    return to_model(graph, opset), feeds


def _local(matching: Matching, float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
           batches: list[dict], progress: bool) -> tuple[dict[str, Stats], dict[str, Stats]]:
    acts = matching.activations
    model, feeds_of = local_model(quant_model, acts)
    f_sess = session(float_model, optimize=False, extra_outputs=[p.name for p in acts])
    l_sess = session(model, optimize=False, extra_outputs=[p.value for p in acts] + [p.codes for p in acts])
    stats = {p.name: Stats() for p in acts}
    outputs = {name: Stats() for name in _output_names(quant_model)}
    for feeds in progress_bar(batches, "diff (local)", enabled=progress):
        f = run(f_sess, feeds)
        local_feeds = dict(feeds)
        local_feeds.update({feeds_of[p.name]: f[p.name] for p in acts if p.name in feeds_of})
        q = run(l_sess, local_feeds)
        for p in acts:
            stats[p.name].add(f[p.name], q[p.value], p, q[p.codes])
        for name in outputs:
            outputs[name].add(f[name], q[name])
    return stats, outputs


SENSITIVITY_MASK = "deployq_sensitivity_mask"


def sensitivity_model(float_folded: onnx.ModelProto, points: list[QPoint],
                      weights_by_layer: dict[Optional[str], QPoint]) -> onnx.ModelProto:
    """The float model with every quant point's quantization switchable: one session, one run per
    point (sensitivity mode).

    At quant point i the tensor x becomes ``Where(mask[i], DQ(Q(x)), x)`` (a Clip first for codes
    narrower than their storage type), and the weight of the layer producing it
    ``Where(mask[i], W_q, W)``; the boolean graph input ``deployq_sensitivity_mask`` (one flag per
    point, in order) picks which are quantized. Where selects exactly, so a run with one flag set
    computes what the float model with only that point quantized computes."""
    graph = gs.import_onnx(float_folded)
    tensors = graph.tensors()
    mask = gs.Variable(SENSITIVITY_MASK, dtype=np.bool_, shape=[len(points)])
    graph.inputs.append(mask)
    layers = {}
    for node in graph.nodes:
        if node.op in LAYER_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            layers[node.name] = layers[node.outputs[0].name] = node

    def flag(i: int, p: QPoint) -> gs.Variable:
        out = gs.Variable(f"{p.name}__flag", dtype=np.bool_, shape=[])
        graph.nodes.append(gs.Node("Gather", f"{p.name}__Gather", {"axis": 0},
                                   [mask, gs.Constant(f"{p.name}__index", np.array(i, np.int64))], [out]))
        return out

    for i, p in enumerate(points):
        x = tensors[p.name]
        consumers = list(x.outputs)
        on = flag(i, p)
        value = gs.Variable(f"{p.name}__value", dtype=np.float32)
        quantized = gs.Graph(name=f"{p.name}__quantized", outputs=[], opset=graph.opset)
        quantized.outputs = [_fake_quant_nodes(quantized, x, p)]
        unchanged = gs.Graph(name=f"{p.name}__float", opset=graph.opset)
        same = gs.Variable(f"{p.name}__same", dtype=np.float32)
        unchanged.nodes.append(gs.Node("Identity", f"{p.name}__Identity", {}, [x], [same]))
        unchanged.outputs = [same]
        graph.nodes.append(gs.Node("If", f"{p.name}__If", {"then_branch": quantized, "else_branch": unchanged},
                                   [on], [value]))
        for c in consumers:
            c.inputs = [value if t is x else t for t in c.inputs]
        if x in graph.outputs:
            graph.outputs = [value if t is x else t for t in graph.outputs]
            x.name, value.name = f"{p.name}__float", p.name
        weight = weights_by_layer.get(p.layer)
        layer = layers.get(weight.layer) if weight is not None else None
        if layer is not None and layer.inputs[1].values.shape == weight.quant_weight.shape:
            w = gs.Variable(f"{weight.name}__switched", dtype=np.float32)
            graph.nodes.append(gs.Node("Where", f"{weight.name}__Where", {},
                                       [on, gs.Constant(f"{weight.name}__dequantized", weight.quant_weight.astype(np.float32)),
                                        layer.inputs[1]], [w]))
            layer.inputs[1] = w
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    opset = next((o.version for o in float_folded.opset_import if o.domain in ("", "ai.onnx")), 21)
    return to_model(graph, opset)


def _fake_quant_nodes(graph: gs.Graph, x: gs.Tensor, point: QPoint) -> gs.Variable:
    """(Clip ->) QuantizeLinear -> DequantizeLinear of `x` with `point`'s qparams; the DQ output."""
    axis = {"axis": point.axis} if point.axis is not None else {}
    dtype = onnx_integer_dtype(point.bits, point.signed)
    scale = gs.Constant(f"{point.name}__scale", point.scale)
    zp = gs.Constant(f"{point.name}__zp", point.zero_point.astype(dtype))
    source = x
    if point.bits not in (8, 16) and point.axis is None:
        lo = np.asarray((point.qmin - point.zero_point.astype(np.float32)) * point.scale, np.float32)
        hi = np.asarray((point.qmax - point.zero_point.astype(np.float32)) * point.scale, np.float32)
        source = gs.Variable(f"{point.name}__clip", dtype=np.float32)
        graph.nodes.append(gs.Node("Clip", f"{point.name}__Clip", {}, [x, gs.Constant(f"{point.name}__lo", lo),
                                                                       gs.Constant(f"{point.name}__hi", hi)], [source]))
    codes = gs.Variable(f"{point.name}__codes", dtype=dtype)
    value = gs.Variable(f"{point.name}__dq", dtype=np.float32)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{point.name}__Q", axis, [source, scale, zp], [codes]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{point.name}__DQ", axis, [codes, scale, zp], [value]))
    return value


def _sensitivity(matching: Matching, points: list[QPoint], batches: list[dict], progress: bool) -> dict[str, Stats]:
    float_folded = matching.float_model
    f_sess = session(float_folded, optimize=False)
    references = [run(f_sess, feeds) for feeds in batches]
    sess = session(sensitivity_model(float_folded, points, {p.layer: p for p in matching.weights}), optimize=False)
    outputs = _output_names(float_folded)
    results = {}
    for i, point in enumerate(progress_bar(points, "sensitivity", enabled=progress)):
        mask = np.zeros(len(points), np.bool_)
        mask[i] = True
        s = Stats()
        for feeds, ref in zip(batches, references):
            out = dict(zip(outputs, sess.run(outputs, {**feeds, SENSITIVITY_MASK: mask})))
            for name in outputs:
                s.add(ref[name], out[name])
        results[point.name] = s
    return results


def _kernel(matching: Matching, selected: list[QPoint], quant_model: onnx.ModelProto, batches: list[dict],
            progress: bool) -> dict[str, Stats]:
    """Each quant point's codes from the integer kernels, against the reference view.

    For every quant point, the sub-model from the codes of the quant points that feed it to its own
    codes is cut out (``onnx.utils.Extractor``) and run fully optimized, so onnxruntime fuses it
    into its integer kernels (QLinearConv, ...), on the reference view's upstream codes. What it
    shows is that layer's kernel error alone; a graph with extra outputs would not be fused at all.
    """
    acts = matching.activations
    codes_of = {p.name: p.codes for p in acts}
    ref_sess = session(quant_model, optimize=False, extra_outputs=list(codes_of.values()))
    references = [run(ref_sess, feeds) for feeds in batches]
    graph_inputs = [i.name for i in ref_sess.get_inputs()]
    extractor = onnx.utils.Extractor(quant_model)
    results = {}
    for point in progress_bar(selected, "kernel", enabled=progress):
        if point.source in graph_inputs:
            continue
        inputs = [codes_of[n] for n in point.inputs if n in codes_of] + graph_inputs
        sub = extractor.extract_model(inputs, [point.codes])
        sub.ir_version = quant_model.ir_version
        sess = session(sub, optimize=True)
        wanted = [i.name for i in sess.get_inputs()]
        s = Stats()
        for feeds, ref in zip(batches, references):
            values = {**feeds, **ref}
            got = sess.run([point.codes], {name: values[name] for name in wanted})[0]
            want = ref[point.codes]
            s.add(dequantize_np(want, point.scale, point.zero_point, point.axis),
                  dequantize_np(got, point.scale, point.zero_point, point.axis))
            d = np.abs(want.astype(np.int64) - got.astype(np.int64))
            s.lsb[0] += int((d == 0).sum())
            s.lsb[1] += int((d == 1).sum())
            s.lsb[2] += int((d > 1).sum())
        results[point.name] = s
    return results


def saturation_warning(rows: list[Row], isa: dict) -> Optional[str]:
    """The u8 x s8 int16 saturation of x86 kernels without VNNI (docs/design.md, contract 5), and its fix."""
    bad = [r for r in rows if r.point.kind == "activation" and r.point.layer and r.point.bits == 8
           and sum(r.stats.lsb) and r.stats.lsb[2] / sum(r.stats.lsb) > 1e-3]
    if not bad or isa.get("vnni") or not isa.get("avx2"):
        return None
    return (f"{len(bad)} integer-kernel layers differ by more than 1 LSB (first: {bad[0].point.name}) and this "
            "CPU has no VNNI: onnxruntime's AVX2 u8 x s8 kernels saturate int16 partial sums. Export with "
            "`--act-signed` (s8 x s8) or `--weight-bits 7` to avoid it.")


def select_points(matching: Matching, patterns: Optional[Sequence[str]]) -> list[QPoint]:
    """The activation quant points whose names match any glob in `patterns` (all if None)."""
    if not patterns:
        return matching.activations
    chosen = [p for p in matching.activations if any(fnmatch.fnmatchcase(p.name, g) for g in patterns)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(p.name, pattern) for p in matching.activations):
            names = [p.name for p in matching.activations]
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
            raise ValueError(f"--points {pattern!r} matches no quant point of the model"
                             + (f"; nearest: {', '.join(close)}" if close else f" (e.g. {', '.join(names[:3])})"))
    return chosen


def diff(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, batches: Iterable[dict], *,
         mode: str = "accumulated", points: Optional[Sequence[str]] = None, progress: bool = True,
         jump_db: float = 6.0) -> DiffReport:
    """Compare `quant_model` with `float_model` on `batches` (dicts of input arrays), quant point by
    quant point, in `mode` (see the module docstring). `points`: globs of the quant points to
    report (sensitivity and kernel modes then only measure those); default every one."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    start = time.perf_counter()
    float_model, quant_model = with_types(float_model), with_types(quant_model)
    matching = match(float_model, quant_model)
    selected = select_points(matching, points)
    batches = list(batches)
    if not batches:
        raise ValueError("no input batches to compare on")
    weight_rows = _weight_rows(matching)
    isa = cpu_isa()
    outputs: dict[str, Stats] = {}
    warnings: list[str] = []
    if mode == "accumulated":
        stats, outputs = _accumulated(matching, float_model, quant_model, batches, progress)
    elif mode == "local":
        stats, outputs = _local(matching, float_model, quant_model, batches, progress)
    elif mode == "sensitivity":
        stats = _sensitivity(matching, selected, batches, progress)
    else:
        stats = _kernel(matching, selected, quant_model, batches, progress)
    rows = []
    wanted = {p.name for p in selected}
    weights_by_layer = {r.point.layer: r for r in weight_rows}
    if points:
        weights_by_layer = {layer: r for layer, r in weights_by_layer.items()
                            if any(p.layer == layer for p in selected)}
    for p in matching.activations:
        if p.name not in stats or p.name not in wanted:
            continue
        if p.layer in weights_by_layer and mode in ("accumulated", "local"):
            rows.append(weights_by_layer.pop(p.layer))
        rows.append(Row(p, stats[p.name]))
    if mode in ("accumulated", "local"):
        rows.extend(weights_by_layer.values())
        _mark_jumps(rows, jump_db)
    if mode == "kernel":
        warning = saturation_warning(rows, isa)
        if warning:
            warnings.append(warning)
    if matching.unmatched:
        warnings.append(f"{len(matching.unmatched)} quantized tensors have no float counterpart: {matching.unmatched[:5]}")
    return DiffReport(mode, rows, outputs, len(batches), time.perf_counter() - start, isa,
                      matching.unmatched, warnings, jump_db)


__all__ = ["DiffReport", "MODES", "Matching", "QPoint", "Row", "Stats", "diff", "isa_text", "local_model", "match"]
