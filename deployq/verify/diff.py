"""Layer-by-layer comparison of a float ONNX model and its QDQ model (``deployq diff``).

Quant points are paired by name (:mod:`.match`; by graph position first where the quantized model's
names are not the float model's, :mod:`.positions`), errors are streamed into :mod:`.stats`. A
point that only a MaxPool reads is compared after the pool: what it discards reaches no reader.

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

"""

from __future__ import annotations

import difflib
import fnmatch
import time
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from deployq.core.progress import progress_bar
from deployq.core.qformula import dequantize_np, onnx_integer_dtype
from deployq.core.runtime import cpu_isa, run, session
from deployq.exporters.graph import WEIGHT_LAYER_OPS, to_model

from .match import MatchedPoint, Matching, match, with_types
from .positions import names_differ, pair_by_position
from .stats import DiffReport, Row, Stats, _mark_jumps

MODES = ("accumulated", "local", "sensitivity", "kernel")


# ---------------------------------------------------------------------------- modes


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
            _add(stats[p.name], p, f[p.name], q[p.value], q[p.codes])
        for name in outputs:
            outputs[name].add(f[name], q[name])
    return stats, outputs


def _add(stats: Stats, point: MatchedPoint, ref: np.ndarray, value: np.ndarray, codes: np.ndarray) -> None:
    """One batch of a quant point's row: its values, or for a point only a MaxPool reads, what the
    pool makes of them (the codes then follow from the pooled values)."""
    if point.pool is None:
        stats.add(ref, value, point, codes)
    else:
        stats.add(max_pool(ref, point.pool), max_pool(value, point.pool), point)


def max_pool(x: np.ndarray, attributes: dict) -> np.ndarray:
    """ONNX MaxPool (its kernel_shape, strides, pads, dilations, ceil_mode) of a float array."""
    import torch
    import torch.nn.functional as F

    kernel = list(attributes["kernel_shape"])
    n = len(kernel)
    pads = list(attributes.get("pads", [0] * 2 * n))
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = F.pad(t, [p for d in reversed(range(n)) for p in (pads[d], pads[d + n])], value=-np.inf)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    return pool(t, kernel, list(attributes.get("strides", [1] * n)), 0, list(attributes.get("dilations", [1] * n)),
                bool(attributes.get("ceil_mode", 0))).numpy()


def _integer_model_outputs(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                           batches: list[dict]) -> dict[str, Stats]:
    """The outputs of both models as onnxruntime runs them for deployment (fully optimized: the
    quantized one on its fused integer kernels), output by output in graph order. The other modes
    read tensors out of unoptimized graphs (QDQ computed in float), whose outputs can differ."""
    f_sess, q_sess = session(float_model, optimize=True), session(quant_model, optimize=True)
    names = _output_names(quant_model)
    outputs = {name: Stats() for name in names}
    for feeds in batches:
        for name, ref, value in zip(names, f_sess.run(None, feeds), q_sess.run(None, feeds)):
            outputs[name].add(ref, value)
    return outputs


def local_model(quant_model: onnx.ModelProto, points: list[MatchedPoint]) -> tuple[onnx.ModelProto, dict[str, str]]:
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
            _add(stats[p.name], p, f[p.name], q[p.value], q[p.codes])
        for name in outputs:
            outputs[name].add(f[name], q[name])
    return stats, outputs


SENSITIVITY_MASK = "deployq_sensitivity_mask"


def sensitivity_model(float_folded: onnx.ModelProto, points: list[MatchedPoint],
                      weights_by_layer: dict[Optional[str], MatchedPoint]) -> onnx.ModelProto:
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
        if node.op in WEIGHT_LAYER_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            layers[node.name] = layers[node.outputs[0].name] = node

    def flag(i: int, p: MatchedPoint) -> gs.Variable:
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


def _fake_quant_nodes(graph: gs.Graph, x: gs.Tensor, point: MatchedPoint) -> gs.Variable:
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


def _sensitivity(matching: Matching, points: list[MatchedPoint], batches: list[dict], progress: bool) -> dict[str, Stats]:
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


def _kernel(matching: Matching, selected: list[MatchedPoint], quant_model: onnx.ModelProto, batches: list[dict],
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


def select_points(matching: Matching, patterns: Optional[Sequence[str]]) -> list[MatchedPoint]:
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
    notes = []
    if names_differ(float_model, quant_model):  # another tool's export: pair its layers by position
        pairing = pair_by_position(float_model, quant_model)
        quant_model = pairing.model
        notes.append(pairing.note())
    matching = match(float_model, quant_model)
    selected = select_points(matching, points)
    batches = list(batches)
    if not batches:
        raise ValueError("no input batches to compare on")
    weight_rows = _weight_rows(matching)
    isa = cpu_isa()
    outputs: dict[str, Stats] = {}
    warnings: list[str] = notes
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
    deployed = _integer_model_outputs(float_model, quant_model, batches)
    return DiffReport(mode, rows, outputs, len(batches), time.perf_counter() - start, isa,
                      matching.unmatched, warnings, jump_db, deployed=deployed)


__all__ = ["MODES", "diff", "local_model", "saturation_warning", "select_points", "sensitivity_model"]
