"""torch fake-quant vs onnxruntime, in the integer domain, at every quant point (docs/design.md, contract 5).

The reference view: onnxruntime with graph optimizations disabled computes the QDQ semantics
exactly, so the integer codes at each QuantizeLinear are what the torch model's quantizers should
produce, code for code. Differences can only come from float rounding upstream (a convolution
summed in another order lands on the other side of a half-step) and are at most one step.

    report = check_parity(qmodel, onnx_model, batches)
    report.ok()          # >= 99.99 % of codes equal and none more than 1 LSB apart
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx
import torch
from torch import fx

from deployq.qat.prepare import point_names, quant_points
from deployq.core.progress import progress_bar
from deployq.qat.calibrate import input_names, model_inputs, weight_qparams
from deployq.core.qformula import dequantize, quantize
from deployq.qat.quantizers import FakeQuantizer
from deployq.core.runtime import run, session
from deployq.exporters.graph import base_name, layouts_of, quantized_tensor, undo_layout


@dataclass
class PointParity:
    name: str
    kind: str
    bits: int
    elements: int = 0
    exact: int = 0
    one: int = 0
    max_lsb: int = 0

    @property
    def exact_fraction(self) -> float:
        return self.exact / self.elements if self.elements else 1.0

    @property
    def more(self) -> int:
        return self.elements - self.exact - self.one

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise ValueError(f"quant point {self.name!r}: torch codes have shape {a.shape}, ONNX {b.shape}")
        diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
        self.elements += diff.size
        self.exact += int((diff == 0).sum())
        self.one += int((diff == 1).sum())
        self.max_lsb = max(self.max_lsb, int(diff.max(initial=0)))

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bits": self.bits, "elements": self.elements,
                "exact_fraction": self.exact_fraction, "lsb_0": self.exact, "lsb_1": self.one,
                "lsb_more": self.more, "max_lsb": self.max_lsb}


@dataclass
class ParityReport:
    points: list[PointParity] = field(default_factory=list)
    onnx: str = "the model"  # what was checked
    ort_format: Optional["FormatAgreement"] = None  # an ORT-format file's outputs against the .onnx's
    ort_path: Optional[str] = None

    def passed(self) -> bool:
        """What ``deployq check`` gates on: no quant point more than 1 LSB apart (and the ORT file,
        if one was given, at most 1 LSB from the .onnx at the outputs)."""
        return not self.failures() and (self.ort_format is None or self.ort_format.ok)

    def verdict(self) -> str:
        text = (f"{self.elements} codes at {len(self.points)} quant points: {100 * self.exact_fraction:.4f}% equal, "
                f"max {self.max_lsb} LSB apart")
        if self.ort_format is not None:
            f = self.ort_format
            text += (f"; {Path(self.ort_path).name} vs {Path(self.onnx).name}: {f.equal}/{f.elements} output "
                     f"values equal, max {f.max_lsb:g} LSB apart")
        failures = self.failures()
        if failures:
            text += f"; more than 1 LSB at {', '.join(p.name for p in failures[:5])}"
        return ("PASS: " if self.passed() else "FAIL: ") + text

    @property
    def elements(self) -> int:
        return sum(p.elements for p in self.points)

    @property
    def exact_fraction(self) -> float:
        total = self.elements
        return sum(p.exact for p in self.points) / total if total else 1.0

    @property
    def max_lsb(self) -> int:
        return max((p.max_lsb for p in self.points), default=0)

    def ok(self, min_exact: float = 0.9999, max_lsb: int = 1) -> bool:
        """At most `max_lsb` apart at every quant point, and `min_exact` of all codes equal.

        The fraction is over all codes compared: flips are independent rare events (~1e-5 per code
        here), so one flip in a 2048-code bottleneck tensor says nothing about that layer.
        """
        return self.max_lsb <= max_lsb and self.exact_fraction >= min_exact

    def failures(self, max_lsb: int = 1) -> list[PointParity]:
        return [p for p in self.points if p.max_lsb > max_lsb]

    @property
    def worst(self) -> Optional[PointParity]:
        return min(self.points, key=lambda p: p.exact_fraction, default=None)

    def to_json(self) -> dict:
        data = {"onnx": self.onnx, "elements": self.elements, "exact_fraction": self.exact_fraction,
                "max_lsb": self.max_lsb, "ok": self.ok(), "passed": self.passed(),
                "points": [p.to_json() for p in self.points]}
        if self.ort_format is not None:
            data["ort_format"] = {"file": self.ort_path, **self.ort_format.to_json()}
        return data


class _Capture(fx.Interpreter):
    """Runs the QAT graph and records the integer codes each activation quantizer produces.

    Each quantizer runs its own forward (the fake quantization QAT trains with), and its codes are
    read off the result, which lies on the quantization grid: a fault in a quantizer's forward
    shows here as codes onnxruntime does not produce. With `forced` codes (from onnxruntime), each
    quantizer's output is replaced by the dequantized forced codes, so every layer computes from
    exactly the inputs the other side had: what is then compared is the layer's own arithmetic,
    not error that flowed in from above.
    """

    def __init__(self, gm: fx.GraphModule, forced: Optional[dict[str, np.ndarray]] = None) -> None:
        super().__init__(gm)
        self.forced = forced
        self.codes: dict[str, np.ndarray] = {}
        self.names = point_names(gm)

    def call_module(self, target: str, args: tuple, kwargs: dict):
        if target not in self.names:
            return super().call_module(target, args, kwargs)
        name = self.names[target]
        q: FakeQuantizer = self.module.get_submodule(target)
        value = super().call_module(target, args, kwargs)  # the quantizer's own forward (what QAT runs)
        scale, zero_point = q.qparams()
        axis = q.axis if scale.ndim else None
        # its output is on the grid: (q - zp)·s; the codes are read back off it
        codes = quantize(value.detach(), scale, zero_point, q.qmin, q.qmax, axis)
        self.codes[name] = codes.numpy().astype(np.int64)
        if self.forced is not None and name in self.forced:
            value = dequantize(torch.from_numpy(self.forced[name].astype(np.float32)), scale, zero_point, axis)
        return value


def torch_codes(qmodel: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                forced: Optional[dict[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Integer codes at every activation / input quant point of one forward, and every weight.
    `forced`: codes to continue from at each quant point (the local view), see :class:`_Capture`."""
    points = quant_points(qmodel)
    capture = _Capture(qmodel.eval(), forced)
    with torch.no_grad():
        capture.run(*inputs)
    codes = capture.codes
    for name, point in points.items():
        if point.kind != "weight":
            continue
        layer = qmodel.get_submodule(point.layer)
        scale, zero_point = weight_qparams(layer)
        q = layer.weight_quant
        w = layer.folded_weight_and_bias()[0].detach()
        codes[name] = quantize(w, scale, zero_point, q.qmin, q.qmax, q.axis if scale.ndim else None).numpy().astype(np.int64)
    return codes


def quantize_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """{quant point (tensor) name: QuantizeLinear output name} for the quant points of a QDQ model.

    A quant point is the tensor a QuantizeLinear quantizes (through an optional Clip, for 9..16-bit
    codes); graph outputs renamed to ``T_prequant`` map back to T (:func:`deployq.core.runtime.base_name`).
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            found.setdefault(base_name(quantized_tensor(node, producers, initializers)[0]), node.output[0])
    return found


def onnx_weight_codes(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """{weight quant point: integer codes} in torch's layout: a MatMul's (in, out) weight (a Linear
    on a tensor of rank > 2) is transposed back to the Linear's (out, in)."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out = {}
    for name in names:
        init = inits.get(f"{name}_quantized")
        if init is None:
            continue
        codes = onnx.numpy_helper.to_array(init).astype(np.int64)
        dq = readers.get(init.name, [])
        layers = [n for d in dq for n in readers.get(d.output[0], [])]
        if layers and layers[0].op_type == "MatMul":
            codes = codes.T
        out[name] = codes
    return out


def check_parity(qmodel: fx.GraphModule, model: onnx.ModelProto, batches: Iterable, *,
                 max_batches: Optional[int] = None, local: bool = True, progress: bool = False) -> ParityReport:
    """Compare integer codes of `qmodel` (torch) and `model` (ORT, reference view) over `batches`.

    local=True (default): torch continues from ORT's codes at every quant point, so each point
    shows its own arithmetic only. local=False: both run freely; a one-step flip upstream (float
    summation order) then spreads downstream, so deep models show more (and larger) differences.
    """
    points = quant_points(qmodel)
    q_outputs = quantize_nodes(model)
    missing = [n for n, p in points.items() if p.kind != "weight" and n not in q_outputs]
    if missing:
        raise ValueError(f"the ONNX model has no QuantizeLinear for quant points {missing[:8]}")
    wanted = {n: q_outputs[n] for n, p in points.items() if p.kind != "weight"}
    sess = session(model, optimize=False, extra_outputs=wanted.values())
    names = input_names(qmodel)
    onnx_inputs = {i.name for i in sess.get_inputs()}
    if set(names) != onnx_inputs:
        raise ValueError(f"the ONNX model takes inputs {sorted(onnx_inputs)}, the torch model {names}")
    report = {n: PointParity(n, p.kind, p.spec.bits) for n, p in points.items()}
    weights_done = False
    for i, batch in enumerate(progress_bar(batches, "check", enabled=progress)):
        if max_batches is not None and i >= max_batches:
            break
        inputs = model_inputs(batch, names)
        feeds = {name: t.detach().numpy().astype(np.float32) for name, t in zip(names, inputs)}
        results = run(sess, feeds)
        theirs = {name: results[output] for name, output in wanted.items()}
        ours = torch_codes(qmodel, inputs, theirs if local else None)
        for name, output in wanted.items():
            report[name].add(ours[name], results[output])
        if not weights_done:
            theirs = onnx_weight_codes(model, [n for n, p in points.items() if p.kind == "weight"])
            layouts = layouts_of(model)  # weights a pass wrote in another layout (a ConvTranspose as Conv)
            for name, codes in theirs.items():
                record = layouts.get(f"{name}_quantized")  # the codes' initializer (onnx_weight_codes)
                if record is not None:
                    codes = undo_layout(codes, record, ours[name].shape)
                report[name].add(ours[name], codes)
            weights_done = True
    return ParityReport([report[n] for n in points if report[n].elements])


@dataclass(frozen=True)
class FormatAgreement:
    """How an ORT-format file's outputs compare with those of the ONNX model it was converted from."""

    elements: int
    equal: int
    max_lsb: float  # in steps of each output's quantization grid (its DequantizeLinear scale)

    @property
    def ok(self) -> bool:
        return self.max_lsb <= 1

    def to_json(self) -> dict:
        return {"elements": self.elements, "equal": self.equal, "max_lsb": self.max_lsb, "ok": self.ok}


def _output_steps(model: onnx.ModelProto) -> dict[str, float]:
    """{graph output: the step of its grid}: the scale of the DequantizeLinear that makes it (the
    largest, if per channel); 0 for a float output."""
    inits = {i.name: i for i in model.graph.initializer}
    makers = {o: n for n in model.graph.node for o in n.output}
    steps = {}
    for out in model.graph.output:
        node = makers.get(out.name)
        scale = node.input[1] if node is not None and node.op_type == "DequantizeLinear" else None
        steps[out.name] = float(np.max(onnx.numpy_helper.to_array(inits[scale]))) if scale in inits else 0.0
    return steps


def compare_ort_format(model: onnx.ModelProto, ort_path: str, feeds: Iterable[dict[str, np.ndarray]]) -> FormatAgreement:
    """Run the ORT-format file and its ONNX model, optimized as the converter optimized it for the
    device profile in the file's metadata, on `feeds`. Quantized outputs are compared in steps of
    their grid; a float output may differ by float rounding (1e-5 of its largest value)."""
    from deployq.deploy.devices import device_of, ort_reference
    from deployq.core.runtime import ort_format_session

    theirs = ort_format_session(ort_path)
    ours = ort_reference(model, device_of(theirs.get_modelmeta().custom_metadata_map))
    steps = _output_steps(model)
    elements = equal = 0
    worst = 0.0
    for feed in feeds:
        a, b = run(theirs, feed, label=str(ort_path)), run(ours, feed)
        for name, step in steps.items():
            diff = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))
            if not diff.size:
                continue
            elements, equal = elements + diff.size, equal + int(np.sum(diff == 0))
            unit = step or 1e-5 * max(float(np.abs(b[name]).max()), 1e-30)
            worst = max(worst, float(diff.max() / unit))
    return FormatAgreement(elements, equal, round(worst, 3))
