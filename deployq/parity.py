"""torch fake-quant vs onnxruntime, in the integer domain, at every quant point (DESIGN contract 5).

The reference view: onnxruntime with graph optimizations disabled computes the QDQ semantics
exactly, so the integer codes at each QuantizeLinear are what the torch model's quantizers should
produce, code for code. Differences can only come from float rounding upstream (a convolution
summed in another order lands on the other side of a half-step) and are at most one step.

    report = check_parity(qmodel, onnx_model, batches)
    report.ok()          # >= 99.99 % of codes equal and none more than 1 LSB apart
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from deployq.prepare import quant_points
from deployq.qat import model_inputs, weight_qparams
from deployq.qformula import quantize
from deployq.quantizers import FakeQuantizer, quantize_tensor

QUANT_SUFFIX = "_prequant"


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
        return self.max_lsb <= max_lsb and all(p.exact_fraction >= min_exact for p in self.points)

    def failures(self, min_exact: float = 0.9999, max_lsb: int = 1) -> list[PointParity]:
        return [p for p in self.points if p.max_lsb > max_lsb or p.exact_fraction < min_exact]

    def to_json(self) -> dict:
        return {"elements": self.elements, "exact_fraction": self.exact_fraction, "max_lsb": self.max_lsb,
                "ok": self.ok(), "points": [p.to_json() for p in self.points]}


def torch_codes(qmodel: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """Integer codes at every activation / input quant point of one forward, and every weight."""
    points = quant_points(qmodel)
    codes: dict[str, np.ndarray] = {}
    handles = []
    for name, point in points.items():
        if point.kind == "weight":
            continue
        module: FakeQuantizer = qmodel.get_submodule(point.quantizer)

        def capture(mod: FakeQuantizer, args: tuple, key: str = name) -> None:
            codes[key] = quantize_tensor(mod, args[0].detach()).numpy().astype(np.int64)

        handles.append(module.register_forward_pre_hook(capture))
    try:
        with torch.no_grad():
            qmodel.eval()(*inputs)
    finally:
        for h in handles:
            h.remove()
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
    codes); graph outputs renamed to ``T_prequant`` map back to T.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source = node.input[0]
        clip = producers.get(source)
        if clip is not None and clip.op_type == "Clip":
            source = clip.input[0]
        if source.endswith(QUANT_SUFFIX):
            source = source[: -len(QUANT_SUFFIX)]
        found.setdefault(source, node.output[0])
    return found


def ort_session(model: onnx.ModelProto, optimize: bool, extra_outputs: Iterable[str] = (),
                threads: int = 1) -> ort.InferenceSession:
    """A CPU session; `optimize=False` is the reference view (QDQ semantics exactly)."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    existing = {o.name for o in model_copy.graph.output}
    for name in extra_outputs:
        if name not in existing:
            model_copy.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model_copy.SerializeToString(), so, providers=["CPUExecutionProvider"])


def onnx_weight_codes(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for name in names:
        init = inits.get(f"{name}_quantized")
        if init is not None:
            out[name] = onnx.numpy_helper.to_array(init).astype(np.int64)
    return out


def check_parity(qmodel: nn.Module, model: onnx.ModelProto, batches: Iterable, *,
                 max_batches: Optional[int] = None) -> ParityReport:
    """Compare integer codes of `qmodel` (torch) and `model` (ORT, reference view) over `batches`."""
    points = quant_points(qmodel)
    q_outputs = quantize_nodes(model)
    missing = [n for n, p in points.items() if p.kind != "weight" and n not in q_outputs]
    if missing:
        raise ValueError(f"the ONNX model has no QuantizeLinear for quant points {missing[:8]}")
    wanted = {n: q_outputs[n] for n, p in points.items() if p.kind != "weight"}
    session = ort_session(model, optimize=False, extra_outputs=wanted.values())
    input_names = [i.name for i in session.get_inputs()]
    report = {n: PointParity(n, p.kind, p.spec.bits) for n, p in points.items()}
    weights_done = False
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        inputs = model_inputs(batch)
        ours = torch_codes(qmodel, inputs)
        feeds = {name: t.detach().numpy().astype(np.float32) for name, t in zip(input_names, inputs)}
        results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        for name, output in wanted.items():
            report[name].add(ours[name], results[output])
        if not weights_done:
            theirs = onnx_weight_codes(model, [n for n, p in points.items() if p.kind == "weight"])
            for name, codes in theirs.items():
                report[name].add(ours[name], codes)
            weights_done = True
    return ParityReport([report[n] for n in points if report[n].elements])
